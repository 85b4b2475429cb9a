//! Operating `router`: Prometheus metrics checked against the traffic the
//! test sent, hot reload under load (SIGHUP), graceful drain (SIGTERM /
//! SIGINT, drain timeout, second signal), and the log lines. Every test
//! that depends on the forwarding runs in `copy` and `ebpf` mode.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use testkit::{
    Server,
    backends::{self, Backend},
    clients,
    data::Rng,
    privileges::require_bpf,
    temp_dir,
};

const BIN: &str = env!("CARGO_BIN_EXE_router");

/// Runs `test` in both modes (the ebpf one only where BPF is allowed).
fn both_modes(name: &str, test: impl Fn(&str)) {
    test("copy");
    if require_bpf(name) {
        test("ebpf");
    }
}

fn start(mode: &str, routes: &[String], extra: &[&str]) -> Server {
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
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(BIN, &args)
}

/// The address of `--metrics 127.0.0.1:0`, from the line the router prints.
fn metrics_addr(router: &mut Server) -> SocketAddr {
    let line = router.next_line(|l| l.contains("metrics on"), Duration::from_secs(5));
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"))
}

/// A plain HTTP/1.1 GET; returns the status and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = clients::connect(addr).expect("connect to the metrics endpoint");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// A plain HTTP/1.1 HEAD; returns the status and what came after the head.
fn http_head(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = clients::connect(addr).expect("connect to the metrics endpoint");
    write!(stream, "HEAD {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// One scrape of `/metrics`.
struct Metrics(String);

impl Metrics {
    fn scrape(addr: SocketAddr) -> Self {
        let (status, body) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{body}");
        Self(body)
    }

    /// The value of one series (`name{labels}` exactly as exposed).
    fn get(&self, series: &str) -> u64 {
        let value = self
            .0
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no series {series} in:\n{}", self.0));
        value
            .parse()
            .unwrap_or_else(|_| panic!("{series} = {value} is not an integer"))
    }

    /// The value of one series, as a float.
    fn float(&self, series: &str) -> f64 {
        self.0
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in:\n{}", self.0))
    }

    /// Scrapes until nothing is open any more (refused clients linger up
    /// to a second).
    fn when_idle(addr: SocketAddr) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = Self::scrape(addr);
            if metrics.get("router_connections_active") == 0 {
                return metrics;
            }
            assert!(Instant::now() < deadline, "still active:\n{}", metrics.0);
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sends `preamble` then `body` through the router to an echo backend,
/// reads the echo of `body`, then half-closes and expects the end.
fn echo_through(addr: SocketAddr, preamble: &[u8], body: &[u8]) -> io::Result<()> {
    let stream = clients::connect(addr)?;
    let mut writer = stream.try_clone()?;
    let mut sent = preamble.to_vec();
    sent.extend_from_slice(body);
    let sender = thread::spawn(move || writer.write_all(&sent));
    let mut echoed = vec![0u8; body.len()];
    let read = (&stream).read_exact(&mut echoed);
    sender
        .join()
        .map_err(|_| io::Error::other("sender panicked"))??;
    read?;
    if echoed != body {
        return Err(io::Error::other("echo differs"));
    }
    stream.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    (&stream).read_to_end(&mut rest)?;
    if !rest.is_empty() {
        return Err(io::Error::other("bytes after the echo"));
    }
    Ok(())
}

/// Replaces `path` at once (write, then rename), as an operator's tooling
/// should: the router never reads half a file.
fn write_config(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// Waits (5 s at most) until the router's stderr contains `text`.
fn wait_stderr(router: &Server, text: &str) {
    router.wait_stderr(text, Duration::from_secs(5));
}

/// N routed connections with known sizes and one of each provokable
/// refusal: the scrape shows exactly those counts and bytes, per route and
/// per backend, and the debug log has one summary per closed connection.
#[test]
fn metrics_count_connections_bytes_and_refusals_per_route() {
    both_modes("metrics", |mode| {
        const CONNECTIONS: usize = 20;
        let echo = Backend::echo();
        let dead = backends::closed_port();
        let routes = [
            format!("preamble:echo={}", echo.addr),
            format!("preamble:locked:s3cret={}", echo.addr),
            format!("preamble:down={dead}"),
        ];
        let mut router = start(
            mode,
            &routes,
            &["--metrics", "127.0.0.1:0", "--log-level", "debug"],
        );
        let metrics = metrics_addr(&mut router);
        assert_eq!(http_get(metrics, "/healthz"), (200, "ok\n".into()));
        assert_eq!(http_get(metrics, "/nothing").0, 404);

        let mut rng = Rng::new(7);
        let mut sent = 0u64;
        for i in 0..CONNECTIONS {
            let body = rng.bytes(1 + i * 16 * 1024);
            echo_through(router.addr, b"ROUTE echo\r\n", &body)
                .unwrap_or_else(|e| panic!("{mode}: connection {i}: {e}"));
            sent += body.len() as u64;
        }
        for refused in [
            &b"ROUTE locked wrong\r\nx"[..],
            b"ROUTE locked\r\nx",
            b"ROUTE nope\r\nx",
            b"ROUTE a b c\r\n",
            b"ROUTE down\r\nx",
        ] {
            let answer = clients::send_and_receive(router.addr, refused.to_vec()).unwrap();
            assert!(answer.starts_with(b"ERR "), "{mode}: {answer:?}");
        }

        let m = Metrics::when_idle(metrics);
        let refusals = 5;
        let total = (CONNECTIONS + refusals) as u64;
        assert_eq!(m.get("router_connections_accepted_total"), total, "{mode}");
        assert_eq!(
            m.get("router_connections_routed_total"),
            CONNECTIONS as u64 + 1,
            "{mode}: the echo connections and the unavailable one"
        );
        for (reason, count) in [
            ("unauthorized", 2),
            ("no_route", 1),
            ("invalid", 1),
            ("unavailable", 1),
            ("timeout", 0),
        ] {
            assert_eq!(
                m.get(&format!(
                    "router_connections_refused_total{{reason=\"{reason}\"}}"
                )),
                count,
                "{mode}: {reason}"
            );
        }
        assert_eq!(
            m.get(
                "router_route_connections_refused_total{route=\"preamble:locked\",reason=\"unauthorized\"}"
            ),
            2,
            "{mode}"
        );
        assert_eq!(
            m.get(
                "router_route_connections_refused_total{route=\"preamble:down\",reason=\"unavailable\"}"
            ),
            1,
            "{mode}"
        );
        assert_eq!(
            m.get(&format!(
                "router_backend_connect_failures_total{{route=\"preamble:down\",backend=\"{dead}\"}}"
            )),
            1,
            "{mode}"
        );
        assert_eq!(
            m.get("router_route_connections_total{route=\"preamble:echo\"}"),
            CONNECTIONS as u64,
            "{mode}"
        );
        assert_eq!(
            m.get(&format!(
                "router_backend_connections_total{{route=\"preamble:echo\",backend=\"{}\"}}",
                echo.addr
            )),
            CONNECTIONS as u64,
            "{mode}"
        );
        // Every byte each way, kernel-redirected or userspace-written.
        assert_eq!(
            m.get("router_route_bytes_total{route=\"preamble:echo\",direction=\"to_backend\"}"),
            sent,
            "{mode}"
        );
        assert_eq!(
            m.get("router_route_bytes_total{route=\"preamble:echo\",direction=\"to_client\"}"),
            sent,
            "{mode}"
        );
        let served = |how: &str| {
            m.get(&format!(
                "router_route_connections_served_total{{route=\"preamble:echo\",mode=\"{how}\"}}"
            ))
        };
        if mode == "ebpf" {
            // A connection whose insert failed is served by userspace
            // (counted as fallback); these clients wait for their echo, so
            // in practice all are spliced.
            assert_eq!(
                served("ebpf") + served("fallback"),
                CONNECTIONS as u64,
                "{}",
                m.0
            );
            assert!(served("ebpf") > 0, "{}", m.0);
            let kernel = m.get("router_kernel_redirected_bytes_total");
            assert!(
                kernel > 0 && kernel <= 2 * sent,
                "kernel_redirected_bytes {kernel} vs {sent} each way"
            );
            assert_eq!(m.get("router_sockmap_slots_in_use"), 0, "{}", m.0);
        } else {
            assert_eq!(served("copy"), CONNECTIONS as u64, "{}", m.0);
            assert!(!m.0.contains("router_kernel_"), "{}", m.0);
        }
        // One first-packet observation per accepted connection, one
        // connect observation per backend that answered.
        assert_eq!(m.get("router_first_packet_seconds_count"), total);
        assert_eq!(
            m.get("router_backend_connect_seconds_count"),
            CONNECTIONS as u64
        );
        assert_eq!(
            m.get("router_first_packet_seconds_bucket{le=\"+Inf\"}"),
            total
        );

        // The log: a line per refusal (reason, client, route if any) and,
        // at debug, a summary per closed connection.
        // (stderr is read by a thread: wait for the last lines.)
        let deadline = Instant::now() + Duration::from_secs(5);
        while router.stderr().matches("refused connection").count() < refusals
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(10));
        }
        let log = router.stderr();
        let refused_lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("refused connection"))
            .collect();
        assert_eq!(refused_lines.len(), refusals, "{log}");
        assert!(
            refused_lines.iter().any(|l| l.contains("client=127.0.0.1:")
                && l.contains("reason=\"unauthorized\"")
                && l.contains("route=\"preamble:locked\"")),
            "{log}"
        );
        let closed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("connection closed") && l.contains("route=\"preamble:echo\""))
            .collect();
        assert_eq!(closed.len(), CONNECTIONS, "{log}");
        let last_size = 1 + (CONNECTIONS - 1) * 16 * 1024;
        assert!(
            closed.iter().any(|l| {
                l.contains(&format!("bytes_to_backend={last_size} "))
                    && l.contains(&format!("bytes_to_client={last_size} "))
                    && l.contains(&format!("backend={}", echo.addr))
                    && l.contains(&format!("mode=\"{mode}\""))
                    && l.contains("duration_ms=")
            }),
            "{log}"
        );
    });
}

