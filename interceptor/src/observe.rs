//! The live view of decisions (`interceptor observe`): every audit event, as
//! its JSON line, and every connection's record (`"event": "connection"`),
//! offered to whoever watches the admin API's `/events`, filtered there by
//! workload, provider, decision, rule or event kind.
//!
//! * [`LiveEvents`] — the hub the audit writer publishes to: a bounded
//!   broadcast, free when nobody watches; a watcher that falls behind loses
//!   the oldest lines and is told how many;
//! * [`Filter`] — what a watcher asked for (the query of `/events`);
//! * [`run`] — the command: connects to the admin API and prints the
//!   stream, as text for a person or JSON lines for a script.

use std::{
    convert::Infallible,
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::Value;
use tokio::sync::broadcast;

/// Lines kept for a watcher that is behind.
const BACKLOG: usize = 1024;

/// The audit events' (and connections') JSON lines, to whoever watches.
#[derive(Clone, Debug)]
pub struct LiveEvents {
    tx: broadcast::Sender<Bytes>,
    /// Watchers now: one relaxed load tells a publisher whether to bother.
    watchers: Arc<AtomicUsize>,
}

impl Default for LiveEvents {
    fn default() -> Self {
        Self { tx: broadcast::channel(BACKLOG).0, watchers: Arc::default() }
    }
}

/// One watcher, counted while it lives.
struct Watcher {
    rx: broadcast::Receiver<Bytes>,
    filter: Filter,
    watchers: Arc<AtomicUsize>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl LiveEvents {
    /// Whether anyone watches (a publisher skips building what nobody reads).
    pub fn is_watched(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// Offers one event's JSON; nothing is copied when nobody watches.
    pub fn publish(&self, json: &[u8]) {
        if self.is_watched() {
            let _ = self.tx.send(Bytes::copy_from_slice(json));
        }
    }

    /// How many watchers there are now.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }

    /// The `/events` answer: the events `filter` accepts as JSON lines, as
    /// they happen, until the watcher leaves. A watcher that fell behind
    /// gets `{"lagged": <lost lines>}` where the lines were lost.
    pub fn stream(&self, filter: Filter) -> BoxBody<Bytes, Infallible> {
        self.watchers.fetch_add(1, Ordering::Relaxed);
        let watcher = Watcher { rx: self.tx.subscribe(), filter, watchers: Arc::clone(&self.watchers) };
        let frames = futures_util::stream::unfold(watcher, |mut w| async move {
            loop {
                let line = match w.rx.recv().await {
                    Ok(json) if w.filter.accepts(&json) => json,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(lost)) => Bytes::from(format!("{{\"lagged\":{lost}}}")),
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                let mut framed = Vec::with_capacity(line.len() + 1);
                framed.extend_from_slice(&line);
                framed.push(b'\n');
                return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(framed))), w));
            }
        });
        StreamBody::new(frames).boxed()
    }
}

/// What a watcher wants to see; every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// `allow`, `modify`, `block`, `alert` or `error`.
    pub decision: Option<String>,
    /// The provider's name (`openai`, `anthropic`, `mcp`, …).
    pub provider: Option<String>,
    /// Text found in any of the workload's fields (process, executable,
    /// pod, namespace, …).
    pub workload: Option<String>,
    /// A rule id the decision names.
    pub rule: Option<String>,
    /// The event kind (`guardrail_decision`, `mcp_tool_call`, …).
    pub event: Option<String>,
}

