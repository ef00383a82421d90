//! OpenTelemetry export (`[telemetry.otlp]`): one span per intercepted
//! exchange and, optionally, the audit events as log records, sent over
//! OTLP (HTTP/protobuf or gRPC) by the `opentelemetry-otlp` exporters.
//!
//! It owns the settings ([`OtlpConfig`], validated here), the export thread
//! and its queues, and a span under construction ([`ExchangeSpan`]: a drop
//! guard, so every sampled exchange is exported exactly once, however it
//! ends). It knows nothing of providers or guardrails: the pipeline names
//! the attributes. Like the rest of `telemetry`, it imports nothing from the
//! crate.
//!
//! Nothing here runs on the request path but a `try_send`: spans and log
//! records go through bounded queues to one thread of their own (a
//! current-thread runtime, so exporting never competes with the data
//! plane's workers), which batches them. A full queue drops the item and
//! counts it (`interceptor_otlp_dropped_total{signal}`); a failed export is
//! counted (`interceptor_otlp_export_failures_total{signal}`) and logged at
//! most every [`REPORT_EVERY`]. With export off ([`Otlp`] absent) an
//! exchange costs one `Option` check.
//!
//! Trace context: a client's W3C `traceparent` is continued (our span is
//! its child, and a parent that is not sampled is not exported); without
//! one, a new trace is started, sampled by `sample_ratio`. The proxy never
//! adds a `traceparent` to the upstream request (see the README).

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use opentelemetry::{
    InstrumentationScope, KeyValue,
    logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity},
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    logs::{LogBatch, LogExporter as _, SdkLogRecord, SdkLogger, SdkLoggerProvider},
    trace::{SpanData, SpanEvents, SpanLinks},
};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Most items exported in one request.
const BATCH: usize = 512;
/// How often the export thread drains its queues. It never waits on a queue:
/// a waiting receiver would be woken by every span the request path queues
/// (a thread wake-up per exchange); a tick costs one per 10 ms. Short, so
/// the items it drains were queued moments ago and are still in the CPU's
/// caches (at 15,000 exchanges a second a 100 ms tick finds megabytes of
/// cold spans). At the default queue of 4096 it drains 400,000 items a
/// second; past that the queue fills and drops (counted).
const TICK: Duration = Duration::from_millis(10);
/// Least time between two warnings about failing exports.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);
/// Most attributes and events a span keeps (a long WebSocket session's
/// decisions), past which they are counted as dropped.
const MAX_EVENTS: usize = 128;

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// HTTP/protobuf: `POST <endpoint>/v1/traces` and `/v1/logs` (port 4318).
    Http,
    /// gRPC (port 4317).
    Grpc,
}

/// `[telemetry.otlp]`. Export is off while `endpoint` is empty.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's base URL (`http://collector:4318` for HTTP,
    /// `http://collector:4317` for gRPC; `https://` for TLS, verified with
    /// the system's roots). Empty: no export.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// Headers (gRPC metadata) sent with every export, such as a
    /// collector's `authorization`. Never logged.
    #[serde(serialize_with = "redacted")]
    pub headers: BTreeMap<String, String>,
    /// One span per intercepted exchange.
    pub traces: bool,
    /// The audit events as OTLP log records, beside the JSON lines.
    pub logs: bool,
    /// The share of new traces exported (0 to 1); a client's `traceparent`
    /// decides for its own trace.
    pub sample_ratio: f64,
    /// Most spans (and, apart, log records) waiting for export; past it they
    /// are dropped and counted.
    pub queue: usize,
    /// Longest time one export may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            protocol: OtlpProtocol::Http,
            headers: BTreeMap::new(),
            traces: true,
            logs: false,
            sample_ratio: 1.0,
            queue: 4096,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Header values may be credentials.
