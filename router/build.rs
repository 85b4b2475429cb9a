//! Builds the router probe into OUT_DIR (see `splice_build`); without the
//! `server` feature (the parsers alone, as fuzz/ builds them) there is no
//! probe to embed.
fn main() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_FEATURE_SERVER").is_none() {
        return Ok(());
    }
    splice_build::build_probe("router-probe")
}