impl Filter {
    /// The filter of an `/events` query (`decision=block&provider=openai`);
    /// an unknown key is an error naming it.
    pub fn from_query(query: Option<&str>) -> Result<Self, String> {
        let mut filter = Self::default();
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let slot = match key.as_ref() {
                "decision" => &mut filter.decision,
                "provider" => &mut filter.provider,
                "workload" => &mut filter.workload,
                "rule" => &mut filter.rule,
                "event" => &mut filter.event,
                other => return Err(format!("unknown filter {other:?} (decision, provider, workload, rule, event)")),
            };
            *slot = Some(value.into_owned());
        }
        Ok(filter)
    }

    /// The query string of this filter.
    pub fn to_query(&self) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (key, value) in [
            ("decision", &self.decision),
            ("provider", &self.provider),
            ("workload", &self.workload),
            ("rule", &self.rule),
            ("event", &self.event),
        ] {
            if let Some(value) = value {
                query.append_pair(key, value);
            }
        }
        query.finish()
    }

    /// Whether an event (its JSON) passes.
    pub fn accepts(&self, json: &[u8]) -> bool {
        if *self == Self::default() {
            return true;
        }
        let Ok(event) = serde_json::from_slice::<Value>(json) else { return false };
        let is = |field: &str, want: &Option<String>| want.as_ref().is_none_or(|w| event[field].as_str() == Some(w));
        is("decision", &self.decision)
            && is("provider", &self.provider)
            && is("event", &self.event)
            && self
                .rule
                .as_ref()
                .is_none_or(|r| event["rules"].as_array().is_some_and(|rules| rules.iter().any(|x| x == r)))
            && self.workload.as_ref().is_none_or(|w| mentions(&event["workload"], w))
    }
}

/// Whether a string inside `value` contains `text`.
fn mentions(value: &Value, text: &str) -> bool {
    match value {
        Value::String(s) => s.contains(text),
        Value::Array(items) => items.iter().any(|v| mentions(v, text)),
        Value::Object(fields) => fields.values().any(|v| mentions(v, text)),
        _ => false,
    }
}

/// How `interceptor observe` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One line per event for a person.
    Text,
    /// The events' JSON lines, as the audit log has them.
    Json,
}

