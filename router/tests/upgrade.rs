//! Upgrading the binary (issue 24): a new router started with
//! `--upgrade-from PATH` takes the listeners over from the one offering
//! itself on `--upgrade-socket PATH`, which finishes its own connections
//! and exits. Real kernel, both modes; every load loop is bounded in count
//! and time, and only loopback addresses are used.
mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use common::{BIN, both_modes};
use testkit::{
    Server,
    backends::{self, Backend},
    budget::budget,
    clients,
    data::Rng,
    privileges::require_bpf,
    server::run_to_failure,
};

/// One upgrade test at a time: each runs two routers at once during its
/// upgrades, and io_uring's locked memory, shared by every router on the
/// machine, does not hold many more (an executor then fails to start).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A fresh upgrade socket path for one test and mode.
fn socket_path(test: &str, mode: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "router-upgrade-{test}-{mode}-{}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    path
}

fn args(mode: &str, routes: &[String], socket: &std::path::Path, from: bool) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--mode".into(),
        mode.into(),
        "--upgrade-socket".into(),
        socket.display().to_string(),
    ];
    if from {
        args.push("--upgrade-from".into());
        args.push(socket.display().to_string());
    }
    for route in routes {
        args.push("--route".into());
        args.push(route.clone());
    }
    args
}

/// The binary under test: `ROUTER_BIN` if set (the figures are measured
/// with `ROUTER_BIN=$PWD/target/release/router`), else this build's.
fn bin() -> String {
    std::env::var("ROUTER_BIN").unwrap_or_else(|_| BIN.to_owned())
}

/// The running router, offering itself on `socket`.
fn start_old(mode: &str, routes: &[String], socket: &std::path::Path, extra: &[&str]) -> Server {
    let mut command = Command::new(bin());
    command.args(args(mode, routes, socket, false)).args(extra);
    Server::start_command(&mut command)
}

/// A new router taking over from the one on `socket`; returns once it
/// reported ready (its `listening on` line comes after the old one
/// released the listeners).
fn upgrade(mode: &str, routes: &[String], socket: &std::path::Path, extra: &[&str]) -> Server {
    let mut command = Command::new(bin());
    command.args(args(mode, routes, socket, true)).args(extra);
    Server::start_command(&mut command)
}

/// Short connections at a steady rate from a few threads, until stopped or
/// `limit` passed: each sends 64 bytes (a first byte that is no known
/// protocol: the default route), reads the echo, half-closes and expects
/// the end of stream.
struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(addr: SocketAddr, per_second: u64, limit: Duration) -> Self {
        const WORKERS: u64 = 10;
        let stop = Arc::new(AtomicBool::new(false));
        let every = Duration::from_secs_f64(WORKERS as f64 / per_second as f64);
        let workers = (0..WORKERS)
            .map(|w| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let started = Instant::now();
                    let mut rng = Rng::new(w + 1);
                    let (mut ok, mut failures) = (0u64, Vec::new());
                    let mut next = started + every.mul_f64(w as f64 / WORKERS as f64);
                    let most = (limit.as_secs_f64() / every.as_secs_f64()) as u64 + 1;
                    for i in 0..most {
                        if stop.load(Ordering::Relaxed) || started.elapsed() > limit {
                            break;
                        }
                        let now = Instant::now();
                        if next > now {
                            thread::sleep(next - now);
                        }
                        next += every;
                        let mut payload = vec![0u8];
                        payload.extend(rng.bytes(63));
                        match one_exchange(addr, &payload) {
                            Ok(()) => ok += 1,
                            Err(e) => failures.push(format!("worker {w} connection {i}: {e}")),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Self { stop, workers }
    }

    /// Stops the load; returns the connections that succeeded and the
    /// failures.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = (0, Vec::new());
        for worker in self.workers {
            let (ok, failures) = worker.join().expect("load worker");
            total.0 += ok;
            total.1.extend(failures);
        }
        total
    }
}

fn one_exchange(addr: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
    let mut stream = clients::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(payload)?;
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed)?;
    if echoed != payload {
        return Err(std::io::Error::other("echo differs"));
    }
    stream.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        return Err(std::io::Error::other("bytes after the echo"));
    }
    Ok(())
}

