//! `interceptor check-policy`: which rules and system prompts of the
//! configured policy apply to a workload, described on the command line or
//! read from a live process. It answers "what will the interceptor do to
//! this agent's traffic" before the agent runs.
//!
//! A workload is written as comma-separated `field=value` pairs
//! ([`FIELDS`]); `label=k=v` is given once per label. A comma inside a
//! value is kept when what follows it is not `field=`, so paths holding
//! commas need no quoting:
//!
//! ```text
//! --workload comm=claude,exe=/usr/bin/node,uid=1000,namespace=team-a,label=app=billing,label=tier=web
//! --pid 4242 --workload namespace=team-a     # a live process, with its pod told
//! ```
//!
//! Nothing here talks to the running interceptor or to Kubernetes: what
//! is not given (a pod, a thread) is not known, as for a connection whose
//! workload the interceptor could not name.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, sync::Arc};

use crate::{
    config::{Backend, Config},
    guardrails::{
        engine::{Coverage, EntryKind, Policy, WorkloadRef},
        model::Provider,
    },
    process::Procfs,
    workload::{PodInfo, Workload},
};

/// The fields of `--workload`.
pub const FIELDS: [&str; 11] =
    ["comm", "thread", "exe", "argv0", "uid", "cgroup", "pod", "namespace", "service_account", "label", "container"];

/// Linux keeps 15 bytes of a process name.
const COMM_MAX: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum CheckPolicyError {
    #[error("--workload `{spec}`: {reason}")]
    Workload { spec: String, reason: String },
    #[error("--pid {pid}: no such process (or /proc hides it)")]
    NoProcess { pid: u32 },
    #[error("unknown provider `{name}` (known: {known})")]
    Provider { name: String, known: String },
    #[error("cannot read the policy file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Policy(#[from] crate::guardrails::engine::EngineError),
}

/// Adds the fields of one `--workload` argument to `workload`. Notes for
/// the user (a name the kernel would cut) are pushed to `notes`.
pub fn parse_workload(spec: &str, workload: &mut Workload, notes: &mut Vec<String>) -> Result<(), CheckPolicyError> {
    let error = |reason: String| CheckPolicyError::Workload { spec: spec.to_owned(), reason };
    if spec.trim().is_empty() {
        return Err(error("empty; give field=value pairs".into()));
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    for piece in spec.split(',') {
        match piece.split_once('=') {
            Some((field, value)) if is_field_name(field) => {
                if !FIELDS.contains(&field) {
                    return Err(error(format!(
                        "unknown field `{field}` (known: {}; give each label as label=key=value)",
                        FIELDS.join(", ")
                    )));
                }
                pairs.push((field.to_owned(), value.to_owned()));
            }
            // Not `field=`: a comma inside the previous value.
            _ => match pairs.last_mut() {
                Some((_, value)) => {
                    value.push(',');
                    value.push_str(piece);
                }
                None => return Err(error(format!("`{piece}` is not field=value"))),
            },
        }
    }
    let mut pod = workload.pod.as_deref().cloned();
    for (field, value) in pairs {
        let field = field.as_str();
        if value.is_empty() {
            return Err(error(format!("`{field}=` has no value")));
        }
        match field {
            "comm" => {
                if value.len() > COMM_MAX {
                    notes.push(format!(
                        "comm `{value}` is longer than {COMM_MAX} bytes: the kernel keeps only `{}`, and a live process never shows this name",
                        cut(&value, COMM_MAX)
                    ));
                }
                workload.comm = value;
            }
            "thread" => workload.thread = value,
            "exe" => workload.exe = Some(value.into()),
            "argv0" => workload.argv0 = Some(value.into()),
            "uid" => {
                workload.uid = value.parse().map_err(|_| error(format!("uid `{value}` is not a number")))?;
            }
            "cgroup" => {
                if !value.starts_with('/') {
                    return Err(error(format!(
                        "cgroup `{value}` must be a path from the cgroup2 mount, starting with `/`"
                    )));
                }
                workload.cgroup = Some(value.into());
            }
            "pod" => pod.get_or_insert_with(PodInfo::default).name = value,
            "namespace" => pod.get_or_insert_with(PodInfo::default).namespace = value,
            "service_account" => pod.get_or_insert_with(PodInfo::default).service_account = Some(value),
            "container" => pod.get_or_insert_with(PodInfo::default).container = Some(value),
            _ => {
                // label=key=value
                let Some((key, label)) = value.split_once('=') else {
                    return Err(error(format!("label `{value}` is not key=value")));
                };
                if key.is_empty() {
                    return Err(error(format!("label `{value}` has no key")));
                }
                pod.get_or_insert_with(PodInfo::default).labels.insert(key.to_owned(), label.to_owned());
            }
        }
    }
    workload.pod = pod.map(Arc::new);
    Ok(())
}

fn is_field_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
}

