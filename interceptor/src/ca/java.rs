//! JVM trust stores (`cacerts` of every JDK or JRE found), changed only
//! through the JDK's own `keytool`.
//!
//! Several JDKs often share one file (Debian links each to
//! `/etc/ssl/certs/java/cacerts`), so stores are told apart by their
//! resolved path. The store password is the JVM's public default,
//! `changeit`; a store with another password fails with keytool's message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::CaError;
use super::tools;

/// The default password of every JDK's `cacerts`.
pub const STOREPASS: &str = "changeit";
/// Where distributions install JDKs and JREs.
pub const JVM_DIRS: [&str; 2] = ["/usr/lib/jvm", "/usr/java"];
/// Where a `cacerts` lives under a Java home (JDK 9+, then JDK 8's `jre/`).
const CACERTS: [&str; 2] = ["lib/security/cacerts", "jre/lib/security/cacerts"];

/// One `cacerts` file and the keytool that edits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keystore {
    /// Resolved path (symlinks followed).
    pub path: PathBuf,
    /// The JDK's own keytool when it has one, else the one on `PATH`.
    pub keytool: PathBuf,
}

impl Keystore {
    fn keytool(&self) -> std::process::Command {
        let mut cmd = tools::clean_command(&self.keytool);
        cmd.arg("-keystore").arg(&self.path).args(["-storepass", STOREPASS]);
        cmd
    }

    /// Every trusted certificate, by alias.
    pub fn certificates(&self) -> Result<BTreeMap<String, CertificateDer<'static>>, CaError> {
        let mut cmd = self.keytool();
        cmd.args(["-list", "-rfc"]);
        let out = tools::run(&mut cmd, None)?;
        Ok(parse_rfc_listing(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Imports `pem` as a trusted certificate under `alias`.
    pub fn add(&self, alias: &str, pem: &str) -> Result<(), CaError> {
        let mut cmd = self.keytool();
        cmd.args(["-importcert", "-noprompt", "-alias", alias]);
        tools::run(&mut cmd, Some(pem.as_bytes())).map(drop)
    }

    /// Deletes `alias`; false when there was none.
    pub fn delete(&self, alias: &str) -> Result<bool, CaError> {
        if !self.certificates()?.contains_key(alias) {
            return Ok(false);
        }
        let mut cmd = self.keytool();
        cmd.args(["-delete", "-alias", alias]);
        tools::run(&mut cmd, None).map(|_| true)
    }
}

/// Reads `keytool -list -rfc`: `Alias name: X` lines, each followed by its
/// certificate in PEM. Aliases are kept as keytool prints them (lower case).
fn parse_rfc_listing(text: &str) -> BTreeMap<String, CertificateDer<'static>> {
    let mut certs = BTreeMap::new();
    let mut alias: Option<String> = None;
    let mut pem: Option<String> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("Alias name: ") {
            alias = Some(name.trim().to_owned());
        } else if line.starts_with("-----BEGIN CERTIFICATE-----") {
            pem = Some(format!("{line}\n"));
        } else if let Some(block) = pem.as_mut() {
            block.push_str(line);
            block.push('\n');
            if line.starts_with("-----END CERTIFICATE-----") {
                if let (Some(name), Ok(der)) = (alias.take(), CertificateDer::from_pem_slice(block.as_bytes())) {
                    certs.insert(name, der);
                }
                pem = None;
            }
        }
    }
    certs
}

/// The `cacerts` of every Java home given, deduplicated by resolved path.
pub fn keystores(java_homes: &[PathBuf]) -> Vec<Keystore> {
    let mut found: Vec<Keystore> = Vec::new();
    for home in java_homes {
        for rel in CACERTS {
            let Ok(path) = home.join(rel).canonicalize() else { continue };
            if !path.is_file() || found.iter().any(|k| k.path == path) {
                continue;
            }
            let own = [home.join("bin/keytool"), home.join("jre/bin/keytool")].into_iter().find(|p| p.is_file());
            let Some(keytool) = own.or_else(|| tools::find_program("keytool")) else { continue };
            found.push(Keystore { path, keytool });
        }
    }
    found
}

