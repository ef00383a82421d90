//! OpenTelemetry export (`[telemetry.otlp]`): one span per intercepted
//! exchange and, optionally, the audit events as log records, sent over
//! OTLP (HTTP/protobuf or gRPC).
//!
//! It owns the settings ([`OtlpConfig`], validated here), the export thread
//! and its queues, and a span under construction ([`ExchangeSpan`]: a drop
//! guard, so every sampled exchange is exported exactly once, however it
//! ends). It knows nothing of providers or guardrails: the pipeline names
//! the attributes. Like the rest of `telemetry`, it imports nothing from the
//! crate.
//!
//! On the request path a span's attributes and events are encoded into
//! OTLP's protobuf form ([`wire`]) as they are set, from values borrowed
//! from the exchange (nothing is copied to be kept); when the span ends it
//! is framed and appended to a bounded queue under a short lock; an audit
//! log record likewise. One thread of its own (a
//! current-thread runtime, so exporting never competes with the data
//! plane's workers) takes the queues every [`TICK`] and sends them in
//! batches ([`send`]). A full queue drops the item and counts it
//! (`interceptor_otlp_dropped_total{signal}`); a failed export is counted
//! (`interceptor_otlp_export_failures_total{signal}`) and logged at most
//! every [`REPORT_EVERY`]. With export off ([`Otlp`] absent) an exchange
//! costs one `Option` check.
//!
//! Trace context: a client's W3C `traceparent` is continued (our span is
//! its child, and a parent that is not sampled is not exported); without
//! one, a new trace is started, sampled by `sample_ratio`. The proxy never
//! adds a `traceparent` to the upstream request (see the README).

mod send;
mod wire;

pub use wire::{Attr, Fields, StrList};

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use opentelemetry::{
    KeyValue,
    trace::{SpanId, Status, TraceId, TraceState},
};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

/// Most items exported in one request.
const BATCH: usize = 512;
/// How often the export thread looks at its queues. It never waits on a
/// queue: a waiting receiver would be woken by every span the request path
/// queues (a thread wake-up per exchange); a tick costs one per 10 ms. Each
/// tick sends the full batches, so at the default queue of 4096 it keeps up
/// with 400,000 items a second; past that the queue fills and drops
/// (counted).
const TICK: Duration = Duration::from_millis(10);
/// Longest an item waits in a batch that is not full: under light traffic a
/// span reaches the collector within this, under heavy traffic requests go
/// out full (one per [`BATCH`] items, not one per tick).
const LINGER: Duration = Duration::from_millis(200);
/// Least time between two warnings about failing exports.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);
/// Most events a span keeps (a long WebSocket session's decisions), past
/// which they are counted as dropped.
const MAX_EVENTS: usize = 128;
/// What a span's encoded attributes and events start with room for: an
/// exchange's, with two decisions, take about 1 KiB in some 25 entries.
const SPAN_BYTES: usize = 1536;
const SPAN_PARTS: usize = 32;

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
    #[error("cannot build the OTLP exporter: {message}")]
    Exporter { message: String },
}

/// A running export: its queues. Shared by the pipeline, the audit log and
/// every [`ExchangeSpan`]; when the last handle is gone the thread sends
/// what is queued and ends.
pub struct Otlp {
    queues: Arc<Queues>,
    traces: bool,
    logs: bool,
    /// New traces are sampled when their id's low 64 bits fall under it.
    threshold: u64,
}

