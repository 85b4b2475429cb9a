//! Backends that expect a PROXY protocol header: one in Rust that parses it
//! with the `ppp` crate and reports what it saw, and a real nginx with
//! `listen ... proxy_protocol` that answers with the address it parsed.
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use ppp::{HeaderResult, PartialResult as _, v1, v2};

use crate::tls::{TempDir, temp_dir};

/// What a [`ProxiedBackend`] saw on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxied {
    /// 1 or 2.
    pub version: u8,
    /// The client's address, as the header says.
    pub source: SocketAddr,
    /// The address the client connected to, as the header says.
    pub destination: SocketAddr,
    /// Every byte after the header, until the end of stream.
    pub payload: Vec<u8>,
}

/// A backend that reads a PROXY protocol header (v1 or v2), then echoes
/// every following byte, and at the end of stream reports the header's
/// addresses and the bytes (or why it could not parse the header).
pub struct ProxiedBackend {
    pub addr: SocketAddr,
}

impl ProxiedBackend {
    pub fn start(reports: mpsc::Sender<Result<Proxied, String>>) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a backend");
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let reports = reports.clone();
                thread::spawn(move || {
                    let _ = reports.send(serve(stream));
                });
            }
        });
        Self { addr }
    }
}

fn serve(mut stream: TcpStream) -> Result<Proxied, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    // Read until the header is complete (a v1 line is at most 107 bytes, a
    // v2 header says its length).
    let (version, source, destination, length) = loop {
        let parsed = HeaderResult::parse(&bytes);
        if parsed.is_complete() {
            break addresses(parsed)?;
        }
        let n = stream
            .read(&mut buffer)
            .map_err(|e| format!("reading the header: {e}"))?;
        if n == 0 {
            return Err(format!("end of stream inside the header: {bytes:?}"));
        }
        bytes.extend_from_slice(&buffer[..n]);
    };
    let mut payload = bytes.split_off(length);
    stream.write_all(&payload).map_err(|e| e.to_string())?;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                payload.extend_from_slice(&buffer[..n]);
                stream.write_all(&buffer[..n]).map_err(|e| e.to_string())?;
            }
            Err(e) => return Err(format!("reading the payload: {e}")),
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    Ok(Proxied {
        version,
        source,
        destination,
        payload,
    })
}

/// The version, both addresses and the header's length in bytes.
fn addresses(parsed: HeaderResult<'_>) -> Result<(u8, SocketAddr, SocketAddr, usize), String> {
    let pair = |source: std::net::IpAddr, sport, destination: std::net::IpAddr, dport| {
        (
            SocketAddr::new(source, sport),
            SocketAddr::new(destination, dport),
        )
    };
    match parsed {
        HeaderResult::V1(Ok(header)) => {
            let length = header.header.len();
            let (source, destination) = match header.addresses {
                v1::Addresses::Tcp4(a) => pair(
                    a.source_address.into(),
                    a.source_port,
                    a.destination_address.into(),
                    a.destination_port,
                ),
                v1::Addresses::Tcp6(a) => pair(
                    a.source_address.into(),
                    a.source_port,
                    a.destination_address.into(),
                    a.destination_port,
                ),
                v1::Addresses::Unknown => return Err("v1 header without addresses".into()),
            };
            Ok((1, source, destination, length))
        }
        HeaderResult::V2(Ok(header)) => {
            let length = header.len();
            if header.command != v2::Command::Proxy {
                return Err(format!("v2 command {:?}", header.command));
            }
            let (source, destination) = match header.addresses {
                v2::Addresses::IPv4(a) => pair(
                    a.source_address.into(),
                    a.source_port,
                    a.destination_address.into(),
                    a.destination_port,
                ),
                v2::Addresses::IPv6(a) => pair(
                    a.source_address.into(),
                    a.source_port,
                    a.destination_address.into(),
                    a.destination_port,
                ),
                other => return Err(format!("v2 addresses {other:?}")),
            };
            Ok((2, source, destination, length))
        }
        HeaderResult::V1(Err(e)) => Err(format!("not a PROXY header (v1: {e})")),
        HeaderResult::V2(Err(e)) => Err(format!("not a PROXY header (v2: {e})")),
    }
}

/// A real nginx on loopback whose listener expects the PROXY protocol
/// (v1 or v2, nginx tells them apart) and answers every HTTP request with
/// `<client address> <client port>\n` as the header told it.
pub struct NginxBackend {
    pub addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl NginxBackend {
    pub fn start() -> Self {
        // The port is picked by binding :0 and releasing it; another process
        // may take it in between, so try a few times.
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(nginx) => return nginx,
                Err(e) => failures.push(e),
            }
        }
        panic!("nginx did not start (install it: scripts/setup.sh): {failures:#?}");
    }

    fn try_start() -> Result<Self, String> {
        let dir = temp_dir("nginx");
        let port = {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            listener.local_addr().unwrap().port()
        };
        let root = dir.0.display();
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             pid {root}/nginx.pid;\nerror_log {root}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n\
             client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n\
             fastcgi_temp_path {root}/fastcgi;\n  uwsgi_temp_path {root}/uwsgi;\n\
             scgi_temp_path {root}/scgi;\n\
             server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n\
             location / {{\n      default_type text/plain;\n\
             return 200 \"$proxy_protocol_addr $proxy_protocol_port\\n\";\n    }}\n  }}\n}}\n"
        );
        let config_path = dir.0.join("nginx.conf");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(&dir.0)
            .arg("-e")
            .arg(dir.0.join("error.log"))
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("running nginx: {e}"))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default();
                return Err(format!("nginx exited ({status}): {log}"));
            }
            if TcpStream::connect(addr).is_ok() {
                return Ok(Self { addr, child, dir });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("nginx did not listen within 10 s".into());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// nginx's error log so far (for failure messages).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("error.log")).unwrap_or_default()
    }
}

impl Drop for NginxBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `GET /` for `host` on a new connection to `addr` and returns the
/// client's own address with the response body.
pub fn http_get(addr: SocketAddr, host: &str) -> io::Result<(SocketAddr, String)> {
    let mut stream = crate::clients::connect(addr)?;
    let local = stream.local_addr()?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .ok_or_else(|| io::Error::other(format!("no HTTP response: {response:?}")))?;
    Ok((local, body))
}

/// The PROXY protocol header (`version` 1 or 2) a load balancer in front
/// of a router sends for a client at `source` that connected to
/// `destination` (both IPv4 or both IPv6).
pub fn client_header(version: u8, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    if version == 1 {
        return v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes();
    }
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (source, destination),
    )
    .build()
    .expect("a header of two addresses")
}
