//! Debian tools a test needs (dnsmasq, nft): installed with apt when
//! missing and this process is root, once. Outside CI a test without them
//! is skipped (with a message); under `CI=true` it fails, so CI can never
//! pass by skipping.
use std::process::{Command, Stdio};

/// Whether `binary` is on PATH.
fn found(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Returns whether `binary` (from the Debian `package`) can be run, after
/// installing it if it was missing. Panics under `CI=true` when it cannot.
pub fn require_tool(test: &str, binary: &str, package: &str) -> bool {
    if found(binary) {
        return true;
    }
    let root = caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_ADMIN,
    )
    .unwrap_or(false);
    if root {
        let install = |update: bool| {
            let script = format!(
                "{}DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                 {package}",
                if update { "apt-get update -q && " } else { "" }
            );
            Command::new("sh")
                .args(["-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let _ = install(false) || install(true);
        if found(binary) {
            return true;
        }
    }
    let why = format!(
        "needs `{binary}` (Debian package {package}: scripts/setup.sh installs it, or \
         apt-get install {package})"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: {why}; CI=true forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}
