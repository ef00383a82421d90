//! Running the real `interceptor` binary inside a test namespace and cgroup,
//! and reading what it logged.
//!
//! The binary is `$INTERCEPTOR_BIN` (set by `cargo xtask test`), else
//! `target/debug/interceptor` of this workspace. Its JSON log goes to a file
//! that tests parse; its admin API listens on 127.0.0.1:15000 inside the
//! test's own namespace.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Cgroup, Netns, in_netns, spawn_in};

/// Admin address used by every harness instance (unique per namespace).
pub const ADMIN: &str = "127.0.0.1:15000";

pub fn interceptor_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("INTERCEPTOR_BIN") {
        return PathBuf::from(bin);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/interceptor")
}

/// A running interceptor. Killed (SIGKILL) on drop if still running.
pub struct Interceptor {
    child: Option<Child>,
    dir: PathBuf,
    netns_path: PathBuf,
    netns_name: String,
}

impl Interceptor {
    /// Writes `config_toml` to a fresh directory (which also holds the state
    /// directory and the log) and starts `interceptor --config … run` with
    /// `args` in `netns` and, if given, `cgroup`.
    pub fn start(netns: &Netns, cgroup: Option<&Cgroup>, config_toml: &str, args: &[&str]) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "interceptor-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml)?;
        let log = std::fs::File::create(dir.join("log.jsonl"))?;
        let mut cmd = Command::new(interceptor_bin());
        cmd.arg("--config")
            .arg(&config)
            .arg("run")
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--log-format")
            .arg("json")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = spawn_in(&mut cmd, Some(netns), cgroup)
            .with_context(|| format!("start {}", interceptor_bin().display()))?;
        Ok(Self {
            child: Some(child),
            dir,
            netns_path: netns.path().to_path_buf(),
            netns_name: netns.name().to_string(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The interceptor's state directory (its CA lives here).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// Everything logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("log.jsonl")).unwrap_or_default()
    }

    /// Log lines parsed as JSON (non-JSON lines are skipped).
    pub fn events(&self) -> Vec<Value> {
        self.log_text().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The audit events logged so far (each log line of target `audit`
    /// carries its event as the object `audit`).
    pub fn audit_events(&self) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["target"] == "audit").map(|mut e| e["audit"].take()).collect()
    }

    /// The per-connection records.
    pub fn connections(&self) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["event"] == "connection").collect()
    }

    /// Waits until a connection record matching `pred` is logged.
    pub fn wait_connection(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.connections().into_iter().find(|e| pred(e)) {
                return Ok(found);
            }
            if Instant::now() > deadline {
                bail!("no matching connection record within {timeout:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `/readyz` until it answers 200; fails early if the process exits.
    pub fn wait_ready(&mut self, netns: &Netns, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("interceptor exited during start-up ({status}); log:\n{}", self.log_text());
            }
            if let Ok((200, _)) = http_get(netns, ADMIN.parse()?, "/readyz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("interceptor not ready within {timeout:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/status` as JSON.
    pub fn status(&self, netns: &Netns) -> Result<Value> {
        let (code, body) = http_get(netns, ADMIN.parse()?, "/status")?;
        if code != 200 {
            bail!("/status answered {code}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        self.wait(timeout)
    }

    /// SIGKILL: simulates a crash.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGKILL)?;
        self.wait(Duration::from_secs(10))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.pid().context("interceptor already reaped")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("interceptor already reaped")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("interceptor did not exit within {timeout:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Namespace the interceptor runs in.
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- interceptor log ({}) ---\n{}", self.dir.display(), self.log_text());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A minimal HTTP/1.0 GET made from inside `netns`: (status code, body).
pub fn http_get(netns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    in_netns(netns, move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("malformed HTTP response")?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((code, body))
    })?
}
