//! Leaf certificates for intercepted server names, minted on demand and
//! cached.
//!
//! Minting runs on the blocking pool. Concurrent requests for one name wait
//! on a single minting; the cache lock is never held while minting, so other
//! names are never held up. The cache is bounded (least recently used goes
//! first) and an entry is re-minted once less than a quarter of its validity
//! remains.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::sync::OnceCell;

use super::CaError;
use super::authority::{CertificateAuthority, now_seconds, random_serial};

/// Longest DNS name we accept (RFC 1035, without the trailing dot).
const MAX_NAME_LEN: usize = 253;
/// Longest common name X.520 allows; longer names go in the SAN only.
const MAX_COMMON_NAME_LEN: usize = 64;
/// How much of a rejected name an error repeats.
const MAX_ECHOED_NAME_LEN: usize = 256;
const MIN_VALIDITY: Duration = Duration::from_secs(60);
/// The longest leaf lifetime browsers accept.
const MAX_VALIDITY: Duration = Duration::from_secs(397 * 24 * 60 * 60);
const MAX_BACKDATE: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// How leaves are minted and cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafSettings {
    /// How long a leaf is valid after it is minted. Default: that of
    /// `tls.leaf_validity`.
    pub validity: Duration,
    /// How far `not_before` is set in the past, for clients whose clocks
    /// lag. Default 1 hour.
    pub backdate: Duration,
    /// How many server names are cached. Default 4096.
    pub capacity: usize,
}

impl Default for LeafSettings {
    fn default() -> Self {
        Self {
            validity: crate::config::TlsConfig::default().leaf_validity,
            backdate: Duration::from_secs(60 * 60),
            capacity: 4096,
        }
    }
}

impl LeafSettings {
    /// Checks the settings are usable: validity between one minute and 397
    /// days (the longest lifetime browsers accept), backdate at most 30
    /// days, capacity at least one.
    pub fn validate(&self) -> Result<(), CaError> {
        let invalid = |field, reason| Err(CaError::InvalidSettings { field, reason });
        if self.validity < MIN_VALIDITY {
            return invalid("validity", "must be at least one minute");
        }
        if self.validity > MAX_VALIDITY {
            return invalid("validity", "must be at most 397 days");
        }
        if self.backdate > MAX_BACKDATE {
            return invalid("backdate", "must be at most 30 days");
        }
        if self.capacity == 0 {
            return invalid("capacity", "must be at least 1");
        }
        Ok(())
    }
}

/// Converts a duration already validated to at most [`MAX_VALIDITY`].
fn to_time(d: Duration) -> TimeDuration {
    TimeDuration::try_from(d).unwrap_or(TimeDuration::MAX)
}

/// Mints and caches leaf certificates signed by our CA.
///
/// Also a rustls [`ResolvesServerCert`]: it resolves the ClientHello's SNI
/// from the cache, minting synchronously on a miss. Calling
/// [`LeafIssuer::certified_key`] for the name before the handshake keeps
/// that minting off the async runtime.
pub struct LeafIssuer {
    minter: Minter,
    cache: Mutex<Lru>,
}

/// Everything minting needs, cheap to move onto the blocking pool.
#[derive(Clone)]
struct Minter {
    ca: Arc<CertificateAuthority>,
    validity: TimeDuration,
    backdate: TimeDuration,
    minted: Arc<AtomicU64>,
}

impl LeafIssuer {
    /// An issuer with an empty cache. Fails when `settings` do not
    /// [validate](LeafSettings::validate).
    pub fn new(ca: Arc<CertificateAuthority>, settings: LeafSettings) -> Result<Self, CaError> {
        settings.validate()?;
        Ok(Self {
            minter: Minter {
                ca,
                validity: to_time(settings.validity),
                backdate: to_time(settings.backdate),
                minted: Arc::new(AtomicU64::new(0)),
            },
            cache: Mutex::new(Lru::new(settings.capacity)),
        })
    }

    /// The certificate and key for `server_name` (a DNS name or an IP
    /// address), from the cache or freshly minted on the blocking pool.
    pub async fn certified_key(&self, server_name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        self.certified_key_at(server_name, now_seconds()).await
    }

