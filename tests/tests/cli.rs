//! The command line: CA export and persistence, configuration checking.

use std::{os::unix::fs::PermissionsExt as _, process::Command};

use anyhow::Result;
use interceptor::testing::interceptor_bin;

fn run(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(interceptor_bin()).args(args).output()?)
}

#[test]
fn ca_is_created_once_with_a_private_key_only_root_can_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let state = state.to_str().expect("utf-8");
    let first = run(&["ca", "export", "--state-dir", state])?;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let pem = String::from_utf8(first.stdout)?;
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let key = std::path::Path::new(state).join("ca.key");
    assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
    let key_text = std::fs::read_to_string(&key)?;
    assert!(!pem.contains("PRIVATE KEY") && key_text.contains("PRIVATE KEY"));
    // A restart reuses the same CA.
    let second = run(&["ca", "export", "--state-dir", state])?;
    assert_eq!(String::from_utf8(second.stdout)?, pem);
    assert_eq!(std::fs::read_to_string(&key)?, key_text);
    // A key others can read is refused rather than used.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    let refused = run(&["ca", "export", "--state-dir", state])?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("600"), "{}", String::from_utf8_lossy(&refused.stderr));
    Ok(())
}

#[test]
fn check_config_reports_every_error_and_exits_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[redirect]\nports = [0]\n[targets]\ncidrs = [\"nope\"]\n[domains]\nai = [\"a*b.com\"]\n[admin]\naddress = \"0.0.0.0:1\"\n",
    )?;
    let out = run(&["--config", path.to_str().expect("utf-8"), "check-config"])?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["redirect.ports", "targets.cidrs", "domains.ai", "admin.address"] {
        assert!(err.contains(needle), "missing {needle} in:\n{err}");
    }
    std::fs::write(&path, "[proxy]\nprot = 1\n")?;
    let out = run(&["--config", path.to_str().expect("utf-8"), "check-config"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prot"));

    let good = run(&["check-config"])?;
    assert!(good.status.success());
    assert!(String::from_utf8_lossy(&good.stdout).contains("[domains]"));
    Ok(())
}

#[test]
fn check_config_reports_bad_budgets() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("budgets.toml");
    let path_arg = path.to_str().expect("utf-8");
    // Field errors: all reported at once.
    std::fs::write(
        &path,
        "[guardrails]\nenabled = true\n[[budgets.limits]]\nname = \"a b\"\nkind = \"tokens\"\nlimit = 0\n",
    )?;
    let out = run(&["--config", path_arg, "check-config"])?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["name must be", "limit must be at least 1", "needs a period"] {
        assert!(err.contains(needle), "missing {needle} in:\n{err}");
    }
    // A workload pattern that does not parse.
    std::fs::write(
        &path,
        "[guardrails]\nenabled = true\n[[budgets.limits]]\nname = \"t\"\nkind = \"concurrent\"\nlimit = 2\n\
         scope.workloads = [\"nope:x\"]\n",
    )?;
    let out = run(&["--config", path_arg, "check-config"])?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("budgets.limits[0] (\"t\"): scope.workloads"), "{err}");
    Ok(())
}

/// `check-config` with the Akto addon's variables set (and no others).
fn check_config_with_addon_env(vars: &[(&str, &str)]) -> Result<std::process::Output> {
    let mut command = Command::new(interceptor_bin());
    for name in
        ["AKTO_URL", "APP_NAME", "AKTO_API_TOKEN", "AKTO_GUARDRAILS_MODE", "AKTO_TEXT_THRESHOLD", "AKTO_LOG_PAYLOADS"]
    {
        command.env_remove(name);
    }
    command.env_remove("INTERCEPTOR_CONFIG");
    Ok(command.envs(vars.iter().copied()).arg("check-config").output()?)
}

#[test]
fn the_akto_addons_variables_keep_their_meaning() -> Result<()> {
    let out = check_config_with_addon_env(&[
        ("AKTO_URL", "http://akto.example:9090"),
        ("AKTO_GUARDRAILS_MODE", "sync"),
        ("AKTO_TEXT_THRESHOLD", "300"),
        ("AKTO_LOG_PAYLOADS", "true"),
    ])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    for line in [
        "url = \"http://akto.example:9090\"",
        "stream_mode = \"enforce\"",
        "stream_window = 300",
        "log_payloads = true",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }

    // Invalid values: exit 2, each named, before anything starts.
    let out = check_config_with_addon_env(&[
        ("AKTO_GUARDRAILS_MODE", "synchronous"),
        ("AKTO_TEXT_THRESHOLD", "six hundred"),
        ("AKTO_LOG_PAYLOADS", "1"),
    ])?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "AKTO_GUARDRAILS_MODE=\"synchronous\": must be \"sync\" or \"async\"",
        "AKTO_TEXT_THRESHOLD=\"six hundred\": must be a positive number",
        "AKTO_LOG_PAYLOADS=\"1\": must be \"true\" or \"false\"",
    ] {
        assert!(err.contains(needle), "missing {needle} in:\n{err}");
    }
    Ok(())
}

