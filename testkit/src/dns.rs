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
        // A port free for UDP and TCP at once (dnsmasq serves both on it);
        // another test's connection can still take it before dnsmasq binds,
        // so a dnsmasq that exits at once is started again on another one.
        for _ in 0..5 {
            let port = free_udp_and_tcp_port();
            let mut child = Command::new("dnsmasq")
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
                .stderr(Stdio::piped())
                .spawn()
                .expect("run dnsmasq");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match wait_listening(&mut child, addr) {
                Ok(()) => {
                    // Its log goes on to its stderr: keep the pipe drained.
                    if let Some(mut stderr) = child.stderr.take() {
                        thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
                    }
                    return Some(Self { addr, hosts, child });
                }
                Err(why) => eprintln!("dnsmasq on {addr}: {why}; trying another port"),
            }
        }
        panic!("dnsmasq did not start on 127.0.0.1 in 5 tries");
    }

    /// Replaces the records and has dnsmasq read them again.
    pub fn set(&self, records: &[(&str, IpAddr)]) {
        write_hosts(&self.hosts, records);
        // SAFETY: a plain kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }
}

/// A loopback port no UDP or TCP socket holds now.
fn free_udp_and_tcp_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until `child` serves UDP on `addr`, or says why not (it exited,
/// with its error, or 10 s passed).
fn wait_listening(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let listening = std::fs::read_to_string("/proc/net/udp")
            .unwrap_or_default()
            .contains(&format!("0100007F:{:04X}", addr.port()));
        if listening {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut error = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut error);
            }
            return Err(format!("exited ({status}): {}", error.trim()));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err("did not listen within 10 s".into())
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
