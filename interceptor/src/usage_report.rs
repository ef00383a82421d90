//! `interceptor usage`: the tokens used over a period, per workload, model
//! or provider, summed from the `usage` of the audit file's events (see
//! `guardrails::usage`). It reads the file and prints; it never writes.
//!
//! Workloads are named by the same key as the token counters
//! (`k8s:namespace/service-account`, `exe:/path`, `comm:name`, else
//! `unknown`). Lines that are not audit events (a torn last line, another
//! program's output) are skipped and counted.

use std::{
    collections::BTreeMap,
    io::BufRead,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::audit::UsageInfo;

#[derive(Debug, thiserror::Error)]
pub enum UsageReportError {
    #[error("no audit file: set guardrails.audit_file in the configuration, or pass --audit-file")]
    NoAuditFile,
    #[error("cannot read the audit file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad duration {text:?} (for example 30m, 24h, 7d)")]
    Duration {
        text: String,
        #[source]
        source: humantime_serde::re::humantime::DurationError,
    },
    #[error("unknown grouping {0:?}: workload, model or provider")]
    GroupBy(String),
}

/// What the totals are kept per.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Workload,
    Model,
    Provider,
}

impl GroupBy {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Workload => "workload",
            GroupBy::Model => "model",
            GroupBy::Provider => "provider",
        }
    }
}

impl FromStr for GroupBy {
    type Err = UsageReportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "workload" => Ok(GroupBy::Workload),
            "model" => Ok(GroupBy::Model),
            "provider" => Ok(GroupBy::Provider),
            other => Err(UsageReportError::GroupBy(other.to_owned())),
        }
    }
}

/// A period given as a duration before now (`24h`, `7d`, `90m`).
pub fn parse_since(text: &str) -> Result<Duration, UsageReportError> {
    humantime_serde::re::humantime::parse_duration(text)
        .map_err(|source| UsageReportError::Duration { text: text.to_owned(), source })
}

/// The tokens of one group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Answers with usage.
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Of `requests`, those whose usage was estimated from streamed text.
    pub estimated_requests: u64,
}

impl Totals {
    fn add(&mut self, usage: &UsageInfo) {
        self.requests += 1;
        self.input_tokens = self.input_tokens.saturating_add(usage.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(usage.output_tokens);
        self.estimated_requests += u64::from(usage.estimated);
    }
}

/// The usage of a period.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// RFC 3339.
    pub since: String,
    pub by: GroupBy,
    /// Per group, sorted by name.
    pub groups: BTreeMap<String, Totals>,
    pub total: Totals,
    /// Lines that are not audit events.
    pub skipped_lines: u64,
}

/// The fields of an audit event the report reads.
#[derive(Deserialize)]
struct Event {
    time: String,
    provider: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    workload: EventWorkload,
    #[serde(default)]
    usage: Option<UsageInfo>,
}

#[derive(Default, Deserialize)]
struct EventWorkload {
    #[serde(default)]
    comm: Option<String>,
    #[serde(default)]
    exe: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    service_account: Option<String>,
}

impl EventWorkload {
    /// The key the token counters use for this workload.
    fn key(&self) -> String {
        if let Some(namespace) = &self.namespace {
            let account = self.service_account.as_deref().unwrap_or("default");
            return format!("k8s:{namespace}/{account}");
        }
        match (&self.exe, &self.comm) {
            (Some(exe), _) => format!("exe:{exe}"),
            (None, Some(comm)) if !comm.is_empty() => format!("comm:{comm}"),
            _ => "unknown".to_owned(),
        }
    }
}

/// Sums the usage of the audit events in `lines` at or after `since`.
pub fn summarize(lines: impl BufRead, since: OffsetDateTime, by: GroupBy) -> std::io::Result<Report> {
    let mut report = Report {
        since: since.format(&Rfc3339).unwrap_or_default(),
        by,
        groups: BTreeMap::new(),
        total: Totals::default(),
        skipped_lines: 0,
    };
    for line in lines.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let Some((event, time)) = serde_json::from_str::<Event>(&line)
            .ok()
            .and_then(|e| OffsetDateTime::parse(&e.time, &Rfc3339).ok().map(|t| (e, t)))
        else {
            report.skipped_lines += 1;
            continue;
        };
        let Some(usage) = event.usage.as_ref().filter(|_| time >= since) else { continue };
        let group = match by {
            GroupBy::Workload => event.workload.key(),
            GroupBy::Model => event.model.clone().unwrap_or_else(|| "unknown".to_owned()),
            GroupBy::Provider => event.provider.clone(),
        };
        report.groups.entry(group).or_default().add(usage);
        report.total.add(usage);
    }
    Ok(report)
}

/// Reads the audit file at `path` (see [`summarize`]).
pub fn report(path: &Path, since: OffsetDateTime, by: GroupBy) -> Result<Report, UsageReportError> {
    let read = |source| UsageReportError::Read { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read)?;
    summarize(std::io::BufReader::new(file), since, by).map_err(read)
}