impl fmt::Debug for Otlp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Otlp").field("traces", &self.traces).field("logs", &self.logs).finish_non_exhaustive()
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
        let queues = Arc::new(Queues {
            spans: Queue::new(cfg.queue, counters.spans_dropped),
            logs: Queue::new(cfg.queue, counters.logs_dropped),
            closed: AtomicBool::new(false),
        });
        // The sender is built on the export thread (tonic's channel needs its
        // runtime); a failure is reported back before `start` returns.
        let (built_tx, built_rx) = std::sync::mpsc::sync_channel(1);
        let thread_cfg = cfg.clone();
        let thread_queues = Arc::clone(&queues);
        let failures = (counters.span_export_failures, counters.log_export_failures);
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
                runtime.block_on(export(thread_cfg, thread_queues, failures, built_tx));
            })
            .map_err(OtlpError::Thread)?;
        match built_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(OtlpError::Thread(std::io::Error::other("the export thread ended"))),
        }
        tracing::info!(
            endpoint = %cfg.endpoint,
            protocol = ?cfg.protocol,
            traces = cfg.traces,
            logs = cfg.logs,
            sample_ratio = cfg.sample_ratio,
            "OpenTelemetry export on"
        );
        Ok(Some(Arc::new(Self {
            queues,
            traces: cfg.traces,
            logs: cfg.logs,
            threshold: ratio_threshold(cfg.sample_ratio),
        })))
    }

    /// Whether spans are exported.
    pub fn traces(&self) -> bool {
        self.traces
    }

    /// Whether log records are exported.
    pub fn logs(&self) -> bool {
        self.logs
    }

    /// Opens the span of an exchange that starts now, its first attributes
    /// set by `attributes`, as a child of the client's trace context when it
    /// sent one; `None` when it is not sampled (or traces are off).
    pub fn exchange_span(
        self: &Arc<Self>,
        name: &'static str,
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        attributes: impl FnOnce(&mut Fields),
    ) -> Option<ExchangeSpan> {
        if !self.traces {
            return None;
        }
        let (trace_id, parent, trace_state) = match traceparent.and_then(TraceParent::parse) {
            Some(parent) if !parent.sampled => return None,
            Some(parent) => {
                // Passed on as the client sent it, once it parses.
                let state = tracestate.filter(|s| s.parse::<TraceState>().is_ok()).unwrap_or_default();
                (parent.trace_id, Some(parent.span_id), state.to_owned())
            }
            None => {
                let trace_id = TraceId::from_bytes(nonzero_random::<16>());
                if (u128::from_be_bytes(trace_id.to_bytes()) as u64) >= self.threshold && self.threshold != u64::MAX {
                    return None;
                }
                (trace_id, None, String::new())
            }
        };
        let mut fields = Fields::with_capacity(SPAN_BYTES, SPAN_PARTS);
        attributes(&mut fields);
        Some(ExchangeSpan {
            otlp: Arc::clone(self),
            draft: Mutex::new(Draft {
                trace_id,
                span_id: SpanId::from_bytes(nonzero_random::<8>()),
                parent,
                trace_state,
                start: SystemTime::now(),
                started: Instant::now(),
                forwarded: None,
                name: Cow::Borrowed(name),
                fields,
                values: Vec::new(),
                dropped_events: 0,
                status: Status::Unset,
            }),
        })
    }

    /// Sends one log record: `body` (the audit event's JSON) with
    /// `attributes`. Dropped and counted when the queue is full.
    pub fn log(&self, event_name: &'static str, body: &str, attributes: &[(&'static str, &str)]) {
        if !self.logs {
            return;
        }
        let now = SystemTime::now();
        queue_encoded(&self.queues.logs, |buf| wire::log_record(buf, now, event_name, body, attributes));
    }
}

/// The last handle is gone: the thread sends what is queued and ends.
impl Drop for Otlp {
    fn drop(&mut self) {
        self.queues.closed.store(true, Ordering::Release);
    }
}

/// What waits for the export thread.
struct Queues {
    spans: Queue,
    logs: Queue,
    /// Set once nothing more can be queued.
    closed: AtomicBool,
}

/// Encoded items waiting for export, in batches of at most [`BATCH`].
struct Queue {
    pending: Mutex<Pending>,
    /// Most items waiting; past it they are dropped.
    limit: usize,
    dropped: Counter,
}

#[derive(Default)]
struct Pending {
    batches: Vec<Batch>,
    items: usize,
    /// When the oldest item still queued was queued, or earlier.
    since: Option<Instant>,
    /// Emptied batch buffers, kept at their size for the next batches: a
    /// batch filled into fresh memory would grow (copying) and fault in
    /// its pages on the request path, batch after batch.
    spare: Vec<Vec<u8>>,
}

