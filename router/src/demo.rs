//! The demo of `router --demo`: small backends it starts itself and a
//! configuration routing to them, with the commands a user can paste.
//!
//! - backend A, plain HTTP (a thread), answers `backend A: <request line>`;
//! - backend B, TLS: `openssl s_server -www` with a self-signed certificate
//!   for `b.test` (the router does not terminate TLS: B does);
//! - backend C, an echo server (a thread), for the preamble route.
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::config::{Config, Route};

/// The running demo backends.
pub struct DemoBackends {
    http: SocketAddr,
    tls: SocketAddr,
    echo: SocketAddr,
    tls_server: Child,
}

impl Drop for DemoBackends {
    fn drop(&mut self) {
        let _ = self.tls_server.kill();
        let _ = self.tls_server.wait();
    }
}

/// Starts the demo backends on loopback.
pub fn start() -> io::Result<DemoBackends> {
    let http = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let echo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let dir = std::env::temp_dir().join(format!("router-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let started = start_tls_backend(&dir);
    // s_server read its key and certificate before it accepted: nothing is
    // left on disk, however the router ends.
    let _ = std::fs::remove_dir_all(&dir);
    let (tls_server, tls) = started?;
    let backends = DemoBackends {
        http: http.local_addr()?,
        tls,
        echo: echo.local_addr()?,
        tls_server,
    };
    thread::spawn(move || serve(http, answer_http));
    thread::spawn(move || serve(echo, echo_back));
    Ok(backends)
}

/// `openssl s_server -www` for `b.test`, stopped with the router.
fn start_tls_backend(dir: &std::path::Path) -> io::Result<(Child, SocketAddr)> {
    let (key, cert) = (dir.join("b.test.key"), dir.join("b.test.pem"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
        ])
        .args(["-subj", "/CN=b.test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| {
            io::Error::other(format!(
                "running openssl (install it: apt-get install openssl): {e}"
            ))
        })?;
    if !status.success() {
        return Err(io::Error::other(
            "openssl req failed to make the demo certificate",
        ));
    }
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut command = Command::new("openssl");
    command
        .args(["s_server", "-www", "-quiet", "-accept", &addr.to_string()])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: sigprocmask and prctl are async-signal-safe. The child
    // inherits the router's signal mask, which blocks SIGTERM (the main
    // thread waits for it): unblocked, the parent-death signal stops the
    // server when the router exits, however it exits (measured: with the
    // mask inherited, `kill -9` of the router left the server running).
    unsafe {
        command.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = command.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err(io::Error::other("openssl s_server did not start"));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok((child, addr))
}

fn serve(listener: TcpListener, handle: fn(TcpStream)) {
    for stream in listener.incoming().flatten() {
        thread::spawn(move || handle(stream));
    }
}

fn answer_http(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let request_line =
        String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or_default())
            .into_owned();
    let body = format!("backend A: {request_line}\n");
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn echo_back(mut stream: TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let _ = std::io::copy(&mut stream, &mut writer);
    let _ = writer.shutdown(std::net::Shutdown::Write);
}

impl DemoBackends {
    /// The demo configuration: `a.test` (HTTP Host) and anything unknown to
    /// backend A; `b.test` (TLS SNI) to backend B; the `echo` preamble
    /// (token `demo-token`) to backend C.
    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config
            .listen
            .push(SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)));
        let specs = [
            format!("host:a.test={}", self.http),
            format!("sni:b.test={}", self.tls),
            format!("preamble:echo:demo-token={}", self.echo),
            format!("default={}", self.http),
        ];
        for spec in specs {
            config
                .add_route_flag(&spec)
                .expect("the demo routes are valid");
        }
        config.routes.iter_mut().for_each(|route: &mut Route| {
            route.name = route.name.split('#').next().unwrap_or_default().to_owned();
        });
        config
    }

    /// What to paste to see the routes work.
    pub fn instructions(&self, router: SocketAddr) -> String {
        let port = router.port();
        let ip = router.ip();
        // In URLs and `-connect`, an IPv6 address goes in brackets.
        let host = match ip {
            std::net::IpAddr::V4(_) => ip.to_string(),
            std::net::IpAddr::V6(_) => format!("[{ip}]"),
        };
        format!(
            "\nDemo backends: A (HTTP) {http}, B (TLS, openssl s_server) {tls}, C (echo) {echo}.\n\
             Try, in another terminal:\n\
             \n  curl -s -H 'Host: a.test' http://{host}:{port}/hello      # Host a.test -> A\
             \n  curl -s http://{host}:{port}/other                        # no match -> default -> A\
             \n  curl -sk --resolve b.test:{port}:{host} https://b.test:{port}/ | head -3   # SNI b.test -> B\
             \n  openssl s_client -connect {host}:{port} -servername b.test </dev/null 2>/dev/null | grep subject\
             \n  printf 'ROUTE echo demo-token\\r\\nhello\\n' | nc -q1 {ip} {port}  # preamble -> C echoes hello\
             \n  printf 'ROUTE echo wrong\\r\\nhello\\n' | nc -q1 {ip} {port}       # bad token -> ERR unauthorized\
             \n  kill -USR1 {pid}   # counters: spliced bytes show as kernel_redirected_bytes\n",
            http = self.http,
            tls = self.tls,
            echo = self.echo,
            pid = std::process::id(),
        )
    }
}
