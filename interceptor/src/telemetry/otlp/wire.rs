//! OTLP's protobuf encoding, written straight from our own records: a span
//! from its draft, an audit log record, the resource and scope, and the
//! export requests that carry them (`ExportTraceServiceRequest`,
//! `ExportLogsServiceRequest`). The primitives are prost's; the field
//! numbers are those of the OTLP definitions (`opentelemetry/proto/*/v1`),
//! and the tests decode what is written here with `opentelemetry-proto`'s
//! own message types.
//!
//! Why not the SDK's exporter: it copies every span into the SDK's
//! `SpanData`, then into the generated message types (a new `String` for
//! every attribute key and value), groups them by resource and scope, and
//! only then encodes them: about half of what a span cost the proxy (a
//! tenth of an allowed exchange's CPU). Here a span is encoded once, on the
//! worker that ends it, into bytes that the export thread only frames and
//! sends.

use std::{fmt, time::SystemTime};

use opentelemetry::{Array, KeyValue, Value, trace::Status};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

/// `Span.flags`: the parent's is-remote bit is known (OTLP's
/// `SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`), and set (`…_IS_REMOTE_MASK`).
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;
/// `SPAN_KIND_CLIENT`: the proxy calls the provider for the client.
pub const SPAN_KIND_CLIENT: u64 = 3;
/// `SEVERITY_NUMBER_INFO`.
const SEVERITY_INFO: u64 = 9;

/// One span, as the draft has it at its end.
pub struct SpanFields<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub trace_state: &'a str,
    pub trace_flags: u8,
    pub name: &'a str,
    pub kind: u64,
    pub start: SystemTime,
    pub end: SystemTime,
    /// The attributes and events encoded as they came.
    pub fields: &'a Fields,
    /// Attributes kept as values until the end (those updated in place).
    pub attributes: &'a [KeyValue],
    pub dropped_events: u32,
    pub status: &'a Status,
}

/// Appends `span` to `out` as one entry of `ScopeSpans.spans`.
pub fn span(out: &mut Vec<u8>, span: &SpanFields<'_>) {
    message(out, 2, |b| {
        bytes(b, 1, &span.trace_id);
        bytes(b, 2, &span.span_id);
        string(b, 3, span.trace_state);
        if let Some(parent) = &span.parent {
            bytes(b, 4, parent);
        }
        string(b, 5, span.name);
        varint(b, 6, span.kind);
        fixed64(b, 7, nanos(span.start));
        fixed64(b, 8, nanos(span.end));
        // Repeated fields may come in any order and interleaved (fields 9
        // and 11 here); a decoder appends each entry to its field.
        span.fields.write(b);
        attributes(b, 9, span.attributes);
        varint(b, 12, u64::from(span.dropped_events));
        let (code, description) = match span.status {
            Status::Unset => (0, ""),
            Status::Ok => (1, ""),
            Status::Error { description } => (2, description.as_ref()),
        };
        message(b, 15, |b| {
            string(b, 2, description);
            varint(b, 3, code);
        });
        let remote = if span.parent.is_some() { IS_REMOTE } else { 0 };
        fixed32(b, 16, u32::from(span.trace_flags) | HAS_IS_REMOTE | remote);
    });
}

