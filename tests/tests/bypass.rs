//! Privileged bypass tests (real binary, eBPF redirect): ways a covered process could get a prompt past inspection.

#[path = "bypass/starvation.rs"]
mod starvation;
