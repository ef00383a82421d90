//! Real HTTP clients (curl, Python's `ssl` and `http.client`, Node's `fetch`)
//! run as separate processes, so each lands in a test cgroup and network
//! namespace of its own (cgroup membership is per process). Every run is
//! bounded by a timeout and returns a parsed result.
//!
//! Clients use real provider host names (`https://api.openai.com/...`) with
//! no proxy settings. With a [`HostsFile`] in the [`ClientEnv`], the client
//! runs in a private mount namespace with that file bind-mounted over
//! `/etc/hosts`, so the names resolve to the fake provider's address there
//! and nowhere else.
//!
//! A client that cannot complete its exchange (connection refused, TLS
//! verification failure, timeout) is an error carrying what the client said;
//! an HTTP error status is not an error.
//!
//! The scripts the clients run are files in `clients/` next to this one: a
//! Python prelude (parameters, TLS context, the error convention) that every
//! Python body follows, and Node's `fetch` script.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncReadExt;

use super::provider::{DEFAULT_NAMES, PROVIDER_IP};
use super::{Cgroup, Netns, spawn_in_tokio, tool};

/// Default bound on one client run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time the process gets beyond the client's own timeout, so that the
/// client reports its own timeout before it is killed.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Proxy settings a client must not inherit: traffic goes where it resolves.
const PROXY_VARS: &[&str] =
    &["http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"];
/// Environment variable carrying a script's parameters as JSON.
pub(super) const PARAMS_VAR: &str = "INTERCEPTOR_CLIENT_PARAMS";
/// Bind-mounts `$1` over /etc/hosts, then execs the rest of the arguments.
/// Run by `sh -c` inside `unshare --mount`, so the mount is private.
const BIND_HOSTS: &str = r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#;

/// A directory under the system temp dir, removed with its contents on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `interceptor-scratch-<hint>-<pid>-<n>` in the temp dir.
    pub fn new(hint: &str) -> Result<ScratchDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "interceptor-scratch-{}-{}-{}",
            super::sanitize(hint, 24),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A hosts file for clients (see the module docs). Removed on drop.
#[derive(Debug)]
pub struct HostsFile {
    dir: ScratchDir,
}

impl HostsFile {
    /// `localhost` entries plus one line per `(address, name)`.
    pub fn new(entries: &[(IpAddr, &str)]) -> Result<HostsFile> {
        let dir = ScratchDir::new("hosts")?;
        let mut text = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n");
        for (ip, name) in entries {
            text.push_str(&format!("{ip}\t{name}\n"));
        }
        let hosts = HostsFile { dir };
        std::fs::write(hosts.path(), text).with_context(|| format!("write {}", hosts.path().display()))?;
        Ok(hosts)
    }

    /// Every name in `names` at `ip`.
    pub fn for_names(ip: IpAddr, names: &[&str]) -> Result<HostsFile> {
        let entries: Vec<(IpAddr, &str)> = names.iter().map(|n| (ip, *n)).collect();
        HostsFile::new(&entries)
    }

    /// The provider names of [`DEFAULT_NAMES`] at [`PROVIDER_IP`].
    pub fn with_defaults() -> Result<HostsFile> {
        HostsFile::for_names(PROVIDER_IP, DEFAULT_NAMES)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }
}

/// Where and how a client runs: namespace, cgroup, name resolution, the CA
/// bundle it trusts (only that bundle for curl and Python; Node adds it to
/// its built-in roots), and its time bound.
#[derive(Debug, Clone)]
pub struct ClientEnv<'a> {
    pub netns: Option<&'a Netns>,
    pub cgroup: Option<&'a Cgroup>,
    pub hosts: Option<&'a HostsFile>,
    /// PEM bundle of the CAs to trust.
    pub ca_file: PathBuf,
    /// Bound on the whole exchange; the process is killed a little after it.
    pub timeout: Duration,
}