/// `--log-level` wins over `RUST_LOG`, which wins over the default (info).
#[test]
fn log_level_flag_takes_precedence_over_rust_log() {
    let echo = Backend::echo();
    let route = format!("--route=preamble:echo={}", echo.addr);
    let run = |flag: Option<&str>, env: Option<&str>| -> String {
        let mut command = Command::new(BIN);
        command.args(["--listen", "127.0.0.1:0", "--mode", "copy", &route]);
        if let Some(level) = flag {
            command.args(["--log-level", level]);
        }
        command.env_remove("RUST_LOG");
        if let Some(filter) = env {
            command.env("RUST_LOG", filter);
        }
        let mut router = Server::start_command(&mut command);
        echo_through(router.addr, b"ROUTE echo\r\n", b"hello").unwrap();
        let refused = clients::send_and_receive(router.addr, b"ROUTE nope\r\n".to_vec()).unwrap();
        assert_eq!(refused, b"ERR no route\r\n");
        router.wait_stats(|s| s.get("active") == 0, Duration::from_secs(10));
        // Every line it wrote: log lines reach stderr in batches, and the
        // last one when it exits.
        router.signal(libc::SIGTERM);
        assert!(router.wait_exit(Duration::from_secs(10)).is_some());
        thread::sleep(Duration::from_millis(100));
        router.stderr()
    };
    let default = run(None, None);
    assert!(default.contains("refused connection"), "{default}");
    assert!(!default.contains("connection closed"), "{default}");
    let env_debug = run(None, Some("debug"));
    assert!(env_debug.contains("connection closed"), "{env_debug}");
    let flag_wins = run(Some("warn"), Some("debug"));
    assert!(!flag_wins.contains("refused connection"), "{flag_wins}");
    assert!(!flag_wins.contains("connection closed"), "{flag_wins}");
    let bad = Command::new(BIN)
        .args(["--log-level", "router=loud", "--check-config"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

fn svc_config(backend: SocketAddr, extra: &str) -> String {
    format!("{extra}\n[[route]]\nname = \"svc\"\npreamble = \"svc\"\nbackends = [\"{backend}\"]\n")
}

/// One short routed connection; returns what the backend said.
fn ask(addr: SocketAddr) -> io::Result<Vec<u8>> {
    clients::send_and_receive(addr, b"ROUTE svc\r\nping".to_vec())
}

/// Twenty reloads while a client loop keeps opening short connections: no
/// connection fails, each reload's new backend takes effect, a connection
/// opened before the reloads keeps its backend, an invalid configuration is
/// refused with the old routes kept, and a changed restart-only setting is
/// reported as such.
#[test]
fn sighup_reloads_routes_under_load_without_failed_connections() {
    both_modes("reload", |mode| {
        const RELOADS: usize = 20;
        let (a, b) = (Backend::named("a"), Backend::named("b"));
        let dir = temp_dir("ops-reload");
        let config = dir.path().join("router.toml");
        write_config(&config, &svc_config(a.addr, ""));
        let mut router = start(
            mode,
            &[],
            &[
                "--config",
                config.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:0",
            ],
        );
        let metrics = metrics_addr(&mut router);
        let addr = router.addr;

        // A long-lived connection to A, opened before any reload.
        let mut long_lived = clients::connect(addr).unwrap();
        long_lived.write_all(b"ROUTE svc\r\nfirst").unwrap();
        let mut reply = [0u8; 7];
        long_lived.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"a:first");

        // The load: short connections, one after the other, bounded in
        // count and time.
        let stop = Arc::new(AtomicBool::new(false));
        let load = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, Vec::new());
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && ok < 100_000 {
                    match ask(addr) {
                        Ok(reply) if reply == b"a:ping" || reply == b"b:ping" => ok += 1,
                        Ok(reply) => failed.push(format!("reply {reply:?}")),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        };

        let mut latencies = Vec::new();
        for i in 1..=RELOADS {
            let (backend, expected) = if i % 2 == 1 {
                (b.addr, &b"b:ping"[..])
            } else {
                (a.addr, &b"a:ping"[..])
            };
            write_config(&config, &svc_config(backend, ""));
            let sent = Instant::now();
            router.signal(libc::SIGHUP);
            // New connections reach the new backend: from how soon?
            loop {
                if ask(addr).unwrap() == expected {
                    break;
                }
                assert!(
                    sent.elapsed() < Duration::from_secs(5),
                    "{mode}: reload {i} not in effect after 5 s"
                );
                thread::sleep(Duration::from_micros(200));
            }
            latencies.push(sent.elapsed());
            // Let the load run between reloads.
            thread::sleep(Duration::from_millis(20));
        }
        latencies.sort();
        // What the router itself took: read, parse, validate, publish.
        let log = router.stderr();
        let mut handled: Vec<f64> = log
            .lines()
            .filter_map(|l| {
                l.split("reloaded in ")
                    .nth(1)?
                    .split(" ms")
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        handled.sort_by(f64::total_cmp);
        assert_eq!(handled.len(), RELOADS, "{log}");
        eprintln!(
            "{mode}: SIGHUP -> first connection on the new backend: median {:?}, max {:?}; \
             the router's reload (read, parse, publish): median {} ms, max {} ms ({RELOADS} reloads)",
            latencies[RELOADS / 2],
            latencies[RELOADS - 1],
            handled[RELOADS / 2],
            handled[RELOADS - 1]
        );

        // An invalid configuration: refused, logged, old routes kept (the
        // last reload went to A).
        write_config(
            &config,
            &svc_config(b.addr, "").replace(&b.addr.to_string(), "nowhere"),
        );
        router.signal(libc::SIGHUP);
        wait_stderr(&router, "invalid, keeping the running one");
        assert_eq!(ask(addr).unwrap(), b"a:ping", "{mode}");
        // A restart-only setting: a warning, and the rest applies.
        write_config(&config, &svc_config(b.addr, "sockmap_capacity = 64"));
        router.signal(libc::SIGHUP);
        wait_stderr(&router, "`sockmap_capacity` changed: that needs a restart");
        let deadline = Instant::now() + Duration::from_secs(5);
        while ask(addr).unwrap() != b"b:ping" {
            assert!(Instant::now() < deadline, "{mode}: last reload not applied");
        }

        stop.store(true, Ordering::Relaxed);
        let (ok, failed) = load.join().unwrap();
        assert!(failed.is_empty(), "{mode}: failed connections: {failed:?}");
        assert!(
            ok >= RELOADS as u64,
            "{mode}: only {ok} connections in the load"
        );
        eprintln!("{mode}: {ok} connections across the reloads, 0 failed");

        // The connection from before the reloads still reaches A.
        long_lived.write_all(b"-second").unwrap();
        let mut reply = [0u8; 7];
        long_lived.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"-second", "{mode}");
        drop(long_lived);

        let m = Metrics::when_idle(metrics);
        assert_eq!(
            m.get("router_config_reloads_total{result=\"ok\"}"),
            RELOADS as u64 + 1
        );
        assert_eq!(m.get("router_config_reloads_total{result=\"error\"}"), 1);
        assert_eq!(
            m.get(&format!(
                "router_backend_connections_total{{route=\"svc\",backend=\"{}\"}}",
                b.addr
            )),
            b.accepted() as u64,
            "{mode}"
        );
    });
}

/// A reload binds the listen addresses it adds (with the file's
/// `accept_proxy`) and shuts the ones it removes: a connection open on a
/// removed address goes on to its end while new ones are refused there, and
/// the log names each change. A reload whose new address is taken changes
/// nothing.
#[test]
fn a_reload_binds_added_listen_addresses_and_shuts_removed_ones_while_their_connections_go_on() {
    both_modes("listen-reload", |mode| {
        let echo = Backend::echo();
        let dir = temp_dir("ops-listen-reload");
        let path = dir.path().join("router.toml");
        let (a, b) = (backends::closed_port(), backends::closed_port());
        let text = |listen: &[String]| {
            format!(
                "listen = [{}]\nmode = \"{mode}\"\n\
                 [[route]]\nname = \"all\"\ndefault = true\nbackends = [\"{}\"]\n",
                listen.join(", "),
                echo.addr
            )
        };
        let plain = |addr: SocketAddr| format!("\"{addr}\"");
        let proxied = |addr: SocketAddr| format!("{{ address = \"{addr}\", accept_proxy = true }}");
        write_config(&path, &text(&[plain(a)]));
        let mut router = Server::start(BIN, &["--config", path.to_str().unwrap()]);
        let mut held = TcpStream::connect(a).unwrap();
        held.write_all(b"\x00first").unwrap();
        let mut reply = [0u8; 6];
        held.read_exact(&mut reply).unwrap();

        write_config(&path, &text(&[plain(a), proxied(b)]));
        router.signal(libc::SIGHUP);
        wait_stderr(&router, &format!("SIGHUP: listening on {b}"));
        // B asks for a PROXY header: without one a client is refused,
        // with one it is served.
        let header = b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 80\r\n";
        let mut request = header.to_vec();
        request.extend(b"\x00via-b");
        let reply = clients::send_and_receive(b, request).unwrap();
        assert_eq!(reply, b"\x00via-b", "{mode}");
        let refused = clients::send_and_receive(b, b"\x00no-header".to_vec());
        assert!(
            !matches!(refused, Ok(ref r) if r == b"\x00no-header"),
            "{mode}: {refused:?}"
        );

        write_config(&path, &text(&[plain(b)]));
        router.signal(libc::SIGHUP);
        wait_stderr(
            &router,
            &format!("SIGHUP: stopped listening on {a} (its connections go on)"),
        );
        wait_stderr(&router, &format!("SIGHUP: accept_proxy false on {b}"));
        assert_eq!(
            TcpStream::connect(a).map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::ConnectionRefused),
            "{mode}: the removed address still accepts"
        );
        assert_eq!(
            clients::send_and_receive(b, b"\x00x".to_vec()).unwrap(),
            b"\x00x"
        );
        held.write_all(b"-second").unwrap();
        let mut reply = [0u8; 7];
        held.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"-second", "{mode}");

        // Another process holds the next address: the reload fails whole.
        let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = blocker.local_addr().unwrap();
        write_config(&path, &text(&[plain(b), plain(taken)]));
        router.signal(libc::SIGHUP);
        wait_stderr(&router, &format!("cannot listen on {taken}"));
        wait_stderr(&router, "keeping the running configuration");
        assert_eq!(
            clients::send_and_receive(b, b"\x00y".to_vec()).unwrap(),
            b"\x00y"
        );
        drop(held);
        let stats = router.wait_stats(|s| s.get("active") == 0, Duration::from_secs(10));
        assert_eq!(stats.get("resets"), 0, "{mode}: {stats:?}");
    });
}

/// `--drain-delay`: on SIGTERM `/readyz` answers 503 at once while new
/// connections are still routed (a balancer checking readiness stops
/// sending before any is refused); once the delay passed the listeners
/// close, and the router exits 0 with nothing open.
#[test]
fn drain_delay_keeps_routing_while_readyz_says_draining() {
    both_modes("drain-delay", |mode| {
        const DELAY: Duration = Duration::from_millis(1500);
        let echo = Backend::echo();
        let mut router = start(
            mode,
            &[format!("preamble:echo={}", echo.addr)],
            &["--metrics", "127.0.0.1:0", "--drain-delay", "1500ms"],
        );
        let metrics = metrics_addr(&mut router);
        assert_eq!(http_get(metrics, "/readyz").0, 200, "{mode}");
        let signalled = Instant::now();
        router.signal(libc::SIGTERM);
        wait_stderr(&router, "accepting for 1s 500ms more (drain_delay)");
        assert_eq!(
            http_get(metrics, "/readyz"),
            (503, "draining\n".into()),
            "{mode}"
        );
        // Well within the delay: still routed.
        let mut served = 0;
        while signalled.elapsed() < DELAY / 2 {
            echo_through(router.addr, b"ROUTE echo\r\n", b"during the delay").unwrap();
            served += 1;
        }
        assert!(served > 0, "{mode}");
        let deadline = signalled + DELAY + Duration::from_secs(3);
        loop {
            match TcpStream::connect(router.addr) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                _ => assert!(Instant::now() < deadline, "{mode}: still accepting"),
            }
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            signalled.elapsed() >= DELAY,
            "{mode}: refused {:?} after SIGTERM, before the delay",
            signalled.elapsed()
        );
        let status = router
            .wait_exit(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{mode}: no exit after the delay"));
        assert!(status.success(), "{mode}: {status:?}");
        eprintln!("{mode}: {served} connections routed during the delay, refused after it");
    });
}

/// Lays `dir` out as the kubelet lays out a ConfigMap volume
/// (`router.toml -> ..data/router.toml`, `..data -> ..VERSION`) and puts
/// `text` in force as the kubelet does on an update: a new version
/// directory, then a rename of the `..data` link over the old one.
fn configmap_swap(dir: &Path, version: &str, text: &str) {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir(&versioned).unwrap();
    std::fs::write(versioned.join("router.toml"), text).unwrap();
    let link = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &link).unwrap();
    std::fs::rename(&link, dir.join("..data")).unwrap();
    let file = dir.join("router.toml");
    if std::fs::symlink_metadata(&file).is_err() {
        std::os::unix::fs::symlink("..data/router.toml", &file).unwrap();
    }
}