impl fmt::Debug for OtlpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpConfig")
            .field("endpoint", &self.endpoint)
            .field("protocol", &self.protocol)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("traces", &self.traces)
            .field("logs", &self.logs)
            .field("sample_ratio", &self.sample_ratio)
            .field("queue", &self.queue)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn redacted<S: serde::Serializer>(headers: &BTreeMap<String, String>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(headers.keys().map(|k| (k, "<redacted>")))
}

impl OtlpConfig {
    /// Whether anything is exported.
    pub fn enabled(&self) -> bool {
        !self.endpoint.is_empty() && (self.traces || self.logs)
    }

    /// What is wrong with the settings, each error naming its field.
    pub fn errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let field = |name: &str| format!("telemetry.otlp.{name}");
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            errors.push(format!("{}: must be between 0 and 1", field("sample_ratio")));
        }
        if self.queue == 0 || self.queue > 1 << 20 {
            errors.push(format!("{}: must be between 1 and {}", field("queue"), 1 << 20));
        }
        if self.timeout.is_zero() {
            errors.push(format!("{}: must be greater than zero", field("timeout")));
        }
        for (name, value) in &self.headers {
            let lowercase = name.bytes().all(|b| !b.is_ascii_uppercase());
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() || !lowercase {
                errors.push(format!("{}: {name:?} is not a lowercase header name", field("headers")));
            }
            if http::HeaderValue::from_str(value).is_err() {
                errors.push(format!("{}: the value of {name:?} is not a valid header value", field("headers")));
            }
        }
        if self.endpoint.is_empty() {
            return errors;
        }
        match url::Url::parse(&self.endpoint) {
            Ok(url) if !matches!(url.scheme(), "http" | "https") => {
                errors.push(format!("{}: {:?} must be an http:// or https:// URL", field("endpoint"), self.endpoint));
            }
            Ok(url) if url.host_str().is_none_or(str::is_empty) => {
                errors.push(format!("{}: {:?} has no host", field("endpoint"), self.endpoint));
            }
            Ok(url) if !url.username().is_empty() || url.password().is_some() => {
                errors
                    .push(format!("{}: put credentials in telemetry.otlp.headers, not in the URL", field("endpoint")));
            }
            Ok(url) if url.query().is_some() => {
                errors.push(format!("{}: {:?} must not have a query", field("endpoint"), self.endpoint));
            }
            Ok(url) if self.protocol == OtlpProtocol::Grpc && url.path() != "/" => {
                errors.push(format!("{}: a gRPC endpoint has no path ({:?})", field("endpoint"), self.endpoint));
            }
            Ok(_) => {}
            Err(error) => errors.push(format!("{}: {:?} is not a URL: {error}", field("endpoint"), self.endpoint)),
        }
        if !self.traces && !self.logs {
            errors.push(format!("{}: traces and logs are both off, nothing would be exported", field("endpoint")));
        }
        errors
    }

    /// The URL of one signal's HTTP endpoint (`<endpoint>/v1/<signal>`).
    fn http_url(&self, signal: Signal) -> String {
        format!("{}/v1/{}", self.endpoint.trim_end_matches('/'), signal.as_str())
    }
}

/// What is exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    Traces,
    Logs,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Traces => "traces",
            Self::Logs => "logs",
        }
    }
}

/// The export's counters, registered by the caller (labelled by
/// [`Signal`]).
#[derive(Clone, Default)]
pub struct OtlpCounters {
    pub spans_dropped: Counter,
    pub logs_dropped: Counter,
    pub span_export_failures: Counter,
    pub log_export_failures: Counter,
}

/// Why export could not start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("invalid telemetry.otlp settings: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("cannot start the OTLP export thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot build the OTLP {signal} exporter: {message}")]
    Exporter { signal: &'static str, message: String },
}

/// A running export: the queues' senders. Shared by the pipeline, the
/// audit log and every [`ExchangeSpan`]; the thread ends (after sending
/// what is queued) when the last handle is gone.
pub struct Otlp {
    spans: Option<mpsc::Sender<SpanData>>,
    logs: Option<LogQueue>,
    counters: OtlpCounters,
    /// New traces are sampled when their id's low 64 bits fall under it.
    threshold: u64,
    scope: InstrumentationScope,
}

