//! Specification of `ebpf-echo`, tested against the real kernel: each test
//! starts the binary on a free loopback port and talks to it over TCP.
use std::{
    io::{Read, Write},
    net::TcpListener,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use testkit::{
    Server, Stats,
    budget::budget,
    clients::{self, exchange_then_close, send_and_receive},
    data::Rng,
    no_sockmap::without_sockmap,
    privileges::require_bpf,
    server::run_to_failure,
};

const BIN: &str = env!("CARGO_BIN_EXE_ebpf-echo");

fn start(mode: &str, cores: Option<usize>, extra: &[&str]) -> Server {
    let cores = cores.map(|c| c.to_string());
    let mut args = vec!["--listen", "127.0.0.1:0", "--mode", mode];
    if let Some(cores) = &cores {
        args.extend(["--cores", cores]);
    }
    args.extend(extra);
    Server::start(BIN, &args)
}

fn idle(stats: &Stats) -> bool {
    stats.get("active") == 0
}

/// 64 concurrent clients, each sending a random size from 1 B to 4 MiB,
/// must get exactly their bytes back; then the counters must show who
/// carried the bytes: the probe in `ebpf` mode, userspace in `copy` mode.
/// Clients half-close only after their echo, so every socket is still
/// established when the server inserts it (see
/// `clients_that_close_at_once_are_echoed_in_full` for the other case).
fn concurrent_clients(mode: &str, cores: Option<usize>, seed: u64) {
    const CLIENTS: usize = 64;
    // An in-flight limit above the largest payload: the kernel never needs
    // to hand bytes to userspace, so userspace must read none.
    let mut server = start(mode, cores, &["--in-flight-limit", "67108864"]);
    let addr = server.addr;
    let mut rng = Rng::new(seed);
    let payloads: Vec<Vec<u8>> = (0..CLIENTS)
        .map(|_| {
            let size = rng.range(1, 4 << 20) as usize;
            rng.bytes(size)
        })
        .collect();
    let total: u64 = payloads.iter().map(|p| p.len() as u64).sum();
    let clients: Vec<_> = payloads
        .into_iter()
        .enumerate()
        .map(|(i, payload)| {
            thread::spawn(move || match exchange_then_close(addr, payload.clone()) {
                Ok(received) if received == payload => Ok(()),
                Ok(_) => Err(format!("client {i}: echoed bytes differ")),
                Err(e) => Err(format!("client {i} ({} bytes): {e}", payload.len())),
            })
        })
        .collect();
    let failures: Vec<String> = clients
        .into_iter()
        .filter_map(|c| c.join().expect("client thread").err())
        .collect();
    let stats = server.wait_stats(idle, Duration::from_secs(10));
    assert!(failures.is_empty(), "{failures:?}\n{stats:?}");
    assert_eq!(stats.get("accepted"), CLIENTS as u64);
    assert_eq!(stats.get("resets"), 0);
    match mode {
        "ebpf" => {
            assert_eq!(stats.get("spliced"), CLIENTS as u64, "{stats:?}");
            assert_eq!(stats.get("kernel_redirected_bytes"), total, "{stats:?}");
            assert_eq!(stats.get("userspace_bytes"), 0, "{stats:?}");
            assert_eq!(stats.get("kernel_passed_bytes"), 0, "{stats:?}");
            assert_eq!(stats.get("routes"), 0, "{stats:?}");
            assert_eq!(stats.get("slots_in_use"), 0, "{stats:?}");
        }
        _ => {
            assert_eq!(stats.get("copied"), CLIENTS as u64, "{stats:?}");
            assert_eq!(stats.get("userspace_bytes"), total, "{stats:?}");
            assert_eq!(stats.text("kernel"), Some("not-loaded"), "{stats:?}");
        }
    }
}

#[test]
fn ebpf_mode_all_cores_echoes_64_concurrent_clients_in_the_kernel() {
    if require_bpf("ebpf_mode_all_cores") {
        concurrent_clients("ebpf", None, 1);
    }
}

#[test]
fn ebpf_mode_one_core_echoes_64_concurrent_clients_in_the_kernel() {
    if require_bpf("ebpf_mode_one_core") {
        concurrent_clients("ebpf", Some(1), 2);
    }
}

#[test]
fn copy_mode_all_cores_echoes_64_concurrent_clients_in_userspace() {
    concurrent_clients("copy", None, 3);
}

#[test]
fn copy_mode_one_core_echoes_64_concurrent_clients_in_userspace() {
    concurrent_clients("copy", Some(1), 4);
}

/// A client that sends 5 bytes at once and waits (no FIN) must get them back
/// within 1 s, although they may reach the socket before it is in the
/// SockMap. Many clients at once make that early arrival certain for some.
fn early_bytes(mode: &str) -> Stats {
    const CLIENTS: usize = 32;
    let mut server = start(mode, None, &[]);
    let addr = server.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            thread::spawn(move || {
                let mut stream = clients::connect(addr).expect("connect");
                let message = format!("{:05}", i % 100_000);
                stream.write_all(message.as_bytes()).expect("send");
                stream
                    .set_read_timeout(Some(Duration::from_secs(1)))
                    .unwrap();
                let start = Instant::now();
                let mut echoed = [0u8; 5];
                stream
                    .read_exact(&mut echoed)
                    .unwrap_or_else(|e| panic!("client {i}: no echo within 1 s: {e}"));
                assert!(start.elapsed() < Duration::from_secs(1));
                assert_eq!(&echoed, message.as_bytes(), "client {i}");
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread");
    }
    server.stats()
}

#[test]
fn ebpf_mode_echoes_bytes_sent_before_the_insert_within_a_second() {
    if require_bpf("early_bytes_ebpf") {
        let stats = early_bytes("ebpf");
        // The path under test was taken: bytes were queued before the insert.
        assert!(stats.get("early") > 0, "{stats:?}");
        assert_eq!(stats.get("userspace_bytes"), 0, "{stats:?}");
    }
}

#[test]
fn copy_mode_echoes_bytes_at_once() {
    early_bytes("copy");
}

/// 10,000 sequential connections must leave no route, slot or descriptor
/// behind.
#[test]
fn ten_thousand_sequential_connections_leave_the_maps_empty() {
    if !require_bpf("ten_thousand_sequential") {
        return;
    }
    const CONNECTIONS: u64 = 10_000;
    let mut server = start("ebpf", None, &[]);
    let fds_before = server.fd_count();
    // (Payloads are tiny: the in-flight limit is never reached.)
    let limit = budget(Duration::from_secs(240));
    let deadline = Instant::now() + limit;
    for i in 0..CONNECTIONS {
        let payload = format!("connection {i:06}").into_bytes();
        let received = exchange_then_close(server.addr, payload.clone())
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(received, payload, "connection {i}");
        assert!(
            Instant::now() < deadline,
            "10,000 connections took over {limit:?} (at connection {i})"
        );
    }
    let stats = server.wait_stats(idle, Duration::from_secs(10));
    assert_eq!(stats.get("accepted"), CONNECTIONS);
    assert_eq!(stats.get("spliced"), CONNECTIONS, "{stats:?}");
    assert_eq!(stats.get("routes"), 0, "{stats:?}");
    assert_eq!(stats.get("slots_in_use"), 0, "{stats:?}");
    assert_eq!(stats.get("userspace_bytes"), 0, "{stats:?}");
    assert_eq!(server.fd_count(), fds_before, "descriptors leaked");
}

/// A client that sends and closes at once may have its FIN arrive before the
/// server inserts the socket; the kernel then refuses the insert, and the
/// connection must be echoed by userspace, in full.
#[test]
fn clients_that_close_at_once_are_echoed_in_full() {
    if !require_bpf("close_at_once") {
        return;
    }
    const CONNECTIONS: u64 = 300;
    let mut server = start("ebpf", None, &[]);
    let mut rng = Rng::new(5);
    for i in 0..CONNECTIONS {
        let size = rng.range(1, 64 << 10) as usize;
        let payload = rng.bytes(size);
        let received = send_and_receive(server.addr, payload.clone())
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(received == payload, "connection {i}: echo differs");
    }
    let stats = server.wait_stats(idle, Duration::from_secs(10));
    assert_eq!(stats.get("spliced") + stats.get("copied"), CONNECTIONS);
    assert_eq!(stats.get("copied"), stats.get("insert_failed"), "{stats:?}");
    assert_eq!(stats.get("resets"), 0, "{stats:?}");
    assert_eq!(stats.get("routes"), 0, "{stats:?}");
}

/// A client that reads its echo slower than it sends gets every byte back:
/// past the in-flight limit the probe hands bytes to userspace, whose writes
/// TCP flow control holds back, and the kernel takes over again after.
#[test]
fn a_slow_reading_client_gets_every_byte_back() {
    if !require_bpf("slow_reader") {
        return;
    }
    const SIZE: usize = 32 << 20;
    let mut server = start("ebpf", Some(1), &["--in-flight-limit", "262144"]);
    let stream = clients::connect(server.addr).unwrap();
    let payload = Rng::new(7).bytes(SIZE);
    let mut writer = stream.try_clone().unwrap();
    let sent = payload.clone();
    let sender = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut received = Vec::with_capacity(SIZE);
    let mut chunk = vec![0u8; 64 << 10];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = (&stream).read(&mut chunk).expect("read echo");
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
        // About 30 MB/s: far slower than the sender.
        thread::sleep(Duration::from_millis(2));
        assert!(Instant::now() < deadline, "slow echo took over 60 s");
    }
    sender.join().unwrap();
    assert!(
        received == payload,
        "echo differs ({} of {SIZE} bytes)",
        received.len()
    );
    let stats = server.wait_stats(idle, Duration::from_secs(10));
    assert_eq!(stats.get("resets"), 0, "{stats:?}");
    assert!(stats.get("kernel_credit_exhausted") > 0, "{stats:?}");
    assert_eq!(
        stats.get("kernel_redirected_bytes") + stats.get("kernel_passed_bytes"),
        SIZE as u64,
        "{stats:?}"
    );
    assert_eq!(
        stats.get("userspace_bytes"),
        stats.get("kernel_passed_bytes"),
        "{stats:?}"
    );
}

/// A client that sends without ever reading must not make the server buffer
/// without bound: TCP flow control holds it back, or, where the kernel took
/// the bytes outside any socket buffer, the server resets the connection.
#[test]
fn a_client_that_never_reads_is_held_back_or_reset() {
    if !require_bpf("never_reads") {
        return;
    }
    const ATTEMPT: usize = 1 << 30;
    let mut server = start("ebpf", Some(1), &["--in-flight-limit", "262144"]);
    let mut stream = clients::connect(server.addr).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let chunk = vec![0x42u8; 1 << 20];
    let mut sent = 0usize;
    let outcome = loop {
        if sent >= ATTEMPT {
            break "accepted";
        }
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break "held back";
            }
            Err(_) => break "reset",
        }
    };
    assert_ne!(
        outcome, "accepted",
        "the server took 1 GiB from a client that never read"
    );
    drop(stream);
    let stats = server.wait_stats(idle, Duration::from_secs(10));
    eprintln!("never-reading client: {outcome} after {sent} bytes; {stats:?}");
    assert_eq!(stats.get("routes"), 0, "{stats:?}");
}

