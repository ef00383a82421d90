//! mitmproxy (`mitmdump`) as a test peer: regular-proxy mode on loopback,
//! running the addons a test names, in front of a fake provider.
//!
//! A harness addon ([`UPSTREAM_ADDON`], loaded first) sends every upstream
//! connection mitmproxy opens to one loopback address, whatever host the
//! client asked for, so nothing ever reaches a real host; mitmproxy verifies
//! the upstream certificate against the CA given (the fake provider's),
//! under the name the client asked for. mitmproxy makes its own CA in a fresh
//! configuration directory: clients trust [`MitmProxy::ca_pem`] and use
//! [`MitmProxy::url`] as their `HTTPS_PROXY`.
//!
//! Start-up waits for mitmproxy's `proxy listening at` line, which also names
//! the port it bound (it is started on port 0, so no port is guessed), and
//! fails if mitmproxy exits first, as it does when an addon fails to load.
//! Everything mitmproxy and its addons print is kept ([`MitmProxy::log`]).
//! The process is killed, and its directory removed, on drop.
//!
//! Needs `python3` with mitmproxy installed (`cargo xtask setup`); this
//! module only runs it and must not be used outside tests.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{tool, unique_suffix};

/// The harness addon: every upstream connection goes to `MITM_TEST_UPSTREAM`.
pub const UPSTREAM_ADDON: &str = include_str!("mitm_upstream.py");

/// How mitmproxy is started: its own entry point, from the `python3` on
/// `PATH` (the one `cargo xtask setup` installs mitmproxy for).
const MITMDUMP: &str = "import sys\nfrom mitmproxy.tools.main import mitmdump\nsys.exit(mitmdump())";

/// What mitmproxy prints once its listener is bound, followed by the address.
const LISTENING: &str = "proxy listening at ";

/// Longest wait for the listener (a cold Python start, a CA to generate).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Proxy variables removed from mitmproxy's environment: an addon's own
/// HTTP client (e.g. `requests`) would otherwise send its calls through them.
const PROXY_VARIABLES: &[&str] =
    &["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"];

/// What to run.
#[derive(Debug, Clone)]
pub struct MitmSettings {
    /// Addon scripts, loaded in this order after the harness addon.
    pub addons: Vec<PathBuf>,
    /// Where every upstream connection goes.
    pub upstream: SocketAddr,
    /// The CA upstream certificates must chain to (PEM file).
    pub upstream_ca: PathBuf,
    /// Extra environment for mitmproxy and its addons (e.g. `AKTO_URL`).
    pub env: Vec<(String, String)>,
}

/// A running mitmdump; see the module docs.
pub struct MitmProxy {
    child: Option<Child>,
    addr: SocketAddr,
    ca_pem: String,
    log: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
}

impl std::fmt::Debug for MitmProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MitmProxy").field("addr", &self.addr).field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl MitmProxy {
    /// Starts mitmdump on `127.0.0.1:0` and waits until it listens. Blocks
    /// (up to a minute): call it from a blocking context.
    pub fn start(settings: &MitmSettings) -> Result<MitmProxy> {
        let dir = std::env::temp_dir().join(format!("interceptor-mitm-{}", unique_suffix()));
        let confdir = dir.join("conf");
        std::fs::create_dir_all(&confdir).with_context(|| format!("create {}", confdir.display()))?;
        let harness = dir.join("mitm_upstream.py");
        std::fs::write(&harness, UPSTREAM_ADDON).with_context(|| format!("write {}", harness.display()))?;

        let mut cmd = Command::new(tool("python3"));
        cmd.args(["-c", MITMDUMP])
            .args(["--listen-host", "127.0.0.1", "--listen-port", "0"])
            .arg("--set")
            .arg(format!("confdir={}", confdir.display()))
            .arg("--set")
            .arg(format!("ssl_verify_upstream_trusted_ca={}", settings.upstream_ca.display()))
            .arg("-s")
            .arg(&harness);
        for addon in &settings.addons {
            cmd.arg("-s").arg(addon);
        }
        for var in PROXY_VARIABLES {
            cmd.env_remove(var);
        }
        cmd.env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("MITM_TEST_UPSTREAM", settings.upstream.to_string())
            .envs(settings.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e).context("spawn python3 for mitmdump");
            }
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let (lines_tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            collect_lines(out, Arc::clone(&log), lines_tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            collect_lines(err, Arc::clone(&log), lines_tx);
        }
        // From here on, drop kills the child and removes the directory.
        let mut proxy = MitmProxy {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ca_pem: String::new(),
            log,
            dir,
        };

        let deadline = Instant::now() + START_TIMEOUT;
        proxy.addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = listening_addr(&line) {
                        break addr;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = proxy.child.as_mut().map(|c| c.wait()).transpose().context("wait for mitmdump")?;
                    bail!("mitmdump exited before listening ({status:?}):\n{}", proxy.log());
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("mitmdump not listening after {START_TIMEOUT:?}:\n{}", proxy.log());
                }
            }
        };
        let ca = confdir.join("mitmproxy-ca-cert.pem");
        proxy.ca_pem = std::fs::read_to_string(&ca).with_context(|| format!("read mitmproxy's CA {}", ca.display()))?;
        Ok(proxy)
    }

    /// The address to use as `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// mitmproxy's CA certificate (PEM), which clients must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Everything mitmproxy and its addons printed so far, one line each.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(PoisonError::into_inner).join("\n")
    }
}

impl Drop for MitmProxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads `pipe` line by line on a thread of its own, keeping each line in
/// `log` and sending it on `lines` (while anyone listens).
fn collect_lines(pipe: impl Read + Send + 'static, log: Arc<Mutex<Vec<String>>>, lines: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            log.lock().unwrap_or_else(PoisonError::into_inner).push(line.clone());
            let _ = lines.send(line);
        }
    });
}

/// The address in mitmproxy's `HTTP(S) proxy listening at 127.0.0.1:41234.`
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once(LISTENING)?;
    rest.trim().trim_end_matches('.').parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_listening_line() {
        let line = "[18:31:11.833] HTTP(S) proxy listening at 127.0.0.1:44965.";
        assert_eq!(listening_addr(line), Some(SocketAddr::from(([127, 0, 0, 1], 44965))));
        assert_eq!(listening_addr("[18:31:11.698] Loading script redirect.py"), None);
    }
}
