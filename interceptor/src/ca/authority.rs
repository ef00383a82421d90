//! The CA certificate and key on disk: created once, reloaded on every start.
//!
//! The key is only ever read or written here. It is written 0600 from the
//! first byte, refused when group or world readable, and never printed.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};
use x509_parser::error::X509Error;

use super::CaError;
use super::constraints::{Constraints, NameConstraintsSpec};
use super::files::{pem_encode, sync_dir, wipe, write_atomic};

const CERT_FILE: &str = "ca.crt";
const KEY_FILE: &str = "ca.key";
/// Serialises creation between processes sharing a state directory.
const LOCK_FILE: &str = "ca.lock";
const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;
/// Backdating covers clients whose clocks run behind ours.
const CA_BACKDATE: Duration = Duration::days(1);
/// Ten years, leap days included.
const CA_VALIDITY: Duration = Duration::days(3653);

/// The root that signs every interception certificate.
pub struct CertificateAuthority {
    cert_path: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    subject: String,
    not_after: OffsetDateTime,
    constraints: Constraints,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Loads `ca.crt` and `ca.key` from `state_dir`, or creates both when
    /// neither exists (creating `state_dir` with mode 0700 if needed).
    ///
    /// Refuses (never repairs) a lone file, a key that does not match the
    /// certificate, a key readable by group or others, an expired CA, and a
    /// certificate that is not a CA.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, CaError> {
        Self::load_or_create_with(state_dir, None)
    }

    /// Like [`CertificateAuthority::load_or_create`]; a CA created here gets
    /// `constraints` (an existing one is loaded as it is).
    pub fn load_or_create_with(state_dir: &Path, constraints: Option<&NameConstraintsSpec>) -> Result<Self, CaError> {
        ensure_dir(state_dir)?;
        let cert_path = state_dir.join(CERT_FILE);
        let key_path = state_dir.join(KEY_FILE);

        // Loading needs no lock, so a read-only state directory (a mounted
        // secret, say) works as long as both files are there.
        if present(&cert_path)? && present(&key_path)? {
            return Self::load(cert_path, &key_path);
        }

        let lock_path = state_dir.join(LOCK_FILE);
        let _lock = match lock(&lock_path) {
            Ok(lock) => lock,
            Err(error) => {
                // A read-only directory with a lone file: the missing file
                // is the problem worth reporting.
                incomplete(&cert_path, &key_path)?;
                return Err(error);
            }
        };
        // Another process may have created the pair while we waited.
        if present(&cert_path)? && present(&key_path)? {
            return Self::load(cert_path, &key_path);
        }
        incomplete(&cert_path, &key_path)?;
        let params = ca_params(&format!("interceptor CA {}", hostname()), now_seconds(), constraints);
        Self::create(state_dir, cert_path, &key_path, params)
    }

    /// Loads `ca.crt` and `ca.key` from `dir` (a mounted Kubernetes Secret,
    /// say) and never creates anything: both must be there. The same checks
    /// as [`CertificateAuthority::load_or_create`] apply; a key file reached
    /// through a symbolic link (as Secret volumes lay them out) is judged by
    /// the file it points to.
    pub fn load_dir(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        match (present(&cert_path)?, present(&key_path)?) {
            (true, true) => Self::load(cert_path, &key_path),
            (false, false) => Err(CaError::Missing { dir: dir.to_path_buf() }),
            _ => incomplete(&cert_path, &key_path).and(Err(CaError::Missing { dir: dir.to_path_buf() })),
        }
    }

    /// Creates a cluster CA in `dir` (created 0700 if needed): `ca.crt`
    /// (0644) and `ca.key` (0600), with `constraints` when given. Refuses
    /// to overwrite an existing `ca.crt` or `ca.key`.
    pub fn create_cluster(dir: &Path, constraints: Option<&NameConstraintsSpec>) -> Result<Self, CaError> {
        ensure_dir(dir)?;
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let _lock = lock(&dir.join(LOCK_FILE))?;
        for path in [&cert_path, &key_path] {
            if present(path)? {
                return Err(CaError::Exists { path: path.clone() });
            }
        }
        let now = now_seconds();
        // The creation time tells two cluster CAs apart while one is rolled
        // over to the other.
        let created = format!(
            "{:04}-{:02}-{:02}T{:02}{:02}Z",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute()
        );
        let params = ca_params(&format!("interceptor cluster CA {created}"), now, constraints);
        let ca = Self::create(dir, cert_path, &key_path, params)?;
        let _ignored = fs::remove_file(dir.join(LOCK_FILE));
        Ok(ca)
    }

    /// The CA certificate, PEM encoded.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER encoded.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Where the CA certificate lives (`<state_dir>/ca.crt`).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The CA's subject, for display (`CN=..., O=...`).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// When the CA certificate expires; leaves never outlive it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The name constraints of the CA certificate (empty when it has none).
    pub fn constraints(&self) -> &Constraints {
        &self.constraints
    }

    pub(super) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    fn load(cert_path: PathBuf, key_path: &Path) -> Result<Self, CaError> {
        let cert_bytes = fs::read(&cert_path).map_err(|source| CaError::Read { path: cert_path.clone(), source })?;
        let cert_der = single_certificate(&cert_path, &cert_bytes)?;
        let info = inspect(&cert_path, &cert_der)?;
        let key = read_key(key_path)?;
        if key.public_key_raw() != info.public_key.as_slice() {
            return Err(CaError::KeyMismatch { cert_path, key_path: key_path.to_path_buf() });
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|source| CaError::Key { path: key_path.to_path_buf(), source })?;
        tracing::debug!(path = %cert_path.display(), subject = %info.subject, "loaded certificate authority");
        Ok(Self {
            cert_pem: pem_encode("CERTIFICATE", &cert_der),
            cert_path,
            cert_der,
            subject: info.subject,
            not_after: info.not_after,
            constraints: info.constraints,
            issuer,
        })
    }

    fn create(
        state_dir: &Path,
        cert_path: PathBuf,
        key_path: &Path,
        params: CertificateParams,
    ) -> Result<Self, CaError> {
        let generate = |source| CaError::Generate { source };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let cert = params.self_signed(&key).map_err(generate)?;
        let cert_der = cert.der().clone();
        let info = inspect(&cert_path, &cert_der)?;

        // Key first: a crash in between leaves a lone key, which the next
        // start reports rather than silently pairing with a new certificate.
        let mut key_pem = key.serialize_pem().into_bytes();
        let written = write_atomic(key_path, &key_pem, KEY_MODE);
        wipe(&mut key_pem);
        written?;
        let cert_pem = pem_encode("CERTIFICATE", &cert_der);
        write_atomic(&cert_path, cert_pem.as_bytes(), CERT_MODE)?;
        sync_dir(state_dir);

        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|source| CaError::Key { path: key_path.to_path_buf(), source })?;
        tracing::info!(path = %cert_path.display(), subject = %info.subject, "created certificate authority");
        Ok(Self {
            cert_pem,
            cert_path,
            cert_der,
            subject: info.subject,
            not_after: info.not_after,
            constraints: info.constraints,
            issuer,
        })
    }
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("CertificateAuthority")
            .field("cert_path", &self.cert_path)
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Writes `out` (mode 0600): a Kubernetes Secret manifest named `name` in
/// `namespace` holding the `ca.crt` and `ca.key` of `ca_dir`, for
/// `kubectl apply -f`. The key is base64 in that file and nowhere else;
/// buffers that held it are wiped.
pub fn write_secret_manifest(ca_dir: &Path, out: &Path, namespace: &str, name: &str) -> Result<(), CaError> {
    use base64::Engine as _;
    for (field, value) in [("namespace", namespace), ("name", name)] {
        let valid = !value.is_empty()
            && value.len() <= 253
            && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && value.as_bytes()[0].is_ascii_alphanumeric();
        if !valid {
            return Err(CaError::InvalidSettings { field, reason: "must be a lowercase DNS name (RFC 1123)" });
        }
    }
    let cert_path = ca_dir.join(CERT_FILE);
    let key_path = ca_dir.join(KEY_FILE);
    let cert = fs::read(&cert_path).map_err(|source| CaError::Read { path: cert_path.clone(), source })?;
    // Through the same checks as loading (permissions, parsing).
    let key = read_key(&key_path)?;
    let mut key_pem = key.serialize_pem().into_bytes();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut key_b64 = b64.encode(&key_pem).into_bytes();
    wipe(&mut key_pem);
    let mut manifest = format!(
        "# The cluster CA of the interceptor: certificate and PRIVATE KEY.\n\
         # Created by `interceptor ca create-cluster`. Keep this file offline.\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    \
         app.kubernetes.io/name: interceptor\ntype: Opaque\ndata:\n  ca.crt: {}\n  ca.key: ",
        b64.encode(&cert)
    )
    .into_bytes();
    manifest.append(&mut key_b64);
    manifest.push(b'\n');
    let written = write_atomic(out, &manifest, KEY_MODE);
    wipe(&mut manifest);
    wipe(&mut key_b64);
    written
}

