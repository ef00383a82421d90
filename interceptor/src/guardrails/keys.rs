//! Key brokering: workloads hold placeholder credentials; the request phase
//! swaps a placeholder for the real key of its provider and workload, and
//! refuses placeholders used out of scope and real keys sent by workloads
//! that must use placeholders.
//!
//! This module owns the brokering file (parsing, validation, its
//! permissions, and the edits `interceptor keys` makes) and the decision on
//! a request head. It never logs, and no error, `Debug` output or refusal
//! reason it makes holds a key: real keys live in [`Secret`]s and real AWS
//! credentials in [`AwsCredentials`] (both zeroed on drop), placeholders
//! are kept as their SHA-256 only.
//!
//! # The brokering file
//!
//! TOML, mode 0600 (a file others can read is refused), reloaded live:
//!
//! ```toml
//! [[real]]                        # a real provider key
//! provider = "openai"             # see PROVIDERS; another name needs `hosts`
//! hosts = []                      # the hosts it is for; empty: the provider's
//! scope.workloads = ["namespace:team-a"]  # policy rules' workload patterns; empty: all
//! key = "sk-..."
//!
//! [[real]]                        # real AWS credentials, instead of a key
//! provider = "bedrock"
//! aws_access_key_id = "AKIA..."
//! aws_secret_access_key = "..."
//! aws_session_token = "..."       # optional
//!
//! [[placeholder]]                 # written by `interceptor keys issue`
//! id = "<SHA-256 of the placeholder, hex>"
//! provider = "openai"
//! scope.workloads = ["namespace:team-a"]
//! issued = "2026-01-01T00:00:00Z" # for people
//! ```
//!
//! A request's provider is the one whose hosts hold its server name. The
//! credentials looked at are `Authorization: Bearer`, `x-api-key`,
//! `x-goog-api-key`, `api-key` and the `key` query parameter, and the
//! access key id of an AWS `Authorization` (SigV4, SigV4a) or of a
//! presigned request's `X-Amz-Credential`. A placeholder access key id in a
//! SigV4 `Authorization` is not swapped but re-signed for (see [`sigv4`]):
//! the verdict carries a [`Resign`], applied once the body is final.

