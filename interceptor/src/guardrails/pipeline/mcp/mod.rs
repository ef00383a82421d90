//! MCP (Model Context Protocol) exchanges: the state the pipeline keeps
//! across them, for as long as the data plane runs (a reload of the
//! guardrails keeps it).
//!
//! * `sessions` — the requests of each session still waiting for their
//!   answer, so results on any stream are matched to their method and tool;
//! * `pins` — the rug-pull pins: tool definitions seen per server and
//!   workload, persisted.

pub mod pins;
pub mod sessions;

use std::path::{Path, PathBuf};

use self::{
    pins::{PinsError, ToolPins},
    sessions::Sessions,
};
use crate::config::McpConfig;

/// The pins file's name in the state directory, when `mcp.pins_file` is
/// empty.
pub const PINS_FILE_NAME: &str = "mcp-tool-pins.json";

/// What MCP inspection remembers across exchanges.
#[derive(Debug)]
pub struct McpState {
    pub sessions: Sessions,
    pub pins: ToolPins,
}

impl McpState {
    /// Sessions and pins kept in memory only.
    pub fn in_memory() -> Self {
        Self { sessions: Sessions::default(), pins: ToolPins::in_memory() }
    }

    /// The pins of [`pins_path`] (in memory when there is none), loaded now.
    pub fn open(cfg: &McpConfig, state_dir: Option<&Path>) -> Result<Self, PinsError> {
        let pins = match pins_path(cfg, state_dir) {
            Some(path) => ToolPins::load(&path)?,
            None => ToolPins::in_memory(),
        };
        Ok(Self { sessions: Sessions::default(), pins })
    }
}

/// Where the pins are persisted: `mcp.pins_file`, else
/// [`PINS_FILE_NAME`] in the state directory; `None` without either, or
/// when MCP inspection is off.
pub fn pins_path(cfg: &McpConfig, state_dir: Option<&Path>) -> Option<PathBuf> {
    if !cfg.enabled {
        return None;
    }
    if !cfg.pins_file.as_os_str().is_empty() {
        return Some(cfg.pins_file.clone());
    }
    state_dir.map(|dir| dir.join(PINS_FILE_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_go_to_the_configured_file_or_the_state_directory() {
        let dir = Path::new("/var/lib/interceptor");
        let default = McpConfig::default();
        assert_eq!(pins_path(&default, Some(dir)), Some(dir.join("mcp-tool-pins.json")));
        assert_eq!(pins_path(&default, None), None);
        let named = McpConfig { pins_file: "/etc/pins.json".into(), ..McpConfig::default() };
        assert_eq!(pins_path(&named, Some(dir)), Some(PathBuf::from("/etc/pins.json")));
        let off = McpConfig { enabled: false, ..McpConfig::default() };
        assert_eq!(pins_path(&off, Some(dir)), None);
    }

    #[test]
    fn opening_loads_the_pins_saved_before() {
        let dir = tempfile::tempdir().unwrap();
        let state = McpState::open(&McpConfig::default(), Some(dir.path())).unwrap();
        state.pins.check("mcp.example.test", "w", &[("t", [1; 32])], false);
        state.pins.save().unwrap();
        let again = McpState::open(&McpConfig::default(), Some(dir.path())).unwrap();
        assert_eq!(again.pins.check("mcp.example.test", "w", &[("t", [2; 32])], false).changed, vec!["t".to_string()]);
    }
}
