//! File helpers for the CA: atomic writes with a fixed mode, PEM encoding,
//! and wiping buffers that held key material.

use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::CaError;

/// Writes `bytes` to `path` through a temporary file in the same directory
/// and a rename, so readers see either the old or the new content.
///
/// The temporary file is created with `mode` (never wider, whatever the
/// umask), so a key written with 0600 is never readable by others, not even
/// briefly.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = temp_path(path);
    let result = write_new(&tmp, bytes, mode)
        .and_then(|()| fs::rename(&tmp, path).map_err(|source| CaError::Write { path: path.to_path_buf(), source }));
    if result.is_err() {
        // Best effort: do not leave a half-written file behind.
        let _ignored = fs::remove_file(&tmp);
    }
    result
}

fn write_new(tmp: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let write_err = |source: io::Error| CaError::Write { path: tmp.to_path_buf(), source };
    // A leftover from a crash; creating with `create_new` below must not
    // follow whatever is there.
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(write_err(e)),
    }
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(tmp).map_err(write_err)?;
    // The umask may have narrowed the mode (a 0644 certificate must stay
    // readable by every user); it can never have widened it.
    file.set_permissions(Permissions::from_mode(mode)).map_err(write_err)?;
    file.write_all(bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Flushes a directory entry change (create, rename) to disk. Best effort:
/// some filesystems do not support syncing directories.
pub(super) fn sync_dir(dir: &Path) {
    if let Err(error) = fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), %error, "cannot sync directory");
    }
}

/// Overwrites a buffer that held key material before it is freed.
pub(crate) fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    // Keeps the compiler from treating the fill as a dead store.
    std::hint::black_box(buf);
}

/// Encodes DER as a PEM block with 64-column lines.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let bytes = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.extend(line.iter().map(|&b| char::from(b)));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encode_matches_known_vectors() {
        assert_eq!(pem_encode("X", b""), "-----BEGIN X-----\n-----END X-----\n");
        assert_eq!(pem_encode("X", b"foobar"), "-----BEGIN X-----\nZm9vYmFy\n-----END X-----\n");
        assert_eq!(pem_encode("X", b"fooba"), "-----BEGIN X-----\nZm9vYmE=\n-----END X-----\n");
        assert_eq!(pem_encode("X", b"foob"), "-----BEGIN X-----\nZm9vYg==\n-----END X-----\n");
        let long = pem_encode("X", &[0u8; 60]);
        let lines: Vec<&str> = long.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines[2].len(), 16);
    }

    #[test]
    fn write_atomic_sets_exact_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert!(!temp_path(&path).exists());
    }
}