/// Asks until the answer is `want` (the reload in force), within 5 s.
fn wait_answer(addr: SocketAddr, want: &[u8], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ask(addr).unwrap() != want {
        assert!(Instant::now() < deadline, "{what}: not in force after 5 s");
        thread::sleep(Duration::from_millis(20));
    }
}

/// `--watch-config` on a configuration laid out as a Kubernetes ConfigMap
/// volume: each swap of `..data` is reloaded by itself, as on SIGHUP
/// (counted, logged as a change of the file); an invalid version is
/// logged once and the running configuration kept. Without the option a
/// swap changes nothing until SIGHUP.
#[test]
fn watch_config_reloads_when_a_configmap_volume_is_swapped() {
    both_modes("watch-config", |mode| {
        let (a, b) = (Backend::named("a"), Backend::named("b"));
        let dir = temp_dir("ops-watch");
        let config = dir.path().join("router.toml");
        configmap_swap(dir.path(), "1", &svc_config(a.addr, ""));
        let mut router = start(
            mode,
            &[],
            &[
                "--config",
                config.to_str().unwrap(),
                "--watch-config",
                "--metrics",
                "127.0.0.1:0",
            ],
        );
        let metrics = metrics_addr(&mut router);
        assert_eq!(ask(router.addr).unwrap(), b"a:ping", "{mode}");
        configmap_swap(dir.path(), "2", &svc_config(b.addr, ""));
        wait_answer(router.addr, b"b:ping", &format!("{mode}: swap to B"));
        wait_stderr(&router, "config file changed: configuration reloaded");
        configmap_swap(dir.path(), "3", "listen = [");
        wait_stderr(
            &router,
            "config file changed: the new configuration is invalid",
        );
        configmap_swap(dir.path(), "4", &svc_config(a.addr, ""));
        wait_answer(router.addr, b"a:ping", &format!("{mode}: swap back to A"));
        let m = Metrics::scrape(metrics);
        assert_eq!(m.get("router_config_reloads_total{result=\"ok\"}"), 2);
        assert_eq!(
            m.get("router_config_reloads_total{result=\"error\"}"),
            1,
            "{mode}: the invalid version is tried once"
        );
    });

    // Without the option: the file is read on SIGHUP only.
    let (a, b) = (Backend::named("a"), Backend::named("b"));
    let dir = temp_dir("ops-no-watch");
    let config = dir.path().join("router.toml");
    configmap_swap(dir.path(), "1", &svc_config(a.addr, ""));
    let router = start("copy", &[], &["--config", config.to_str().unwrap()]);
    configmap_swap(dir.path(), "2", &svc_config(b.addr, ""));
    // Three polls of a watching router.
    thread::sleep(3 * Duration::from_secs(1));
    assert_eq!(ask(router.addr).unwrap(), b"a:ping", "reloaded unasked");
    router.signal(libc::SIGHUP);
    wait_answer(router.addr, b"b:ping", "SIGHUP after the swap");
}