/// With one slot per core and one connection holding it, the next
/// connection is echoed by userspace, logged once and counted.
#[test]
fn a_full_sockmap_falls_back_to_the_userspace_echo() {
    if !require_bpf("full_sockmap") {
        return;
    }
    let mut server = start("ebpf", Some(1), &["--sockmap-capacity", "1"]);
    let mut holder = clients::connect(server.addr).expect("connect");
    holder.write_all(b"hold").unwrap();
    let mut echoed = [0u8; 4];
    holder.read_exact(&mut echoed).unwrap();
    for i in 0..3 {
        let payload = vec![i as u8; 1 << 20];
        let received = send_and_receive(server.addr, payload.clone()).expect("fallback echo");
        assert!(
            received == payload,
            "fallback connection {i} echoed wrong bytes"
        );
    }
    drop(holder);
    let stats = server.wait_stats(idle, Duration::from_secs(10));
    assert_eq!(stats.get("spliced"), 1, "{stats:?}");
    assert_eq!(stats.get("sockmap_full"), 3, "{stats:?}");
    assert_eq!(stats.get("copied"), 3, "{stats:?}");
    assert_eq!(stats.get("userspace_bytes"), 3 << 20, "{stats:?}");
    assert_eq!(
        server.stderr().matches("SockMap full").count(),
        1,
        "logged once: {}",
        server.stderr()
    );
}

