use super::*;

fn pattern(pattern: &str, intercept: bool) -> ProxyPattern {
    ProxyPattern { pattern: pattern.to_string(), intercept }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn empty() -> DomainsConfig {
    DomainsConfig { ai: Vec::new(), ai_extra: Vec::new(), chatty: Vec::new(), patterns: Vec::new() }
}

fn policy(cfg: &DomainsConfig) -> DomainPolicy {
    DomainPolicy::compile(cfg).unwrap()
}

/// (server name, intercept, reason, deciding rule)
type Case<'a> = (&'a str, bool, Reason, Option<&'a str>);

fn check(policy: &DomainPolicy, cases: &[Case<'_>]) {
    for (sni, intercept, reason, rule) in cases {
        let d = policy.classify(Some(sni));
        assert_eq!((d.intercept, d.reason, d.rule.as_deref()), (*intercept, *reason, *rule), "{sni:?}");
    }
}

#[test]
fn default_config_is_valid() {
    assert_eq!(DomainsConfig::default().validate(), Vec::<String>::new());
}

#[test]
fn every_default_ai_host_is_intercepted() {
    let p = policy(&DomainsConfig::default());
    for host in [
        "api.openai.com",
        "chatgpt.com",
        "api.anthropic.com",
        "claude.ai",
        "bedrock-runtime.amazonaws.com",
        "bedrock-runtime.us-east-1.amazonaws.com",
        "bedrock-runtime.eu-central-1.amazonaws.com",
        "bedrock-runtime-fips.us-gov-west-1.amazonaws.com",
        "generativelanguage.googleapis.com",
        "aiplatform.googleapis.com",
        "us-central1-aiplatform.googleapis.com",
        "europe-west4-aiplatform.googleapis.com",
        "api.githubcopilot.com",
        "api.individual.githubcopilot.com",
        "api.business.githubcopilot.com",
        "api.enterprise.githubcopilot.com",
        "proxy.individual.githubcopilot.com",
        "copilot-proxy.githubusercontent.com",
    ] {
        let d = p.classify(Some(host));
        assert!(d.intercept, "{host}: {d:?}");
        assert_eq!(d.reason, Reason::AiDomain, "{host}");
    }
}

#[test]
fn look_alikes_and_neighbours_pass_through() {
    let p = policy(&DomainsConfig::default());
    for host in [
        "api.openai.com.evil.com",
        "evilopenai.com",
        "openai.com",
        "www.openai.com",
        "evil-api.openai.com",
        "chatgpt.com.evil.com",
        "claude.ai.attacker.net",
        "xclaude.ai",
        "anthropic.com",
        "bedrock-runtime.amazonaws.com.attacker.net",
        "bedrock-runtime.a.b.amazonaws.com",
        "bedrock.us-east-1.amazonaws.com",
        "s3.amazonaws.com",
        "amazonaws.com",
        "googleapis.com",
        "storage.googleapis.com",
        "generativelanguage.googleapis.com.evil.com",
        "us-aiplatform.googleapis.com.evil.com",
        "githubcopilot.com",
        "api.githubcopilot.com.evil.com",
        "github.com",
    ] {
        let d = p.classify(Some(host));
        assert_eq!((d.intercept, d.reason, d.rule), (false, Reason::NotAiDomain, None), "{host}");
    }
}

#[test]
fn default_chatty_domains_pass_through() {
    let p = policy(&DomainsConfig::default());
    check(
        &p,
        &[(
            "telemetry.individual.githubcopilot.com",
            false,
            Reason::ChattyDomain,
            Some("telemetry.*.githubcopilot.com"),
        )],
    );
}

#[test]
fn case_and_trailing_dot_are_ignored() {
    let cfg = DomainsConfig { ai: strings(&["API.Example.COM.", ".Wide.Example.Org"]), ..empty() };
    let p = policy(&cfg);
    for host in ["api.example.com", "API.EXAMPLE.COM", "api.example.com.", "Api.Example.Com."] {
        let d = p.classify(Some(host));
        assert!(d.intercept, "{host}");
        // The rule is reported as written.
        assert_eq!(d.rule.as_deref(), Some("API.Example.COM."), "{host}");
    }
    for host in ["wide.example.org", "X.WIDE.example.ORG."] {
        assert!(p.classify(Some(host)).intercept, "{host}");
    }
}

#[test]
fn missing_or_invalid_sni_passes_through() {
    let p = policy(&DomainsConfig::default());
    for sni in [None, Some("")] {
        assert_eq!(p.classify(sni), Decision { intercept: false, reason: Reason::NoSni, rule: None });
    }
    let long_label = format!("{}.openai.com", "a".repeat(64));
    let long_name = format!("{}openai.com", "abcdefghi.".repeat(25));
    for sni in [
        ".",
        "api..openai.com",
        ".api.openai.com",
        "api.openai.com..",
        "api openai.com",
        "api.openai.com:443",
        "ápi.openai.com",
        "*.githubcopilot.com",
        &long_label,
        &long_name,
    ] {
        let d = p.classify(Some(sni));
        assert_eq!((d.intercept, d.reason), (false, Reason::InvalidSni), "{sni:?}");
    }
}

#[test]
fn chatty_beats_ai_domains_and_patterns() {
    let cfg = DomainsConfig {
        ai: strings(&["api.openai.com"]),
        chatty: strings(&[".openai.com"]),
        patterns: vec![pattern("api.openai.com", true)],
        ..empty()
    };
    check(&policy(&cfg), &[("api.openai.com", false, Reason::ChattyDomain, Some(".openai.com"))]);
}

#[test]
fn patterns_override_the_ai_list_both_ways() {
    let cfg = DomainsConfig {
        ai: strings(&["api.anthropic.com", "claude.ai"]),
        patterns: vec![pattern(".anthropic.com", false), pattern(".internal.example.com", true)],
        ..empty()
    };
    check(
        &policy(&cfg),
        &[
            ("api.anthropic.com", false, Reason::ProxyPattern, Some(".anthropic.com")),
            ("llm.internal.example.com", true, Reason::ProxyPattern, Some(".internal.example.com")),
            ("claude.ai", true, Reason::AiDomain, Some("claude.ai")),
            ("example.com", false, Reason::NotAiDomain, None),
        ],
    );
}

#[test]
fn the_most_specific_pattern_wins_whatever_the_order() {
    let mut patterns = vec![
        pattern(".openai.com", false),
        pattern("api.openai.com", true),
        pattern(".example.com", false),
        pattern("*.example.com", true),
        pattern(".b.example.com", false),
        pattern("*-api.example.net", true),
        pattern("*.example.net", false),
        pattern("x.*.example.net", false),
        pattern(".example.net", true),
    ];
    let cases: &[Case<'_>] = &[
        // more literal labels
        ("api.openai.com", true, Reason::ProxyPattern, Some("api.openai.com")),
        ("chat.openai.com", false, Reason::ProxyPattern, Some(".openai.com")),
        ("x.b.example.com", false, Reason::ProxyPattern, Some(".b.example.com")),
        // a wildcard beats a leading dot with as many literal labels
        ("a.example.com", true, Reason::ProxyPattern, Some("*.example.com")),
        ("example.com", false, Reason::ProxyPattern, Some(".example.com")),
        // `*suffix` labels beat `*`; literal labels beat both
        ("eu-api.example.net", true, Reason::ProxyPattern, Some("*-api.example.net")),
        ("other.example.net", false, Reason::ProxyPattern, Some("*.example.net")),
        ("x.eu-api.example.net", false, Reason::ProxyPattern, Some("x.*.example.net")),
        ("example.net", true, Reason::ProxyPattern, Some(".example.net")),
    ];
    check(&policy(&DomainsConfig { patterns: patterns.clone(), ..empty() }), cases);
    patterns.reverse();
    check(&policy(&DomainsConfig { patterns, ..empty() }), cases);
}

#[test]
fn passthrough_wins_a_tie_between_patterns() {
    let mut patterns = vec![pattern("a.*.example.com", true), pattern("*.b.example.com", false)];
    let case: &[Case<'_>] = &[("a.b.example.com", false, Reason::ProxyPattern, Some("*.b.example.com"))];
    check(&policy(&DomainsConfig { patterns: patterns.clone(), ..empty() }), case);
    patterns.reverse();
    check(&policy(&DomainsConfig { patterns, ..empty() }), case);
}

#[test]
fn equal_patterns_with_the_same_mode_keep_the_first() {
    let cfg =
        DomainsConfig { patterns: vec![pattern("*.example.com", true), pattern("*.EXAMPLE.com.", true)], ..empty() };
    assert!(cfg.validate().is_empty());
    check(&policy(&cfg), &[("a.example.com", true, Reason::ProxyPattern, Some("*.example.com"))]);
}

#[test]
fn a_pattern_listed_with_both_modes_is_an_error() {
    let cfg = DomainsConfig {
        patterns: vec![pattern(".openai.com", true), pattern(".OpenAI.com.", false), pattern(".openai.com", false)],
        ..empty()
    };
    assert_eq!(
        cfg.validate(),
        vec![
            r#"domains.patterns: ".OpenAI.com.": listed with both intercept = true and intercept = false"#.to_string()
        ]
    );
}

#[test]
fn validation_reports_every_error_at_once() {
    let cfg = DomainsConfig {
        ai: strings(&["a*b.com", "api.openai.com", "example.*"]),
        ai_extra: strings(&[""]),
        chatty: strings(&["x..y"]),
        patterns: vec![
            pattern("https://api.openai.com", true),
            pattern(".ok.example.com", true),
            pattern("bad host.com", false),
        ],
    };
    let errors = cfg.validate();
    let expected_prefixes = [
        r#"domains.chatty: "x..y": "#,
        r#"domains.ai: "a*b.com": "#,
        r#"domains.ai: "example.*": "#,
        r#"domains.ai_extra: "": "#,
        r#"domains.patterns: "https://api.openai.com": "#,
        r#"domains.patterns: "bad host.com": "#,
    ];
    assert_eq!(errors.len(), expected_prefixes.len(), "{errors:#?}");
    for (error, prefix) in errors.iter().zip(expected_prefixes) {
        assert!(error.starts_with(prefix), "{error:?} should start with {prefix:?}");
    }
    let Err(PolicyError::Invalid { errors: compiled }) = DomainPolicy::compile(&cfg) else {
        panic!("invalid config compiled");
    };
    assert_eq!(compiled, errors);
    let shown = PolicyError::Invalid { errors }.to_string();
    assert!(shown.contains("\n  - domains.ai: \"a*b.com\": "), "{shown}");
}

#[test]
fn empty_lists_intercept_nothing() {
    let p = policy(&empty());
    check(&p, &[("api.openai.com", false, Reason::NotAiDomain, None)]);
    assert!(p.resolvable_names().is_empty());
}

#[test]
fn ai_extra_adds_to_the_built_in_list() {
    let cfg = DomainsConfig { ai_extra: strings(&["llm.example.com"]), ..DomainsConfig::default() };
    check(
        &policy(&cfg),
        &[
            ("llm.example.com", true, Reason::AiDomain, Some("llm.example.com")),
            ("api.openai.com", true, Reason::AiDomain, Some("api.openai.com")),
        ],
    );
}

#[test]
fn resolvable_names_of_the_defaults() {
    let p = policy(&DomainsConfig::default());
    assert_eq!(
        p.resolvable_names(),
        strings(&[
            "aiplatform.googleapis.com",
            "api.anthropic.com",
            "api.business.githubcopilot.com",
            "api.cohere.ai",
            "api.cohere.com",
            "api.deepseek.com",
            "api.enterprise.githubcopilot.com",
            "api.fireworks.ai",
            "api.githubcopilot.com",
            "api.groq.com",
            "api.individual.githubcopilot.com",
            "api.mistral.ai",
            "api.openai.com",
            "api.perplexity.ai",
            "api.together.ai",
            "api.together.xyz",
            "api.x.ai",
            "bedrock-runtime.amazonaws.com",
            "chatgpt.com",
            "claude.ai",
            "copilot-proxy.githubusercontent.com",
            "generativelanguage.googleapis.com",
            "openrouter.ai",
        ])
    );
}

#[test]
fn the_new_default_providers_are_intercepted() {
    let p = policy(&DomainsConfig::default());
    for name in [
        "myres.openai.azure.com",
        "eastus.api.cognitive.microsoft.example.cognitiveservices.azure.com",
        "proj.services.ai.azure.com",
        "bedrock-agent-runtime.us-east-1.amazonaws.com",
        "bedrock-agent-runtime-fips.us-west-2.amazonaws.com",
        "api.mistral.ai",
        "api.groq.com",
        "api.deepseek.com",
        "api.x.ai",
        "openrouter.ai",
        "api.together.xyz",
        "api.together.ai",
        "api.fireworks.ai",
        "api.perplexity.ai",
        "api.cohere.com",
        "api.cohere.ai",
    ] {
        assert!(p.classify(Some(name)).intercept, "{name}");
    }
    // The wildcards stop where they should.
    for name in ["openai.azure.com", "bedrock-agent-runtime.amazonaws.com", "mistral.ai", "docs.cohere.com"] {
        assert!(!p.classify(Some(name)).intercept, "{name}");
    }
}

#[test]
fn resolvable_names_are_the_exact_names_that_classify_as_intercept() {
    let cfg = DomainsConfig {
        ai: strings(&["api.openai.com", "*.x.com", "a.*.x.com", ".y.com", "API.Z.com."]),
        ai_extra: strings(&["extra.com", "api.openai.com", "chatty.example.com", "hidden.example.org"]),
        chatty: strings(&["chatty.example.com", "direct-but-chatty.example.net"]),
        patterns: vec![
            pattern("direct.example.net", true),
            pattern("direct-but-chatty.example.net", true),
            pattern("off.example.net", false),
            pattern(".example.org", false),
            pattern("*.w.com", true),
        ],
    };
    assert_eq!(
        policy(&cfg).resolvable_names(),
        strings(&["api.openai.com", "api.z.com", "direct.example.net", "extra.com"])
    );
}

#[test]
fn lowercase_names_are_not_copied() {
    assert!(matches!(normalize_sni("api.openai.com."), Some(Cow::Borrowed("api.openai.com"))));
    assert!(matches!(
        normalize_sni("API.openai.com"),
        Some(Cow::Owned(n)) if n == "api.openai.com"
    ));
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    domains: DomainsConfig,
}

#[test]
fn the_default_round_trips_through_toml() {
    let file = File { domains: DomainsConfig::default() };
    let text = toml::to_string(&file).unwrap();
    for key in ["[domains]", "\nai = [", "\nai_extra = []", "\nchatty = [", "\npatterns = []"] {
        assert!(text.contains(key), "{key:?} missing from:\n{text}");
    }
    assert_eq!(toml::from_str::<File>(&text).unwrap(), file);

    let custom = File {
        domains: DomainsConfig {
            patterns: vec![pattern(".openai.com", true), pattern("x.example.com", false)],
            ..DomainsConfig::default()
        },
    };
    let text = toml::to_string(&custom).unwrap();
    assert_eq!(toml::from_str::<File>(&text).unwrap(), custom, "{text}");
}

#[test]
fn toml_tables_parse_with_defaults_for_missing_fields() {
    let inline: File = toml::from_str(
        r#"
        [domains]
        ai_extra = ["llm.example.com"]
        patterns = [{ pattern = ".openai.com", intercept = true }]
        "#,
    )
    .unwrap();
    let tables: File = toml::from_str(
        r#"
        [domains]
        ai_extra = ["llm.example.com"]

        [[domains.patterns]]
        pattern = ".openai.com"
        intercept = true
        "#,
    )
    .unwrap();
    let expected = DomainsConfig {
        ai_extra: strings(&["llm.example.com"]),
        patterns: vec![pattern(".openai.com", true)],
        ..DomainsConfig::default()
    };
    assert_eq!(inline.domains, expected);
    assert_eq!(tables.domains, expected);

    let empty_table: File = toml::from_str("[domains]\n").unwrap();
    assert_eq!(empty_table.domains, DomainsConfig::default());
}

#[test]
fn toml_rejects_unknown_and_missing_fields() {
    for text in [
        "[domains]\nai_extras = []\n",
        "[domains]\npatterns = [{ pattern = \".a.com\", intercept = true, mode = 1 }]\n",
        "[domains]\npatterns = [{ pattern = \".a.com\" }]\n",
        "[domains]\npatterns = [{ pattern = \".a.com\", intercept = \"yes\" }]\n",
    ] {
        assert!(toml::from_str::<File>(text).is_err(), "{text}");
    }
}

#[test]
fn name_constraint_bases_cover_every_intercepted_pattern() {
    let cfg = DomainsConfig {
        ai: strings(&["api.openai.com", ".anthropic.com", "*.githubcopilot.com", "bedrock-runtime.*.amazonaws.com"]),
        ai_extra: strings(&["*-aiplatform.googleapis.com", "llm.example.com"]),
        patterns: vec![pattern(".mcp.example.org", true), pattern("passthrough.example.net", false)],
        ..empty()
    };
    let bases = policy(&cfg).name_constraint_bases();
    assert_eq!(
        bases,
        strings(&[
            "amazonaws.com",
            "anthropic.com",
            "api.openai.com",
            "githubcopilot.com",
            "googleapis.com",
            "llm.example.com",
            "mcp.example.org",
        ])
    );
    // Every name the policy intercepts is inside one of them.
    let policy = policy(&cfg);
    for name in [
        "api.openai.com",
        "anthropic.com",
        "api.anthropic.com",
        "api.individual.githubcopilot.com",
        "bedrock-runtime.eu-west-1.amazonaws.com",
        "us-central1-aiplatform.googleapis.com",
        "x.mcp.example.org",
    ] {
        assert!(policy.classify(Some(name)).intercept, "{name}");
        assert!(bases.iter().any(|b| crate::ca::dns_within(name, b)), "{name} outside {bases:?}");
    }
    // The built-in list gives a usable set too.
    let default = DomainPolicy::compile(&DomainsConfig::default()).unwrap().name_constraint_bases();
    crate::ca::NameConstraintsSpec::new(default).unwrap();
}

#[test]
fn mcp_server_names_are_intercepted_after_chatty_patterns_and_ai_domains() {
    let cfg = DomainsConfig {
        ai: strings(&["api.openai.com"]),
        chatty: strings(&["telemetry.mcp.example.com"]),
        patterns: vec![pattern("skip.mcp.example.com", false)],
        ..empty()
    };
    let domains = strings(&["mcp.notion.com", ".mcp.example.com"]);
    let extra = strings(&["*.mcp.cloudflare.com", "api.openai.com"]);
    let mcp = McpDomains { domains: &domains, domains_extra: &extra };
    let p = DomainPolicy::compile_with_mcp(&cfg, mcp).unwrap();
    check(
        &p,
        &[
            ("mcp.notion.com", true, Reason::McpServer, Some("mcp.notion.com")),
            ("MCP.Notion.com.", true, Reason::McpServer, Some("mcp.notion.com")),
            ("a.mcp.example.com", true, Reason::McpServer, Some(".mcp.example.com")),
            ("docs.mcp.cloudflare.com", true, Reason::McpServer, Some("*.mcp.cloudflare.com")),
            ("telemetry.mcp.example.com", false, Reason::ChattyDomain, Some("telemetry.mcp.example.com")),
            ("skip.mcp.example.com", false, Reason::ProxyPattern, Some("skip.mcp.example.com")),
            ("api.openai.com", true, Reason::AiDomain, Some("api.openai.com")),
            ("notion.com", false, Reason::NotAiDomain, None),
        ],
    );
    assert!(p.is_mcp_server("mcp.notion.com") && p.is_mcp_server("Docs.MCP.cloudflare.com"));
    assert!(p.is_mcp_server("api.openai.com"), "an MCP name also listed as an AI domain is still an MCP server");
    assert!(!p.is_mcp_server("notion.com") && !p.is_mcp_server("not a name"));
    assert_eq!(p.resolvable_names(), &strings(&["api.openai.com", "mcp.notion.com"])[..]);
    assert_eq!(
        p.name_constraint_bases(),
        strings(&["api.openai.com", "mcp.cloudflare.com", "mcp.example.com", "mcp.notion.com"])
    );
}

#[test]
fn without_mcp_names_nothing_of_them_is_intercepted() {
    let p = DomainPolicy::compile(&DomainsConfig::default()).unwrap();
    let d = p.classify(Some("mcp.notion.com"));
    assert_eq!((d.intercept, d.reason), (false, Reason::NotAiDomain));
    assert!(!p.is_mcp_server("mcp.notion.com"));
    assert!(!p.name_constraint_bases().iter().any(|b| b.contains("notion")));
}

#[test]
fn bad_mcp_names_are_reported_with_their_list() {
    let domains = strings(&["a*b.com", "ok.example.com"]);
    let extra = strings(&["http://x.example.com"]);
    let mcp = McpDomains { domains: &domains, domains_extra: &extra };
    let errors = mcp.validate();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("mcp.domains: \"a*b.com\""), "{errors:?}");
    assert!(errors[1].starts_with("mcp.domains_extra: \"http://x.example.com\""), "{errors:?}");
    let Err(PolicyError::Invalid { errors: compiled }) = DomainPolicy::compile_with_mcp(&empty(), mcp) else {
        panic!("compiled with bad MCP names");
    };
    assert_eq!(compiled, errors);
}
