//! Rug-pull pins: the hash of every tool definition a server listed, per
//! server host and workload, so that a definition that changes later (in the
//! same session or another) is noticed.
//!
//! The pins live in memory and are persisted as one JSON file (the state
//! directory's `mcp-tool-pins.json` or `mcp.pins_file`), written whole to a
//! temporary file in the same directory and renamed over the old one, so a
//! crash leaves the old file or the new one, never half of one. The file is
//! read once at start; a missing file is an empty store. Checking is
//! in-memory; [`ToolPins::save`] does the I/O and is called off the async
//! runtime by the pipeline when a check changed something.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use serde::{Deserialize, Serialize};

/// At most this many (server, workload) pairs are pinned; past it new pairs
/// are checked against nothing and not remembered (a flood of workloads or
/// hosts cannot grow the store or the file without bound).
pub const MAX_PINNED_PAIRS: usize = 10_000;
/// At most this many tools are pinned per (server, workload).
pub const MAX_TOOLS_PER_PAIR: usize = 1_000;

/// The file's version; another is refused rather than misread.
const FILE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error("cannot read the tool pins file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the tool pins file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the tool pins file {path} has version {found}, expected {FILE_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write the tool pins file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a `tools/list` answer showed against the pins.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PinCheck {
    /// Tools pinned before whose definition is now different, in the order
    /// of the answer.
    pub changed: Vec<String>,
    /// Tools seen for the first time (now pinned, when there was room).
    pub added: Vec<String>,
}

impl PinCheck {
    /// Whether the store changed, so [`ToolPins::save`] has work to do.
    fn dirty(&self, accepted_changes: bool) -> bool {
        !self.added.is_empty() || (accepted_changes && !self.changed.is_empty())
    }
}

/// The file's shape: server host → workload key → tool name → hex SHA-256
/// of the tool's canonical definition.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinsFile {
    version: u32,
    servers: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>,
}

#[derive(Debug, Default)]
struct State {
    file: PinsFile,
    pairs: usize,
    /// Changed since the last save.
    dirty: bool,
}

/// The pin store. Shared by every exchange (`Arc`); a check holds its lock
/// for a few map operations, never across I/O or an await.
#[derive(Debug)]
pub struct ToolPins {
    path: Option<PathBuf>,
    state: Mutex<State>,
}

impl ToolPins {
    /// A store kept in memory only (tests, or no state directory).
    pub fn in_memory() -> Self {
        Self { path: None, state: Mutex::new(State { file: PinsFile::new(), ..State::default() }) }
    }

    /// The pins persisted at `path`; none yet when the file does not exist.
    pub fn load(path: &Path) -> Result<Self, PinsError> {
        let file = match fs::read(path) {
            Ok(bytes) => {
                let file: PinsFile = serde_json::from_slice(&bytes)
                    .map_err(|source| PinsError::Parse { path: path.to_owned(), source })?;
                if file.version != FILE_VERSION {
                    return Err(PinsError::Version { path: path.to_owned(), found: file.version });
                }
                file
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => PinsFile::new(),
            Err(source) => return Err(PinsError::Read { path: path.to_owned(), source }),
        };
        let pairs = file.servers.values().map(BTreeMap::len).sum();
        Ok(Self { path: Some(path.to_owned()), state: Mutex::new(State { file, pairs, dirty: false }) })
    }

    /// Compares the tools of one `tools/list` answer (name and definition
    /// hash) with what `server` listed to `workload` before. New tools are
    /// pinned. A changed tool keeps its old pin unless `accept_changes`
    /// (the changes are alerted, not blocked), in which case the new
    /// definition becomes the pin and the change is reported once.
    pub fn check(&self, server: &str, workload: &str, tools: &[(&str, [u8; 32])], accept_changes: bool) -> PinCheck {
        let mut result = PinCheck::default();
        let mut state = self.state();
        let state = &mut *state;
        let known = state.file.servers.get(server).is_some_and(|w| w.contains_key(workload));
        if !known && state.pairs >= MAX_PINNED_PAIRS {
            return result;
        }
        let pins = state.file.servers.entry(server.to_owned()).or_default().entry(workload.to_owned()).or_default();
        if !known {
            state.pairs += 1;
        }
        for (name, hash) in tools {
            let hash = hex(hash);
            let room = pins.len() < MAX_TOOLS_PER_PAIR;
            match pins.get_mut(*name) {
                Some(pinned) if *pinned == hash => {}
                Some(pinned) => {
                    result.changed.push((*name).to_owned());
                    if accept_changes {
                        *pinned = hash;
                    }
                }
                None if room => {
                    pins.insert((*name).to_owned(), hash);
                    result.added.push((*name).to_owned());
                }
                None => {}
            }
        }
        state.dirty |= result.dirty(accept_changes);
        result
    }

    /// Writes the pins to their file if they changed since the last save
    /// (nothing for an in-memory store). Blocking: call it off the runtime.
    pub fn save(&self) -> Result<(), PinsError> {
        let Some(path) = &self.path else { return Ok(()) };
        let text = {
            let mut state = self.state();
            if !state.dirty {
                return Ok(());
            }
            state.dirty = false;
            serde_json::to_vec_pretty(&state.file).unwrap_or_default()
        };
        write_atomic(path, &text).map_err(|source| {
            self.state().dirty = true;
            PinsError::Write { path: path.clone(), source }
        })
    }
}

impl ToolPins {
    /// The state; a panic elsewhere while holding the lock leaves maps that
    /// are still whole, so a poisoned lock is used as it is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl PinsFile {
    fn new() -> Self {
        Self { version: FILE_VERSION, servers: BTreeMap::new() }
    }
}

/// Writes `bytes` to a new file next to `path` (mode 0600), syncs it and
/// renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn hex(bytes: &[u8; 32]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [1; 32];
    const B: [u8; 32] = [2; 32];

