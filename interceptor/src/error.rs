//! Formatting errors for people: an error and its causes on one line, the
//! form every log field and command-line message uses.
//!
//! This module owns no error type and imports nothing from the crate, so
//! every layer (data plane, control plane, commands) can use it.

/// An error and its causes on one line: "a: b: c".
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot run {command}")]
    struct Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn chain_joins_causes() {
        let inner = std::io::Error::other("inner");
        let outer = Spawn { command: "x".into(), source: inner };
        assert_eq!(super::chain(&outer), "cannot run x: inner");
    }
}
