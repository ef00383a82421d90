//! Finding cgroup v2 paths: the cgroup2 mount and this process's own cgroup.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup2 file system is mounted (see /proc/self/mounts); eBPF redirect needs cgroup v2")]
    NoCgroup2,
    #[error("this process has no cgroup v2 membership in /proc/self/cgroup")]
    NoMembership,
    #[error("{path} is not a directory under the cgroup2 mount {root}")]
    NotACgroup { path: PathBuf, root: PathBuf },
}

/// The cgroup2 mount point, from `/proc/self/mounts`. Hybrid hosts mount it
/// at `/sys/fs/cgroup/unified`, unified ones at `/sys/fs/cgroup`.
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|source| CgroupError::Read { path: "/proc/self/mounts", source })?;
    parse_cgroup2_root(&mounts).ok_or(CgroupError::NoCgroup2)
}

fn parse_cgroup2_root(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/self/mounts escapes spaces and a few other bytes as octal.
fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// This process's cgroup v2 directory.
pub fn own_cgroup(root: &Path) -> Result<PathBuf, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|source| CgroupError::Read { path: "/proc/self/cgroup", source })?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::")).ok_or(CgroupError::NoMembership)?;
    let rel = rel.trim().trim_matches('/');
    Ok(if rel.is_empty() { root.to_path_buf() } else { root.join(rel) })
}

/// Checks that `path` is a directory inside the cgroup2 mount.
pub fn check_cgroup_dir(path: &Path, root: &Path) -> Result<(), CgroupError> {
    if path.starts_with(root) && path.join("cgroup.procs").exists() {
        Ok(())
    } else {
        Err(CgroupError::NotACgroup { path: path.to_path_buf(), root: root.to_path_buf() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(parse_cgroup2_root(mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_cgroup2_root("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_octal_mount_paths() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
    }
}
