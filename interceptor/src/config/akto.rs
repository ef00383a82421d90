//! Settings of the Akto guardrail backend (`[guardrails.akto]`): typed
//! values, their documented defaults and their validation, and the
//! environment variables of Akto's mitmproxy addon ([`AddonEnv`]) read as
//! overrides. The client that uses them is `guardrails::akto`; this module
//! does no I/O (the variables are read by the command line) and imports
//! only the app-name template (`app_name`).

use std::{fmt, time::Duration};

use http::HeaderValue;
use serde::{Deserialize, Serialize};

use crate::app_name::AppName;

/// Path appended to `AKTO_URL`.
pub const API_PATH: &str = "/api/http-proxy";

/// Settings of the Akto backend. `url`, `app_name` and `token` keep the
/// seed's environment meaning (`AKTO_URL`, `APP_NAME`, `AKTO_API_TOKEN`).
/// Empty strings mean unset.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AktoConfig {
    /// Base URL of the Akto instance; [`API_PATH`] is appended.
    pub url: String,
    /// Groups traffic per app in the dashboard (sent as the `host` request
    /// header, normalized as the server does). A template rendered per call
    /// from the connection's workload (`{namespace|host}/{pod_label:app}`,
    /// see `app_name`); `APP_NAME` sets it as a literal. Empty, or rendered
    /// empty: the upstream host.
    pub app_name: String,
    /// Sent as `Authorization: <token>`. Never serialized, printed or logged.
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// Request and response checks (the addon's 15 s).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Each stream batch check (the addon's 5 s).
    #[serde(with = "humantime_serde")]
    pub stream_timeout: Duration,
    /// `Allowed: false` blocks, as the product documentation says. Off: only
    /// `behaviour: block` blocks and other disallowed verdicts are alerts
    /// (the addon's latest code).
    pub block_on_disallowed: bool,
    /// `ingest_data=true`: Akto records the checked traffic.
    pub ingest: bool,
    /// Log every body sent to Akto and every reply (`AKTO_LOG_PAYLOADS`):
    /// prompts and answers end up in the log. Credentials never do (they are
    /// not in the bodies, and the token is a header).
    pub log_payloads: bool,
    /// `akto_connector=<name>` on every call, as Akto's other connectors do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
    pub account_id: String,
    pub vxlan_id: String,
    /// Node name, sent as `daemonset_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daemonset_id: Option<String>,
    /// Consecutive failures that open the circuit; 0 disables the breaker.
    pub circuit_failures: u32,
    /// How long an open circuit fails fast before one probe goes through.
    #[serde(with = "humantime_serde")]
    pub circuit_cooldown: Duration,
    /// `contextSource` of MCP calls, which pick the Akto guardrail policies
    /// of that context: `ENDPOINT`, as Akto's MCP endpoint shield sends
    /// them; `AGENTIC` applies the policies of the LLM traffic instead.
    pub mcp_context_source: String,
}

impl Default for AktoConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            app_name: String::new(),
            token: None,
            request_timeout: Duration::from_secs(15),
            stream_timeout: Duration::from_secs(5),
            block_on_disallowed: true,
            ingest: true,
            log_payloads: false,
            connector: None,
            account_id: "1000000".into(),
            vxlan_id: "test".into(),
            daemonset_id: None,
            circuit_failures: 5,
            circuit_cooldown: Duration::from_secs(30),
            mcp_context_source: "ENDPOINT".into(),
        }
    }
}

impl fmt::Debug for AktoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AktoConfig")
            .field("url", &self.url)
            .field("app_name", &self.app_name)
            .field("token", &self.token.as_ref().filter(|t| !t.is_empty()).map(|_| "<redacted>"))
            .field("request_timeout", &self.request_timeout)
            .field("stream_timeout", &self.stream_timeout)
            .field("block_on_disallowed", &self.block_on_disallowed)
            .field("ingest", &self.ingest)
            .field("log_payloads", &self.log_payloads)
            .field("connector", &self.connector)
            .field("account_id", &self.account_id)
            .field("vxlan_id", &self.vxlan_id)
            .field("daemonset_id", &self.daemonset_id)
            .field("circuit_failures", &self.circuit_failures)
            .field("circuit_cooldown", &self.circuit_cooldown)
            .field("mcp_context_source", &self.mcp_context_source)
            .finish()
    }
}

impl AktoConfig {
    /// Every problem with this configuration (empty when valid), so a config
    /// loader can report them all at once.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Err(e) = endpoint_url(&self.url) {
            errors.push(e);
        }
        if let Err(e) = AppName::parse(&self.app_name) {
            errors.push(format!("akto app_name {:?}: {e}", self.app_name));
        }
        if let Some(token) = self.token()
            && HeaderValue::from_str(token).is_err()
        {
            errors.push("akto token contains characters not allowed in an HTTP header".into());
        }
        if self.request_timeout.is_zero() {
            errors.push("akto request_timeout must be greater than zero".into());
        }
        if self.stream_timeout.is_zero() {
            errors.push("akto stream_timeout must be greater than zero".into());
        }
        let source = &self.mcp_context_source;
        if source.is_empty() || !source.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
            errors.push(format!(
                "akto mcp_context_source {source:?} must be an upper-case name such as ENDPOINT or AGENTIC"
            ));
        }
        if self.circuit_failures > 0 && self.circuit_cooldown.is_zero() {
            errors.push("akto circuit_cooldown must be greater than zero when circuit_failures is set".into());
        }
        errors
    }

    /// The token, unless unset or empty.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref().filter(|t| !t.is_empty())
    }
}