impl fmt::Debug for Otlp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Otlp")
            .field("traces", &self.spans.is_some())
            .field("logs", &self.logs.is_some())
            .finish_non_exhaustive()
    }
}

impl Otlp {
    /// Starts the export thread. `None` when export is off.
    pub fn start(cfg: &OtlpConfig, counters: OtlpCounters) -> Result<Option<Arc<Self>>, OtlpError> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let errors = cfg.errors();
        if !errors.is_empty() {
            return Err(OtlpError::Invalid(errors));
        }
        let resource = resource();
        let scope = InstrumentationScope::builder("interceptor").with_version(env!("CARGO_PKG_VERSION")).build();
        // Exporters are built on the export thread (tonic's channel needs its
        // runtime); a failure is reported back before `start` returns.
        let (built_tx, built_rx) = std::sync::mpsc::sync_channel(1);
        let (span_tx, span_rx) = mpsc::channel(cfg.queue);
        let (log_tx, log_rx) = mpsc::channel(cfg.queue);
        let thread_cfg = cfg.clone();
        let thread_counters = counters.clone();
        let thread_resource = resource.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = built_tx.send(Err(OtlpError::Thread(error)));
                        return;
                    }
                };
                runtime.block_on(export(thread_cfg, thread_resource, thread_counters, span_rx, log_rx, built_tx));
            })
            .map_err(OtlpError::Thread)?;
        match built_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(OtlpError::Thread(std::io::Error::other("the export thread ended"))),
        }
        let logs = cfg.logs.then(|| {
            // The provider only makes records: they go to the queue as they
            // are, not through its processors (which would copy each one).
            let provider = SdkLoggerProvider::builder().with_resource(resource).build();
            let logger = provider.logger_with_scope(scope.clone());
            LogQueue { tx: log_tx, logger, _provider: provider }
        });
        tracing::info!(
            endpoint = %cfg.endpoint,
            protocol = ?cfg.protocol,
            traces = cfg.traces,
            logs = cfg.logs,
            sample_ratio = cfg.sample_ratio,
            "OpenTelemetry export on"
        );
        Ok(Some(Arc::new(Self {
            spans: cfg.traces.then_some(span_tx),
            logs,
            counters,
            threshold: ratio_threshold(cfg.sample_ratio),
            scope,
        })))
    }

    /// Whether spans are exported.
    pub fn traces(&self) -> bool {
        self.spans.is_some()
    }

    /// Whether log records are exported.
    pub fn logs(&self) -> bool {
        self.logs.is_some()
    }

    /// Opens the span of an exchange that starts now, with its first
    /// `attributes`, as a child of the client's trace context when it sent
    /// one; `None` when it is not sampled (or traces are off).
    pub fn exchange_span(
        self: &Arc<Self>,
        name: &'static str,
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<ExchangeSpan> {
        let tx = self.spans.as_ref()?;
        let (trace_id, parent, state) = match traceparent.and_then(TraceParent::parse) {
            Some(parent) if !parent.sampled => return None,
            Some(parent) => {
                let state = tracestate.and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
                (parent.trace_id, Some(parent.span_id), state)
            }
            None => {
                let trace_id = TraceId::from_bytes(nonzero_random::<16>());
                if (u128::from_be_bytes(trace_id.to_bytes()) as u64) >= self.threshold && self.threshold != u64::MAX {
                    return None;
                }
                (trace_id, None, TraceState::default())
            }
        };
        let span_id = SpanId::from_bytes(nonzero_random::<8>());
        let context = SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, state);
        Some(ExchangeSpan {
            tx: tx.clone(),
            dropped: self.counters.spans_dropped.clone(),
            scope: self.scope.clone(),
            draft: Mutex::new(Draft {
                context,
                parent,
                start: SystemTime::now(),
                started: Instant::now(),
                forwarded: None,
                name: Cow::Borrowed(name),
                kind: SpanKind::Client,
                attributes: attributes(),
                events: Vec::new(),
                dropped_events: 0,
                status: Status::Unset,
            }),
        })
    }

    /// Sends one log record: `body` (the audit event's JSON) with
    /// `attributes`. Dropped and counted when the queue is full.
    pub fn log(&self, event_name: &'static str, body: &str, attributes: &[(&'static str, &str)]) {
        let Some(queue) = &self.logs else { return };
        let mut record = queue.logger.create_log_record();
        let now = SystemTime::now();
        record.set_timestamp(now);
        record.set_observed_timestamp(now);
        record.set_severity_number(Severity::Info);
        record.set_severity_text("INFO");
        record.set_event_name(event_name);
        record.set_target("audit");
        record.set_body(AnyValue::String(body.to_owned().into()));
        for (key, value) in attributes {
            record.add_attribute(*key, AnyValue::String((*value).to_owned().into()));
        }
        if queue.tx.try_send((record, self.scope.clone())).is_err() {
            self.counters.logs_dropped.inc();
        }
    }
}