fn connections_served(router: &mut Server) -> u64 {
    router.stats().get("routed")
}

#[test]
fn a_thousand_short_connections_a_second_through_two_upgrades_fail_none() {
    let _serial = serial();
    both_modes("upgrade_under_load", |mode| {
        let echo = Backend::echo();
        let routes = [format!("default={}", echo.addr)];
        let socket = socket_path("load", mode);
        let mut old = start_old(mode, &routes, &socket, &[]);
        let addr = old.addr;
        let load = Load::start(addr, 1000, Duration::from_secs(20));
        thread::sleep(Duration::from_millis(1000));
        let before = connections_served(&mut old);
        assert!(before > 0, "{mode}: the load reached the router");
        let mut new = upgrade(mode, &routes, &socket, &[]);
        assert_eq!(new.addr, addr, "{mode}: the same address");
        old.assert_exits_ok(
            Duration::from_secs(10),
            &format!("{mode}: the old router finished its connections and exited"),
        );
        thread::sleep(Duration::from_millis(1000));
        let mut newer = upgrade(mode, &routes, &socket, &[]);
        new.assert_exits_ok(
            Duration::from_secs(10),
            &format!("{mode}: the second router exited"),
        );
        thread::sleep(Duration::from_millis(1000));
        let (ok, failures) = load.finish();
        let served = connections_served(&mut newer);
        assert!(
            failures.is_empty(),
            "{mode}: {} of {} connections failed: {:?}\nold:\n{}\nnew:\n{}\nnewer:\n{}",
            failures.len(),
            ok + failures.len() as u64,
            &failures[..failures.len().min(5)],
            old.stderr(),
            new.stderr(),
            newer.stderr()
        );
        assert!(ok >= 2500, "{mode}: {ok} connections in ~3 s at 1,000/s");
        assert!(served > 0, "{mode}: the last router served some");
        assert!(
            newer.stderr().contains("took over the listeners"),
            "{mode}: {}",
            newer.stderr()
        );
        newer.stop();
    });
}

#[test]
fn a_new_binary_that_fails_or_is_refused_leaves_the_old_one_serving() {
    let _serial = serial();
    both_modes("upgrade_failure", |mode| {
        let echo = Backend::echo();
        let routes = [format!("default={}", echo.addr)];
        let socket = socket_path("failure", mode);
        let mut old = start_old(mode, &routes, &socket, &[]);
        let load = Load::start(old.addr, 500, Duration::from_secs(30));
        thread::sleep(Duration::from_millis(500));

        // Crashes half-way: it received the listeners and started its
        // executors, then aborts before it accepts.
        let (status, stderr) = run_to_failure(
            Command::new(bin())
                .args(args(mode, &routes, &socket, true))
                .env("ROUTER_UPGRADE_FAULT", "before-ready"),
        );
        assert!(!status.success(), "{mode}: the faulty binary failed");
        assert!(stderr.contains("before-ready"), "{mode}: {stderr}");
        old.wait_stderr("upgrade failed", Duration::from_secs(10));
        assert!(
            old.wait_exit(Duration::ZERO).is_none(),
            "{mode}: old one alive"
        );

        // Refused: another core count.
        let (status, stderr) = run_to_failure(
            Command::new(bin())
                .args(args(mode, &routes, &socket, true))
                .args(["--cores", "1"]),
        );
        assert!(!status.success(), "{mode}: the refused binary failed");
        assert!(
            stderr.contains("refused the upgrade") && stderr.contains("--cores"),
            "{mode}: says why and how to fix it: {stderr}"
        );
        old.wait_stderr("upgrade refused", Duration::from_secs(10));

        // A config it refuses: it never reaches the old one.
        let (status, stderr) = run_to_failure(
            Command::new(bin())
                .args(args(mode, &routes, &socket, true))
                .args(["--route", "nonsense"]),
        );
        assert!(!status.success(), "{mode}: {stderr}");
        thread::sleep(Duration::from_millis(500));
        assert!(
            old.wait_exit(Duration::ZERO).is_none(),
            "{mode}: old one alive"
        );

        // And a good one still takes over afterwards.
        let new = upgrade(mode, &routes, &socket, &[]);
        old.assert_exits_ok(Duration::from_secs(10), mode);
        thread::sleep(Duration::from_millis(500));
        let (ok, failures) = load.finish();
        assert!(
            failures.is_empty(),
            "{mode}: {} failed of {}: {:?}\nold:\n{}\nnew:\n{}",
            failures.len(),
            ok + failures.len() as u64,
            &failures[..failures.len().min(5)],
            old.stderr(),
            new.stderr()
        );
        assert!(ok > 500, "{mode}: {ok} connections");
        new.stop();
    });
}

