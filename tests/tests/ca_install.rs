//! `interceptor ca install` and `ca uninstall` on every kind of trust store,
//! checked with each store's own tool (`certutil -L`, `keytool -list`), and a
//! headless Chromium that reads the NSS database fetching an AI API through
//! the interceptor: a certificate error before the install, the provider's
//! answer after it, an error again after the uninstall.
//!
//! Privileged (root): the stores live in a throwaway tree of homes owned by
//! made-up uids, and the interceptor switches to each owner to change them.
//! Nothing of the machine's own stores is touched: the system store is a
//! stand-in directory, accounts come from a test `passwd` file, and the JDK
//! is a copy. Needs certutil, keytool and chromium (`cargo xtask setup`).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use interceptor::ca::{self, CertificateAuthority, Outcome, Scope, StoreKind, TrustStore};
use interceptor::policy::DomainsConfig;
use interceptor::testing::provider::{FakeProvider, TestPki};
use interceptor::testing::{interceptor_bin, require_tools, skip, tool};
use interceptor_tests::inprocess::InProcessProxy;

const ALICE: u32 = 4242;
const BOB: u32 = 4343;
const SERVICE: u32 = 998;
/// The page Chromium loads: the fake provider answers it with a JSON error
/// (which Chromium shows as text) naming the route.
const URL: &str = "https://api.openai.com/v1/models";
const BODY_MARKER: &str = "no route for GET /v1/models";
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

fn require_root_and_tools(test_name: &str, programs: &[&str]) -> bool {
    if !nix::unistd::geteuid().is_root() {
        return skip(test_name, "needs root (the stores belong to other users)");
    }
    require_tools(test_name, programs)
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn stdout(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(cmd)?.stdout).into_owned())
}

/// `certutil -L`: the database's certificates and their trust flags.
fn nss_listing(db: &Path) -> Result<String> {
    stdout(Command::new(tool("certutil")).arg("-L").arg("-d").arg(format!("sql:{}", db.display())))
}

fn nss_create(db: &Path) -> Result<()> {
    fs::create_dir_all(db)?;
    run(Command::new(tool("certutil")).arg("-N").arg("--empty-password").arg("-d").arg(format!("sql:{}", db.display())))
        .map(drop)
}

/// `keytool -list`: aliases and fingerprints.
fn keystore_listing(path: &Path) -> Result<String> {
    stdout(Command::new(tool("keytool")).args(["-list", "-storepass", "changeit", "-keystore"]).arg(path))
}

fn chown_tree(path: &Path, uid: u32) -> Result<()> {
    run(Command::new("chown").arg("-R").arg(format!("{uid}:{uid}")).arg(path)).map(drop)
}

/// Every file and directory under `dir` (itself included) with its owner.
fn owners(dir: &Path) -> Result<Vec<(PathBuf, u32)>> {
    let mut out = vec![(dir.to_path_buf(), fs::symlink_metadata(dir)?.uid())];
    if dir.is_dir() {
        for entry in fs::read_dir(dir)? {
            out.extend(owners(&entry?.path())?);
        }
    }
    Ok(out)
}

/// A tree of homes: alice (an NSS database holding someone else's CA, a
/// Firefox profile), bob (a login account with no database yet), a service
/// account (nothing); a JDK whose cacerts trusts one other CA; a stand-in
/// system store.
struct Machine {
    dir: tempfile::TempDir,
    scope: Scope,
}

impl Machine {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Other users must reach their homes through it.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let root = dir.path();
        let other_ca = TestPki::with_defaults()?;
        let other_pem = other_ca.write_ca(root)?;

