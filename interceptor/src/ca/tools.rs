//! Running the trust stores' own tools (`certutil`, `keytool`, `mkdir`, `rm`)
//! and the accounts whose homes hold per-user stores.
//!
//! Every change inside a user's home runs as that user (uid, gid, no
//! supplementary groups), so files keep their owner and a symlink planted in
//! a home can never make a root process write outside it. Tools run with a
//! cleared environment (`PATH` and `LC_ALL=C` only), so their output is not
//! localised and nothing in our environment steers them.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::CaError;

/// How much of a failed command's stderr an error repeats.
const MAX_STDERR_LEN: usize = 2000;
/// Where programs are looked for after `PATH` (a root `PATH` may lack them).
const FALLBACK_DIRS: [&str; 4] = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"];
/// The first uid of a person's account (`UID_MIN` in Debian's and Fedora's
/// `login.defs`); below are system accounts.
const FIRST_LOGIN_UID: u32 = 1000;
/// `nobody` on Linux.
const NOBODY_UID: u32 = 65534;

/// A local account, as `/etc/passwd` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
}

impl Account {
    /// A person's account rather than a service's: a uid in the login
    /// range and a shell one can log in with.
    pub fn is_login(&self) -> bool {
        let no_login = ["nologin", "false"].iter().any(|s| self.shell.ends_with(s));
        (FIRST_LOGIN_UID..NOBODY_UID).contains(&self.uid) && !self.shell.is_empty() && !no_login
    }

    /// Whether the home is a directory this account owns: the only homes
    /// whose stores are changed (a shared or root-owned "home" such as
    /// `/nonexistent` or `/var/lib/x` is not a person's).
    pub fn owns_home(&self) -> bool {
        self.home.is_absolute()
            && self.home != Path::new("/")
            && fs::symlink_metadata(&self.home).is_ok_and(|m| m.is_dir() && m.uid() == self.uid)
    }

    /// A command that runs as this account: when we are root and the account
    /// is another, with its uid and gid and no supplementary groups (the
    /// standard library drops them when it sets the uid).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = clean_command(program);
        if nix::unistd::geteuid().as_raw() != self.uid {
            cmd.uid(self.uid).gid(self.gid);
        }
        cmd.current_dir("/");
        cmd
    }
}

/// Reads accounts from a `passwd(5)` file. Malformed lines (and NIS `+`
/// lines) are skipped: one bad line must not hide every other user.
pub fn read_passwd(path: &Path) -> Result<Vec<Account>, CaError> {
    let text = fs::read_to_string(path).map_err(|source| CaError::Read { path: path.to_path_buf(), source })?;
    Ok(text.lines().filter_map(parse_passwd_line).collect())
}

