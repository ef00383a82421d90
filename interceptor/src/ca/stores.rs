//! `ca install` and `ca uninstall` across every trust store a machine's
//! programs read: the system store, each user's NSS database (Chromium and
//! Electron apps), each Firefox profile, and each JVM's `cacerts`.
//!
//! Finds the stores, changes each with its own tool, reports one line per
//! store, and records what it added in the manifest ([`super::manifest`]),
//! so uninstalling removes exactly that. One store failing does not stop the
//! others; the report says which failed and why.
//!
//! Which NSS databases are created: Chromium creates `~/.pki/nssdb` on its
//! first start, so a browser or Electron app installed after `ca install`
//! would start with a database that lacks our CA. For login accounts (uid
//! 1000 and up, a login shell, a home they own) with no database yet, one is
//! created (empty password, as Chromium does) and removed again by
//! `ca uninstall` if it then holds nothing else. Service accounts and root
//! are only changed where a database already exists.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use super::files::sync_dir;
use super::java::{self, Keystore};
use super::manifest::{Entry, Manifest, NssKind};
use super::nss::{self, DbFormat, NssDb};
use super::tools::{self, Account};
use super::{CaError, CertificateAuthority, TrustStore};

/// A kind of trust store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum StoreKind {
    /// The system store (`update-ca-certificates`, `update-ca-trust`).
    System,
    /// Users' NSS databases read by Chromium-based browsers and Electron apps.
    Nss,
    /// Firefox profiles.
    Firefox,
    /// JVM `cacerts`.
    Java,
}

impl StoreKind {
    pub const ALL: [StoreKind; 4] = [StoreKind::System, StoreKind::Nss, StoreKind::Firefox, StoreKind::Java];

    pub fn label(self) -> &'static str {
        match self {
            StoreKind::System => "system",
            StoreKind::Nss => "nss",
            StoreKind::Firefox => "firefox",
            StoreKind::Java => "java",
        }
    }
}

impl From<NssKind> for StoreKind {
    fn from(kind: NssKind) -> Self {
        match kind {
            NssKind::Nss => StoreKind::Nss,
            NssKind::Firefox => StoreKind::Firefox,
        }
    }
}

/// Where to look. [`Scope::machine`] is the whole machine; tests point it at
/// a throwaway tree.
#[derive(Debug, Clone)]
pub struct Scope {
    pub kinds: BTreeSet<StoreKind>,
    /// Accounts (and so homes) come from this `passwd(5)` file.
    pub passwd: PathBuf,
    /// Java homes whose `cacerts` are changed; `None` finds them
    /// ([`java::default_java_homes`]).
    pub java_homes: Option<Vec<PathBuf>>,
    /// The system store; `None` detects it.
    pub system: Option<TrustStore>,
}

impl Scope {
    /// Every store of `kinds` on this machine.
    pub fn machine(kinds: impl IntoIterator<Item = StoreKind>) -> Self {
        Self {
            kinds: kinds.into_iter().collect(),
            passwd: PathBuf::from("/etc/passwd"),
            java_homes: None,
            system: None,
        }
    }

    fn wants(&self, kind: StoreKind) -> bool {
        self.kinds.contains(&kind)
    }
}

/// What happened to one store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Added {
        name: String,
    },
    /// The NSS database did not exist; it was created and the CA added.
    CreatedAndAdded {
        name: String,
    },
    AlreadyPresent {
        name: String,
    },
    Removed {
        name: String,
    },
    /// Removed, and the database we had created, now empty, with it.
    RemovedWithDatabase {
        name: String,
    },
    /// Nothing to remove: the certificate was gone already.
    AlreadyAbsent {
        name: String,
    },
    Skipped {
        reason: String,
    },
    Failed {
        error: String,
    },
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: StoreKind,
    pub location: PathBuf,
    pub outcome: Outcome,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.outcome {
            Outcome::Added { name } => format!("added as {name}"),
            Outcome::CreatedAndAdded { name } => format!("created the database, added as {name}"),
            Outcome::AlreadyPresent { name } => format!("already present as {name}"),
            Outcome::Removed { name } => format!("removed {name}"),
            Outcome::RemovedWithDatabase { name } => format!("removed {name} and the database we had created"),
            Outcome::AlreadyAbsent { name } => format!("{name} already absent"),
            Outcome::Skipped { reason } => format!("skipped: {reason}"),
            Outcome::Failed { error } => format!("FAILED: {error}"),
        };
        write!(f, "{:<8} {}: {what}", self.kind.label(), self.location.display())
    }
}