#[test]
fn a_port_in_use_is_reported() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, stderr) = run_to_failure(Command::new(BIN).args(["--listen", &addr]));
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}: address already in use")),
        "{stderr}"
    );
}

#[test]
fn a_missing_capability_is_named() {
    if !require_bpf("missing_capability") {
        return;
    }
    // Root without CAP_BPF (and without CAP_SYS_ADMIN, which implies it).
    let (status, stderr) = run_to_failure(Command::new("setpriv").args([
        "--bounding-set=-bpf,-sys_admin",
        "--",
        BIN,
        "--listen",
        "127.0.0.1:0",
    ]));
    assert!(!status.success());
    assert!(stderr.contains("missing capability CAP_BPF:"), "{stderr}");
    // An unprivileged user has neither.
    let (status, stderr) = run_to_failure(Command::new("setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        BIN,
        "--listen",
        "127.0.0.1:0",
    ]));
    assert!(!status.success());
    assert!(
        stderr.contains("missing capability CAP_BPF and CAP_NET_ADMIN"),
        "{stderr}"
    );
}

#[test]
fn copy_mode_needs_no_privileges() {
    if !require_bpf("copy_unprivileged (needs root to drop to nobody)") {
        return;
    }
    let mut command = Command::new("setpriv");
    command.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        BIN,
        "--listen",
        "127.0.0.1:0",
        "--mode",
        "copy",
    ]);
    let server = Server::start_command(&mut command);
    let received = send_and_receive(server.addr, b"unprivileged".to_vec()).unwrap();
    assert_eq!(received, b"unprivileged");
}