/// Encoded items, one after the other, ready to be put in an export
/// request.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    items: usize,
}

/// Most emptied batch buffers kept.
const SPARE: usize = 4;

impl Queue {
    fn new(limit: usize, dropped: Counter) -> Self {
        Self { pending: Mutex::new(Pending::default()), limit, dropped }
    }

    /// Appends one encoded item, or drops it (counted) when the queue is
    /// full.
    fn push(&self, item: &[u8]) {
        // Nothing panics while holding the lock; a poisoned one is still a
        // queue of whole items.
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.items >= self.limit {
            drop(pending);
            self.dropped.inc();
            return;
        }
        pending.items += 1;
        pending.since.get_or_insert_with(Instant::now);
        if pending.batches.last().is_none_or(|b| b.items >= BATCH) {
            let bytes = pending.spare.pop().unwrap_or_default();
            pending.batches.push(Batch { bytes, items: 0 });
        }
        let batch = pending.batches.last_mut().expect("a batch with room");
        batch.bytes.extend_from_slice(item);
        batch.items += 1;
    }

    /// The batches ready to go: the full ones, and with them the last
    /// (partial) one once its oldest item waited [`LINGER`], or at once
    /// when `all`.
    fn take(&self, all: bool) -> Vec<Batch> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if all || pending.since.is_some_and(|t| t.elapsed() >= LINGER) {
            pending.items = 0;
            pending.since = None;
            return std::mem::take(&mut pending.batches);
        }
        let full = pending.batches.iter().take_while(|b| b.items == BATCH).count();
        let ready: Vec<Batch> = pending.batches.drain(..full).collect();
        pending.items -= ready.iter().map(|b| b.items).sum::<usize>();
        ready
    }

    /// Gives a sent batch's buffer back, emptied, for a next batch.
    fn recycle(&self, mut bytes: Vec<u8>) {
        bytes.clear();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.spare.len() < SPARE {
            pending.spare.push(bytes);
        }
    }
}

thread_local! {
    /// Where this thread encodes a span or record before queuing it.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Encodes one item with `encode` into this thread's scratch buffer, then
/// queues it: no allocation per item.
fn queue_encoded(queue: &Queue, encode: impl FnOnce(&mut Vec<u8>)) {
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        encode(buf);
        queue.push(buf);
        // One huge item (a prompt recorded whole) does not stay resident.
        if buf.capacity() > 1 << 20 {
            *buf = Vec::new();
        }
    });
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
    otlp: Arc<Otlp>,
    draft: Mutex<Draft>,
}

/// A span under construction, changed through [`ExchangeSpan::update`].
pub struct Draft {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    /// The client's `tracestate`, passed on.
    trace_state: String,
    start: SystemTime,
    started: Instant,
    /// When the request went upstream.
    forwarded: Option<Instant>,
    name: Cow<'static, str>,
    /// Attributes and events, encoded as they are set.
    fields: Fields,
    /// Attributes updated from their own value ([`ExchangeSpan::with_attribute`]),
    /// encoded when the span ends.
    values: Vec<KeyValue>,
    dropped_events: u32,
    status: Status,
}

impl fmt::Debug for ExchangeSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangeSpan").field("trace_id", &self.trace_id()).finish_non_exhaustive()
    }
}

impl ExchangeSpan {
    /// Changes the span: one lock for all that `f` does. Never held across
    /// an await (`f` is not async).
    pub fn update<R>(&self, f: impl FnOnce(&mut Draft) -> R) -> R {
        // A poisoned lock only means another phase panicked mid-update; the
        // draft is still a span.
        let mut draft = self.draft.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut draft)
    }

    /// The trace's id, in hex.
    pub fn trace_id(&self) -> String {
        self.update(|d| d.trace_id.to_string())
    }
}

impl Draft {
    /// Time since the exchange started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Notes that the request goes upstream now (the first call counts).
    pub fn forwarded(&mut self) {
        self.forwarded.get_or_insert_with(Instant::now);
    }