/// Everything `ca install` or `ca uninstall` did.
#[derive(Debug, Clone)]
pub struct Report {
    pub changes: Vec<Change>,
    pub manifest: PathBuf,
    /// The system bundle that now includes the CA (install only).
    pub system_bundle: Option<PathBuf>,
}

impl Report {
    /// Stores that could not be changed.
    pub fn failures(&self) -> usize {
        self.changes.iter().filter(|c| matches!(c.outcome, Outcome::Failed { .. })).count()
    }

    /// Whether any store changed.
    pub fn changed(&self) -> bool {
        self.changes.iter().any(|c| {
            matches!(
                c.outcome,
                Outcome::Added { .. }
                    | Outcome::CreatedAndAdded { .. }
                    | Outcome::Removed { .. }
                    | Outcome::RemovedWithDatabase { .. }
            )
        })
    }
}

/// The name the CA gets in NSS databases and keystores: fixed per CA (from
/// its random serial), so a second install finds it and a new CA does not
/// collide with an old one.
pub fn store_name(ca: &CertificateAuthority) -> String {
    let serial: String = x509_parser::parse_x509_certificate(ca.cert_der())
        .map(|(_, cert)| cert.raw_serial().iter().take(8).map(|b| format!("{b:02x}")).collect())
        .unwrap_or_default();
    if serial.is_empty() { "interceptor-ca".to_owned() } else { format!("interceptor-ca-{serial}") }
}

/// Adds `ca` to every store in `scope`; records what it added in the
/// manifest in `state_dir`. Err only when the manifest cannot be read or
/// written; a store that fails is a [`Outcome::Failed`] line.
pub fn install_all(ca: &CertificateAuthority, state_dir: &Path, scope: &Scope) -> Result<Report, CaError> {
    let mut manifest = Manifest::load(state_dir)?;
    let name = store_name(ca);
    let mut changes = Vec::new();
    let mut system_bundle = None;

    if scope.wants(StoreKind::System) {
        let (change, bundle) = install_system(ca, scope, &mut manifest);
        changes.push(change);
        system_bundle = bundle;
    }
    if scope.wants(StoreKind::Nss) || scope.wants(StoreKind::Firefox) {
        match nss_targets(scope) {
            Ok(targets) => {
                let certutil = tools::find_program("certutil");
                for target in targets {
                    changes.push(install_nss(ca, &name, certutil.as_deref(), target, &mut manifest));
                }
            }
            Err(error) => changes.push(failed_users(scope, &error)),
        }
    }
    if scope.wants(StoreKind::Java) {
        for keystore in java::keystores(&java_homes(scope)) {
            changes.push(install_java(ca, &name, &keystore, &mut manifest));
        }
    }
    manifest.save()?;
    sync_dir(state_dir);
    Ok(Report { changes, manifest: manifest.path().to_path_buf(), system_bundle })
}

/// Removes what the manifest in `state_dir` records for the kinds in
/// `scope`, and our anchor from the system store. Entries that cannot be
/// removed stay in the manifest for the next attempt.
pub fn uninstall_all(state_dir: &Path, scope: &Scope) -> Result<Report, CaError> {
    let mut manifest = Manifest::load(state_dir)?;
    let mut changes = Vec::new();
    let mut kept = Vec::new();
    let certutil = tools::find_program("certutil");
    for entry in std::mem::take(&mut manifest.entries) {
        let change = match &entry {
            // Below, whether or not the manifest lists it.
            Entry::System { .. } => {
                if !scope.wants(StoreKind::System) {
                    kept.push(entry);
                }
                continue;
            }
            Entry::Nss { kind, .. } if !scope.wants(StoreKind::from(*kind)) => None,
            Entry::Java { .. } if !scope.wants(StoreKind::Java) => None,
            Entry::Nss { .. } => Some(uninstall_nss(&entry, certutil.as_deref())),
            Entry::Java { keystore, keytool, alias } => Some(uninstall_java(keystore, keytool, alias)),
        };
        match change {
            Some(change) => {
                if matches!(change.outcome, Outcome::Failed { .. } | Outcome::Skipped { .. }) {
                    kept.push(entry);
                }
                changes.push(change);
            }
            None => kept.push(entry),
        }
    }
    if scope.wants(StoreKind::System) {
        let change = uninstall_system(scope);
        if matches!(change.outcome, Outcome::Failed { .. } | Outcome::Skipped { .. }) {
            kept.push(Entry::System { anchor: change.location.clone() });
        }
        changes.insert(0, change);
    }
    manifest.entries = kept;
    manifest.save()?;
    sync_dir(state_dir);
    Ok(Report { changes, manifest: manifest.path().to_path_buf(), system_bundle: None })
}

