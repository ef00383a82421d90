//! `cargo xtask bench`: the interceptor against a direct connection, nginx
//! and mitmproxy, in one network namespace, with one load generator (wrk)
//! and the same TLS settings for every row.
//!
//! The namespace holds the fake provider (nginx on 198.18.0.10:443 for
//! `api.openai.com` and `static.example.com`; the in-process fake provider
//! on 198.18.0.11:443 for paced streams), and cgroups for the provider, the
//! proxy under test, the peers, the clients, and an `outside` cgroup the
//! eBPF programs are not attached to. Only one proxy runs at a time.
//!
//! This crate holds the benchmark's harness, its `bench` binary, and the
//! `demo` binary (`cargo xtask demo`); neither is part of the test library.

pub mod cleanup;
pub mod inprocess;
pub mod pki;
pub mod probe;
pub mod procstat;
pub mod report;
pub mod servers;
pub mod wrk;

use std::{
    io::{BufRead, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use interceptor::testing::{
    Cgroup, Interceptor, Netns,
    clients::{HostsFile, ScratchDir},
    in_netns, interceptor_bin, output_in,
    provider::FakeProvider,
    spawn_in, tool,
};
use interceptor_tests::stage::start_interceptor;

use self::{
    probe::{ConnectResult, IdleResult, LatencyParams, LatencyResult},
    report::{Measured, Row, rows as names},
    servers::{Mitmproxy, Nginx},
    wrk::Load,
};

const PROVIDER: &str = "198.18.0.10";
const PACED: &str = "198.18.0.11";
const NON_TARGET: &str = "198.18.0.12";
const NGINX_PEER_PORT: u16 = 15444;
const MITM_PEER_PORT: u16 = 15445;
/// Where the nginx peer relays the paced streams (to [`PACED`]).
const NGINX_STREAM_PORT: u16 = 15446;
/// The load generator runs here; the proxy under test on the other CPU.
const LOAD_CPU: usize = 0;
/// Requests a latency probe makes before it starts counting.
const WARMUP_REQUESTS: usize = 5;
const PROXY_CPU: usize = 1;

/// What to run, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub seconds: u64,
    pub connections: usize,
    pub idle_connections: usize,
    pub connect_iterations: usize,
    pub stream_requests: usize,
    /// wrk runs per row; the best one is kept.
    pub repeat: usize,
    /// Record a `perf` profile of the interceptor on the allowed path into
    /// this file (and a text report beside it); the two-worker and
    /// OpenTelemetry scenarios write theirs beside it.
    pub perf: Option<PathBuf>,
    /// The scenarios to run (`--only`); all of them when empty.
    pub only: Vec<Scenario>,
}

impl Options {
    /// Whether `scenario` runs.
    pub fn runs(&self, scenario: Scenario) -> bool {
        self.only.is_empty() || self.only.contains(&scenario)
    }
}

/// A part of the benchmark that `--only` can select. The direct rows (the
/// reference most figures divide by) always run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// The interceptor with guardrails off, one worker pinned.
    GuardrailsOff,
    /// The default guardrails, one worker pinned: allowed, blocked,
    /// passthrough, new connections, streams (monitor mode).
    Allowed,
    /// `connect()` to a non-target address with and without the programs.
    Connect,
    /// RSS with `--idle-connections` idle keep-alive TLS connections.
    Idle,
    /// The allowed path and guardrails off with 2 workers, unpinned.
    TwoWorkers,
    /// Streams with `stream_mode = "enforce"`.
    Enforce,
    /// The allowed path through the iptables redirect.
    Iptables,
    /// The nginx reverse proxy.
    Nginx,
    /// mitmproxy with the guard addon.
    Mitmproxy,
    /// The allowed path with OpenTelemetry export off, then on (spans and
    /// audit log records to a local OTLP/HTTP sink).
    Otlp,
}

impl Scenario {
    pub const ALL: [Scenario; 10] = [
        Scenario::GuardrailsOff,
        Scenario::Allowed,
        Scenario::Connect,
        Scenario::Idle,
        Scenario::TwoWorkers,
        Scenario::Enforce,
        Scenario::Iptables,
        Scenario::Nginx,
        Scenario::Mitmproxy,
        Scenario::Otlp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::GuardrailsOff => "guardrails-off",
            Scenario::Allowed => "allowed",
            Scenario::Connect => "connect",
            Scenario::Idle => "idle",
            Scenario::TwoWorkers => "two-workers",
            Scenario::Enforce => "enforce",
            Scenario::Iptables => "iptables",
            Scenario::Nginx => "nginx",
            Scenario::Mitmproxy => "mitmproxy",
            Scenario::Otlp => "otlp",
        }
    }

    /// A comma-separated list of scenario names.
    pub fn parse_list(list: &str) -> Result<Vec<Scenario>> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|name| {
                Scenario::ALL.into_iter().find(|s| s.name() == name).with_context(|| {
                    let names: Vec<_> = Scenario::ALL.iter().map(|s| s.name()).collect();
                    format!("unknown scenario {name:?} (one of {})", names.join(", "))
                })
            })
            .collect()
    }
}

/// Streamed and per-request latency rows.
struct LatencyRow {
    name: String,
    r: LatencyResult,
    /// CPU of the proxy per request, over the warm-up and measured requests.
    cpu_us: Option<f64>,
}

/// Everything the namespace needs, dropped (in reverse order) at the end.
struct Env {
    netns: Netns,
    root: Cgroup,
    provider_cg: Cgroup,
    proxy_cg: Cgroup,
    peer_cg: Cgroup,
    client_cg: Cgroup,
    outside_cg: Cgroup,
    scratch: ScratchDir,
    pki: pki::BenchPki,
    _hosts: HostsFile,
    hosts_path: PathBuf,
    bodies: Bodies,
}

struct Bodies {
    allowed: String,
    keepalive: PathBuf,
    blocked: PathBuf,
    close: PathBuf,
}

