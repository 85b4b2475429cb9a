//! Builds the echo probe (bpfel-unknown-none, nightly, bpf-linker) into
//! OUT_DIR so that `cargo build` alone produces a working `ebpf-echo`.
//! `scripts/setup.sh` installs what this needs.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // The nested cargo's progress lines would surface as build warnings.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let probe = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "echo-probe")
        .ok_or_else(|| anyhow!("echo-probe package not found in the workspace"))?;
    let root_dir = probe
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", probe.manifest_path))?;
    // The probe's code mostly lives in the shared splice crate.
    let splice = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "splice")
        .ok_or_else(|| anyhow!("splice package not found in the workspace"))?;
    if let Some(dir) = splice.manifest_path.parent() {
        println!("cargo:rerun-if-changed={dir}");
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: probe.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the echo probe failed: run scripts/setup.sh (nightly rust-src, bpf-linker)")
}