fn system_store(scope: &Scope) -> Result<TrustStore, CaError> {
    scope.system.clone().map_or_else(TrustStore::detect, Ok)
}

fn install_system(ca: &CertificateAuthority, scope: &Scope, manifest: &mut Manifest) -> (Change, Option<PathBuf>) {
    let store = system_store(scope);
    let location = store.as_ref().map(|s| s.anchor.clone()).unwrap_or_default();
    let change = |outcome| Change { kind: StoreKind::System, location: location.clone(), outcome };
    if scope.system.is_none() && !tools::is_root() {
        return (change(Outcome::Skipped { reason: "changing the system store needs root".into() }), None);
    }
    match store.and_then(|store| super::install(ca, &store)) {
        Ok(report) => {
            manifest.record(Entry::System { anchor: report.anchor.clone() });
            let name = format!("{} (bundle {})", file_name(&report.anchor), report.bundle.display());
            let outcome = if !report.bundle_contains_ca {
                Outcome::Failed {
                    error: format!("{} does not contain the CA after the update", report.bundle.display()),
                }
            } else if report.changed() {
                Outcome::Added { name }
            } else {
                Outcome::AlreadyPresent { name }
            };
            (change(outcome), Some(report.bundle))
        }
        Err(error) => (change(failed(&error)), None),
    }
}

fn uninstall_system(scope: &Scope) -> Change {
    let store = system_store(scope);
    let location = store.as_ref().map(|s| s.anchor.clone()).unwrap_or_default();
    let name = file_name(&location);
    let change = |outcome| Change { kind: StoreKind::System, location: location.clone(), outcome };
    if scope.system.is_none() && !tools::is_root() {
        return change(Outcome::Skipped { reason: "changing the system store needs root".into() });
    }
    match store.and_then(|store| super::uninstall(&store)) {
        Ok(true) => change(Outcome::Removed { name }),
        Ok(false) => change(Outcome::AlreadyAbsent { name }),
        Err(error) => change(failed(&error)),
    }
}

/// An NSS database to change, or to create.
#[derive(Debug)]
struct NssTarget {
    kind: NssKind,
    dir: PathBuf,
    account: Account,
    /// Missing, and to be created (a login account's `~/.pki/nssdb`).
    create: bool,
    /// Only a legacy `cert8.db` is there.
    legacy: bool,
}

/// The accounts whose homes are searched: every account owning its home
/// when we are root; otherwise only our own.
fn accounts(scope: &Scope) -> Result<Vec<Account>, CaError> {
    let euid = nix::unistd::geteuid().as_raw();
    let root = tools::is_root();
    let mut seen = BTreeSet::new();
    Ok(tools::read_passwd(&scope.passwd)?
        .into_iter()
        .filter(|a| (root || a.uid == euid) && a.owns_home())
        .filter(|a| seen.insert(a.home.clone()))
        .collect())
}

fn nss_targets(scope: &Scope) -> Result<Vec<NssTarget>, CaError> {
    let mut targets = Vec::new();
    let mut seen = BTreeSet::new();
    for account in accounts(scope)? {
        let mut dirs: Vec<(NssKind, PathBuf)> = Vec::new();
        if scope.wants(StoreKind::Nss) {
            dirs.extend(nss::chromium_dbs(&account.home).into_iter().map(|d| (NssKind::Nss, d)));
        }
        if scope.wants(StoreKind::Firefox) {
            for root in nss::firefox_profile_roots(&account.home) {
                let Ok(entries) = std::fs::read_dir(&root) else { continue };
                let mut profiles: Vec<PathBuf> =
                    entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect();
                profiles.sort();
                dirs.extend(profiles.into_iter().map(|p| (NssKind::Firefox, p)));
            }
        }
        for (kind, dir) in dirs {
            let format = nss::format_of(&dir);
            let is_default_db = kind == NssKind::Nss && dir == account.home.join(".pki/nssdb");
            let create = format == DbFormat::None && is_default_db && account.is_login();
            if format == DbFormat::None && !create {
                continue;
            }
            // The same database reached twice (a symlinked directory).
            if let Ok(resolved) = dir.canonicalize()
                && !seen.insert(resolved)
            {
                continue;
            }
            targets.push(NssTarget {
                kind,
                dir,
                account: account.clone(),
                create,
                legacy: format == DbFormat::LegacyOnly,
            });
        }
    }
    Ok(targets)
}