/// `watch_config` needs a file to watch.
#[test]
fn watch_config_without_a_config_file_is_refused_with_the_fix() {
    let output = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--route", "default=127.0.0.1:1"])
        .arg("--watch-config")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("watch_config watches the --config file: give --config FILE"),
        "{stderr}"
    );
}

/// SIGTERM: new connections are refused at once, a live connection (spliced
/// in ebpf mode) goes on transferring and completes, `/readyz` says
/// draining (`/healthz`, liveness, stays 200), and the router exits as soon as the last connection closed.
#[test]
fn sigterm_drains_live_connections_and_refuses_new_ones() {
    both_modes("drain", |mode| {
        let echo = Backend::echo();
        let mut router = start(
            mode,
            &[format!("preamble:echo={}", echo.addr)],
            &["--metrics", "127.0.0.1:0", "--drain-timeout", "60s"],
        );
        let metrics = metrics_addr(&mut router);
        let stream = clients::connect(router.addr).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = stream.try_clone().unwrap();
        writer.write_all(b"ROUTE echo\r\nbefore").unwrap();
        let mut echoed = [0u8; 6];
        reader.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"before");

        router.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpStream::connect(router.addr) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                // Accepted by the kernel before the listeners closed.
                _ => assert!(
                    Instant::now() < deadline,
                    "{mode}: still accepting 5 s after SIGTERM"
                ),
            }
            thread::sleep(Duration::from_millis(5));
        }
        // Not ready while draining; alive all the same.
        assert_eq!(http_get(metrics, "/readyz"), (503, "draining\n".into()));
        assert_eq!(http_get(metrics, "/healthz"), (200, "ok\n".into()));
        let m = Metrics::scrape(metrics);
        assert_eq!(m.get("router_draining"), 1);
        if mode == "ebpf" {
            assert_eq!(
                m.get("router_connections_served_total{mode=\"ebpf\"}"),
                1,
                "{}",
                m.0
            );
        }

        // The live connection carries 8 MiB more each way after SIGTERM.
        const SIZE: usize = 8 << 20;
        let sender = thread::spawn(move || {
            backends::write_stream(&mut writer, SIZE, 3).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let (got, hash) = backends::hash_until_eof(&mut reader).unwrap();
        sender.join().unwrap();
        assert_eq!(got, SIZE as u64, "{mode}");
        assert!(hash == backends::stream_hash(SIZE, 3), "{mode}: corrupted");
        drop((stream, reader));
        let status = router
            .wait_exit(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{mode}: no exit after the last connection closed"));
        assert!(status.success(), "{mode}: {status:?}");
        assert!(router.stderr().contains("drained: every connection ended"));
    });
}