/// A ~2 KB chat-completion request. With `secret`, the user message also
/// carries a private key, which the default local policy blocks.
pub fn chat_body(secret: bool) -> String {
    let filler = "Summarise the quarterly report for the operations team. ".repeat(30);
    let content = if secret {
        format!(
            "{filler}\n-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n\
             KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQJAIJLixBy2qpFoS4DSmoEm\n-----END RSA PRIVATE KEY-----"
        )
    } else {
        filler
    };
    serde_json::json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content}
        ],
        "max_tokens": 256
    })
    .to_string()
}

impl Env {
    fn new() -> Result<Env> {
        let scratch = ScratchDir::new("bench")?;
        cleanup::dir(scratch.path());
        let netns = Netns::new("bench")?;
        cleanup::netns(netns.name());
        for ip in [PROVIDER, PACED, NON_TARGET] {
            netns.add_addr("lo", &format!("{ip}/32"))?;
        }
        let root = Cgroup::new("bench")?;
        cleanup::cgroup(root.path());
        let child = |name: &str| -> Result<Cgroup> {
            let cg = root.child(name)?;
            cleanup::cgroup(cg.path());
            Ok(cg)
        };
        let (provider_cg, proxy_cg, peer_cg, client_cg, outside_cg) =
            (child("provider")?, child("proxy")?, child("peer")?, child("client")?, child("outside")?);
        let ips: Vec<IpAddr> = vec![PROVIDER.parse()?, PACED.parse()?];
        let pki_dir = scratch.path().join("pki");
        std::fs::create_dir_all(&pki_dir)?;
        let pki = pki::BenchPki::mint(&pki_dir, &["api.openai.com", "static.example.com"], &ips)?;
        let hosts = HostsFile::new(&[(ips[0], "api.openai.com"), (ips[0], "static.example.com")])?;
        cleanup::dir(hosts.path().parent().context("hosts dir")?);
        let dir = scratch.path();
        let allowed = chat_body(false);
        for (name, body) in [("allowed.json", &allowed), ("blocked.json", &chat_body(true))] {
            std::fs::write(dir.join(name), body)?;
        }
        let script = |name: &str, body: &str, close: bool| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, wrk::script(&dir.join(body), close))?;
            Ok(path)
        };
        let bodies = Bodies {
            keepalive: script("keepalive.lua", "allowed.json", false)?,
            blocked: script("blocked.lua", "blocked.json", false)?,
            close: script("close.lua", "allowed.json", true)?,
            allowed,
        };
        Ok(Env {
            hosts_path: hosts.path(),
            netns,
            root,
            provider_cg,
            proxy_cg,
            peer_cg,
            client_cg,
            outside_cg,
            scratch,
            pki,
            _hosts: hosts,
            bodies,
        })
    }

    fn load(&self, connections: usize) -> Load<'_> {
        Load { netns: &self.netns, cgroup: &self.client_cg, hosts: &self.hosts_path, cpu: LOAD_CPU, connections }
    }

    fn flush_conntrack(&self) {
        // Exits non-zero on an empty table on some versions: nothing to check.
        let _ = self.netns.exec(&["conntrack", "-F"]);
    }

    /// iptables REDIRECT of the client cgroup's connections to `to`:443 to
    /// `port` (how the peers are reached); `add` false removes it.
    fn peer_redirect(&self, to: &str, port: u16, add: bool) -> Result<()> {
        let path = self.client_cg.relative_path();
        let op = if add { "-A" } else { "-D" };
        let port = port.to_string();
        self.netns.exec(&[
            "iptables",
            "-w",
            "-t",
            "nat",
            op,
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            to,
            "--dport",
            "443",
            "-m",
            "cgroup",
            "--path",
            &path,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ])?;
        self.flush_conntrack();
        Ok(())
    }

    /// Runs the probe `kind` (see [`probe`]) in `cgroup` and parses its line.
    fn probe<T: serde::de::DeserializeOwned>(
        &self,
        cgroup: &Cgroup,
        kind: &str,
        params: &impl serde::Serialize,
    ) -> Result<T> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["probe", kind, &serde_json::to_string(params)?]);
        let out = output_in(&mut cmd, Some(&self.netns), Some(cgroup), Duration::from_secs(120))?;
        if !out.status.success() {
            bail!("probe {kind} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("parse probe {kind} output"))
    }

    fn latency(
        &self,
        ca: &Path,
        addr: &str,
        path: &str,
        stream: bool,
        new_connection: bool,
        n: usize,
    ) -> Result<LatencyResult> {
        let mut body: serde_json::Value = serde_json::from_str(&self.bodies.allowed)?;
        if stream {
            body["stream"] = true.into();
        }
        // 20 words: the paced fake provider sends one event per word.
        let reply = (0..20).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        let params = LatencyParams {
            addr: SocketAddr::new(addr.parse()?, 443),
            sni: "api.openai.com".into(),
            ca: ca.to_owned(),
            path: path.into(),
            body: body.to_string(),
            headers: vec![("x-fake-reply".into(), reply)],
            requests: n,
            warmup: WARMUP_REQUESTS,
            new_connection,
        };
        self.probe(&self.client_cg, "latency", &params)
    }
}

/// Where the interceptor under test runs, and with how many workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// One worker thread, every thread pinned to [`PROXY_CPU`]: like nginx's
    /// one worker process.
    Pinned,
    /// Two workers (`proxy.worker_threads = 2`), the process free to run on
    /// [`LOAD_CPU`] and [`PROXY_CPU`]: the default runtime of a 2-core node.
    TwoWorkers,
}

impl Placement {
    fn cpus(self) -> &'static [usize] {
        match self {
            Placement::Pinned => &[PROXY_CPU],
            Placement::TwoWorkers => &[LOAD_CPU, PROXY_CPU],
        }
    }

    fn workers(self) -> usize {
        match self {
            Placement::Pinned => 1,
            Placement::TwoWorkers => 2,
        }
    }
}

