use which::which;

/// Rebuild the eBPF object when bpf-linker changes: cargo cannot know that
/// the linker is an input of this build.
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
