//! The benchmark's tables: figures, and each figure as a ratio to the
//! direct connection, to mitmproxy and to nginx measured in the same run.

use std::fmt::Write;

use super::wrk::WrkResult;

/// One throughput row.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub wrk: WrkResult,
    /// CPU seconds the proxy under test used during the run (None: no proxy).
    pub proxy_cpu_s: Option<f64>,
    /// CPUs' worth of time used by processes outside the benchmark meanwhile.
    pub other_cpu: Option<f64>,
}

impl Row {
    /// Proxy CPU time per request, in microseconds.
    pub fn cpu_us_per_request(&self) -> Option<f64> {
        let cpu = self.proxy_cpu_s?;
        (self.wrk.requests > 0).then(|| cpu * 1e6 / self.wrk.requests as f64)
    }
}

/// `a / b` as "0.85x", or "-" when either side is missing or zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn find<'a>(rows: &'a [Row], name: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.name == name)
}

/// The throughput table. `direct`, `mitm` and `nginx` name the reference
/// rows (keep-alive or new-connection ones, matching the rows listed).
pub fn throughput_table(rows: &[Row], direct: &str, mitm: &str, nginx: &str) -> String {
    let (d, m, n) = (find(rows, direct), find(rows, mitm), find(rows, nginx));
    let rps = |r: Option<&Row>| r.map(|r| r.wrk.rps());
    let p50 = |r: Option<&Row>| r.map(|r| r.wrk.p50_us);
    let p99 = |r: Option<&Row>| r.map(|r| r.wrk.p99_us);
    let cpu = |r: Option<&Row>| r.and_then(Row::cpu_us_per_request);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40}{:>9}{:>8}{:>8}{:>9}{:>8} | {:>21} | {:>21} | {:>21} | {:>13}",
        "row",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU us",
        "errors",
        "req/s vs d / m / n",
        "p50 vs d / m / n",
        "p99 vs d / m / n",
        "CPU vs m / n"
    );
    for r in rows {
        let me = Some(r);
        let three = |f: &dyn Fn(Option<&Row>) -> Option<f64>| {
            format!("{} {} {}", ratio(f(me), f(d)), ratio(f(me), f(m)), ratio(f(me), f(n)))
        };
        let _ = writeln!(
            out,
            "{:<40}{:>9.0}{:>8.3}{:>8.3}{:>9}{:>8}{:>7} | {:>21} | {:>21} | {:>21} | {:>13}",
            r.name,
            r.wrk.rps(),
            r.wrk.p50_us / 1e3,
            r.wrk.p99_us / 1e3,
            cpu(me).map_or("-".into(), |c| format!("{c:.1}")),
            r.wrk.errors + r.wrk.non_2xx,
            r.other_cpu.map_or("-".into(), |o| format!("{:.0}%", o * 100.0)),
            three(&rps),
            three(&p50),
            three(&p99),
            format!("{} {}", ratio(cpu(me), cpu(m)), ratio(cpu(me), cpu(n))),
        );
    }
    out
}

/// One target of the product and whether this run met it.
pub struct Target {
    pub what: String,
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

pub fn targets_table(targets: &[Target]) -> String {
    let mut out = String::new();
    for t in targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        let _ = writeln!(out, "  {:<7}{:<52}{:<20}{}", verdict, t.what, t.goal, t.measured);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, requests: u64, p50: f64, cpu: Option<f64>) -> Row {
        Row {
            name: name.into(),
            wrk: WrkResult { requests, seconds: 1.0, errors: 0, non_2xx: 0, p50_us: p50, p99_us: p50 * 2.0 },
            proxy_cpu_s: cpu,
            other_cpu: None,
        }
    }

    #[test]
    fn ratios_against_each_reference() {
        let rows = [
            row("direct", 1000, 500.0, None),
            row("proxy", 800, 600.0, Some(0.032)),
            row("mitm", 100, 5000.0, Some(0.5)),
            row("nginx", 900, 550.0, Some(0.027)),
        ];
        assert_eq!(rows[1].cpu_us_per_request(), Some(40.0));
        let table = throughput_table(&rows, "direct", "mitm", "nginx");
        let proxy = table.lines().find(|l| l.starts_with("proxy")).expect("proxy line");
        // req/s: 800/1000, 800/100, 800/900; CPU: 40/5000, 40/30.
        assert!(proxy.contains("0.80x 8.00x 0.89x"), "{proxy}");
        assert!(proxy.contains("0.01x 1.33x"), "{proxy}");
        let direct = table.lines().find(|l| l.starts_with("direct")).expect("direct line");
        assert!(direct.trim_end().ends_with("- -"), "{direct}");
    }

    #[test]
    fn ratio_needs_both_sides() {
        assert_eq!(ratio(Some(1.0), None), "-");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "-");
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50x");
    }
}
