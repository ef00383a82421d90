//! The Akto app name as a template (`guardrails.akto.app_name`): literal
//! text and placeholders filled from the connection's [`Workload`], so each
//! workload's traffic lands under its own app in the dashboard.
//!
//! ```text
//! {namespace|host}/{pod_label:app|none}   →  team-a/billing, or host/none
//! ```
//!
//! Placeholders: `{namespace}`, `{pod}`, `{pod_label:KEY}`,
//! `{service_account}`, `{container}` (the pod's, as its status names it),
//! `{pod_uid}` (also known from the cgroup path alone), `{comm}` (process
//! name), `{exe}` (executable path), `{uid}` (the process's Unix user id).
//! `{x|default}` renders `default` where `x` is unknown or empty; without a
//! default an unknown value renders as nothing. `{{` and `}}` are literal
//! braces. A name without placeholders is a literal, as the `APP_NAME`
//! environment variable always is ([`escape`]).
//!
//! Parsed once when the configuration is validated; rendering is a walk over
//! the parsed parts (no I/O). Normalizing the result the way Akto stores app
//! names is the Akto client's business, not this module's.

use std::fmt;

use crate::workload::{Workload, kube_identity};

/// The placeholders, as written between braces (for error messages).
const KNOWN: &str = "namespace, pod, pod_label:KEY, service_account, container, comm, exe, uid, pod_uid";

/// A template that does not parse; `at` is the byte offset in the template.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppNameError {
    #[error("unclosed brace at byte {at}: write `{{{{` for a literal brace")]
    Unclosed { at: usize },
    #[error("unmatched `}}` at byte {at}: write `}}}}` for a literal brace")]
    Unmatched { at: usize },
    #[error("unknown placeholder `{{{name}}}` at byte {at} (known: {KNOWN})")]
    Unknown { name: String, at: usize },
    #[error("`{{pod_label}}` at byte {at} needs a label key: `{{pod_label:KEY}}`")]
    MissingKey { at: usize },
    #[error("placeholder `{{{name}}}` at byte {at} takes no `:` argument")]
    UnexpectedArgument { name: String, at: usize },
    #[error("`{{` inside a placeholder at byte {at}")]
    Nested { at: usize },
}

/// What a placeholder stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Field {
    Namespace,
    Pod,
    PodLabel(String),
    ServiceAccount,
    Container,
    Comm,
    Exe,
    Uid,
    PodUid,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field { field: Field, default: Option<String> },
}

/// A parsed app-name template; see the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppName {
    parts: Vec<Part>,
}

impl AppName {
    /// Parses `template`, naming the first problem.
    pub fn parse(template: &str) -> Result<Self, AppNameError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = template.char_indices().peekable();
        while let Some((at, c)) = rest.next() {
            match c {
                '{' if rest.peek().is_some_and(|&(_, n)| n == '{') => {
                    rest.next();
                    text.push('{');
                }
                '}' if rest.peek().is_some_and(|&(_, n)| n == '}') => {
                    rest.next();
                    text.push('}');
                }
                '}' => return Err(AppNameError::Unmatched { at }),
                '{' => {
                    let mut inner = String::new();
                    let mut closed = false;
                    for (i, c) in rest.by_ref() {
                        match c {
                            '}' => {
                                closed = true;
                                break;
                            }
                            '{' => return Err(AppNameError::Nested { at: i }),
                            c => inner.push(c),
                        }
                    }
                    if !closed {
                        return Err(AppNameError::Unclosed { at });
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(placeholder(&inner, at)?);
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self { parts })
    }

    /// Whether the template has no placeholders (it renders the same for
    /// every workload).
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The name for a connection of `workload` (`None`: unknown workload,
    /// every placeholder takes its default).
    pub fn render(&self, workload: Option<&Workload>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field { field, default } => {
                    match workload.and_then(|w| value(field, w)).filter(|v| !v.is_empty()) {
                        Some(v) => out.push_str(&v),
                        None => out.push_str(default.as_deref().unwrap_or_default()),
                    }
                }
            }
        }
        out
    }
}

impl fmt::Display for AppName {
    /// The template, written back in its canonical form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(t) => f.write_str(&escape(t))?,
                Part::Field { field, default } => {
                    f.write_str("{")?;
                    match field {
                        Field::PodLabel(key) => write!(f, "pod_label:{key}")?,
                        other => f.write_str(name_of(other))?,
                    }
                    if let Some(d) = default {
                        write!(f, "|{d}")?;
                    }
                    f.write_str("}")?;
                }
            }
        }
        Ok(())
    }
}