fn failed_users(scope: &Scope, error: &CaError) -> Change {
    let kind = if scope.wants(StoreKind::Nss) { StoreKind::Nss } else { StoreKind::Firefox };
    Change { kind, location: scope.passwd.clone(), outcome: failed(error) }
}

fn install_nss(
    ca: &CertificateAuthority,
    name: &str,
    certutil: Option<&Path>,
    target: NssTarget,
    manifest: &mut Manifest,
) -> Change {
    let change = |outcome| Change { kind: target.kind.into(), location: target.dir.clone(), outcome };
    if target.legacy {
        return change(Outcome::Skipped {
            reason: "only a legacy cert8.db; start this profile once with a current Firefox to upgrade it".into(),
        });
    }
    let Some(certutil) = certutil else {
        let error = format!("certutil not found: {}", nss::CERTUTIL_HINT);
        // A database to create is no store left untrusted; one that exists is.
        return change(if target.create { Outcome::Skipped { reason: error } } else { Outcome::Failed { error } });
    };
    let db = NssDb { certutil, dir: &target.dir, owner: &target.account };
    let mut created_dirs = Vec::new();
    let result = (|| {
        if target.create {
            created_dirs = create_db_dirs(&target.account, &target.dir)?;
            db.create()?;
        } else if db.contains(name, ca.cert_der())? {
            return Ok(false);
        }
        db.add(name, ca.cert_pem())?;
        Ok(true)
    })();
    let outcome = match result {
        Ok(added) => {
            manifest.record(Entry::Nss {
                kind: target.kind,
                db: target.dir.clone(),
                nickname: name.to_owned(),
                user: target.account.name.clone(),
                uid: target.account.uid,
                gid: target.account.gid,
                created_db: target.create,
                created_dirs: created_dirs.clone(),
            });
            match (added, target.create) {
                (true, true) => Outcome::CreatedAndAdded { name: name.to_owned() },
                (true, false) => Outcome::Added { name: name.to_owned() },
                (false, _) => Outcome::AlreadyPresent { name: name.to_owned() },
            }
        }
        Err(error) => {
            // Undo a half-made database: nothing of it is recorded.
            if target.create {
                remove_created_db(&target.account, &target.dir, &created_dirs);
            }
            failed(&error)
        }
    };
    change(outcome)
}

/// Creates the missing directories of `dir` below the home, as the account,
/// mode 0700 (as Chromium does). Returns those it created, outermost first.
fn create_db_dirs(account: &Account, dir: &Path) -> Result<Vec<PathBuf>, CaError> {
    let Ok(rel) = dir.strip_prefix(&account.home) else { return Ok(Vec::new()) };
    let mut created = Vec::new();
    let mut current = account.home.clone();
    for part in rel.components() {
        current.push(part);
        if std::fs::symlink_metadata(&current).is_ok() {
            continue;
        }
        let mut mkdir = account.command("mkdir");
        mkdir.args(["-m", "700", "--"]).arg(&current);
        tools::run(&mut mkdir, None)?;
        created.push(current.clone());
    }
    Ok(created)
}

/// Removes a database we created and the directories we made for it, as
/// its owner. Best effort: `rmdir` leaves a directory someone else used.
fn remove_created_db(account: &Account, dir: &Path, created_dirs: &[PathBuf]) {
    let mut rm = account.command("rm");
    rm.arg("-f").arg("--").args(nss::DB_FILES.map(|f| dir.join(f)));
    if let Err(error) = tools::run(&mut rm, None) {
        tracing::warn!(dir = %dir.display(), error = %error, "cannot remove the NSS database we created");
    }
    for created in created_dirs.iter().rev() {
        let mut rmdir = account.command("rmdir");
        rmdir.arg("--").arg(created);
        // Fails, on purpose, when something else lives there now.
        let _ = tools::output(&mut rmdir, None);
    }
}

