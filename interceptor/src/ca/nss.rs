//! NSS certificate databases (Chromium and Electron apps' `~/.pki/nssdb`,
//! Firefox profiles), changed only through NSS's own `certutil`.
//!
//! Only SQL databases (`cert9.db`) are handled; the legacy `cert8.db` format
//! is reported, not converted. Every command runs as the database's owner
//! (see [`super::tools::Account::command`]).

use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::CaError;
use super::tools::{self, Account};

/// Trust flags for a CA that issues TLS server certificates (`C` in the SSL
/// column), as Chromium's own instructions use.
const TLS_CA_TRUST: &str = "C,,";
/// The files `certutil -N` creates in a new database.
pub const DB_FILES: [&str; 3] = ["cert9.db", "key4.db", "pkcs11.txt"];
/// The hint when `certutil` is missing.
pub const CERTUTIL_HINT: &str = "install libnss3-tools (Debian, Ubuntu) or nss-tools (Fedora, RHEL) and run again";

/// One NSS database directory and the account that owns it.
#[derive(Debug, Clone)]
pub struct NssDb<'a> {
    pub certutil: &'a Path,
    pub dir: &'a Path,
    pub owner: &'a Account,
}

impl NssDb<'_> {
    fn certutil(&self) -> std::process::Command {
        let mut cmd = self.owner.command(self.certutil);
        cmd.arg("-d").arg(sql_dir(self.dir));
        cmd
    }

    /// Whether `nickname` names `cert` in this database. Another certificate
    /// with the same subject does not count (NSS answers a nickname lookup
    /// with every certificate of that subject).
    pub fn contains(&self, nickname: &str, cert: &CertificateDer<'_>) -> Result<bool, CaError> {
        let mut cmd = self.certutil();
        cmd.args(["-L", "-a", "-n", nickname]);
        let out = tools::output(&mut cmd, None)?;
        if !out.status.success() {
            return if not_found(&out) { Ok(false) } else { Err(tools::failure(&cmd, &out)) };
        }
        Ok(CertificateDer::pem_slice_iter(&out.stdout).filter_map(Result::ok).any(|c| c.as_ref() == cert.as_ref()))
    }

    /// Adds `pem` as a trusted TLS CA under `nickname`.
    pub fn add(&self, nickname: &str, pem: &str) -> Result<(), CaError> {
        let mut cmd = self.certutil();
        cmd.args(["-A", "-a", "-t", TLS_CA_TRUST, "-n", nickname]);
        tools::run(&mut cmd, Some(pem.as_bytes())).map(drop)
    }

    /// Deletes the certificate named `nickname`; false when there was none.
    pub fn delete(&self, nickname: &str) -> Result<bool, CaError> {
        let mut cmd = self.certutil();
        cmd.args(["-D", "-n", nickname]);
        let out = tools::output(&mut cmd, None)?;
        if out.status.success() {
            return Ok(true);
        }
        if not_found(&out) { Ok(false) } else { Err(tools::failure(&cmd, &out)) }
    }

    /// Creates an empty database (no password, as Chromium creates it).
    /// The directory must exist.
    pub fn create(&self) -> Result<(), CaError> {
        let mut cmd = self.certutil();
        cmd.args(["-N", "--empty-password"]);
        tools::run(&mut cmd, None).map(drop)
    }

    /// Whether the database holds no certificate and no key, so removing a
    /// database we created loses nothing.
    pub fn is_empty(&self) -> Result<bool, CaError> {
        let mut list = self.certutil();
        list.arg("-L");
        let certs = tools::run(&mut list, None)?;
        let has_certs = String::from_utf8_lossy(&certs.stdout).lines().any(is_certificate_line);
        let mut keys = self.certutil();
        keys.arg("-K");
        let out = tools::output(&mut keys, None)?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // `certutil -K` exits non-zero when there are none.
        let has_keys = !text.contains("no keys found");
        if !out.status.success() && has_keys {
            return Err(tools::failure(&keys, &out));
        }
        Ok(!has_certs && !has_keys)
    }
}

/// The `sql:` database argument certutil takes.
fn sql_dir(dir: &Path) -> String {
    format!("sql:{}", dir.display())
}

/// `certutil -L` lists a header ("Certificate Nickname … Trust Attributes",
/// "SSL,S/MIME,JAR/XPI"), a blank line, then one certificate per line.
fn is_certificate_line(line: &str) -> bool {
    let line = line.trim();
    !line.is_empty() && !line.starts_with("Certificate Nickname") && line != "SSL,S/MIME,JAR/XPI"
}

/// certutil's messages for an unknown nickname.
fn not_found(out: &std::process::Output) -> bool {
    let text = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
    text.contains("could not find cert") || text.contains("could not find certificate")
}

/// What a directory holds: an SQL database, only a legacy one, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbFormat {
    Sql,
    LegacyOnly,
    None,
}

/// The database format in `dir`.
pub fn format_of(dir: &Path) -> DbFormat {
    if dir.join("cert9.db").is_file() {
        DbFormat::Sql
    } else if dir.join("cert8.db").is_file() {
        DbFormat::LegacyOnly
    } else {
        DbFormat::None
    }
}

/// The NSS database directories of a home that Chromium-based browsers and
/// Electron apps read (the snap Chromium keeps its own).
pub fn chromium_dbs(home: &Path) -> Vec<PathBuf> {
    [".pki/nssdb", "snap/chromium/current/.pki/nssdb"].iter().map(|rel| home.join(rel)).collect()
}

/// Where Firefox keeps profiles in a home: the distribution package, the
/// snap and the Flatpak.
pub fn firefox_profile_roots(home: &Path) -> Vec<PathBuf> {
    [".mozilla/firefox", "snap/firefox/common/.mozilla/firefox", ".var/app/org.mozilla.firefox/.mozilla/firefox"]
        .iter()
        .map(|rel| home.join(rel))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_lines_are_told_from_the_header() {
        let listing = "\nCertificate Nickname                                         Trust Attributes\n\
                       \x20                                                            SSL,S/MIME,JAR/XPI\n\n\
                       interceptor-ca-0011                                          C,,  \n";
        let certs: Vec<&str> = listing.lines().filter(|l| is_certificate_line(l)).collect();
        assert_eq!(certs.len(), 1);
        assert!(certs[0].starts_with("interceptor-ca-0011"));
        let empty = "\nCertificate Nickname                                         Trust Attributes\n\
                     \x20                                                            SSL,S/MIME,JAR/XPI\n\n";
        assert!(!empty.lines().any(is_certificate_line));
    }

    #[test]
    fn formats_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(format_of(dir.path()), DbFormat::None);
        std::fs::write(dir.path().join("cert8.db"), b"").unwrap();
        assert_eq!(format_of(dir.path()), DbFormat::LegacyOnly);
        std::fs::write(dir.path().join("cert9.db"), b"").unwrap();
        assert_eq!(format_of(dir.path()), DbFormat::Sql);
        assert_eq!(sql_dir(Path::new("/h/.pki/nssdb")), "sql:/h/.pki/nssdb");
    }
}