/// Right after the new router reported ready (`upgrade` returned): the old
/// one exits, successfully, within 1 s.
fn old_exits_within_a_second(old: &mut Server, mode: &str) {
    let ready = Instant::now();
    old.assert_exits_ok(Duration::from_secs(5), mode);
    let took = ready.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "{mode}: the old router exited {took:?} after the new one was ready"
    );
}

#[test]
fn an_idle_old_router_exits_within_a_second_and_the_new_one_holds_what_it_held() {
    let _serial = serial();
    both_modes("upgrade_exit", |mode| {
        let echo = Backend::echo();
        let routes = [format!("default={}", echo.addr)];
        let socket = socket_path("exit", mode);
        let mut old = start_old(mode, &routes, &socket, &["--stats"]);
        let mut payload = vec![0u8];
        payload.extend(b"warm up");
        one_exchange(old.addr, &payload).unwrap();
        old.wait_stats(common::idle, Duration::from_secs(5));
        let fds_before = old.fd_count();
        let mut new = upgrade(mode, &routes, &socket, &["--stats"]);
        old_exits_within_a_second(&mut old, mode);
        one_exchange(new.addr, &payload).unwrap();
        new.wait_stats(common::idle, Duration::from_secs(5));
        let fds_after = new.fd_count();
        assert_eq!(
            fds_after, fds_before,
            "{mode}: the new router holds as many descriptors as the old one did"
        );
        assert!(
            !socket.exists() || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
            "{mode}: the upgrade socket is the new router's"
        );
        new.stop();
        assert!(!socket.exists(), "{mode}: removed at exit");
    });
}

/// The `/metrics` address a router printed.
fn metrics_addr(router: &mut Server) -> SocketAddr {
    let line = router.next_line(|l| l.contains("metrics on"), Duration::from_secs(5));
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"))
}

/// One series of a `/metrics` scrape (0 if absent).
fn metric(addr: SocketAddr, series: &str) -> u64 {
    let mut stream = clients::connect(addr).expect("connect to /metrics");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |value| value.parse().unwrap())
}