/// The resource every span and record names: `service.name` (from
/// `OTEL_SERVICE_NAME`, else `interceptor`) and `OTEL_RESOURCE_ATTRIBUTES`.
fn resource() -> Resource {
    let builder = Resource::builder();
    let builder = if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder
    } else {
        builder.with_service_name("interceptor")
    };
    builder.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build()
}

/// The trace-id threshold of a sample ratio (the low 64 bits of a random
/// trace id are uniform).
fn ratio_threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else if ratio <= 0.0 {
        0
    } else {
        (ratio * u64::MAX as f64) as u64
    }
}

fn nonzero_random<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes.iter().any(|&b| b != 0) {
            return bytes;
        }
    }
}

/// A W3C `traceparent` header (Trace Context level 1), as a parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

impl TraceParent {
    /// `version-traceid-parentid-flags`, lowercase hex. Version `ff` and
    /// all-zero ids are invalid; a later version may add fields after the
    /// flags (they are ignored), version 00 may not.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let mut parts = header.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        let rest = parts.next();
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
            return None;
        }
        if version == "00" && rest.is_some() {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
        let span_id = SpanId::from_hex(parent).ok().filter(|s| *s != SpanId::INVALID)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self { trace_id, span_id, sampled: flags & 1 == 1 })
    }
}

/// The span of one exchange, filled in as the exchange goes and exported
/// when it is dropped (its end). Shared by the exchange's phases; never
/// holds a lock across an await.
pub struct ExchangeSpan {
    tx: mpsc::Sender<SpanData>,
    dropped: Counter,
    scope: InstrumentationScope,
    draft: Mutex<Draft>,
}

struct Draft {
    context: SpanContext,
    parent: Option<SpanId>,
    start: SystemTime,
    started: Instant,
    /// When the request went upstream.
    forwarded: Option<Instant>,
    name: Cow<'static, str>,
    kind: SpanKind,
    attributes: Vec<KeyValue>,
    events: Vec<opentelemetry::trace::Event>,
    dropped_events: u32,
    status: Status,
}

impl fmt::Debug for ExchangeSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangeSpan").field("trace_id", &self.trace_id()).finish_non_exhaustive()
    }
}

