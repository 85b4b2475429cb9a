//! `proxy_protocol` on a route: the backend receives a PROXY protocol
//! header (v1 or v2) with the client's address before any byte of the
//! client, over IPv4 and IPv6, in ebpf and copy modes; checked by a backend
//! that parses it with the `ppp` crate and by a real nginx.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr},
    sync::mpsc,
    thread,
    time::Duration,
};

use testkit::{
    Server, Stats, clients,
    privileges::require_bpf,
    proxy_protocol::{NginxBackend, ProxiedBackend, http_get},
};

const BIN: &str = env!("CARGO_BIN_EXE_router");

/// Runs `test` in both modes (the ebpf one only where BPF is allowed).
fn both_modes(name: &str, test: impl Fn(&str)) {
    test("copy");
    if require_bpf(name) {
        test("ebpf");
    }
}

fn start(mode: &str, listen: &str, routes: &[String]) -> Server {
    let mut args = vec!["--listen", listen, "--mode", mode];
    if mode == "ebpf" {
        // Spliced from the first packet on, as the counters below expect.
        args.extend(["--splice-after", "0"]);
    }
    for route in routes {
        args.extend(["--route", route.as_str()]);
    }
    Server::start(BIN, &args)
}

fn idle(stats: &Stats) -> bool {
    stats.get("active") == 0
}

#[test]
fn the_backend_reads_the_client_address_then_the_exact_client_bytes() {
    both_modes("proxy_protocol", |mode| {
        let (reports, received) = mpsc::channel();
        let backend = ProxiedBackend::start(reports);
        let routes = [
            format!("preamble:pp1={},proxy_protocol=v1", backend.addr),
            format!("preamble:pp2={},proxy_protocol=v2", backend.addr),
        ];
        for listen in ["127.0.0.1:0", "[::1]:0"] {
            let mut router = start(mode, listen, &routes);
            for version in [1u8, 2] {
                let what = format!("{mode}, {listen}, v{version}");
                let mut stream = clients::connect(router.addr).unwrap();
                let client = stream.local_addr().unwrap();
                // The first packet carries bytes after the preamble; the
                // next ones go through the splice (in ebpf mode, the kernel).
                stream
                    .write_all(format!("ROUTE pp{version}\r\nfirst-").as_bytes())
                    .unwrap();
                let mut echoed = [0u8; 6];
                stream.read_exact(&mut echoed).unwrap();
                assert_eq!(&echoed, b"first-", "{what}");
                stream.write_all(b"second\x00\r\n").unwrap();
                let mut echoed = [0u8; 9];
                stream.read_exact(&mut echoed).unwrap();
                assert_eq!(&echoed, b"second\x00\r\n", "{what}");
                stream.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).unwrap();
                assert_eq!(rest, b"", "{what}");
                let seen = received
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the backend's report")
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(seen.version, version, "{what}");
                assert_eq!(seen.source, client, "{what}: the client's address");
                assert_eq!(seen.destination, router.addr, "{what}: the router's");
                assert_eq!(seen.payload, b"first-second\x00\r\n", "{what}");
            }
            let stats = router.wait_stats(idle, Duration::from_secs(10));
            assert_eq!(stats.get("routed"), 2, "{mode}: {stats:?}");
            assert_eq!(stats.get("resets"), 0, "{mode}: {stats:?}");
            if mode == "ebpf" {
                assert_eq!(stats.get("spliced"), 2, "{stats:?}");
                assert!(stats.get("kernel_redirected_bytes") >= 30, "{stats:?}");
            }
        }
    });
}

#[test]
fn nginx_sees_the_client_address_through_the_router() {
    both_modes("proxy_protocol_nginx", |mode| {
        let nginx = NginxBackend::start();
        let routes = [
            format!("host:v1.test={},proxy_protocol=v1", nginx.addr),
            format!("host:v2.test={},proxy_protocol=v2", nginx.addr),
            format!("default={}", nginx.addr),
        ];
        for listen in ["127.0.0.1:0", "[::1]:0"] {
            let mut router = start(mode, listen, &routes);
            for host in ["v1.test", "v2.test"] {
                let (client, body) = http_get(router.addr, host)
                    .unwrap_or_else(|e| panic!("{e}; nginx log: {}", nginx.error_log()));
                assert_eq!(
                    body,
                    format!("{} {}\n", client.ip(), client.port()),
                    "{mode}, {listen}, {host}; nginx log: {}",
                    nginx.error_log()
                );
            }
            // Without the header, nginx closes the connection unanswered:
            // the header is what made the requests above work.
            let plain: Result<(SocketAddr, String), _> = http_get(router.addr, "plain.test");
            assert!(
                plain
                    .as_ref()
                    .is_err_and(|e| e.to_string().contains("no HTTP response")),
                "{mode}: {plain:?}"
            );
            let stats = router.wait_stats(idle, Duration::from_secs(10));
            assert_eq!(stats.get("routed"), 3, "{mode}: {stats:?}");
        }
    });
}

