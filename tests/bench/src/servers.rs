//! The servers the benchmark starts in its namespace: nginx as the fake
//! provider and as the TLS-terminating reverse proxy peer, and mitmproxy in
//! transparent mode as the sidecar peer. Each runs in a cgroup of its own, so
//! its CPU time can be summed over its processes and dropping the cgroup
//! kills whatever is left.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use interceptor::testing::{Cgroup, Netns, in_netns, provider::sample_chat_completion, spawn_in, tool};

/// The mitmproxy release pinned by `cargo xtask setup` (the newest that runs
/// on Debian 12's Python 3.11).
pub const MITMPROXY_VERSION: &str = "11.0.2";

/// An OpenAI chat stream of `events` chunks and `[DONE]`.
pub fn completion_sse(events: usize) -> String {
    let mut out = String::new();
    for i in 0..events {
        let chunk = serde_json::json!({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "delta": {"content": format!("word{i} ")}, "finish_reason": null}]
        });
        out.push_str(&format!("data: {chunk}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    out
}

/// nginx in the foreground (master and workers), stopped on drop.
pub struct Nginx {
    child: Option<Child>,
    pub dir: PathBuf,
}

impl Nginx {
    /// Writes `nginx.conf` in `dir` around the `http` block `http_body`, and
    /// starts nginx in `netns` and `cgroup`; waits until `ready` accepts.
    pub fn start(
        netns: &Netns,
        cgroup: &Cgroup,
        dir: &Path,
        workers: usize,
        http_body: &str,
        ready: SocketAddr,
    ) -> Result<Nginx> {
        std::fs::create_dir_all(dir)?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process on;\nuser root;\nworker_processes {workers};\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nworker_rlimit_nofile 19000;\n\
             events {{ worker_connections 18000; multi_accept on; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             keepalive_requests 10000000;\n  keepalive_timeout 600s;\n  ssl_protocols TLSv1.2 TLSv1.3;\n\
             ssl_session_cache shared:bench:10m;\n{http_body}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let mut cmd = Command::new(tool("nginx"));
        cmd.arg("-p").arg(dir).arg("-c").arg(&path).arg("-e").arg(dir.join("error.log"));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = spawn_in(&mut cmd, Some(netns), Some(cgroup)).context("start nginx")?;
        let mut nginx = Nginx { child: Some(child), dir: dir.to_owned() };
        nginx.wait_ready(netns, ready)?;
        Ok(nginx)
    }

    fn wait_ready(&mut self, netns: &Netns, addr: SocketAddr) -> Result<()> {
        let child = self.child.as_mut().context("nginx not running")?;
        wait_listening(netns, addr, Duration::from_secs(10), || {
            Ok(child.try_wait()?.map(|status| {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                format!("nginx exited ({status}): {log}")
            }))
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: the master stops its workers (SIGKILL would orphan them;
            // the cgroup drop catches those anyway).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `http` block of the fake provider: `POST /v1/chat/completions`
/// answers [`sample_chat_completion`]; with `?stream=1`, [`completion_sse`] (20
/// events, unpaced) as `text/event-stream`.
pub fn provider_http(listen: SocketAddr, pki: &super::pki::BenchPki) -> String {
    format!(
        "  server {{\n    listen {listen} ssl;\n    server_name api.openai.com static.example.com;\n\
         ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
         location = /v1/chat/completions {{\n      if ($arg_stream) {{ rewrite ^ /_sse last; }}\n\
         default_type application/json;\n      return 200 '{json}';\n    }}\n\
         location = /_sse {{\n      internal;\n      default_type text/event-stream;\n      return 200 '{sse}';\n    }}\n\
         location / {{ return 404; }}\n  }}\n",
        cert = pki.cert.display(),
        key = pki.key.display(),
        json = sample_chat_completion(),
        sse = completion_sse(20),
    )
}

/// A server of the reverse proxy peer's `http` block: TLS terminated on
/// `listen` (any SNI gets the provider's leaf), re-encrypted to `upstream`
/// (named `name`) with the certificate verified against the bench CA, over
/// kept-alive connections. A `streaming` server passes each chunk on as it
/// comes (`proxy_buffering off`), as a proxy of streamed answers must.
pub fn reverse_proxy_http(
    name: &str,
    listen: SocketAddr,
    upstream: SocketAddr,
    streaming: bool,
    pki: &super::pki::BenchPki,
) -> String {
    format!(
        "  upstream {name} {{\n    server {upstream};\n    keepalive 64;\n  }}\n\
         server {{\n    listen {listen} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
         location / {{\n      proxy_pass https://{name};\n      proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
         proxy_ssl_server_name on;\n      proxy_ssl_name api.openai.com;\n      proxy_ssl_verify on;\n\
         proxy_ssl_trusted_certificate {ca};\n      proxy_ssl_session_reuse on;\n{buffering}    }}\n  }}\n",
        cert = pki.cert.display(),
        key = pki.key.display(),
        ca = pki.ca.display(),
        buffering = if streaming { "      proxy_buffering off;\n" } else { "" },
    )
}

/// The mitmproxy addon: the same kind of checks as the interceptor's local
/// policy (secrets and injection phrases in the messages of a JSON request,
/// secrets in the response), answering 403 on a request finding.
pub const MITM_ADDON: &str = r#"
import json, re
from mitmproxy import http

SECRETS = [re.compile(p) for p in [
    r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}",
    r"\bgh[pousr]_[A-Za-z0-9]{36}\b",
    r"\bxox[baprs]-[A-Za-z0-9-]{10,}",
    r"\bAIza[0-9A-Za-z_-]{35}\b",
]]
INJECTION = re.compile(r"(?i)ignore (?:all )?(?:previous|prior) instructions|reveal your system prompt")

def texts(body):
    try:
        doc = json.loads(body)
    except ValueError:
        return [body]
    out = []
    for m in doc.get("messages", []) if isinstance(doc, dict) else []:
        c = m.get("content")
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            out.extend(p.get("text", "") for p in c if isinstance(p, dict))
    return out

class Guard:
    def request(self, flow: http.HTTPFlow):
        body = flow.request.get_text(strict=False) or ""
        for text in texts(body):
            if any(p.search(text) for p in SECRETS):
                flow.response = http.Response.make(403, b'{"error":"blocked"}', {"content-type": "application/json"})
                return
            INJECTION.search(text)

    def response(self, flow: http.HTTPFlow):
        body = flow.response.get_text(strict=False) or ""
        if any(p.search(body) for p in SECRETS):
            flow.response = http.Response.make(502, b'{"error":"blocked"}', {"content-type": "application/json"})

addons = [Guard()]
"#;

/// mitmdump in transparent mode on `port`, verifying upstream certificates
/// against `ca`, with [`MITM_ADDON`]. Killed on drop.
pub struct Mitmproxy {
    child: Option<Child>,
}

impl Mitmproxy {
    pub fn start(netns: &Netns, cgroup: &Cgroup, dir: &Path, port: u16, ca: &Path) -> Result<Mitmproxy> {
        let confdir = dir.join("mitmproxy");
        std::fs::create_dir_all(&confdir)?;
        let addon = dir.join("guard.py");
        std::fs::write(&addon, MITM_ADDON)?;
        let mut cmd = Command::new(tool("python3"));
        cmd.args(["-c", "import sys\nfrom mitmproxy.tools.main import mitmdump\nsys.exit(mitmdump())"])
            .args(["--mode", "transparent", "--listen-host", "0.0.0.0", "--listen-port", &port.to_string()])
            .arg("--set")
            .arg(format!("confdir={}", confdir.display()))
            .arg("--set")
            .arg(format!("ssl_verify_upstream_trusted_ca={}", ca.display()))
            .args(["--set", "flow_detail=0", "--set", "termlog_verbosity=warn", "-s"])
            .arg(&addon)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("mitmproxy.log"))?);
        let child = spawn_in(&mut cmd, Some(netns), Some(cgroup)).context("start mitmdump")?;
        let mut m = Mitmproxy { child: Some(child) };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = m.child.as_mut().context("mitmdump not running")?;
        wait_listening(netns, addr, Duration::from_secs(30), || {
            Ok(child.try_wait()?.map(|status| {
                let log = std::fs::read_to_string(dir.join("mitmproxy.log")).unwrap_or_default();
                format!(
                    "mitmdump exited ({status}); is mitmproxy {MITMPROXY_VERSION} installed (cargo xtask setup)? {log}"
                )
            }))
        })?;
        Ok(m)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Mitmproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls a TCP connect to `addr` inside `netns` until it succeeds; `exited`
/// reports a server that died meanwhile.
fn wait_listening(
    netns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
    mut exited: impl FnMut() -> Result<Option<String>>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(why) = exited()? {
            bail!("{why}");
        }
        if in_netns(netns, || TcpStream::connect_timeout(&addr, Duration::from_millis(200)))?.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listening on {addr} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