use std::{
    collections::HashMap,
    fmt,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use aws_lc_rs::digest;
use http::{HeaderName, HeaderValue, header};
use serde::Deserialize;
use zeroize::Zeroizing;

use self::sigv4::{AwsCredentials, Scope, SigV4Error};
use super::engine::{HostPattern, WorkloadPattern, WorkloadRef};
use crate::workload::Workload;

pub mod sigv4;

/// The audit rule of every refusal.
pub const RULE: &str = "key_brokering";

/// Providers known by name, with the hosts their keys are for.
pub const PROVIDERS: [(&str, &[&str]); 10] = [
    ("openai", &["api.openai.com"]),
    ("anthropic", &["api.anthropic.com"]),
    ("gemini", &["generativelanguage.googleapis.com"]),
    ("azure_openai", &["*.openai.azure.com"]),
    ("cohere", &["api.cohere.com", "api.cohere.ai"]),
    ("mistral", &["api.mistral.ai"]),
    ("groq", &["api.groq.com"]),
    ("deepseek", &["api.deepseek.com"]),
    ("xai", &["api.x.ai"]),
    // Bedrock's runtimes (the hosts the AI domain list intercepts); a VPC
    // endpoint's name goes in `hosts`.
    (
        "bedrock",
        &[
            "bedrock-runtime.amazonaws.com",
            "bedrock-runtime.*.amazonaws.com",
            "bedrock-runtime-fips.*.amazonaws.com",
            "bedrock-agent-runtime.*.amazonaws.com",
            "bedrock-agent-runtime-fips.*.amazonaws.com",
        ],
    ),
];

/// The providers whose real credentials may be AWS credentials (others
/// known by name take keys only).
const AWS_PROVIDERS: [&str; 1] = ["bedrock"];

/// Headers that carry a key as their whole value.
const KEY_HEADERS: [&str; 3] = ["x-api-key", "x-goog-api-key", "api-key"];

/// A real key: never shown, zeroed on drop.
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(key: String) -> Self {
        Self(Zeroizing::new(key))
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read the brokering file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the brokering file {path} can be read by others (mode {mode:o}): it holds real keys; make it 0600 \
         (chmod 600)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// The parser's message, with quoted values left out (they could be
    /// part of a key).
    #[error("the brokering file {path} is not valid: line {line}: {message}")]
    Syntax { path: PathBuf, line: usize, message: String },
    #[error("the brokering file {path} is not valid:{}", errors.iter().map(|e| format!("\n  - {e}")).collect::<String>())]
    Invalid { path: PathBuf, errors: Vec<String> },
    #[error("cannot write the brokering file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no placeholder id starts with `{prefix}`")]
    NotFound { prefix: String },
    #[error("`{prefix}` starts {count} placeholder ids: give more of it")]
    Ambiguous { prefix: String, count: usize },
    #[error("give at least 6 hex digits of the placeholder id (`{prefix}`)")]
    ShortPrefix { prefix: String },
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeDoc {
    #[serde(default)]
    workloads: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RealDoc {
    provider: String,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    scope: ScopeDoc,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    aws_access_key_id: Option<String>,
    #[serde(default)]
    aws_secret_access_key: Option<String>,
    #[serde(default)]
    aws_session_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceholderDoc {
    id: String,
    provider: String,
    #[serde(default)]
    scope: ScopeDoc,
    #[serde(default)]
    issued: String,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    real: Vec<RealDoc>,
    #[serde(default)]
    placeholder: Vec<PlaceholderDoc>,
}

struct RealKey {
    provider: String,
    workloads: Vec<WorkloadPattern>,
    real: Real,
}

/// A real credential: a key, or AWS credentials to sign with.
#[derive(Clone, Debug)]
enum Real {
    Key(Arc<Secret>),
    Aws(Arc<AwsCredentials>),
}

impl Real {
    fn is_aws(&self) -> bool {
        matches!(self, Self::Aws(_))
    }
}

/// What a placeholder was issued for.
#[derive(Clone, Debug)]
pub struct Binding {
    /// The SHA-256 of the placeholder, hex.
    pub id: String,
    pub provider: String,
    pub workloads: Vec<String>,
    pub issued: String,
    patterns: Vec<WorkloadPattern>,
}

/// The brokering file, validated: real keys and issued placeholders.
pub struct Broker {
    prefix: String,
    /// Provider names and their hosts, the file's before the built-in ones.
    providers: Vec<(String, Vec<HostPattern>)>,
    real: Vec<RealKey>,
    placeholders: HashMap<String, Binding>,
    /// In the file's order, for listing.
    order: Vec<String>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("prefix", &self.prefix)
            .field("real_keys", &self.real.len())
            .field("placeholders", &self.placeholders.len())
            .finish()
    }
}

/// Where a credential sits in a request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// A header whose value is the key.
    Header(HeaderName),
    /// The `key` query parameter.
    Query,
    /// The access key id of `Authorization: AWS4-HMAC-SHA256
    /// Credential=<id>/…`: re-signed for, never swapped.
    SigV4,
    /// An AWS access key id whose signature cannot be made again here (a
    /// SigV4a `Authorization`, a presigned request's `X-Amz-Credential`):
    /// judged, never swapped; a placeholder there is refused.
    AwsUnsigned(&'static str),
}

impl Place {
    /// Whether the credential here is an AWS access key id (else a key).
    fn is_aws(&self) -> bool {
        matches!(self, Self::SigV4 | Self::AwsUnsigned(_))
    }
}

/// One replacement to make.
#[derive(Debug)]
pub struct Swap {
    pub place: Place,
    key: Arc<Secret>,
}

/// A SigV4 request to sign again with brokered AWS credentials, once its
/// body is final (see [`Resign::apply`]).
#[derive(Debug)]
pub struct Resign {
    creds: Arc<AwsCredentials>,
    scope: Scope,
}

impl Resign {
    /// Replaces the workload's signature by one made with the real
    /// credentials over `body`, the body as it will be sent.
    pub fn apply(
        &self,
        head: &mut http::request::Parts,
        body: &[u8],
        now: std::time::SystemTime,
    ) -> Result<(), SigV4Error> {
        sigv4::resign(head, body, &self.creds, &self.scope, now)
    }
}

/// What brokering does to a request it lets through.
#[derive(Debug, Default)]
pub struct Brokered {
    /// Placeholders to replace by real keys (see [`apply`]).
    pub swaps: Vec<Swap>,
    /// A SigV4 signature to make again with real AWS credentials.
    pub resign: Option<Resign>,
}

/// What brokering makes of a request.
#[derive(Debug)]
pub enum Verdict {
    /// No credential it brokers: forward as it is.
    Untouched,
    /// Replace these placeholders by real credentials.
    Replace(Brokered),
    /// Refuse, for this reason (it holds no key).
    Refuse(String),
}

/// The SHA-256 of a placeholder, hex: how the file names it.
pub fn placeholder_id(placeholder: &str) -> String {
    let d = digest::digest(&digest::SHA256, placeholder.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new placeholder: the prefix and 32 random letters and digits.
pub fn new_placeholder(prefix: &str) -> String {
    use rand::{Rng as _, distr::Alphanumeric};
    let tail: String = rand::rng().sample_iter(Alphanumeric).take(32).map(char::from).collect();
    format!("{prefix}{tail}")
}

/// [`PROVIDERS`], their hosts parsed.
fn builtin_providers() -> impl Iterator<Item = (String, Vec<HostPattern>)> {
    PROVIDERS
        .into_iter()
        .map(|(name, hosts)| (name.to_owned(), hosts.iter().filter_map(|h| HostPattern::parse(h).ok()).collect()))
}

/// Whether a known provider's real credentials may be AWS credentials
/// (its placeholders then stand for an access key id).
pub fn takes_aws_credentials(provider: &str) -> bool {
    AWS_PROVIDERS.contains(&provider)
}

fn is_known_provider(name: &str) -> bool {
    PROVIDERS.iter().any(|(n, _)| *n == name)
}

fn covers(patterns: &[WorkloadPattern], workload: Option<&WorkloadRef<'_>>) -> bool {
    patterns.is_empty() || workload.is_some_and(|w| patterns.iter().any(|p| p.matches(w)))
}

fn parse_patterns(what: &str, list: &[String], errors: &mut Vec<String>) -> Vec<WorkloadPattern> {
    list.iter()
        .filter_map(|p| {
            WorkloadPattern::parse(p).map_err(|e| errors.push(format!("{what}: scope.workloads: {e}"))).ok()
        })
        .collect()
}

/// Replaces what a parser message quotes (`` `…` `` or `"…"`), which could
/// be part of a key.
fn without_quoted(message: &str) -> String {
    let mut out = String::new();
    let mut inside: Option<char> = None;
    for c in message.chars() {
        match inside {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                inside = None;
            }
            Some(_) => {}
            None if c == '`' || c == '"' || c == '\'' => {
                out.push(c);
                inside = Some(c);
            }
            None => out.push(c),
        }
    }
    if inside.is_some() {
        out.push('…');
    }
    out.lines().next().unwrap_or_default().to_owned()
}

/// The credential fields of a `[[real]]` entry, zeroed on drop.
struct RealCredential {
    key: Option<Zeroizing<String>>,
    aws_access_key_id: Option<Zeroizing<String>>,
    aws_secret_access_key: Option<Zeroizing<String>>,
    aws_session_token: Option<Zeroizing<String>>,
}

/// Whether a credential can go in a header as it is.
fn printable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

impl RealCredential {
    /// A key or AWS credentials, or the reasons (never a value) why not.
    fn validate(mut self, what: &str, prefix: &str, errors: &mut Vec<String>) -> Option<Real> {
        let before = errors.len();
        let take = |v: &mut Option<Zeroizing<String>>| v.as_mut().map(|v| std::mem::take(&mut **v));
        let aws = self.aws_access_key_id.is_some() || self.aws_secret_access_key.is_some();
        if self.key.is_some() && (aws || self.aws_session_token.is_some()) {
            errors.push(format!("{what}: give `key` or AWS credentials (`aws_access_key_id`, …), not both"));
            return None;
        }
        if let Some(key) = &self.key {
            if !printable(key) {
                errors.push(format!("{what}: key must be non-empty printable ASCII without spaces"));
            }
            if key.starts_with(prefix) {
                errors.push(format!("{what}: key starts with the placeholder prefix `{prefix}`"));
            }
            if errors.len() != before {
                return None;
            }
            return Some(Real::Key(Arc::new(Secret::new(take(&mut self.key)?))));
        }
        let (Some(id), Some(secret)) = (&self.aws_access_key_id, &self.aws_secret_access_key) else {
            errors.push(format!(
                "{what}: no credential: give `key`, or `aws_access_key_id` with `aws_secret_access_key` \
                 (and `aws_session_token` if they are temporary)"
            ));
            return None;
        };
        if !printable(id) || id.contains('/') {
            errors.push(format!("{what}: aws_access_key_id must be non-empty printable ASCII without spaces or `/`"));
        }
        if id.starts_with(prefix) {
            errors.push(format!("{what}: aws_access_key_id starts with the placeholder prefix `{prefix}`"));
        }
        if !printable(secret) {
            errors.push(format!("{what}: aws_secret_access_key must be non-empty printable ASCII without spaces"));
        }
        if self.aws_session_token.as_ref().is_some_and(|t| !printable(t)) {
            errors.push(format!("{what}: aws_session_token must be non-empty printable ASCII without spaces"));
        }
        if errors.len() != before {
            return None;
        }
        let creds = AwsCredentials::new(
            take(&mut self.aws_access_key_id)?,
            take(&mut self.aws_secret_access_key)?,
            take(&mut self.aws_session_token),
        );
        Some(Real::Aws(Arc::new(creds)))
    }
}

impl Broker {
    /// Nothing brokered: every placeholder is refused.
    pub fn empty(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            providers: builtin_providers().collect(),
            real: Vec::new(),
            placeholders: HashMap::new(),
            order: Vec::new(),
        }
    }

    /// Reads and validates the file. A missing file is an empty one.
    pub fn load(path: &Path, prefix: &str) -> Result<Self, KeysError> {
        let Some(text) = read_private(path)? else {
            return Ok(Self::empty(prefix));
        };
        Self::from_text(&text, prefix, path)
    }

    /// Validates the file's text; `path` names it in errors.
    pub fn from_text(text: &str, prefix: &str, path: &Path) -> Result<Self, KeysError> {
        let doc: FileDoc = toml::from_str(text).map_err(|e| KeysError::Syntax {
            path: path.to_owned(),
            line: e.span().map_or(0, |s| text[..s.start.min(text.len())].matches('\n').count() + 1),
            message: without_quoted(e.message()),
        })?;
        Self::from_doc(doc, prefix).map_err(|errors| KeysError::Invalid { path: path.to_owned(), errors })
    }

    fn from_doc(doc: FileDoc, prefix: &str) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut providers: Vec<(String, Vec<HostPattern>)> = Vec::new();
        let mut real = Vec::new();
        for (i, r) in doc.real.into_iter().enumerate() {
            let what = format!("real[{i}] ({})", r.provider);
            let credential = RealCredential {
                key: r.key.map(Zeroizing::new),
                aws_access_key_id: r.aws_access_key_id.map(Zeroizing::new),
                aws_secret_access_key: r.aws_secret_access_key.map(Zeroizing::new),
                aws_session_token: r.aws_session_token.map(Zeroizing::new),
            };
            let credential = credential.validate(&what, prefix, &mut errors);
            if credential.as_ref().is_some_and(Real::is_aws)
                && is_known_provider(&r.provider)
                && !takes_aws_credentials(&r.provider)
            {
                errors.push(format!("{what}: {} takes a `key`, not AWS credentials", r.provider));
            }
            if r.hosts.is_empty() && !is_known_provider(&r.provider) {
                let known = PROVIDERS.map(|(n, _)| n).join(", ");
                errors.push(format!("{what}: unknown provider (known: {known}); give `hosts` for another"));
            }
            let mut hosts = Vec::new();
            for h in &r.hosts {
                match HostPattern::parse(h) {
                    Ok(p) => hosts.push(p),
                    Err(e) => errors.push(format!("{what}: hosts: {e}")),
                }
            }
            if !hosts.is_empty() {
                match providers.iter_mut().find(|(n, _)| *n == r.provider) {
                    Some((_, list)) => list.extend(hosts),
                    None => providers.push((r.provider.clone(), hosts)),
                }
            }
            let workloads = parse_patterns(&what, &r.scope.workloads, &mut errors);
            if let Some(real_credential) = credential {
                real.push(RealKey { provider: r.provider, workloads, real: real_credential });
            }
        }
        for (name, hosts) in builtin_providers() {
            if !providers.iter().any(|(n, _)| *n == name) {
                providers.push((name, hosts));
            }
        }
        let mut placeholders = HashMap::new();
        let mut order = Vec::new();
        for (i, p) in doc.placeholder.into_iter().enumerate() {
            let what = format!("placeholder[{i}]");
            let id = p.id.to_ascii_lowercase();
            if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                errors.push(format!(
                    "{what}: id must be a SHA-256 in hex (64 digits), as `interceptor keys issue` writes"
                ));
                continue;
            }
            if !providers.iter().any(|(n, _)| *n == p.provider) {
                errors.push(format!(
                    "{what}: provider `{}` has no hosts (no known name, no real key gives them)",
                    p.provider
                ));
            }
            let patterns = parse_patterns(&what, &p.scope.workloads, &mut errors);
            let binding = Binding {
                id: id.clone(),
                provider: p.provider,
                workloads: p.scope.workloads,
                issued: p.issued,
                patterns,
            };
            if placeholders.insert(id.clone(), binding).is_some() {
                errors.push(format!("{what}: id listed twice"));
            } else {
                order.push(id);
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self { prefix: prefix.to_owned(), providers, real, placeholders, order })
    }

    /// The issued placeholders, in the file's order.
    pub fn placeholders(&self) -> impl Iterator<Item = &Binding> {
        self.order.iter().filter_map(|id| self.placeholders.get(id))
    }

    /// Real keys per provider with their scopes (never the keys).
    pub fn real_scopes(&self) -> impl Iterator<Item = (&str, Vec<String>)> {
        self.real.iter().map(|r| (r.provider.as_str(), r.workloads.iter().map(ToString::to_string).collect()))
    }

    /// The provider whose keys a host takes.
    pub fn provider_of(&self, host: &str) -> Option<&str> {
        self.providers.iter().find(|(_, hosts)| hosts.iter().any(|h| h.matches(host))).map(|(n, _)| n.as_str())
    }

    /// The first real credential for `provider` covering `workload`; of
    /// AWS credentials only (`aws`), of keys only, or of either (`None`).
    fn real_for(&self, provider: &str, workload: Option<&WorkloadRef<'_>>, aws: Option<bool>) -> Option<&Real> {
        self.real
            .iter()
            .filter(|r| aws.is_none_or(|aws| r.real.is_aws() == aws))
            .find(|r| r.provider == provider && covers(&r.workloads, workload))
            .map(|r| &r.real)
    }

    /// What to do with one credential found at `place`: `Some(real)` to put
    /// the real credential in (a key for a key's place, AWS credentials for
    /// an access key id's), `None` to leave it, or the refusal's reason.
    fn judge(
        &self,
        provider: Option<&str>,
        workload: Option<&WorkloadRef<'_>>,
        place: &Place,
        value: &str,
    ) -> Result<Option<Real>, String> {
        let what = if place.is_aws() { "credential" } else { "key" };
        if !value.starts_with(&self.prefix) {
            // Any real credential brokered for the workload: it must use a
            // placeholder, whatever kind it sends.
            return match provider {
                Some(p) if self.real_for(p, workload, None).is_some() => {
                    Err(format!("a {p} {what} that is not a placeholder, from a workload that must use a placeholder"))
                }
                _ => Ok(None),
            };
        }
        let Some(binding) = self.placeholders.get(&placeholder_id(value)) else {
            return Err("unknown or revoked placeholder".into());
        };
        let Some(provider) = provider else {
            return Err(format!("a placeholder for {} sent to a host of no brokered provider", binding.provider));
        };
        if binding.provider != provider {
            return Err(format!("a placeholder for {} sent to {provider}", binding.provider));
        }
        if !covers(&binding.patterns, workload) {
            return Err("a placeholder used by a workload outside its scope".into());
        }
        match self.real_for(provider, workload, Some(place.is_aws())) {
            Some(real) => Ok(Some(real.clone())),
            None if place.is_aws() => Err("no AWS credentials brokered for this workload".into()),
            None => Err("no key brokered for this workload".into()),
        }
    }

    /// What to do with a request to `host` from `workload`.
    pub fn decide(&self, host: &str, workload: Option<&Workload>, head: &http::request::Parts) -> Verdict {
        let provider = self.provider_of(host);
        let w = workload.map(WorkloadRef::of);
        let mut brokered = Brokered::default();
        for (place, found) in credentials(head) {
            let value = match found {
                Ok(value) => value,
                Err(why) => return Verdict::Refuse(format!("{} {why}", place_name(&place))),
            };
            let refuse = |reason: &str, place: &Place| Verdict::Refuse(format!("{reason} ({})", place_name(place)));
            let real = match self.judge(provider, w.as_ref(), &place, &value) {
                Ok(Some(real)) => real,
                Ok(None) => continue,
                Err(reason) => return refuse(&reason, &place),
            };
            match (real, &place) {
                (Real::Key(key), Place::Bearer | Place::Header(_) | Place::Query) => {
                    brokered.swaps.push(Swap { place, key });
                }
                (Real::Aws(creds), Place::SigV4) => {
                    let authorization = head.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
                    match Scope::parse(authorization.unwrap_or_default()) {
                        Ok(scope) => brokered.resign = Some(Resign { creds, scope }),
                        Err(why) => return refuse(&format!("a SigV4 authorization that {why}"), &place),
                    }
                }
                (Real::Aws(_), Place::AwsUnsigned(_)) => {
                    return refuse("a placeholder where the request cannot be signed again", &place);
                }
                // `judge` picks the kind the place takes.
                _ => return refuse("no credential of this kind brokered", &place),
            }
        }
        if brokered.swaps.is_empty() && brokered.resign.is_none() {
            Verdict::Untouched
        } else {
            Verdict::Replace(brokered)
        }
    }
}

fn place_name(place: &Place) -> String {
    match place {
        Place::Bearer => "authorization".into(),
        Place::Header(name) => name.as_str().to_owned(),
        Place::Query => "query parameter key".into(),
        Place::SigV4 => "authorization (AWS SigV4)".into(),
        Place::AwsUnsigned(what) => (*what).to_owned(),
    }
}

/// A credential as found: its value, or why it cannot be read (given more
/// than once, not text).
type Found = Result<Zeroizing<String>, &'static str>;

/// The credentials in a request head, each with its place. Empty values
/// and other `Authorization` schemes (SigV4 among them) are not credentials
/// here.
fn credentials(head: &http::request::Parts) -> Vec<(Place, Found)> {
    let mut out = Vec::new();
    let one = |name: &HeaderName| -> Option<Found> {
        let mut values = head.headers.get_all(name).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return Some(Err("given more than once"));
        }
        Some(first.to_str().map(|v| Zeroizing::new(v.trim().to_owned())).map_err(|_| "not readable text"))
    };
    match one(&header::AUTHORIZATION) {
        None => {}
        Some(Err(why)) => out.push((Place::Bearer, Err(why))),
        Some(Ok(v)) => {
            let bearer = v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
            if let Some((_, token)) = bearer
                && !token.trim().is_empty()
            {
                out.push((Place::Bearer, Ok(Zeroizing::new(token.trim().to_owned()))));
            }
            if let (Some(v4), Some(id)) = (sigv4::is_sigv4(&v), sigv4::access_key_id(&v)) {
                let place = if v4 { Place::SigV4 } else { Place::AwsUnsigned("authorization (AWS SigV4a)") };
                out.push((place, Ok(id)));
            }
        }
    }
    for name in KEY_HEADERS {
        let name = HeaderName::from_static(name);
        match one(&name) {
            None => {}
            Some(Ok(v)) if v.is_empty() => {}
            Some(found) => out.push((Place::Header(name), found)),
        }
    }
    let keys: Vec<&str> = query_values(head, "key").collect();
    match keys.as_slice() {
        [] | [""] => {}
        [v] => out.push((Place::Query, Ok(Zeroizing::new((*v).to_owned())))),
        _ => out.push((Place::Query, Err("given more than once"))),
    }
    let presigned = Place::AwsUnsigned("query parameter X-Amz-Credential");
    let credentials: Vec<&str> = query_values(head, sigv4::QUERY_CREDENTIAL).collect();
    match credentials.as_slice() {
        [] => {}
        [v] => {
            if let Some(id) = sigv4::query_access_key_id(v) {
                out.push((presigned, Ok(id)));
            }
        }
        _ => out.push((presigned, Err("given more than once"))),
    }
    out
}

/// The values of query parameter `name`, as sent.
fn query_values<'a>(head: &'a http::request::Parts, name: &'a str) -> impl Iterator<Item = &'a str> {
    head.uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(move |pair| pair.split_once('=').filter(|(n, _)| *n == name).map(|(_, v)| v))
}

/// Makes the swaps in the request head. The new header values are marked
/// sensitive (never indexed by HTTP/2 header compression, hidden from
/// `Debug`).
pub fn apply(head: &mut http::request::Parts, swaps: &[Swap]) {
    for swap in swaps {
        let key = swap.key.expose();
        match &swap.place {
            Place::Bearer => {
                if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {key}")) {
                    v.set_sensitive(true);
                    head.headers.insert(header::AUTHORIZATION, v);
                }
            }
            Place::Header(name) => {
                if let Ok(mut v) = HeaderValue::from_str(key) {
                    v.set_sensitive(true);
                    head.headers.insert(name.clone(), v);
                }
            }
            // Never swapped: re-signed for (`Resign`), or refused.
            Place::SigV4 | Place::AwsUnsigned(_) => {}
            Place::Query => {
                let query = head.uri.query().unwrap_or_default();
                let encoded = percent_encode(key);
                let query: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some(("key", _)) => format!("key={encoded}"),
                        _ => pair.to_owned(),
                    })
                    .collect();
                let path_and_query = format!("{}?{}", head.uri.path(), query.join("&"));
                let mut parts = head.uri.clone().into_parts();
                if let Ok(pq) = path_and_query.parse() {
                    parts.path_and_query = Some(pq);
                    if let Ok(uri) = http::Uri::from_parts(parts) {
                        head.uri = uri;
                    }
                }
            }
        }
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads the file if it exists, refusing one that others can read.
fn read_private(path: &Path) -> Result<Option<Zeroizing<String>>, KeysError> {
    let read = |source| KeysError::Read { path: path.to_owned(), source };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeysError::Permissions { path: path.to_owned(), mode });
    }
    std::fs::read_to_string(path).map(|t| Some(Zeroizing::new(t))).map_err(read)
}