impl<'a> ClientEnv<'a> {
    /// Runs in the caller's namespaces, trusting `ca_file`, with [`DEFAULT_TIMEOUT`].
    pub fn new(ca_file: impl Into<PathBuf>) -> ClientEnv<'a> {
        ClientEnv { netns: None, cgroup: None, hosts: None, ca_file: ca_file.into(), timeout: DEFAULT_TIMEOUT }
    }

    pub fn in_netns(mut self, netns: &'a Netns) -> Self {
        self.netns = Some(netns);
        self
    }

    pub fn in_cgroup(mut self, cgroup: &'a Cgroup) -> Self {
        self.cgroup = Some(cgroup);
        self
    }

    pub fn with_hosts(mut self, hosts: &'a HostsFile) -> Self {
        self.hosts = Some(hosts);
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// A request for any of the clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    /// Full URL, e.g. `https://api.openai.com/v1/chat/completions`.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl HttpRequest {
    pub fn get(url: &str) -> HttpRequest {
        HttpRequest { method: "GET".into(), url: url.into(), headers: Vec::new(), body: None }
    }

    /// A POST of `body` with no content type.
    pub fn post(url: &str, body: impl Into<Vec<u8>>) -> HttpRequest {
        HttpRequest { method: "POST".into(), url: url.into(), headers: Vec::new(), body: Some(body.into()) }
    }

    /// A POST of `body` serialized, with `content-type: application/json`.
    pub fn post_json(url: &str, body: &serde_json::Value) -> HttpRequest {
        HttpRequest::post(url, body.to_string()).header("content-type", "application/json")
    }

    /// Adds a request header.
    pub fn header(mut self, name: &str, value: &str) -> HttpRequest {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A small OpenAI chat-completion request body.
    pub fn openai_chat_body(prompt: &str, stream: bool) -> serde_json::Value {
        json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": prompt},
            ],
            "stream": stream,
        })
    }

    /// Parameters handed to the Python and Node scripts.
    fn params(&self) -> serde_json::Value {
        json!({
            "method": self.method,
            "url": self.url,
            "headers": self.headers,
            "body_hex": self.body.as_deref().map(hex),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Which HTTP version curl asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpVersion {
    /// curl's default (HTTP/2 over TLS when the server offers it).
    #[default]
    Default,
    /// `--http1.1`
    Http11,
    /// `--http2`
    Http2,
}

/// What curl saw.
#[derive(Debug, Clone)]
pub struct CurlResponse {
    pub status: u16,
    /// `1.1` or `2`, from `%{http_version}`.
    pub http_version: String,
    /// Response headers of the final response (names lower-case).
    pub headers: Vec<(String, String)>,
    /// Trailers (names lower-case).
    pub trailers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Issuer of the server certificate, as curl prints it (`O=..., CN=...`).
    pub issuer: Option<String>,
    /// Subject of the server certificate, as curl prints it.
    pub subject: Option<String>,
    /// The client's own port (`%{local_port}`).
    pub local_port: u16,
    /// Where curl thinks it connected (after a connect rewrite, the rewritten address).
    pub remote: Option<SocketAddr>,
    /// curl's verbose log (stderr).
    pub verbose: String,
}

impl CurlResponse {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("curl body is not JSON: {:?}", self.body_text()))
    }

    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

fn find_header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Runs curl for `req`; see [`curl_with`].
pub async fn curl(env: &ClientEnv<'_>, req: &HttpRequest, version: HttpVersion) -> Result<CurlResponse> {
    curl_with(env, req, version, &[]).await
}

/// Runs `curl -v` for `req` trusting only `env.ca_file`, with `extra_args`
/// before the URL. A non-zero curl exit is an error carrying curl's message.
pub async fn curl_with(
    env: &ClientEnv<'_>,
    req: &HttpRequest,
    version: HttpVersion,
    extra_args: &[&str],
) -> Result<CurlResponse> {
    let scratch = ScratchDir::new("curl")?;
    let body_out = scratch.path().join("body");
    let headers_out = scratch.path().join("headers");
    let mut args: Vec<OsString> = vec![
        "-sS".into(),
        "-v".into(),
        "--max-time".into(),
        format!("{:.3}", env.timeout.as_secs_f64()).into(),
        "--cacert".into(),
        env.ca_file.clone().into(),
        "-o".into(),
        body_out.clone().into(),
        "-D".into(),
        headers_out.clone().into(),
        "-w".into(),
        "%{json}".into(),
        "-X".into(),
        req.method.clone().into(),
    ];
    match version {
        HttpVersion::Default => {}
        HttpVersion::Http11 => args.push("--http1.1".into()),
        HttpVersion::Http2 => args.push("--http2".into()),
    }
    for (name, value) in &req.headers {
        args.push("-H".into());
        args.push(format!("{name}: {value}").into());
    }
    if let Some(body) = &req.body {
        let body_in = scratch.path().join("request-body");
        std::fs::write(&body_in, body).context("write request body")?;
        args.push("--data-binary".into());
        let mut at = OsString::from("@");
        at.push(&body_in);
        args.push(at);
    }
    args.extend(extra_args.iter().map(OsString::from));
    args.push(req.url.clone().into());

    let out = run(env, &tool("curl"), &args, &[]).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verbose = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("curl {} {} failed ({}): {}", req.method, req.url, out.status, verbose.trim());
    }
    #[derive(Deserialize)]
    struct WriteOut {
        http_code: u16,
        http_version: String,
        local_port: u16,
        remote_ip: String,
        remote_port: u16,
    }
    let w: WriteOut =
        serde_json::from_str(stdout.trim()).with_context(|| format!("parse curl write-out {stdout:?}"))?;
    let body = std::fs::read(&body_out).unwrap_or_default();
    let header_text = std::fs::read_to_string(&headers_out).unwrap_or_default();
    let (headers, trailers) = split_header_dump(&header_text);
    Ok(CurlResponse {
        status: w.http_code,
        http_version: w.http_version,
        headers,
        trailers,
        body,
        issuer: verbose_field(&verbose, "issuer:"),
        subject: verbose_field(&verbose, "subject:"),
        local_port: w.local_port,
        remote: w.remote_ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, w.remote_port)),
        verbose,
    })
}