        let alice = root.join("home/alice");
        nss_create(&alice.join(".pki/nssdb"))?;
        run(Command::new(tool("certutil"))
            .args(["-A", "-t", "C,,", "-n", "someone-else", "-a", "-i"])
            .arg(&other_pem)
            .arg("-d")
            .arg(format!("sql:{}", alice.join(".pki/nssdb").display())))?;
        nss_create(&alice.join(".mozilla/firefox/abcd.default-release"))?;
        chown_tree(&alice, ALICE)?;
        let bob = root.join("home/bob");
        fs::create_dir_all(bob.join(".config/Code"))?;
        chown_tree(&bob, BOB)?;
        let service = root.join("home/service");
        fs::create_dir_all(&service)?;
        chown_tree(&service, SERVICE)?;
        fs::set_permissions(root.join("home"), fs::Permissions::from_mode(0o755))?;
        let passwd = root.join("passwd");
        fs::write(
            &passwd,
            format!(
                "alice:x:{ALICE}:{ALICE}::{}:/bin/bash\nbob:x:{BOB}:{BOB}::{}:/bin/bash\nservice:x:{SERVICE}:{SERVICE}::{}:/usr/sbin/nologin\n",
                alice.display(),
                bob.display(),
                service.display()
            ),
        )?;

        let jdk = root.join("jdk");
        fs::create_dir_all(jdk.join("lib/security"))?;
        run(Command::new(tool("keytool"))
            .args(["-importcert", "-noprompt", "-storetype", "PKCS12", "-storepass", "changeit"])
            .args(["-alias", "other-root", "-file"])
            .arg(&other_pem)
            .arg("-keystore")
            .arg(jdk.join("lib/security/cacerts")))?;

        // Stands in for update-ca-certificates: concatenates the anchors.
        let anchors = root.join("anchors");
        let bundle = root.join("bundle.crt");
        let script =
            format!("cat {}/*.crt > {} 2>/dev/null || : > {}", anchors.display(), bundle.display(), bundle.display());
        let system = TrustStore {
            anchor: anchors.join("interceptor-ca.crt"),
            update_command: vec!["sh".into(), "-c".into(), script],
            bundle,
        };
        let scope = Scope {
            kinds: StoreKind::ALL.into_iter().collect(),
            passwd,
            java_homes: Some(vec![jdk]),
            system: Some(system),
        };
        Ok(Self { dir, scope })
    }

    fn home(&self, name: &str) -> PathBuf {
        self.dir.path().join("home").join(name)
    }

    fn alice_db(&self) -> PathBuf {
        self.home("alice").join(".pki/nssdb")
    }

    fn firefox_profile(&self) -> PathBuf {
        self.home("alice").join(".mozilla/firefox/abcd.default-release")
    }

    fn bob_db(&self) -> PathBuf {
        self.home("bob").join(".pki/nssdb")
    }

    fn keystore(&self) -> PathBuf {
        self.dir.path().join("jdk/lib/security/cacerts")
    }

    /// What each store holds, as its own tool lists it.
    fn listings(&self) -> Result<Vec<String>> {
        Ok(vec![
            nss_listing(&self.alice_db())?,
            nss_listing(&self.firefox_profile())?,
            keystore_listing(&self.keystore())?,
        ])
    }
}

fn outcome_of(report: &ca::Report, location: &Path) -> Option<Outcome> {
    report.changes.iter().find(|c| c.location == location).map(|c| c.outcome.clone())
}

