//! The benchmark's test PKI: [`TestPki`]'s CA and server certificate for
//! the fake provider's names, written as PEM files that nginx, mitmproxy and
//! the interceptor read.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Result;
use interceptor::testing::provider::TestPki;

/// Paths of the PEM files, and the certificate for in-process servers.
pub struct BenchPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pki: TestPki,
}

impl BenchPki {
    /// Mints a CA (ECDSA P-256, as public providers use) and a server
    /// certificate covering `names` and `ips`, and writes them in `dir`.
    pub fn mint(dir: &Path, names: &[&str], ips: &[IpAddr]) -> Result<BenchPki> {
        let pki = TestPki::new(names, ips)?;
        let ca = pki.write_ca(dir)?;
        let (cert, key) = pki.write_server_files(dir)?;
        Ok(BenchPki { ca, cert, key, pki })
    }

    /// A rustls server configuration presenting the server certificate
    /// (HTTP/1.1 only, as nginx serves here).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        Ok(self.pki.server_config(&[b"http/1.1"]))
    }
}