/// Header or trailer fields: lower-case name, value.
type Fields = Vec<(String, String)>;

/// Headers and trailers of the last response in a `curl -D` dump, names
/// lower-case. The dump holds one block per response (e.g. after a
/// `100 Continue`); curl appends trailers (HTTP/1.1 chunked and HTTP/2) after
/// the blank line that ends the final head. Its verbose log shows HTTP/2
/// trailers but not HTTP/1.1 ones.
fn split_header_dump(text: &str) -> (Fields, Fields) {
    let mut headers = Vec::new();
    let mut trailers = Vec::new();
    let mut after_head = false;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("HTTP/") {
            headers.clear();
            trailers.clear();
            after_head = false;
        } else if line.is_empty() {
            after_head = true;
        } else if let Some((name, value)) = line.split_once(':') {
            let field = (name.trim().to_ascii_lowercase(), value.trim().to_owned());
            if after_head {
                trailers.push(field);
            } else {
                headers.push(field);
            }
        }
    }
    (headers, trailers)
}

/// The value after `*  <key>` in curl's verbose log (e.g. `*  issuer: CN=x`).
fn verbose_field(verbose: &str, key: &str) -> Option<String> {
    verbose.lines().find_map(|line| {
        let rest = line.strip_prefix('*')?.trim_start();
        rest.strip_prefix(key).map(|v| v.trim().to_owned())
    })
}

/// One response of a [`python_https`] run.
#[derive(Debug, Clone, Deserialize)]
pub struct PyResponse {
    pub status: u16,
    pub reason: String,
    /// `11` for HTTP/1.1, as `http.client` reports it.
    pub version: u16,
    pub headers: Vec<(String, String)>,
    /// The body, decoded as UTF-8 (invalid bytes replaced).
    pub body: String,
    /// The client's port on the connection that carried this request.
    pub local_port: u16,
}

impl PyResponse {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("python body is not JSON: {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// What Python's `http.client` saw over one kept-alive connection.
#[derive(Debug, Clone, Deserialize)]
pub struct PyHttpsResult {
    pub responses: Vec<PyResponse>,
    /// Issuer of the server certificate, `getpeercert()` as `O=..., CN=...`.
    pub issuer: String,
    /// Subject of the server certificate, same form.
    pub subject: String,
    /// TLS version, e.g. `TLSv1.3`.
    pub tls_version: String,
    /// The client's port on the first connection.
    pub local_port: u16,
}

impl PyHttpsResult {
    pub fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(|r| r.status).collect()
    }
}

/// Sends `requests` in order over ONE `http.client.HTTPSConnection`
/// (keep-alive), trusting only `env.ca_file`. All URLs must share an origin.
pub async fn python_https(env: &ClientEnv<'_>, requests: &[HttpRequest]) -> Result<PyHttpsResult> {
    let Some(first) = requests.first() else {
        bail!("python_https needs at least one request");
    };
    let first_origin = origin(&first.url)?;
    for r in requests {
        if origin(&r.url)? != first_origin {
            bail!("python_https: {} is not on {first_origin}", r.url);
        }
    }
    let params = json!({
        "ca_file": env.ca_file,
        "timeout": env.timeout.as_secs_f64(),
        "requests": requests.iter().map(HttpRequest::params).collect::<Vec<_>>(),
    });
    run_python(env, PY_HTTPS_BODY, &params).await
}

/// `scheme://authority` of a URL.
fn origin(url: &str) -> Result<&str> {
    let after_scheme = url.find("://").map(|i| i + 3).with_context(|| format!("not a URL: {url}"))?;
    let end = url[after_scheme..].find(['/', '?', '#']).map_or(url.len(), |i| after_scheme + i);
    Ok(&url[..end])
}

/// One server-sent event and when it arrived.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SseEvent {
    /// The text after `data:`, trimmed.
    pub data: String,
    /// Milliseconds from just before the request was sent (monotonic clock).
    pub at_ms: f64,
}

