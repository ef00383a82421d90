//! Our certificate authority: the root we mint interception certificates from.
//!
//! Owns the CA key pair on disk (`ca.crt` 0644, `ca.key` 0600: the per-node
//! CA in the state directory, created on first start, or a cluster CA
//! created once by `interceptor ca create-cluster` and loaded from a mounted
//! Secret), the CA's X.509 name constraints (`constraints`), leaf issuance
//! with a bounded single-flight cache (refusing names outside the
//! constraints), installation of the CA into the trust stores programs read
//! (the system store, users' NSS databases and Firefox profiles, JVM
//! `cacerts`), and the trust files workloads are given (`bundle`). It must
//! never log or print the private key, and never loosen or silently repair
//! the key file's permissions.

mod authority;
mod bundle;
mod constraints;
mod files;
mod install;
mod java;
mod leaf;
mod manifest;
mod nss;
mod stores;
mod tools;

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

pub use authority::{CertificateAuthority, write_secret_manifest};
pub use bundle::{BUNDLE_FILE, CA_FILE, JKS_FILE, JKS_PASSWORD, TrustBundle, parse_ca_certs, write_bundle_dir};
pub use constraints::{Constraints, NameConstraintsSpec, dns_within};
pub(crate) use files::{pem_encode, wipe, write_atomic};
pub use install::{InstallReport, TrustStore, install, runtime_guidance, uninstall};
pub use leaf::{LeafIssuer, LeafSettings};
pub use manifest::MANIFEST_FILE;
pub use stores::{Change, Outcome, Report, Scope, StoreKind, install_all, store_name, uninstall_all};

/// Everything that can go wrong in the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "found {present} but not {missing}; restore the missing file, or remove {present} to create a new certificate authority"
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("refusing to use {path}: it is readable by group or others (mode {mode:03o}); run `chmod 600 {path}`")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("cannot parse pem in {path}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds {count} certificates, expected exactly one")]
    CertificateCount { path: PathBuf, count: usize },
    #[error("cannot parse the certificate in {path}")]
    CertificateParse {
        path: PathBuf,
        #[source]
        source: x509_parser::error::X509Error,
    },
    #[error("the certificate in {path} is not a certificate authority")]
    NotCa { path: PathBuf },
    #[error("the certificate authority in {path} expired at {not_after}; remove ca.crt and ca.key to create a new one")]
    Expired { path: PathBuf, not_after: time::OffsetDateTime },
    #[error("cannot load the private key in {path}")]
    Key {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("the private key in {key_path} does not match the certificate in {cert_path}")]
    KeyMismatch { cert_path: PathBuf, key_path: PathBuf },
    #[error("cannot generate the certificate authority")]
    Generate {
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "no certificate authority in {dir} (expected ca.crt and ca.key; create one with `interceptor ca create-cluster`)"
    )]
    Missing { dir: PathBuf },
    #[error("no system root certificates found; a bundle without them would break every host that is not intercepted")]
    NoSystemRoots,
    #[error("refusing to overwrite {path}")]
    Exists { path: PathBuf },
    #[error(
        "{name} is outside the name constraints of the certificate authority (permitted: {permitted}); clients would reject a certificate for it"
    )]
    OutsideConstraints { name: String, permitted: String },
    #[error("invalid server name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot issue a certificate for {name}")]
    Issue {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot load the signing key for {name}")]
    SigningKey {
        name: String,
        #[source]
        source: rustls::Error,
    },
    #[error("certificate minting task failed")]
    MintTask {
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("invalid leaf setting {field}: {reason}")]
    InvalidSettings { field: &'static str, reason: &'static str },
    #[error("no supported system trust store found (looked for {looked_for})")]
    NoTrustStore { looked_for: String },
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    UpdateCommand { command: String, status: ExitStatus, stderr: String },
    #[error("cannot read or write the install manifest {path}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}