/// The interceptor's configuration in the benchmark: both provider
/// addresses are targets; no domain is resolved (the namespace has no DNS).
/// `proxy` holds lines of the `[proxy]` section, `extra` further sections.
fn interceptor_config(upstream_ca: &Path, placement: Placement, proxy: &str, extra: &str) -> String {
    format!(
        "[proxy]\nworker_threads = {}\n{proxy}\n\
         [targets]\nmode = \"resolve\"\ndomains = []\ncidrs = [\"{PROVIDER}\", \"{PACED}\"]\nresolve_interval = \"60s\"\n\
         [tls]\nupstream_ca = \"{}\"\n{extra}\n",
        placement.workers(),
        upstream_ca.display()
    )
}

/// Measures one wrk row: a one-second warm-up, then `seconds`, with the CPU
/// time of the processes in `proxy` (if any) over the measured run.
fn measure(env: &Env, opts: &Options, name: &str, url: &str, script: &Path, proxy: Option<&Cgroup>) -> Result<Row> {
    let load = env.load(opts.connections);
    load.run(url, script, Duration::from_secs(1)).with_context(|| format!("{name}: warm-up"))?;
    let cpu = |cg: Option<&Cgroup>| cg.map(|cg| procstat::cgroup_usage_seconds(cg.path())).transpose();
    let switches = |cg: Option<&Cgroup>| cg.map(|cg| procstat::cgroup_context_switches(cg.path())).transpose();
    let writes = |cg: Option<&Cgroup>| cg.map(|cg| procstat::cgroup_write_syscalls(cg.path())).transpose();
    let mut best: Option<Row> = None;
    // Best of `repeat` runs: the machine may be shared, and a run that other
    // work disturbed only ever measures lower.
    for _ in 0..opts.repeat.max(1) {
        let (before, switches0, writes0) = (cpu(proxy)?, switches(proxy)?, writes(proxy)?);
        let (busy0, ours0) = (procstat::machine_busy_seconds()?, procstat::cgroup_usage_seconds(env.root.path())?);
        let wrk = load.run(url, script, Duration::from_secs(opts.seconds)).with_context(|| format!("{name}: run"))?;
        let (busy1, ours1) = (procstat::machine_busy_seconds()?, procstat::cgroup_usage_seconds(env.root.path())?);
        let (after, switches1, writes1) = (cpu(proxy)?, switches(proxy)?, writes(proxy)?);
        let other = ((busy1 - busy0) - (ours1 - ours0)).max(0.0) / wrk.seconds.max(1e-3);
        let row = Row {
            name: name.into(),
            wrk,
            proxy_cpu_s: before.zip(after).map(|(b, a)| a - b),
            other_cpu: Some(other),
            // Threads that exited meanwhile take their counts with them.
            proxy_switches: switches0.zip(switches1).map(|(b, a)| a.saturating_sub(b)),
            proxy_writes: writes0.zip(writes1).map(|(b, a)| a.saturating_sub(b)),
        };
        if best.as_ref().is_none_or(|b| row.wrk.rps() > b.wrk.rps()) {
            best = Some(row);
        }
    }
    let row = best.context("no run")?;
    println!(
        "  {:<40} {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  errors {}  non-2xx {}{}{}{}  other load {:.0} %",
        row.name,
        row.wrk.rps(),
        row.wrk.p50_us / 1e3,
        row.wrk.p99_us / 1e3,
        row.wrk.errors,
        row.wrk.non_2xx,
        row.cpu_us_per_request().map_or(String::new(), |c| format!("  proxy CPU {c:.1} us/req")),
        row.switches_per_request().map_or(String::new(), |c| format!(", {c:.2} context switches/req")),
        row.writes_per_request().map_or(String::new(), |w| format!(", {w:.2} writes/req")),
        row.other_cpu.unwrap_or_default() * 100.0,
    );
    Ok(row)
}

/// The local OTLP sink's port in the namespace.
const OTLP_SINK_PORT: u16 = 14318;

/// Rounds of the OpenTelemetry rows: off, spans and spans with logs are
/// measured in turn, round after round, each in a new process, each round
/// in another order.
const OTLP_ROUNDS: usize = 3;