    /// A cached, still fresh certificate for `server_name`, if any. Never
    /// mints, never blocks beyond a short lock.
    pub fn cached(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = LeafName::parse(server_name).ok()?;
        self.lock().fresh(&name.cache_key(), now_seconds())
    }

    /// Like [`LeafIssuer::certified_key`], minting on the calling thread on a
    /// miss (about 0.1 ms: a P-256 key and one signature). For
    /// synchronous callers such as a rustls certificate resolver.
    pub fn issue_blocking(&self, server_name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let name = LeafName::parse(server_name)?;
        let key = name.cache_key();
        let now = now_seconds();
        if let Some(hit) = self.lock().fresh(&key, now) {
            return Ok(hit);
        }
        let minted = self.minter.mint(&name, now)?;
        Ok(self.lock().insert_ready(key, minted, now))
    }

    /// How many leaves this issuer has minted since it was created.
    pub fn minted_total(&self) -> u64 {
        self.minter.minted.load(Ordering::Relaxed)
    }

    /// How many server names are cached (some may be minting or stale).
    pub fn cached_len(&self) -> usize {
        self.lock().slots.len()
    }

    /// The CA the leaves chain to.
    pub fn authority(&self) -> &Arc<CertificateAuthority> {
        &self.minter.ca
    }

    async fn certified_key_at(&self, server_name: &str, now: OffsetDateTime) -> Result<Arc<CertifiedKey>, CaError> {
        let name = LeafName::parse(server_name)?;
        let cell = self.lock().cell_for(&name.cache_key(), now);
        // Every caller for this name awaits the same cell; the first one
        // mints, and the cache lock is not held meanwhile.
        let minted = cell
            .get_or_try_init(|| {
                let minter = self.minter.clone();
                async move {
                    tokio::task::spawn_blocking(move || minter.mint(&name, now))
                        .await
                        .map_err(|source| CaError::MintTask { source })?
                }
            })
            .await?;
        Ok(minted.key.clone())
    }

    fn lock(&self) -> MutexGuard<'_, Lru> {
        // The cache stays consistent between statements, so a panic
        // elsewhere while holding the lock leaves nothing half-done.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for LeafIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafIssuer")
            .field("ca", &self.minter.ca)
            .field("validity", &self.minter.validity)
            .field("backdate", &self.minter.backdate)
            .field("minted", &self.minted_total())
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for LeafIssuer {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Without SNI there is no name to mint for; the handshake fails.
        let name = client_hello.server_name()?;
        // A cache hit unless the proxy did not warm the cache for this name.
        match self.issue_blocking(name) {
            Ok(key) => Some(key),
            Err(error) => {
                tracing::warn!(%error, "cannot issue a leaf certificate");
                None
            }
        }
    }
}

/// A validated, normalised server name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LeafName {
    /// Lowercase, without a trailing dot.
    Dns(String),
    Ip(IpAddr),
}

impl LeafName {
    fn parse(raw: &str) -> Result<Self, CaError> {
        let invalid = |reason| CaError::InvalidName { name: raw.chars().take(MAX_ECHOED_NAME_LEN).collect(), reason };
        let trimmed = raw.strip_suffix('.').unwrap_or(raw);
        if trimmed.is_empty() {
            return Err(invalid("empty"));
        }
        if trimmed.len() > MAX_NAME_LEN {
            return Err(invalid("longer than 253 bytes"));
        }
        if let Ok(ip) = trimmed.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        let lower = trimmed.to_ascii_lowercase();
        // The same rules clients apply when they verify the name.
        if DnsName::try_from(lower.as_str()).is_err() {
            return Err(invalid("not a valid dns name or ip address"));
        }
        Ok(Self::Dns(lower))
    }

    fn cache_key(&self) -> String {
        match self {
            Self::Dns(name) => name.clone(),
            Self::Ip(ip) => ip.to_string(),
        }
    }
}

/// A minted leaf and when it should be replaced.
struct Minted {
    key: Arc<CertifiedKey>,
    not_before: OffsetDateTime,
    renew_after: OffsetDateTime,
}

impl Minted {
    fn is_fresh(&self, now: OffsetDateTime) -> bool {
        // A clock that jumped back before `not_before` needs a new leaf too.
        self.not_before <= now && now < self.renew_after
    }
}

