//! Installing our CA into the system trust store, and what to tell runtimes
//! that ignore that store. The other stores (NSS, Firefox, JVM) are in
//! [`super::stores`].
//!
//! Needs root for the real system paths. Runs the distribution's update
//! command; never edits the generated bundle itself.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::files::write_atomic;
use super::{CaError, CertificateAuthority};

const ANCHOR_NAME: &str = "interceptor-ca.crt";
/// How much of a failed command's stderr an error repeats.
const MAX_STDERR_LEN: usize = 2000;

/// A system trust store: where anchors go and how the bundle is rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustStore {
    /// Where our CA certificate is written.
    pub anchor: PathBuf,
    /// Program and arguments that rebuild the bundle from the anchors; empty
    /// for none.
    pub update_command: Vec<String>,
    /// The bundle the update command produces, which now includes our CA.
    pub bundle: PathBuf,
}

impl TrustStore {
    /// Debian, Ubuntu, Alpine: `update-ca-certificates`.
    pub fn debian() -> Self {
        Self {
            anchor: Path::new("/usr/local/share/ca-certificates").join(ANCHOR_NAME),
            update_command: vec!["update-ca-certificates".to_owned()],
            bundle: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
        }
    }

    /// RHEL, Fedora, CentOS, Amazon Linux: `update-ca-trust extract`.
    pub fn rhel() -> Self {
        Self {
            anchor: Path::new("/etc/pki/ca-trust/source/anchors").join(ANCHOR_NAME),
            update_command: vec!["update-ca-trust".to_owned(), "extract".to_owned()],
            bundle: PathBuf::from("/etc/pki/tls/certs/ca-bundle.crt"),
        }
    }

    /// The trust store of this machine: the first whose anchor directory
    /// exists.
    pub fn detect() -> Result<Self, CaError> {
        let candidates = [Self::rhel(), Self::debian()];
        for store in &candidates {
            if store.anchor.parent().is_some_and(Path::is_dir) {
                return Ok(store.clone());
            }
        }
        Err(CaError::NoTrustStore {
            looked_for: candidates
                .iter()
                .filter_map(|s| s.anchor.parent())
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    fn command_line(&self) -> String {
        self.update_command.join(" ")
    }
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// Where the CA certificate was placed.
    pub anchor: PathBuf,
    /// The bundle runtimes can be pointed at.
    pub bundle: PathBuf,
    /// The anchor file was missing or different and was (re)written.
    pub anchor_written: bool,
    /// The update command ran.
    pub command_ran: bool,
    /// The bundle contains our CA afterwards. False after a successful
    /// update means the bundle lives elsewhere on this system; warn.
    pub bundle_contains_ca: bool,
}

impl InstallReport {
    /// Whether the system changed; false when the CA was already installed.
    pub fn changed(&self) -> bool {
        self.anchor_written || self.command_ran
    }
}

/// Installs the CA into `target`. Idempotent: when the anchor already holds
/// this certificate and the bundle already contains it, nothing is written
/// and no command runs.
pub fn install(ca: &CertificateAuthority, target: &TrustStore) -> Result<InstallReport, CaError> {
    let pem = ca.cert_pem().as_bytes();
    let current = match fs::read(&target.anchor) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(CaError::Read { path: target.anchor.clone(), source });
        }
    };
    let anchor_written = current.as_deref() != Some(pem);
    if anchor_written {
        if let Some(dir) = target.anchor.parent() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|source| CaError::CreateDir { path: dir.to_path_buf(), source })?;
        }
        write_atomic(&target.anchor, pem, 0o644)?;
    }

    let mut bundle_contains_ca = bundle_contains(&target.bundle, ca.cert_der());
    // Also run when only the bundle is behind, e.g. after an interrupted
    // install.
    let command_ran = anchor_written || !bundle_contains_ca;
    if command_ran {
        run(target)?;
        bundle_contains_ca = bundle_contains(&target.bundle, ca.cert_der());
    }
    tracing::info!(
        anchor = %target.anchor.display(),
        anchor_written,
        command_ran,
        bundle_contains_ca,
        "installed certificate authority"
    );
    Ok(InstallReport {
        anchor: target.anchor.clone(),
        bundle: target.bundle.clone(),
        anchor_written,
        command_ran,
        bundle_contains_ca,
    })
}

/// Removes the CA from `target`; returns whether anything was removed.
pub fn uninstall(target: &TrustStore) -> Result<bool, CaError> {
    match fs::remove_file(&target.anchor) {
        Ok(()) => {
            run(target)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CaError::Write { path: target.anchor.clone(), source }),
    }
}

fn run(target: &TrustStore) -> Result<(), CaError> {
    let Some((program, args)) = target.update_command.split_first() else {
        return Ok(());
    };
    let command = target.command_line();
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| CaError::Spawn { command: command.clone(), source })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(CaError::UpdateCommand {
        command,
        status: output.status,
        stderr: stderr.trim().chars().take(MAX_STDERR_LEN).collect(),
    })
}

fn bundle_contains(bundle: &Path, cert: &CertificateDer<'_>) -> bool {
    let Ok(pem) = fs::read(bundle) else {
        return false;
    };
    CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).any(|c| c.as_ref() == cert.as_ref())
}