/// `text` as a template that renders to exactly `text`: braces doubled. The
/// `APP_NAME` environment variable goes through this, so its braces are never
/// placeholders.
pub fn escape(text: &str) -> String {
    text.replace('{', "{{").replace('}', "}}")
}

fn name_of(field: &Field) -> &'static str {
    match field {
        Field::Namespace => "namespace",
        Field::Pod => "pod",
        Field::PodLabel(_) => "pod_label",
        Field::ServiceAccount => "service_account",
        Field::Container => "container",
        Field::Comm => "comm",
        Field::Exe => "exe",
        Field::Uid => "uid",
        Field::PodUid => "pod_uid",
    }
}

/// `name[:arg][|default]`, the text between the braces at `at`.
fn placeholder(inner: &str, at: usize) -> Result<Part, AppNameError> {
    let (spec, default) = match inner.split_once('|') {
        Some((spec, default)) => (spec, Some(default.to_owned())),
        None => (inner, None),
    };
    let (name, arg) = match spec.split_once(':') {
        Some((name, arg)) => (name, Some(arg)),
        None => (spec, None),
    };
    let field = match name {
        "pod_label" => match arg {
            Some(key) if !key.is_empty() => Field::PodLabel(key.to_owned()),
            _ => return Err(AppNameError::MissingKey { at }),
        },
        "namespace" => Field::Namespace,
        "pod" => Field::Pod,
        "service_account" => Field::ServiceAccount,
        "container" => Field::Container,
        "comm" => Field::Comm,
        "exe" => Field::Exe,
        "uid" => Field::Uid,
        "pod_uid" => Field::PodUid,
        _ => return Err(AppNameError::Unknown { name: spec.to_owned(), at }),
    };
    if arg.is_some() && !matches!(field, Field::PodLabel(_)) {
        return Err(AppNameError::UnexpectedArgument { name: spec.to_owned(), at });
    }
    Ok(Part::Field { field, default })
}

