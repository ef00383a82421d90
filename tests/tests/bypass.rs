//! Privileged bypass tests: ways a covered process could get a prompt past inspection, each tried with a private key through the real binary and the eBPF redirect.

#[path = "bypass/parsers.rs"]
mod parsers;
