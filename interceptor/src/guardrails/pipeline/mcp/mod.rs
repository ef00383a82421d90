//! MCP (Model Context Protocol) exchanges: the state the pipeline keeps
//! across them.
//!
//! * `sessions` — the requests of each session still waiting for their
//!   answer, so results on any stream are matched to their method and tool;
//! * `pins` — the rug-pull pins: tool definitions seen per server and
//!   workload, persisted.

pub mod pins;
pub mod sessions;