/// A random, positive, 16-byte serial number (RFC 5280 allows up to 20).
pub(super) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    // Clear the sign bit so the INTEGER is positive, and set the next one
    // so the encoding keeps all 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Now, truncated to whole seconds (certificate times carry no fraction).
pub(super) fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

fn ca_params(common_name: &str, now: OffsetDateTime, constraints: Option<&NameConstraintsSpec>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "interceptor");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - CA_BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial());
    params.name_constraints = constraints.map(NameConstraintsSpec::to_rcgen);
    // The default key identifier method writes a subject key identifier.
    params
}

/// The machine's hostname, reduced to characters safe in a common name.
fn hostname() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        // The common name is limited to 64 characters.
        .take(48)
        .collect();
    if clean.is_empty() { "localhost".to_owned() } else { clean }
}

fn ensure_dir(dir: &Path) -> Result<(), CaError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(CaError::CreateDir {
            path: dir.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|source| CaError::CreateDir { path: dir.to_path_buf(), source }),
        Err(source) => Err(CaError::Read { path: dir.to_path_buf(), source }),
    }
}

/// Whether anything (even a dangling link) sits at `path`.
fn present(path: &Path) -> Result<bool, CaError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CaError::Read { path: path.to_path_buf(), source }),
    }
}

/// Errors when exactly one of the pair exists.
fn incomplete(cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
    match (present(cert_path)?, present(key_path)?) {
        (true, false) => Err(CaError::Incomplete { present: cert_path.to_path_buf(), missing: key_path.to_path_buf() }),
        (false, true) => Err(CaError::Incomplete { present: key_path.to_path_buf(), missing: cert_path.to_path_buf() }),
        _ => Ok(()),
    }
}