/// The file's SHA-256, to notice changes without keeping its text. `None`
/// when it does not exist.
pub fn file_digest(path: &Path) -> Result<Option<[u8; 32]>, KeysError> {
    Ok(read_private(path)?.map(|text| {
        let mut out = [0; 32];
        out.copy_from_slice(digest::digest(&digest::SHA256, text.as_bytes()).as_ref());
        out
    }))
}

/// Writes the file whole: a private temporary file beside it, then renamed
/// over it, so a reader sees the old file or the new one.
fn write_private(path: &Path, text: &str) -> Result<(), KeysError> {
    let write = |source| KeysError::Write { path: path.to_owned(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(write)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(write)
}

/// Edits of the file for `interceptor keys`: comments and real keys are
/// kept as they are.
pub struct KeysFile {
    path: PathBuf,
    prefix: String,
    doc: toml_edit::DocumentMut,
    /// The text read, zeroed on drop.
    _text: Zeroizing<String>,
}

impl KeysFile {
    /// Opens the file (a missing one is empty) and validates it.
    pub fn open(path: &Path, prefix: &str) -> Result<Self, KeysError> {
        let text = read_private(path)?.unwrap_or_default();
        // Validated as the proxy reads it, before any edit.
        Broker::from_text(&text, prefix, path)?;
        let doc = text.parse::<toml_edit::DocumentMut>().map_err(|e| KeysError::Syntax {
            path: path.to_owned(),
            line: e.span().map_or(0, |s| text[..s.start.min(text.len())].matches('\n').count() + 1),
            message: without_quoted(e.message()),
        })?;
        Ok(Self { path: path.to_owned(), prefix: prefix.to_owned(), doc, _text: text })
    }

    /// The file as the proxy reads it.
    pub fn broker(&self) -> Result<Broker, KeysError> {
        let text = Zeroizing::new(self.doc.to_string());
        Broker::from_text(&text, &self.prefix, &self.path)
    }

    /// Issues a placeholder for `provider` and these workload patterns;
    /// stores its hash and returns it (shown once: it is not kept).
    pub fn issue(&mut self, provider: &str, workloads: &[String], issued: &str) -> Result<String, KeysError> {
        let placeholder = new_placeholder(&self.prefix);
        let mut table = toml_edit::Table::new();
        table["id"] = toml_edit::value(placeholder_id(&placeholder));
        table["provider"] = toml_edit::value(provider);
        let mut scope = toml_edit::InlineTable::new();
        scope.insert("workloads", toml_edit::Value::Array(workloads.iter().map(String::as_str).collect()));
        table["scope"] = toml_edit::Item::Value(toml_edit::Value::InlineTable(scope));
        table["issued"] = toml_edit::value(issued);
        let list = self
            .doc
            .entry("placeholder")
            .or_insert_with(|| toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()));
        let Some(list) = list.as_array_of_tables_mut() else {
            return Err(KeysError::Invalid {
                path: self.path.clone(),
                errors: vec!["placeholder: must be an array of tables ([[placeholder]])".into()],
            });
        };
        list.push(table);
        // Checked as the proxy will read it (provider, patterns).
        self.broker()?;
        self.save()?;
        Ok(placeholder)
    }

    /// Revokes the placeholder whose id starts with `prefix` (at least 6
    /// hex digits, naming one placeholder). Returns its binding.
    pub fn revoke(&mut self, prefix: &str) -> Result<Binding, KeysError> {
        let prefix = prefix.to_ascii_lowercase();
        if prefix.len() < 6 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeysError::ShortPrefix { prefix });
        }
        let broker = self.broker()?;
        let matching: Vec<&Binding> = broker.placeholders().filter(|b| b.id.starts_with(&prefix)).collect();
        let binding = match matching.as_slice() {
            [] => return Err(KeysError::NotFound { prefix }),
            [one] => (*one).clone(),
            many => return Err(KeysError::Ambiguous { prefix, count: many.len() }),
        };
        if let Some(list) = self.doc.get_mut("placeholder").and_then(|i| i.as_array_of_tables_mut()) {
            list.retain(|t| {
                t.get("id").and_then(|v| v.as_str()).map(str::to_ascii_lowercase) != Some(binding.id.clone())
            });
            if list.is_empty() {
                self.doc.remove("placeholder");
            }
        }
        self.save()?;
        Ok(binding)
    }

    fn save(&self) -> Result<(), KeysError> {
        let text = Zeroizing::new(self.doc.to_string());
        write_private(&self.path, &text)
    }
}

#[cfg(test)]
mod tests;
