//! The configuration loader: `Config::from_toml` (then the whole-config
//! checks) on any text, and `--route` specs.
#![no_main]
use libfuzzer_sys::fuzz_target;
use router::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text, "fuzz.toml") {
        Ok(config) => {
            let _ = config.validate();
        }
        Err(error) => assert!(error.0.starts_with("fuzz.toml: "), "{}", error.0),
    }
    let mut config = Config::default();
    for line in text.lines().take(8) {
        let _ = config.add_route_flag(line);
    }
});
