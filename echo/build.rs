//! Builds the echo probe into OUT_DIR (see `splice_build`).
fn main() -> anyhow::Result<()> {
    splice_build::build_probe("echo-probe")
}