/// A streamed response read incrementally.
#[derive(Debug, Clone, Deserialize)]
pub struct StreamResult {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Every `data:` line, with its arrival time.
    pub events: Vec<SseEvent>,
    /// The whole body, UTF-8 (invalid bytes replaced).
    pub body: String,
    /// When the response head arrived.
    pub headers_ms: f64,
    /// When the body ended.
    pub done_ms: f64,
    /// The client's own port (Python only; 0 for Node).
    #[serde(default)]
    pub local_port: u16,
}

impl StreamResult {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("body is not JSON: {:?}", self.body))
    }
}

/// Sends `req` with Python's `http.client` and reads the response line by
/// line as it arrives, timing every `data:` event.
pub async fn python_sse(env: &ClientEnv<'_>, req: &HttpRequest) -> Result<StreamResult> {
    let params = json!({
        "ca_file": env.ca_file,
        "timeout": env.timeout.as_secs_f64(),
        "request": req.params(),
    });
    run_python(env, PY_SSE_BODY, &params).await
}

/// One echoed WebSocket frame.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct WsFrame {
    /// 1 text, 2 binary, 8 close, 9 ping, 10 pong.
    pub opcode: u8,
    pub text: String,
}

/// What the standard-library WebSocket client saw.
#[derive(Debug, Clone, Deserialize)]
pub struct WsResult {
    /// Status of the upgrade response (101 on success).
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Whether `Sec-WebSocket-Accept` matched the key sent.
    pub accept_ok: bool,
    /// Frames received, one per message sent (empty unless upgraded).
    pub echoes: Vec<WsFrame>,
    /// Whether the server answered the client's close with a close.
    pub closed_cleanly: bool,
    pub issuer: String,
    pub subject: String,
    pub local_port: u16,
}

/// WebSocket over TLS with nothing but Python's standard library: sends the
/// HTTP/1.1 upgrade to `url` (`wss://host/path`), checks `101` and
/// `Sec-WebSocket-Accept`, sends each message as one masked text frame and
/// reads one frame back per message, then closes.
pub async fn python_ws(env: &ClientEnv<'_>, url: &str, messages: &[&str]) -> Result<WsResult> {
    let params = json!({
        "ca_file": env.ca_file,
        "timeout": env.timeout.as_secs_f64(),
        "url": url,
        "messages": messages,
    });
    run_python(env, PY_WS_BODY, &params).await
}

/// A conversation with the `websockets` package (the client Python agents
/// use; it offers `permessage-deflate` unless told not to).
#[derive(Debug, Clone, Serialize)]
pub struct WsConversation {
    pub url: String,
    /// Connect here instead of the URL's host (SNI and `Host` stay the URL's).
    pub connect_to: Option<std::net::SocketAddr>,
    /// Offer `permessage-deflate` (the package's default).
    pub deflate: bool,
    /// Extra headers of the upgrade request.
    pub headers: Vec<(String, String)>,
    /// Text messages to send, in order, before reading.
    pub send: Vec<String>,
    /// Stop reading after a message containing this.
    pub until: Option<String>,
}

/// What the `websockets` client saw.
#[derive(Debug, Clone, Deserialize)]
pub struct WsConversationResult {
    /// Status of a refused upgrade (and its body).
    pub status: Option<u16>,
    pub body: Option<String>,
    /// The extensions the server's 101 agreed to.
    pub extensions: Option<String>,
    /// Messages received (binary ones decoded as UTF-8).
    pub received: Vec<String>,
    /// The server's close code and reason, if it closed.
    pub close_code: Option<u16>,
    pub close_reason: Option<String>,
    /// Reading stopped on the timeout.
    pub timed_out: bool,
}

/// Talks to a WebSocket with the `websockets` package, trusting `env.ca_file`.
pub async fn python_websockets(env: &ClientEnv<'_>, conversation: &WsConversation) -> Result<WsConversationResult> {
    let params = json!({
        "ca_file": env.ca_file,
        "timeout": env.timeout.as_secs_f64(),
        "c": conversation,
    });
    run_python(env, PY_WEBSOCKETS_BODY, &params).await
}

// The asyncio client, not `websockets.sync`: the sync client reads the TLS
// socket in a thread while another writes it, and Python's `ssl` objects are
// not safe for that. On a busy machine an upgrade request written while the
// reader was inside `SSL_read` (processing the server's session tickets) was
// lost now and then, and the reader then hung the client's exit. asyncio does
// all TLS on one thread.
const PY_WEBSOCKETS_BODY: &str = include_str!("clients/websockets.py");