/// Prints the events the admin API at `admin` streams through `filter`,
/// until it closes or the output does.
pub async fn run(admin: SocketAddr, filter: &Filter, output: Output) -> anyhow::Result<()> {
    let url = format!("http://{admin}/events?{}", filter.to_query());
    let client = reqwest::Client::builder().no_proxy().build()?;
    let mut resp = client.get(&url).send().await.with_context(|| format!("connecting to the admin API at {admin}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        bail!("{url}: {status}: {}", resp.text().await.unwrap_or_default().trim());
    }
    let mut pending = Vec::new();
    let mut stdout = std::io::stdout().lock();
    while let Some(chunk) = resp.chunk().await.context("reading the event stream")? {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = &line[..line.len() - 1];
            let printed = match output {
                Output::Json => stdout.write_all(line).and_then(|()| stdout.write_all(b"\n")),
                Output::Text => writeln!(stdout, "{}", text_line(line)),
            };
            if printed.and_then(|()| stdout.flush()).is_err() {
                // The reader went away (`| head`): done.
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One event for a person: time, decision, event kind, provider, host and
/// path, workload, rules and the first reason.
pub fn text_line(json: &[u8]) -> String {
    let Ok(e) = serde_json::from_slice::<Value>(json) else { return String::from_utf8_lossy(json).into_owned() };
    if let Some(lost) = e.get("lagged") {
        return format!("... {lost} events lost (the watcher fell behind)");
    }
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let time = e["time"].as_str().and_then(|t| t.get(11..19)).unwrap_or("--:--:--");
    let workload = &e["workload"];
    let who = [&workload["pod"], &workload["comm"], &workload["exe"]]
        .into_iter()
        .find_map(|v| v.as_str().map(str::to_owned))
        .or_else(|| workload["pid"].as_u64().map(|p| format!("pid {p}")))
        .unwrap_or_else(|| "-".into());
    let rules: Vec<&str> =
        e["rules"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let mut line = format!(
        "{time} {:<6} {:<18} {:<9} {}{} {} {}",
        s(&e["decision"]),
        s(&e["event"]),
        s(&e["provider"]),
        s(&e["host"]),
        e["path"].as_str().unwrap_or_default(),
        s(&e["direction"]),
        who
    );
    if let (Some(mode), Some(outcome)) = (e["mode"].as_str(), e["outcome"].as_str()) {
        line.push_str(&format!(" mode={mode} outcome={outcome} requests={}", e["requests"]));
    }
    if let Some(tool) = e["mcp"]["tool"].as_str() {
        line.push_str(&format!(" tool={tool}"));
    }
    if !rules.is_empty() {
        line.push_str(&format!(" rules={}", rules.join(",")));
    }
    if let Some(reason) = e["reasons"].get(0).and_then(Value::as_str) {
        line.push_str(&format!(" reason={reason:?}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: &[u8] = br#"{"time":"2026-12-05T23:40:01.123Z","event":"guardrail_decision","decision":"block","provider":"openai","host":"api.openai.com","path":"/v1/chat/completions","direction":"request","rules":["block-credentials-in-requests"],"reasons":["private key"],"workload":{"pid":42,"comm":"python3","pod":"agent-1","namespace":"team-a"}}"#;
    const ALLOW: &[u8] = br#"{"event":"guardrail_decision","decision":"allow","provider":"anthropic","rules":[],"workload":{"comm":"node"}}"#;

    #[test]
    fn filters_come_from_the_query_and_unknown_keys_are_refused() {
        let f = Filter::from_query(Some("decision=block&workload=team-a&rule=r%201")).unwrap();
        assert_eq!(f.decision.as_deref(), Some("block"));
        assert_eq!(f.rule.as_deref(), Some("r 1"));
        assert_eq!(Filter::from_query(Some(&f.to_query())).unwrap(), f);
        assert_eq!(Filter::from_query(None).unwrap(), Filter::default());
        let error = Filter::from_query(Some("verdict=block")).unwrap_err();
        assert!(error.contains("verdict"), "{error}");
    }

    #[test]
    fn every_field_set_must_match() {
        let all = Filter::default();
        assert!(all.accepts(BLOCK) && all.accepts(ALLOW));
        let blocks = Filter { decision: Some("block".into()), ..Filter::default() };
        assert!(blocks.accepts(BLOCK) && !blocks.accepts(ALLOW));
        let team = Filter { workload: Some("team-a".into()), ..Filter::default() };
        assert!(team.accepts(BLOCK) && !team.accepts(ALLOW));
        let rule = Filter { rule: Some("block-credentials-in-requests".into()), ..Filter::default() };
        assert!(rule.accepts(BLOCK) && !rule.accepts(ALLOW));
        let both = Filter { decision: Some("block".into()), provider: Some("anthropic".into()), ..Filter::default() };
        assert!(!both.accepts(BLOCK) && !both.accepts(ALLOW));
    }

    #[test]
    fn a_text_line_says_what_happened_to_whom() {
        let line = text_line(BLOCK);
        for part in [
            "23:40:01",
            "block",
            "openai",
            "api.openai.com/v1/chat/completions",
            "agent-1",
            "block-credentials-in-requests",
            "private key",
        ] {
            assert!(line.contains(part), "{part} missing: {line}");
        }
        assert!(text_line(br#"{"lagged":3}"#).contains("3 events lost"));
    }

    #[tokio::test]
    async fn a_watcher_gets_what_its_filter_accepts_and_is_told_what_it_missed() {
        let live = LiveEvents::default();
        live.publish(BLOCK); // nobody watches: dropped, not kept
        let mut body = live.stream(Filter { decision: Some("block".into()), ..Filter::default() });
        assert_eq!(live.watchers(), 1);
        live.publish(ALLOW);
        live.publish(BLOCK);
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&frame[..], [BLOCK, b"\n"].concat().as_slice());
        for _ in 0..BACKLOG + 5 {
            live.publish(BLOCK);
        }
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&frame[..], b"{\"lagged\":5}\n");
        drop(body);
        assert_eq!(live.watchers(), 0, "a watcher that leaves is no longer counted");
        assert!(!live.is_watched());
    }
}
