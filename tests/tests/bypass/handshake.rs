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

/// Sends the private key to Gemini on a connection made for
/// www.googleapis.com (same address, same parent domain), as HTTP/2
/// connection coalescing or a lying `Host` would; prints the status.
const SIBLING: &str = r#"
set -e
body='{"contents":[{"parts":[{"text":"'"$KEY_LINE"'"}]}]}'
# Learn the AI name's address first, as any Gemini client would.
curl -sS -o /dev/null --max-time 10 --cacert "$BUNDLE" https://generativelanguage.googleapis.com/status/204
for v in --http1.1 --http2; do
  curl -sS -o /dev/null -w '%{http_code} ' --max-time 10 --cacert "$BUNDLE" $v \
    -H 'Host: generativelanguage.googleapis.com' -H 'content-type: application/json' \
    --data "$body" https://www.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent
done
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ai_request_on_a_sibling_names_connection_never_reaches_the_provider() -> Result<()> {
    if !require_privileges("an_ai_request_on_a_sibling_names_connection_never_reaches_the_provider") {
        return Ok(());
    }
    // Learned addresses stay long enough for the whole test.
    let stage = interceptor_tests::dns_stage::DnsStage::with_grace("bypass_sibling", "", "ebpf", "60s")?;
    let bundle = stage.bundle.to_str().context("utf-8")?.to_string();
    let key_line = PRIVATE_KEY.replace('\n', "\\n");
    let script = format!("export BUNDLE='{bundle}' KEY_LINE='{key_line}'\n{SIBLING}");
    let out = stage.run(&["sh", "-c", &script]).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "421 421", "an AI request on the sibling's connection is misdirected");
    let gemini = &stage.providers[4];
    assert_eq!(gemini.local_addr().to_string(), "198.18.0.43:443");
    let seen = gemini.requests();
    assert!(seen.iter().all(|r| !String::from_utf8_lossy(&r.body).contains("PRIVATE KEY")), "{seen:#?}");
    assert!(seen.iter().all(|r| r.path == "/status/204"), "only the learning request got through: {seen:#?}");
    // Records are written as connections end, just after curl is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stage.proxy.connections().into_iter().filter(|c| c["mode"] == "guard").count() < 2 {
        assert!(Instant::now() < deadline, "no guard connection records: {}", stage.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let misdirected = stage.proxy.events().into_iter().filter(|e| e["event"] == "misdirected_request").count();
    assert_eq!(misdirected, 2, "{}", stage.proxy.log_text());
    Ok(())
}

/// A ClientHello without a server name to api.openai.com's learned address.
const NO_SNI_LEARNED: &str = r#"
import json, os, socket, ssl
body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": os.environ["KEY"]}]})
request = ("POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\n"
           "Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)).encode()
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = ctx.wrap_socket(socket.create_connection(("api.openai.com", 443), timeout=20), server_hostname=None)
s.sendall(request)
reply = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    reply += chunk
print(reply.split(b"\r\n")[0].decode())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_without_sni_to_a_learned_address_is_inspected_as_the_learned_name() -> Result<()> {
    if !require_privileges("a_hello_without_sni_to_a_learned_address_is_inspected_as_the_learned_name") {
        return Ok(());
    }
    let stage = interceptor_tests::dns_stage::DnsStage::with_grace("bypass_nosni", "", "ebpf", "60s")?;
    let script = format!("export KEY='{}'\nexec python3 -c '{}'", PRIVATE_KEY, NO_SNI_LEARNED.replace('\'', "'\"'\"'"));
    let out = stage.run(&["sh", "-c", &script]).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("HTTP/1.1 403"), "the key is blocked by the guardrails: {stdout}");
    let openai = &stage.providers[0];
    assert!(openai.requests().iter().all(|r| !String::from_utf8_lossy(&r.body).contains("PRIVATE KEY")));
    let blocked =
        audit_events(&stage.proxy).into_iter().find(|e| e["decision"] == "block").context("no audit event")?;
    assert_eq!(blocked["host"], "api.openai.com", "{blocked}");
    assert!(blocked["detectors"].to_string().contains("private_key"), "{blocked}");
    Ok(())
}
