//! `interceptor doctor`: checks this host and says plainly which redirect
//! modes will work here, and why not.

use std::process::Command;

use crate::{
    cgroup,
    config::RedirectMode,
    error,
    redirect::{ebpf, iptables},
};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

struct Check {
    ok: bool,
    what: String,
}

fn check(ok: bool, what: impl Into<String>) -> Check {
    Check { ok, what: what.into() }
}

/// Runs every check, prints the report, and returns whether `mode` works.
pub fn run(mode: RedirectMode) -> bool {
    let caps = effective_caps();
    let has = |cap: u32| caps.is_some_and(|c| c & (1u64 << cap) != 0);
    let mut ebpf_problems = Vec::new();
    let mut ipt_problems = Vec::new();
    let mut checks = Vec::new();

    let net_admin = has(CAP_NET_ADMIN);
    let bpf = has(CAP_BPF) || has(CAP_SYS_ADMIN);
    checks.push(check(
        net_admin,
        format!(
            "CAP_NET_ADMIN {}",
            if net_admin { "present" } else { "missing (needed for SO_MARK and for both redirect modes)" }
        ),
    ));
    checks.push(check(
        bpf,
        format!("CAP_BPF or CAP_SYS_ADMIN {}", if bpf { "present" } else { "missing (needed to load eBPF programs)" }),
    ));
    if !net_admin {
        ebpf_problems.push("CAP_NET_ADMIN missing".to_string());
        ipt_problems.push("CAP_NET_ADMIN missing".to_string());
    }
    if !bpf {
        ebpf_problems.push("CAP_BPF/CAP_SYS_ADMIN missing".to_string());
    }

    let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let kernel_ok = kernel_at_least(&release, 5, 7);
    checks.push(check(
        kernel_ok,
        format!("kernel {release} ({} 5.7 needed for cgroup BPF links)", if kernel_ok { ">=" } else { "<" }),
    ));
    if !kernel_ok {
        ebpf_problems.push(format!("kernel {release} is older than 5.7"));
    }

    match cgroup::cgroup2_root() {
        Ok(root) => checks.push(check(true, format!("cgroup v2 mounted at {}", root.display()))),
        Err(e) => {
            checks.push(check(false, error::chain(&e)));
            ebpf_problems.push("no cgroup v2 mount".to_string());
        }
    }
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    checks.push(check(
        btf,
        format!("kernel BTF {}", if btf { "present" } else { "absent (not required by our programs)" }),
    ));

    // Pinning is optional: without it there is no gapless handover and no
    // fail_mode = "closed" in eBPF mode.
    match crate::redirect::liveness::ensure_bpffs() {
        Ok(()) => checks.push(check(
            true,
            format!("bpffs at {} (gapless restarts, fail_mode = \"closed\")", crate::redirect::liveness::BPFFS),
        )),
        Err(why) => checks.push(check(
            false,
            format!("bpffs unavailable ({why}): no gapless restarts, fail_mode = \"closed\" refused in eBPF mode"),
        )),
    }

    if bpf {
        match ebpf::probe() {
            Ok(()) => checks.push(check(true, "eBPF programs load and pass the verifier")),
            Err(e) => {
                let why = shorten(&error::chain(&e));
                checks.push(check(false, format!("eBPF programs do not load: {why}")));
                ebpf_problems.push(format!("programs rejected: {why}"));
            }
        }
    }

    for family in [iptables::Family::V4, iptables::Family::V6] {
        let (tool, table_ok) = match family {
            iptables::Family::V4 => ("iptables", nat_usable("iptables")),
            iptables::Family::V6 => ("ip6tables", nat_usable("ip6tables")),
        };
        if !iptables::available(family) {
            checks.push(check(false, format!("{tool} not installed (apt-get install iptables)")));
            ipt_problems.push(format!("{tool} not installed"));
        } else if let Err(why) = table_ok {
            checks.push(check(false, format!("{tool} nat table not usable: {why}")));
            ipt_problems.push(format!("{tool} nat table not usable"));
        } else {
            checks.push(check(true, format!("{tool} nat table usable")));
        }
    }

    for c in &checks {
        println!("[{}] {}", if c.ok { " ok " } else { "FAIL" }, c.what);
    }
    println!("\nredirect modes on this host:");
    let verdict = |problems: &[String]| {
        if problems.is_empty() { "available".to_string() } else { format!("unavailable: {}", problems.join("; ")) }
    };
    println!("  ebpf      {}", verdict(&ebpf_problems));
    println!("  iptables  {}", verdict(&ipt_problems));
    println!("  none      available (something else must send connections to the proxy)");
    let ok = match mode {
        RedirectMode::Ebpf => ebpf_problems.is_empty(),
        RedirectMode::Iptables => ipt_problems.is_empty(),
        RedirectMode::None => true,
    };
    println!("\nconfigured mode {}: {}", mode.as_str(), if ok { "will work" } else { "will NOT work" });
    ok
}

/// Verifier logs run to hundreds of lines: keep the first line and the last
/// few, which say what was rejected.
fn shorten(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 6 {
        return text.to_string();
    }
    format!("{} [...] {}", lines[0], lines[lines.len() - 4..].join(" | "))
}

fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    let maj: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let min: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (maj, min) >= (major, minor)
}

fn nat_usable(tool: &str) -> Result<(), String> {
    match Command::new(tool).args(["-w", "-t", "nat", "-S", "OUTPUT"]).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_verifier_logs_are_shortened() {
        let log = (0..100).map(|i| format!("line {i}")).collect::<Vec<_>>().join("\n");
        assert_eq!(shorten(&log), "line 0 [...] line 96 | line 97 | line 98 | line 99");
        assert_eq!(shorten("short"), "short");
    }

    #[test]
    fn kernel_versions_compare_numerically() {
        assert!(kernel_at_least("6.18.44-fc-v669", 5, 7));
        assert!(kernel_at_least("5.10.0", 5, 7));
        assert!(!kernel_at_least("5.4.0-150-generic", 5, 7));
        assert!(!kernel_at_least("garbage", 5, 7));
    }
}
