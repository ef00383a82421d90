//! Builds the eBPF object (`interceptor-ebpf`, for bpfel-unknown-none with the
//! nightly toolchain and bpf-linker) and places it in OUT_DIR, where
//! `redirect::ebpf` embeds it.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("reading the workspace metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "interceptor-ebpf")
        .ok_or_else(|| anyhow!("interceptor-ebpf package not found in the workspace"))?;
    let root_dir =
        package.manifest_path.parent().ok_or_else(|| anyhow!("no parent directory for {}", package.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: package.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs (run `cargo xtask setup` to install nightly rust-src and bpf-linker)")?;
    drop_ebpf_build_dir()
}

/// In CI, removes the eBPF crate's own target directory once its object is in OUT_DIR:
/// about 300 MB for each configuration the interceptor is built in, which a CI run never
/// reuses. Locally it stays, so editing the eBPF programs rebuilds only what changed.
fn drop_ebpf_build_dir() -> anyhow::Result<()> {
    if std::env::var_os("CI").is_none_or(|value| value.is_empty()) {
        return Ok(());
    }
    let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
    let build_dir = std::path::Path::new(&out_dir).join("aya-build");
    match std::fs::remove_dir_all(&build_dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", build_dir.display()))
        }
        _ => Ok(()),
    }
}
