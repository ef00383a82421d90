//! Guardrails: provider-aware inspection of every intercepted request and
//! response, and the allow / modify / block decision.
//!
//! * `model` — the normalized model (pure).
//! * `providers` — provider wire formats into the model, and back (pure).
//! * `framing` — SSE, AWS event-stream and streamed JSON arrays (pure).
//! * `decode` — content-encoding decompression with hard limits (pure).
//! * `mcp` — the Model Context Protocol: recognizing it, its JSON-RPC
//!   messages and their texts, its SSE streams, tool-definition hashes (pure).
//! * `engine` — the embedded local engine: detectors, policy, redaction (pure).
//! * `offload` — where a local scan runs: inline when small, on the
//!   blocking pool when large.
//! * `backend` — the [`Backend`](backend::Backend) trait the pipeline calls:
//!   a check in, a verdict out; and the exchange's [`Call`](backend::Call).
//! * `budgets` — budgets and rate limits per workload scope: admission,
//!   token charges, the per-node counters' file and the Redis-shared ones.
//! * `local` — the local engine as a backend.
//! * `akto` — the Akto-compatible remote backend (I/O).
//! * `websocket` — the WebSocket protocols agents use (Responses WebSocket
//!   mode, OpenAI Realtime, Gemini Live): where their messages carry text (pure).
//! * `pipeline` — the data plane's hook, by phase: runs the backends, applies
//!   the verdicts, writes the audit trail (also per WebSocket message).

pub mod akto;
pub mod backend;
pub mod budgets;
pub mod decode;
pub mod engine;
pub mod framing;
pub mod genai;
pub mod keys;
mod local;
pub mod mcp;
pub mod model;
pub mod offload;
pub mod pipeline;
pub mod providers;
pub mod usage;
pub mod websocket;