/// The allowed path with OpenTelemetry export off, on with its default
/// settings (one span per exchange) and on with the audit events as log
/// records too (two per exchange), on the same placement (one worker
/// pinned): the proxy's CPU per request. The three take turns for
/// [`OTLP_ROUNDS`] rounds, and each is reported at its median: the figure
/// is a ratio of a few percent, smaller than what separates two processes
/// measured minutes apart on a shared machine, so one run of each in a row
/// would compare the machine's moods as much as the export. The sink is
/// nginx answering 200 to every export, in the peers' cgroup, so its own
/// work is not counted. With `--perf`, the runs with export off and with
/// spans are profiled (`.otlp-off.data`, `.otlp.data`), in the first round.
fn otlp_rows(env: &Env, opts: &Options, url: &str, keepalive: &Path, rows: &mut Vec<Row>) -> Result<()> {
    println!(
        "interceptor, eBPF redirect, default guardrails, OpenTelemetry export off, spans, spans and logs \
         ({OTLP_ROUNDS} rounds, each reported at its median CPU per request)"
    );
    let sink_dir = env.scratch.path().join("otlp-sink");
    let sink_addr = SocketAddr::from(([127, 0, 0, 1], OTLP_SINK_PORT));
    let sink_body = format!(
        "  server {{\n    listen {sink_addr};\n    client_max_body_size 64m;\n    \
         location / {{ return 200; }}\n  }}"
    );
    let _sink = Nginx::start(&env.netns, &env.peer_cg, &sink_dir, 1, &sink_body, sink_addr)?;
    let export = |logs: bool| {
        format!("[telemetry.otlp]\nendpoint = \"http://{sink_addr}\"\nprotocol = \"http\"\nlogs = {logs}\n")
    };
    let configs = [(names::OTLP_OFF, String::new()), (names::OTLP_ON, export(false)), (names::OTLP_LOGS, export(true))];
    let mut measured: Vec<Vec<Row>> = configs.iter().map(|_| Vec::new()).collect();
    for round in 0..OTLP_ROUNDS {
        // Each round starts one further along, so that each configuration
        // runs once in each place of a round: whatever a place in the round
        // costs is not charged to one configuration.
        let order = (0..configs.len()).map(|i| (i + round) % configs.len());
        for i in order {
            let ((name, extra), runs) = (&configs[i], &mut measured[i]);
            let (proxy, _bundle) = interceptor(env, "ebpf", Placement::Pinned, "", extra)?;
            let row = measure(env, opts, name, url, keepalive, Some(&env.proxy_cg))?;
            expect(&row, false)?;
            runs.push(row);
            // Export off and on are profiled alike, to be compared.
            let profiled = match *name {
                names::OTLP_OFF => Some(("otlp-off.data", "off")),
                names::OTLP_ON => Some(("otlp.data", "spans exported")),
                _ => None,
            };
            if let (Some(out), Some((file, what)), 0) = (&opts.perf, profiled, round) {
                let pid = proxy.pid().context("pid")?;
                profile(&out.with_extension(file), pid, || {
                    let r = env.load(opts.connections).run(url, keepalive, Duration::from_secs(opts.seconds))?;
                    Ok(format!("allowed path, OpenTelemetry export {what}, under wrk, {:.0} req/s", r.rps()))
                })?;
            }
            drop(proxy);
        }
    }
    for ((name, _), runs) in configs.iter().zip(measured) {
        let cpu: Vec<String> =
            runs.iter().map(|r| r.cpu_us_per_request().map_or("-".into(), |c| format!("{c:.1}"))).collect();
        let row = median_by_cpu(runs).context("no OTLP run")?;
        println!(
            "  {name}: median {} us/req of {}",
            row.cpu_us_per_request().map_or("-".into(), |c| format!("{c:.1}")),
            cpu.join(", ")
        );
        rows.push(row);
    }
    Ok(())
}

/// The row with the median CPU per request (the upper one of an even count).
fn median_by_cpu(mut runs: Vec<Row>) -> Option<Row> {
    runs.sort_by(|a, b| {
        a.cpu_us_per_request().unwrap_or(f64::MAX).total_cmp(&b.cpu_us_per_request().unwrap_or(f64::MAX))
    });
    let middle = runs.len() / 2;
    (!runs.is_empty()).then(|| runs.swap_remove(middle))
}

/// Asserts what a row must show for its figures to mean anything.
fn expect(row: &Row, blocked: bool) -> Result<()> {
    let w = &row.wrk;
    if w.requests == 0 {
        bail!("{}: no request completed", row.name);
    }
    if blocked && w.non_2xx != w.requests {
        bail!("{}: {} of {} requests were not blocked", row.name, w.requests - w.non_2xx, w.requests);
    }
    if !blocked && (w.non_2xx > 0 || w.errors > w.requests / 100) {
        bail!("{}: {} error statuses and {} socket errors", row.name, w.non_2xx, w.errors);
    }
    Ok(())
}

/// A reference row (mitmproxy) that misbehaves under load is reported, not
/// fatal: the interceptor's own rows are what the run judges.
fn reference(checked: Result<()>) {
    if let Err(e) = checked {
        println!("  warning: {e:#}");
    }
}

/// A running interceptor with its CA bundle, placed as `placement` says.
/// `proxy` holds extra lines of the `[proxy]` section, `extra` further
/// sections of its configuration.
fn interceptor(
    env: &Env,
    redirect: &str,
    placement: Placement,
    proxy: &str,
    extra: &str,
) -> Result<(Interceptor, PathBuf)> {
    let config = interceptor_config(&env.pki.ca, placement, proxy, extra);
    let proxy = procstat::with_cpus(placement.cpus(), || {
        start_interceptor(&env.netns, &env.proxy_cg, &env.client_cg, &config, redirect)
    })??;
    cleanup::dir(proxy.state_dir().parent().context("interceptor dir")?);
    procstat::pin_cgroup(env.proxy_cg.path(), placement.cpus())?;
    let dir = env.scratch.path().join(format!("bundle-{}", proxy.pid().unwrap_or_default()));
    std::fs::create_dir_all(&dir)?;
    // Our CA, then the provider's: what a client needs for intercepted and
    // passed-through hosts alike.
    let ours = std::fs::read_to_string(proxy.state_dir().join("ca.crt"))?;
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, format!("{ours}{}", std::fs::read_to_string(&env.pki.ca)?))?;
    Ok((proxy, bundle))
}

fn rss_mb(pid: Option<u32>) -> Result<f64> {
    Ok(procstat::rss_bytes(pid.context("interceptor not running")?)? as f64 / (1024.0 * 1024.0))
}

/// Holds `count` idle kept-alive TLS connections through the interceptor and
/// measures its RSS meanwhile: (connections open, RSS MB, first error).
fn idle_rss(env: &Env, bundle: &Path, pid: Option<u32>, count: usize) -> Result<(IdleResult, f64)> {
    let params = probe::IdleParams {
        addr: SocketAddr::new(PROVIDER.parse()?, 443),
        sni: "api.openai.com".into(),
        ca: bundle.to_owned(),
        count,
        concurrency: 64,
        body: env.bodies.allowed.clone(),
    };
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["probe", "idle", &serde_json::to_string(&params)?])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = spawn_in(&mut cmd, Some(&env.netns), Some(&env.client_cg))?;
    let stdout = child.stdout.take().context("probe stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(Duration::from_secs(180)) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("idle connections not open within 180 s");
        }
    };
    let result: IdleResult = serde_json::from_str(line.trim()).with_context(|| format!("parse {line:?}"))?;
    // Let the proxy settle (pooled upstream connections, freed buffers).
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_mb(pid)?;
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok((result, rss))
}