    /// Time since the request went upstream, if it did.
    pub fn since_forwarded(&self) -> Option<Duration> {
        self.forwarded.map(|t| t.elapsed())
    }

    /// Sets an attribute, replacing an earlier value of the same key.
    pub fn set(&mut self, key: &'static str, value: Attr<'_>) {
        debug_assert!(!self.values.iter().any(|a| a.key.as_str() == key), "{key} is updated in place");
        self.fields.set(key, value);
    }

    /// Replaces attribute `key` with what `update` makes of its value
    /// (`None`: leave it as it is). Such an attribute is kept as a value
    /// until the span ends; a key is either updated here or [`set`](Self::set),
    /// never both.
    pub fn with_attribute(
        &mut self,
        key: &'static str,
        update: impl FnOnce(Option<&opentelemetry::Value>) -> Option<opentelemetry::Value>,
    ) {
        let slot = self.values.iter().position(|a| a.key.as_str() == key);
        if let Some(value) = update(slot.map(|i| &self.values[i].value)) {
            let attribute = KeyValue::new(key, value);
            match slot {
                Some(i) => self.values[i] = attribute,
                None => self.values.push(attribute),
            }
        }
    }

    /// Sets an attribute unless it is set already.
    pub fn set_default(&mut self, key: &'static str, value: Attr<'_>) {
        self.fields.set_default(key, value);
    }

    /// Whether an attribute is set.
    pub fn has(&self, key: &'static str) -> bool {
        self.fields.has(key) || self.values.iter().any(|a| a.key.as_str() == key)
    }

    /// The span's name (GenAI: `{operation} {model}`).
    pub fn rename(&mut self, name: impl Into<Cow<'static, str>>) {
        self.name = name.into();
    }

    /// Adds an event at the current time.
    pub fn event<'k, 'v>(&mut self, name: &'static str, attributes: impl IntoIterator<Item = (&'k str, Attr<'v>)>) {
        if self.fields.events() >= MAX_EVENTS {
            self.dropped_events += 1;
            return;
        }
        self.fields.event(SystemTime::now(), name, attributes);
    }

    /// Marks the span failed (a block, an upstream error); the first
    /// description stays.
    pub fn error(&mut self, description: String) {
        if !matches!(self.status, Status::Error { .. }) {
            self.status = Status::error(description);
        }
    }
}

/// The span ends: encoded and queued, on the worker that ends it.
impl Drop for ExchangeSpan {
    fn drop(&mut self) {
        let d = self.draft.get_mut().unwrap_or_else(|e| e.into_inner());
        let end = d.start + d.started.elapsed();
        queue_encoded(&self.otlp.queues.spans, |buf| {
            wire::span(
                buf,
                &wire::SpanFields {
                    trace_id: d.trace_id.to_bytes(),
                    span_id: d.span_id.to_bytes(),
                    parent: d.parent.map(SpanId::to_bytes),
                    trace_state: &d.trace_state,
                    trace_flags: 1,
                    name: &d.name,
                    kind: wire::SPAN_KIND_CLIENT,
                    start: d.start,
                    end,
                    fields: &d.fields,
                    attributes: &d.values,
                    dropped_events: d.dropped_events,
                    status: &d.status,
                },
            )
        });
    }
}