/// Node's built-in `fetch` (undici, HTTP/1.1): trusts `env.ca_file` through
/// `NODE_EXTRA_CA_CERTS` (on top of Node's built-in roots), reads the body as
/// a stream and times every `data:` line.
pub async fn node_fetch(env: &ClientEnv<'_>, req: &HttpRequest) -> Result<StreamResult> {
    let params = json!({
        "timeout": env.timeout.as_secs_f64(),
        "request": req.params(),
    });
    let out = run(
        env,
        &tool("node"),
        &["-e".into(), NODE_FETCH.into()],
        &[(PARAMS_VAR, params.to_string().into()), ("NODE_EXTRA_CA_CERTS", env.ca_file.clone().into())],
    )
    .await?;
    parse_script_output("node", &out)
}

/// Runs [`PY_PRELUDE`] followed by `body` with `python3 -c`, `params` in
/// [`PARAMS_VAR`], and parses the JSON it prints.
async fn run_python<T: for<'de> Deserialize<'de>>(
    env: &ClientEnv<'_>,
    body: &str,
    params: &serde_json::Value,
) -> Result<T> {
    let script = [PY_PRELUDE, "\n", body].concat();
    let out =
        run(env, &tool("python3"), &["-c".into(), script.into()], &[(PARAMS_VAR, params.to_string().into())]).await?;
    parse_script_output("python", &out)
}

/// Runs a Python script placed as `env` says, with extra environment
/// variables, and returns its raw output (for clients such as the providers'
/// SDKs whose scripts the tests write themselves).
pub async fn python_script(env: &ClientEnv<'_>, script: &str, vars: &[(&str, &str)]) -> Result<Output> {
    let vars: Vec<(&str, OsString)> = vars.iter().map(|(k, v)| (*k, OsString::from(v))).collect();
    run(env, &tool("python3"), &["-c".into(), script.into()], &vars).await
}

/// Runs any program placed as `env` says (a copy of an interpreter under
/// another name, say), with extra environment variables; its raw output.
pub async fn program(env: &ClientEnv<'_>, program: &Path, args: &[&str], vars: &[(&str, &str)]) -> Result<Output> {
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    let vars: Vec<(&str, OsString)> = vars.iter().map(|(k, v)| (*k, OsString::from(v))).collect();
    run(env, program, &args, &vars).await
}

/// The scripts print one JSON object: the result, or `{"error": ...}` with a
/// non-zero exit.
fn parse_script_output<T: for<'de> Deserialize<'de>>(who: &str, out: &Output) -> Result<T> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let value: serde_json::Value = match serde_json::from_str(stdout.trim()) {
        Ok(v) => v,
        Err(e) => {
            bail!("{who} client ({}) printed no result ({e}); stdout: {stdout:?}; stderr: {stderr:?}", out.status)
        }
    };
    if let Some(error) = value.get("error") {
        bail!("{who} client failed: {error}; stderr: {}", stderr.trim());
    }
    if !out.status.success() {
        bail!("{who} client exited {}; stderr: {}", out.status, stderr.trim());
    }
    serde_json::from_value(value).with_context(|| format!("parse {who} client result {stdout}"))
}

/// Runs `program args` placed as `env` says (cgroup, namespace, hosts file),
/// without proxy variables, killing it if it outlives `env.timeout` plus a grace.
pub(super) async fn run(
    env: &ClientEnv<'_>,
    program: &Path,
    args: &[OsString],
    vars: &[(&str, OsString)],
) -> Result<Output> {
    let mut cmd = match env.hosts {
        Some(hosts) => {
            let mut cmd = tokio::process::Command::new(tool("unshare"));
            cmd.args(["--mount", "--propagation", "private", "--"])
                .arg(tool("sh"))
                .args(["-c", BIND_HOSTS, "sh"])
                .arg(hosts.path())
                .arg(program);
            cmd
        }
        None => tokio::process::Command::new(program),
    };
    cmd.args(args);
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = format!("{}", program.display());
    let mut child = spawn_in_tokio(&mut cmd, env.netns, env.cgroup).with_context(|| format!("spawn {what}"))?;
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let limit = env.timeout + KILL_GRACE;
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => status.with_context(|| format!("wait for {what}"))?,
        Err(_) => {
            let _ = child.kill().await;
            let out = collect(stdout).await;
            let err = collect(stderr).await;
            bail!(
                "{what} timed out after {limit:?}; stdout so far: {:?}; stderr so far: {:?}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
    };
    Ok(Output { status, stdout: collect(stdout).await, stderr: collect(stderr).await })
}

fn read_all<R: tokio::io::AsyncRead + Unpin + Send + 'static>(pipe: Option<R>) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            // Keep what arrived even if the read fails part way.
            let _ = pipe.read_to_end(&mut buf).await;
        }
        buf
    })
}