/// connect() to a listener on a non-target address, from the client cgroup
/// (programs attached) and from the outside cgroup (none), interleaved.
fn connect_cost(env: &Env, opts: &Options) -> Result<(ConnectResult, ConnectResult)> {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let params = probe::ConnectParams {
            addr: SocketAddr::new(NON_TARGET.parse()?, 8000 + round),
            iterations: opts.connect_iterations,
        };
        // Alternate which goes first, so warm caches favour neither.
        let (a, b): (ConnectResult, ConnectResult) = if round % 2 == 0 {
            (env.probe(&env.client_cg, "connect", &params)?, env.probe(&env.outside_cg, "connect", &params)?)
        } else {
            let b = env.probe(&env.outside_cg, "connect", &params)?;
            (env.probe(&env.client_cg, "connect", &params)?, b)
        };
        with.extend(a.samples);
        without.extend(b.samples);
    }
    let summary = |mut v: Vec<f64>| ConnectResult {
        p50_ns: probe::percentile(&mut v, 0.5),
        p99_ns: probe::percentile(&mut v, 0.99),
        samples: Vec::new(),
    };
    Ok((summary(with), summary(without)))
}

/// Records a perf profile of `pid` while `work` runs (perf stops when it
/// returns), and writes two text reports beside `out`.
fn profile(out: &Path, pid: u32, work: impl FnOnce() -> Result<String>) -> Result<()> {
    let mut perf = Command::new(tool("perf"));
    // DWARF unwinding: the release build keeps debug info but no frame pointers.
    perf.args(["record", "--call-graph", "dwarf,32768", "-F", "299", "-p", &pid.to_string(), "-o"])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = perf.spawn().context("start perf")?;
    let result = work();
    // SIGINT ends `perf record` cleanly (it writes its data and exits).
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT);
    child.wait()?;
    println!("  profiled: {}", result?);
    // Self time per symbol, and time including callees (what each layer costs).
    for (suffix, mode) in [("self.txt", "--no-children"), ("children.txt", "--children")] {
        let report = Command::new(tool("perf"))
            .args(["report", mode, "--percent-limit", "0.5", "--stdio", "-g", "none", "-i"])
            .arg(out)
            .output()?;
        let path = out.with_extension(suffix);
        std::fs::write(&path, &report.stdout)?;
        println!("  perf report {}", path.display());
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| procstat::parse_status_kb(&t, "MemTotal:"))
        .map_or(0.0, |kb| kb as f64 / (1024.0 * 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{} CPUs ({cpu}), {mem:.0} GiB, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

/// Checks the tools the benchmark runs, naming what is missing.
fn preflight(opts: &Options) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the namespace benchmark needs root (network namespaces, cgroups, eBPF, iptables)");
    }
    let bin = interceptor_bin();
    if !bin.is_file() {
        bail!(
            "interceptor binary {} not found: build it (cargo xtask bench does) or set INTERCEPTOR_BIN",
            bin.display()
        );
    }
    for t in ["wrk", "nginx", "taskset", "unshare", "iptables", "conntrack", "python3"] {
        if !tool(t).is_absolute() {
            bail!("{t} not found: run `cargo xtask setup`");
        }
    }
    if !opts.runs(Scenario::Mitmproxy) {
        return Ok(());
    }
    let mitm =
        Command::new(tool("python3")).args(["-c", "import mitmproxy.version as v; print(v.VERSION)"]).output()?;
    if !mitm.status.success() {
        bail!("mitmproxy is not installed for python3: run `cargo xtask setup`");
    }
    Ok(())
}

/// Raises the open-file limit to its hard limit (children inherit it).
fn raise_nofile() -> Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(lim.rlim_max)
}

