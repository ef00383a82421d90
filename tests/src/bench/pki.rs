//! The benchmark's own test PKI: a CA and one leaf for the fake provider's
//! names, written as PEM files that nginx, mitmproxy and the interceptor read.
//!
//! (`interceptor::testing::provider::TestPki` keeps its key in memory only;
//! nginx needs it on disk.)

use std::{net::IpAddr, path::Path, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Paths of the PEM files, and the leaf in DER for in-process servers.
pub struct BenchPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    leaf_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl BenchPki {
    /// Mints a CA (ECDSA P-256, as public providers use) and a leaf covering
    /// `names` and `ips`, and writes `ca.pem`, `leaf.pem`, `leaf.key` in `dir`.
    pub fn mint(dir: &Path, names: &[&str], ips: &[IpAddr]) -> Result<BenchPki> {
        let now = time::OffsetDateTime::now_utc();
        let (not_before, not_after) = (now - time::Duration::days(1), now + time::Duration::days(30));
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("CA key")?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = dn("Interceptor Bench CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        ca.not_before = not_before;
        ca.not_after = not_after;
        let ca_cert = ca.self_signed(&ca_key).context("sign CA")?;
        let issuer = Issuer::new(ca, ca_key);

        let sans: Vec<String> =
            names.iter().map(|n| (*n).to_owned()).chain(ips.iter().map(IpAddr::to_string)).collect();
        let mut leaf = CertificateParams::new(sans).context("leaf names")?;
        leaf.distinguished_name = dn("bench-provider");
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.use_authority_key_identifier_extension = true;
        leaf.not_before = not_before;
        leaf.not_after = not_after;
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("leaf key")?;
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).context("sign leaf")?;

        let pki = BenchPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("leaf.pem"),
            key: dir.join("leaf.key"),
            leaf_der: leaf_cert.der().clone(),
            key_der: leaf_key.serialize_der(),
        };
        std::fs::write(&pki.ca, ca_cert.pem())?;
        std::fs::write(&pki.cert, leaf_cert.pem())?;
        std::fs::write(&pki.key, leaf_key.serialize_pem())?;
        Ok(pki)
    }

    /// A rustls server configuration presenting the leaf (HTTP/1.1 only, as
    /// nginx serves here).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(vec![self.leaf_der.clone()], key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Interceptor Bench");
    dn.push(DnType::CommonName, common_name);
    dn
}