/// Takes an exclusive advisory lock, released when the file is dropped.
fn lock(path: &Path) -> Result<File, CaError> {
    let lock_err = |source| CaError::Lock { path: path.to_path_buf(), source };
    let file =
        OpenOptions::new().write(true).create(true).truncate(false).mode(KEY_MODE).open(path).map_err(lock_err)?;
    file.lock().map_err(lock_err)?;
    Ok(file)
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let read_err = |source| CaError::Read { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(read_err)?;
    // Checked on the open file, so the mode we judge is the file we read.
    let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions { path: path.to_path_buf(), mode });
    }
    let mut pem = Vec::new();
    let read = file.read_to_end(&mut pem);
    let der = read.map_err(read_err).and_then(|_| {
        PrivateKeyDer::from_pem_slice(&pem).map_err(|source| CaError::Pem { path: path.to_path_buf(), source })
    });
    wipe(&mut pem);
    KeyPair::try_from(&der?).map_err(|source| CaError::Key { path: path.to_path_buf(), source })
}

fn single_certificate(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, CaError> {
    let pem_err = |source| CaError::Pem { path: path.to_path_buf(), source };
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        certs.push(cert.map_err(pem_err)?);
    }
    match certs.len() {
        0 => Err(pem_err(rustls_pki_types::pem::Error::NoItemsFound)),
        1 => Ok(certs.remove(0)),
        count => Err(CaError::CertificateCount { path: path.to_path_buf(), count }),
    }
}

/// What we need to know about a CA certificate.
struct CaInfo {
    subject: String,
    not_after: OffsetDateTime,
    public_key: Vec<u8>,
    constraints: Constraints,
}