/// `AKTO_URL` + [`API_PATH`], validated.
pub fn endpoint_url(base: &str) -> Result<reqwest::Url, String> {
    let base = base.trim();
    if base.is_empty() {
        return Err("akto url is empty (set AKTO_URL)".into());
    }
    let mut url = reqwest::Url::parse(base).map_err(|e| format!("akto url is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("akto url must be http or https, not {}", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("akto url has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("akto url must not carry credentials; use AKTO_API_TOKEN".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("akto url must not have a query or fragment".into());
    }
    let path = url.path().trim_end_matches('/');
    let path = if path.ends_with(API_PATH) { path.to_owned() } else { format!("{path}{API_PATH}") };
    url.set_path(&path);
    Ok(url)
}

/// The addon's variables that are not settings of the Akto client itself.
pub const ENV_GUARDRAILS_MODE: &str = "AKTO_GUARDRAILS_MODE";
pub const ENV_TEXT_THRESHOLD: &str = "AKTO_TEXT_THRESHOLD";
pub const ENV_LOG_PAYLOADS: &str = "AKTO_LOG_PAYLOADS";

/// The environment variables of Akto's mitmproxy addon besides `AKTO_URL`
/// and `APP_NAME`, as read (an empty value counts as unset). Each maps to a
/// setting and overrides the file's value:
///
/// * `AKTO_GUARDRAILS_MODE`: `async` (the addon's default) forwards stream
///   chunks at once, `sync` holds each batch until its verdict:
///   `guardrails.stream_mode` `monitor` / `enforce`;
/// * `AKTO_TEXT_THRESHOLD`: characters of streamed text per check (600):
///   `guardrails.stream_window`;
/// * `AKTO_LOG_PAYLOADS`: `true` logs the bodies sent to Akto and its
///   replies: `guardrails.akto.log_payloads`.
///
/// The addon reads anything but `sync` as async and anything but `true` as
/// false; here a value outside those words is a start-up error instead, so
/// that a typo (`AKTO_GUARDRAILS_MODE=synch`) cannot silently weaken
/// enforcement. Case and surrounding spaces do not matter.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AddonEnv {
    pub guardrails_mode: Option<String>,
    pub text_threshold: Option<String>,
    pub log_payloads: Option<String>,
}

/// `AKTO_GUARDRAILS_MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardrailsMode {
    /// Stream verdicts are recorded, never waited for.
    Async,
    /// Each stream batch waits for its verdict; a block cuts the stream.
    Sync,
}

impl AddonEnv {
    pub fn guardrails_mode(&self) -> Result<Option<GuardrailsMode>, String> {
        let Some(value) = set(&self.guardrails_mode) else { return Ok(None) };
        match value.to_ascii_lowercase().as_str() {
            "async" => Ok(Some(GuardrailsMode::Async)),
            "sync" => Ok(Some(GuardrailsMode::Sync)),
            _ => Err(format!("{ENV_GUARDRAILS_MODE}={value:?}: must be \"sync\" or \"async\"")),
        }
    }

    /// A positive number of characters.
    pub fn text_threshold(&self) -> Result<Option<usize>, String> {
        let Some(value) = set(&self.text_threshold) else { return Ok(None) };
        match value.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!("{ENV_TEXT_THRESHOLD}={value:?}: must be a positive number of characters")),
        }
    }

    pub fn log_payloads(&self) -> Result<Option<bool>, String> {
        let Some(value) = set(&self.log_payloads) else { return Ok(None) };
        match value.to_ascii_lowercase().as_str() {
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            _ => Err(format!("{ENV_LOG_PAYLOADS}={value:?}: must be \"true\" or \"false\"")),
        }
    }

    /// Every invalid value, so a loader can report them with the file's.
    pub fn errors(&self) -> Vec<String> {
        [self.guardrails_mode().err(), self.text_threshold().err(), self.log_payloads().err()]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// The trimmed value, unless unset or empty.
fn set(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(mode: &str, threshold: &str, log: &str) -> AddonEnv {
        let some = |v: &str| Some(v.to_owned());
        AddonEnv { guardrails_mode: some(mode), text_threshold: some(threshold), log_payloads: some(log) }
    }

    #[test]
    fn the_addons_variables_keep_their_meaning() {
        let e = env(" SYNC ", "250", "True");
        assert_eq!(e.guardrails_mode(), Ok(Some(GuardrailsMode::Sync)));
        assert_eq!(e.text_threshold(), Ok(Some(250)));
        assert_eq!(e.log_payloads(), Ok(Some(true)));
        assert!(e.errors().is_empty());
        let e = env("async", "600", "false");
        assert_eq!(e.guardrails_mode(), Ok(Some(GuardrailsMode::Async)));
        assert_eq!(e.log_payloads(), Ok(Some(false)));
        // Unset and empty leave the file's values.
        let e = env("", " ", "");
        assert_eq!((e.guardrails_mode(), e.text_threshold(), e.log_payloads()), (Ok(None), Ok(None), Ok(None)));
        assert_eq!(AddonEnv::default().errors(), Vec::<String>::new());
    }

    #[test]
    fn invalid_values_are_all_reported_by_name() {
        let errors = env("synch", "0", "yes").errors();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("AKTO_GUARDRAILS_MODE=\"synch\""), "{errors:?}");
        assert!(errors[1].starts_with("AKTO_TEXT_THRESHOLD=\"0\""), "{errors:?}");
        assert!(errors[2].starts_with("AKTO_LOG_PAYLOADS=\"yes\""), "{errors:?}");
        for bad in ["-5", "6_00", "abc", "1e3"] {
            assert!(env("sync", bad, "true").text_threshold().is_err(), "{bad}");
        }
    }
}