fn cut(s: &str, max: usize) -> &str {
    let end = (0..=max.min(s.len())).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    &s[..end]
}

/// A live process as a connection from it would be named: process name,
/// executable (when this user may read it), `argv[0]`, real uid, cgroup.
/// Its threads are not known: `thread` is left empty.
pub fn workload_of_pid(procfs: &Procfs, pid: u32, notes: &mut Vec<String>) -> Result<Workload, CheckPolicyError> {
    let stat = procfs.stat(pid).ok_or(CheckPolicyError::NoProcess { pid })?;
    let exe = match procfs.exe(pid) {
        Ok(exe) => Some(exe),
        Err(error) => {
            notes.push(format!(
                "cannot read the executable of process {pid} ({error}); exe: patterns match nothing (reading it needs ptrace access to the process; or give exe=)"
            ));
            None
        }
    };
    Ok(Workload {
        pid,
        tid: pid,
        uid: procfs.uid(pid).unwrap_or(0),
        comm: stat.comm,
        exe: exe.map(Into::into),
        argv0: procfs.argv0(pid).map(Into::into),
        cgroup: procfs.cgroup(pid).map(Into::into),
        ..Default::default()
    })
}

/// A provider by its policy name.
pub fn provider_named(name: &str) -> Result<Provider, CheckPolicyError> {
    Provider::ALL.into_iter().find(|p| p.as_str() == name).ok_or_else(|| CheckPolicyError::Provider {
        name: name.to_owned(),
        known: Provider::ALL.map(Provider::as_str).join(", "),
    })
}

/// The policy the configuration runs (`policy` instead, when given), and
/// a note when the local engine is not among the backends.
pub fn load_policy(config: &Config, policy: Option<&Path>) -> Result<(Policy, Option<String>), CheckPolicyError> {
    let path =
        policy.or((!config.guardrails.policy_file.as_os_str().is_empty()).then_some(&*config.guardrails.policy_file));
    let loaded = match path {
        None => Policy::builtin()?,
        Some(path) => {
            let origin = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|source| CheckPolicyError::Read { path: origin.clone(), source })?;
            Policy::from_toml(&text, &origin)?
        }
    };
    let note = (!config.guardrails.enabled || !config.guardrails.backends.contains(&Backend::Local)).then(|| {
        "the configuration does not run the local engine (guardrails.enabled, guardrails.backends): this policy is not in force".to_owned()
    });
    Ok((loaded, note))
}

/// One line describing a workload, unknown fields left out.
pub fn describe(w: &Workload) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: &str| {
        let quoted = if value.contains(' ') { format!("{value:?}") } else { value.to_owned() };
        let _ = write!(out, "{}{name}={quoted}", if out.is_empty() { "" } else { " " });
    };
    if w.pid != 0 {
        field("pid", &w.pid.to_string());
    }
    for (name, value) in [("comm", &w.comm), ("thread", &w.thread)] {
        if !value.is_empty() {
            field(name, value);
        }
    }
    for (name, value) in [("exe", &w.exe), ("argv0", &w.argv0), ("cgroup", &w.cgroup)] {
        if let Some(value) = value {
            field(name, value);
        }
    }
    field("uid", &w.uid.to_string());
    if let Some(pod) = w.pod.as_deref() {
        for (name, value) in [("namespace", &pod.namespace), ("pod", &pod.name)] {
            if !value.is_empty() {
                field(name, value);
            }
        }
        for (name, value) in [("service_account", &pod.service_account), ("container", &pod.container)] {
            if let Some(value) = value {
                field(name, value);
            }
        }
        let labels: BTreeMap<&str, &str> = pod.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        for (k, v) in labels {
            field("label", &format!("{k}={v}"));
        }
    }
    out
}

