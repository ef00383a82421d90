//! Privileged bypass tests (real binary, eBPF redirect): each way a covered process could get a prompt past inspection carries a private-key block and must not reach the provider.
#[path = "bypass/websocket.rs"]
mod websocket;
