//! Privileged attacker's tests: a covered process tries every way past
//! inspection with a private key in its request (handshake games, WebSocket,
//! shapes and encodings the parsers might not know, a flood of hostile
//! bodies). Each test runs the real binary with the eBPF redirect in a
//! namespace and cgroups of its own, and asserts that the fake provider never
//! received the key and that an audit event names why.

#[path = "bypass/handshake.rs"]
mod handshake;
#[path = "bypass/parsers.rs"]
mod parsers;
#[path = "bypass/starvation.rs"]
mod starvation;
#[path = "bypass/websocket.rs"]
mod websocket;

use serde_json::Value;

/// A private key as agents leak them.
pub const PRIVATE_KEY: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n-----END RSA PRIVATE KEY-----";

/// The audit events the interceptor has logged so far.
pub fn audit_events(proxy: &interceptor::testing::Interceptor) -> Vec<Value> {
    proxy.audit_events()
}