#[test]
fn check_config_lists_each_ai_domain_with_its_request_formats() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("extra.toml");
    std::fs::write(&path, "[domains]\nai_extra = [\"llm.internal.example\"]\n")?;
    let out = run(&["--config", path.to_str().expect("utf-8"), "check-config"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    for line in [
        "#   api.openai.com: openai_chat (/v1/chat/completions), openai_responses (/v1/responses);",
        "#   chatgpt.com: openai_responses (/backend-api/codex/responses), openai_chat (/backend-api/conversation),",
        "#   *.openai.azure.com: openai_chat (/openai/deployments/gpt-4o/chat/completions),",
        "#   api.groq.com: openai_chat (/openai/v1/chat/completions),",
        "#   api.cohere.com: cohere (/v2/chat), cohere (/v1/chat), openai_chat (/compatibility/v1/chat/completions);",
        "#   bedrock-agent-runtime.*.amazonaws.com: bedrock_agent (/agents/",
        "#   llm.internal.example: by path (",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // Still a configuration check-config accepts.
    let again = dir.path().join("effective.toml");
    std::fs::write(&again, &text)?;
    let out = run(&["--config", again.to_str().expect("utf-8"), "check-config"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn a_cluster_ca_is_loaded_from_its_directory_and_never_created() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca_dir = dir.path().join("cluster-ca");
    let made = run(&["ca", "create-cluster", "--out", ca_dir.to_str().expect("utf-8")])?;
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let cluster_pem = std::fs::read_to_string(ca_dir.join("ca.crt"))?;
    let secret = std::fs::read_to_string(ca_dir.join("secret.yaml"))?;
    assert!(secret.contains("kind: Secret") && secret.contains("ca.key: "), "{secret}");
    assert_eq!(std::fs::metadata(ca_dir.join("secret.yaml"))?.permissions().mode() & 0o777, 0o600);
    // Never overwritten.
    let again = run(&["ca", "create-cluster", "--out", ca_dir.to_str().expect("utf-8")])?;
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(ca_dir.join("ca.crt"))?, cluster_pem);

    // With tls.ca_dir, `ca export` gives the cluster CA, and the state
    // directory gets no CA of its own.
    let state = dir.path().join("state");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[tls]\nca_dir = {:?}\n", ca_dir.to_str().expect("utf-8")))?;
    let args =
        ["--config", config.to_str().expect("utf-8"), "ca", "export", "--state-dir", state.to_str().expect("utf-8")];
    let out = run(&args)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout)?, cluster_pem);
    assert!(!state.join("ca.key").exists(), "a per-node CA was created beside the cluster CA");

    // Without it (the default), the per-node CA: a different certificate.
    let out = run(&["ca", "export", "--state-dir", state.to_str().expect("utf-8")])?;
    assert!(out.status.success());
    assert_ne!(String::from_utf8(out.stdout)?, cluster_pem);

    // A missing Secret is an error naming the command that creates one, and
    // nothing is created in its place.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty)?;
    std::fs::write(&config, format!("[tls]\nca_dir = {:?}\n", empty.to_str().expect("utf-8")))?;
    let out = run(&args)?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ca create-cluster") && stderr.contains("tls.ca_dir"), "{stderr}");
    assert_eq!(std::fs::read_dir(&empty)?.count(), 0);
    Ok(())
}

#[test]
fn check_policy_lists_the_rules_and_prompts_that_apply_to_a_workload() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"
[[rules]]
id = "keys-everywhere"
detectors = ["private_key"]
action = "block"

[[rules]]
id = "billing-cards"
detectors = ["credit_card"]
action = "redact"
scope.workloads = ["label:app=billing"]

[[rules]]
id = "codex-only"
detectors = ["email"]
action = "alert"
scope.workloads = ["exe:codex", "thread:tokio-rt-worker"]

[[system_prompts]]
id = "claude-prompt"
instruction = "Be brief."
scope.workloads = ["comm:claude"]
scope.providers = ["anthropic"]
"#,
    )?;
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[guardrails]\npolicy_file = {:?}\n", policy.to_str().expect("utf-8")))?;
    let config = config.to_str().expect("utf-8");
    let workload = "comm=claude,thread=HTTP Client,exe=/usr/bin/node,uid=1000,cgroup=/kubepods.slice/x,namespace=team-a,label=app=billing";
    let out = run(&["--config", config, "check-policy", "--workload", workload])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    for line in [
        "workload: comm=claude thread=\"HTTP Client\" exe=/usr/bin/node cgroup=/kubepods.slice/x uid=1000 namespace=team-a label=app=billing\n",
        &format!("policy:   {}\n", policy.display()),
        "  applies  keys-everywhere (block): every workload\n",
        "  applies  billing-cards (redact): workload matches label:app=billing\n",
        "  -        codex-only (alert): workload matches none of exe:codex, thread:tokio-rt-worker\n",
        "  applies  claude-prompt: workload matches comm:claude; only providers: anthropic\n",
        "2 of 3 rules and 1 of 1 system prompts apply\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // Narrowed to a provider, the prompt for another one does not apply.
    let out = run(&["--config", config, "check-policy", "--workload", workload, "--provider", "openai_chat"])?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("-        claude-prompt: workload matches comm:claude, but not on provider openai_chat"),
        "{text}"
    );

    // A live process: this test, whose executable is readable to itself.
    let pid = std::process::id().to_string();
    let out = run(&["--config", config, "check-policy", "--pid", &pid, "--workload", "label=app=billing"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let exe = std::env::current_exe()?;
    assert!(text.contains(&format!("exe={}", exe.display())), "{text}");
    assert!(text.contains("applies  billing-cards"), "{text}");

    // Bad input: a clear error and exit status 2.
    for (args, needle) in [
        (vec!["check-policy"], "--workload"),
        (vec!["check-policy", "--workload", "comm=x,nmespace=y"], "unknown field `nmespace`"),
        (vec!["check-policy", "--workload", "uid=root"], "not a number"),
        (vec!["check-policy", "--workload", "comm=x", "--provider", "openai"], "unknown provider `openai`"),
        (vec!["check-policy", "--pid", "999999999"], "no such process"),
    ] {
        let mut full = vec!["--config", config];
        full.extend(args.iter().copied());
        let out = run(&full)?;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    std::fs::write(
        &policy,
        "[[rules]]\nid = \"x\"\ndetectors = [\"email\"]\naction = \"alert\"\nscope.workloads = [\"uid:root\"]\n",
    )?;
    let out = run(&["--config", config, "check-policy", "--workload", "comm=x"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("numeric uid"), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// An audit event line of a response with `usage`, `age` before now.
fn usage_event(age: time::Duration, workload: &str, model: &str, input: u64, output: u64) -> String {
    let time = (time::OffsetDateTime::now_utc() - age)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formattable");
    format!(
        r#"{{"time":"{time}","event":"guardrail_decision","request_id":"r","direction":"response","decision":"allow","provider":"openai_chat","model":"{model}","workload":{workload},"usage":{{"input_tokens":{input},"output_tokens":{output},"estimated":false}}}}"#
    )
}

#[test]
fn usage_sums_the_audit_files_tokens_per_workload_for_a_period() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let audit = dir.path().join("audit.jsonl");
    let agent = r#"{"pid":7,"comm":"agent"}"#;
    let pod = r#"{"pid":8,"comm":"node","namespace":"team-a","service_account":"coder"}"#;
    let lines = [
        usage_event(time::Duration::hours(1), agent, "gpt-4o", 100, 20),
        usage_event(time::Duration::minutes(5), agent, "gpt-4o-mini", 50, 5),
        usage_event(time::Duration::minutes(1), pod, "gpt-4o", 7, 3),
        // Outside a 24 h period.
        usage_event(time::Duration::days(3), agent, "gpt-4o", 1000, 1000),
        "a line that is not an audit event".to_owned(),
    ];
    std::fs::write(&audit, lines.join("\n") + "\n")?;
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[guardrails]\naudit_file = {:?}\n", audit.to_str().expect("utf-8")))?;
    let config = config.to_str().expect("utf-8");

    // The configured audit file, per workload, the last 24 hours.
    let out = run(&["--config", config, "usage"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let row = |name: &str| text.lines().find(|l| l.starts_with(name)).map(|l| l.split_whitespace().collect::<Vec<_>>());
    assert_eq!(row("comm:agent"), Some(vec!["comm:agent", "2", "150", "25"]), "{text}");
    assert_eq!(row("k8s:team-a/coder"), Some(vec!["k8s:team-a/coder", "1", "7", "3"]), "{text}");
    assert_eq!(row("total"), Some(vec!["total", "3", "157", "28"]), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 lines"), "{}", String::from_utf8_lossy(&out.stderr));

    // A given file, per model, a longer period, as JSON.
    let path = audit.to_str().expect("utf-8");
    let out = run(&["usage", "--audit-file", path, "--since", "7d", "--by", "model", "--output", "json"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["groups"]["gpt-4o"]["input_tokens"], 1107);
    assert_eq!(json["groups"]["gpt-4o-mini"]["output_tokens"], 5);
    assert_eq!(json["total"]["requests"], 4);
    assert_eq!(json["skipped_lines"], 1);

    // Clear errors: no audit file configured, a bad period, a missing file.
    let out = run(&["usage"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("guardrails.audit_file"));
    let out = run(&["usage", "--audit-file", path, "--since", "soon"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad duration \"soon\""));
    let missing = dir.path().join("missing.jsonl");
    let out = run(&["usage", "--audit-file", missing.to_str().expect("utf-8")])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.jsonl"));
    Ok(())
}

#[test]
fn keys_are_issued_listed_and_revoked_without_showing_a_real_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("keys.toml");
    let real = "sk-cli-real-key-never-shown-000";
    std::fs::write(
        &file,
        format!("[[real]]\nprovider = \"openai\"\nscope.workloads = [\"namespace:team-a\"]\nkey = \"{real}\"\n"),
    )?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
    let f = file.to_str().expect("utf-8");

    let issued = run(&["keys", "issue", "--provider", "openai", "--scope", "namespace:team-a", "--file", f])?;
    assert!(issued.status.success(), "{}", String::from_utf8_lossy(&issued.stderr));
    let placeholder = String::from_utf8(issued.stdout)?.trim().to_string();
    assert!(placeholder.starts_with("ik-") && placeholder.len() == 35, "not a placeholder: {placeholder}");
    let text = std::fs::read_to_string(&file)?;
    assert!(!text.contains(&placeholder), "the placeholder itself was stored");
    assert!(text.contains(real), "the real key was lost");
    assert_eq!(std::fs::metadata(&file)?.permissions().mode() & 0o777, 0o600);

    let listed = run(&["keys", "list", "--file", f])?;
    assert!(listed.status.success());
    let out = String::from_utf8(listed.stdout)?;
    assert!(!out.contains(real) && !out.contains(&placeholder), "list shows a credential");
    let id = out.lines().nth(1).and_then(|l| l.split_whitespace().next()).unwrap_or_default().to_string();
    assert_eq!(id.len(), 12, "{out}");
    assert!(out.contains("namespace:team-a") && out.contains("real key"), "{out}");

    // A bad scope or provider is refused and nothing is written.
    for args in [["--provider", "openai", "--scope", "bogus:x"], ["--provider", "nope", "--scope", "comm:x"]] {
        let out = run(&[&["keys", "issue", "--file", f][..], &args[..]].concat())?;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    assert_eq!(std::fs::read_to_string(&file)?, text);

    let revoked = run(&["keys", "revoke", &id[..8], "--file", f])?;
    assert!(revoked.status.success(), "{}", String::from_utf8_lossy(&revoked.stderr));
    let again = run(&["keys", "revoke", &id[..8], "--file", f])?;
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("no placeholder id starts with"));
    let out = String::from_utf8(run(&["keys", "list", "--file", f])?.stdout)?;
    assert!(!out.contains(&id), "{out}");

    // check-config reads the brokering file when brokering is on.
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[keys]\nenabled = true\nfile = \"{f}\"\n"))?;
    let checked = run(&["--config", config.to_str().expect("utf-8"), "check-config"])?;
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));

    // A file others can read is refused, and the error shows no key.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let out = run(&["keys", "list", "--file", f])?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600") && !err.contains(real), "unexpected error output");
    let checked = run(&["--config", config.to_str().expect("utf-8"), "check-config"])?;
    assert_eq!(checked.status.code(), Some(2));
    let err = String::from_utf8_lossy(&checked.stderr);
    assert!(err.contains("chmod 600") && !err.contains(real), "check-config: unexpected error output");
    Ok(())
}
