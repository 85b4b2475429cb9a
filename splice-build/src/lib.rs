//! For the build scripts of the binaries: builds a probe crate of the
//! workspace (bpfel-unknown-none, nightly, bpf-linker) into OUT_DIR, so that
//! `cargo build` alone produces a binary with its probe embedded.
//! `scripts/setup.sh` installs what this needs.
use anyhow::{Context as _, anyhow};

/// Builds the workspace package `probe` (all its binaries) into OUT_DIR.
pub fn build_probe(probe: &str) -> anyhow::Result<()> {
    // The nested cargo's progress lines would surface as build warnings.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package_dir = |name: &str| -> anyhow::Result<String> {
        let package = metadata
            .packages
            .iter()
            .find(|package| package.name.as_str() == name)
            .ok_or_else(|| anyhow!("{name} package not found in the workspace"))?;
        let dir = package
            .manifest_path
            .parent()
            .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
        Ok(dir.to_string())
    };
    // The probe's code mostly lives in these crates.
    for shared in ["splice-common", "splice-ebpf"] {
        println!("cargo:rerun-if-changed={}", package_dir(shared)?);
    }
    let root_dir = package_dir(probe)?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: probe,
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .with_context(|| {
        format!("building {probe} failed: run scripts/setup.sh (nightly rust-src, bpf-linker)")
    })
}
