//! A real DNS server for tests: Debian's dnsmasq on loopback, at a port of
//! its own, answering from a hosts file the test rewrites (then SIGHUP:
//! dnsmasq reads it again). Stops with the test.
use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// A dnsmasq that knows only the names it is given.
pub struct Dns {
    pub addr: SocketAddr,
    hosts: PathBuf,
    child: Child,
}

impl Dns {
    /// Starts dnsmasq answering `records` (name, address); `None` when it
    /// cannot run (see [`crate::tools::require_tool`]).
    pub fn start(test: &str, records: &[(&str, IpAddr)]) -> Option<Self> {
        if !crate::tools::require_tool(test, "dnsmasq", "dnsmasq-base") {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("dns-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = dir.join("hosts");
        write_hosts(&hosts, records);
        // A free UDP port (dnsmasq serves TCP on the same one).
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--pid-file=",
                "--user=root",
                "--log-facility=-",
                &format!("--port={port}"),
                &format!("--addn-hosts={}", hosts.display()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run dnsmasq");
        let dns = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            hosts,
            child,
        };
        dns.wait_listening();
        Some(dns)
    }

    /// Replaces the records and has dnsmasq read them again.
    pub fn set(&self, records: &[(&str, IpAddr)]) {
        write_hosts(&self.hosts, records);
        // SAFETY: a plain kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let listening = std::fs::read_to_string("/proc/net/udp")
                .unwrap_or_default()
                .contains(&format!("0100007F:{:04X}", self.addr.port()));
            if listening {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("dnsmasq did not listen on {} within 10 s", self.addr);
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_hosts(path: &PathBuf, records: &[(&str, IpAddr)]) {
    let mut text = String::new();
    for (name, ip) in records {
        let _ = writeln!(text, "{ip} {name}");
    }
    // Written aside, then renamed: dnsmasq never reads half a file.
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}
