//! Logging: `tracing` to stderr, one JSON object per line or plain text.
//! Log records from the eBPF programs (aya-log, through the `log` crate) are
//! forwarded into the same output.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::LogFormat;

/// Set once our JSON subscriber owns stderr: audit events may then be
/// written there directly, in its line format (see [`crate::audit`]).
static JSON_ON_STDERR: AtomicBool = AtomicBool::new(false);

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (info).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    match format {
        LogFormat::Json => {
            if builder.json().flatten_event(true).with_current_span(false).try_init().is_ok() {
                JSON_ON_STDERR.store(true, Ordering::Relaxed);
            }
        }
        LogFormat::Text => {
            let _ = builder.try_init();
        }
    }
}

/// Whether the log is JSON lines on stderr, written by [`init`]'s subscriber.
pub fn json_on_stderr() -> bool {
    JSON_ON_STDERR.load(Ordering::Relaxed)
}

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
    #[test]
    fn chain_joins_causes() {
        let inner = std::io::Error::other("inner");
        let outer = crate::redirect::RedirectError::Spawn { command: "x".into(), source: inner };
        assert_eq!(super::chain(&outer), "cannot run x: inner");
    }
}