#[test]
fn an_idle_connection_opened_before_the_upgrade_goes_on_through_the_new_router() {
    let _serial = serial();
    both_modes("upgrade_idle", |mode| {
        let echo = Backend::echo();
        let routes = [format!("default={}", echo.addr)];
        let socket = socket_path("idle", mode);
        let mut old = start_old(mode, &routes, &socket, &["--metrics", "127.0.0.1:0"]);
        let metrics = metrics_addr(&mut old);
        let mut client = clients::connect(old.addr).unwrap();
        let exchange = |client: &mut std::net::TcpStream, bytes: &[u8]| {
            client.write_all(bytes).unwrap();
            let mut echoed = vec![0u8; bytes.len()];
            client.read_exact(&mut echoed).unwrap();
            assert_eq!(echoed, bytes, "{mode}: echoed");
        };
        let first = [&[0u8][..], &[7u8; 999]].concat();
        exchange(&mut client, &first);
        thread::sleep(Duration::from_millis(200));
        let mut new = upgrade(mode, &routes, &socket, &["--metrics", "127.0.0.1:0"]);
        old_exits_within_a_second(&mut old, mode);
        assert!(
            old.stderr().contains("1 connection(s) handed over"),
            "{mode}: {}",
            old.stderr()
        );
        assert_eq!(metrics_addr(&mut new), metrics, "{mode}: same /metrics");
        // The old process is gone: only the new one can answer.
        let second = vec![9u8; 5000];
        exchange(&mut client, &second);
        client.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{mode}");
        // Its counters go on in the new process: every byte, before and
        // after the upgrade, once it ended.
        let total = (first.len() + second.len()) as u64;
        let deadline = Instant::now() + Duration::from_secs(5);
        let series = |direction| {
            format!("router_route_bytes_total{{route=\"default\",direction=\"{direction}\"}}")
        };
        while metric(metrics, &series("to_backend")) < total {
            assert!(
                Instant::now() < deadline,
                "{mode}: counted in the new /metrics"
            );
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(metric(metrics, &series("to_backend")), total, "{mode}");
        assert_eq!(metric(metrics, &series("to_client")), total, "{mode}");
        let stats = new.wait_stats(common::idle, Duration::from_secs(5));
        assert_eq!(stats.get("slots_in_use"), 0, "{mode}: no slot leaks");
        if mode == "ebpf" {
            assert_eq!(routes_left(&new), 0, "{mode}: no route leaks");
        }
        new.stop();
    });
}

/// Entries left in the `ROUTES` maps a router holds (its own probe's and
/// those it adopted), read with bpftool: a route not removed is a leak.
fn routes_left(router: &Server) -> usize {
    let bpftool = |args: &[&str]| -> serde_json::Value {
        let output = Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .expect("bpftool");
        serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null)
    };
    router
        .bpf_objects()
        .1
        .into_iter()
        .map(|id| id.to_string())
        .filter(|id| bpftool(&["map", "show", "id", id])["name"] == "ROUTES")
        .map(|id| {
            bpftool(&["map", "dump", "id", &id])
                .as_array()
                .map_or(0, Vec::len)
        })
        .sum()
}

/// A backend for the stream test: reads `[0][seed][size]` (the first byte
/// routes to the default route), then sends `size` bytes of the stream
/// seeded `seed + 1` while hashing what comes until the client's end of
/// stream, and reports `(seed, bytes, SHA-256)`.
fn stream_backend(reports: mpsc::Sender<(u64, u64, [u8; 32])>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let reports = reports.clone();
            thread::spawn(move || {
                let mut stream = stream;
                let mut head = [0u8; 17];
                if stream.read_exact(&mut head).is_err() {
                    return;
                }
                let seed = u64::from_le_bytes(head[1..9].try_into().unwrap());
                let size = u64::from_le_bytes(head[9..17].try_into().unwrap());
                let mut writer = stream.try_clone().unwrap();
                let sender = thread::spawn(move || {
                    let _ = backends::write_stream(&mut writer, size as usize, seed + 1);
                    let _ = writer.shutdown(Shutdown::Write);
                });
                if let Ok((bytes, hash)) = backends::hash_until_eof(&stream) {
                    let _ = reports.send((seed, bytes, hash));
                }
                let _ = sender.join();
            });
        }
    });
    addr
}