/// What to tell users of runtimes that ignore the system trust store.
/// `ca_cert_path` is our `ca.crt`; `system_bundle` the bundle that now
/// includes it ([`TrustStore::bundle`]).
pub fn runtime_guidance(ca_cert_path: &Path, system_bundle: &Path) -> String {
    let ca = ca_cert_path.display();
    let bundle = system_bundle.display();
    format!(
        "\
Some runtimes ignore the system trust store. For intercepted processes:

Node.js (and Bun)
  export NODE_EXTRA_CA_CERTS={ca}
  Node trusts its own bundled roots, not the system store (unless started with
  --use-openssl-ca or --use-system-ca); this adds our CA to those roots.

Python (requests, httpx, and anything else using certifi)
  export REQUESTS_CA_BUNDLE={bundle}
  export SSL_CERT_FILE={bundle}
  certifi ships its own roots. Point these at the system bundle, which now
  includes our CA, not at {ca} alone: a file holding only our CA makes
  every host that is not intercepted fail verification.

Java
  The cacerts of every JDK found was changed (the `java` lines above). For a
  JVM elsewhere (a bundled runtime, a JDK in a home directory):
  keytool -importcert -noprompt -cacerts -storepass changeit \\
    -alias interceptor-ca -file {ca}
  Restart running JVMs, browsers and desktop apps: they read their stores at
  start.

Go, curl, OpenSSL and Python's ssl module use the system store: nothing to do.
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (tempfile::TempDir, CertificateAuthority, TrustStore) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(&dir.path().join("state")).unwrap();
        let anchors = dir.path().join("anchors");
        let bundle = dir.path().join("bundle.crt");
        // Stands in for update-ca-certificates: concatenates the anchors.
        let script =
            format!("cat {}/*.crt > {} 2>/dev/null || : > {}", anchors.display(), bundle.display(), bundle.display());
        let store = TrustStore {
            anchor: anchors.join(ANCHOR_NAME),
            update_command: vec!["sh".to_owned(), "-c".to_owned(), script],
            bundle,
        };
        (dir, ca, store)
    }

    #[test]
    fn install_writes_the_anchor_and_is_idempotent() {
        let (_dir, ca, store) = fixture();
        let first = install(&ca, &store).unwrap();
        assert!(first.anchor_written && first.command_ran && first.bundle_contains_ca);
        assert_eq!(fs::read_to_string(&store.anchor).unwrap(), ca.cert_pem());
        let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&store.anchor).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o644);

        let second = install(&ca, &store).unwrap();
        assert!(!second.changed(), "{second:?}");
        assert!(second.bundle_contains_ca);
    }

    #[test]
    fn install_with_a_no_op_command_writes_once() {
        let (_dir, ca, mut store) = fixture();
        store.update_command = vec!["true".to_owned()];
        let first = install(&ca, &store).unwrap();
        assert!(first.anchor_written && first.command_ran);
        assert!(!first.bundle_contains_ca);
        let second = install(&ca, &store).unwrap();
        assert!(!second.anchor_written);
        assert_eq!(fs::read_to_string(&store.anchor).unwrap(), ca.cert_pem());
    }

    #[test]
    fn install_replaces_a_different_certificate() {
        let (dir, ca, store) = fixture();
        install(&ca, &store).unwrap();
        let other = CertificateAuthority::load_or_create(&dir.path().join("other")).unwrap();
        let report = install(&other, &store).unwrap();
        assert!(report.anchor_written && report.bundle_contains_ca);
        assert_eq!(fs::read_to_string(&store.anchor).unwrap(), other.cert_pem());
    }

    #[test]
    fn failing_update_command_is_reported() {
        let (_dir, ca, mut store) = fixture();
        store.update_command = vec!["sh".to_owned(), "-c".to_owned(), "echo nope >&2; exit 3".to_owned()];
        let err = install(&ca, &store).unwrap_err();
        assert!(matches!(&err, CaError::UpdateCommand { stderr, .. } if stderr == "nope"), "{err}");
        store.update_command = vec!["/nonexistent/update".to_owned()];
        assert!(matches!(install(&ca, &store), Err(CaError::Spawn { .. })));
    }

    #[test]
    fn uninstall_removes_the_anchor() {
        let (_dir, ca, store) = fixture();
        install(&ca, &store).unwrap();
        assert!(uninstall(&store).unwrap());
        assert!(!store.anchor.exists());
        assert!(!bundle_contains(&store.bundle, ca.cert_der()));
        assert!(!uninstall(&store).unwrap());
    }

    #[test]
    fn guidance_names_the_right_files() {
        let text =
            runtime_guidance(Path::new("/var/lib/interceptor/ca.crt"), Path::new("/etc/ssl/certs/ca-certificates.crt"));
        assert!(text.contains("NODE_EXTRA_CA_CERTS=/var/lib/interceptor/ca.crt"));
        assert!(text.contains("REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"));
        assert!(text.contains("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"));
        assert!(text.contains("-file /var/lib/interceptor/ca.crt"));
    }
}
