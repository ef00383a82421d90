//! The cluster CA's X.509 name constraints, seen from the clients' side: a
//! certificate the CA's key signs for a name outside the intercepted AI
//! domains (or for an IP address) is rejected by Python, Node, curl and Go,
//! even when the key is stolen and the interceptor's own refusal to mint it
//! is bypassed; one for an AI domain is accepted. The same outside
//! certificate from an unconstrained CA is accepted, so the refusal is the
//! constraints' doing.
//!
//! Unprivileged: a TLS server on 127.0.0.1, the clients told the server name
//! apart from the address. The CA is made by the real binary
//! (`interceptor ca create-cluster`) from a configuration's AI domains.

#[allow(dead_code)] // Shared with the webhook tests, which use the rest.
mod trust_clients;

use std::process::Command;

use anyhow::{Context as _, Result};
use interceptor::testing::interceptor_bin;
use trust_clients::{Client, TlsServer, Trust, available, connect, mint_leaf};

const CLIENTS: &[Client] = &[Client::PythonSsl, Client::Node, Client::Curl, Client::Go];

/// A configuration whose AI domains give the constraints `api.openai.com`,
/// `githubcopilot.com` (from `*.githubcopilot.com`) and `amazonaws.com`
/// (from `bedrock-runtime.*.amazonaws.com`).
const CONFIG: &str = r#"
[domains]
ai = ["api.openai.com", "*.githubcopilot.com", "bedrock-runtime.*.amazonaws.com"]
"#;

fn create_cluster_ca(dir: &std::path::Path, extra: &[&str]) -> Result<()> {
    let config = dir.join("config.toml");
    std::fs::write(&config, CONFIG)?;
    let out = Command::new(interceptor_bin())
        .args(["--config"])
        .arg(&config)
        .args(["ca", "create-cluster", "--out"])
        .arg(dir.join("ca"))
        .args(extra)
        .output()
        .context("running interceptor ca create-cluster")?;
    assert!(out.status.success(), "create-cluster failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The private key is never printed.
    assert!(!stdout.contains("PRIVATE KEY") && !stdout.contains("LS0tLS1CRUdJTiBQUklWQVRF"), "{stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reject_leaves_outside_the_name_constraints() -> Result<()> {
    let test = "clients_reject_leaves_outside_the_name_constraints";
    let tmp = tempfile::tempdir()?;
    create_cluster_ca(tmp.path(), &[])?;
    let ca_dir = tmp.path().join("ca");
    let ca = Trust::Only(ca_dir.join("ca.crt"));

    // The shape of the CA the clients meet.
    let text = Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(ca_dir.join("ca.crt")).output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("X509v3 Name Constraints: critical"), "{text}");
    for expected in ["DNS:api.openai.com", "DNS:githubcopilot.com", "DNS:amazonaws.com", "IP:0.0.0.0/0.0.0.0"] {
        assert!(text.contains(expected), "{expected} missing:\n{text}");
    }

    let inside = ["api.openai.com", "api.individual.githubcopilot.com", "bedrock-runtime.eu-west-1.amazonaws.com"];
    let outside = ["www.example.com", "openai.com", "api.openai.com.example.net", "127.0.0.1"];
    let mut failures = Vec::new();
    for client in CLIENTS.iter().copied().filter(|c| available(*c, test)) {
        for name in inside {
            let server = TlsServer::start_leaf(&ca_dir, name).await?;
            let verdict = connect(client, &server, name, &ca).await?;
            if !verdict.accepted {
                failures.push(format!("{client:?} refused {name} (inside): {}", verdict.detail));
            }
        }
        for name in outside {
            let server = TlsServer::start_leaf(&ca_dir, name).await?;
            let verdict = connect(client, &server, name, &ca).await?;
            if verdict.accepted {
                failures.push(format!("{client:?} ACCEPTED {name} (outside the constraints): {}", verdict.detail));
            } else if !mentions_constraints(client, &verdict.detail) {
                failures.push(format!("{client:?} refused {name} for another reason: {}", verdict.detail));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Whether a client's refusal names the constraints (not, say, an unknown
/// issuer, which would make the test prove nothing).
fn mentions_constraints(client: Client, detail: &str) -> bool {
    let lower = detail.to_lowercase();
    match client {
        // OpenSSL: X509_V_ERR_PERMITTED_VIOLATION / EXCLUDED_VIOLATION.
        Client::PythonSsl | Client::Curl | Client::Node | Client::PythonRequests => {
            lower.contains("permitted subtree violation") || lower.contains("excluded subtree violation")
        }
        // Go: "x509: a root or intermediate certificate is not authorized
        // to sign for this name" (or "... this IP").
        Client::Go => lower.contains("not authorized to sign"),
        Client::Java => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconstrained_ca_signs_for_anything() -> Result<()> {
    // The control: the same outside names under a CA made with
    // --no-name-constraints are accepted, so the refusals above come from
    // the constraints and nothing else.
    let test = "an_unconstrained_ca_signs_for_anything";
    let tmp = tempfile::tempdir()?;
    create_cluster_ca(tmp.path(), &["--no-name-constraints"])?;
    let ca_dir = tmp.path().join("ca");
    let ca = Trust::Only(ca_dir.join("ca.crt"));
    let mut failures = Vec::new();
    for client in CLIENTS.iter().copied().filter(|c| available(*c, test)) {
        for name in ["www.example.com", "127.0.0.1"] {
            let server = TlsServer::start_leaf(&ca_dir, name).await?;
            let verdict = connect(client, &server, name, &ca).await?;
            if !verdict.accepted {
                failures.push(format!("{client:?} refused {name}: {}", verdict.detail));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

impl TlsServer {
    async fn start_leaf(ca_dir: &std::path::Path, name: &str) -> Result<TlsServer> {
        let (chain, key) = mint_leaf(ca_dir, name)?;
        TlsServer::start(chain, key).await
    }
}