    #[test]
    fn new_tools_are_pinned_and_a_changed_definition_is_reported() {
        let pins = ToolPins::in_memory();
        let first = pins.check("mcp.example.test", "w", &[("search", A), ("fetch", A)], false);
        assert_eq!(first, PinCheck { changed: vec![], added: vec!["search".into(), "fetch".into()] });
        assert_eq!(pins.check("mcp.example.test", "w", &[("search", A), ("fetch", A)], false), PinCheck::default());
        let changed = pins.check("mcp.example.test", "w", &[("search", B), ("fetch", A)], false);
        assert_eq!(changed.changed, vec!["search".to_string()]);
        // Not accepted: the old pin stays, so the change is reported again.
        assert_eq!(pins.check("mcp.example.test", "w", &[("search", B)], false).changed, vec!["search".to_string()]);
        // Accepted once: reported that time, then the new definition is the pin.
        assert_eq!(pins.check("mcp.example.test", "w", &[("search", B)], true).changed, vec!["search".to_string()]);
        assert_eq!(pins.check("mcp.example.test", "w", &[("search", B)], true), PinCheck::default());
    }

    #[test]
    fn pins_are_per_server_and_workload() {
        let pins = ToolPins::in_memory();
        pins.check("a.example.test", "w1", &[("t", A)], true);
        assert_eq!(pins.check("a.example.test", "w2", &[("t", B)], true).added, vec!["t".to_string()]);
        assert_eq!(pins.check("b.example.test", "w1", &[("t", B)], true).added, vec!["t".to_string()]);
        assert_eq!(pins.check("a.example.test", "w1", &[("t", B)], true).changed, vec!["t".to_string()]);
    }

    #[test]
    fn pins_survive_a_restart_through_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mcp-tool-pins.json");
        let pins = ToolPins::load(&path).unwrap();
        pins.check("mcp.example.test", "w", &[("search", A)], false);
        pins.save().unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");

        let reloaded = ToolPins::load(&path).unwrap();
        assert_eq!(
            reloaded.check("mcp.example.test", "w", &[("search", B)], false).changed,
            vec!["search".to_string()]
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(&hex(&A)) && text.contains("\"version\": 1"), "{text}");
    }

    #[test]
    fn a_bad_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.json");
        fs::write(&path, "{not json").unwrap();
        let err = ToolPins::load(&path).unwrap_err();
        assert!(matches!(err, PinsError::Parse { .. }) && err.to_string().contains("pins.json"), "{err}");
        fs::write(&path, r#"{"version": 9, "servers": {}}"#).unwrap();
        assert!(matches!(ToolPins::load(&path).unwrap_err(), PinsError::Version { found: 9, .. }));
    }

    #[test]
    fn the_store_is_bounded() {
        let pins = ToolPins::in_memory();
        let many: Vec<(String, [u8; 32])> = (0..MAX_TOOLS_PER_PAIR + 5).map(|i| (format!("t{i}"), A)).collect();
        let refs: Vec<(&str, [u8; 32])> = many.iter().map(|(n, h)| (n.as_str(), *h)).collect();
        assert_eq!(pins.check("s", "w", &refs, false).added.len(), MAX_TOOLS_PER_PAIR);
        for i in 1..MAX_PINNED_PAIRS {
            pins.check("s", &format!("w{i}"), &[("t", A)], false);
        }
        assert_eq!(pins.check("s", "one-too-many", &[("t", A)], false), PinCheck::default());
        assert_eq!(pins.check("s", "w1", &[("t", B)], false).changed, vec!["t".to_string()]);
    }
}