/// The bytes a reader collected; waits briefly, since a background process
/// could hold the pipe open after the client exits.
async fn collect(reader: tokio::task::JoinHandle<Vec<u8>>) -> Vec<u8> {
    match tokio::time::timeout(Duration::from_secs(2), reader).await {
        Ok(Ok(bytes)) => bytes,
        _ => Vec::new(),
    }
}

/// Shared Python prelude: parameters, certificate name formatting, the
/// error convention, and a TLS context that trusts only the given bundle.
const PY_PRELUDE: &str = include_str!("clients/prelude.py");
/// [`python_https`]: requests over one kept-alive connection.
const PY_HTTPS_BODY: &str = include_str!("clients/https.py");
/// [`python_sse`]: a response read line by line, every `data:` timed.
const PY_SSE_BODY: &str = include_str!("clients/sse.py");
/// [`python_ws`]: a WebSocket client on the standard library alone.
const PY_WS_BODY: &str = include_str!("clients/ws.py");
/// [`node_fetch`], run with `node -e`.
const NODE_FETCH: &str = include_str!("clients/node_fetch.js");

#[cfg(test)]
mod tests {
    use super::super::provider::{FakeProvider, PROVIDER_CERT_NAME, TEST_CA_NAME, TestPki};
    use super::super::require_privileges;
    use super::*;

    const OPENAI: &str = "https://api.openai.com";

    /// A namespace with the fake provider at 198.18.0.10:443, a cgroup for the
    /// clients, the test CA on disk, and a hosts file for the provider names.
    struct Fixture {
        provider: FakeProvider,
        hosts: HostsFile,
        _scratch: ScratchDir,
        ca_file: PathBuf,
        cgroup: Cgroup,
        netns: Netns,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            let netns = Netns::new(name).expect("netns");
            netns.add_addr("lo", "198.18.0.10/32").expect("addr");
            let pki = TestPki::with_defaults().expect("pki");
            let provider = FakeProvider::start_in(&netns, SocketAddr::new(PROVIDER_IP, 443), &pki).expect("provider");
            let scratch = ScratchDir::new(name).expect("scratch");
            let ca_file = pki.write_ca(scratch.path()).expect("ca");
            Fixture {
                provider,
                hosts: HostsFile::with_defaults().expect("hosts"),
                _scratch: scratch,
                ca_file,
                cgroup: Cgroup::new(name).expect("cgroup"),
                netns,
            }
        }