fn parse_passwd_line(line: &str) -> Option<Account> {
    if line.starts_with('#') || line.starts_with('+') || line.starts_with('-') {
        return None;
    }
    let fields: Vec<&str> = line.split(':').collect();
    let [name, _password, uid, gid, _gecos, home, shell] = fields.as_slice() else {
        return None;
    };
    if name.is_empty() || home.is_empty() {
        return None;
    }
    Some(Account {
        name: (*name).to_owned(),
        uid: uid.parse().ok()?,
        gid: gid.parse().ok()?,
        home: PathBuf::from(home),
        shell: (*shell).to_owned(),
    })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A program on `PATH`, else in the usual system directories.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(FALLBACK_DIRS.map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A command with a cleared environment: our `PATH` (with the system
/// directories added) and the C locale.
pub fn clean_command(program: impl AsRef<OsStr>) -> Command {
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    dirs.extend(FALLBACK_DIRS.map(PathBuf::from));
    let mut cmd = Command::new(program);
    cmd.env_clear().env("LC_ALL", "C").env("LANG", "C");
    if let Ok(path) = std::env::join_paths(dirs) {
        cmd.env("PATH", path);
    }
    cmd
}

/// Runs `cmd` to completion, feeding it `stdin`; its output whatever the
/// exit status (the caller reads the status: some tools exit non-zero for
/// "not found").
pub fn output(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Output, CaError> {
    let command = display(cmd);
    let spawn_err = |source: io::Error| CaError::Spawn { command: command.clone(), source };
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes the pipe; its status says why.
        if let Err(e) = pipe.write_all(bytes)
            && e.kind() != io::ErrorKind::BrokenPipe
        {
            return Err(spawn_err(e));
        }
    }
    child.wait_with_output().map_err(spawn_err)
}

/// Runs `cmd` and fails unless it exits 0.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Output, CaError> {
    let out = output(cmd, stdin)?;
    if out.status.success() {
        return Ok(out);
    }
    Err(failure(cmd, &out))
}

/// The error for a command that exited non-zero.
pub fn failure(cmd: &Command, out: &Output) -> CaError {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // keytool reports its errors on stdout.
    let text = if stderr.trim().is_empty() { stdout } else { stderr };
    CaError::UpdateCommand {
        command: display(cmd),
        status: out.status,
        stderr: text.trim().chars().take(MAX_STDERR_LEN).collect(),
    }
}

/// The command line, for messages. Never holds a secret: the only password
/// passed is the JVM's public default.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_parse_and_bad_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        fs::write(
            &path,
            "root:x:0:0:root:/root:/bin/bash\n\
             # comment\n\
             daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
             broken line\n\
             +nis\n\
             alice:x:1000:1000:Alice,,,:/home/alice:/bin/zsh\n\
             bad:x:notanumber:1:x:/home/bad:/bin/sh\n\
             svc:x:1001:1001::/var/lib/svc:/bin/false\n",
        )
        .unwrap();
        let accounts = read_passwd(&path).unwrap();
        let names: Vec<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["root", "daemon", "alice", "svc"]);
        let alice = &accounts[2];
        assert_eq!((alice.uid, alice.gid, alice.home.as_path()), (1000, 1000, Path::new("/home/alice")));
        let login: Vec<&str> = accounts.iter().filter(|a| a.is_login()).map(|a| a.name.as_str()).collect();
        assert_eq!(login, ["alice"]);
        assert!(matches!(read_passwd(&dir.path().join("missing")), Err(CaError::Read { .. })));
    }

    #[test]
    fn only_an_owned_directory_is_a_home() {
        let dir = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let account = |home: PathBuf, uid| Account { name: "u".into(), uid, gid: 0, home, shell: "/bin/sh".into() };
        assert!(account(dir.path().to_path_buf(), uid).owns_home());
        assert!(!account(dir.path().to_path_buf(), uid.wrapping_add(1)).owns_home());
        assert!(!account(dir.path().join("missing"), uid).owns_home());
        assert!(!account(PathBuf::from("/"), 0).owns_home());
        assert!(!account(PathBuf::from("relative"), uid).owns_home());
        std::os::unix::fs::symlink(dir.path(), dir.path().join("link")).unwrap();
        assert!(!account(dir.path().join("link"), uid).owns_home(), "a symlinked home is not followed");
    }

    #[test]
    fn failures_carry_the_tool_output() {
        let mut cmd = clean_command("sh");
        cmd.args(["-c", "echo out; exit 4"]);
        let out = output(&mut cmd, None).unwrap();
        let err = failure(&cmd, &out);
        assert!(matches!(&err, CaError::UpdateCommand { stderr, .. } if stderr == "out"), "{err}");
        let mut cat = clean_command("cat");
        assert_eq!(run(&mut cat, Some(b"piped")).unwrap().stdout, b"piped");
        let mut env = clean_command("env");
        let text = String::from_utf8(run(&mut env, None).unwrap().stdout).unwrap();
        assert!(text.lines().any(|l| l == "LC_ALL=C"), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("HOME=")), "{text}");
    }
}
