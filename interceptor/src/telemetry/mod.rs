//! Logging: `tracing` to stderr, one JSON object per line or plain text.
//! Log records from the eBPF programs (aya-log, through the `log` crate) are
//! forwarded into the same output.
//!
//! This module imports nothing from the crate: configuration names its
//! [`LogFormat`], not the other way round.
//!
//! The data plane opens a span per connection (`conn`: client, original
//! destination, SNI, workload) and per request, and its log calls carry
//! only what is new. A JSON line has the fields of the spans it was logged
//! in at its top level, each once (see [`SpanFieldsJson`]); the text format
//! prints them as `conn{client=… sni=…}:` before the message.
//!
//! OpenTelemetry export (spans per exchange, audit events as log records)
//! is [`otlp`]'s.

pub mod otlp;

use std::{
    fmt,
    sync::atomic::{AtomicBool, Ordering},
};

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter,
        format::{self, JsonFields, Writer},
    },
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use serde::{Deserialize, Serialize};

/// Set once our JSON subscriber owns stderr: audit events may then be
/// written there directly, in its line format (see [`crate::audit`]).
static JSON_ON_STDERR: AtomicBool = AtomicBool::new(false);

/// How log records are written to stderr (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text when stderr is a terminal (a person runs it), JSON otherwise (a
    /// service manager or a container runtime collects it).
    Auto,
    Json,
    Text,
}

impl LogFormat {
    /// The format [`LogFormat::Auto`] stands for, given whether stderr is a
    /// terminal.
    pub fn resolve(self, stderr_is_terminal: bool) -> Self {
        match self {
            Self::Auto if stderr_is_terminal => Self::Text,
            Self::Auto => Self::Json,
            format => format,
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (info).
pub fn init(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second init (tests) is harmless: keep the first subscriber.
    match format.resolve(std::io::stderr().is_terminal()) {
        LogFormat::Json => {
            if json_subscriber(filter, std::io::stderr).try_init().is_ok() {
                JSON_ON_STDERR.store(true, Ordering::Relaxed);
            }
        }
        LogFormat::Text | LogFormat::Auto => {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
        }
    }
}

/// The JSON-lines subscriber [`init`] installs, writing to `writer`.
pub fn json_subscriber<W>(filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let events = format::Format::default().json().flatten_event(true).with_current_span(false).with_span_list(false);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .fmt_fields(JsonFields::new())
        .event_format(SpanFieldsJson(events))
        .finish()
}

/// tracing-subscriber's JSON line with the fields of every span the event
/// is in added at the top level, before `target`. The event's own fields
/// win over a span's, an inner span's over an outer one's, so each key
/// appears once; a line logged outside any span is exactly the stock one.
pub struct SpanFieldsJson<F>(F);

impl<S, N, F> FormatEvent<S, N> for SpanFieldsJson<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let extra = span_fields(ctx, event);
        if extra.is_empty() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // `,"target":` only occurs unescaped as the key the formatter writes
        // after the event's fields (inside strings the quotes are escaped).
        match line.rfind(",\"target\":") {
            Some(at) => {
                writer.write_str(&line[..at])?;
                writer.write_str(&extra)?;
                writer.write_str(&line[at..])
            }
            None => writer.write_str(&line),
        }
    }
}

/// `,"key":value` for each field of the event's spans (outermost first) that
/// neither the event nor an inner span has.
fn span_fields<S, N>(ctx: &FmtContext<'_, S, N>, event: &Event<'_>) -> String
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let Some(scope) = ctx.event_scope() else { return String::new() };
    // Innermost first: the first span to name a key keeps it.
    let mut spans: Vec<serde_json::Map<String, serde_json::Value>> = Vec::new();
    for span in scope {
        let extensions = span.extensions();
        let Some(fields) = extensions.get::<FormattedFields<N>>() else { continue };
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(fields.as_str()) {
            spans.push(map);
        }
    }
    let own = event.metadata().fields();
    let mut out = String::new();
    for (i, map) in spans.iter().enumerate().rev() {
        for (key, value) in map {
            if own.field(key.as_str()).is_some() || spans[..i].iter().any(|inner| inner.contains_key(key)) {
                continue;
            }
            out.push(',');
            out.push_str(&serde_json::Value::String(key.clone()).to_string());
            out.push(':');
            out.push_str(&value.to_string());
        }
    }
    out
}

/// Whether the log is JSON lines on stderr, written by [`init`]'s subscriber.
pub fn json_on_stderr() -> bool {
    JSON_ON_STDERR.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::field::Empty;

    use super::*;

    #[test]
    fn auto_is_text_on_a_terminal_and_json_elsewhere() {
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Text);
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
        assert_eq!(LogFormat::Json.resolve(true), LogFormat::Json);
        assert_eq!(LogFormat::Text.resolve(false), LogFormat::Text);
    }

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        pub(crate) fn lines(&self) -> Vec<serde_json::Value> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
        }

        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }

        pub(crate) fn subscriber(&self) -> impl Subscriber + Send + Sync + 'static {
            json_subscriber(EnvFilter::new("info"), self.clone())
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    /// Span fields reach the line once, at the top level; the event's own
    /// and an inner span's win; outside spans the line is the stock one.
    #[test]
    fn json_lines_carry_span_fields_once() {
        let out = Captured::default();
        tracing::subscriber::with_default(out.subscriber(), || {
            tracing::info!(event = "outside", n = 1, "no span");
            let conn = tracing::info_span!("conn", client = "10.0.0.1:5000", sni = Empty, workload = Empty);
            let _conn = conn.enter();
            conn.record("sni", "api.openai.com");
            let request = tracing::info_span!("request", request_id = "r1", sni = "inner.example");
            let _request = request.enter();
            tracing::warn!(event = "inside", client = "own", "in a request");
        });
        let lines = out.lines();
        assert_eq!(lines.len(), 2, "{}", out.text());
        let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&lines[0]), ["timestamp", "level", "message", "event", "n", "target"]);
        assert_eq!(lines[1]["client"], "own");
        assert_eq!(lines[1]["sni"], "inner.example");
        assert_eq!(lines[1]["request_id"], "r1");
        assert!(lines[1].get("workload").is_none(), "an empty field is not written");
        assert_eq!(keys(&lines[1]).last().map(String::as_str), Some("target"));
        let text = out.text();
        let second = text.lines().nth(1).unwrap();
        for key in ["\"client\":", "\"sni\":", "\"request_id\":"] {
            assert_eq!(second.matches(key).count(), 1, "{key} in {second}");
        }
    }
}