/// Runs every row and prints the tables.
pub fn run(opts: &Options) -> Result<()> {
    preflight(opts)?;
    let nofile = raise_nofile()?;
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let _rt = runtime.enter();
    let env = Env::new()?;
    println!("interceptor namespace benchmark, {}", chrono_free_date());
    println!("machine: {}; open files limit {nofile}", machine());
    if !opts.only.is_empty() {
        let names: Vec<_> = opts.only.iter().map(|s| s.name()).collect();
        println!("only: direct, {} (figures whose rows did not run are n/a)", names.join(", "));
    }
    println!(
        "load: wrk, 1 thread, {} keep-alive connections, {} s per row after a 1 s warm-up, {} byte JSON POST over TLS \
         (HTTP/1.1, SNI api.openai.com); wrk pinned to CPU {LOAD_CPU}, the proxy under test pinned to CPU \
         {PROXY_CPU} with one worker (like nginx's one worker process) unless a row says 2 workers (free to run on \
         CPUs {LOAD_CPU} and {PROXY_CPU}), the provider (nginx, 1 worker) unpinned",
        opts.connections,
        opts.seconds,
        env.bodies.allowed.len()
    );
    println!(
        "TLS: wrk (OpenSSL 3.0) negotiates TLS 1.2 and resumes its session on every new connection; the sequential \
         probes (rustls) use TLS 1.3, X25519 and a full handshake per new connection"
    );

    let provider_addr: SocketAddr = format!("{PROVIDER}:443").parse()?;
    let _provider = Nginx::start(
        &env.netns,
        &env.provider_cg,
        &env.scratch.path().join("provider"),
        1,
        &servers::provider_http(provider_addr, &env.pki),
        provider_addr,
    )?;
    let paced_addr: SocketAddr = format!("{PACED}:443").parse()?;
    let listener = in_netns(&env.netns, || std::net::TcpListener::bind(paced_addr))??;
    let _paced = FakeProvider::start_with_tls(listener, env.pki.server_config()?)?;

    let url = "https://api.openai.com/v1/chat/completions";
    let passthrough_url = "https://static.example.com/v1/chat/completions";
    let (keepalive, blocked, close) = (&env.bodies.keepalive, &env.bodies.blocked, &env.bodies.close);
    let mut rows = Vec::new();
    let mut conn_rows = Vec::new();
    let mut streams = Vec::new();
    let stream_n = opts.stream_requests;
    let ca = env.pki.ca.clone();

    println!("\ndirect (no proxy)");
    let direct = measure(&env, opts, names::DIRECT, url, keepalive, None)?;
    expect(&direct, false)?;
    rows.push(direct);
    let direct_close = measure(&env, opts, "direct, new conn per req (TLS resumed)", url, close, None)?;
    expect(&direct_close, false)?;
    conn_rows.push(direct_close);
    let paced_path = "/v1/chat/completions?interval_ms=5";
    let unpaced_path = "/v1/chat/completions?stream=1";
    let stream_set =
        |label: &str, ca: &Path, proxy: Option<&Cgroup>, json: bool, streams: &mut Vec<LatencyRow>| -> Result<()> {
            let rows = [
                ("SSE unpaced", PROVIDER, unpaced_path, false),
                (names::PACED, PACED, paced_path, false),
                (names::PACED_NEW_CONN, PACED, paced_path, true),
                ("JSON, new TLS conn", PROVIDER, "/v1/chat/completions", true),
            ];
            for (what, addr, path, new) in rows.into_iter().take(if json { 4 } else { 3 }) {
                let cpu = || proxy.map(|cg| procstat::cgroup_usage_seconds(cg.path())).transpose();
                let before = cpu()?;
                let r = env.latency(ca, addr, path, path.contains("stream") || addr == PACED, new, stream_n)?;
                let cpu_us = before.zip(cpu()?).map(|(b, a)| (a - b) * 1e6 / (stream_n + WARMUP_REQUESTS) as f64);
                streams.push(LatencyRow { name: format!("{label}: {what}"), r, cpu_us });
            }
            Ok(())
        };
    stream_set("direct", &ca, None, true, &mut streams)?;

    let guardrails_off = "[guardrails]\nenabled = false\n";
    if opts.runs(Scenario::GuardrailsOff) {
        println!("interceptor, eBPF redirect, guardrails off (TLS termination and relay only)");
        let (proxy, _bundle) = interceptor(&env, "ebpf", Placement::Pinned, "", guardrails_off)?;
        let row = measure(&env, opts, names::GUARDRAILS_OFF, url, keepalive, Some(&env.proxy_cg))?;
        expect(&row, false)?;
        rows.push(row);
        drop(proxy);
    }

    let mut memory = Memory::default();
    let mut connect = None;
    let mut idle = None;
    if opts.runs(Scenario::Allowed) || opts.runs(Scenario::Connect) || opts.runs(Scenario::Idle) {
        println!("interceptor, eBPF redirect, default local guardrails (stream_mode monitor)");
        // The per-workload connection limit (default 1024) would refuse the
        // idle connections test, which opens them all from one process.
        let limits = format!(
            "max_connections = {n}\nmax_connections_per_workload = {n}\n",
            n = opts.idle_connections.max(8192) + 1024
        );
        let (proxy, bundle) = interceptor(&env, "ebpf", Placement::Pinned, &limits, "")?;
        println!("  connection limits raised for the idle connections test: {}", limits.replace('\n', " "));
        memory.idle = Some(rss_mb(proxy.pid())?);
        let cpu_before = procstat::cgroup_usage_seconds(env.proxy_cg.path())?;
        std::thread::sleep(Duration::from_secs(2));
        memory.idle_cpu_ms_per_s =
            Some((procstat::cgroup_usage_seconds(env.proxy_cg.path())? - cpu_before) * 1e3 / 2.0);
        if let Some(pid) = proxy.pid() {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let threads = status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap_or("?").trim().to_owned();
            println!("  interceptor pid {pid}, {threads} threads, 1 worker, all pinned to CPU {PROXY_CPU}");
        }
        if opts.runs(Scenario::Allowed) {
            let allowed = measure(&env, opts, names::ALLOWED, url, keepalive, Some(&env.proxy_cg))?;
            expect(&allowed, false)?;
            memory.active = Some(rss_mb(proxy.pid())?);
            rows.push(allowed);
            let row = measure(&env, opts, "interceptor eBPF, blocked", url, blocked, Some(&env.proxy_cg))?;
            expect(&row, true)?;
            rows.push(row);
            let row = measure(&env, opts, names::PASSTHROUGH, passthrough_url, keepalive, Some(&env.proxy_cg))?;
            expect(&row, false)?;
            rows.push(row);
            let row =
                measure(&env, opts, "interceptor, new conn per req (TLS resumed)", url, close, Some(&env.proxy_cg))?;
            expect(&row, false)?;
            conn_rows.push(row);
            stream_set("interceptor monitor", &bundle, Some(&env.proxy_cg), true, &mut streams)?;
        }
        if opts.runs(Scenario::Connect) {
            println!("  connect() to a non-target address, {} x 3 rounds", opts.connect_iterations);
            connect = Some(connect_cost(&env, opts)?);
        }
        if opts.runs(Scenario::Idle) {
            println!("  {} idle keep-alive TLS connections", opts.idle_connections);
            let (result, rss) = idle_rss(&env, &bundle, proxy.pid(), opts.idle_connections)?;
            println!(
                "  open {}, failed {}{}",
                result.open,
                result.failed,
                if result.failed > 0 { format!(" ({})", result.first_error) } else { String::new() }
            );
            idle = Some((result, rss));
        }
        if let (Some(out), true) = (&opts.perf, opts.runs(Scenario::Allowed)) {
            let pid = proxy.pid().context("pid")?;
            profile(out, pid, || {
                let r =
                    env.load(opts.connections).run(url, &env.bodies.keepalive, Duration::from_secs(opts.seconds))?;
                Ok(format!("allowed path under wrk, {:.0} req/s", r.rps()))
            })?;
            // The streamed path: paced SSE through the stream guard (monitor).
            let sse = out.with_extension("sse.data");
            profile(&sse, pid, || {
                let r = env.latency(
                    &bundle,
                    PACED,
                    "/v1/chat/completions?interval_ms=5",
                    true,
                    false,
                    opts.stream_requests,
                )?;
                Ok(format!("paced SSE, first byte p50 {:.3} ms", r.first_p50_us / 1e3))
            })?;
        }
        drop(proxy);
    }

    if opts.runs(Scenario::Otlp) {
        otlp_rows(&env, opts, url, keepalive, &mut rows)?;
    }

    if opts.runs(Scenario::TwoWorkers) {
        let cpus = Placement::TwoWorkers.cpus();
        println!("interceptor, eBPF redirect, 2 workers on CPUs {cpus:?} (the default runtime of a 2-core node)");
        for (name, extra) in [(names::ALLOWED_2W, ""), (names::GUARDRAILS_OFF_2W, guardrails_off)] {
            let (proxy, _bundle) = interceptor(&env, "ebpf", Placement::TwoWorkers, "", extra)?;
            let row = measure(&env, opts, name, url, keepalive, Some(&env.proxy_cg))?;
            expect(&row, false)?;
            rows.push(row);
            if let (Some(out), "") = (&opts.perf, extra) {
                let pid = proxy.pid().context("pid")?;
                profile(&out.with_extension("2workers.data"), pid, || {
                    let r = env.load(opts.connections).run(url, keepalive, Duration::from_secs(opts.seconds))?;
                    Ok(format!("allowed path, 2 workers, under wrk, {:.0} req/s", r.rps()))
                })?;
            }
            drop(proxy);
        }
    }

    if opts.runs(Scenario::Enforce) {
        println!("interceptor, eBPF redirect, stream_mode enforce");
        let (proxy, bundle) =
            interceptor(&env, "ebpf", Placement::Pinned, "", "[guardrails]\nstream_mode = \"enforce\"\n")?;
        stream_set("interceptor enforce", &bundle, Some(&env.proxy_cg), false, &mut streams)?;
        drop(proxy);
    }

    if opts.runs(Scenario::Iptables) {
        println!("interceptor, iptables redirect");
        env.flush_conntrack();
        let (proxy, _bundle) = interceptor(&env, "iptables", Placement::Pinned, "", "")?;
        env.flush_conntrack();
        let row = measure(&env, opts, "interceptor iptables, allowed", url, keepalive, Some(&env.proxy_cg))?;
        expect(&row, false)?;
        rows.push(row);
        drop(proxy);
        env.flush_conntrack();
    }

    if opts.runs(Scenario::Nginx) {
        println!(
            "nginx reverse proxy (TLS terminated, re-encrypted, upstream verified, keep-alive), iptables REDIRECT"
        );
        let peer_dir = env.scratch.path().join("nginx-peer");
        let peer_addr = SocketAddr::from(([127, 0, 0, 1], NGINX_PEER_PORT));
        let listen = |port: u16| SocketAddr::from(([0, 0, 0, 0], port));
        // The paced streams go through a server of their own, passed on
        // chunk by chunk, as the interceptor passes them in monitor mode.
        let servers = servers::reverse_proxy_http("provider", listen(NGINX_PEER_PORT), provider_addr, false, &env.pki)
            + &servers::reverse_proxy_http("paced", listen(NGINX_STREAM_PORT), paced_addr, true, &env.pki);
        let nginx = procstat::with_cpus(&[PROXY_CPU], || {
            Nginx::start(&env.netns, &env.peer_cg, &peer_dir, 1, &servers, peer_addr)
        })??;
        procstat::pin_cgroup(env.peer_cg.path(), &[PROXY_CPU])?;
        env.peer_redirect(PROVIDER, NGINX_PEER_PORT, true)?;
        env.peer_redirect(PACED, NGINX_STREAM_PORT, true)?;
        let row = measure(&env, opts, names::NGINX, url, keepalive, Some(&env.peer_cg))?;
        expect(&row, false)?;
        rows.push(row);
        let row = measure(&env, opts, "nginx proxy, new conn per req (TLS resumed)", url, close, Some(&env.peer_cg))?;
        expect(&row, false)?;
        conn_rows.push(row);
        stream_set("nginx proxy", &ca, Some(&env.peer_cg), false, &mut streams)?;
        env.peer_redirect(PACED, NGINX_STREAM_PORT, false)?;
        env.peer_redirect(PROVIDER, NGINX_PEER_PORT, false)?;
        drop(nginx);
    }

    if opts.runs(Scenario::Mitmproxy) {
        println!("mitmproxy {} transparent, guard addon, iptables REDIRECT", servers::MITMPROXY_VERSION);
        let mitm_dir = env.scratch.path().join("mitm");
        std::fs::create_dir_all(&mitm_dir)?;
        let mitm = procstat::with_cpus(&[PROXY_CPU], || {
            Mitmproxy::start(&env.netns, &env.peer_cg, &mitm_dir, MITM_PEER_PORT, &env.pki.ca)
        })??;
        procstat::pin_cgroup(env.peer_cg.path(), &[PROXY_CPU])?;
        env.peer_redirect(PROVIDER, MITM_PEER_PORT, true)?;
        let row = measure(&env, opts, "mitmproxy, allowed", url, keepalive, Some(&env.peer_cg))?;
        reference(expect(&row, false));
        rows.push(row);
        let row = measure(&env, opts, "mitmproxy, blocked", url, blocked, Some(&env.peer_cg))?;
        reference(expect(&row, true));
        rows.push(row);
        let row = measure(&env, opts, "mitmproxy, new conn per req (TLS resumed)", url, close, Some(&env.peer_cg))?;
        reference(expect(&row, false));
        conn_rows.push(row);
        memory.mitm = Some(rss_mb(mitm.pid())?);
        env.peer_redirect(PROVIDER, MITM_PEER_PORT, false)?;
        drop(mitm);
    }

    print_results(&Results {
        rows: &rows,
        conn_rows: &conn_rows,
        streams: &streams,
        connect: connect.as_ref(),
        idle: idle.as_ref(),
        memory: &memory,
        connections: opts.connections,
    });
    println!("\ncompleted in {:.0} s", started.elapsed().as_secs_f64());
    let _ = std::io::stdout().flush();
    Ok(())
}