/// The Java homes of this machine: each directory under [`JVM_DIRS`] and
/// the `java.home` of the `java` on `PATH`.
pub fn default_java_homes() -> Vec<PathBuf> {
    let mut homes = Vec::new();
    for dir in JVM_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut dirs: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect();
        dirs.sort();
        homes.extend(dirs);
    }
    if let Some(home) = path_java_home() {
        homes.push(home);
    }
    homes
}

/// `java.home` of the `java` on `PATH`, from `-XshowSettings:properties`.
fn path_java_home() -> Option<PathBuf> {
    let java = tools::find_program("java")?;
    let mut cmd = tools::clean_command(java);
    cmd.args(["-XshowSettings:properties", "-version"]);
    let out = tools::output(&mut cmd, None).ok()?;
    // The settings go to stderr.
    parse_java_home(&String::from_utf8_lossy(&out.stderr))
}

fn parse_java_home(settings: &str) -> Option<PathBuf> {
    settings.lines().find_map(|line| {
        let value = line.trim().strip_prefix("java.home")?.trim_start().strip_prefix('=')?;
        Some(PathBuf::from(value.trim()))
    })
}

/// Whether this process may write `path`.
pub fn writable(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_listing_maps_aliases_to_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = super::super::CertificateAuthority::load_or_create(dir.path()).unwrap();
        let listing = format!(
            "Keystore type: JKS\nKeystore provider: SUN\n\nYour keystore contains 2 entries\n\n\
             Alias name: debian:interceptor-ca.pem\nCreation date: Jun 24, 2025\nEntry type: trustedCertEntry\n\n\
             {}\n*******************************************\n\n\
             Alias name: broken\nCreation date: Jun 24, 2025\nEntry type: trustedCertEntry\n\n\
             -----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
            ca.cert_pem().trim_end()
        );
        let certs = parse_rfc_listing(&listing);
        assert_eq!(certs.len(), 1, "{certs:?}");
        assert_eq!(certs.get("debian:interceptor-ca.pem"), Some(ca.cert_der()));
    }

    #[test]
    fn java_home_is_read_from_the_settings() {
        let settings = "Property settings:\n    file.encoding = UTF-8\n    java.home = /usr/lib/jvm/java-17-openjdk-amd64\n    java.home.extra = x\n";
        assert_eq!(parse_java_home(settings), Some(PathBuf::from("/usr/lib/jvm/java-17-openjdk-amd64")));
        assert_eq!(parse_java_home("nothing"), None);
    }

    #[test]
    fn keystores_are_deduplicated_by_their_resolved_path() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared-cacerts");
        std::fs::write(&shared, b"store").unwrap();
        let (a, b, c) = (dir.path().join("jdk-a"), dir.path().join("jdk-b"), dir.path().join("jdk8"));
        for home in [&a, &b] {
            std::fs::create_dir_all(home.join("lib/security")).unwrap();
            std::os::unix::fs::symlink(&shared, home.join("lib/security/cacerts")).unwrap();
        }
        std::fs::create_dir_all(c.join("jre/lib/security")).unwrap();
        std::fs::create_dir_all(c.join("bin")).unwrap();
        std::fs::write(c.join("jre/lib/security/cacerts"), b"jdk8").unwrap();
        std::fs::write(c.join("bin/keytool"), b"").unwrap();
        let found = keystores(&[a, b, c.clone(), dir.path().join("missing")]);
        let paths: Vec<&Path> = found.iter().map(|k| k.path.as_path()).collect();
        let resolved = dir.path().canonicalize().unwrap();
        if tools::find_program("keytool").is_some() {
            assert_eq!(paths, [resolved.join("shared-cacerts"), resolved.join("jdk8/jre/lib/security/cacerts")]);
        } else {
            assert_eq!(paths, [resolved.join("jdk8/jre/lib/security/cacerts")]);
        }
        assert_eq!(found.last().map(|k| k.keytool.clone()), Some(c.join("bin/keytool")));
    }
}
