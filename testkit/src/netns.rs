//! A network namespace a test creates (and deletes when done), with its
//! loopback up: servers run in it with `ip netns exec`, and test threads
//! enter it to open sockets there; `nft` rules in it (to drop a peer's
//! packets) touch nothing outside.
use std::{
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    thread,
};

pub struct Netns {
    pub name: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl Netns {
    /// Creates `name` (suffixed with the process id); `None` when this test
    /// cannot (not root, no `ip`), which under `CI=true` is a failure.
    pub fn create(test: &str, name: &str) -> Option<Self> {
        if !crate::tools::require_tool(test, "ip", "iproute2") {
            return None;
        }
        let name = format!("{name}-{}", std::process::id());
        let _ = run(&["ip", "netns", "del", &name]);
        let created = run(&["ip", "netns", "add", &name])
            .and_then(|()| run(&["ip", "-n", &name, "link", "set", "lo", "up"]));
        match created {
            Ok(()) => Some(Self { name }),
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
                panic!("{test}: cannot create a network namespace: {e}; CI=true forbids skipping")
            }
            Err(e) => {
                eprintln!("SKIPPED {test}: cannot create a network namespace (root?): {e}");
                None
            }
        }
    }

    /// `program args...` prefixed to run in the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens stay
    /// there).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on this thread only, with a namespace descriptor.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in the namespace")
    }

    /// Runs `nft` in the namespace with `script` (its -f input).
    pub fn nft(&self, script: &str) -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!("{}.nft", self.name));
        std::fs::write(&dir, script).map_err(|e| e.to_string())?;
        run(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "nft",
            "-f",
            dir.to_str().unwrap(),
        ])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}
