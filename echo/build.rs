//! Builds the echo probe into OUT_DIR (see `splice::build`).
fn main() -> anyhow::Result<()> {
    splice::build::build_probe("echo-probe")
}
