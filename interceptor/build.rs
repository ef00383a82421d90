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
    .context("building the eBPF programs (run `cargo xtask setup` to install nightly rust-src and bpf-linker)")
}