/// The export thread: builds the sender, then every [`TICK`] sends what
/// is queued, until the last [`Otlp`] handle is gone and the queues are
/// empty.
async fn export(
    cfg: OtlpConfig,
    queues: Arc<Queues>,
    (span_failures, log_failures): (Counter, Counter),
    built: std::sync::mpsc::SyncSender<Result<(), OtlpError>>,
) {
    let sender = match send::Sender::new(&cfg) {
        Ok(sender) => {
            let _ = built.send(Ok(()));
            sender
        }
        Err(error) => {
            let _ = built.send(Err(error));
            return;
        }
    };
    let resource = wire::resource(&resource());
    let version = env!("CARGO_PKG_VERSION");
    // Audit records are named after their origin, as a log's target names
    // its scope.
    let signals = [
        (Signal::Traces, &queues.spans, wire::scope("interceptor", version), span_failures),
        (Signal::Logs, &queues.logs, wire::scope("audit", version), log_failures),
    ];
    let mut signals = signals.map(|(signal, queue, scope, failures)| {
        (signal, queue, scope, FailureReporter::new(signal, &cfg.endpoint, failures))
    });
    let mut request = Vec::new();
    loop {
        tokio::time::sleep(TICK).await;
        // Read before taking: whatever was queued before the last handle
        // went is taken below.
        let closed = queues.closed.load(Ordering::Acquire);
        for (signal, queue, scope, reporter) in &mut signals {
            for batch in queue.take(closed) {
                wire::request_into(&mut request, &resource, scope, &batch.bytes);
                queue.recycle(batch.bytes);
                let body = Bytes::from(std::mem::take(&mut request));
                reporter.outcome(sender.send(*signal, body.clone(), cfg.timeout).await, batch.items as u64);
                // The sender has let go of its copies: the buffer is ours
                // again, kept at its size (a new one per request would be
                // faulted in and zeroed, 512 items at a time).
                request = body.try_into_mut().map(Vec::from).unwrap_or_default();
            }
        }
        if closed {
            return;
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

    fn outcome(&mut self, result: Result<(), send::Failure>, count: u64) {
        let Err(failure) = result else { return };
        self.failures.inc_by(count);
        self.lost_since_report += count;
        if self.last_report.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            return;
        }
        tracing::warn!(
            signal = self.signal.as_str(),
            endpoint = %self.endpoint,
            lost = self.lost_since_report,
            error = %failure.message,
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

    /// A full queue drops (counted) rather than grows; what it keeps comes
    /// out in batches of at most [`BATCH`], whole items each.
    #[test]
    fn queues_are_bounded_and_batched() {
        let dropped = Counter::default();
        let queue = Queue::new(2, dropped.clone());
        for item in [&b"ab"[..], b"cd", b"ef"] {
            queue.push(item);
        }
        assert_eq!(dropped.get(), 1);
        let batches = queue.take(true);
        assert_eq!(batches.len(), 1);
        assert_eq!((batches[0].bytes.as_slice(), batches[0].items), (&b"abcd"[..], 2));
        assert!(queue.take(true).is_empty(), "taking empties the queue");
        queue.push(b"gh");
        assert_eq!(queue.take(true)[0].bytes, b"gh", "room again once taken");

        let queue = Queue::new(10_000, Counter::default());
        for _ in 0..BATCH * 2 + 1 {
            queue.push(b"x");
        }
        let sizes = |batches: Vec<Batch>| batches.iter().map(|b| b.items).collect::<Vec<_>>();
        // Full batches go at once; the partial one waits for more.
        assert_eq!(sizes(queue.take(false)), [BATCH, BATCH]);
        assert!(queue.take(false).is_empty());
        queue.push(b"x");
        let last = queue.take(true);
        assert_eq!(sizes(last), [2]);

        // A sent batch's buffer is filled again, not a new one grown.
        let queue = Queue::new(10, Counter::default());
        queue.push(&[7; 4000]);
        let sent = queue.take(true).remove(0).bytes;
        let (at, capacity) = (sent.as_ptr(), sent.capacity());
        queue.recycle(sent);
        queue.push(b"next");
        let again = queue.take(true).remove(0).bytes;
        assert_eq!((again.as_ptr(), again.capacity(), again.as_slice()), (at, capacity, &b"next"[..]));
    }

    /// What a loopback collector received: path, headers, body.
    type Received = Arc<Mutex<Vec<(String, http::HeaderMap, Vec<u8>)>>>;

    /// An OTLP/HTTP collector on loopback that answers each export with the
    /// next of `answers`, then 200.
    async fn collector(answers: Vec<u16>) -> (std::net::SocketAddr, Received) {
        use http_body_util::BodyExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Received::default();
        let answers = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
        let seen = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (seen, answers) = (Arc::clone(&seen), Arc::clone(&answers));
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (seen, answers) = (Arc::clone(&seen), Arc::clone(&answers));
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes().to_vec();
                        seen.lock().unwrap().push((parts.uri.path().to_owned(), parts.headers, body));
                        let status = answers.lock().unwrap().pop_front().unwrap_or(200);
                        http::Response::builder()
                            .status(status)
                            .body(http_body_util::Full::new(bytes::Bytes::new()))
                            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, service));
            }
        });
        (addr, received)
    }

    /// Waits until `done` holds of what the collector received (10 s at most).
    async fn until(received: &Received, done: impl Fn(&[(String, http::HeaderMap, Vec<u8>)]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&received.lock().unwrap()) {
            assert!(Instant::now() < deadline, "the collector got {} exports", received.lock().unwrap().len());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn http_export(addr: std::net::SocketAddr) -> OtlpConfig {
        OtlpConfig {
            endpoint: format!("http://{addr}"),
            headers: [("authorization".to_string(), "Bearer collector-token".to_string())].into(),
            logs: true,
            ..OtlpConfig::default()
        }
    }

    /// A span and a log record reach the collector as OTLP/protobuf with its
    /// headers, including those still queued when the last handle goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn what_is_queued_is_sent_when_export_ends() {
        use opentelemetry_proto::tonic::collector::{
            logs::v1::ExportLogsServiceRequest, trace::v1::ExportTraceServiceRequest,
        };
        use prost::Message as _;
        let (addr, received) = collector(Vec::new()).await;
        let otlp = Otlp::start(&http_export(addr), OtlpCounters::default()).unwrap().unwrap();
        let span =
            otlp.exchange_span("chat", None, None, |a| a.set("gen_ai.request.model", Attr::Str("gpt-4o"))).unwrap();
        span.update(|d| d.error("blocked by guardrail secrets".into()));
        otlp.log("interceptor.audit", r#"{"event":"guardrail"}"#, &[("decision", "block")]);
        drop(span);
        drop(otlp);
        until(&received, |r| r.len() == 2).await;
        let received = received.lock().unwrap();
        for (path, headers, _) in received.iter() {
            assert!(path == "/v1/traces" || path == "/v1/logs", "{path}");
            assert_eq!(headers["content-type"], "application/x-protobuf");
            assert_eq!(headers["authorization"], "Bearer collector-token");
        }
        let body = |want: &str| &received.iter().find(|(path, ..)| path == want).unwrap().2;
        let traces = ExportTraceServiceRequest::decode(body("/v1/traces").as_slice()).unwrap();
        let span = &traces.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.attributes[0].key, "gen_ai.request.model");
        assert_eq!(span.status.as_ref().unwrap().message, "blocked by guardrail secrets");
        let logs = ExportLogsServiceRequest::decode(body("/v1/logs").as_slice()).unwrap();
        assert_eq!(logs.resource_logs[0].scope_logs[0].log_records[0].event_name, "interceptor.audit");
    }

    /// A collector that says "try later" is tried again; one that refuses
    /// is not, and the lost spans are counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn transient_failures_are_retried_and_refusals_counted() {
        let (addr, received) = collector(vec![503, 500]).await;
        let counters = OtlpCounters::default();
        let otlp = Otlp::start(&http_export(addr), counters.clone()).unwrap().unwrap();
        drop(otlp.exchange_span("chat", None, None, |_| {}).unwrap());
        until(&received, |r| r.len() == 2).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while counters.span_export_failures.get() == 0 {
            assert!(Instant::now() < deadline, "the refusal was not counted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(counters.span_export_failures.get(), 1, "one span lost");
        // The next export goes through: nothing more is lost.
        drop(otlp.exchange_span("chat", None, None, |_| {}).unwrap());
        until(&received, |r| r.len() == 3).await;
        drop(otlp);
        assert_eq!(counters.span_export_failures.get(), 1);
        assert_eq!(counters.spans_dropped.get(), 0);
    }
}
