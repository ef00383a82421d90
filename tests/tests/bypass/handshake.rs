//! Handshake games at an AI address: a ClientHello sent late, none at all,
//! one without a server name, junk in a handshake record, or plain bytes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use interceptor::testing::{clients::python_script, require_privileges};
use interceptor_tests::stage::Stage;
use serde_json::Value;

use super::{PRIVATE_KEY, audit_events};

/// Each game in turn, against api.openai.com (the fake provider's address, a
/// configured target known by no name); prints what the client saw.
const GAMES: &str = r#"
import json, os, socket, ssl
key = os.environ["KEY"]
body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": key}]})
request = ("POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\n"
           "Content-Length: %d\r\n\r\n%s" % (len(body), body)).encode()
def connect():
    return socket.create_connection(("api.openai.com", 443), timeout=20)
def closed(sock):
    # Whether the interceptor closed the connection (rather than relaying it).
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
def unchecked():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
out = {}
# Says nothing until the interceptor stops waiting, then tries TLS anyway.
s = connect()
out["late"] = closed(s)
try:
    unchecked().wrap_socket(s, server_hostname="api.openai.com").sendall(request)
    out["late_sent"] = True
except OSError:
    out["late_sent"] = False
# A ClientHello without a server name, as Python sends with server_hostname=None.
s = connect()
try:
    t = unchecked().wrap_socket(s, server_hostname=None)
    t.sendall(request)
    out["no_sni"] = t.recv(200).decode(errors="replace") or "closed"
except OSError as e:
    out["no_sni"] = "refused: " + type(e).__name__
# A handshake record holding junk, then the request.
s = connect()
s.sendall(b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff" + request)
out["junk"] = closed(s)
# The request in the clear.
s = connect()
s.sendall(request)
out["plain"] = closed(s)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_games_at_an_ai_address_never_reach_the_provider() -> Result<()> {
    if !require_privileges("handshake_games_at_an_ai_address_never_reach_the_provider") {
        return Ok(());
    }
    // Lands in the stage's [tls] table: the interceptor waits one second.
    let stage = Stage::new("bypass_hello", "ebpf", "client_hello_timeout = \"1s\"")?;
    let out = python_script(&stage.env(), GAMES, &[("KEY", PRIVATE_KEY)]).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let seen: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("client printed {stdout:?}; stderr: {}", String::from_utf8_lossy(&out.stderr)))?;
    assert_eq!(seen["late"], true, "a late ClientHello is closed, not relayed: {seen}");
    assert_eq!(seen["junk"], true, "{seen}");
    assert_eq!(seen["plain"], true, "{seen}");
    assert!(!seen["no_sni"].as_str().unwrap_or_default().contains("HTTP/1.1 200"), "{seen}");

    // Not one connection reached the provider, let alone the key.
    assert_eq!(stage.provider.handshakes() + stage.provider.failed_handshakes(), 0, "{seen}");
    assert!(stage.provider.requests().is_empty());

    let expected = ["no ClientHello in time", "no server name", "cannot be parsed", "not TLS"];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events: Vec<Value> =
            audit_events(&stage.proxy).into_iter().filter(|e| e["event"] == "unclassified_connection").collect();
        let missing: Vec<_> =
            expected.iter().filter(|r| !events.iter().any(|e| e["reasons"].to_string().contains(*r))).collect();
        if missing.is_empty() {
            for e in &events {
                assert_eq!(e["decision"], "block", "{e}");
                assert_eq!(e["orig_dst"], "198.18.0.10:443", "{e}");
                assert_eq!(e["workload"]["comm"], "python3", "{e}");
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("no audit event for {missing:?}; log:\n{}", stage.proxy.log_text());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = stage.proxy.connections().iter().filter(|c| c["outcome"] == "refused_unclassified").count();
    assert_eq!(refused, 4, "{}", stage.proxy.log_text());
    Ok(())
}
