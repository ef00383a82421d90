//! wrk, the load generator of every throughput row: a Lua script POSTs the
//! request body and prints its own summary as one JSON line, which is parsed
//! here (microsecond percentiles, error counts).

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use interceptor::testing::{Cgroup, Netns, output_in, tool};

/// Marks wrk's summary line among its other output.
const MARK: &str = "WRK-SUMMARY ";

/// Bind-mounts `$1` over /etc/hosts in a private mount namespace, then execs
/// the rest: wrk takes SNI and the address from the URL's host name.
const BIND_HOSTS: &str = r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#;

/// What one wrk run measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    /// Socket-level errors: connect, read, write, timeout.
    pub errors: u64,
    /// Responses with a status of 400 or more.
    pub non_2xx: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl WrkResult {
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 { self.requests as f64 / self.seconds } else { 0.0 }
    }
}

/// The Lua script: POST of the file at `body`, JSON content type, and with
/// `close` a `Connection: close` header (a new TLS connection per request).
pub fn script(body: &Path, close: bool) -> String {
    let close = if close { "wrk.headers[\"Connection\"] = \"close\"\n" } else { "" };
    format!(
        r#"local f = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
{close}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{MARK}{{"requests":%d,"duration_us":%d,"errors":%d,"non_2xx":%d,"p50_us":%d,"p99_us":%d}}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"#,
        body = body.display()
    )
}

/// Parses the summary line the script prints.
pub fn parse(stdout: &str) -> Result<WrkResult> {
    let line = stdout.lines().find_map(|l| l.strip_prefix(MARK)).context("no summary line in wrk output")?;
    let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("parse {line}"))?;
    let n = |k: &str| v[k].as_f64().with_context(|| format!("{k} missing in {line}"));
    Ok(WrkResult {
        requests: n("requests")? as u64,
        seconds: n("duration_us")? / 1e6,
        errors: n("errors")? as u64,
        non_2xx: n("non_2xx")? as u64,
        p50_us: n("p50_us")?,
        p99_us: n("p99_us")?,
    })
}

/// Where and how wrk runs.
pub struct Load<'a> {
    pub netns: &'a Netns,
    pub cgroup: &'a Cgroup,
    pub hosts: &'a Path,
    /// CPU wrk is pinned to.
    pub cpu: usize,
    pub connections: usize,
}

impl Load<'_> {
    /// Runs wrk (one thread) against `url` for `duration` with `script`.
    pub fn run(&self, url: &str, script: &Path, duration: Duration) -> Result<WrkResult> {
        let mut cmd = Command::new(tool("unshare"));
        cmd.args(["--mount", "--propagation", "private", "--"])
            .arg(tool("sh"))
            .args(["-c", BIND_HOSTS, "sh"])
            .arg(self.hosts)
            .arg(tool("taskset"))
            .args(["-c", &self.cpu.to_string()])
            .arg(tool("wrk"))
            .args(["-t1", &format!("-c{}", self.connections), &format!("-d{}s", duration.as_secs())])
            .args(["--timeout", "5s", "-s"])
            .arg(script)
            .arg(url);
        let out = output_in(&mut cmd, Some(self.netns), Some(self.cgroup), duration + Duration::from_secs(20))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("wrk failed ({}): {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        parse(&stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_summary_line() {
        let out = "Running 5s test @ https://api.openai.com/\n  1 threads and 16 connections\n\
                   WRK-SUMMARY {\"requests\":5000,\"duration_us\":5000000,\"errors\":2,\"non_2xx\":7,\"p50_us\":800,\"p99_us\":2500}\n";
        let r = parse(out).expect("parse");
        assert_eq!((r.requests, r.errors, r.non_2xx), (5000, 2, 7));
        assert!((r.rps() - 1000.0).abs() < 1e-9);
        assert_eq!((r.p50_us, r.p99_us), (800.0, 2500.0));
        assert!(parse("Running 5s test\n").is_err());
    }

    #[test]
    fn script_posts_the_body_and_can_close() {
        let s = script(Path::new("/tmp/b.json"), true);
        assert!(s.contains("wrk.method = \"POST\"") && s.contains("/tmp/b.json") && s.contains("\"close\""));
        assert!(!script(Path::new("/tmp/b.json"), false).contains("Connection"));
    }
}