/// A connection that outlives `--drain-timeout` is cut when it passes; a
/// second stop signal exits at once.
#[test]
fn drain_ends_at_the_timeout_or_at_a_second_signal() {
    let echo = Backend::echo();
    let route = format!("preamble:echo={}", echo.addr);
    let open_one = |router: &Server| {
        let mut stream = clients::connect(router.addr).unwrap();
        stream.write_all(b"ROUTE echo\r\nhi").unwrap();
        let mut echoed = [0u8; 2];
        stream.read_exact(&mut echoed).unwrap();
        stream
    };

    let mut router = start(
        "copy",
        std::slice::from_ref(&route),
        &["--drain-timeout", "1s"],
    );
    let _live = open_one(&router);
    let signalled = Instant::now();
    router.signal(libc::SIGTERM);
    assert!(
        router.wait_exit(Duration::from_millis(600)).is_none(),
        "exited before the drain timeout"
    );
    let status = router
        .wait_exit(Duration::from_secs(5))
        .expect("exit after the drain timeout");
    let waited = signalled.elapsed();
    assert!(status.success());
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(3)).contains(&waited),
        "exited {waited:?} after SIGTERM"
    );
    assert!(router.stderr().contains("drain_timeout (1s) passed"));

    let mut router = start("copy", &[route], &["--drain-timeout", "60s"]);
    let _live = open_one(&router);
    router.signal(libc::SIGTERM);
    assert!(router.wait_exit(Duration::from_millis(300)).is_none());
    let second = Instant::now();
    router.signal(libc::SIGINT);
    router
        .wait_exit(Duration::from_secs(2))
        .expect("exit at the second signal");
    assert!(second.elapsed() < Duration::from_secs(1));
    assert!(router.stderr().contains("second stop signal"));
}