#[test]
fn ca_install_reaches_every_store_and_uninstall_reverts_exactly_that() -> Result<()> {
    const NAME: &str = "ca_install_reaches_every_store_and_uninstall_reverts_exactly_that";
    if !require_root_and_tools(NAME, &["certutil", "keytool"]) {
        return Ok(());
    }
    let machine = Machine::new()?;
    let state = tempfile::tempdir()?;
    let ca = CertificateAuthority::load_or_create(state.path())?;
    let name = ca::store_name(&ca);
    let before = machine.listings()?;
    let alice_owners = owners(&machine.alice_db())?;

    let report = ca::install_all(&ca, state.path(), &machine.scope)?;
    let lines: Vec<String> = report.changes.iter().map(ToString::to_string).collect();
    assert_eq!(report.failures(), 0, "{lines:#?}");
    assert_eq!(
        report.changes.len(),
        5,
        "system, alice's NSS db and Firefox profile, bob's new db, the JDK: {lines:#?}"
    );
    let added = Some(Outcome::Added { name: name.clone() });
    assert_eq!(outcome_of(&report, &machine.alice_db()), added);
    assert_eq!(outcome_of(&report, &machine.firefox_profile()), added);
    assert_eq!(outcome_of(&report, &machine.bob_db()), Some(Outcome::CreatedAndAdded { name: name.clone() }));
    assert_eq!(outcome_of(&report, &machine.keystore().canonicalize()?), added);
    let system = machine.scope.system.clone().context("system store")?;
    assert!(matches!(outcome_of(&report, &system.anchor), Some(Outcome::Added { .. })));

    // Each store, read with its own tool, trusts our CA for TLS servers.
    for db in [machine.alice_db(), machine.firefox_profile(), machine.bob_db()] {
        let listing = nss_listing(&db)?;
        let line = listing.lines().find(|l| l.starts_with(&name)).with_context(|| format!("{db:?}: {listing}"))?;
        assert!(line.trim_end().ends_with("C,,"), "{line}");
    }
    assert!(nss_listing(&machine.alice_db())?.contains("someone-else"));
    let keystore = keystore_listing(&machine.keystore())?;
    assert!(keystore.contains(&format!("{name}, ")), "{keystore}");
    assert_eq!(fs::read_to_string(&system.anchor)?, ca.cert_pem());
    assert!(fs::read_to_string(&system.bundle)?.contains(ca.cert_pem().trim()));

    // Files keep their owners; what was created belongs to the account.
    assert_eq!(
        owners(&machine.alice_db())?.iter().map(|(_, uid)| *uid).collect::<Vec<_>>(),
        alice_owners.iter().map(|(_, uid)| *uid).collect::<Vec<_>>()
    );
    let created = owners(&machine.home("bob").join(".pki"))?;
    assert!(created.len() >= 5 && created.iter().all(|(_, uid)| *uid == BOB), "{created:?}");
    assert_eq!(fs::metadata(machine.bob_db())?.permissions().mode() & 0o777, 0o700);
    assert!(!machine.home("service").join(".pki").exists(), "no database is created for a service account");

    // Idempotent: a second install changes nothing and records nothing new.
    let manifest = fs::read(state.path().join(ca::MANIFEST_FILE))?;
    let again = ca::install_all(&ca, state.path(), &machine.scope)?;
    assert!(!again.changed() && again.failures() == 0, "{:#?}", again.changes);
    assert!(again.changes.iter().all(|c| matches!(c.outcome, Outcome::AlreadyPresent { .. })), "{:#?}", again.changes);
    assert_eq!(fs::read(state.path().join(ca::MANIFEST_FILE))?, manifest);

    // Uninstall removes exactly what was added: the other CAs stay, the
    // database made for bob goes, the manifest goes.
    let removed = ca::uninstall_all(state.path(), &machine.scope)?;
    assert_eq!(removed.failures(), 0, "{:#?}", removed.changes);
    assert_eq!(outcome_of(&removed, &machine.bob_db()), Some(Outcome::RemovedWithDatabase { name: name.clone() }));
    assert_eq!(outcome_of(&removed, &machine.alice_db()), Some(Outcome::Removed { name: name.clone() }));
    assert_eq!(machine.listings()?, before);
    assert!(nss_listing(&machine.alice_db())?.contains("someone-else"));
    assert!(keystore_listing(&machine.keystore())?.contains("other-root, "));
    assert!(!machine.home("bob").join(".pki").exists());
    assert!(machine.home("bob").join(".config/Code").is_dir());
    assert!(!system.anchor.exists());
    assert!(!fs::read_to_string(&system.bundle)?.contains(ca.cert_pem().trim()));
    assert!(!state.path().join(ca::MANIFEST_FILE).exists());

    // And a second uninstall has nothing left to do.
    let twice = ca::uninstall_all(state.path(), &machine.scope)?;
    assert!(!twice.changed() && twice.failures() == 0, "{:#?}", twice.changes);
    Ok(())
}