fn inspect(path: &Path, der: &CertificateDer<'_>) -> Result<CaInfo, CaError> {
    let parse_err = |source| CaError::CertificateParse { path: path.to_path_buf(), source };
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
        parse_err(match e {
            x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
            x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
        })
    })?;
    let is_ca = cert.basic_constraints().map_err(parse_err)?.is_some_and(|bc| bc.value.ca);
    let can_sign = cert.key_usage().map_err(parse_err)?.is_none_or(|ku| ku.value.key_cert_sign());
    if !is_ca || !can_sign {
        return Err(CaError::NotCa { path: path.to_path_buf() });
    }
    let not_after = cert.validity().not_after.to_datetime();
    if not_after <= OffsetDateTime::now_utc() {
        return Err(CaError::Expired { path: path.to_path_buf(), not_after });
    }
    Ok(CaInfo {
        subject: cert.subject().to_string(),
        not_after,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        constraints: Constraints::from_cert(&cert).map_err(parse_err)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creation_writes_private_key_and_public_cert() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state").join("nested");
        let ca = CertificateAuthority::load_or_create(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&state.join(CERT_FILE)), 0o644);
        assert_eq!(ca.cert_path(), state.join(CERT_FILE));
        assert_eq!(fs::read_to_string(ca.cert_path()).unwrap(), ca.cert_pem());
        let key = fs::read_to_string(state.join(KEY_FILE)).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "pkcs#8 pem");
        assert!(!state.join(".ca.key.tmp").exists());
    }

    #[test]
    fn reload_yields_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let second = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_der(), second.cert_der());
        assert_eq!(first.cert_pem(), second.cert_pem());
        assert_eq!(first.not_after(), second.not_after());
    }

    #[test]
    fn ca_certificate_has_the_expected_shape() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let (_, cert) = parse_x509_certificate(ca.cert_der()).unwrap();

        let cn = cert.subject().iter_common_name().next().unwrap();
        assert!(cn.as_str().unwrap().starts_with("interceptor CA "));
        let org = cert.subject().iter_organization().next().unwrap();
        assert_eq!(org.as_str().unwrap(), "interceptor");
        assert_eq!(cert.subject(), cert.issuer());

        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical);
        assert!(bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));

        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());

        assert!(
            cert.get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
                .unwrap()
                .is_some()
        );

        let serial = cert.raw_serial();
        assert_eq!(serial.len(), 16);
        assert_eq!(serial[0] & 0x80, 0, "positive serial");

        let now = OffsetDateTime::now_utc();
        let nb = cert.validity().not_before.to_datetime();
        let na = cert.validity().not_after.to_datetime();
        assert!((now - Duration::days(1) - nb).abs() < Duration::minutes(1));
        assert!((now + Duration::days(3653) - na).abs() < Duration::minutes(1));
        assert!(na - nb > Duration::days(3650));

        assert_eq!(cert.public_key().algorithm.algorithm, x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY);
        assert!(cert.verify_signature(None).is_ok(), "self-signed");
    }

    #[test]
    fn group_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        let key = dir.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::KeyPermissions { mode: 0o640, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        // Refused, not repaired.
        assert_eq!(mode(&key), 0o640);
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(a.path()).unwrap();
        CertificateAuthority::load_or_create(b.path()).unwrap();
        fs::copy(b.path().join(KEY_FILE), a.path().join(KEY_FILE)).unwrap();
        let err = CertificateAuthority::load_or_create(a.path()).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn lone_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::Incomplete { .. }), "{err}");
        assert!(!dir.path().join(CERT_FILE).exists(), "nothing recreated");

        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::Incomplete { .. }), "{err}");
    }

    #[test]
    fn corrupt_pem_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        let cert = dir.path().join(CERT_FILE);
        fs::write(&cert, "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::Pem { .. }), "{err}");
        assert!(err.to_string().contains(&cert.display().to_string()), "{err}");

        fs::write(&cert, "not a certificate").unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains(&cert.display().to_string()), "{err}");

        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        let key = dir.path().join(KEY_FILE);
        fs::write(&key, "garbage").unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::Pem { .. }), "{err}");
        assert!(err.to_string().contains(&key.display().to_string()), "{err}");
    }

    #[test]
    fn bundle_in_ca_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        fs::write(ca.cert_path(), format!("{0}{0}", ca.cert_pem())).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::CertificateCount { count: 2, .. }), "{err}");
    }

    #[test]
    fn debug_output_leaves_out_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let key_pem = fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        let body: String = key_pem.lines().nth(1).unwrap().to_owned();
        let debug = format!("{ca:?}");
        assert!(debug.contains("interceptor CA"), "{debug}");
        assert!(!debug.contains(&body[..20]), "{debug}");
        assert!(!debug.to_lowercase().contains("key"), "{debug}");
    }

    #[test]
    fn serials_are_positive_and_distinct() {
        let a = random_serial().to_bytes();
        let b = random_serial().to_bytes();
        assert_eq!(a.len(), 16);
        assert_eq!(a[0] & 0xc0, 0x40);
        assert_ne!(a, b);
    }

    fn spec() -> NameConstraintsSpec {
        NameConstraintsSpec::new(["api.openai.com".to_owned(), "githubcopilot.com".to_owned()]).unwrap()
    }

    #[test]
    fn cluster_ca_carries_critical_name_constraints() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::create_cluster(dir.path(), Some(&spec())).unwrap();
        assert!(ca.subject().contains("interceptor cluster CA"), "{}", ca.subject());
        assert_eq!(mode(&dir.path().join(KEY_FILE)), 0o600);
        let (_, cert) = parse_x509_certificate(ca.cert_der()).unwrap();
        let nc = cert.name_constraints().unwrap().unwrap();
        assert!(nc.critical, "RFC 5280: name constraints must be critical");
        let permitted: Vec<String> =
            nc.value.permitted_subtrees.iter().flatten().map(|s| format!("{:?}", s.base)).collect();
        assert_eq!(permitted.len(), 2, "{permitted:?}");
        assert_eq!(nc.value.excluded_subtrees.as_ref().map(Vec::len), Some(2), "every IPv4 and IPv6 address");
        assert!(ca.constraints().is_constrained());
        assert!(ca.constraints().permits_dns("api.individual.githubcopilot.com"));
        assert!(!ca.constraints().permits_dns("www.example.com"));
        // Loaded back, the constraints are read from the certificate.
        let loaded = CertificateAuthority::load_dir(dir.path()).unwrap();
        assert_eq!(loaded.constraints(), ca.constraints());
        // Never overwritten.
        let err = CertificateAuthority::create_cluster(dir.path(), Some(&spec())).unwrap_err();
        assert!(matches!(err, CaError::Exists { .. }), "{err}");
        assert_eq!(CertificateAuthority::load_dir(dir.path()).unwrap().cert_der(), ca.cert_der());
    }

    /// A Kubernetes Secret volume: each key a symbolic link into a
    /// timestamped directory, files mode 0400 (`defaultMode: 0400`).
    fn secret_mount(from: &Path, key_mode: u32) -> tempfile::TempDir {
        let mount = tempfile::tempdir().unwrap();
        let data = mount.path().join("..2026_01_01_00_00_00.000000001");
        fs::create_dir(&data).unwrap();
        for name in [CERT_FILE, KEY_FILE] {
            fs::copy(from.join(name), data.join(name)).unwrap();
            fs::set_permissions(data.join(name), fs::Permissions::from_mode(key_mode)).unwrap();
        }
        std::os::unix::fs::symlink(data.file_name().unwrap(), mount.path().join("..data")).unwrap();
        for name in [CERT_FILE, KEY_FILE] {
            std::os::unix::fs::symlink(format!("..data/{name}"), mount.path().join(name)).unwrap();
        }
        mount
    }

    #[test]
    fn cluster_ca_loads_from_a_secret_mount_and_is_never_created() {
        let made = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::create_cluster(made.path(), Some(&spec())).unwrap();
        let mount = secret_mount(made.path(), 0o400);
        let loaded = CertificateAuthority::load_dir(mount.path()).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());

        // A key readable by others through the link is refused, unchanged.
        let loose = secret_mount(made.path(), 0o644);
        let err = CertificateAuthority::load_dir(loose.path()).unwrap_err();
        assert!(matches!(err, CaError::KeyPermissions { mode: 0o644, .. }), "{err}");

        // An empty directory (Secret not created yet) is an error naming
        // the command, and nothing is created in it.
        let empty = tempfile::tempdir().unwrap();
        let err = CertificateAuthority::load_dir(empty.path()).unwrap_err();
        assert!(matches!(err, CaError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("ca create-cluster"), "{err}");
        assert_eq!(fs::read_dir(empty.path()).unwrap().count(), 0);

        // A Secret with the certificate only.
        let half = tempfile::tempdir().unwrap();
        fs::copy(made.path().join(CERT_FILE), half.path().join(CERT_FILE)).unwrap();
        let err = CertificateAuthority::load_dir(half.path()).unwrap_err();
        assert!(matches!(err, CaError::Incomplete { .. }), "{err}");
    }

    #[test]
    fn per_node_ca_is_unconstrained_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert!(!ca.constraints().is_constrained());
        let (_, cert) = parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(cert.name_constraints().unwrap().is_none());

        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create_with(dir.path(), Some(&spec())).unwrap();
        assert!(ca.constraints().is_constrained());
        assert!(ca.subject().contains("interceptor CA "), "{}", ca.subject());
        // An existing CA is loaded as it is, whatever is asked now.
        let again = CertificateAuthority::load_or_create_with(dir.path(), None).unwrap();
        assert!(again.constraints().is_constrained());
    }
}