/// Measures what a scrape costs with 1,000 live connections (each core's
/// probe holds 2,000 routes in ebpf mode): 1,000 scrapes in a row. Not a
/// pass/fail test: run with `--ignored --nocapture`.
#[test]
#[ignore = "measurement: prints the scrape cost"]
fn scrape_cost_with_a_thousand_live_connections() {
    raise_open_files_limit();
    both_modes("scrape_cost", |mode| {
        let echo = Backend::echo();
        let mut router = start(
            mode,
            &[format!("preamble:echo={}", echo.addr)],
            &["--metrics", "127.0.0.1:0"],
        );
        let metrics = metrics_addr(&mut router);
        let time_scrapes = |label: &str| {
            let mut times = Vec::with_capacity(1000);
            let mut size = 0;
            for _ in 0..1000 {
                let started = Instant::now();
                let m = Metrics::scrape(metrics);
                times.push(started.elapsed());
                size = m.0.len();
            }
            times.sort();
            let total: Duration = times.iter().sum();
            eprintln!(
                "{mode}, {label}: 1000 scrapes in {total:?}: mean {:?}, median {:?}, p99 {:?}, \
                 max {:?}; {size} bytes each",
                total / 1000,
                times[500],
                times[990],
                times[999]
            );
        };
        time_scrapes("idle");
        let live: Vec<TcpStream> = (0..1000)
            .map(|i| {
                let mut stream = clients::connect(router.addr).unwrap();
                stream.write_all(b"ROUTE echo\r\nx").unwrap();
                let mut echoed = [0u8; 1];
                stream
                    .read_exact(&mut echoed)
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                stream
            })
            .collect();
        let m = Metrics::scrape(metrics);
        assert_eq!(m.get("router_connections_active"), 1000);
        time_scrapes("1000 live connections");
        drop(live);
    });
}

fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is valid for writes; setrlimit reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A connection to `addr` from the loopback address `source`.
fn connect_from(source: [u8; 4], addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&addr.into(), clients::io_timeout())?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(clients::io_timeout()))?;
    stream.set_write_timeout(Some(clients::io_timeout()))?;
    Ok(stream)
}