/// Runs headless Chromium as root with `home` as `$HOME` (so it reads
/// `home/.pki/nssdb`), resolving api.openai.com to `proxy`, and returns the
/// DOM it dumped for `url` and its stderr.
fn chromium_dump(home: &Path, proxy: std::net::SocketAddr, url: &str) -> Result<(String, String)> {
    let profile = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let (stdout_path, stderr_path) = (out.path().join("dom"), out.path().join("stderr"));
    let mut child = Command::new(tool("chromium"))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--host-resolver-rules=MAP api.openai.com {proxy}"))
        .arg("--dump-dom")
        .arg(url)
        // Only what Chromium needs: the test process's environment (cargo's
        // LD_LIBRARY_PATH, proxy and certificate variables) must not steer it.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path)?)
        .stderr(fs::File::create(&stderr_path)?)
        .spawn()
        .context("start chromium")?;
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "chromium did not finish within {CHROMIUM_TIMEOUT:?}: {}",
                relevant(&fs::read_to_string(&stderr_path)?)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((fs::read_to_string(&stdout_path)?, relevant(&fs::read_to_string(&stderr_path)?)))
}

/// Chromium's log without the noise of a machine with no D-Bus and no GPU.
fn relevant(log: &str) -> String {
    log.lines()
        .filter(|l| !["dbus", "D-Bus", "vaapi", "sandbox_linux", "bluez"].iter().any(|noise| l.contains(noise)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn interceptor_ca(args: &[&str], state: &Path, passwd: &Path) -> Result<String> {
    let out = Command::new(interceptor_bin())
        .arg("ca")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .args(["--stores", "nss", "--passwd"])
        .arg(passwd)
        .output()
        .context("run interceptor ca")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "interceptor ca {args:?} failed ({}): {text}", out.status);
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_trusts_the_interceptor_after_ca_install_and_not_after_uninstall() -> Result<()> {
    const NAME: &str = "chromium_trusts_the_interceptor_after_ca_install_and_not_after_uninstall";
    if !require_root_and_tools(NAME, &["certutil", "chromium"]) {
        return Ok(());
    }
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let proxy = InProcessProxy::start(provider.local_addr(), &upstream_ca, DomainsConfig::default(), None).await?;
    let state = proxy.ca_path.parent().context("state dir")?.to_path_buf();

    // A user (root, as Chromium runs here) whose NSS database Chromium made.
    let home = dir.path().join("home");
    nss_create(&home.join(".pki/nssdb"))?;
    let passwd = dir.path().join("passwd");
    fs::write(&passwd, format!("tester:x:0:0::{}:/bin/bash\n", home.display()))?;
    let fetch = {
        let home = home.clone();
        let addr = proxy.addr;
        move || {
            let home = home.clone();
            tokio::task::spawn_blocking(move || chromium_dump(&home, addr, URL))
        }
    };
    let requests_for_page =
        |provider: &FakeProvider| provider.requests().iter().filter(|r| r.path == "/v1/models").count();

    // Not installed: a certificate error, and the provider never asked.
    let (dom, stderr) = fetch().await??;
    assert!(!dom.contains(BODY_MARKER), "loaded without our CA installed: {dom}");
    assert!(stderr.contains("CERT_AUTHORITY_INVALID") || stderr.contains("-202"), "no certificate error: {stderr}");
    assert_eq!(requests_for_page(&provider), 0);

    let installed = interceptor_ca(&["install"], &state, &passwd)?;
    let db = home.join(".pki/nssdb");
    assert!(installed.contains(&format!("nss      {}: added as interceptor-ca-", db.display())), "{installed}");
    let (dom, stderr) = fetch().await??;
    assert!(dom.contains(BODY_MARKER), "page did not load through the interceptor: {dom}\n{stderr}");
    assert_eq!(requests_for_page(&provider), 1, "the provider answered through the interceptor");
    let seen = provider.requests().into_iter().find(|r| r.path == "/v1/models").context("request")?;
    assert_eq!(seen.sni.as_deref(), Some("api.openai.com"));

    let removed = interceptor_ca(&["uninstall"], &state, &passwd)?;
    assert!(removed.contains(&format!("nss      {}: removed interceptor-ca-", db.display())), "{removed}");
    let (dom, _) = fetch().await??;
    assert!(!dom.contains(BODY_MARKER), "still trusted after uninstall: {dom}");
    assert_eq!(requests_for_page(&provider), 1);
    Ok(())
}
