//! The `interceptor` command.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use interceptor::{
    app,
    ca::{self, CertificateAuthority, TrustStore},
    config::{Config, Overrides, RedirectMode, akto::AddonEnv},
    dataplane, doctor, error, guardrails, redirect,
    telemetry::{self, LogFormat},
    webhook,
};

/// mimalloc: per-thread free lists keep allocation off the connection
/// path's profile, and a buffer freed on another thread (a span or audit
/// record handed to its writer) goes back without taking an arena lock.
/// Tuned for memory by [`tune_allocator`].
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (its `mimalloc.h`;
/// the Rust bindings name only mimalloc 2's options). Checked by a test.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps the allocator's memory close to what is in use, as glibc's malloc
/// did: memory freed goes back to the system at once rather than 10 ms
/// later, and no transparent huge pages (with them, every thread's first
/// touch of its heap takes 2 MiB). Measured with the namespace benchmark:
/// RSS idle 61 → 26 MB, with 10,000 idle connections 248 → 217 MB, the
/// same CPU per request. Runs first in `main`, before any thread starts.
fn tune_allocator() {
    // SAFETY: sets one of mimalloc's global options; safe at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    // Also for the mappings made before `main`; a kernel without THP says no.
    let _ = nix::sys::prctl::set_thp_disable(true);
}

#[derive(Parser)]
#[command(name = "interceptor", version, about = "Transparent guardrail layer for AI traffic")]
struct Cli {
    /// Configuration file (TOML). Without it the built-in defaults are used.
    #[arg(long, global = true, env = "INTERCEPTOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and install the redirect (the default command).
    Run(RunArgs),
    /// Check this host and report which redirect modes work here.
    Doctor(RunArgs),
    /// Remove redirect state a killed run left behind: iptables rules, and the
    /// pinned eBPF programs a fail-closed instance keeps on purpose.
    Cleanup,
    /// Internal: started by `run` in iptables mode with fail_mode = open;
    /// removes the rules when the proxy's pipe on stdin closes.
    #[command(hide = true)]
    Watchdog,
    /// Internal: started by `run` in iptables mode; names the process that
    /// holds a socket, for the proxy that no longer may read other
    /// processes' descriptors.
    #[command(hide = true)]
    AttributionHelper,
    /// Show what the running interceptor is doing (from its admin API).
    Status(RunArgs),
    /// Follow the running interceptor's decisions live (from its admin API),
    /// filtered by decision, provider, workload, rule or event kind.
    Observe(ObserveArgs),
    /// Validate the configuration and print the effective settings.
    CheckConfig(RunArgs),
    /// Show which rules and system prompts of the configured policy apply to
    /// a workload.
    CheckPolicy(CheckPolicyArgs),
    /// Print the tokens used over a period, per workload, model or provider,
    /// from the audit file.
    Usage(UsageArgs),
    /// The certificate authority that signs intercepted connections.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The Kubernetes admission webhook that makes pods trust the cluster CA.
    #[command(subcommand)]
    Webhook(WebhookCommand),
    /// Key brokering: placeholder credentials for workloads (see `[keys]`).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Issue a placeholder for a provider and workload scope; it is printed
    /// once and only its hash is kept.
    Issue(KeysIssueArgs),
    /// List the issued placeholders and the real keys' scopes (never a key).
    List(KeysFileArgs),
    /// Revoke the placeholder whose id starts with ID (at least 6 hex digits).
    Revoke(KeysRevokeArgs),
}

#[derive(clap::Args)]
struct KeysFileArgs {
    /// The brokering file. Default: `keys.file`, else keys.toml in the state
    /// directory.
    #[arg(long)]
    file: Option<PathBuf>,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(clap::Args)]
struct KeysIssueArgs {
    /// The provider whose real key the placeholder stands for (openai,
    /// anthropic, gemini, ... or a provider the file gives hosts for).
    #[arg(long)]
    provider: String,
    /// A workload pattern, as in policy scopes (`namespace:team-a`,
    /// `comm:python3`); repeatable. None: any workload.
    #[arg(long)]
    scope: Vec<String>,
    #[command(flatten)]
    file: KeysFileArgs,
}

#[derive(clap::Args)]
struct KeysRevokeArgs {
    /// The start of the placeholder's id, as `keys list` shows it.
    id: String,
    #[command(flatten)]
    file: KeysFileArgs,
}

#[derive(clap::Args)]
struct UsageArgs {
    /// The audit file to read (default: the configured guardrails.audit_file).
    #[arg(long)]
    audit_file: Option<PathBuf>,
    /// The period: this long before now (for example 30m, 24h, 7d).
    #[arg(long, default_value = "24h")]
    since: String,
    /// Totals per workload, model or provider.
    #[arg(long, default_value = "workload")]
    by: String,
    /// text (a table) or json.
    #[arg(long, default_value = "text")]
    output: OutputFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct ObserveArgs {
    /// Only these decisions: allow, modify, block, alert, error.
    #[arg(long, value_parser = ["allow", "modify", "block", "alert", "error"])]
    decision: Option<String>,
    /// Only this provider (openai, anthropic, bedrock, gemini, mcp, ...).
    #[arg(long)]
    provider: Option<String>,
    /// Only workloads with this text in a field (process name, executable,
    /// pod, namespace, ...).
    #[arg(long)]
    workload: Option<String>,
    /// Only decisions naming this rule.
    #[arg(long)]
    rule: Option<String>,
    /// Only this event kind (guardrail_decision, mcp_tool_call,
    /// unclassified_connection, websocket_closed).
    #[arg(long)]
    event: Option<String>,
    /// text (one line per event) or json (the audit events' JSON lines).
    #[arg(long, value_enum, default_value = "text")]
    output: interceptor::observe::Output,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct CheckPolicyArgs {
    /// The workload, as comma-separated field=value pairs; fields: comm,
    /// thread, exe, argv0, uid, cgroup, pod, namespace, service_account,
    /// container, label (label=key=value, once per label). Repeatable; adds
    /// to --pid. Example: comm=claude,exe=/usr/bin/node,uid=1000,namespace=team-a,label=app=billing
    #[arg(long, value_name = "FIELDS")]
    workload: Vec<String>,
    /// A live process: its name, executable, argv[0], uid and cgroup.
    #[arg(long)]
    pid: Option<u32>,
    /// Only for this provider (a policy provider name, e.g. anthropic).
    #[arg(long)]
    provider: Option<String>,
    /// Only for this host (the server name the client asks for).
    #[arg(long)]
    host: Option<String>,
    /// A policy file to check instead of the configured one.
    #[arg(long)]
    policy: Option<PathBuf>,
}

#[derive(Subcommand)]
enum WebhookCommand {
    /// Serve the mutating admission webhook (HTTPS).
    Serve(WebhookServeArgs),
    /// Create the webhook's serving certificate (ca.crt, tls.crt, tls.key)
    /// and print the caBundle for the MutatingWebhookConfiguration.
    Certs(WebhookCertsArgs),
}

#[derive(clap::Args)]
struct WebhookServeArgs {
    /// Address to listen on.
    #[arg(long, env = "INTERCEPTOR_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Serving certificate chain (PEM).
    #[arg(long, env = "INTERCEPTOR_WEBHOOK_TLS_CERT", default_value = "/etc/interceptor-webhook/tls.crt")]
    tls_cert: PathBuf,
    /// Serving key (PEM).
    #[arg(long, env = "INTERCEPTOR_WEBHOOK_TLS_KEY", default_value = "/etc/interceptor-webhook/tls.key")]
    tls_key: PathBuf,
    /// The cluster CA certificate(s) pods are made to trust (PEM; during a
    /// rollover, both CAs). Never the key.
    #[arg(long, env = "INTERCEPTOR_WEBHOOK_CA_CERT", default_value = "/etc/interceptor-ca/ca.crt")]
    ca_cert: PathBuf,
    /// Image of the initContainer that writes the trust files (the
    /// interceptor image).
    #[arg(long, env = "INTERCEPTOR_WEBHOOK_IMAGE")]
    image: String,
    /// Log format.
    #[arg(long, env = "INTERCEPTOR_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
}

#[derive(clap::Args)]
struct WebhookCertsArgs {
    /// Directory to write ca.crt, tls.crt and tls.key (0600) into.
    #[arg(long)]
    out: PathBuf,
    /// The webhook's Service.
    #[arg(long, default_value = "interceptor-webhook")]
    service: String,
    /// The Service's namespace.
    #[arg(long, default_value = "interceptor")]
    namespace: String,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Print the CA certificate (PEM), creating the CA if needed.
    Export(StateArgs),
    /// Add the CA certificate to the trust stores found: the system store,
    /// every user's NSS database (Chromium, Electron apps) and Firefox
    /// profile, and every JVM's cacerts. Prints what changed, and what to set
    /// for runtimes that read none of them.
    Install(StoreArgs),
    /// Remove what `ca install` added (as recorded in the state directory),
    /// and the CA from the system store.
    Uninstall(StoreArgs),
    /// Create a cluster CA once: ca.crt, ca.key (0600) and secret.yaml (0600,
    /// a Kubernetes Secret holding both) in a new directory. Name-constrained
    /// to the AI domains of the configuration unless told otherwise.
    CreateCluster(CreateClusterArgs),
    /// Write the trust files for a workload (ca.crt, ca-bundle.crt with the
    /// system roots, truststore.jks) from the CA certificate in
    /// INTERCEPTOR_CA_CERT or --ca-file. Run by the webhook's initContainer.
    Bundle(BundleArgs),
}

#[derive(clap::Args)]
struct CreateClusterArgs {
    /// Directory for the new CA (created 0700; must not hold a CA already).
    #[arg(long)]
    out: PathBuf,
    /// Create the CA without name constraints: it can then sign for any
    /// name, which every pod of the opted-in namespaces trusts.
    #[arg(long)]
    no_name_constraints: bool,
    /// Namespace of the Secret in secret.yaml.
    #[arg(long, default_value = "interceptor")]
    namespace: String,
    /// Name of the Secret in secret.yaml.
    #[arg(long, default_value = "interceptor-ca")]
    secret_name: String,
}

#[derive(clap::Args)]
struct BundleArgs {
    /// Directory to write the trust files into (must exist).
    #[arg(long)]
    out: PathBuf,
    /// File with the CA certificate(s), PEM, instead of INTERCEPTOR_CA_CERT.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct StateArgs {
    /// Directory for persistent state (the CA).
    #[arg(long, env = "INTERCEPTOR_STATE_DIR", default_value = "/var/lib/interceptor")]
    state_dir: PathBuf,
}

#[derive(clap::Args)]
struct StoreArgs {
    #[command(flatten)]
    state: StateArgs,
    /// Which kinds of trust store to change (comma separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "system,nss,firefox,java")]
    stores: Vec<ca::StoreKind>,
    /// A Java home whose cacerts to change (repeatable). Default: every JDK
    /// and JRE under /usr/lib/jvm and /usr/java, and the `java` on PATH.
    #[arg(long = "java-home", value_name = "DIR")]
    java_homes: Vec<PathBuf>,
    /// Read accounts (and so home directories) from this file instead of
    /// /etc/passwd. For tests.
    #[arg(long, hide = true, default_value = "/etc/passwd")]
    passwd: PathBuf,
}

impl StoreArgs {
    fn scope(&self) -> ca::Scope {
        let mut scope = ca::Scope::machine(self.stores.iter().copied());
        scope.passwd = self.passwd.clone();
        if !self.java_homes.is_empty() {
            scope.java_homes = Some(self.java_homes.clone());
        }
        scope
    }
}

#[derive(clap::Args, Default)]
struct RunArgs {
    /// Redirect mode.
    #[arg(long, env = "INTERCEPTOR_REDIRECT", value_enum)]
    redirect: Option<RedirectMode>,
    /// cgroup v2 directory whose processes are intercepted (eBPF mode).
    #[arg(long, env = "INTERCEPTOR_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for upstream connections.
    #[arg(long, env = "INTERCEPTOR_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// Proxy port (0 picks a free one).
    #[arg(long, env = "INTERCEPTOR_PORT")]
    port: Option<u16>,
    /// Workers serving connections (`proxy.worker_threads`; 0: one per CPU).
    #[arg(long, env = "INTERCEPTOR_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Admin API address (loopback only).
    #[arg(long, env = "INTERCEPTOR_ADMIN")]
    admin: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "INTERCEPTOR_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Directory for persistent state (the CA).
    #[arg(long, env = "INTERCEPTOR_STATE_DIR", default_value = "/var/lib/interceptor")]
    state_dir: PathBuf,
    /// Base URL of an Akto instance: adds the Akto guardrail backend.
    #[arg(long, env = "AKTO_URL")]
    akto_url: Option<String>,
    /// Application name that groups this traffic in Akto, as a literal (a
    /// template, `{namespace}/{pod_label:app}`, goes in the config file).
    #[arg(long, env = "APP_NAME")]
    app_name: Option<String>,
    /// Token sent to Akto as `Authorization` (prefer the environment).
    #[arg(long, env = "AKTO_API_TOKEN", hide_env_values = true)]
    akto_token: Option<String>,
    /// Streams checked by Akto: `async` forwards at once (`guardrails.stream_mode
    /// = "monitor"`), `sync` waits for each verdict (`"enforce"`).
    #[arg(long, env = "AKTO_GUARDRAILS_MODE", value_name = "sync|async")]
    akto_guardrails_mode: Option<String>,
    /// Characters of streamed text per check (`guardrails.stream_window`).
    #[arg(long, env = "AKTO_TEXT_THRESHOLD", value_name = "CHARS")]
    akto_text_threshold: Option<String>,
    /// Log the bodies sent to Akto and its replies (`guardrails.akto.log_payloads`).
    #[arg(long, env = "AKTO_LOG_PAYLOADS", value_name = "true|false")]
    akto_log_payloads: Option<String>,
    /// This node's name: the pod directory watches its pods only.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
}

impl RunArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            redirect: self.redirect,
            cgroup: self.cgroup.clone(),
            port: self.port,
            worker_threads: self.worker_threads,
            upstream_ca: self.upstream_ca.clone(),
            akto_url: self.akto_url.clone(),
            app_name: self.app_name.clone(),
            akto_token: self.akto_token.clone(),
            akto_addon: AddonEnv {
                guardrails_mode: self.akto_guardrails_mode.clone(),
                text_threshold: self.akto_text_threshold.clone(),
                log_payloads: self.akto_log_payloads.clone(),
            },
            admin: self.admin,
            log_format: self.log_format,
            node_name: self.node_name.clone(),
        }
    }
}

