//! The demo of `router --demo`: two small backends started in-process and a
//! configuration routing to them, with the commands a user can paste.
//!
//! - backend A, plain HTTP on an ephemeral port, answers `backend A: <request line>`;
//! - backend B, an echo server: what a client sends comes back.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    thread,
};

use crate::config::{Config, Route};

/// The running demo backends.
pub struct DemoBackends {
    http: SocketAddr,
    echo: SocketAddr,
}

/// Starts the demo backends on loopback (each on its own thread).
pub fn start() -> std::io::Result<DemoBackends> {
    let http = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let echo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let backends = DemoBackends {
        http: http.local_addr()?,
        echo: echo.local_addr()?,
    };
    thread::spawn(move || serve(http, answer_http));
    thread::spawn(move || serve(echo, echo_back));
    Ok(backends)
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
    /// backend A; `b.test` (TLS SNI) and the `echo` preamble to backend B.
    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config
            .listen
            .push(SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)));
        let specs = [
            format!("host:a.test={}", self.http),
            format!("sni:b.test={}", self.echo),
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
        format!(
            "\nDemo backends: A (HTTP) on {http}, B (echo) on {echo}. Try:\n\
             \n  curl -s -H 'Host: a.test' http://{router}/hello             # Host -> backend A\
             \n  curl -s http://{router}/                                     # no route -> default (backend A)\
             \n  openssl s_client -connect {router} -servername b.test -quiet </dev/null \\\
             \n      | head -c 5 | xxd                                       # SNI b.test -> backend B echoes the ClientHello\
             \n  printf 'ROUTE echo demo-token\\r\\nhello\\n' | nc -q1 127.0.0.1 {port}   # preamble -> B echoes \"hello\"\
             \n  printf 'ROUTE echo wrong\\r\\nhello\\n' | nc -q1 127.0.0.1 {port}        # bad token -> \"ERR unauthorized\"\
             \n\nkill -USR1 <router pid> prints counters (userspace_bytes stays 0 for spliced bytes).\n",
            http = self.http,
            echo = self.echo,
        )
    }
}
