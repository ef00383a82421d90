//! `[keys]`: key brokering. Workloads hold placeholder credentials; the
//! proxy swaps in the real provider key from the brokering file (see
//! `guardrails::keys` for the file and the swap). This module holds the
//! settings only, never a key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The brokering file's name in the state directory, when `keys.file` is
/// empty.
pub const DEFAULT_KEYS_FILE: &str = "keys.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// Replace placeholders by real keys, and refuse placeholders out of
    /// scope and real keys from brokered workloads. Needs
    /// `guardrails.enabled`.
    pub enabled: bool,
    /// The brokering file (real keys and issued placeholders; mode 0600).
    /// Empty: `keys.toml` in the state directory.
    pub file: PathBuf,
    /// What every placeholder starts with, so that it is known as one.
    pub placeholder_prefix: String,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self { enabled: false, file: PathBuf::new(), placeholder_prefix: "ik-".into() }
    }
}

impl KeysConfig {
    /// The brokering file: `file`, or `keys.toml` in `state_dir`.
    pub fn file_in(&self, state_dir: &Path) -> PathBuf {
        if self.file.as_os_str().is_empty() { state_dir.join(DEFAULT_KEYS_FILE) } else { self.file.clone() }
    }

    /// Every problem with these settings, each prefixed with its field.
    pub fn validate(&self, guardrails_enabled: bool) -> Vec<String> {
        let mut errors = Vec::new();
        let p = &self.placeholder_prefix;
        if p.len() < 2 || p.len() > 16 || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            errors.push(format!(
                "keys.placeholder_prefix: {p:?} must be 2 to 16 characters of letters, digits, `-` and `_`"
            ));
        }
        if !self.file.as_os_str().is_empty() && !self.file.is_absolute() {
            errors.push(format!("keys.file: {} must be an absolute path", self.file.display()));
        }
        if self.enabled && !guardrails_enabled {
            errors.push("keys.enabled: key brokering runs in the guardrails: set guardrails.enabled too".into());
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_each_field() {
        let cfg = KeysConfig { enabled: true, file: "rel.toml".into(), placeholder_prefix: "ik ".into() };
        let errors = cfg.validate(false);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("keys.placeholder_prefix:"), "{errors:?}");
        assert!(errors[1].starts_with("keys.file:"), "{errors:?}");
        assert!(errors[2].starts_with("keys.enabled:"), "{errors:?}");
        assert!(KeysConfig::default().validate(false).is_empty());
    }

    #[test]
    fn the_file_defaults_to_the_state_directory() {
        let cfg = KeysConfig::default();
        assert_eq!(cfg.file_in(Path::new("/var/lib/interceptor")), Path::new("/var/lib/interceptor/keys.toml"));
        let cfg = KeysConfig { file: "/etc/keys.toml".into(), ..cfg };
        assert_eq!(cfg.file_in(Path::new("/x")), Path::new("/etc/keys.toml"));
    }
}
