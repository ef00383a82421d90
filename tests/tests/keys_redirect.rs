//! Privileged: key brokering with the kernel redirect. The official OpenAI
//! SDK in one cgroup holds only a placeholder scoped to that cgroup; the
//! provider receives the real key. The same placeholder replayed from a
//! sibling cgroup (also redirected) is refused; a revocation written to the
//! brokering file is applied by the running interceptor; neither its log
//! nor its audit log ever holds the real key.

use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use anyhow::{Result, bail};
use interceptor::{
    guardrails::keys::{KeysFile, placeholder_id},
    testing::{
        Cgroup,
        clients::{ClientEnv, python_script},
        require_privileges,
    },
};
use interceptor_tests::stage::Stage;
use serde_json::Value;

const REAL: &str = "sk-proj-REALredirectKEY-0123456789";

const OPENAI: &str = r#"
import json, os, openai
client = openai.OpenAI(max_retries=0)
try:
    r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
    out = {"ok": True}
except openai.PermissionDeniedError as e:
    out = {"ok": False, "denied": True, "body": e.response.text}
except openai.APIStatusError as e:
    out = {"ok": False, "status": e.status_code, "body": e.response.text}
out["env"] = [v for k, v in os.environ.items() if k.endswith("_API_KEY")]
print(json.dumps(out))
"#;

async fn sdk(stage: &Stage, cgroup: &Cgroup, placeholder: &str) -> Result<Value> {
    let bundle = stage.bundle.to_string_lossy().to_string();
    let vars = [("SSL_CERT_FILE", bundle.as_str()), ("OPENAI_API_KEY", placeholder)];
    let env = ClientEnv::new(&stage.bundle).in_netns(&stage.netns).in_cgroup(cgroup).with_hosts(&stage.hosts);
    let out = python_script(&env, OPENAI, &vars).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if stdout.contains(REAL) || stderr.contains(REAL) {
        bail!("the client saw the real key");
    }
    match serde_json::from_str(stdout.trim()) {
        Ok(v) => Ok(v),
        Err(_) => bail!("sdk script printed {stdout:?}; stderr: {stderr}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placeholder_works_only_from_its_cgroup_and_the_provider_gets_the_real_key() -> Result<()> {
    if !require_privileges("a_placeholder_works_only_from_its_cgroup_and_the_provider_gets_the_real_key") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys.toml");
    let audit = dir.path().join("audit.jsonl");
    // Brokering starts with an empty file; the keys come once the stage's
    // cgroups exist, through the live reload.
    std::fs::write(&keys, "")?;
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600))?;
    let extra = format!(
        "[guardrails]\naudit_file = \"{}\"\n[keys]\nenabled = true\nfile = \"{}\"\n",
        audit.display(),
        keys.display()
    );
    let stage = Stage::new("keys", "ebpf", &extra)?;
    // The client cgroup's children, both redirected: the team's and another.
    let team = stage.client_cg.child("team")?;
    let other = stage.client_cg.child("other")?;
    let scope = format!("cgroup:{}", team.relative_path());
    // Written whole (staged, then renamed), so the interceptor reloads it once.
    let staged = dir.path().join("keys.staged");
    std::fs::write(
        &staged,
        format!("[[real]]\nprovider = \"openai\"\nscope.workloads = [\"{scope}\"]\nkey = \"{REAL}\"\n"),
    )?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
    let mut file = KeysFile::open(&staged, "ik-")?;
    let placeholder = file.issue("openai", &[scope], "now")?;
    drop(file);
    std::fs::rename(&staged, &keys)?;
    wait_for_log(&stage, "brokering file reloaded", 1).await?;

    let out = sdk(&stage, &team, &placeholder).await?;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["env"], serde_json::json!([placeholder]), "the workload holds more than its placeholder");
    let seen = stage.provider.requests();
    let got: Vec<_> = seen.iter().filter(|r| r.path.starts_with("/v1/chat/completions")).collect();
    assert_eq!(got.len(), 1);
    assert!(got[0].header("authorization") == Some(format!("Bearer {REAL}").as_str()), "not the real key");

    // Replayed from outside the covered cgroup.
    let out = sdk(&stage, &other, &placeholder).await?;
    assert_eq!(out["denied"], true, "{out}");
    assert!(out["body"].as_str().unwrap_or_default().contains("outside its scope"), "{out}");

    // Revoked while running.
    let mut file = KeysFile::open(&keys, "ik-")?;
    file.revoke(&placeholder_id(&placeholder)[..8])?;
    drop(file);
    wait_for_log(&stage, "brokering file reloaded", 2).await?;
    let out = sdk(&stage, &team, &placeholder).await?;
    assert_eq!(out["denied"], true, "{out}");
    assert!(out["body"].as_str().unwrap_or_default().contains("unknown or revoked"), "{out}");
    let forwarded = stage.provider.requests().iter().filter(|r| r.path.starts_with("/v1/chat/completions")).count();
    assert_eq!(forwarded, 1, "a refused request reached the provider");

    // Both refusals audited (the audit log is written behind the answers).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let audit_text = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        if text.matches("\"key_brokering\"").count() >= 2 || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(audit_text.matches("\"key_brokering\"").count(), 2, "the refusals were not audited");
    let log = stage.proxy.log_text();
    assert!(!log.contains(REAL), "the interceptor's log holds the real key");
    assert!(!audit_text.contains(REAL), "the audit log holds the real key");
    Ok(())
}

/// Waits until the interceptor has logged `line` `n` times.
async fn wait_for_log(stage: &Stage, line: &str, n: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while stage.proxy.log_text().matches(line).count() < n {
        if std::time::Instant::now() > deadline {
            bail!("`{line}` was not logged {n} times");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
