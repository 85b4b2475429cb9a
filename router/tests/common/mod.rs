//! Helpers shared by the router's test files: start the binary with routes,
//! run a test in both forwarding modes, wait until idle, talk to it.
// Each test file uses its own subset of these.
#![allow(dead_code)]
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use testkit::{Server, Stats, clients, privileges::require_bpf};

pub const BIN: &str = env!("CARGO_BIN_EXE_router");

/// Starts the router on an ephemeral loopback port with `routes` (as
/// `--route` specs) and `extra` arguments.
pub fn start(mode: &str, routes: &[String], extra: &[&str]) -> Server {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--mode".into(),
        mode.into(),
    ];
    if mode == "ebpf" {
        // These tests watch the kernel path: every connection spliced from
        // its first packet on (the lazy splice has tests of its own).
        args.extend(["--splice-after".into(), "0".into()]);
    }
    for route in routes {
        args.push("--route".into());
        args.push(route.clone());
    }
    let own_socket = (!extra.contains(&"--upgrade-socket")).then(own_upgrade_socket);
    args.extend(own_socket.iter().flatten().cloned());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(BIN, &args);
    // Nothing upgrades this router: its socket's file goes now, or a router
    // killed at the end of its test would leave it behind.
    if let Some([_, path]) = own_socket {
        let _ = std::fs::remove_file(path);
    }
    server
}

/// `--upgrade-socket` at a path of this router's own. On the default path
/// a router starting next to another connects to see whether it is taken,
/// so the running one holds a descriptor for a moment: a test counting
/// descriptors would see it.
pub fn own_upgrade_socket() -> [String; 2] {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("router-test-{}-{n}.sock", std::process::id()));
    ["--upgrade-socket".into(), path.display().to_string()]
}

/// Runs `test` in both modes (the ebpf one only where BPF is allowed).
pub fn both_modes(name: &str, test: impl Fn(&str)) {
    test("copy");
    if require_bpf(name) {
        test("ebpf");
    }
}

pub fn idle(stats: &Stats) -> bool {
    stats.get("active") == 0
}

pub fn curl(args: &[&str]) -> String {
    let output = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Sends `bytes`, half-closes, and returns everything received.
pub fn send(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    clients::send_and_receive(addr, bytes.to_vec()).expect("client I/O")
}

/// A number from the environment (the soak script scales tests up this
/// way), or `default`.
pub fn scale(variable: &str, default: u64) -> u64 {
    match std::env::var(variable) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{variable}={value}: not a number")),
        Err(_) => default,
    }
}

/// A test's configuration file, in a [`testkit::temp_dir`] of its own.
pub struct ConfigFile {
    path: PathBuf,
    _dir: testkit::TempDir,
}

impl std::ops::Deref for ConfigFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for ConfigFile {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// Writes a configuration file for one test.
pub fn config_file(name: &str, text: &str) -> ConfigFile {
    let dir = testkit::temp_dir(name);
    let path = dir.path().join("router.toml");
    std::fs::write(&path, text).unwrap();
    ConfigFile { path, _dir: dir }
}
