//! Real TLS clients (Python's `ssl` and `requests`, Node's `tls`/`https`, the curl
//! command line, Go's `crypto/tls`, Java's `SSLSocket`) asked to connect to a
//! loopback TLS server presenting a given certificate, and reporting whether
//! they accepted it. Shared by the name-constraint and webhook tests.
//!
//! Every client is told its server name separately from the address (SNI,
//! `--resolve`), so names such as `api.openai.com` never reach a resolver.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// The variables that change where a runtime finds its roots; removed from
/// every client's environment so that only what a test gives counts.
pub const TRUST_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "JAVA_TOOL_OPTIONS",
];

/// How long one client may take (Go's first build is the slowest part).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Python's `ssl` module (OpenSSL).
    PythonSsl,
    /// Python `requests` (certifi unless `REQUESTS_CA_BUNDLE`).
    PythonRequests,
    /// Node's `tls` (its own roots, plus `NODE_EXTRA_CA_CERTS`).
    Node,
    /// The curl command line (OpenSSL).
    Curl,
    /// Go's `crypto/tls` and `crypto/x509`.
    Go,
    /// Java's default `SSLSocketFactory` (`javax.net.ssl.trustStore`).
    Java,
}

/// What a client trusts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// This PEM file, and nothing else.
    Only(PathBuf),
    /// The runtime's defaults with these environment variables.
    Env(Vec<(String, String)>),
}

/// A TLS server on 127.0.0.1 presenting one certificate chain; it answers
/// every request with `200 ok` and closes.
pub struct TlsServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsServer {
    pub async fn start(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<TlsServer> {
        let config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that rejects the certificate ends here.
                    let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(30), acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                            _ => break,
                        }
                    }
                    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Ok(TlsServer { addr, task })
    }
}

/// A leaf for `name` (DNS name or IP address) signed by the CA in
/// `ca_dir` (`ca.crt`, `ca.key`) with rcgen directly: no name-constraint
/// check on our side, as an attacker holding the key would do it.
pub fn mint_leaf(ca_dir: &Path, name: &str) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.crt"))?;
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key"))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())?;
    let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?;
    Ok((vec![cert.der().clone(), ca_der], key_der))
}

/// The outcome of one connection attempt.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub accepted: bool,
    /// The client's own words (its error message when it refused).
    pub detail: String,
}

/// Has `client` connect to `server` as `name` (a DNS name, or an IP
/// address: then no SNI) trusting `trust`.
pub async fn connect(client: Client, server: &TlsServer, name: &str, trust: &Trust) -> Result<Verdict> {
    let port = server.addr.port();
    let name = name.to_owned();
    let trust = trust.clone();
    tokio::task::spawn_blocking(move || connect_blocking(client, port, &name, &trust)).await?
}

