//! MCP sessions: the requests a client sent that still wait for their
//! answer, per server host and session (the streamable-HTTP
//! `Mcp-Session-Id` header, or the old HTTP+SSE transport's `sessionId`
//! query parameter), so that a result arriving on any stream of the session
//! (the POST's own answer, the GET stream, the old transport's event
//! stream) is checked by the method of its request and its latency measured.
//!
//! Bounded: at most [`MAX_SESSIONS`] sessions (the least recently used one
//! goes first) and [`MAX_PENDING`] pending requests per session (the oldest
//! goes first); an entry older than [`PENDING_TTL`] is forgotten. A result
//! whose request is forgotten is still checked, by its shape alone.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::guardrails::model::Decision;

pub const MAX_SESSIONS: usize = 4_096;
pub const MAX_PENDING: usize = 256;
pub const PENDING_TTL: Duration = Duration::from_secs(600);

/// A session: the server's host and the session's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub server: String,
    pub session: String,
}

/// A request waiting for its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub method: String,
    /// `params.name` of a `tools/call`.
    pub tool: Option<String>,
    pub started: Instant,
    /// What the request's own check decided, and by which rules (the tool
    /// call's audit event reports both directions).
    pub decision: Decision,
    pub rules: Vec<String>,
    /// The tool call's arguments, kept only with `audit_prompts`.
    pub arguments: Option<String>,
}

#[derive(Debug, Default)]
struct Session {
    /// Request id (its JSON text, `7` or `"a"`) → request, oldest first.
    pending: VecDeque<(String, Pending)>,
    last_used: u64,
}

#[derive(Debug, Default)]
struct Table {
    sessions: HashMap<SessionKey, Session>,
    clock: u64,
}

/// The session table, shared by every exchange. Its lock is held for a few
/// map operations, never across an await.
#[derive(Debug, Default)]
pub struct Sessions {
    table: Mutex<Table>,
}

impl Sessions {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remembers request `id` of `key`'s session.
    pub fn request(&self, key: &SessionKey, id: String, pending: Pending) {
        let mut table = self.table();
        table.clock += 1;
        let now = table.clock;
        if !table.sessions.contains_key(key) && table.sessions.len() >= MAX_SESSIONS {
            let oldest = table.sessions.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                table.sessions.remove(&oldest);
            }
        }
        let session = table.sessions.entry(key.clone()).or_default();
        session.last_used = now;
        session.pending.retain(|(pending_id, p)| *pending_id != id && p.started.elapsed() < PENDING_TTL);
        if session.pending.len() >= MAX_PENDING {
            session.pending.pop_front();
        }
        session.pending.push_back((id, pending));
    }

    /// Takes request `id` of `key`'s session, answered now.
    pub fn answer(&self, key: &SessionKey, id: &str) -> Option<Pending> {
        let mut table = self.table();
        table.clock += 1;
        let now = table.clock;
        let session = table.sessions.get_mut(key)?;
        session.last_used = now;
        let at = session.pending.iter().position(|(pending_id, _)| pending_id == id)?;
        let (_, pending) = session.pending.remove(at)?;
        (pending.started.elapsed() < PENDING_TTL).then_some(pending)
    }

    /// Forgets a session (the client deleted it).
    pub fn end(&self, key: &SessionKey) {
        self.table().sessions.remove(key);
    }

    /// How many sessions are remembered.
    pub fn len(&self) -> usize {
        self.table().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(session: &str) -> SessionKey {
        SessionKey { server: "mcp.example.test".into(), session: session.into() }
    }

    fn call(tool: &str) -> Pending {
        Pending {
            method: "tools/call".into(),
            tool: Some(tool.into()),
            started: Instant::now(),
            decision: Decision::Allow,
            rules: Vec::new(),
            arguments: None,
        }
    }

    #[test]
    fn an_answer_finds_its_request_once_in_its_own_session() {
        let sessions = Sessions::default();
        sessions.request(&key("s1"), "1".into(), call("search"));
        sessions.request(&key("s2"), "1".into(), call("fetch"));
        assert_eq!(sessions.answer(&key("s1"), "\"1\""), None, "a string id is not the number");
        assert_eq!(sessions.answer(&key("s1"), "1").and_then(|p| p.tool), Some("search".into()));
        assert_eq!(sessions.answer(&key("s1"), "1"), None);
        assert_eq!(sessions.answer(&key("s2"), "1").and_then(|p| p.tool), Some("fetch".into()));
        let other_server = SessionKey { server: "other.example.test".into(), session: "s1".into() };
        sessions.request(&key("s1"), "2".into(), call("x"));
        assert_eq!(sessions.answer(&other_server, "2"), None);
        sessions.end(&key("s1"));
        assert_eq!(sessions.answer(&key("s1"), "2"), None);
    }

    #[test]
    fn the_table_is_bounded() {
        let sessions = Sessions::default();
        for i in 0..MAX_PENDING + 10 {
            sessions.request(&key("s"), i.to_string(), call("t"));
        }
        assert_eq!(sessions.answer(&key("s"), "0"), None, "the oldest request went first");
        assert!(sessions.answer(&key("s"), &(MAX_PENDING + 9).to_string()).is_some());
        for i in 0..MAX_SESSIONS + 10 {
            sessions.request(&key(&format!("k{i}")), "1".into(), call("t"));
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert_eq!(sessions.answer(&key("k0"), "1"), None, "the least recently used session went first");
        assert!(sessions.answer(&key(&format!("k{}", MAX_SESSIONS + 9)), "1").is_some());
    }

    #[test]
    fn stale_requests_are_forgotten() {
        let sessions = Sessions::default();
        let Some(started) = Instant::now().checked_sub(PENDING_TTL + Duration::from_secs(1)) else { return };
        sessions.request(&key("s"), "1".into(), Pending { tool: None, started, ..call("x") });
        assert_eq!(sessions.answer(&key("s"), "1"), None);
    }
}