fn uninstall_nss(entry: &Entry, certutil: Option<&Path>) -> Change {
    let Entry::Nss { kind, db, nickname, user, uid, gid, created_db, created_dirs } = entry else {
        return Change {
            kind: StoreKind::Nss,
            location: PathBuf::new(),
            outcome: Outcome::Failed { error: "not an NSS entry".into() },
        };
    };
    let change = |outcome| Change { kind: (*kind).into(), location: db.clone(), outcome };
    let name = nickname.clone();
    let account = Account { name: user.clone(), uid: *uid, gid: *gid, home: PathBuf::new(), shell: String::new() };
    if !tools::is_root() && *uid != nix::unistd::geteuid().as_raw() {
        return change(Outcome::Skipped { reason: format!("the database belongs to {user}; run as root") });
    }
    if nss::format_of(db) != DbFormat::Sql {
        return change(Outcome::AlreadyAbsent { name });
    }
    let Some(certutil) = certutil else {
        return change(Outcome::Failed { error: format!("certutil not found: {}", nss::CERTUTIL_HINT) });
    };
    let nss_db = NssDb { certutil, dir: db, owner: &account };
    let result = (|| {
        let removed = nss_db.delete(nickname)?;
        let emptied = *created_db && nss_db.is_empty()?;
        Ok::<_, CaError>((removed, emptied))
    })();
    match result {
        Ok((removed, emptied)) => {
            if emptied {
                remove_created_db(&account, db, created_dirs);
                change(Outcome::RemovedWithDatabase { name })
            } else if removed {
                change(Outcome::Removed { name })
            } else {
                change(Outcome::AlreadyAbsent { name })
            }
        }
        Err(error) => change(failed(&error)),
    }
}

fn java_homes(scope: &Scope) -> Vec<PathBuf> {
    scope.java_homes.clone().unwrap_or_else(java::default_java_homes)
}

fn install_java(ca: &CertificateAuthority, name: &str, keystore: &Keystore, manifest: &mut Manifest) -> Change {
    let change = |outcome| Change { kind: StoreKind::Java, location: keystore.path.clone(), outcome };
    if !java::writable(&keystore.path) {
        return change(Outcome::Skipped { reason: "not writable by this user; run as root".into() });
    }
    let certs = match keystore.certificates() {
        Ok(certs) => certs,
        Err(error) => return change(failed(&error)),
    };
    // Present under any alias (Debian's hook adds the system store's
    // anchors to its shared cacerts as `debian:<file>`): nothing to add.
    if let Some((alias, _)) = certs.iter().find(|(_, der)| der.as_ref() == ca.cert_der().as_ref()) {
        if alias == name {
            manifest.record(java_entry(keystore, name));
        }
        return change(Outcome::AlreadyPresent { name: alias.clone() });
    }
    match keystore.add(name, ca.cert_pem()) {
        Ok(()) => {
            manifest.record(java_entry(keystore, name));
            change(Outcome::Added { name: name.to_owned() })
        }
        Err(error) => change(failed(&error)),
    }
}

fn java_entry(keystore: &Keystore, alias: &str) -> Entry {
    Entry::Java { keystore: keystore.path.clone(), keytool: keystore.keytool.clone(), alias: alias.to_owned() }
}

fn uninstall_java(path: &Path, keytool: &Path, alias: &str) -> Change {
    let change = |outcome| Change { kind: StoreKind::Java, location: path.to_path_buf(), outcome };
    let name = alias.to_owned();
    if !path.is_file() {
        return change(Outcome::AlreadyAbsent { name });
    }
    if !java::writable(path) {
        return change(Outcome::Skipped { reason: "not writable by this user; run as root".into() });
    }
    let keytool = if keytool.is_file() { Some(keytool.to_path_buf()) } else { tools::find_program("keytool") };
    let Some(keytool) = keytool else {
        return change(Outcome::Failed { error: "keytool not found".into() });
    };
    match (Keystore { path: path.to_path_buf(), keytool }).delete(alias) {
        Ok(true) => change(Outcome::Removed { name }),
        Ok(false) => change(Outcome::AlreadyAbsent { name }),
        Err(error) => change(failed(&error)),
    }
}