fn connect_blocking(client: Client, port: u16, name: &str, trust: &Trust) -> Result<Verdict> {
    let scratch = tempfile::tempdir()?;
    let is_ip = name.parse::<std::net::IpAddr>().is_ok();
    let only = match trust {
        Trust::Only(path) => path.to_str().context("non-utf-8 path")?.to_owned(),
        Trust::Env(_) => String::new(),
    };
    let mut cmd = match client {
        Client::PythonSsl => {
            let mut cmd = Command::new("python3");
            cmd.args(["-c", PYTHON_SSL, name, &port.to_string(), &only]);
            cmd
        }
        Client::PythonRequests => {
            let mut cmd = Command::new("python3");
            cmd.args(["-c", PYTHON_REQUESTS, name, &port.to_string(), &only]);
            cmd
        }
        Client::Node => {
            let mut cmd = Command::new("node");
            cmd.args(["-e", NODE, name, &port.to_string(), &only]);
            cmd
        }
        Client::Curl => {
            let mut cmd = Command::new("curl");
            cmd.args(["-sS", "--max-time", "20"]);
            if !only.is_empty() {
                // Only that file: an empty directory as the CA path.
                cmd.args(["--cacert", &only, "--capath"]).arg(scratch.path());
            }
            let host = if is_ip {
                name.to_owned()
            } else {
                cmd.args(["--resolve", &format!("{name}:{port}:127.0.0.1")]);
                name.to_owned()
            };
            cmd.arg(format!("https://{host}:{port}/"));
            cmd
        }
        Client::Go => {
            let mut cmd = Command::new(go_client()?);
            cmd.args([name, &port.to_string(), &only]);
            cmd
        }
        Client::Java => {
            let source = scratch.path().join("Client.java");
            std::fs::write(&source, JAVA)?;
            let mut cmd = Command::new("java");
            cmd.arg(&source).args([name, &port.to_string()]);
            cmd
        }
    };
    for var in TRUST_VARS {
        cmd.env_remove(var);
    }
    if let Trust::Env(vars) = trust {
        for (k, v) in vars {
            cmd.env(k, v);
        }
    }
    let out = run_bounded(cmd, CLIENT_TIMEOUT).with_context(|| format!("running the {client:?} client"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let accepted = out.status.success() && (client == Client::Curl && stdout == "ok" || stdout == "OK");
    Ok(Verdict { accepted, detail: format!("{stdout} {stderr}").trim().to_owned() })
}

fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<std::process::Output> {
    use std::process::Stdio;
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!("timed out after {timeout:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a client's runtime is installed; otherwise the test prints
/// `SKIP` and leaves it out, or fails when `CI` is set.
pub fn available(client: Client, test: &str) -> bool {
    let (tool, probe): (&str, &[&str]) = match client {
        Client::PythonSsl => ("python3", &["-c", "import ssl"]),
        Client::PythonRequests => ("python3", &["-c", "import requests"]),
        Client::Node => ("node", &["--version"]),
        Client::Curl => ("curl", &["--version"]),
        Client::Go => ("go", &["version"]),
        Client::Java => ("java", &["-version"]),
    };
    if Command::new(tool).args(probe).output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    let reason = format!("{client:?} client not available (`{tool}`; `cargo xtask setup` installs it)");
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{test}: {reason} (CI is set, so not skipping)");
    }
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIP {test} ({client:?}): {reason}");
    false
}

/// The Go client, built once per test process.
fn go_client() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("interceptor-go-tls-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("main.go"), GO).map_err(|e| e.to_string())?;
        let bin = dir.join("client");
        let cache = std::env::temp_dir().join("interceptor-tests-gocache");
        let mut cmd = Command::new("go");
        cmd.current_dir(&dir)
            .args(["build", "-o"])
            .arg(&bin)
            .arg("main.go")
            .env("GOCACHE", &cache)
            .env("GOPATH", dir.join("gopath"))
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=mod")
            .env("GO111MODULE", "off");
        let out = run_bounded(cmd, Duration::from_secs(300)).map_err(|e| format!("{e:#}"))?;
        if !out.status.success() {
            return Err(format!("go build failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(bin)
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

const PYTHON_SSL: &str = r#"
import socket, ssl, sys, ipaddress
name, port, only = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=only) if only else ssl.create_default_context()
try:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        with ctx.wrap_socket(sock, server_hostname=name) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            tls.recv(100)
    print("OK")
except (ssl.SSLError, ssl.CertificateError) as e:
    print("ERR", e)
"#;

const PYTHON_REQUESTS: &str = r#"
import sys, requests
from requests.adapters import HTTPAdapter
name, port, only = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# Resolve the name to loopback inside this process only.
import socket
real = socket.getaddrinfo
socket.getaddrinfo = lambda host, *a, **k: real("127.0.0.1" if host == name else host, *a, **k)
try:
    r = requests.get(f"https://{name}:{port}/", timeout=20, verify=only or True)
    print("OK" if r.text == "ok" else "ERR body " + r.text)
except requests.exceptions.SSLError as e:
    print("ERR", e)
"#;

const NODE: &str = r#"
const tls = require('tls'); const fs = require('fs'); const net = require('net');
const [name, port, only] = process.argv.slice(1);
const opts = { host: '127.0.0.1', port: Number(port) };
if (!net.isIP(name)) opts.servername = name;
else opts.checkServerIdentity = (h, cert) => tls.checkServerIdentity(name, cert);
if (only) opts.ca = [fs.readFileSync(only)];
const s = tls.connect(opts, () => { s.write('GET / HTTP/1.1\r\nhost: x\r\n\r\n'); console.log('OK'); s.destroy(); });
s.on('error', e => { console.log('ERR ' + e.message); });
"#;

const GO: &str = r#"
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
)

func main() {
	name, port, only := os.Args[1], os.Args[2], os.Args[3]
	cfg := &tls.Config{ServerName: name}
	if only != "" {
		pem, err := os.ReadFile(only)
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(2)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		cfg.RootCAs = pool
	}
	conn, err := tls.Dial("tcp", "127.0.0.1:"+port, cfg)
	if err != nil {
		fmt.Println("ERR", err)
		return
	}
	conn.Write([]byte("GET / HTTP/1.1\r\nhost: x\r\n\r\n"))
	conn.Close()
	fmt.Println("OK")
}
"#;

const JAVA: &str = r#"
import javax.net.ssl.*;
import java.util.List;

public class Client {
    public static void main(String[] args) throws Exception {
        String name = args[0];
        int port = Integer.parseInt(args[1]);
        try (SSLSocket s = (SSLSocket) SSLSocketFactory.getDefault().createSocket("127.0.0.1", port)) {
            SSLParameters p = s.getSSLParameters();
            p.setServerNames(List.of(new SNIHostName(name)));
            p.setEndpointIdentificationAlgorithm("HTTPS");
            s.setSSLParameters(p);
            s.setSoTimeout(20000);
            s.startHandshake();
            s.getOutputStream().write("GET / HTTP/1.1\r\nhost: x\r\n\r\n".getBytes());
            System.out.println("OK");
        } catch (SSLException e) {
            System.out.println("ERR " + e);
        }
    }
}
"#;