/// The value of an attribute, borrowed from whoever sets it: it is encoded
/// at once, so nothing is copied or kept but its bytes.
#[derive(Clone, Copy)]
pub enum Attr<'a> {
    Str(&'a str),
    /// A string written by its `Display` (an address, a number as text).
    Display(&'a dyn fmt::Display),
    I64(i64),
    F64(f64),
    Bool(bool),
    /// An array of strings.
    List(&'a dyn StrList),
}

/// Strings an array attribute is made of.
pub trait StrList {
    fn each(&self, f: &mut dyn FnMut(&str));
}

impl<T: AsRef<str>> StrList for Vec<T> {
    fn each(&self, f: &mut dyn FnMut(&str)) {
        self.iter().for_each(|s| f(s.as_ref()));
    }
}

impl<T: AsRef<str>, const N: usize> StrList for [T; N] {
    fn each(&self, f: &mut dyn FnMut(&str)) {
        self.iter().for_each(|s| f(s.as_ref()));
    }
}

/// A span's attributes and events, each encoded as a `Span` field entry
/// (9 or 11) when it is set, in one buffer. Setting an attribute again
/// leaves the earlier entry in the buffer, marked replaced: it is skipped
/// when the span is written, and dropped from the buffer once replaced
/// entries take more room than [`COMPACT_AT`] and than the live ones (a
/// long WebSocket session setting its latest prompt again and again).
#[derive(Default)]
pub struct Fields {
    bytes: Vec<u8>,
    parts: Vec<Part>,
    events: usize,
    /// Bytes of replaced entries still in `bytes`.
    replaced: usize,
}

/// Replaced bytes past which [`Fields`] may drop them.
const COMPACT_AT: usize = 16 << 10;

/// One entry of [`Fields`]: `bytes[start..end]`.
struct Part {
    /// The attribute's key; `None` for an event.
    key: Option<&'static str>,
    start: u32,
    end: u32,
    replaced: bool,
}

impl Fields {
    /// Room for a typical exchange's span: one allocation each.
    pub fn with_capacity(bytes: usize, parts: usize) -> Self {
        Self { bytes: Vec::with_capacity(bytes), parts: Vec::with_capacity(parts), events: 0, replaced: 0 }
    }

    fn find(&self, key: &str) -> Option<usize> {
        self.parts.iter().position(|p| !p.replaced && p.key == Some(key))
    }

    /// Whether attribute `key` is set.
    pub fn has(&self, key: &str) -> bool {
        self.find(key).is_some()
    }

    /// Sets attribute `key`, replacing an earlier value (set again to the
    /// same value, it stays as it was).
    pub fn set(&mut self, key: &'static str, value: Attr<'_>) {
        let earlier = self.find(key);
        let start = self.bytes.len();
        message(&mut self.bytes, 9, |b| key_attr(b, key, value));
        let Some(i) = earlier else {
            self.push(Some(key), start);
            return;
        };
        let part = &self.parts[i];
        if self.bytes.get(part.start as usize..part.end as usize) == Some(&self.bytes[start..]) {
            self.bytes.truncate(start);
            return;
        }
        self.push(Some(key), start);
        let part = &mut self.parts[i];
        part.replaced = true;
        self.replaced += (part.end - part.start) as usize;
        if self.replaced > COMPACT_AT && self.replaced > self.bytes.len() / 2 {
            self.compact();
        }
    }

    /// Sets attribute `key` unless it is set.
    pub fn set_default(&mut self, key: &'static str, value: Attr<'_>) {
        if !self.has(key) {
            self.set(key, value);
        }
    }

    /// Adds an event at `at`.
    pub fn event<'k, 'v>(
        &mut self,
        at: SystemTime,
        name: &str,
        attributes: impl IntoIterator<Item = (&'k str, Attr<'v>)>,
    ) {
        let start = self.bytes.len();
        message(&mut self.bytes, 11, |b| {
            fixed64(b, 1, nanos(at));
            string(b, 2, name);
            for (key, value) in attributes {
                message(b, 3, |b| key_attr(b, key, value));
            }
        });
        self.push(None, start);
        self.events += 1;
    }

    /// How many events were added.
    pub fn events(&self) -> usize {
        self.events
    }

    fn push(&mut self, key: Option<&'static str>, start: usize) {
        // A span past 4 GiB is not a thing the proxy builds (content is
        // capped well below); saturate rather than wrap.
        let offset = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        self.parts.push(Part { key, start: offset(start), end: offset(self.bytes.len()), replaced: false });
    }

    /// Drops the replaced entries from the buffer.
    fn compact(&mut self) {
        let mut bytes = Vec::with_capacity(self.bytes.len() - self.replaced);
        self.write(&mut bytes);
        let mut at = 0;
        self.parts.retain(|p| !p.replaced);
        for part in &mut self.parts {
            let len = part.end - part.start;
            (part.start, part.end) = (at, at + len);
            at += len;
        }
        self.bytes = bytes;
        self.replaced = 0;
    }

    /// Appends the entries not replaced, in the order they came.
    fn write(&self, out: &mut Vec<u8>) {
        for part in self.parts.iter().filter(|p| !p.replaced) {
            if let Some(entry) = self.bytes.get(part.start as usize..part.end as usize) {
                out.extend_from_slice(entry);
            }
        }
    }
}

fn key_attr(out: &mut Vec<u8>, key: &str, value: Attr<'_>) {
    string(out, 1, key);
    message(out, 2, |b| match value {
        Attr::Str(s) => any_string(b, s),
        Attr::Display(d) => message(b, 1, |b| {
            use std::io::Write as _;
            // Writing into a Vec cannot fail; a Display that errs leaves
            // what it wrote.
            let _ = write!(b, "{d}");
        }),
        Attr::I64(v) => any_i64(b, v),
        Attr::F64(v) => any_f64(b, v),
        Attr::Bool(v) => any_bool(b, v),
        Attr::List(list) => message(b, 5, |b| list.each(&mut |s| message(b, 1, |b| any_string(b, s)))),
    });
}

/// Appends one audit event to `out` as an entry of `ScopeLogs.log_records`:
/// an INFO record named `event_name` whose body is `body`.
pub fn log_record(out: &mut Vec<u8>, at: SystemTime, event_name: &str, body: &str, attrs: &[(&str, &str)]) {
    message(out, 2, |b| {
        fixed64(b, 1, nanos(at));
        varint(b, 2, SEVERITY_INFO);
        string(b, 3, "INFO");
        message(b, 5, |b| any_string(b, body));
        for (key, value) in attrs {
            message(b, 6, |b| {
                string(b, 1, key);
                message(b, 2, |b| any_string(b, value));
            });
        }
        fixed64(b, 11, nanos(at));
        string(b, 12, event_name);
    });
}

/// A `Resource` message's fields.
pub fn resource(resource: &opentelemetry_sdk::Resource) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in resource.iter() {
        message(&mut out, 1, |b| key_value(b, key.as_str(), value));
    }
    out
}

/// An `InstrumentationScope` message's fields.
pub fn scope(name: &str, version: &str) -> Vec<u8> {
    let mut out = Vec::new();
    string(&mut out, 1, name);
    string(&mut out, 2, version);
    out
}

/// [`request_into`] a new buffer.
#[cfg(test)]
pub fn request(resource: &[u8], scope: &[u8], items: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    request_into(&mut out, resource, scope, items);
    out
}

/// An export request (`ExportTraceServiceRequest` or
/// `ExportLogsServiceRequest`: both are one resource holding one scope)
/// around `items`, entries written by [`span`] or by [`log_record`],
/// written into `out` (emptied first) so that one buffer serves request
/// after request. The lengths are known before anything is written, so
/// nothing is moved to make room for a length (the items are most of a
/// request).
pub fn request_into(out: &mut Vec<u8>, resource: &[u8], scope: &[u8], items: &[u8]) {
    let field = |tag: u32, len: usize| key_len(tag) + encoded_len_varint(len as u64) + len;
    let scoped = field(1, scope.len()) + items.len();
    let resourced = field(1, resource.len()) + field(2, scoped);
    out.clear();
    out.reserve(field(1, resourced));
    let head = |out: &mut Vec<u8>, tag: u32, len: usize| {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
    };
    head(out, 1, resourced);
    head(out, 1, resource.len());
    out.extend_from_slice(resource);
    head(out, 2, scoped);
    head(out, 1, scope.len());
    out.extend_from_slice(scope);
    out.extend_from_slice(items);
}

/// A length-delimited field whose content `fill` appends. Its length is
/// put in front once known: in the one byte kept for it when it fits (most
/// fields are under 128 bytes), else by moving the content up.
fn message(out: &mut Vec<u8>, tag: u32, fill: impl FnOnce(&mut Vec<u8>)) {
    encode_key(tag, WireType::LengthDelimited, out);
    let at = out.len();
    out.push(0);
    fill(out);
    let end = out.len();
    let len = (end - at - 1) as u64;
    let width = encoded_len_varint(len);
    if width > 1 {
        out.resize(end + width - 1, 0);
        out.copy_within(at + 1..end, at + width);
    }
    let mut prefix = &mut out[at..at + width];
    encode_varint(len, &mut prefix);
}

fn attributes(out: &mut Vec<u8>, tag: u32, attributes: &[KeyValue]) {
    for attribute in attributes {
        message(out, tag, |b| key_value(b, attribute.key.as_str(), &attribute.value));
    }
}

fn key_value(out: &mut Vec<u8>, key: &str, value: &Value) {
    string(out, 1, key);
    message(out, 2, |b| any_value(b, value));
}

/// The fields of an `AnyValue`. Each is a member of a `oneof`, so it is
/// written even when it holds its type's default.
fn any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => any_string(out, s.as_str()),
        Value::Bool(v) => any_bool(out, *v),
        Value::I64(v) => any_i64(out, *v),
        Value::F64(v) => any_f64(out, *v),
        Value::Array(array) => message(out, 5, |b| match array {
            Array::Bool(values) => values.iter().for_each(|v| message(b, 1, |b| any_value(b, &Value::Bool(*v)))),
            Array::I64(values) => values.iter().for_each(|v| message(b, 1, |b| any_i64(b, *v))),
            Array::F64(values) => values.iter().for_each(|v| message(b, 1, |b| any_f64(b, *v))),
            Array::String(values) => values.iter().for_each(|v| message(b, 1, |b| any_string(b, v.as_str()))),
            other => message(b, 1, |b| any_string(b, &other.to_string())),
        }),
        other => any_string(out, &other.to_string()),
    }
}

