//! interceptor: a transparent guardrail layer for AI traffic.
//!
//! See ARCHITECTURE.md for how the pieces fit. In short: `redirect` puts
//! connections to AI providers into the proxy (eBPF or iptables), `proxy`
//! relays them through the `guardrails`, `targets` decides which addresses
//! are redirected, `config` holds the validated settings, `control` keeps
//! targets, learned addresses and reloads in step, `dataplane` builds the
//! data plane from the configuration, `admin` serves health and status, and
//! `app` wires them together.

pub mod admin;
pub mod app;
pub mod app_name;
pub mod audit;
pub mod ca;
pub mod cgroup;
pub mod check_policy;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod dns;
pub mod doctor;
pub mod error;

pub mod guardrails;
pub mod kubernetes;
pub mod metrics;
pub mod net;
pub mod observe;
pub mod policy;
pub mod privileges;
pub mod process;
pub mod proxy;
pub mod redirect;
pub mod respond;
pub mod targets;
pub mod telemetry;
pub mod usage_report;
pub mod webhook;
pub mod workload;

#[cfg(feature = "testing")]
pub mod testing;

#[cfg(test)]
mod layering;
