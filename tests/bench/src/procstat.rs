//! CPU time and resident memory of processes, from `/proc`.

use std::path::Path;

use anyhow::{Context, Result};

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("read /proc/{pid}/stat"))?;
    let ticks = parse_stat_ticks(&text).with_context(|| format!("parse /proc/{pid}/stat"))?;
    Ok(ticks as f64 / clock_ticks())
}

/// Summed CPU seconds of every process in a cgroup (not its children):
/// the proxy under test may be several processes (nginx's workers).
pub fn cgroup_cpu_seconds(cgroup: &Path) -> Result<f64> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))?;
    // A process that exits meanwhile just stops counting.
    Ok(procs.split_whitespace().filter_map(|p| p.parse().ok()).filter_map(|pid| cpu_seconds(pid).ok()).sum())
}

/// CPU time of everything in a cgroup's subtree so far, in seconds, from its
/// `cpu.stat` (microsecond resolution; present without any controller):
/// for short measurements, where 10 ms clock ticks are too coarse.
pub fn cgroup_usage_seconds(cgroup: &Path) -> Result<f64> {
    let text = std::fs::read_to_string(cgroup.join("cpu.stat"))?;
    let usec: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .context("no usage_usec in cpu.stat")?;
    Ok(usec as f64 / 1e6)
}

/// CPU time the whole machine spent busy so far (all CPUs), in seconds,
/// from the first line of `/proc/stat`.
pub fn machine_busy_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let ticks = parse_busy_ticks(&text).context("parse /proc/stat")?;
    Ok(ticks as f64 / clock_ticks())
}

/// user + nice + system + irq + softirq + steal of the `cpu` line.
pub fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    Some(v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7).copied().unwrap_or(0))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Fields 14 and 15 (utime, stime) of a `/proc/<pid>/stat` line. The command
/// name (field 2) may contain spaces and parentheses: count from the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_kb(&text, "VmRSS:").map(|kb| kb * 1024).context("no VmRSS line")
}

pub fn parse_status_kb(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// A CPU set holding `cpus`.
fn cpu_set(cpus: &[usize]) -> Result<nix::sched::CpuSet> {
    let mut set = nix::sched::CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)?;
    }
    Ok(set)
}

/// Pins every thread of `pid` to `cpus` (threads created later inherit it
/// from their creator).
pub fn pin(pid: u32, cpus: &[usize]) -> Result<()> {
    let set = cpu_set(cpus)?;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        // A thread that exited meanwhile is fine.
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
    }
    Ok(())
}

/// Runs `f` with the calling thread pinned to `cpus`, then restores its
/// affinity: a process spawned meanwhile starts pinned, so runtimes that size
/// their thread pools from the affinity mask (tokio does) see those CPUs.
pub fn with_cpus<T>(cpus: &[usize], f: impl FnOnce() -> T) -> Result<T> {
    let me = nix::unistd::Pid::from_raw(0);
    let saved = nix::sched::sched_getaffinity(me)?;
    nix::sched::sched_setaffinity(me, &cpu_set(cpus)?)?;
    let out = f();
    nix::sched::sched_setaffinity(me, &saved)?;
    Ok(out)
}

/// Pins every process in a cgroup to `cpus`.
pub fn pin_cgroup(cgroup: &Path, cpus: &[usize]) -> Result<()> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))?;
    for pid in procs.split_whitespace().filter_map(|p| p.parse().ok()) {
        pin(pid, cpus)?;
    }
    Ok(())
}

/// Context switches (voluntary and not) of every thread of every process in
/// a cgroup so far. A thread that exits takes its count with it.
pub fn cgroup_context_switches(cgroup: &Path) -> Result<u64> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))?;
    let mut total = 0;
    for pid in procs.split_whitespace() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            total += parse_context_switches(&status).unwrap_or(0);
        }
    }
    Ok(total)
}

/// Write system calls (`syscw` of `/proc/<pid>/io`: write(2), writev(2)
/// and the like, on sockets, pipes and files alike) of every process in a
/// cgroup so far: what the proxy relays, plus its log and audit writes and
/// its wake-ups of other threads.
pub fn cgroup_write_syscalls(cgroup: &Path) -> Result<u64> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))?;
    let io = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/io")).ok();
    Ok(procs.split_whitespace().filter_map(io).filter_map(|text| parse_write_syscalls(&text)).sum())
}

/// The `syscw` field of a `/proc/<pid>/io`.
pub fn parse_write_syscalls(io: &str) -> Option<u64> {
    io.lines().find_map(|l| l.strip_prefix("syscw:")).and_then(|v| v.trim().parse().ok())
}

/// `voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of a
/// `/proc/<pid>/task/<tid>/status`.
pub fn parse_context_switches(status: &str) -> Option<u64> {
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok());
    Some(field("voluntary_ctxt_switches:")? + field("nonvoluntary_ctxt_switches:")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_skip_odd_command_names() {
        let line = "1234 (tokio (rt) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat_ticks(line), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn own_cpu_time_grows_with_work() {
        let before = cpu_seconds(std::process::id()).expect("stat");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(std::process::id()).expect("stat") > before);
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 9000 40 3 2 1 0 0\ncpu0 50 2 25 4500 20 1 1 0 0 0\n";
        assert_eq!(parse_busy_ticks(stat), Some(100 + 5 + 50 + 3 + 2 + 1));
        assert!(machine_busy_seconds().expect("/proc/stat") > 0.0);
    }

    #[test]
    fn write_syscalls_from_the_io_file() {
        let io = "rchar: 10\nwchar: 20\nsyscr: 3\nsyscw: 42\nread_bytes: 0\n";
        assert_eq!(parse_write_syscalls(io), Some(42));
        assert_eq!(parse_write_syscalls("rchar: 10\n"), None);
    }

    #[test]
    fn context_switches_of_both_kinds() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_context_switches(status), Some(127));
        assert_eq!(parse_context_switches("Name:\tx\n"), None);
    }

    #[test]
    fn status_fields_in_kb() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_status_kb(status, "VmRSS:"), Some(1024));
        assert!(rss_bytes(std::process::id()).expect("rss") > 0);
    }
}
