//! The webhook's own serving certificate: a small CA, name-constrained to
//! the Service's namespace, and a leaf for the Service's DNS names. The API
//! server trusts the CA through the `caBundle` of the
//! MutatingWebhookConfiguration. Unrelated to the interception CA, whose key
//! the webhook never holds.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, GeneralSubtree, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, NameConstraints, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use super::WebhookError;
use crate::ca::{pem_encode, wipe, write_atomic};

/// Five years: the API server does not warn before a webhook certificate
/// expires, so it is long; rotate by running `webhook certs` again.
const VALIDITY: Duration = Duration::days(5 * 365);

/// Where [`write_serving_certs`] wrote each file.
#[derive(Debug, Clone)]
pub struct ServingCerts {
    /// The CA for the `caBundle` (PEM).
    pub ca_cert: PathBuf,
    /// The serving certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM, mode 0600).
    pub key: PathBuf,
    /// The CA certificate, PEM, for the `caBundle` (base64 of this).
    pub ca_pem: String,
    /// The names the serving certificate is valid for.
    pub names: Vec<String>,
}

/// Creates `ca.crt`, `tls.crt` and `tls.key` in `dir` for the Service
/// `service` in `namespace` (names `service.namespace.svc` and
/// `service.namespace.svc.cluster.local`). The CA key is not kept: a new
/// certificate is a new run.
pub fn write_serving_certs(dir: &Path, service: &str, namespace: &str) -> Result<ServingCerts, WebhookError> {
    let generate = |source| WebhookError::Generate { source };
    let now = OffsetDateTime::now_utc();
    let svc = format!("{namespace}.svc");
    let names = vec![format!("{service}.{svc}"), format!("{service}.{svc}.cluster.local")];

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("interceptor webhook CA {service}.{svc}"));
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![
            GeneralSubtree::DnsName(svc.clone()),
            GeneralSubtree::DnsName(format!("{svc}.cluster.local")),
        ],
        excluded_subtrees: Vec::new(),
    });
    ca.not_before = now - Duration::hours(1);
    ca.not_after = now + VALIDITY;
    let ca_cert = ca.self_signed(&ca_key).map_err(generate)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let mut leaf = CertificateParams::new(names.clone()).map_err(generate)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].as_str());
    leaf.distinguished_name = dn;
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = now - Duration::hours(1);
    leaf.not_after = now + VALIDITY;
    let cert = leaf.signed_by(&key, &issuer).map_err(generate)?;

    let out = ServingCerts {
        ca_cert: dir.join("ca.crt"),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca_pem: pem_encode("CERTIFICATE", ca_cert.der()),
        names,
    };
    let mut key_pem = key.serialize_pem().into_bytes();
    let written = write_atomic(&out.key, &key_pem, 0o600);
    wipe(&mut key_pem);
    written?;
    write_atomic(&out.cert, pem_encode("CERTIFICATE", cert.der()).as_bytes(), 0o644)?;
    write_atomic(&out.ca_cert, out.ca_pem.as_bytes(), 0o644)?;
    Ok(out)
}