fn value(field: &Field, w: &Workload) -> Option<String> {
    let pod = w.pod.as_deref();
    match field {
        Field::Namespace => pod.map(|p| p.namespace.clone()),
        Field::Pod => pod.map(|p| p.name.clone()),
        Field::PodLabel(key) => pod.and_then(|p| p.labels.get(key).cloned()),
        Field::ServiceAccount => pod.and_then(|p| p.service_account.clone()),
        Field::Container => pod.and_then(|p| p.container.clone()),
        Field::Comm => Some(w.comm.clone()),
        Field::Exe => w.exe.as_deref().map(str::to_owned),
        Field::Uid => Some(w.uid.to_string()),
        Field::PodUid => pod
            .map(|p| p.uid.clone())
            .filter(|u| !u.is_empty())
            .or_else(|| w.cgroup.as_deref().and_then(kube_identity).map(|k| k.pod_uid)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::workload::PodInfo;

    fn billing() -> Workload {
        Workload {
            pid: 42,
            uid: 1000,
            comm: "python3".into(),
            exe: Some("/usr/bin/python3.12".into()),
            cgroup: Some("/kubepods.slice/kubepods-pod1f2e3d4c_5b6a_7980_a1b2_c3d4e5f60718.slice".into()),
            pod: Some(Arc::new(PodInfo {
                uid: "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718".into(),
                name: "billing-0".into(),
                namespace: "team-a".into(),
                labels: [("app".to_owned(), "billing".to_owned()), ("tier".to_owned(), "".to_owned())].into(),
                service_account: Some("billing-sa".into()),
                container: Some("agent".into()),
            })),
            ..Workload::default()
        }
    }

    #[test]
    fn placeholders_render_from_the_workload() {
        let w = billing();
        let t = AppName::parse(
            "{namespace}/{pod}/{pod_label:app}/{service_account}/{container}/{comm}/{exe}/{uid}/{pod_uid}",
        )
        .unwrap();
        assert!(!t.is_literal());
        assert_eq!(
            t.render(Some(&w)),
            "team-a/billing-0/billing/billing-sa/agent/python3//usr/bin/python3.12/1000/\
             1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718"
        );
    }

    #[test]
    fn defaults_fill_what_is_unknown_or_empty() {
        let t = AppName::parse("{namespace|host}/{pod_label:app|none}").unwrap();
        assert_eq!(t.render(Some(&billing())), "team-a/billing");
        let plain = Workload { comm: "curl".into(), ..Workload::default() };
        assert_eq!(t.render(Some(&plain)), "host/none");
        assert_eq!(t.render(None), "host/none");
        // An empty label value is unknown too; a missing default renders nothing.
        assert_eq!(AppName::parse("{pod_label:tier|-}").unwrap().render(Some(&billing())), "-");
        assert_eq!(AppName::parse("a{namespace}b").unwrap().render(None), "ab");
        assert_eq!(AppName::parse("{pod|}").unwrap().render(None), "");
        // Label keys may hold `/` and `.`, defaults anything but braces.
        let t = AppName::parse("{pod_label:app.kubernetes.io/name|x:y/z}").unwrap();
        assert_eq!(t.render(None), "x:y/z");
    }

    #[test]
    fn the_pod_uid_is_known_from_the_cgroup_path_alone() {
        let mut w = billing();
        w.pod = None;
        let t = AppName::parse("{pod_uid|none}-{namespace|none}").unwrap();
        assert_eq!(t.render(Some(&w)), "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718-none");
    }

    #[test]
    fn literals_and_escaped_braces() {
        let t = AppName::parse("My Agent_1").unwrap();
        assert!(t.is_literal());
        assert_eq!(t.render(Some(&billing())), "My Agent_1");
        assert_eq!(AppName::parse("a{{b}}c").unwrap().render(None), "a{b}c");
        assert!(AppName::parse("").unwrap().is_literal());
        // APP_NAME's braces stay text.
        for literal in ["{namespace}", "x{", "}y", "{{", "{a|b}"] {
            let t = AppName::parse(&escape(literal)).unwrap();
            assert!(t.is_literal(), "{literal}");
            assert_eq!(t.render(Some(&billing())), literal);
        }
    }

    #[test]
    fn bad_templates_say_what_and_where() {
        let err = |t: &str| AppName::parse(t).unwrap_err();
        assert_eq!(err("ns-{namespace"), AppNameError::Unclosed { at: 3 });
        assert_eq!(err("a}b"), AppNameError::Unmatched { at: 1 });
        assert_eq!(err("{nmespace}"), AppNameError::Unknown { name: "nmespace".into(), at: 0 });
        assert_eq!(err("x{}"), AppNameError::Unknown { name: "".into(), at: 1 });
        assert_eq!(err("{pod_label}"), AppNameError::MissingKey { at: 0 });
        assert_eq!(err("{pod_label:|x}"), AppNameError::MissingKey { at: 0 });
        assert_eq!(err("{pod:x}"), AppNameError::UnexpectedArgument { name: "pod:x".into(), at: 0 });
        assert_eq!(err("{pod{x}}"), AppNameError::Nested { at: 4 });
        let message = err("{team}").to_string();
        assert!(message.contains("unknown placeholder `{team}`") && message.contains("pod_label:KEY"), "{message}");
        assert!(err("{ns").to_string().contains("unclosed brace at byte 0"), "{}", err("{ns"));
    }

    #[test]
    fn display_writes_the_template_back() {
        for t in ["{namespace|host}/{pod_label:app|none}", "a{{b}}c{comm}", "plain"] {
            let parsed = AppName::parse(t).unwrap();
            assert_eq!(parsed.to_string(), t);
            assert_eq!(AppName::parse(&parsed.to_string()).unwrap(), parsed);
        }
    }
}
