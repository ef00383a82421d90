//! `ca-installed.json` in the state directory: what `ca install` added to
//! which trust store, so `ca uninstall` removes exactly that and nothing a
//! user or another program put there.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CaError;
use super::files::write_atomic;

pub const MANIFEST_FILE: &str = "ca-installed.json";
const VERSION: u32 = 1;
/// It names users' home directories: readable by root only.
const MANIFEST_MODE: u32 = 0o600;

/// One certificate we added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "store", rename_all = "lowercase", deny_unknown_fields)]
pub enum Entry {
    /// Our anchor file in the system trust store.
    System { anchor: PathBuf },
    /// A certificate in an NSS database (Chromium, Electron apps, or a
    /// Firefox profile), owned by `uid`.
    Nss {
        /// `nss` for `~/.pki/nssdb`, `firefox` for a profile.
        kind: NssKind,
        db: PathBuf,
        nickname: String,
        user: String,
        uid: u32,
        gid: u32,
        /// The database was created by us (and may be removed when it holds
        /// nothing else).
        #[serde(default)]
        created_db: bool,
        /// Directories we created for it, outermost first.
        #[serde(default)]
        created_dirs: Vec<PathBuf>,
    },
    /// A trusted certificate in a JVM `cacerts`.
    Java { keystore: PathBuf, keytool: PathBuf, alias: String },
}

/// Which program family reads an NSS database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NssKind {
    Nss,
    Firefox,
}

impl Entry {
    /// The store and the name in it, which identify an entry.
    fn key(&self) -> (&Path, &str) {
        match self {
            Entry::System { anchor } => (anchor, ""),
            Entry::Nss { db, nickname, .. } => (db, nickname),
            Entry::Java { keystore, alias, .. } => (keystore, alias),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    entries: Vec<Entry>,
}

/// The manifest, read from and written to one state directory.
#[derive(Debug)]
pub struct Manifest {
    path: PathBuf,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Reads the manifest of `state_dir`; empty when there is none.
    pub fn load(state_dir: &Path) -> Result<Self, CaError> {
        let path = state_dir.join(MANIFEST_FILE);
        let entries = match fs::read(&path) {
            Ok(bytes) => {
                let file: File = serde_json::from_slice(&bytes)
                    .map_err(|source| CaError::Manifest { path: path.clone(), source })?;
                file.entries
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(CaError::Read { path, source }),
        };
        Ok(Self { path, entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds `entry` unless the same store already lists the same name; an
    /// entry for the same name is replaced (its details may have changed).
    pub fn record(&mut self, entry: Entry) {
        match self.entries.iter_mut().find(|e| e.key() == entry.key()) {
            Some(existing) => {
                // Keep what we created the first time: a later install that
                // found the database in place did not create it.
                if let (
                    Entry::Nss { created_db, created_dirs, .. },
                    Entry::Nss { created_db: new_db, created_dirs: new_dirs, .. },
                ) = (&*existing, &entry)
                    && (*created_db || !created_dirs.is_empty())
                    && !*new_db
                    && new_dirs.is_empty()
                {
                    return;
                }
                *existing = entry;
            }
            None => self.entries.push(entry),
        }
    }

    /// Writes the manifest, or removes the file when nothing is recorded.
    pub fn save(&self) -> Result<(), CaError> {
        if self.entries.is_empty() {
            return match fs::remove_file(&self.path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(CaError::Write { path: self.path.clone(), source }),
            };
        }
        let file = File { version: VERSION, entries: self.entries.clone() };
        let mut json =
            serde_json::to_vec_pretty(&file).map_err(|source| CaError::Manifest { path: self.path.clone(), source })?;
        json.push(b'\n');
        write_atomic(&self.path, &json, MANIFEST_MODE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nss(db: &str, created_db: bool) -> Entry {
        Entry::Nss {
            kind: NssKind::Nss,
            db: db.into(),
            nickname: "interceptor-ca-00".into(),
            user: "alice".into(),
            uid: 1000,
            gid: 1000,
            created_db,
            created_dirs: Vec::new(),
        }
    }

    #[test]
    fn round_trip_and_empty_manifest_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = Manifest::load(dir.path()).unwrap();
        assert!(manifest.entries.is_empty());
        manifest.record(Entry::System { anchor: "/usr/local/share/ca-certificates/interceptor-ca.crt".into() });
        manifest.record(nss("/home/alice/.pki/nssdb", true));
        manifest.record(Entry::Java {
            keystore: "/etc/ssl/certs/java/cacerts".into(),
            keytool: "/usr/bin/keytool".into(),
            alias: "interceptor-ca-00".into(),
        });
        manifest.save().unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(manifest.path()).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        let text = fs::read_to_string(manifest.path()).unwrap();
        assert!(text.contains(r#""store": "nss""#), "{text}");
        let again = Manifest::load(dir.path()).unwrap();
        assert_eq!(again.entries, manifest.entries);

        manifest.entries.clear();
        manifest.save().unwrap();
        assert!(!manifest.path().exists());
        manifest.save().unwrap();
    }

    #[test]
    fn recording_twice_keeps_one_entry_and_what_we_created() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = Manifest::load(dir.path()).unwrap();
        manifest.record(nss("/home/alice/.pki/nssdb", true));
        manifest.record(nss("/home/alice/.pki/nssdb", false));
        assert_eq!(manifest.entries, [nss("/home/alice/.pki/nssdb", true)]);
        manifest.record(nss("/home/bob/.pki/nssdb", false));
        assert_eq!(manifest.entries.len(), 2);
    }

    #[test]
    fn a_corrupt_manifest_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(MANIFEST_FILE), b"{not json").unwrap();
        assert!(matches!(Manifest::load(dir.path()), Err(CaError::Manifest { .. })));
    }
}