/// The report: each rule and system prompt, whether it applies and why.
pub fn report(policy: &Policy, workload: &Workload, provider: Option<Provider>, host: Option<&str>) -> String {
    let w = WorkloadRef::of(workload);
    let coverage = policy.coverage(Some(&w), provider, host);
    let mut out = String::new();
    let _ = writeln!(out, "workload: {}", describe(workload));
    let _ = writeln!(out, "policy:   {}", policy.origin());
    if provider.is_some() || host.is_some() {
        let _ = writeln!(
            out,
            "exchange: provider {}, host {}",
            provider.map_or("any", Provider::as_str),
            host.unwrap_or("any")
        );
    }
    for (kind, title) in [(EntryKind::Rule, "rules"), (EntryKind::SystemPrompt, "system prompts")] {
        let entries: Vec<&Coverage> = coverage.iter().filter(|c| c.kind == kind).collect();
        let _ = writeln!(out, "\n{title}:");
        if entries.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
        for c in entries {
            let _ = writeln!(out, "  {}", entry_line(c, provider, host));
        }
    }
    let count = |kind| {
        let all = coverage.iter().filter(|c| c.kind == kind);
        (all.clone().filter(|c| c.applies).count(), all.count())
    };
    let (rules, all_rules) = count(EntryKind::Rule);
    let (prompts, all_prompts) = count(EntryKind::SystemPrompt);
    let _ = writeln!(out, "\n{rules} of {all_rules} rules and {prompts} of {all_prompts} system prompts apply");
    out
}