fn failed(error: &CaError) -> Outcome {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    Outcome::Failed { error: text }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding stores needs no tool: a home tree with one of each.
    #[test]
    fn targets_are_found_in_homes_and_created_only_for_login_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let home = |name: &str| dir.path().join("home").join(name);
        for name in ["alice", "svc", "carol"] {
            std::fs::create_dir_all(home(name)).unwrap();
        }
        // alice: an existing Chromium db, a Firefox profile, a legacy profile.
        let nssdb = home("alice").join(".pki/nssdb");
        std::fs::create_dir_all(&nssdb).unwrap();
        std::fs::write(nssdb.join("cert9.db"), b"").unwrap();
        let profiles = home("alice").join(".mozilla/firefox");
        for (profile, file) in [("a.default-release", "cert9.db"), ("b.old", "cert8.db"), ("c.empty", "")] {
            std::fs::create_dir_all(profiles.join(profile)).unwrap();
            if !file.is_empty() {
                std::fs::write(profiles.join(profile).join(file), b"").unwrap();
            }
        }
        std::fs::write(profiles.join("profiles.ini"), b"").unwrap();
        let passwd = dir.path().join("passwd");
        let h = |name: &str| home(name).display().to_string();
        std::fs::write(
            &passwd,
            format!(
                "alice:x:{uid}:{gid}::{}:/bin/bash\nsvc:x:{uid}:{gid}::{}:/usr/sbin/nologin\n\
                 dup:x:{uid}:{gid}::{}:/bin/bash\nghost:x:{uid}:{gid}::{}/missing:/bin/bash\n",
                h("alice"),
                h("svc"),
                h("alice"),
                dir.path().display()
            ),
        )
        .unwrap();
        let scope =
            Scope { kinds: StoreKind::ALL.into_iter().collect(), passwd, java_homes: Some(Vec::new()), system: None };
        let targets = nss_targets(&scope).unwrap();
        let found: Vec<(NssKind, PathBuf, bool, bool)> =
            targets.iter().map(|t| (t.kind, t.dir.clone(), t.create, t.legacy)).collect();
        assert_eq!(
            found,
            [
                (NssKind::Nss, nssdb.clone(), false, false),
                (NssKind::Firefox, profiles.join("a.default-release"), false, false),
                (NssKind::Firefox, profiles.join("b.old"), false, true),
            ],
            "svc has no database and is a service account; dup shares alice's home"
        );

        // A login account with no database gets one created (when the uid is
        // in the login range; tests running as root use their own uid).
        let login =
            Account { name: "carol".into(), uid: 1000, gid: 1000, home: home("carol"), shell: "/bin/sh".into() };
        assert!(login.is_login());

        let only_firefox = Scope { kinds: [StoreKind::Firefox].into_iter().collect(), ..scope };
        assert!(nss_targets(&only_firefox).unwrap().iter().all(|t| t.kind == NssKind::Firefox));
    }

    #[test]
    fn report_lines_name_the_store_and_what_happened() {
        let line = Change {
            kind: StoreKind::Nss,
            location: "/home/alice/.pki/nssdb".into(),
            outcome: Outcome::Added { name: "interceptor-ca-0a".into() },
        };
        assert_eq!(line.to_string(), "nss      /home/alice/.pki/nssdb: added as interceptor-ca-0a");
        let report = Report {
            changes: vec![
                line,
                Change {
                    kind: StoreKind::Java,
                    location: "/x".into(),
                    outcome: Outcome::Failed { error: "boom".into() },
                },
            ],
            manifest: "/m".into(),
            system_bundle: None,
        };
        assert_eq!(report.failures(), 1);
        assert!(report.changed());
    }

    #[test]
    fn store_names_differ_per_ca_and_are_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = CertificateAuthority::load_or_create(&dir.path().join("a")).unwrap();
        let b = CertificateAuthority::load_or_create(&dir.path().join("b")).unwrap();
        let name = store_name(&a);
        assert!(name.starts_with("interceptor-ca-") && name.len() == "interceptor-ca-".len() + 16, "{name}");
        assert_ne!(name, store_name(&b));
        let again = CertificateAuthority::load_or_create(&dir.path().join("a")).unwrap();
        assert_eq!(store_name(&again), name);
    }
}