/// `/healthz` stays fast while 1,000 slow clients (from 127.0.0.2) hold the
/// metrics port, each trickling a request one byte at a time, and another
/// address (127.0.0.3) opens connections as fast as it can: connections are
/// served concurrently, a client past its share gives way first, the
/// oldest past the bound, and a request that outlives its deadline is
/// closed. (Mode-independent: copy mode.)
#[test]
fn health_answers_at_once_while_a_thousand_slow_clients_hold_the_metrics_port() {
    const SLOW: usize = 1000;
    raise_open_files_limit();
    let echo = Backend::echo();
    let mut router = start(
        "copy",
        &[format!("default={}", echo.addr)],
        &["--metrics", "127.0.0.1:0"],
    );
    let metrics = metrics_addr(&mut router);
    let request = b"GET /metrics HTTP/1.1\r\nHost: slow\r\n\r\n";
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|_| {
            let mut stream = connect_from([127, 0, 0, 2], metrics).expect("a slow client connects");
            stream.write_all(&request[..1]).unwrap();
            stream
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    // Every slow client sends its next byte every 500 ms, never finishing.
    let trickle = {
        let stop = Arc::clone(&stop);
        let streams: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut sent = 1;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for mut stream in &streams {
                    let _ = stream.write_all(&request[sent % (request.len() - 4)..][..1]);
                }
                sent += 1;
                thread::sleep(Duration::from_millis(500));
            }
        })
    };
    // Connections as fast as one thread opens them, for as long as the
    // probes run (bounded in count and time), each sending a byte.
    let flood = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut opened = 0u32;
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && opened < 50_000 {
                if let Ok(mut stream) = connect_from([127, 0, 0, 3], metrics) {
                    let _ = stream.write_all(b"G");
                    held.push(stream);
                    opened += 1;
                }
                if held.len() >= 200 {
                    held.clear();
                }
            }
            opened
        })
    };
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(http_get(metrics, "/healthz"), (200, "ok\n".into()));
        worst = worst.max(started.elapsed());
        thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    let scrape = Metrics::scrape(metrics);
    let scrape_took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let flooded = flood.join().unwrap();
    eprintln!(
        "with {SLOW} slow clients and {flooded} flooding connections: /healthz worst \
         {worst:?} of 20, /metrics {scrape_took:?}"
    );
    assert!(
        flooded > 1000,
        "the flood opened only {flooded} connections"
    );
    assert!(
        worst < Duration::from_millis(500),
        "/healthz took {worst:?}"
    );
    assert!(scrape.get("router_connections_accepted_total") == 0);
    // Every slow client is closed, by eviction or at its deadline, though
    // it still sends.
    let deadline = Instant::now() + Duration::from_secs(10);
    for stream in &mut slow {
        stream
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("a slow client still held after its deadline: {other:?}"),
        }
    }
    trickle.join().unwrap();
}

/// The `/metrics` series a `stats:` key is reported as (with the same
/// value), or `None` for the keys that are labels of `router_info`.
fn series_of(key: &str) -> Option<String> {
    let series = match key {
        "mode" | "cores" | "kernel" => return None,
        "accepted" => "router_connections_accepted_total".into(),
        "active" => "router_connections_active".into(),
        "spliced" => "router_connections_served_total{mode=\"ebpf\"}".into(),
        "early" => "router_connections_spliced_early_total".into(),
        "copied" => "copy+fallback".into(),
        "sockmap_full" | "insert_failed" => format!("router_fallbacks_total{{cause=\"{key}\"}}"),
        "resets" => "router_connections_reset_total".into(),
        "userspace_bytes" => "router_userspace_bytes_total".into(),
        "slots_in_use" => "router_sockmap_slots_in_use".into(),
        "routed" => "router_connections_routed_total".into(),
        "backend_failures" => "router_backend_failures_total".into(),
        "backends_down" => "router_backends_down".into(),
        "routes" => "router_kernel_routes".into(),
        "kernel_broken" => "router_kernel_broken_streams_total".into(),
        _ => match key.strip_prefix("refused_") {
            Some(reason) => format!("router_connections_refused_total{{reason=\"{reason}\"}}"),
            None if key.starts_with("kernel_") => format!("router_{key}_total"),
            None => panic!("stats key {key} has no metric"),
        },
    };
    Some(series)
}