fn load(path: Option<&PathBuf>, args: &RunArgs) -> Result<Config, ExitCode> {
    Config::load(path.map(PathBuf::as_path), &args.overrides()).map_err(|error| {
        eprintln!("error: {}", error::chain(&error));
        ExitCode::from(2)
    })
}

/// The AI domains in force (`ai`, then `ai_extra`) and the request formats
/// read on each, then the MCP server names in force, as TOML comments so the output stays a valid configuration.
fn ai_domain_formats(config: &Config) -> String {
    let mut out = String::from("\n# AI domains and the request formats read on each:\n");
    for domain in config.domains.ai.iter().chain(&config.domains.ai_extra) {
        out.push_str(&format!("#   {domain}: {}\n", guardrails::providers::describe_domain(domain)));
    }
    if config.mcp.enabled {
        out.push_str("\n# MCP servers, intercepted and inspected as MCP:\n");
        for domain in config.mcp.all_domains() {
            out.push_str(&format!("#   {domain}\n"));
        }
    } else {
        out.push_str("\n# MCP inspection is off (mcp.enabled = false): MCP server names are not intercepted.\n");
    }
    out
}

/// `interceptor keys`: edits and lists the brokering file.
fn keys_command(config_path: Option<&PathBuf>, command: KeysCommand) -> ExitCode {
    use guardrails::keys::{Broker, KeysFile};
    let config = match load(config_path, &RunArgs::default()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let args = match &command {
        KeysCommand::Issue(a) => &a.file,
        KeysCommand::List(a) => a,
        KeysCommand::Revoke(a) => &a.file,
    };
    let path = args.file.clone().unwrap_or_else(|| config.keys.file_in(&args.state.state_dir));
    let prefix = &config.keys.placeholder_prefix;
    let bad = |error: &(dyn std::error::Error + 'static)| {
        eprintln!("error: {}", error::chain(error));
        ExitCode::from(2)
    };
    match command {
        KeysCommand::Issue(a) => {
            let mut file = match KeysFile::open(&path, prefix) {
                Ok(f) => f,
                Err(error) => return bad(&error),
            };
            let issued = interceptor::audit::Timestamp::now().to_string();
            match file.issue(&a.provider, &a.scope, &issued) {
                Ok(placeholder) => {
                    println!("{placeholder}");
                    eprintln!(
                        "issued a {} placeholder for {} (id {}); it is shown only now",
                        a.provider,
                        if a.scope.is_empty() { "any workload".to_string() } else { a.scope.join(", ") },
                        &guardrails::keys::placeholder_id(&placeholder)[..12],
                    );
                    if guardrails::keys::takes_aws_credentials(&a.provider) {
                        eprintln!(
                            "give it as the access key id (AWS_ACCESS_KEY_ID), with any secret: requests are \
                             signed again with the real credentials"
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(error) => bad(&error),
            }
        }
        KeysCommand::List(_) => match Broker::load(&path, prefix) {
            Ok(broker) => {
                println!("{:<14} {:<14} {:<22} SCOPE", "ID", "PROVIDER", "ISSUED");
                for p in broker.placeholders() {
                    let scope = if p.workloads.is_empty() { "*".to_string() } else { p.workloads.join(", ") };
                    println!("{:<14} {:<14} {:<22} {scope}", &p.id[..12], p.provider, p.issued);
                }
                for (provider, scope) in broker.real_scopes() {
                    let scope = if scope.is_empty() { "*".to_string() } else { scope.join(", ") };
                    println!("{:<14} {provider:<14} {:<22} {scope}", "real key", "");
                }
                ExitCode::SUCCESS
            }
            Err(error) => bad(&error),
        },
        KeysCommand::Revoke(a) => {
            let revoked = KeysFile::open(&path, prefix).and_then(|mut f| f.revoke(&a.id));
            match revoked {
                Ok(binding) => {
                    println!("revoked {} ({})", &binding.id[..12], binding.provider);
                    ExitCode::SUCCESS
                }
                Err(error) => bad(&error),
            }
        }
    }
}

/// Reads `/status` from the admin API and renders it for a person.
fn status(admin: SocketAddr) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let body: serde_json::Value = runtime.block_on(async {
        let client = reqwest::Client::builder().no_proxy().timeout(std::time::Duration::from_secs(5)).build()?;
        anyhow::Ok(client.get(format!("http://{admin}/status")).send().await?.error_for_status()?.json().await?)
    })?;
    let mut out = String::new();
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    writeln!(out, "redirect:  {} ({})", s(&body["redirect_mode"]), s(&body["attach_point"]))?;
    writeln!(out, "ready:     {}", if body["ready"] == true { "yes" } else { "no" })?;
    if let Some(proxy) = body["proxy"].as_object() {
        writeln!(out, "proxy:     {} {}", proxy["v4"], proxy.get("v6").map(|v| v.to_string()).unwrap_or_default())?;
    }
    let nets = body["targets"]["nets"].as_array().cloned().unwrap_or_default();
    let mut per_domain: std::collections::BTreeMap<String, usize> = Default::default();
    let sources = body["targets"]["sources"].as_object().cloned().unwrap_or_default();
    for names in sources.values() {
        for name in names.as_array().into_iter().flatten() {
            *per_domain.entry(s(name)).or_default() += 1;
        }
    }
    writeln!(out, "targets:   {} networks", nets.len())?;
    for (domain, count) in &per_domain {
        writeln!(out, "  {domain:<40} {count} address(es)")?;
    }
    let static_nets: Vec<String> =
        nets.iter().map(s).filter(|n| !sources.keys().any(|ip| n.starts_with(&format!("{ip}/")))).collect();
    if !static_nets.is_empty() {
        writeln!(out, "  configured: {}", static_nets.join(", "))?;
    }
    if let Some(plain) = body["targets"]["plain"].as_object().filter(|p| !p.is_empty()) {
        let pairs: Vec<String> = plain.iter().map(|(addr, host)| format!("{addr} ({})", s(host))).collect();
        writeln!(out, "  plain MCP: {}", pairs.join(", "))?;
    }
    if let Some(pods) = body.get("pod_directory").filter(|p| p.is_object()) {
        writeln!(
            out,
            "pods:      {} ({} known on node {}){}",
            s(&pods["state"]),
            pods["pods"],
            s(&pods["node"]),
            pods["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default()
        )?;
    }
    writeln!(out, "counters:")?;
    for pair in body["counters"].as_array().into_iter().flatten() {
        writeln!(out, "  {:<24} {}", s(&pair[0]), pair[1])?;
    }
    Ok(out)
}

/// `usage`: bad arguments or no audit file exit 2, an unreadable file 1.
fn usage(config_path: Option<&PathBuf>, args: &UsageArgs) -> ExitCode {
    use interceptor::usage_report::{self, UsageReportError};
    let bad = |error: &UsageReportError| {
        eprintln!("error: {}", error::chain(error));
        ExitCode::from(2)
    };
    let (since, by) = match (usage_report::parse_since(&args.since), args.by.parse()) {
        (Ok(since), Ok(by)) => (since, by),
        (Err(error), _) | (_, Err(error)) => return bad(&error),
    };
    let path = match &args.audit_file {
        Some(path) => path.clone(),
        None => match load(config_path, &RunArgs::default()) {
            Ok(config) if !config.guardrails.audit_file.as_os_str().is_empty() => config.guardrails.audit_file,
            Ok(_) => return bad(&UsageReportError::NoAuditFile),
            Err(code) => return code,
        },
    };
    let since = time::OffsetDateTime::now_utc() - since;
    let report = match usage_report::report(&path, since, by) {
        Ok(report) => report,
        Err(error) => return fail(&error),
    };
    match args.output {
        OutputFormat::Text => print!("{}", report.text()),
        OutputFormat::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(error) => return fail(&error),
        },
    }
    if report.skipped_lines > 0 {
        eprintln!("note: {} lines of {} are not audit events and were skipped", report.skipped_lines, path.display());
    }
    ExitCode::SUCCESS
}

/// `check-policy`: bad input or policy exits 2, like `check-config`.
fn check_policy(config_path: Option<&PathBuf>, args: &CheckPolicyArgs) -> ExitCode {
    use interceptor::{check_policy as check, process::Procfs, workload::Workload};
    let bad = |error: &(dyn std::error::Error + 'static)| {
        eprintln!("error: {}", error::chain(error));
        ExitCode::from(2)
    };
    if args.pid.is_none() && args.workload.is_empty() {
        eprintln!("error: describe the workload with --workload field=value,... or --pid N");
        return ExitCode::from(2);
    }
    let config = match load(config_path, &RunArgs::default()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut notes = Vec::new();
    let mut workload = match args.pid {
        Some(pid) => match check::workload_of_pid(&Procfs::default(), pid, &mut notes) {
            Ok(w) => w,
            Err(error) => return bad(&error),
        },
        None => Workload::default(),
    };
    for spec in &args.workload {
        if let Err(error) = check::parse_workload(spec, &mut workload, &mut notes) {
            return bad(&error);
        }
    }
    let provider = match args.provider.as_deref().map(check::provider_named).transpose() {
        Ok(p) => p,
        Err(error) => return bad(&error),
    };
    let (policy, note) = match check::load_policy(&config, args.policy.as_deref()) {
        Ok(loaded) => loaded,
        Err(error) => return bad(&error),
    };
    notes.extend(note);
    print!("{}", check::report(&policy, &workload, provider, args.host.as_deref()));
    for note in notes {
        eprintln!("note: {note}");
    }
    ExitCode::SUCCESS
}

fn fail(error: &(dyn std::error::Error + 'static)) -> ExitCode {
    eprintln!("error: {}", error::chain(error));
    ExitCode::FAILURE
}

fn ca_command(config_path: Option<&PathBuf>, command: CaCommand) -> ExitCode {
    let state_dir = match &command {
        CaCommand::Export(a) => a.state_dir.clone(),
        CaCommand::Install(a) | CaCommand::Uninstall(a) => a.state.state_dir.clone(),
        CaCommand::CreateCluster(args) => return create_cluster(config_path, args),
        CaCommand::Bundle(args) => return bundle(args),
    };
    if let CaCommand::Uninstall(args) = &command {
        // Needs no CA: what to remove is in the manifest.
        return print_store_report(ca::uninstall_all(&state_dir, &args.scope()), "uninstall");
    }
    // The CA the configuration names: the cluster CA (tls.ca_dir) or the
    // per-node one in the state directory.
    let config = match load(config_path, &RunArgs::default()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let ca = match dataplane::certificate_authority(&config, &state_dir) {
        Ok(ca) => ca,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        CaCommand::Export(_) => {
            print!("{}", ca.cert_pem());
            ExitCode::SUCCESS
        }
        CaCommand::Install(args) => {
            let result = ca::install_all(&ca, &state_dir, &args.scope());
            let bundle = result.as_ref().ok().and_then(|r| r.system_bundle.clone());
            let code = print_store_report(result, "install");
            let bundle = bundle.unwrap_or_else(|| TrustStore::debian().bundle);
            println!("\n{}", ca::runtime_guidance(ca.cert_path(), &bundle));
            code
        }
        CaCommand::Uninstall(_) | CaCommand::CreateCluster(_) | CaCommand::Bundle(_) => ExitCode::SUCCESS,
    }
}

/// Prints one line per trust store; fails when any store failed.
fn print_store_report(result: Result<ca::Report, ca::CaError>, what: &str) -> ExitCode {
    let report = match result {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {}", error::chain(&error));
            return ExitCode::FAILURE;
        }
    };
    if report.changes.is_empty() {
        println!("no trust store found to {what}");
    }
    for change in &report.changes {
        println!("{change}");
    }
    if report.manifest.exists() {
        println!("recorded in {} (`interceptor ca uninstall` removes what is listed there)", report.manifest.display());
    }
    match report.failures() {
        0 => ExitCode::SUCCESS,
        n => {
            eprintln!("error: {n} trust store(s) could not be changed (see above)");
            ExitCode::FAILURE
        }
    }
}

fn create_cluster(config_path: Option<&PathBuf>, args: &CreateClusterArgs) -> ExitCode {
    let config = match load(config_path, &RunArgs::default()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let spec = if args.no_name_constraints {
        None
    } else {
        let bases = match config.domain_policy() {
            Ok(policy) => policy.name_constraint_bases(),
            Err(error) => return fail(&error),
        };
        match ca::NameConstraintsSpec::new(bases) {
            Ok(spec) => Some(spec),
            Err(reason) => {
                eprintln!("error: cannot derive name constraints from the AI domains: {reason}");
                return ExitCode::FAILURE;
            }
        }
    };
    let ca = match CertificateAuthority::create_cluster(&args.out, spec.as_ref()) {
        Ok(ca) => ca,
        Err(error) => return fail(&error),
    };
    let secret = args.out.join("secret.yaml");
    if let Err(error) = ca::write_secret_manifest(&args.out, &secret, &args.namespace, &args.secret_name) {
        return fail(&error);
    }
    println!("created {} ({})", ca.cert_path().display(), ca.subject());
    match &spec {
        Some(spec) => {
            println!("name constraints (permitted DNS subtrees, no IP address): {}", spec.permitted_dns().join(", "))
        }
        None => println!("warning: no name constraints: this CA can sign for any name"),
    }
    println!(
        "the key is in {} (0600) and in {} (0600); apply the Secret, then keep the directory offline or delete it:\n  kubectl apply -f {}",
        args.out.join("ca.key").display(),
        secret.display(),
        secret.display()
    );
    ExitCode::SUCCESS
}

fn bundle(args: &BundleArgs) -> ExitCode {
    let (pem, origin) = match &args.ca_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => (text, path.clone()),
            Err(error) => {
                eprintln!("error: cannot read {}: {error}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => match std::env::var(interceptor::webhook::CA_CERT_ENV) {
            Ok(text) => (text, PathBuf::from(format!("${}", interceptor::webhook::CA_CERT_ENV))),
            Err(_) => {
                eprintln!("error: set {} or --ca-file to the CA certificate", interceptor::webhook::CA_CERT_ENV);
                return ExitCode::FAILURE;
            }
        },
    };
    let result = ca::TrustBundle::new(&pem, &origin, ca::TrustBundle::system_roots())
        .and_then(|bundle| ca::write_bundle_dir(&bundle, &args.out));
    match result {
        Ok(written) => {
            for path in written {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

fn webhook_command(command: WebhookCommand) -> ExitCode {
    match command {
        WebhookCommand::Certs(args) => {
            if let Err(error) = std::fs::create_dir_all(&args.out) {
                eprintln!("error: cannot create {}: {error}", args.out.display());
                return ExitCode::FAILURE;
            }
            match webhook::write_serving_certs(&args.out, &args.service, &args.namespace) {
                Ok(certs) => {
                    use base64::Engine as _;
                    println!(
                        "wrote {}, {} and {} (0600) for {}",
                        certs.ca_cert.display(),
                        certs.cert.display(),
                        certs.key.display(),
                        certs.names.join(", ")
                    );
                    println!("caBundle: {}", base64::engine::general_purpose::STANDARD.encode(certs.ca_pem.as_bytes()));
                    ExitCode::SUCCESS
                }
                Err(error) => fail(&error),
            }
        }
        WebhookCommand::Serve(args) => {
            telemetry::init(args.log_format);
            let ca_pem = match std::fs::read_to_string(&args.ca_cert) {
                Ok(text) => text,
                Err(error) => {
                    eprintln!("error: cannot read the CA certificate {}: {error}", args.ca_cert.display());
                    return ExitCode::FAILURE;
                }
            };
            // Certificates only: refuse a file that carries a key.
            if ca_pem.contains("PRIVATE KEY") {
                eprintln!(
                    "error: {} holds a private key; give the webhook the CA certificate only",
                    args.ca_cert.display()
                );
                return ExitCode::FAILURE;
            }
            // The same parsing the initContainer does, so a bad file fails here.
            if let Err(error) = ca::parse_ca_certs(&ca_pem, &args.ca_cert) {
                return fail(&error);
            }
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(error) => {
                    eprintln!("error: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let settings = webhook::InjectSettings { ca_pem, image: args.image };
            runtime.block_on(async {
                let server =
                    match webhook::WebhookServer::bind(args.listen, &args.tls_cert, &args.tls_key, settings).await {
                        Ok(server) => server,
                        Err(error) => return fail(&error),
                    };
                let listen = server.local_addr().map_or_else(|_| args.listen.to_string(), |a| a.to_string());
                tracing::info!(%listen, "admission webhook serving");
                tokio::select! {
                    () = webhook::serve(server) => ExitCode::SUCCESS,
                    _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
                    () = sigterm() => ExitCode::SUCCESS,
                }
            })
        }
    }
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let command = cli
        .command
        .unwrap_or(Command::Run(RunArgs { state_dir: PathBuf::from("/var/lib/interceptor"), ..Default::default() }));
    match command {
        Command::Run(args) => {
            let config = match load(cli.config.as_ref(), &args) {
                Ok(c) => c,
                Err(code) => return code,
            };
            telemetry::init(config.log.format);
            let runtime = match app::runtime() {
                Ok(rt) => rt,
                Err(error) => {
                    eprintln!("error: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = app::RunOptions {
                config,
                config_path: cli.config.clone(),
                overrides: args.overrides(),
                state_dir: args.state_dir.clone(),
            };
            match runtime.block_on(app::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(error = format!("{error:#}"), "interceptor failed");
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Doctor(args) => {
            let mode = match load(cli.config.as_ref(), &args) {
                Ok(c) => c.redirect.mode,
                Err(code) => return code,
            };
            if doctor::run(mode) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Command::Watchdog => {
            telemetry::init(LogFormat::Json);
            match redirect::iptables::watchdog() {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(error = %error::chain(&error), "watchdog cannot remove the iptables redirect");
                    ExitCode::FAILURE
                }
            }
        }
        Command::AttributionHelper => {
            telemetry::init(LogFormat::Json);
            match redirect::owner::serve_helper() {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::warn!(%error, "attribution helper stopped");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cleanup => {
            telemetry::init(LogFormat::Text);
            // Pinned eBPF links and maps (left on purpose by a fail-closed
            // instance that crashed) and iptables chains.
            let pinned = redirect::liveness::cleanup();
            match redirect::iptables::cleanup()
                .and(pinned.map(|_| ()).map_err(|e| redirect::RedirectError::Pin(e.to_string())))
            {
                Ok(()) => {
                    println!(
                        "no interceptor redirect remains (no iptables rules, no pinned eBPF programs; unpinned eBPF programs go when the interceptor exits)"
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {}", error::chain(&error));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ca(command) => ca_command(cli.config.as_ref(), command),
        Command::Webhook(command) => webhook_command(command),
        Command::Keys(command) => keys_command(cli.config.as_ref(), command),
        Command::Status(args) => {
            let admin = match load(cli.config.as_ref(), &args) {
                Ok(c) => c.admin.address,
                Err(code) => return code,
            };
            match status(admin) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!(
                        "error: cannot read the status from http://{admin}/status: {error:#} (is the interceptor running?)"
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::Observe(args) => {
            let admin = match load(cli.config.as_ref(), &args.run) {
                Ok(c) => c.admin.address,
                Err(code) => return code,
            };
            let filter = interceptor::observe::Filter {
                decision: args.decision,
                provider: args.provider,
                workload: args.workload,
                rule: args.rule,
                event: args.event,
            };
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(interceptor::observe::run(admin, &filter, args.output)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error:#} (is the interceptor running?)");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckPolicy(args) => check_policy(cli.config.as_ref(), &args),
        Command::Usage(args) => usage(cli.config.as_ref(), &args),
        Command::CheckConfig(args) => match load(cli.config.as_ref(), &args) {
            Ok(config) => {
                match toml::to_string_pretty(&config) {
                    Ok(text) => print!("{text}"),
                    Err(error) => eprintln!("warning: cannot print the configuration: {error}"),
                }
                print!("{}", ai_domain_formats(&config));
                if config.keys.enabled {
                    let path = config.keys.file_in(&args.state_dir);
                    if let Err(error) = guardrails::keys::Broker::load(&path, &config.keys.placeholder_prefix) {
                        eprintln!("error: {}", error::chain(&error));
                        return ExitCode::from(2);
                    }
                }
                if let Err(error) = interceptor::dataplane::budget_rules(&config) {
                    eprintln!("error: {error:#}");
                    return ExitCode::from(2);
                }
                eprintln!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tuning holds: freed memory is purged at once and the process
    /// takes no transparent huge pages.
    #[test]
    fn the_allocator_is_tuned_for_memory() {
        tune_allocator();
        // SAFETY: reads one of mimalloc's global options.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }, 0);
        assert_eq!(nix::sys::prctl::get_thp_disable().ok(), Some(true));
    }

    /// [`MI_OPTION_PURGE_DELAY`] names the option `MIMALLOC_PURGE_DELAY`
    /// sets: a copy of this test binary started with the variable reads it
    /// back through that number.
    #[test]
    fn the_tuned_option_is_mimallocs_purge_delay() {
        const NAME: &str = "tests::the_tuned_option_is_mimallocs_purge_delay";
        if let Ok(value) = std::env::var("MIMALLOC_PURGE_DELAY") {
            // SAFETY: reads one of mimalloc's global options.
            let read = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
            assert_eq!(read.to_string(), value);
            return;
        }
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args(["--exact", NAME, "--test-threads=1"])
            .env("MIMALLOC_PURGE_DELAY", "37")
            .output()
            .expect("run the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