/// 64 streams (random sizes each way up to `UPGRADE_STREAM_MAX_MIB`, 64
/// by default, 256 for the full size) through upgrades in a row,
/// started while they run: every byte arrives once, in order, both ways
/// (SHA-256). `modes`: the first router's mode, then each new one's.
/// `extra`: more flags for every router.
fn streams_through_upgrades(modes: &[&str], extra: &[&str]) {
    const STREAMS: u64 = 64;
    let upgrades = modes.len() - 1;
    let mode = &*modes.join("->");
    let max = common::scale("UPGRADE_STREAM_MAX_MIB", 64) << 20;
    let (reports, received) = mpsc::channel();
    let backend = stream_backend(reports);
    let routes = [format!("default={backend}")];
    let socket = socket_path(&format!("streams{upgrades}"), &modes.join("-"));
    let flags = [&["--stats"][..], extra].concat();
    let mut router = start_old(modes[0], &routes, &socket, &flags);
    let addr = router.addr;
    let mut rng = Rng::new(upgrades as u64);
    let sizes: Vec<(u64, u64)> = (0..STREAMS)
        .map(|_| (rng.range(1, max), rng.range(1, max)))
        .collect();
    let clients: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(up, down))| {
            let seed = 1000 * (i as u64 + 1);
            thread::spawn(move || -> Result<(u64, [u8; 32]), String> {
                let stream = clients::connect(addr).map_err(|e| format!("connect: {e}"))?;
                stream
                    .set_read_timeout(Some(budget(Duration::from_secs(60))))
                    .unwrap();
                let mut writer = stream.try_clone().unwrap();
                let sender = thread::spawn(move || -> std::io::Result<()> {
                    let mut head = vec![0u8];
                    head.extend(seed.to_le_bytes());
                    head.extend(down.to_le_bytes());
                    writer.write_all(&head)?;
                    backends::write_stream(&mut writer, up as usize, seed)?;
                    writer.shutdown(Shutdown::Write)
                });
                let received = backends::hash_until_eof(&stream);
                sender
                    .join()
                    .unwrap()
                    .map_err(|e| format!("stream {i} sending: {e}"))?;
                received.map_err(|e| format!("stream {i} receiving: {e}"))
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let mut handed = 0;
    let mut olds = Vec::new();
    for (n, next_mode) in modes[1..].iter().enumerate() {
        let next = upgrade(next_mode, &routes, &socket, &flags);
        router.assert_exits_ok(
            budget(Duration::from_secs(40)),
            &format!("{mode}: upgrade {n}: the old router finished"),
        );
        handed += router
            .stderr()
            .lines()
            .find(|l| l.contains("handed over to process"))
            .and_then(|l| {
                l.split("handed=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        olds.push(std::mem::replace(&mut router, next));
    }
    let logs = || {
        olds.iter()
            .map(Server::stderr)
            .chain([router.stderr()])
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    for (i, client) in clients.into_iter().enumerate() {
        let (up, down) = sizes[i];
        let seed = 1000 * (i as u64 + 1);
        let (bytes, hash) = client
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{mode}: {e}\n{}", logs()));
        assert_eq!(bytes, down, "{mode}: stream {i} to the client: bytes");
        assert!(
            hash == backends::stream_hash(down as usize, seed + 1),
            "{mode}: stream {i} to the client: SHA-256 differs"
        );
        let _ = up;
    }
    let mut by_seed = std::collections::HashMap::new();
    for _ in 0..STREAMS {
        // A backend connection that failed to read to its end never reports.
        let Ok((seed, bytes, hash)) = received.recv_timeout(budget(Duration::from_secs(30))) else {
            let missing: Vec<usize> = (0..STREAMS as usize)
                .filter(|i| !by_seed.contains_key(&(1000 * (*i as u64 + 1))))
                .collect();
            panic!(
                "{mode}: streams {missing:?} did not reach their backend's end\n{}",
                logs()
            );
        };
        by_seed.insert(seed, (bytes, hash));
    }
    for (i, &(up, _)) in sizes.iter().enumerate() {
        let seed = 1000 * (i as u64 + 1);
        let (bytes, hash) = by_seed[&seed];
        assert_eq!(bytes, up, "{mode}: stream {i} to the backend: bytes");
        assert!(
            hash == backends::stream_hash(up as usize, seed),
            "{mode}: stream {i} to the backend: SHA-256 differs"
        );
    }
    let stats = router.wait_stats(common::idle, Duration::from_secs(10));
    assert_eq!(stats.get("slots_in_use"), 0, "{mode}: no slot leaks");
    if modes.contains(&"ebpf") {
        // The last router holds the maps of every ebpf router before it.
        assert_eq!(routes_left(&router), 0, "{mode}: no route leaks");
    }
    eprintln!("{mode}: {upgrades} upgrade(s), {handed} connection hand-overs in all");
    router.stop();
}

#[test]
fn sixty_four_streams_go_through_an_upgrade_intact() {
    let _serial = serial();
    both_modes("upgrade_streams_1", |mode| {
        streams_through_upgrades(&[mode, mode], &[]);
        if mode == "ebpf" {
            // Spliced from the first packet on, not past a threshold.
            streams_through_upgrades(&[mode, mode], &["--splice-after", "0"]);
        }
    });
}

#[test]
fn sixty_four_streams_go_through_three_upgrades_in_a_row_intact() {
    let _serial = serial();
    both_modes("upgrade_streams_3", |mode| {
        streams_through_upgrades(&[mode; 4], &[])
    });
}

/// An upgrade may change `--mode`: a copy router keeps the spliced
/// connections it takes over in the maps they are in, and copies the rest;
/// an ebpf router copies the copied ones it takes over to their end.
#[test]
fn sixty_four_streams_go_through_upgrades_that_change_the_mode_intact() {
    let _serial = serial();
    if require_bpf("upgrade_streams_mode_change") {
        streams_through_upgrades(&["ebpf", "copy", "ebpf"], &[]);
        streams_through_upgrades(&["copy", "ebpf", "copy"], &[]);
    }
}

/// A backend that keeps every connection and never reads; the connections
/// it holds.
fn holding_backend() -> (SocketAddr, Arc<Mutex<Vec<std::net::TcpStream>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&held);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            keep.lock().unwrap().push(stream);
        }
    });
    (addr, held)
}

/// 150 connections blocked on a backend that does not read yet (every
/// buffer between client and backend full) go through an upgrade: once
/// the backend reads, every byte arrives, in order. The clients end their
/// streams only after the upgrade: a connection whose end waits for a
/// backend to read is not quiet, and stays with the old process.
#[test]
fn connections_blocked_on_a_backend_that_does_not_read_go_through_an_upgrade_intact() {
    const CONNECTIONS: u64 = 150;
    const SIZE: usize = 3 << 20;
    let _serial = serial();
    both_modes("upgrade_unwritten", |mode| {
        let (backend, held) = holding_backend();
        let routes = [format!("default={backend}")];
        let socket = socket_path("unwritten", mode);
        let mut old = start_old(mode, &routes, &socket, &[]);
        let addr = old.addr;
        let upgraded = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CONNECTIONS)
            .map(|seed| {
                let upgraded = Arc::clone(&upgraded);
                thread::spawn(move || -> std::io::Result<()> {
                    let mut stream = std::net::TcpStream::connect(addr)?;
                    stream.write_all(&[0])?;
                    backends::write_stream(&mut stream, SIZE, seed)?;
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !upgraded.load(Ordering::Relaxed) && Instant::now() < deadline {
                        thread::sleep(Duration::from_millis(10));
                    }
                    stream.shutdown(Shutdown::Write)
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while held.lock().unwrap().len() < CONNECTIONS as usize && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(held.lock().unwrap().len(), CONNECTIONS as usize, "{mode}");
        // The router's buffers fill.
        thread::sleep(Duration::from_millis(500));
        let new = upgrade(mode, &routes, &socket, &[]);
        old.assert_exits_ok(Duration::from_secs(30), mode);
        assert!(
            old.stderr()
                .contains(&format!("{CONNECTIONS} connection(s) handed over")),
            "{mode}: {}",
            old.stderr()
        );
        upgraded.store(true, Ordering::Relaxed);
        let streams = std::mem::take(&mut *held.lock().unwrap());
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut stream| {
                thread::spawn(move || {
                    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                    let mut first = [0u8; 1];
                    stream.read_exact(&mut first)?;
                    backends::hash_until_eof(&stream)
                })
            })
            .collect();
        let expected: std::collections::HashSet<_> = (0..CONNECTIONS)
            .map(|seed| backends::stream_hash(SIZE, seed))
            .collect();
        for reader in readers {
            let (bytes, hash) = reader
                .join()
                .unwrap()
                .expect("the backend reads to the end");
            assert_eq!(bytes, SIZE as u64, "{mode}: bytes of one connection");
            assert!(
                expected.contains(&hash),
                "{mode}: a connection's SHA-256 differs"
            );
        }
        for client in clients {
            client.join().unwrap().expect("the client wrote everything");
        }
        new.stop();
    });
}

/// The hand-over figures of docs/operations.md: N idle forwarded
/// connections (`UPGRADE_FIGURE_CONNECTIONS`, default `1,1000,9800`; 9,800
/// needs 20,000 descriptors, as the test holds both ends), one upgrade,
/// and how long the hand-over took as both routers log it. Ignored: run
/// with `--ignored --nocapture`.
#[test]
#[ignore = "a measurement: run it with --ignored --nocapture"]
fn hand_over_time_for_n_connections() {
    let _serial = serial();
    let counts: Vec<usize> = std::env::var("UPGRADE_FIGURE_CONNECTIONS")
        .unwrap_or_else(|_| "1,1000,9800".into())
        .split(',')
        .map(|n| n.trim().parse().expect("a number"))
        .collect();
    both_modes("upgrade_figures", |mode| {
        for &n in &counts {
            let (backend, held) = holding_backend();
            let routes = [format!("default={backend}")];
            let socket = socket_path(&format!("figures{n}"), mode);
            let mut old = start_old(mode, &routes, &socket, &["--stats", "--log-level", "info"]);
            let started = Instant::now();
            let clients: Vec<_> = (0..n)
                .map(|_| {
                    let mut c = clients::connect(old.addr).unwrap();
                    c.write_all(&[0, 1, 2, 3]).unwrap();
                    c
                })
                .collect();
            old.wait_stats(
                |s| s.get("routed") == n as u64 && held.lock().unwrap().len() == n,
                Duration::from_secs(120),
            );
            let opened = started.elapsed();
            let new = upgrade(mode, &routes, &socket, &["--stats"]);
            old.assert_exits_ok(Duration::from_secs(60), "the old router");
            let field = |text: &str, line: &str, key: &str| -> String {
                text.lines()
                    .find(|l| l.contains(line))
                    .and_then(|l| l.split(&format!("{key}=")).nth(1))
                    .and_then(|v| v.split_whitespace().next())
                    .unwrap_or("?")
                    .to_owned()
            };
            let old_log = old.stderr();
            let new_log = new.stderr();
            eprintln!(
                "figure: mode={mode} connections={n} handed={} left={} old_collect_ms={} \
                 old_total_ms={} new_ready_to_taken_ms={} (opening them took {opened:?})",
                field(&old_log, "handed over to process", "handed"),
                field(&old_log, "handed over to process", "left"),
                field(&old_log, "handed over to process", "collect_ms"),
                field(&old_log, "handed over to process", "total_ms"),
                field(&new_log, "took over the listeners and", "took_ms"),
            );
            drop(clients);
            drop(new);
            held.lock().unwrap().clear();
        }
    });
}

/// The pause figure of docs/operations.md: one connection exchanging 64
/// bytes with an echo backend every millisecond, one upgrade after 1 s;
/// the longest round trip in the upgrade's second against the longest
/// elsewhere, for a copied, a lazy (still copying) and a spliced
/// connection, beside `UPGRADE_PAUSE_IDLE` idle ones (default 0). Ignored:
/// run with `--ignored --nocapture`.
#[test]
#[ignore = "a measurement: run it with --ignored --nocapture"]
fn longest_round_trip_of_a_busy_connection_through_an_upgrade() {
    let _serial = serial();
    let idle = common::scale("UPGRADE_PAUSE_IDLE", 0) as usize;
    let echo = Backend::echo();
    let (holder, held) = holding_backend();
    let routes = [
        format!("preamble:idle={holder}"),
        format!("default={}", echo.addr),
    ];
    let cases: [(&str, &[&str]); 3] = [
        ("copy", &[]),
        ("ebpf", &["--splice-after", "1000000000"]),
        ("ebpf", &[]),
    ];
    for (mode, extra) in cases {
        if mode == "ebpf" && !require_bpf("upgrade_pause") {
            continue;
        }
        let socket = socket_path("pause", mode);
        let mut old = start_old(mode, &routes, &socket, extra);
        let idlers: Vec<_> = (0..idle)
            .map(|_| {
                let mut c = clients::connect(old.addr).unwrap();
                c.write_all(b"ROUTE idle\r\n").unwrap();
                c
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while held.lock().unwrap().len() < idle && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(held.lock().unwrap().len(), idle, "idle connections routed");
        let mut client = clients::connect(old.addr).unwrap();
        client.set_nodelay(true).unwrap();
        let (mut in_upgrade, mut elsewhere) = (Duration::ZERO, Duration::ZERO);
        let round_trip = |client: &mut std::net::TcpStream, byte: u8| {
            let sent = Instant::now();
            client.write_all(&[byte; 64]).unwrap();
            let mut echoed = [0u8; 64];
            client.read_exact(&mut echoed).unwrap();
            assert_eq!(echoed, [byte; 64]);
            sent.elapsed()
        };
        // The first byte routes to the default route.
        round_trip(&mut client, 0);
        let upgrader = thread::spawn({
            let (routes, socket) = (routes.clone(), socket.clone());
            let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            move || {
                thread::sleep(Duration::from_secs(1));
                let started = Instant::now();
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                (started, upgrade(mode, &routes, &socket, &extra))
            }
        });
        let began = Instant::now();
        let mut trips = Vec::new();
        while began.elapsed() < Duration::from_secs(3) {
            let at = Instant::now();
            trips.push((at, round_trip(&mut client, 1)));
            thread::sleep(Duration::from_millis(1));
        }
        let (started, new) = upgrader.join().unwrap();
        for (at, took) in &trips {
            let window = *at >= started && *at < started + Duration::from_secs(1);
            let longest = if window {
                &mut in_upgrade
            } else {
                &mut elsewhere
            };
            *longest = (*longest).max(*took);
        }
        assert!(old.wait_exit(Duration::from_secs(10)).is_some());
        eprintln!(
            "figure: mode={mode} {extra:?}, {idle} idle: {} round trips; longest in the \
             upgrade's second {in_upgrade:.1?}, elsewhere {elsewhere:.1?}",
            trips.len()
        );
        drop((client, idlers));
        held.lock().unwrap().clear();
        new.stop();
    }
}

#[test]
fn upgrade_from_a_socket_nothing_offers_starts_afresh_and_offers_itself() {
    let _serial = serial();
    let echo = Backend::echo();
    let routes = [format!("default={}", echo.addr)];
    let socket = socket_path("afresh", "copy");
    // A file nothing listens on: what a killed router leaves.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut first = upgrade("copy", &routes, &socket, &[]);
    assert!(
        first.stderr().contains("starting afresh"),
        "{}",
        first.stderr()
    );
    let mut payload = vec![0u8];
    payload.extend(b"first");
    one_exchange(first.addr, &payload).unwrap();
    // And the next one takes over from it, as a systemd template's other
    // instance does.
    let second = upgrade("copy", &routes, &socket, &[]);
    first.assert_exits_ok(Duration::from_secs(5), "the first router");
    one_exchange(second.addr, &payload).unwrap();
    second.stop();
}