/// Every counter of the `stats:` line is on `/metrics` with the same value
/// (`refused_limit`, `backends_down` included), with a per-backend up gauge
/// and health-check failure counter, the standard process metrics,
/// `router_build_info`, and `/readyz` (GET and HEAD).
#[test]
fn every_stats_counter_is_on_metrics_with_backend_health_and_process_metrics() {
    both_modes("metrics_complete", |mode| {
        let echo = Backend::echo();
        let dead = backends::closed_port();
        let dir = temp_dir("ops-metrics-complete");
        let path = dir.path().join("router.toml");
        write_config(
            &path,
            &format!(
                "listen = [\"127.0.0.1:0\"]\nmode = \"{mode}\"\nmetrics = \"127.0.0.1:0\"\n\
                 max_connections = 1\n\
                 [[route]]\nname = \"echo\"\npreamble = \"echo\"\nbackends = [\"{}\"]\n\
                 [[route]]\nname = \"down\"\npreamble = \"down\"\nbackends = [\"{dead}\"]\n\
                 health_check = {{ interval = \"100ms\", fall = 2 }}\n",
                echo.addr
            ),
        );
        let mut router = Server::start(BIN, &["--config", path.to_str().unwrap()]);
        let metrics = metrics_addr(&mut router);
        assert_eq!(http_get(metrics, "/readyz"), (200, "ready\n".into()));
        assert_eq!(http_head(metrics, "/readyz"), (200, String::new()));
        assert_eq!(http_head(metrics, "/metrics").0, 200);
        wait_stderr(&router, "backend is down");
        // One connection held open, so that the next one meets the limit.
        let held = clients::connect(router.addr).unwrap();
        (&held).write_all(b"ROUTE echo\r\nheld").unwrap();
        let mut echoed = [0u8; 4];
        (&held).read_exact(&mut echoed).unwrap();
        let over = clients::send_and_receive(router.addr, b"ROUTE echo\r\nx".to_vec());
        assert!(over.is_err() || over.is_ok_and(|a| a.is_empty()), "{mode}");
        drop(held);
        router.wait_stats(|s| s.get("active") == 0, Duration::from_secs(10));
        echo_through(router.addr, b"ROUTE echo\r\n", b"payload").unwrap();

        let stats = router.wait_stats(|s| s.get("active") == 0, Duration::from_secs(10));
        let m = Metrics::when_idle(metrics);
        assert_eq!(stats.get("refused_limit"), 1, "{mode}: {stats:?}");
        assert_eq!(stats.get("backends_down"), 1, "{mode}: {stats:?}");
        for key in stats.0.keys() {
            let Some(series) = series_of(key) else {
                continue;
            };
            let on_metrics = if series == "copy+fallback" {
                m.get("router_connections_served_total{mode=\"copy\"}")
                    + m.get("router_connections_served_total{mode=\"fallback\"}")
            } else {
                m.get(&series)
            };
            assert_eq!(on_metrics, stats.get(key), "{mode}: {key} as {series}");
        }
        assert!(
            m.0.contains(&format!(
                "router_info{{version=\"{}\",mode=\"{mode}\"",
                env!("CARGO_PKG_VERSION")
            )),
            "{}",
            m.0
        );
        assert_eq!(
            m.get(&format!(
                "router_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )),
            1
        );
        let backend = |name: &str, route: &str, addr: SocketAddr| {
            m.get(&format!("{name}{{route=\"{route}\",backend=\"{addr}\"}}"))
        };
        assert_eq!(backend("router_backend_up", "down", dead), 0, "{}", m.0);
        assert_eq!(
            backend("router_backend_up", "echo", echo.addr),
            1,
            "{}",
            m.0
        );
        assert!(backend("router_backend_check_failures_total", "down", dead) >= 2);
        // The process, under the names every exporter uses.
        // Present (an idle router may not have used a clock tick yet).
        assert!(m.float("process_cpu_seconds_total") >= 0.0, "{}", m.0);
        assert!(m.float("process_resident_memory_bytes") > 1e6, "{}", m.0);
        assert!(m.float("process_open_fds") >= 5.0, "{}", m.0);
        let started = m.float("process_start_time_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            (now - 120.0..=now + 1.0).contains(&started),
            "{started} vs {now}"
        );
    });
}

/// `--route` names follow what they match, whatever the flags' order.
#[test]
fn route_flag_names_do_not_change_when_flags_are_reordered() {
    let echo = Backend::echo();
    let routes = [
        format!("preamble:one={}", echo.addr),
        format!("host:a.test={}", echo.addr),
        format!("default={}", echo.addr),
    ];
    let mut names = Vec::new();
    for order in [[0, 1, 2], [1, 0, 2]] {
        let picked: Vec<String> = order.iter().map(|i| routes[*i].clone()).collect();
        let mut router = start("copy", &picked, &["--metrics", "127.0.0.1:0"]);
        let metrics = metrics_addr(&mut router);
        let m = Metrics::scrape(metrics);
        let mut seen: Vec<&str> =
            m.0.lines()
                .filter_map(|l| l.strip_prefix("router_route_connections_total{route=\""))
                .filter_map(|l| l.split('"').next())
                .collect();
        seen.sort_unstable();
        names.push(seen.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    }
    assert_eq!(names[0], ["default", "host:a.test", "preamble:one"]);
    assert_eq!(names[0], names[1]);
}

/// `--log-level verbose` is no level: an error that lists the valid ones,
/// not a router that silently logs nothing.
#[test]
fn an_unknown_log_level_is_an_error_listing_the_levels() {
    let output = Command::new(BIN)
        .args(["--log-level", "verbose", "--listen", "127.0.0.1:0"])
        .args(["--route", "default=127.0.0.1:9"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("--log-level verbose")
            && stderr.contains("error, warn, info, debug, trace"),
        "{stderr}"
    );
}

/// A reload keeps the health of the backends it does not change: a dead
/// backend stays down, and is not logged down again after each SIGHUP.
#[test]
fn a_reload_keeps_the_health_state_of_unchanged_backends() {
    let echo = Backend::echo();
    let dead = backends::closed_port();
    let dir = temp_dir("ops-health-reload");
    let path = dir.path().join("router.toml");
    let text = |extra: &str| {
        format!(
            "listen = [\"127.0.0.1:0\"]\nmode = \"copy\"\n\
             [health_check]\ninterval = \"100ms\"\nfall = 1\n\
             [[route]]\nname = \"pool\"\ndefault = true\nbackends = [\"{dead}\", \"{}\"]\n{extra}",
            echo.addr
        )
    };
    write_config(&path, &text(""));
    let mut router = Server::start(BIN, &["--config", path.to_str().unwrap()]);
    wait_stderr(&router, "backend is down");
    for round in 0..3 {
        // A changed file (a route added before the default) and an
        // unchanged one.
        if round == 1 {
            let added = format!(
                "listen = [\"127.0.0.1:0\"]\nmode = \"copy\"\n\
                 [health_check]\ninterval = \"100ms\"\nfall = 1\n\
                 [[route]]\nname = \"other\"\nhost = \"other.test\"\nbackends = [\"{}\"]\n\
                 [[route]]\nname = \"pool\"\ndefault = true\nbackends = [\"{dead}\", \"{}\"]\n",
                echo.addr, echo.addr
            );
            write_config(&path, &added);
        }
        router.signal(libc::SIGHUP);
        let reloaded = round + 1;
        let deadline = Instant::now() + Duration::from_secs(5);
        while router.stderr().matches("configuration reloaded").count() < reloaded {
            assert!(Instant::now() < deadline, "{}", router.stderr());
            thread::sleep(Duration::from_millis(10));
        }
        // Several check intervals under the new configuration.
        thread::sleep(Duration::from_millis(500));
        let stats = router.stats();
        assert_eq!(stats.get("backends_down"), 1, "round {round}: {stats:?}");
    }
    let log = router.stderr();
    assert_eq!(
        log.matches("backend is down").count(),
        1,
        "logged down again after a reload:\n{log}"
    );
    // Every connection goes to the live backend: the dead one stayed out.
    for _ in 0..4 {
        assert_eq!(
            clients::send_and_receive(router.addr, b"\x00x".to_vec()).unwrap(),
            b"\x00x"
        );
    }
    let stats = router.wait_stats(|s| s.get("active") == 0, Duration::from_secs(10));
    assert_eq!(stats.get("backend_failures"), 0, "{stats:?}");
}