/// Connects, sends `header`, then `ROUTE pp` and two pieces (the second
/// after the first's echo: spliced by then in ebpf mode), and returns the
/// echo.
fn proxied_exchange(addr: SocketAddr, header: &[u8]) -> Vec<u8> {
    let mut stream = clients::connect(addr).unwrap();
    stream
        .write_all(&[header, b"ROUTE pp\r\nfirst-"].concat())
        .unwrap();
    let mut echoed = vec![0u8; 6];
    stream.read_exact(&mut echoed).unwrap();
    stream.write_all(b"second").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    stream.read_to_end(&mut echoed).unwrap();
    echoed
}

#[test]
fn accept_proxy_takes_the_client_from_a_v1_or_v2_header_and_refuses_without() {
    both_modes("accept_proxy", |mode| {
        let (reports, received) = mpsc::channel();
        let backend = ProxiedBackend::start(reports);
        let web = testkit::backends::Backend::named("web");
        let routes = [
            format!("preamble:pp={},proxy_protocol=v2", backend.addr),
            format!("host:web.test={}", web.addr),
        ];
        let mut router = Server::start(
            BIN,
            &[
                "--listen",
                "127.0.0.1:0",
                "--accept-proxy",
                "--mode",
                mode,
                "--route",
                &routes[0],
                "--route",
                &routes[1],
            ],
        );
        for (version, source) in [(1u8, "203.0.113.7:40001"), (2, "198.51.100.8:40002")] {
            let source: SocketAddr = source.parse().unwrap();
            let header = testkit::proxy_protocol::client_header(version, source, router.addr);
            let echoed = proxied_exchange(router.addr, &header);
            assert_eq!(echoed, b"first-second", "{mode} v{version}");
            let seen = received
                .recv_timeout(Duration::from_secs(10))
                .expect("the backend's report")
                .unwrap_or_else(|e| panic!("{mode}: {e}"));
            // The header sent on names the client the load balancer named.
            assert_eq!(seen.source, source, "{mode} v{version}");
            assert_eq!(seen.payload, b"first-second", "{mode} v{version}");
        }
        // curl, a real client, sending its own v1 header.
        let output = std::process::Command::new("curl")
            .args(["-s", "--max-time", "10", "--haproxy-protocol"])
            .args(["-H", "Host: web.test"])
            .arg(format!("http://{}/", router.addr))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&output.stdout), "web\n", "{mode}");
        // Without a header: closed unanswered, counted.
        let answer = clients::send_and_receive(router.addr, b"ROUTE pp\r\nx".to_vec());
        assert!(answer.is_ok_and(|a| a.is_empty()), "{mode}");
        let broken = clients::send_and_receive(
            router.addr,
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\nROUTE pp\r\nx".to_vec(),
        );
        assert!(broken.is_ok_and(|a| a.is_empty()), "{mode}");
        let stats = router.wait_stats(idle, Duration::from_secs(10));
        assert_eq!(stats.get("refused_proxy_header"), 2, "{mode}: {stats:?}");
        assert_eq!(stats.get("routed"), 3, "{mode}: {stats:?}");
        // The access log names the carried clients.
        thread::sleep(Duration::from_millis(200));
        let log = router.stderr();
        for client in ["client=203.0.113.7:40001", "client=198.51.100.8:40002"] {
            assert!(
                log.lines()
                    .any(|l| l.contains(" access ") && l.contains(client)),
                "{mode}: {client} in {log}"
            );
        }
        assert_eq!(
            log.matches("end=refused reason=proxy_header").count(),
            2,
            "{log}"
        );
    });
}

#[test]
fn accept_proxy_is_per_listener_in_the_file() {
    let echo = testkit::backends::Backend::echo();
    let (proxied, plain) = (
        testkit::backends::closed_port(),
        testkit::backends::closed_port(),
    );
    let dir = testkit::temp_dir("accept-proxy");
    let path = dir.path().join("router.toml");
    std::fs::write(
        &path,
        format!(
            "listen = [{{ address = \"{proxied}\", accept_proxy = true }}, \"{plain}\"]\n\
             mode = \"copy\"\n[[route]]\nname = \"echo\"\npreamble = \"echo\"\nbackends = [\"{}\"]\n",
            echo.addr
        ),
    )
    .unwrap();
    let mut router = Server::start(BIN, &["--config", path.to_str().unwrap()]);
    assert_eq!(router.addr, proxied);
    let send =
        |addr: SocketAddr, bytes: &[u8]| clients::send_and_receive(addr, bytes.to_vec()).unwrap();
    assert_eq!(send(plain, b"ROUTE echo\r\nplain"), b"plain");
    assert_eq!(send(proxied, b"ROUTE echo\r\nplain"), b"");
    let header =
        testkit::proxy_protocol::client_header(2, "192.0.2.5:1234".parse().unwrap(), proxied);
    assert_eq!(
        send(proxied, &[&header[..], b"ROUTE echo\r\nproxied"].concat()),
        b"proxied"
    );
    let stats = router.wait_stats(idle, Duration::from_secs(10));
    assert_eq!(stats.get("refused_proxy_header"), 1, "{stats:?}");
}