        fn env(&self) -> ClientEnv<'_> {
            ClientEnv::new(&self.ca_file)
                .in_netns(&self.netns)
                .in_cgroup(&self.cgroup)
                .with_hosts(&self.hosts)
                .with_timeout(Duration::from_secs(15))
        }
    }

    fn chat(prompt: &str) -> HttpRequest {
        HttpRequest::post_json(&format!("{OPENAI}/v1/chat/completions"), &HttpRequest::openai_chat_body(prompt, false))
    }

    #[test]
    fn parses_curl_output() {
        let verbose = "* Server certificate:\n*  subject: O=Interceptor Tests; CN=fake-provider\n\
            *  start date: x\n*  issuer: O=Interceptor Tests; CN=Interceptor Test Upstream CA\n";
        assert_eq!(
            verbose_field(verbose, "issuer:").as_deref(),
            Some("O=Interceptor Tests; CN=Interceptor Test Upstream CA")
        );
        assert_eq!(verbose_field(verbose, "subject:").as_deref(), Some("O=Interceptor Tests; CN=fake-provider"));
        let field = |n: &str, v: &str| (n.to_owned(), v.to_owned());
        let dump = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: a/b\r\n\
            X-A: 1:2\r\n\r\nX-Checksum: abc\r\n\r\n";
        assert_eq!(
            split_header_dump(dump),
            (vec![field("content-type", "a/b"), field("x-a", "1:2")], vec![field("x-checksum", "abc")])
        );
        assert_eq!(origin("https://a.b:8443/x?y").expect("origin"), "https://a.b:8443");
        assert_eq!(origin("https://a.b?q").expect("origin"), "https://a.b");
        assert!(origin("a.b/x").is_err());
        assert_eq!(hex(b"\x00\xffA"), "00ff41");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_timeout_kills_the_process() {
        let env = ClientEnv::new("/dev/null").with_timeout(Duration::from_millis(100));
        let started = std::time::Instant::now();
        let err = run(&env, &tool("sleep"), &["30".into()], &[]).await.expect_err("must time out");
        assert!(format!("{err:#}").contains("timed out"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn curl_http1_and_http2() {
        if !require_privileges("curl_http1_and_http2") {
            return;
        }
        let f = Fixture::new("curl_versions");
        let env = f.env();
        let req = chat("hello");
        let body_len = req.body.as_ref().map_or(0, Vec::len);

        let h1 = curl(&env, &req, HttpVersion::Http11).await.expect("curl h1");
        assert_eq!((h1.status, h1.http_version.as_str()), (200, "1.1"), "{}", h1.verbose);
        assert_eq!(h1.json().expect("json")["echo_len"], body_len);
        assert_eq!(h1.header("content-type"), Some("application/json"));
        assert!(h1.issuer.as_deref().is_some_and(|i| i.contains(TEST_CA_NAME)), "{h1:?}");
        assert!(h1.subject.as_deref().is_some_and(|s| s.contains(PROVIDER_CERT_NAME)), "{h1:?}");
        assert_eq!(h1.remote, Some(SocketAddr::new(PROVIDER_IP, 443)));

        let h2 = curl(&env, &req, HttpVersion::Http2).await.expect("curl h2");
        assert_eq!((h2.status, h2.http_version.as_str()), (200, "2"), "{}", h2.verbose);

        let seen = f.provider.requests();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].version, "HTTP/1.1");
        assert_eq!(seen[1].version, "HTTP/2.0");
        assert_eq!(seen[1].alpn.as_deref(), Some("h2"));
        for (r, local_port) in seen.iter().zip([h1.local_port, h2.local_port]) {
            assert_eq!(r.sni.as_deref(), Some("api.openai.com"));
            assert_eq!(r.path, "/v1/chat/completions");
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert_eq!(r.body.len(), body_len);
            assert_eq!(r.peer.port(), local_port);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn curl_trailers_status_and_big() {
        if !require_privileges("curl_trailers_status_and_big") {
            return;
        }
        let f = Fixture::new("curl_routes");
        let env = f.env();
        let trailers = HttpRequest::get(&format!("{OPENAI}/trailers"));
        let h2 = curl(&env, &trailers, HttpVersion::Http2).await.expect("curl h2");
        assert_eq!(h2.body_text(), "part one\npart two\n");
        assert_eq!(find_header(&h2.trailers, "x-checksum"), Some("abc"), "{}", h2.verbose);
        let h1 = curl(&env, &trailers.clone().header("te", "trailers"), HttpVersion::Http11).await.expect("curl h1");
        assert_eq!(h1.header("transfer-encoding"), Some("chunked"), "{}", h1.verbose);
        assert_eq!(find_header(&h1.trailers, "x-checksum"), Some("abc"), "{}", h1.verbose);

        let unavailable = curl(&env, &HttpRequest::get(&format!("{OPENAI}/status/503")), HttpVersion::Default)
            .await
            .expect("curl 503");
        assert_eq!(unavailable.status, 503);
        assert!(unavailable.body.is_empty());

        let big = curl(&env, &HttpRequest::get(&format!("{OPENAI}/big?bytes=3000000")), HttpVersion::Default)
            .await
            .expect("curl big");
        assert_eq!(big.body.len(), 3_000_000);
        let missing = curl(&env, &HttpRequest::get(&format!("{OPENAI}/v1/nothing")), HttpVersion::Default)
            .await
            .expect("curl 404");
        assert_eq!(missing.status, 404);
        assert_eq!(missing.json().expect("json")["error"]["code"], "not_found");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_reject_an_untrusted_ca() {
        if !require_privileges("clients_reject_an_untrusted_ca") {
            return;
        }
        let f = Fixture::new("untrusted");
        let scratch = ScratchDir::new("untrusted_ca").expect("scratch");
        let other = TestPki::with_defaults().expect("pki").write_ca(scratch.path()).expect("ca");
        let mut env = f.env();
        env.ca_file = other;
        let err = curl(&env, &chat("x"), HttpVersion::Default).await.expect_err("curl must refuse");
        assert!(format!("{err:#}").contains("certificate"), "{err:#}");
        let err = python_https(&env, &[chat("x")]).await.expect_err("python must refuse");
        assert!(format!("{err:#}").contains("CERTIFICATE_VERIFY_FAILED"), "{err:#}");
        let err = node_fetch(&env, &chat("x")).await.expect_err("node must refuse");
        assert!(format!("{err:#}").contains("UNABLE_TO_VERIFY_LEAF_SIGNATURE"), "{err:#}");
        assert!(f.provider.requests().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn python_keep_alive_uses_one_connection() {
        if !require_privileges("python_keep_alive_uses_one_connection") {
            return;
        }
        let f = Fixture::new("py_keepalive");
        let requests = [
            chat("one"),
            HttpRequest::get(&format!("{OPENAI}/status/204")),
            chat("three").header("x-fake-reply", "custom words"),
        ];
        let result = python_https(&f.env(), &requests).await.expect("python");
        assert_eq!(result.statuses(), vec![200, 204, 200]);
        assert!(result.issuer.contains(TEST_CA_NAME), "{result:?}");
        assert!(result.subject.contains(PROVIDER_CERT_NAME), "{result:?}");
        assert!(result.tls_version.starts_with("TLSv1."), "{result:?}");
        let reply = result.responses[2].json().expect("json");
        assert_eq!(reply["choices"][0]["message"]["content"], "custom words");
        assert!(result.responses.iter().all(|r| r.version == 11 && r.local_port == result.local_port));

        assert_eq!(f.provider.handshakes(), 1);
        let seen = f.provider.requests();
        assert_eq!(seen.len(), 3);
        assert!(
            seen.iter().all(|r| r.connection == 1
                && r.peer.port() == result.local_port
                && r.alpn.as_deref() == Some("http/1.1"))
        );
        assert_eq!(seen[2].body, requests[2].body.clone().unwrap_or_default());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn python_sse_events_arrive_over_time() {
        if !require_privileges("python_sse_events_arrive_over_time") {
            return;
        }
        let f = Fixture::new("py_sse");
        let result = python_sse(&f.env(), &HttpRequest::get(&format!("{OPENAI}/sse?n=5&interval_ms=200")))
            .await
            .expect("python sse");
        assert_eq!(result.status, 200);
        assert_eq!(result.header("content-type"), Some("text/event-stream"));
        assert_eq!(result.events.len(), 6, "{result:?}");
        assert!(result.events[0].data.starts_with(r#"{"i":0,"#), "{result:?}");
        assert_eq!(result.events[5].data, "[DONE]");
        let first = result.events[0].at_ms;
        let last = result.events[4].at_ms;
        assert!(first < last - 400.0, "{result:?}");
        assert!(result.events.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "{result:?}");
        assert_eq!(f.provider.requests()[0].peer.port(), result.local_port);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn python_websocket_echo() {
        if !require_privileges("python_websocket_echo") {
            return;
        }
        let f = Fixture::new("py_ws");
        let long = "x".repeat(300);
        let result = python_ws(&f.env(), "wss://api.openai.com/ws", &["hello", &long]).await.expect("python ws");
        assert_eq!(result.status, 101, "{result:?}");
        assert!(result.accept_ok, "{result:?}");
        assert_eq!(
            result.echoes,
            vec![WsFrame { opcode: 1, text: "hello".into() }, WsFrame { opcode: 1, text: long.clone() }]
        );
        assert!(result.closed_cleanly, "{result:?}");
        assert!(result.issuer.contains(TEST_CA_NAME));
        let seen = f.provider.requests();
        assert_eq!(seen[0].path, "/ws");
        assert_eq!(seen[0].peer.port(), result.local_port);

        // Not an upgrade target: the status comes back, no echoes.
        let refused = python_ws(&f.env(), "wss://api.openai.com/status/403", &["x"]).await.expect("python ws");
        assert_eq!(refused.status, 403);
        assert!(refused.echoes.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_fetch_post_and_sse() {
        if !require_privileges("node_fetch_post_and_sse") {
            return;
        }
        let f = Fixture::new("node_fetch");
        let req = chat("from node");
        let post = node_fetch(&f.env(), &req).await.expect("node post");
        assert_eq!(post.status, 200, "{post:?}");
        assert_eq!(post.json().expect("json")["echo_len"], req.body.as_ref().map_or(0, Vec::len));

        let sse = node_fetch(&f.env(), &HttpRequest::get(&format!("{OPENAI}/sse?n=5&interval_ms=200")))
            .await
            .expect("node sse");
        assert_eq!(sse.status, 200);
        assert_eq!(sse.events.len(), 6, "{sse:?}");
        assert!(sse.events[0].at_ms < sse.events[4].at_ms - 400.0, "{sse:?}");

        let seen = f.provider.requests();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].sni.as_deref(), Some("api.openai.com"));
        assert_eq!(seen[0].version, "HTTP/1.1");
        assert_eq!(seen[0].body, req.body.clone().unwrap_or_default());
        assert_eq!(seen[1].path, "/sse?n=5&interval_ms=200");
        // undici's own headers: a guardrail sees these on every Node request.
        assert_eq!(seen[0].header("user-agent"), Some("node"));
        assert_eq!(seen[0].header("sec-fetch-mode"), Some("cors"));
    }
}