#[test]
fn a_probe_the_verifier_rejects_shows_the_verifier_log() {
    if !require_bpf("verifier_log") {
        return;
    }
    let object = concat!(env!("OUT_DIR"), "/verifier-reject");
    let (status, stderr) = run_to_failure(Command::new(BIN).args([
        "--listen",
        "127.0.0.1:0",
        "--probe-object",
        object,
    ]));
    assert!(!status.success());
    assert!(
        stderr.contains("the kernel verifier rejected probe program `reject_verdict`"),
        "{stderr}"
    );
    // The log itself: the verifier names the offending access.
    assert!(stderr.contains("invalid mem access"), "{stderr}");
}

#[test]
fn an_impossible_core_count_is_refused() {
    for cores in ["0", "4096"] {
        let (status, stderr) =
            run_to_failure(Command::new(BIN).args(["--listen", "127.0.0.1:0", "--cores", cores]));
        assert!(!status.success());
        assert!(
            stderr.contains(&format!("--cores {cores}: this machine has")),
            "{stderr}"
        );
    }
}

/// On a kernel without sockmap support (simulated: see `testkit::no_sockmap`)
/// the server refuses to start in ebpf mode, naming what the kernel lacks
/// and the way out; copy mode still serves there.
#[test]
fn a_kernel_without_sockmap_is_named() {
    if !require_bpf("kernel_without_sockmap") {
        return;
    }
    let (status, stderr) = run_to_failure(without_sockmap(
        Command::new(BIN).args(["--listen", "127.0.0.1:0"]),
    ));
    assert!(!status.success());
    assert!(
        stderr.contains(
            "the kernel lacks BPF_MAP_TYPE_SOCKMAP (needs CONFIG_BPF_SYSCALL, \
             CONFIG_BPF_STREAM_PARSER and CONFIG_NET_SOCK_MSG); use --mode copy on this kernel"
        ),
        "{stderr}"
    );
    let server = Server::start_command(without_sockmap(Command::new(BIN).args([
        "--listen",
        "127.0.0.1:0",
        "--mode",
        "copy",
    ])));
    let received = send_and_receive(server.addr, b"no sockmap".to_vec()).unwrap();
    assert_eq!(received, b"no sockmap");
}