impl Minter {
    fn mint(&self, name: &LeafName, now: OffsetDateTime) -> Result<Minted, CaError> {
        let label = name.cache_key();
        // Never mint what clients would reject: a name outside the CA's
        // name constraints fails here, clearly, instead of in every client.
        let constraints = self.ca.constraints();
        let permitted = match name {
            LeafName::Dns(dns) => constraints.permits_dns(dns),
            LeafName::Ip(ip) => constraints.permits_ip(*ip),
        };
        if !permitted {
            return Err(CaError::OutsideConstraints { name: label, permitted: constraints.permitted_dns().join(", ") });
        }
        let issue_err = |source| CaError::Issue { name: label.clone(), source };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(issue_err)?;

        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        if label.len() <= MAX_COMMON_NAME_LEN {
            subject.push(DnType::CommonName, label.as_str());
        }
        // With an empty subject rcgen marks the SAN critical, as RFC 5280
        // requires.
        params.distinguished_name = subject;
        params.subject_alt_names = vec![match name {
            LeafName::Dns(dns) => SanType::DnsName(dns.as_str().try_into().map_err(issue_err)?),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let not_before = now - self.backdate;
        // A leaf never outlives the CA that signs it.
        let not_after = (now + self.validity).min(self.ca.not_after());
        params.not_before = not_before;
        params.not_after = not_after;

        let cert = params.signed_by(&key, self.ca.issuer()).map_err(issue_err)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der)
            .map_err(|source| CaError::SigningKey { name: label.clone(), source })?;
        let chain = vec![cert.der().clone(), self.ca.cert_der().clone()];
        self.minted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(name = %label, %not_after, "minted leaf certificate");
        Ok(Minted {
            key: Arc::new(CertifiedKey::new(chain, signer)),
            not_before,
            // Renew once less than a quarter of the lifetime remains.
            renew_after: now + (not_after - now) * 3 / 4,
        })
    }
}

/// A bounded least-recently-used map from server name to a (possibly still
/// minting) leaf.
struct Lru {
    capacity: usize,
    slots: HashMap<String, Slot>,
    /// Use stamp to name; the first entry is the least recently used.
    order: BTreeMap<u64, String>,
    clock: u64,
}

struct Slot {
    cell: Arc<OnceCell<Minted>>,
    stamp: u64,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Self { capacity, slots: HashMap::new(), order: BTreeMap::new(), clock: 0 }
    }

    /// The cell to await for `key`: the cached one unless it holds a stale
    /// leaf, otherwise a new empty one (replacing the stale one).
    fn cell_for(&mut self, key: &str, now: OffsetDateTime) -> Arc<OnceCell<Minted>> {
        if let Some(slot) = self.touch(key) {
            if slot.cell.get().is_some_and(|m| !m.is_fresh(now)) {
                slot.cell = Arc::new(OnceCell::new());
            }
            return slot.cell.clone();
        }
        let cell = Arc::new(OnceCell::new());
        self.insert(key.to_owned(), cell.clone());
        cell
    }

    /// The cached leaf for `key` if it is minted and fresh.
    fn fresh(&mut self, key: &str, now: OffsetDateTime) -> Option<Arc<CertifiedKey>> {
        let minted = self.touch(key)?.cell.get()?;
        minted.is_fresh(now).then(|| minted.key.clone())
    }

    /// Caches a leaf minted outside the cell protocol, unless a fresh one
    /// appeared meanwhile; returns whichever is cached.
    fn insert_ready(&mut self, key: String, minted: Minted, now: OffsetDateTime) -> Arc<CertifiedKey> {
        if let Some(hit) = self.fresh(&key, now) {
            return hit;
        }
        let leaf = minted.key.clone();
        let cell = Arc::new(OnceCell::new_with(Some(minted)));
        match self.slots.get_mut(&key) {
            // Replacing a cell that is still minting is fine: its waiters
            // keep their own reference and get their own leaf.
            Some(slot) => slot.cell = cell,
            None => self.insert(key, cell),
        }
        leaf
    }

    /// Marks `key` as most recently used.
    fn touch(&mut self, key: &str) -> Option<&mut Slot> {
        let slot = self.slots.get_mut(key)?;
        self.clock += 1;
        if let Some(name) = self.order.remove(&slot.stamp) {
            self.order.insert(self.clock, name);
        }
        slot.stamp = self.clock;
        Some(slot)
    }

