//! Trust files for workloads: our CA alone, the system roots plus our CA,
//! and the same as a Java trust store.
//!
//! `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE` and
//! `GIT_SSL_CAINFO` *replace* a runtime's default roots, so the file they
//! name must hold the system roots as well as our CA, or every host that is
//! not intercepted stops verifying. `NODE_EXTRA_CA_CERTS` adds to Node's
//! roots, so it gets our CA alone. The JVM reads one trust store
//! (`javax.net.ssl.trustStore`), which replaces its `cacerts`: it gets the
//! system roots plus our CA too, in the JKS format every JVM reads.
//!
//! This module only ever handles certificates: no private key passes here.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::CaError;
use super::files::{pem_encode, write_atomic};

/// Our CA alone (PEM), for `NODE_EXTRA_CA_CERTS`.
pub const CA_FILE: &str = "ca.crt";
/// System roots plus our CA (PEM), for the variables that replace the roots.
pub const BUNDLE_FILE: &str = "ca-bundle.crt";
/// System roots plus our CA, as a JKS trust store, for the JVM.
pub const JKS_FILE: &str = "truststore.jks";
/// The JKS integrity password. The store holds public certificates only;
/// the JVM reads it without a password too (it then skips the check).
pub const JKS_PASSWORD: &str = "changeit";

const FILE_MODE: u32 = 0o644;

/// Our CA certificates (one, or two while the CA is being rolled over)
/// and the roots they are added to.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    ours: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// Parses our CA certificates from PEM text (`origin` names it in
    /// errors); `roots` are the system roots to keep trusting. Fails when
    /// the text holds no certificate, or when `roots` is empty (a bundle
    /// without them would break every host that is not intercepted).
    pub fn new(ours_pem: &str, origin: &Path, roots: Vec<CertificateDer<'static>>) -> Result<Self, CaError> {
        let ours = parse_ca_certs(ours_pem, origin)?;
        let mut roots = roots;
        // The system's file and directory list the same roots.
        roots.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        roots.dedup();
        if roots.is_empty() {
            return Err(CaError::NoSystemRoots);
        }
        Ok(Self { ours, roots })
    }

    /// The system roots this machine (or image) trusts, as
    /// `rustls-native-certs` finds them (`/etc/ssl/certs/...` on Linux).
    pub fn system_roots() -> Vec<CertificateDer<'static>> {
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "cannot load some system root certificates");
        }
        native.certs
    }

    /// Our CA certificates, PEM.
    pub fn ours_pem(&self) -> String {
        self.ours.iter().map(|c| pem_encode("CERTIFICATE", c)).collect()
    }

    /// The system roots, then ours, PEM. A root that is also ours is
    /// listed once.
    pub fn bundle_pem(&self) -> String {
        self.all().map(|c| pem_encode("CERTIFICATE", c)).collect()
    }

    /// The system roots, then ours, as a JKS trust store.
    pub fn jks(&self) -> Vec<u8> {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let entries: Vec<(String, &[u8])> = self
            .roots
            .iter()
            .filter(|r| !self.ours.contains(r))
            .enumerate()
            .map(|(i, c)| (format!("system-root-{i}"), c.as_ref()))
            .chain(self.ours.iter().enumerate().map(|(i, c)| (format!("interceptor-ca-{i}"), c.as_ref())))
            .collect();
        jks_trust_store(&entries, JKS_PASSWORD, now_ms)
    }

    fn all(&self) -> impl Iterator<Item = &CertificateDer<'static>> {
        self.roots.iter().filter(|r| !self.ours.contains(r)).chain(&self.ours)
    }
}