impl ExchangeSpan {
    fn with<R>(&self, f: impl FnOnce(&mut Draft) -> R) -> R {
        // A poisoned lock only means another phase panicked mid-update; the
        // draft is still a span.
        let mut draft = self.draft.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut draft)
    }

    /// The trace's id, in hex.
    pub fn trace_id(&self) -> String {
        self.with(|d| d.context.trace_id().to_string())
    }

    /// Time since the exchange started.
    pub fn elapsed(&self) -> Duration {
        self.with(|d| d.started.elapsed())
    }

    /// Notes that the request goes upstream now (the first call counts).
    pub fn forwarded(&self) {
        self.with(|d| {
            d.forwarded.get_or_insert_with(Instant::now);
        });
    }

    /// Time since the request went upstream, if it did.
    pub fn since_forwarded(&self) -> Option<Duration> {
        self.with(|d| d.forwarded.map(|t| t.elapsed()))
    }

    /// Sets an attribute, replacing an earlier value of the same key.
    pub fn set(&self, attribute: KeyValue) {
        self.with(|d| match d.attributes.iter_mut().find(|a| a.key == attribute.key) {
            Some(slot) => *slot = attribute,
            None => d.attributes.push(attribute),
        });
    }

    /// Replaces attribute `key` with what `update` makes of its value
    /// (`None`: leave it as it is).
    pub fn with_attribute(
        &self,
        key: &'static str,
        update: impl FnOnce(Option<&opentelemetry::Value>) -> Option<opentelemetry::Value>,
    ) {
        self.with(|d| {
            let slot = d.attributes.iter().position(|a| a.key.as_str() == key);
            if let Some(value) = update(slot.map(|i| &d.attributes[i].value)) {
                let attribute = KeyValue::new(key, value);
                match slot {
                    Some(i) => d.attributes[i] = attribute,
                    None => d.attributes.push(attribute),
                }
            }
        });
    }

    /// Sets an attribute unless it is set already.
    pub fn set_default(&self, attribute: KeyValue) {
        self.with(|d| {
            if !d.attributes.iter().any(|a| a.key == attribute.key) {
                d.attributes.push(attribute);
            }
        });
    }

    /// Whether an attribute is set.
    pub fn has(&self, key: &'static str) -> bool {
        self.with(|d| d.attributes.iter().any(|a| a.key.as_str() == key))
    }

    /// The span's name (GenAI: `{operation} {model}`).
    pub fn rename(&self, name: impl Into<Cow<'static, str>>) {
        let name = name.into();
        self.with(|d| d.name = name);
    }

    /// Adds an event at the current time.
    pub fn event(&self, name: &'static str, attributes: Vec<KeyValue>) {
        self.with(|d| {
            if d.events.len() >= MAX_EVENTS {
                d.dropped_events += 1;
                return;
            }
            d.events.push(opentelemetry::trace::Event::new(name, SystemTime::now(), attributes, 0));
        });
    }

    /// Marks the span failed (a block, an upstream error); the first
    /// description stays.
    pub fn error(&self, description: String) {
        self.with(|d| {
            if !matches!(d.status, Status::Error { .. }) {
                d.status = Status::error(description);
            }
        });
    }
}

