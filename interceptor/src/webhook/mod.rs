//! `interceptor webhook`: a mutating admission webhook that makes the pods
//! of opted-in namespaces trust our cluster CA without any change to their
//! spec.
//!
//! Owns the pod mutation (`mutate`, pure), the HTTPS server the API server
//! calls (`serve`), and the serving certificate for it (`certs`). It never
//! sees the CA's private key: it reads the CA certificate only, and it
//! never refuses a pod (every answer is `allowed: true`; the
//! MutatingWebhookConfiguration has `failurePolicy: Ignore`).

mod certs;
mod mutate;
mod server;

pub use certs::{ServingCerts, write_serving_certs};
pub use mutate::{
    CA_CERT_ENV, ENV, INIT_CONTAINER, INJECTED_ANNOTATION, InjectSettings, JAVA_TOOL_OPTIONS, MOUNT_PATH,
    OPT_OUT_ANNOTATION, Outcome, TrustFile, VOLUME, review,
};
pub use server::{WebhookServer, serve};

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the webhook.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("invalid {what} in {path}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("cannot use the serving certificate")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot generate the serving certificate")]
    Generate {
        #[source]
        source: rcgen::Error,
    },
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
}