/// The certificates in `pem` (`origin` names it in errors): at least one,
/// each a parsable certificate.
pub fn parse_ca_certs(pem: &str, origin: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem_err = |source| CaError::Pem { path: origin.to_path_buf(), source };
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(pem_err)?;
        x509_parser::parse_x509_certificate(&cert).map_err(|_| CaError::CertificateParse {
            path: origin.to_path_buf(),
            source: x509_parser::error::X509Error::InvalidCertificate,
        })?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(pem_err(rustls_pki_types::pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// Writes [`CA_FILE`], [`BUNDLE_FILE`] and [`JKS_FILE`] (mode 0644) into
/// `dir`, which must exist. Returns the paths written.
pub fn write_bundle_dir(bundle: &TrustBundle, dir: &Path) -> Result<Vec<PathBuf>, CaError> {
    let files = [
        (CA_FILE, bundle.ours_pem().into_bytes()),
        (BUNDLE_FILE, bundle.bundle_pem().into_bytes()),
        (JKS_FILE, bundle.jks()),
    ];
    let mut written = Vec::new();
    for (name, bytes) in files {
        let path = dir.join(name);
        write_atomic(&path, &bytes, FILE_MODE)?;
        written.push(path);
    }
    Ok(written)
}

/// A JKS key store holding trusted certificate entries only (Sun's format:
/// magic, version 2, the entries, then a SHA-1 over the password in
/// UTF-16BE, the phrase "Mighty Aphrodite" and everything before it).
fn jks_trust_store(entries: &[(String, &[u8])], password: &str, timestamp_ms: u64) -> Vec<u8> {
    const MAGIC: u32 = 0xFEED_FEED;
    const VERSION: u32 = 2;
    const TRUSTED_CERT: u32 = 2;
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (alias, der) in entries {
        out.extend_from_slice(&TRUSTED_CERT.to_be_bytes());
        java_utf(&mut out, alias);
        out.extend_from_slice(&timestamp_ms.to_be_bytes());
        java_utf(&mut out, "X.509");
        out.extend_from_slice(&(der.len() as u32).to_be_bytes());
        out.extend_from_slice(der);
    }
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    for unit in password.encode_utf16() {
        ctx.update(&unit.to_be_bytes());
    }
    ctx.update(b"Mighty Aphrodite");
    ctx.update(&out);
    out.extend_from_slice(ctx.finish().as_ref());
    out
}

/// `DataOutput.writeUTF` for ASCII text (our aliases and "X.509").
fn java_utf(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;

    fn bundle() -> (tempfile::TempDir, CertificateAuthority, TrustBundle) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(&dir.path().join("ca")).unwrap();
        let root_ca = CertificateAuthority::load_or_create(&dir.path().join("root")).unwrap();
        let bundle = TrustBundle::new(ca.cert_pem(), Path::new("env"), vec![root_ca.cert_der().clone()]).unwrap();
        (dir, ca, bundle)
    }

    #[test]
    fn bundle_keeps_the_roots_and_adds_ours() {
        let (_dir, ca, bundle) = bundle();
        assert_eq!(bundle.ours_pem(), ca.cert_pem());
        let pem = bundle.bundle_pem();
        assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert!(pem.ends_with(ca.cert_pem()), "ours last");
        assert!(!pem.contains("PRIVATE"));
    }

    #[test]
    fn bundle_refuses_no_roots_and_no_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let err = TrustBundle::new(ca.cert_pem(), Path::new("env"), Vec::new()).unwrap_err();
        assert!(matches!(err, CaError::NoSystemRoots), "{err}");
        let err = TrustBundle::new("nothing here", Path::new("env"), vec![ca.cert_der().clone()]).unwrap_err();
        assert!(err.to_string().contains("env"), "{err}");
    }

    #[test]
    fn jks_layout_and_digest() {
        // The JVM's own reading of it (keytool, integrity checked) is in the
        // webhook tests.
        let empty = jks_trust_store(&[], "changeit", 0);
        assert_eq!(&empty[..12], &[0xfe, 0xed, 0xfe, 0xed, 0, 0, 0, 2, 0, 0, 0, 0]);
        assert_eq!(empty.len(), 12 + 20);
        let (_dir, _ca, bundle) = bundle();
        let jks = bundle.jks();
        assert_eq!(&jks[8..12], &[0, 0, 0, 2], "two entries");
        assert_eq!(&jks[12..16], &[0, 0, 0, 2], "trusted certificate entry");
    }

    #[test]
    fn written_files_are_world_readable() {
        use std::os::unix::fs::PermissionsExt as _;
        let (dir, _ca, bundle) = bundle();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let written = write_bundle_dir(&bundle, &out).unwrap();
        assert_eq!(written.len(), 3);
        for path in written {
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644, "{}", path.display());
        }
    }
}