fn any_string(out: &mut Vec<u8>, value: &str) {
    encode_key(1, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.extend_from_slice(value.as_bytes());
}

fn any_bool(out: &mut Vec<u8>, value: bool) {
    encode_key(2, WireType::Varint, out);
    encode_varint(u64::from(value), out);
}

fn any_i64(out: &mut Vec<u8>, value: i64) {
    encode_key(3, WireType::Varint, out);
    encode_varint(value as u64, out);
}

fn any_f64(out: &mut Vec<u8>, value: f64) {
    encode_key(4, WireType::SixtyFourBit, out);
    out.extend_from_slice(&value.to_le_bytes());
}

// Plain fields, left out when they hold their type's default (proto3).

fn string(out: &mut Vec<u8>, tag: u32, value: &str) {
    bytes(out, tag, value.as_bytes());
}

fn bytes(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(value.len() as u64, out);
        out.extend_from_slice(value);
    }
}

fn varint(out: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(value, out);
    }
}

fn fixed64(out: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::SixtyFourBit, out);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn fixed32(out: &mut Vec<u8>, tag: u32, value: u32) {
    if value != 0 {
        encode_key(tag, WireType::ThirtyTwoBit, out);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use std::{borrow::Cow, time::Duration};

    use opentelemetry::StringValue;
    use opentelemetry_proto::tonic::{
        collector::{logs::v1::ExportLogsServiceRequest, trace::v1::ExportTraceServiceRequest},
        common::v1::{AnyValue, any_value::Value as Any},
        trace::v1::{span::SpanKind, status::StatusCode},
    };
    use prost::Message as _;

    use super::*;

    fn plain(value: &Option<AnyValue>) -> Any {
        value.as_ref().and_then(|v| v.value.clone()).expect("a value")
    }

    /// Every field written here reads back through the official message
    /// types with the value it was given, defaults and odd values included.
    #[test]
    fn spans_decode_with_the_official_definitions() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let end = start + Duration::from_micros(1500);
        let long = "x".repeat(300);
        let mut fields = Fields::default();
        fields.set("gen_ai.request.model", Attr::Str("gpt-4o"));
        fields.set("replaced", Attr::Str("first"));
        fields.set("server.port", Attr::I64(443));
        fields.set("neg", Attr::I64(-5));
        fields.set("zero", Attr::I64(0));
        fields.event(end, "decision", [("reason", Attr::Str(&long)), ("n", Attr::I64(2))]);
        fields.set("latency_ms", Attr::F64(0.25));
        fields.set("stream", Attr::Bool(false));
        fields.set("empty", Attr::Str(""));
        fields.set("rules", Attr::List(&vec!["a", "é"]));
        fields.set("client.address", Attr::Display(&std::net::Ipv6Addr::LOCALHOST));
        fields.set("replaced", Attr::Str("second"));
        fields.set_default("replaced", Attr::Str("third"));
        fields.set_default("defaulted", Attr::Display(&503));
        assert!(fields.has("replaced") && !fields.has("absent"));
        assert_eq!(fields.events(), 1);
        let values = [
            KeyValue::new("total_ms", 1.5),
            KeyValue::new("names", Value::Array(Array::String(vec![StringValue::from("x")]))),
        ];
        let status = Status::Error { description: Cow::Borrowed("blocked by guardrail secrets") };
        let full = SpanFields {
            trace_id: [0x4b; 16],
            span_id: [7; 8],
            parent: Some([9; 8]),
            trace_state: "vendor=1",
            trace_flags: 1,
            name: "chat gpt-4o",
            kind: SPAN_KIND_CLIENT,
            start,
            end,
            fields: &fields,
            attributes: &values,
            dropped_events: 3,
            status: &status,
        };
        let mut items = Vec::new();
        span(&mut items, &full);
        let empty = Fields::default();
        let unset = SpanFields { parent: None, status: &Status::Unset, fields: &empty, attributes: &[], ..full };
        span(&mut items, &unset);
        let service = opentelemetry_sdk::Resource::builder_empty()
            .with_attribute(KeyValue::new("service.name", "interceptor"))
            .build();
        let body = request(&resource(&service), &scope("interceptor", "1.2.3"), &items);

        let decoded = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        let [rs] = decoded.resource_spans.as_slice() else { panic!("{decoded:?}") };
        let res = rs.resource.as_ref().unwrap();
        assert_eq!(res.attributes[0].key, "service.name");
        assert_eq!(plain(&res.attributes[0].value), Any::StringValue("interceptor".into()));
        let [ss] = rs.scope_spans.as_slice() else { panic!() };
        let sc = ss.scope.as_ref().unwrap();
        assert_eq!((sc.name.as_str(), sc.version.as_str()), ("interceptor", "1.2.3"));
        let [s, unparented] = ss.spans.as_slice() else { panic!("{ss:?}") };
        assert_eq!(s.trace_id, [0x4b; 16]);
        assert_eq!(s.span_id, [7; 8]);
        assert_eq!(s.parent_span_id, [9; 8]);
        assert_eq!(s.trace_state, "vendor=1");
        assert_eq!(s.name, "chat gpt-4o");
        assert_eq!(s.kind(), SpanKind::Client);
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_123_456_789);
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 1_500_000);
        assert_eq!(s.flags, 0x301);
        assert_eq!(s.dropped_events_count, 3);
        let got: Vec<(&str, Any)> = s.attributes.iter().map(|kv| (kv.key.as_str(), plain(&kv.value))).collect();
        let string = |s: &str| Any::StringValue(s.into());
        let strings = |v: &Any| match v {
            Any::ArrayValue(a) => a.values.iter().map(|v| v.value.clone().unwrap()).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(got.len(), 13, "{got:?}");
        assert_eq!(got[0], ("gen_ai.request.model", string("gpt-4o")));
        assert_eq!(got[1], ("server.port", Any::IntValue(443)));
        assert_eq!(got[2], ("neg", Any::IntValue(-5)));
        assert_eq!(got[3], ("zero", Any::IntValue(0)));
        assert_eq!(got[4], ("latency_ms", Any::DoubleValue(0.25)));
        assert_eq!(got[5], ("stream", Any::BoolValue(false)));
        assert_eq!(got[6], ("empty", string("")));
        assert_eq!(got[7].0, "rules");
        assert_eq!(strings(&got[7].1), [string("a"), string("é")]);
        assert_eq!(got[8], ("client.address", string("::1")));
        // Set again: one attribute, the last value; a default does not
        // replace it.
        assert_eq!(got[9], ("replaced", string("second")));
        assert_eq!(got[10], ("defaulted", string("503")));
        assert_eq!(got[11], ("total_ms", Any::DoubleValue(1.5)));
        assert_eq!(got[12].0, "names");
        assert_eq!(strings(&got[12].1), [string("x")]);
        let [event] = s.events.as_slice() else { panic!() };
        assert_eq!(event.name, "decision");
        assert_eq!(event.time_unix_nano, s.end_time_unix_nano);
        assert_eq!(event.attributes[0].key, "reason");
        assert_eq!(plain(&event.attributes[0].value), Any::StringValue(long));
        assert_eq!((event.attributes[1].key.as_str(), plain(&event.attributes[1].value)), ("n", Any::IntValue(2)));
        let st = s.status.as_ref().unwrap();
        assert_eq!((st.code(), st.message.as_str()), (StatusCode::Error, "blocked by guardrail secrets"));
        assert!(unparented.parent_span_id.is_empty());
        assert_eq!(unparented.flags, 0x101);
        assert_eq!(unparented.status.as_ref().unwrap().code(), StatusCode::Unset);
    }

    #[test]
    fn log_records_decode_with_the_official_definitions() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut items = Vec::new();
        let body = r#"{"event":"guardrail","decision":"block"}"#;
        log_record(&mut items, at, "interceptor.audit.guardrail", body, &[("decision", "block"), ("rule", "")]);
        let out = request(&[], &scope("audit", "1.2.3"), &items);
        let decoded = ExportLogsServiceRequest::decode(out.as_slice()).unwrap();
        let sl = &decoded.resource_logs[0].scope_logs[0];
        assert_eq!(sl.scope.as_ref().unwrap().name, "audit");
        let [r] = sl.log_records.as_slice() else { panic!("{sl:?}") };
        assert_eq!(r.time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(r.observed_time_unix_nano, r.time_unix_nano);
        assert_eq!(r.severity_number, SEVERITY_INFO as i32);
        assert_eq!(r.severity_text, "INFO");
        assert_eq!(r.event_name, "interceptor.audit.guardrail");
        assert_eq!(plain(&r.body), Any::StringValue(body.into()));
        assert_eq!(r.attributes[0].key, "decision");
        assert_eq!(plain(&r.attributes[0].value), Any::StringValue("block".into()));
        assert_eq!(plain(&r.attributes[1].value), Any::StringValue(String::new()));
    }

    /// A span named `name` with `fields` and nothing else of note.
    fn bare<'a>(name: &'a str, fields: &'a Fields) -> SpanFields<'a> {
        SpanFields {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: None,
            trace_state: "",
            trace_flags: 1,
            name,
            kind: SPAN_KIND_CLIENT,
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
            fields,
            attributes: &[],
            dropped_events: 0,
            status: &Status::Unset,
        }
    }

    /// An attribute set again and again (a long session's latest prompt)
    /// does not grow the span without bound, and the span keeps each other
    /// entry, in order, and the last value.
    #[test]
    fn replaced_attributes_do_not_accumulate() {
        let mut fields = Fields::default();
        fields.set("first", Attr::Str("a"));
        let prompt = "p".repeat(1000);
        for i in 0..1000 {
            fields.set("gen_ai.input.messages", Attr::Str(&prompt));
            fields.set("n", Attr::I64(i));
            if i % 100 == 0 {
                fields.event(SystemTime::UNIX_EPOCH, "decision", [("i", Attr::I64(i))]);
            }
        }
        fields.set("last", Attr::Str("z"));
        assert!(fields.bytes.len() < 2 * COMPACT_AT + 4 * prompt.len(), "{} bytes kept", fields.bytes.len());
        // The same value again changes nothing, not even the buffer.
        let kept = fields.bytes.len();
        fields.set("last", Attr::Str("z"));
        fields.set("gen_ai.input.messages", Attr::Str(&prompt));
        assert_eq!(fields.bytes.len(), kept);
        let mut items = Vec::new();
        span(&mut items, &bare("chat", &fields));
        let decoded = ExportTraceServiceRequest::decode(request(&[], &scope("s", ""), &items).as_slice()).unwrap();
        let s = &decoded.resource_spans[0].scope_spans[0].spans[0];
        let keys: Vec<&str> = s.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["first", "gen_ai.input.messages", "n", "last"]);
        assert_eq!(plain(&s.attributes[2].value), Any::IntValue(999));
        assert_eq!(plain(&s.attributes[1].value), Any::StringValue(prompt));
        let events: Vec<Any> = s.events.iter().map(|e| plain(&e.attributes[0].value)).collect();
        assert_eq!(events, (0..10).map(|i| Any::IntValue(i * 100)).collect::<Vec<_>>());
    }

    /// A length prefix longer than one byte moves the content after it, at
    /// every level of nesting.
    #[test]
    fn long_fields_keep_their_content() {
        for len in [0, 1, 100, 127, 128, 16_383, 16_384, 300_000] {
            let text = "y".repeat(len);
            let mut fields = Fields::default();
            fields.set("k", Attr::Str(&text));
            fields.event(SystemTime::UNIX_EPOCH, &text, [("k", Attr::Display(&text))]);
            let mut items = Vec::new();
            span(&mut items, &bare(&text, &fields));
            let body = request(&[], &scope(&text, ""), &items);
            let decoded = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
            let ss = &decoded.resource_spans[0].scope_spans[0];
            assert_eq!(ss.scope.as_ref().unwrap().name, text);
            assert_eq!(ss.spans[0].name, text);
            assert_eq!(plain(&ss.spans[0].attributes[0].value), Any::StringValue(text.clone()));
            let event = &ss.spans[0].events[0];
            assert_eq!(event.name, text);
            assert_eq!(plain(&event.attributes[0].value), Any::StringValue(text));
        }
    }
}