    fn insert(&mut self, key: String, cell: Arc<OnceCell<Minted>>) {
        while self.slots.len() >= self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.slots.remove(&oldest);
        }
        self.clock += 1;
        self.order.insert(self.clock, key.clone());
        self.slots.insert(key, Slot { cell, stamp: self.clock });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::RootCertStore;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::{ServerName, UnixTime};
    use std::time::Duration;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::*;

    fn authority() -> (tempfile::TempDir, Arc<CertificateAuthority>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        (dir, Arc::new(ca))
    }

    fn issuer(settings: LeafSettings) -> (tempfile::TempDir, LeafIssuer) {
        let (dir, ca) = authority();
        (dir, LeafIssuer::new(ca, settings).unwrap())
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn verifier(ca: &CertificateAuthority) -> Arc<WebPkiServerVerifier> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build().unwrap()
    }

    fn verify(ca: &CertificateAuthority, key: &CertifiedKey, name: &str) -> Result<(), rustls::Error> {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier(ca).verify_server_cert(&key.cert[0], &key.cert[1..], &name, &[], UnixTime::now()).map(|_| ())
    }

    #[tokio::test]
    async fn leaf_chains_to_the_ca_for_its_name_only() {
        let (_dir, issuer) = issuer(LeafSettings::default());
        let key = issuer.certified_key("api.openai.com").await.unwrap();
        assert_eq!(key.cert.len(), 2);
        assert_eq!(&key.cert[1], issuer.authority().cert_der());
        assert!(key.keys_match().is_ok());
        verify(issuer.authority(), &key, "api.openai.com").unwrap();
        let err = verify(issuer.authority(), &key, "api.anthropic.com").unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })),
            "{err:?}"
        );
        // A root store without our CA rejects it.
        let (_other_dir, other) = authority();
        assert!(verify(&other, &key, "api.openai.com").is_err());
    }

    #[tokio::test]
    async fn leaf_for_an_ip_address_has_an_ip_san() {
        let (_dir, issuer) = issuer(LeafSettings::default());
        let key = issuer.certified_key("127.0.0.1").await.unwrap();
        verify(issuer.authority(), &key, "127.0.0.1").unwrap();
        assert!(verify(issuer.authority(), &key, "127.0.0.2").is_err());
        let (_, cert) = parse_x509_certificate(&key.cert[0]).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names, vec![GeneralName::IPAddress(&[127, 0, 0, 1])]);

        let key = issuer.certified_key("::1").await.unwrap();
        verify(issuer.authority(), &key, "::1").unwrap();
    }

    #[tokio::test]
    async fn names_outside_the_name_constraints_are_never_minted() {
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::ca::NameConstraintsSpec::new(["openai.com".to_owned()]).unwrap();
        let ca = Arc::new(CertificateAuthority::create_cluster(dir.path(), Some(&spec)).unwrap());
        let issuer = LeafIssuer::new(Arc::clone(&ca), LeafSettings::default()).unwrap();
        // Inside: minted, and rustls (which applies a trust anchor's name
        // constraints) accepts it.
        let key = issuer.certified_key("api.openai.com").await.unwrap();
        verify(&ca, &key, "api.openai.com").unwrap();
        for name in ["www.example.com", "openai.com.example.com", "127.0.0.1", "::1"] {
            let err = issuer.certified_key(name).await.unwrap_err();
            assert!(matches!(err, CaError::OutsideConstraints { .. }), "{name}: {err}");
            assert!(err.to_string().contains("permitted: openai.com"), "{err}");
            assert!(issuer.issue_blocking(name).is_err(), "{name}");
        }
        assert_eq!(issuer.minted_total(), 1);
    }

    #[tokio::test]
    async fn leaf_has_the_expected_extensions_and_times() {
        let settings = LeafSettings::default();
        let (_dir, issuer) = issuer(settings);
        let key = issuer.certified_key("API.Example.COM.").await.unwrap();
        let (_, cert) = parse_x509_certificate(&key.cert[0]).unwrap();
        let (_, ca) = parse_x509_certificate(&key.cert[1]).unwrap();

        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "api.example.com");
        assert_eq!(cert.issuer(), ca.subject());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(!san.critical);
        assert_eq!(san.value.general_names, vec![GeneralName::DNSName("api.example.com")]);

        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth);
        assert!(!eku.value.client_auth);
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);

        let aki = cert
            .get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
            .unwrap()
            .unwrap();
        let ParsedExtension::AuthorityKeyIdentifier(aki) = aki.parsed_extension() else {
            panic!("authority key identifier not parsed");
        };
        let ski =
            ca.get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER).unwrap().unwrap();
        let ParsedExtension::SubjectKeyIdentifier(ski) = ski.parsed_extension() else {
            panic!("subject key identifier not parsed");
        };
        assert_eq!(aki.key_identifier.as_ref().unwrap().0, ski.0);

        let serial = cert.raw_serial();
        assert_eq!(serial.len(), 16);
        assert_eq!(serial[0] & 0x80, 0, "positive serial");

        let now = OffsetDateTime::now_utc();
        let nb = cert.validity().not_before.to_datetime();
        let na = cert.validity().not_after.to_datetime();
        let slack = TimeDuration::minutes(1);
        assert!((now - TimeDuration::hours(1) - nb).abs() < slack, "backdated an hour: {nb}");
        assert!((now + TimeDuration::hours(24) - na).abs() < slack, "valid a day: {na}");
        assert!(cert.verify_signature(Some(ca.public_key())).is_ok());
    }

    #[tokio::test]
    async fn long_names_go_in_the_san_only() {
        let (_dir, issuer) = issuer(LeafSettings::default());
        let name = format!("{}.example.com", "a".repeat(60));
        let key = issuer.certified_key(&name).await.unwrap();
        verify(issuer.authority(), &key, &name).unwrap();
        let (_, cert) = parse_x509_certificate(&key.cert[0]).unwrap();
        assert!(cert.subject().iter_common_name().next().is_none());
        assert!(cert.subject_alternative_name().unwrap().unwrap().critical);
    }

    #[tokio::test]
    async fn leaves_have_distinct_serials() {
        let (_dir, issuer) = issuer(LeafSettings::default());
        let a = issuer.certified_key("a.example.com").await.unwrap();
        let b = issuer.certified_key("b.example.com").await.unwrap();
        let (_, a) = parse_x509_certificate(&a.cert[0]).unwrap();
        let (_, b) = parse_x509_certificate(&b.cert[0]).unwrap();
        assert_ne!(a.raw_serial(), b.raw_serial());
    }

    #[tokio::test]
    async fn invalid_names_are_rejected() {
        let (_dir, issuer) = issuer(LeafSettings::default());
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = ["abcdefghij"; 26].join(".");
        for bad in [
            "",
            ".",
            "*.example.com",
            "exa mple.com",
            "-bad.example.com",
            "bad-.example.com",
            "a..b",
            "exämple.com",
            "1.2.3",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            let err = issuer.certified_key(bad).await.unwrap_err();
            assert!(matches!(err, CaError::InvalidName { .. }), "{bad:?}: {err}");
            assert!(issuer.issue_blocking(bad).is_err());
            assert!(issuer.cached(bad).is_none());
        }
        assert_eq!(issuer.minted_total(), 0);
        assert_eq!(issuer.cached_len(), 0);
    }

    #[tokio::test]
    async fn cache_returns_the_same_key_for_the_same_name() {
        let (_dir, issuer) = issuer(LeafSettings::default());
        assert!(issuer.cached("api.openai.com").is_none());
        let a = issuer.certified_key("api.openai.com").await.unwrap();
        let b = issuer.certified_key("API.OPENAI.COM").await.unwrap();
        let c = issuer.cached("api.openai.com.").unwrap();
        let d = issuer.issue_blocking("api.openai.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&a, &c) && Arc::ptr_eq(&a, &d));
        assert_eq!(issuer.minted_total(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_share_one_minting() {
        let (_dir, issuer) = issuer(LeafSettings::default());
        let issuer = Arc::new(issuer);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let issuer = issuer.clone();
                tokio::spawn(async move { issuer.certified_key("api.openai.com").await })
            })
            .collect();
        let mut keys = Vec::new();
        for task in tasks {
            keys.push(task.await.unwrap().unwrap());
        }
        assert_eq!(issuer.minted_total(), 1);
        assert!(keys.iter().all(|k| Arc::ptr_eq(k, &keys[0])));
    }

    #[tokio::test]
    async fn issue_blocking_fills_the_cache() {
        let (_dir, issuer) = issuer(LeafSettings::default());
        let a = issuer.issue_blocking("api.mistral.ai").unwrap();
        let b = issuer.certified_key("api.mistral.ai").await.unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(issuer.minted_total(), 1);
    }

    #[tokio::test]
    async fn capacity_is_bounded_and_least_recently_used_goes_first() {
        let settings = LeafSettings { capacity: 3, ..LeafSettings::default() };
        let (_dir, issuer) = issuer(settings);
        for name in ["a.test", "b.test", "c.test"] {
            issuer.certified_key(name).await.unwrap();
        }
        // Touch a.test so b.test is the least recently used.
        assert!(issuer.cached("a.test").is_some());
        issuer.certified_key("d.test").await.unwrap();
        assert_eq!(issuer.cached_len(), 3);
        assert!(issuer.cached("b.test").is_none());
        for name in ["a.test", "c.test", "d.test"] {
            assert!(issuer.cached(name).is_some(), "{name}");
        }
        for i in 0..20 {
            issuer.certified_key(&format!("n{i}.test")).await.unwrap();
            assert!(issuer.cached_len() <= 3);
        }
        let lru = issuer.lock();
        assert_eq!(lru.order.len(), lru.slots.len());
    }

    #[tokio::test]
    async fn leaves_are_reminted_when_a_quarter_of_validity_remains() {
        let (_dir, issuer) = issuer(LeafSettings::default());
        let t0 = now_seconds();
        let first = issuer.certified_key_at("api.openai.com", t0).await.unwrap();
        let hours = |h| t0 + TimeDuration::hours(h);
        let same = issuer.certified_key_at("api.openai.com", hours(17)).await.unwrap();
        assert!(Arc::ptr_eq(&first, &same));
        let renewed = issuer.certified_key_at("api.openai.com", hours(19)).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_eq!(issuer.minted_total(), 2);
        // A clock that jumps back before not_before also gets a new leaf.
        let back = issuer.certified_key_at("api.openai.com", hours(-2)).await.unwrap();
        assert!(!Arc::ptr_eq(&renewed, &back));
        assert_eq!(issuer.minted_total(), 3);
    }

    #[test]
    fn settings_are_validated() {
        assert!(LeafSettings::default().validate().is_ok());
        let bad = [
            LeafSettings { validity: Duration::from_secs(1), ..LeafSettings::default() },
            LeafSettings { validity: Duration::from_secs(400 * 86_400), ..LeafSettings::default() },
            LeafSettings { backdate: Duration::from_secs(31 * 86_400), ..LeafSettings::default() },
            LeafSettings { capacity: 0, ..LeafSettings::default() },
        ];
        let (_dir, ca) = authority();
        for settings in bad {
            assert!(matches!(settings.validate(), Err(CaError::InvalidSettings { .. })));
            assert!(matches!(LeafIssuer::new(ca.clone(), settings), Err(CaError::InvalidSettings { .. })));
        }
    }

    #[tokio::test]
    async fn leaves_never_outlive_the_ca() {
        let settings = LeafSettings { validity: Duration::from_secs(397 * 86_400), ..LeafSettings::default() };
        let (_dir, issuer) = issuer(settings);
        // Ten years on, the CA has less left than the leaf validity.
        let later = issuer.authority().not_after() - TimeDuration::days(10);
        let key = issuer.certified_key_at("api.openai.com", later).await.unwrap();
        let (_, cert) = parse_x509_certificate(&key.cert[0]).unwrap();
        assert_eq!(cert.validity().not_after.to_datetime(), issuer.authority().not_after());
    }

    #[tokio::test]
    async fn resolver_completes_a_real_handshake() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (_dir, issuer) = issuer(LeafSettings::default());
        let issuer = Arc::new(issuer);
        let server_config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(issuer.clone());
        let mut roots = RootCertStore::empty();
        roots.add(issuer.authority().cert_der().clone()).unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(server_io).await.unwrap();
            tls.write_all(b"hello").await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let name = ServerName::try_from("api.anthropic.com").unwrap();
        let mut tls = connector.connect(name, client_io).await.unwrap();
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.unwrap();
        assert_eq!(buf, b"hello");
        server.await.unwrap();
        assert!(issuer.cached("api.anthropic.com").is_some());
    }
}
