//! Logging: `tracing` to stderr, one JSON object per line or plain text.
//! Log records from the eBPF programs (aya-log, through the `log` crate) are
//! forwarded into the same output.
//!
//! This module imports nothing from the crate: configuration names its
//! [`LogFormat`], not the other way round.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// Set once our JSON subscriber owns stderr: audit events may then be
/// written there directly, in its line format (see [`crate::audit`]).
static JSON_ON_STDERR: AtomicBool = AtomicBool::new(false);

/// How log records are written to stderr (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

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