impl Drop for ExchangeSpan {
    fn drop(&mut self) {
        let draft = self.draft.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut events = SpanEvents::default();
        events.events = std::mem::take(&mut draft.events);
        events.dropped_count = draft.dropped_events;
        let span = SpanData {
            span_context: draft.context.clone(),
            parent_span_id: draft.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: draft.parent.is_some(),
            span_kind: draft.kind.clone(),
            name: std::mem::take(&mut draft.name),
            start_time: draft.start,
            end_time: draft.start + draft.started.elapsed(),
            attributes: std::mem::take(&mut draft.attributes),
            dropped_attributes_count: 0,
            events,
            links: SpanLinks::default(),
            status: std::mem::replace(&mut draft.status, Status::Unset),
            instrumentation_scope: self.scope.clone(),
        };
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// Where audit log records go: the export thread's queue, and the logger
/// that makes them.
struct LogQueue {
    tx: mpsc::Sender<(SdkLogRecord, InstrumentationScope)>,
    logger: SdkLogger,
    _provider: SdkLoggerProvider,
}

/// The export thread: builds the exporters, then batches and sends until
/// every sender is gone.
async fn export(
    cfg: OtlpConfig,
    resource: Resource,
    counters: OtlpCounters,
    spans: mpsc::Receiver<SpanData>,
    logs: mpsc::Receiver<(SdkLogRecord, InstrumentationScope)>,
    built: std::sync::mpsc::SyncSender<Result<(), OtlpError>>,
) {
    let exporters = build_exporters(&cfg, &resource);
    let (span_exporter, log_exporter) = match exporters {
        Ok(exporters) => {
            let _ = built.send(Ok(()));
            exporters
        }
        Err(error) => {
            let _ = built.send(Err(error));
            return;
        }
    };
    // A signal that is off has no sender: its loop ends at once.
    let (span_exporter, log_exporter) = (&span_exporter, &log_exporter);
    let spans = send_batches(
        spans,
        FailureReporter::new(Signal::Traces, &cfg.endpoint, counters.span_export_failures),
        move |batch| async move {
            match span_exporter {
                Some(exporter) => opentelemetry_sdk::trace::SpanExporter::export(exporter, batch).await,
                None => Ok(()),
            }
        },
    );
    let logs = send_batches(
        logs,
        FailureReporter::new(Signal::Logs, &cfg.endpoint, counters.log_export_failures),
        move |batch: Vec<(SdkLogRecord, InstrumentationScope)>| async move {
            let refs: Vec<(&SdkLogRecord, &InstrumentationScope)> = batch.iter().map(|(r, s)| (r, s)).collect();
            match log_exporter {
                Some(exporter) => exporter.export(LogBatch::new(&refs)).await,
                None => Ok(()),
            }
        },
    );
    tokio::join!(spans, logs);
}

type Exporters = (Option<opentelemetry_otlp::SpanExporter>, Option<opentelemetry_otlp::LogExporter>);

fn build_exporters(cfg: &OtlpConfig, resource: &Resource) -> Result<Exporters, OtlpError> {
    let failed = |signal: Signal| {
        move |error: opentelemetry_otlp::ExporterBuildError| OtlpError::Exporter {
            signal: signal.as_str(),
            message: error.to_string(),
        }
    };
    let headers: std::collections::HashMap<String, String> =
        cfg.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let metadata = || {
        let mut map = http::HeaderMap::new();
        for (k, v) in &cfg.headers {
            if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(v)) {
                map.insert(k, v);
            }
        }
        tonic::metadata::MetadataMap::from_headers(map)
    };
    let mut spans = None;
    if cfg.traces {
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let mut exporter = match cfg.protocol {
            OtlpProtocol::Http => builder
                .with_http()
                .with_endpoint(cfg.http_url(Signal::Traces))
                .with_timeout(cfg.timeout)
                .with_headers(headers.clone())
                .build(),
            OtlpProtocol::Grpc => builder
                .with_tonic()
                .with_endpoint(cfg.endpoint.clone())
                .with_timeout(cfg.timeout)
                .with_metadata(metadata())
                .build(),
        }
        .map_err(failed(Signal::Traces))?;
        opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, resource);
        spans = Some(exporter);
    }
    let mut logs = None;
    if cfg.logs {
        let builder = opentelemetry_otlp::LogExporter::builder();
        let mut exporter = match cfg.protocol {
            OtlpProtocol::Http => builder
                .with_http()
                .with_endpoint(cfg.http_url(Signal::Logs))
                .with_timeout(cfg.timeout)
                .with_headers(headers)
                .build(),
            OtlpProtocol::Grpc => builder
                .with_tonic()
                .with_endpoint(cfg.endpoint.clone())
                .with_timeout(cfg.timeout)
                .with_metadata(metadata())
                .build(),
        }
        .map_err(failed(Signal::Logs))?;
        opentelemetry_sdk::logs::LogExporter::set_resource(&mut exporter, resource);
        logs = Some(exporter);
    }
    Ok((spans, logs))
}