fn entry_line(c: &Coverage, provider: Option<Provider>, host: Option<&str>) -> String {
    let mark = if c.applies { "applies " } else { "-       " };
    let mut line = format!("{mark} {}", c.id);
    if let Some(action) = c.action {
        let _ = write!(line, " ({})", action.as_str());
    }
    let workload_part = if c.workloads.is_empty() {
        "every workload".to_owned()
    } else if c.matched.is_empty() {
        format!("workload matches none of {}", c.workloads.join(", "))
    } else {
        format!("workload matches {}", c.matched.join(", "))
    };
    let _ = write!(line, ": {workload_part}");
    let workload_ok = c.workloads.is_empty() || !c.matched.is_empty();
    if workload_ok && !c.applies {
        let _ = write!(
            line,
            ", but not on {}",
            match (provider, host) {
                (Some(p), Some(h)) => format!("provider {} at host {h}", p.as_str()),
                (Some(p), None) => format!("provider {}", p.as_str()),
                (None, Some(h)) => format!("host {h}"),
                (None, None) => "this exchange".to_owned(),
            }
        );
    }
    if !c.conditions.is_empty() {
        let _ = write!(line, "; only {}", c.conditions.join("; "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(spec: &str) -> Result<Workload, CheckPolicyError> {
        let mut w = Workload::default();
        parse_workload(spec, &mut w, &mut Vec::new()).map(|()| w)
    }

    #[test]
    fn a_workload_is_read_from_field_value_pairs() {
        let w = parsed("comm=claude,thread=HTTP Client,exe=/usr/bin/node,uid=1000,cgroup=/kubepods.slice/a,namespace=team-a,pod=pay-1,service_account=pay,label=app=billing,label=tier=web,container=agent").unwrap();
        assert_eq!(
            (w.comm.as_str(), w.thread.as_str(), w.exe.as_deref(), w.uid),
            ("claude", "HTTP Client", Some("/usr/bin/node"), 1000)
        );
        assert_eq!(w.cgroup.as_deref(), Some("/kubepods.slice/a"));
        let pod = w.pod.as_deref().unwrap();
        assert_eq!((pod.namespace.as_str(), pod.name.as_str()), ("team-a", "pay-1"));
        assert_eq!((pod.service_account.as_deref(), pod.container.as_deref()), (Some("pay"), Some("agent")));
        assert_eq!(pod.labels.get("app").map(String::as_str), Some("billing"));
        assert_eq!(pod.labels.get("tier").map(String::as_str), Some("web"));
        // A comma not followed by `field=` belongs to the value.
        let w = parsed("exe=/opt/a,b/agent,uid=5").unwrap();
        assert_eq!((w.exe.as_deref(), w.uid), (Some("/opt/a,b/agent"), 5));
        assert!(w.pod.is_none(), "no pod field, no pod");
        // Arguments add up: a --pid's process, then its pod.
        let mut w = Workload { comm: "python3".into(), ..Default::default() };
        parse_workload("namespace=ml", &mut w, &mut Vec::new()).unwrap();
        parse_workload("label=team=x", &mut w, &mut Vec::new()).unwrap();
        assert_eq!(
            (w.comm.as_str(), w.pod.as_deref().map(|p| (p.namespace.as_str(), p.labels.len()))),
            ("python3", Some(("ml", 1)))
        );
    }

    #[test]
    fn bad_workloads_are_refused_with_the_reason() {
        let reason = |spec: &str| parsed(spec).expect_err(spec).to_string();
        assert!(reason("comm=x,nmespace=y").contains("unknown field `nmespace`"), "{}", reason("comm=x,nmespace=y"));
        assert!(reason("label=app=x,tier=web").contains("label=key=value"));
        assert!(reason("uid=root").contains("not a number"));
        assert!(reason("cgroup=kubepods").contains("starting with `/`"));
        assert!(reason("label=app").contains("not key=value"));
        assert!(reason("comm=").contains("no value"));
        assert!(reason("claude").contains("not field=value"));
        assert!(reason("").contains("empty"));
        let mut notes = Vec::new();
        parse_workload("comm=a-very-long-agent-name", &mut Workload::default(), &mut notes).unwrap();
        assert!(notes[0].contains("a-very-long-age"), "{notes:?}");
    }

    #[test]
    fn this_process_can_be_described_by_its_pid() {
        let mut notes = Vec::new();
        let w = workload_of_pid(&Procfs::default(), std::process::id(), &mut notes).unwrap();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(w.comm, comm.trim_end());
        assert_eq!(w.exe.as_deref(), std::env::current_exe().unwrap().to_str());
        assert!(w.cgroup.as_deref().is_some_and(|c| c.starts_with('/')));
        assert!(notes.is_empty(), "{notes:?}");
        assert!(matches!(
            workload_of_pid(&Procfs::at("/nonexistent"), 1, &mut notes),
            Err(CheckPolicyError::NoProcess { pid: 1 })
        ));
    }

    #[test]
    fn the_report_says_which_entries_apply_and_why() {
        let policy = Policy::from_toml(
            r#"
            [[rules]]
            id = "everyone"
            detectors = ["private_key"]
            action = "block"

            [[rules]]
            id = "billing-cards"
            detectors = ["credit_card"]
            action = "redact"
            scope.workloads = ["label:app=billing"]
            scope.providers = ["anthropic"]

            [[rules]]
            id = "python-only"
            detectors = ["email"]
            action = "alert"
            scope.workloads = ["comm:python*", "exe:python3*"]

            [[system_prompts]]
            id = "team-a"
            instruction = "Be brief."
            scope.workloads = ["namespace:team-a"]
            "#,
            "policy.toml",
        )
        .unwrap();
        let w = parsed("comm=claude,exe=/usr/bin/node,uid=1000,namespace=team-a,label=app=billing").unwrap();
        let text = report(&policy, &w, None, None);
        assert!(
            text.contains("workload: comm=claude exe=/usr/bin/node uid=1000 namespace=team-a label=app=billing"),
            "{text}"
        );
        assert!(text.contains("applies  everyone (block): every workload\n"), "{text}");
        assert!(
            text.contains(
                "applies  billing-cards (redact): workload matches label:app=billing; only providers: anthropic\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("-        python-only (alert): workload matches none of comm:python*, exe:python3*\n"),
            "{text}"
        );
        assert!(text.contains("applies  team-a: workload matches namespace:team-a\n"), "{text}");
        assert!(text.contains("2 of 3 rules and 1 of 1 system prompts apply"), "{text}");
        let text = report(&policy, &w, Some(Provider::OpenAiChat), None);
        assert!(
            text.contains(
                "-        billing-cards (redact): workload matches label:app=billing, but not on provider openai_chat"
            ),
            "{text}"
        );
        assert!(text.contains("1 of 3 rules"), "{text}");
    }
}