/// The interceptor's memory (VmRSS, MB) and idle CPU, and mitmproxy's
/// memory, as far as the scenarios run measured them.
#[derive(Default)]
struct Memory {
    idle: Option<f64>,
    idle_cpu_ms_per_s: Option<f64>,
    /// Right after the allowed row.
    active: Option<f64>,
    mitm: Option<f64>,
}

struct Results<'a> {
    rows: &'a [Row],
    conn_rows: &'a [Row],
    streams: &'a [LatencyRow],
    /// connect() with the programs attached, and without.
    connect: Option<&'a (ConnectResult, ConnectResult)>,
    /// The idle connections held, and the RSS meanwhile.
    idle: Option<&'a (IdleResult, f64)>,
    memory: &'a Memory,
    connections: usize,
}

fn print_results(r: &Results<'_>) {
    println!(
        "\n== throughput and latency (wrk, {} keep-alive connections, best of the runs; d = direct, m = mitmproxy, n = nginx; CPU = proxy CPU time per request (its cgroup's cpu.stat); other = CPU used by processes outside the benchmark meanwhile, in % of one CPU) ==",
        r.connections
    );
    print!("{}", report::throughput_table(r.rows, "direct", "mitmproxy, allowed", "nginx proxy, allowed"));
    println!(
        "\n== new TLS connection per request (wrk, Connection: close; latency excludes the handshake, req/s and CPU include it) =="
    );
    print!(
        "{}",
        report::throughput_table(
            r.conn_rows,
            "direct, new conn per req (TLS resumed)",
            "mitmproxy, new conn per req (TLS resumed)",
            "nginx proxy, new conn per req (TLS resumed)"
        )
    );
    println!(
        "\n== sequential requests, one client (first / last body byte; \"new TLS conn\" includes connect and handshake) =="
    );
    println!(
        "{:<48}{:>12}{:>12}{:>12}{:>12}{:>14}{:>14}{:>12}",
        "row", "first p50", "first p99", "last p50", "last p99", "+first vs d", "+last vs d", "CPU us/req"
    );
    for s in r.streams {
        let what = s.name.split_once(": ").map_or("", |(_, w)| w);
        let direct = r.streams.iter().find(|d| d.name == format!("direct: {what}"));
        let added = |f: fn(&LatencyResult) -> f64| {
            direct.map_or("-".into(), |d| format!("{:+.3} ms", (f(&s.r) - f(&d.r)) / 1e3))
        };
        println!(
            "{:<48}{:>9.3} ms{:>9.3} ms{:>9.3} ms{:>9.3} ms{:>14}{:>14}{:>12}",
            s.name,
            s.r.first_p50_us / 1e3,
            s.r.first_p99_us / 1e3,
            s.r.last_p50_us / 1e3,
            s.r.last_p99_us / 1e3,
            added(|x| x.first_p50_us),
            added(|x| x.last_p50_us),
            s.cpu_us.map_or("-".into(), |c| format!("{c:.0}")),
        );
    }
    if let Some((with, without)) = r.connect {
        println!("\n== connect() to a non-target address from a redirected cgroup ==");
        println!(
            "  eBPF programs attached: p50 {:.2} us, p99 {:.2} us; not attached: p50 {:.2} us, p99 {:.2} us; difference p50 {:+.2} us, p99 {:+.2} us",
            with.p50_ns / 1e3,
            with.p99_ns / 1e3,
            without.p50_ns / 1e3,
            without.p99_ns / 1e3,
            (with.p50_ns - without.p50_ns) / 1e3,
            (with.p99_ns - without.p99_ns) / 1e3,
        );
    }
    let mb = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} MB"));
    let m = r.memory;
    println!("\n== memory (VmRSS) and idle CPU ==");
    if let Some(cpu) = m.idle_cpu_ms_per_s {
        println!("  interceptor CPU while idle (no traffic, 2 s): {cpu:.2} ms per second");
    }
    println!(
        "  interceptor idle {}; right after the allowed row ({} active connections) {}; {}; mitmproxy after its rows {}",
        mb(m.idle),
        r.connections,
        mb(m.active),
        r.idle.map_or("idle connections not measured".into(), |(idle, rss)| format!(
            "with {} idle keep-alive TLS connections {rss:.1} MB ({} failed)",
            idle.open, idle.failed
        )),
        mb(m.mitm)
    );

    let first_byte_p50_us: Vec<(String, f64)> = r.streams.iter().map(|s| (s.name.clone(), s.r.first_p50_us)).collect();
    let figures = report::figures(&Measured {
        rows: r.rows,
        first_byte_p50_us: &first_byte_p50_us,
        idle_open: r.idle.map_or(0, |(idle, _)| idle.open),
        rss_idle_conns_mb: r.idle.map(|(_, rss)| *rss),
        rss_idle_mb: m.idle,
        connect_p50_diff_us: r.connect.map(|(with, without)| (with.p50_ns - without.p50_ns) / 1e3),
        connections: r.connections,
    });
    println!("\n== targets ==");
    print!("{}", report::figures_table(&figures));
}

/// Today's date (UTC) from the system clock, without a date crate.
fn chrono_free_date() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}-{:02} {:02}:{:02} UTC", now.year(), u8::from(now.month()), now.day(), now.hour(), now.minute())
}