/// Moves up to [`BATCH`] queued items into `batch`, without waiting; false
/// once every sender is gone and the queue is empty.
fn drain<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>) -> bool {
    while batch.len() < BATCH {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(mpsc::error::TryRecvError::Empty) => return true,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
    true
}

/// Sends what `rx` brings with `export`: every [`TICK`], the whole queue,
/// batch by batch; until every sender is gone.
async fn send_batches<T, Fut>(mut rx: mpsc::Receiver<T>, mut reporter: FailureReporter, export: impl Fn(Vec<T>) -> Fut)
where
    Fut: std::future::Future<Output = OTelSdkResult>,
{
    let mut open = true;
    while open {
        tokio::time::sleep(TICK).await;
        loop {
            let mut batch = Vec::with_capacity(BATCH);
            open = drain(&mut rx, &mut batch);
            let full = batch.len() == BATCH;
            if !batch.is_empty() {
                let count = batch.len() as u64;
                reporter.outcome(export(batch).await, count);
            }
            if !open || !full {
                break;
            }
        }
    }
}

/// Counts failed exports and warns about them, at most every
/// [`REPORT_EVERY`].
struct FailureReporter {
    signal: Signal,
    endpoint: String,
    failures: Counter,
    lost_since_report: u64,
    last_report: Option<Instant>,
}

impl FailureReporter {
    fn new(signal: Signal, endpoint: &str, failures: Counter) -> Self {
        Self { signal, endpoint: endpoint.to_owned(), failures, lost_since_report: 0, last_report: None }
    }

    fn outcome(&mut self, result: OTelSdkResult, count: u64) {
        let Err(error) = result else { return };
        self.failures.inc_by(count);
        self.lost_since_report += count;
        if self.last_report.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            return;
        }
        tracing::warn!(
            signal = self.signal.as_str(),
            endpoint = %self.endpoint,
            lost = self.lost_since_report,
            error = %error,
            "OTLP export failed"
        );
        self.lost_since_report = 0;
        self.last_report = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_known_answers() {
        let p = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id.to_string(), "00f067aa0ba902b7");
        assert!(p.sampled);
        let p = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!p.sampled);
        // A later version may carry more fields.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn settings_are_checked() {
        assert!(OtlpConfig::default().errors().is_empty());
        assert!(!OtlpConfig::default().enabled());
        let cfg = OtlpConfig {
            endpoint: "ftp://collector".into(),
            sample_ratio: 2.0,
            queue: 0,
            headers: [("Authorization".to_string(), "x".to_string())].into(),
            ..OtlpConfig::default()
        };
        let errors = cfg.errors();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors.iter().all(|e| e.starts_with("telemetry.otlp.")), "{errors:?}");
        let grpc = OtlpConfig {
            endpoint: "http://collector:4317/v1/traces".into(),
            protocol: OtlpProtocol::Grpc,
            ..OtlpConfig::default()
        };
        assert_eq!(grpc.errors().len(), 1);
        let secret = OtlpConfig {
            endpoint: "https://user:pw@collector:4318".into(),
            headers: [("authorization".to_string(), "Bearer s3cret".to_string())].into(),
            ..OtlpConfig::default()
        };
        assert_eq!(secret.errors().len(), 1);
        // Neither the log of the effective config nor Debug shows a header value.
        assert!(!format!("{secret:?}").contains("s3cret"));
        assert!(!serde_json::to_string(&secret).unwrap().contains("s3cret"));
        let http = OtlpConfig { endpoint: "http://127.0.0.1:4318/".into(), ..OtlpConfig::default() };
        assert_eq!(http.http_url(Signal::Traces), "http://127.0.0.1:4318/v1/traces");
    }

    #[test]
    fn sampling_thresholds() {
        assert_eq!(ratio_threshold(1.0), u64::MAX);
        assert_eq!(ratio_threshold(0.0), 0);
        let half = ratio_threshold(0.5);
        assert!(half > u64::MAX / 2 - 10 && half < u64::MAX / 2 + 10);
    }
}