impl Report {
    /// A table, one line per group and a total.
    pub fn text(&self) -> String {
        let header = [self.by.as_str().to_uppercase(), "REQUESTS".into(), "INPUT".into(), "OUTPUT".into()];
        let mut rows: Vec<[String; 4]> = vec![header];
        let row = |name: &str, t: &Totals| {
            let output = if t.estimated_requests > 0 {
                format!("{} ({} estimated)", t.output_tokens, t.estimated_requests)
            } else {
                t.output_tokens.to_string()
            };
            [name.to_owned(), t.requests.to_string(), t.input_tokens.to_string(), output]
        };
        rows.extend(self.groups.iter().map(|(name, t)| row(name, t)));
        rows.push(row("total", &self.total));
        let widths: Vec<usize> = (0..4).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
        let mut out = format!("usage since {}\n", self.since);
        for r in &rows {
            let line = format!(
                "{:<w0$}  {:>w1$}  {:>w2$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = concat!(
        r#"{"time":"2026-12-05T10:00:00Z","event":"guardrail_decision","direction":"request","provider":"openai_chat","model":"gpt-4o","workload":{"pid":1,"comm":"agent"}}"#,
        "\n",
        r#"{"time":"2026-12-05T10:00:01.5Z","event":"guardrail_decision","direction":"response","provider":"openai_chat","model":"gpt-4o","workload":{"pid":1,"comm":"agent"},"usage":{"input_tokens":10,"output_tokens":5,"estimated":false}}"#,
        "\n",
        r#"{"time":"2026-12-05T11:00:00Z","provider":"anthropic","model":"claude","workload":{"pid":2,"comm":"node","namespace":"team-a","service_account":"coder"},"usage":{"input_tokens":7,"output_tokens":3,"estimated":false}}"#,
        "\n",
        r#"{"time":"2026-12-05T12:00:00Z","provider":"openai_chat","model":"gpt-4o","workload":{"pid":3,"comm":"python3","exe":"/usr/bin/python3"},"usage":{"input_tokens":0,"output_tokens":4,"estimated":true}}"#,
        "\n",
        r#"{"time":"2026-12-04T12:00:00Z","provider":"openai_chat","model":"gpt-4o","workload":{"pid":1,"comm":"agent"},"usage":{"input_tokens":1000,"output_tokens":1000,"estimated":false}}"#,
        "\n",
        "not json\n",
        r#"{"time":"yesterday","provider":"x","usage":{"input_tokens":1,"output_tokens":1,"estimated":false}}"#,
        "\n",
        "\n",
        r#"{"time":"2026-12-05T12:00:01Z","provider":"gemini","workload":{"pid":null,"comm":null},"usage":{"input_tokens":2,"output_tokens"#,
    );

    fn since() -> OffsetDateTime {
        OffsetDateTime::parse("2026-12-05T00:00:00Z", &Rfc3339).unwrap()
    }

    #[test]
    fn sums_the_period_per_workload_and_counts_what_it_skips() {
        let report = summarize(LOG.as_bytes(), since(), GroupBy::Workload).unwrap();
        let names: Vec<&str> = report.groups.keys().map(String::as_str).collect();
        assert_eq!(names, ["comm:agent", "exe:/usr/bin/python3", "k8s:team-a/coder"]);
        assert_eq!(
            report.groups["comm:agent"],
            Totals { requests: 1, input_tokens: 10, output_tokens: 5, estimated_requests: 0 }
        );
        assert_eq!(report.total, Totals { requests: 3, input_tokens: 17, output_tokens: 12, estimated_requests: 1 });
        // "not json", the bad time and the torn last line.
        assert_eq!(report.skipped_lines, 3);
    }

    #[test]
    fn groups_by_model_or_provider() {
        let report = summarize(LOG.as_bytes(), since(), GroupBy::Model).unwrap();
        assert_eq!(report.groups["gpt-4o"].output_tokens, 9);
        assert_eq!(report.groups["claude"].input_tokens, 7);
        let report = summarize(LOG.as_bytes(), since(), GroupBy::Provider).unwrap();
        assert_eq!(report.groups.keys().collect::<Vec<_>>(), ["anthropic", "openai_chat"]);
    }

    #[test]
    fn prints_a_table_and_json() {
        let report = summarize(LOG.as_bytes(), since(), GroupBy::Provider).unwrap();
        let text = report.text();
        assert_eq!(
            text,
            "usage since 2026-12-05T00:00:00Z\n\
             PROVIDER     REQUESTS  INPUT  OUTPUT\n\
             anthropic           1      7  3\n\
             openai_chat         2     10  9 (1 estimated)\n\
             total               3     17  12 (1 estimated)\n"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["groups"]["openai_chat"]["input_tokens"], 10);
        assert_eq!(json["by"], "provider");
        assert_eq!(json["skipped_lines"], 3);
    }

    #[test]
    fn bad_input_is_named() {
        assert_eq!(parse_since("7d").unwrap(), Duration::from_secs(7 * 86400));
        let error = parse_since("soon").unwrap_err();
        assert!(error.to_string().contains("\"soon\""), "{error}");
        assert!("team".parse::<GroupBy>().unwrap_err().to_string().contains("workload, model or provider"));
        let missing = report(Path::new("/nonexistent/audit.jsonl"), since(), GroupBy::Workload).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/audit.jsonl"), "{missing}");
    }
}
