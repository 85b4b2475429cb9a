//! In-process kernel tests of the splice library's connection API
//! ([`splice::pipe`]), in aya's integration-test style: a glommio executor
//! loads the router probe, joins an accepted client and a backend with
//! `pipe::run`, and the test compares the bytes both ways and reads the
//! probe's counters. Each runs spliced and copied; under `CI=true` the
//! spliced runs fail rather than skip without BPF privileges.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener},
    os::fd::OwnedFd,
    rc::Rc,
    sync::{Arc, mpsc},
    thread,
    time::Duration,
};

use futures_lite::AsyncReadExt as _;
use sha2::{Digest, Sha256};
use splice::{
    KernelTotals, ProbeConfig,
    halves::{self, OwnSocket},
    pipe::{self, Outcome, Path},
    readiness::Readiness,
    shard::{ProbeSpec, ShardProbe},
    stats::SpliceStats,
};
use testkit::{
    backends::{Backend, EXCHANGE_HEADER},
    clients,
    data::Rng,
    privileges::require_bpf,
};

/// What the client sends before the pipe starts: the "first packet" the
/// router would have read.
const FIRST: usize = 100;

/// Accepts one client on `listener`, reads its first [`FIRST`] bytes,
/// connects `backend` and runs a pipe between them (spliced by the router
/// probe sized by `config`, or copied without one) on an executor of its
/// own. Returns the outcome and, spliced, the probe's counters once the
/// pipe ended.
fn run_pipe(
    listener: TcpListener,
    backend: SocketAddr,
    config: Option<ProbeConfig>,
) -> (Outcome, Option<KernelTotals>) {
    listener.set_nonblocking(true).unwrap();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let loaded = config.map(|config| {
                let spec = ProbeSpec {
                    object: Arc::new(router::startup::ROUTER_PROBE.to_vec()),
                    config,
                    what: "router probe",
                };
                ShardProbe::load(&spec, 0, Arc::new(SpliceStats::default()))
                    .expect("the router probe loads")
            });
            let readiness = Readiness::start().unwrap();
            let listener = OwnSocket::new(OwnedFd::from(listener), &readiness);
            let (client, _) = listener.accept().await.unwrap();
            let (mut reader, writer) = halves::split(OwnSocket::new(client, &readiness));
            let mut first = vec![0u8; FIRST];
            reader.read_exact(&mut first).await.unwrap();
            let backend = OwnSocket::connect(backend, &readiness).await.unwrap();
            let probe = loaded.as_ref().map(|(probe, _)| probe);
            let outcome = pipe::run((reader, writer), backend, probe, first).await;
            let totals = loaded.map(|(_, view)| view.totals().unwrap());
            (outcome, totals)
        })
        .unwrap()
        .join()
        .unwrap()
}

/// Sends `payload` through `addr`, half-closes, and returns the SHA-256 of
/// everything that comes back until the end of stream, and its length.
fn echo_through(addr: SocketAddr, payload: Vec<u8>) -> (u64, [u8; 32]) {
    let stream = clients::connect(addr).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        writer.write_all(&payload).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let (len, hash) = testkit::backends::hash_until_eof(&stream).unwrap();
    sender.join().unwrap();
    (len, hash)
}

/// The probe configurations to test: copied (no probe) always, spliced
/// where BPF is allowed.
fn modes(test: &str, in_flight_limit: u64) -> Vec<Option<ProbeConfig>> {
    let mut modes = vec![None];
    if require_bpf(test) {
        modes.push(Some(ProbeConfig {
            capacity: 64,
            in_flight_limit,
            splice_after: 0,
        }));
    }
    modes
}

/// A pipe forwards both directions, the first bytes included, and at the
/// client's end of stream drains everything to the backend before passing
/// the FIN on (the echo's FIN then closes the other direction): 8 MiB each
/// way, in order. Spliced, the kernel redirected the bytes that came after
/// the insert and left no route behind.
#[test]
fn a_pipe_forwards_both_ways_and_drains_before_passing_fin_on() {
    const SIZE: usize = 8 << 20;
    let echo = Backend::echo();
    for config in modes("pipe_forwards", 64 << 20) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let payload = Rng::new(41).bytes(SIZE);
        let expected: [u8; 32] = Sha256::digest(&payload).into();
        let client = thread::spawn(move || echo_through(addr, payload));
        let (outcome, totals) = run_pipe(listener, echo.addr, config);
        let (len, hash) = client.join().unwrap();
        let spliced = config.is_some();
        assert_eq!(len, SIZE as u64, "spliced {spliced}: {outcome:?}");
        assert!(hash == expected, "spliced {spliced}: the echo differs");
        assert_eq!(
            outcome.path,
            Some(if spliced { Path::Spliced } else { Path::Copied })
        );
        assert_eq!(
            (outcome.to_backend, outcome.to_client),
            (SIZE as u64, SIZE as u64)
        );
        assert!(!outcome.reset);
        if let Some(totals) = totals {
            eprintln!("spliced: {outcome:?}, kernel {totals:?}");
            // Both directions, less what userspace read or wrote itself.
            assert!(
                totals.redirected_bytes
                    >= 2 * SIZE as u64 - outcome.read_in_userspace - FIRST as u64,
                "{totals:?}, {outcome:?}"
            );
            assert_eq!(totals.routes, 0, "routes left behind: {totals:?}");
        } else {
            assert_eq!(outcome.read_in_userspace, 2 * SIZE as u64 - FIRST as u64);
        }
    }
}

/// A backend that does not read for its first 300 ms, then echoes: with a
/// 64 KiB in-flight limit the source runs out of credit, the probe passes
/// its bytes up, and userspace forwards them at the backend's pace. An
/// exhaustion lasts while the sender keeps the receive queue busy: after the
/// client pauses, userspace has delivered every byte passed up and the
/// redirect resumes for the next burst. 8 + 8 MiB arrive intact and in
/// order.
#[test]
fn credit_exhausted_passes_bytes_up_and_the_redirect_resumes_in_order() {
    const SIZE: usize = 16 << 20;
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    thread::spawn(move || {
        for stream in backend.incoming().flatten() {
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(300));
                let mut reader = stream.try_clone().unwrap();
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(Shutdown::Write);
            });
        }
    });
    for config in modes("pipe_credit", 64 << 10) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let payload = Rng::new(42).bytes(SIZE);
        let expected: [u8; 32] = Sha256::digest(&payload).into();
        let client = thread::spawn(move || {
            let stream = clients::connect(addr).unwrap();
            let mut writer = stream.try_clone().unwrap();
            let sender = thread::spawn(move || {
                let (first, second) = payload.split_at(SIZE / 2);
                writer.write_all(first).unwrap();
                thread::sleep(Duration::from_millis(700));
                writer.write_all(second).unwrap();
                writer.shutdown(Shutdown::Write).unwrap();
            });
            let received = testkit::backends::hash_until_eof(&stream).unwrap();
            sender.join().unwrap();
            received
        });
        let (outcome, totals) = run_pipe(listener, backend_addr, config);
        let (len, hash) = client.join().unwrap();
        assert_eq!(len, SIZE as u64, "{outcome:?}");
        assert!(hash == expected, "the echo differs (order or content)");
        assert!(!outcome.reset);
        if let Some(totals) = totals {
            eprintln!("spliced, 64 KiB in flight: {outcome:?}, kernel {totals:?}");
            assert!(totals.credit_exhausted > 0, "{totals:?}");
            assert!(totals.passed_bytes > 0, "{totals:?}");
            assert!(totals.resumed > 0, "{totals:?}");
            assert!(totals.redirected_bytes > 0, "{totals:?}");
            assert!(outcome.read_in_userspace > 0, "{outcome:?}");
            assert_eq!(totals.routes, 0, "{totals:?}");
        }
    }
}

/// A backend that resets after taking the first bytes: the pipe ends in a
/// reset passed on to the client, not a FIN, spliced or copied.
#[test]
fn a_reset_on_one_side_reaches_the_other_as_a_reset() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    thread::spawn(move || {
        for mut stream in backend.incoming().flatten() {
            let mut first = [0u8; FIRST];
            let _ = stream.read_exact(&mut first);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    });
    for config in modes("pipe_reset", 64 << 20) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = thread::spawn(move || {
            let mut stream = clients::connect(addr).unwrap();
            stream.write_all(&[7u8; FIRST]).unwrap();
            let mut buffer = [0u8; 16];
            stream.read(&mut buffer).map_err(|e| e.kind())
        });
        let (outcome, _) = run_pipe(listener, backend_addr, config);
        assert!(outcome.reset, "{outcome:?}");
        assert_eq!(
            client.join().unwrap(),
            Err(std::io::ErrorKind::ConnectionReset),
            "spliced {}",
            config.is_some()
        );
    }
}

/// The client's first segment carries the first packet and 900 bytes more;
/// userspace reads only the first 100, so the socket buffer the kernel hands
/// the verdict after the insert starts 100 bytes before the stream's next
/// unread byte, as an overlapping retransmission does. The verdict trims
/// exactly those 100 bytes: the backend gets each byte once, in order.
#[test]
fn a_socket_buffer_that_repeats_read_bytes_is_trimmed_and_nothing_repeats() {
    const SIZE: usize = 1_000;
    let echo = Backend::echo();
    for config in modes("pipe_trim", 64 << 20) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let payload = Rng::new(43).bytes(SIZE);
        let sent = payload.clone();
        let client = thread::spawn(move || {
            let mut stream = clients::connect(addr).unwrap();
            // One write, one segment on loopback; no FIN until the echo is
            // back, so the socket is still established at the insert.
            stream.write_all(&sent).unwrap();
            let mut echoed = vec![0u8; SIZE];
            stream.read_exact(&mut echoed).unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).unwrap();
            echoed.extend(rest);
            echoed
        });
        let (outcome, totals) = run_pipe(listener, echo.addr, config);
        let echoed = client.join().unwrap();
        assert!(
            echoed == payload,
            "spliced {}: the echo differs",
            config.is_some()
        );
        assert_eq!(
            (outcome.to_backend, outcome.to_client),
            (SIZE as u64, SIZE as u64)
        );
        if let Some(totals) = totals {
            eprintln!("spliced: {outcome:?}, kernel {totals:?}");
            assert_eq!(outcome.path, Some(Path::Spliced), "{outcome:?}");
            assert_eq!(
                (totals.trimmed, totals.trimmed_bytes),
                (1, FIRST as u64),
                "{totals:?}"
            );
            assert_eq!(
                totals.redirected_bytes,
                2 * SIZE as u64 - FIRST as u64,
                "{totals:?}"
            );
        }
    }
}

/// Connections that copy first and move each direction into the kernel
/// once it carried `splice_after` bytes, mid-stream, under load: 2,000
/// connections, 32 at once, of random sizes each way (a quarter stay under
/// the threshold both ways; most cross it in both directions, at different
/// times). Every byte arrives once and in order both ways: the client and
/// the backend each compare the SHA-256 of what they got. A connection
/// that carried less than the threshold was never spliced; one whose
/// direction carried well past it was.
#[test]
fn directions_move_into_the_kernel_mid_stream_and_no_byte_is_lost_repeated_or_reordered() {
    const CONNECTIONS: usize = 2_000;
    const AT_ONCE: usize = 32;
    const THRESHOLD: u64 = 16 << 10;
    const MAX_SIZE: u64 = 512 << 10;
    if !require_bpf("pipe_lazy") {
        return;
    }
    let (reports, received) = mpsc::channel();
    let backend = Backend::exchange(reports);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ProbeConfig {
        capacity: 4 * AT_ONCE as u32,
        in_flight_limit: 64 << 20,
        splice_after: THRESHOLD,
    };
    let proxy = thread::spawn(move || run_pipes(listener, backend.addr, config, CONNECTIONS));
    // Each client thread runs its share one after another.
    let clients: Vec<_> = (0..AT_ONCE)
        .map(|worker| {
            thread::spawn(move || {
                let mut rng = Rng::new(1_000 + worker as u64);
                let mut sent = Vec::new();
                for i in (worker..CONNECTIONS).step_by(AT_ONCE) {
                    let small = i % 4 == 0;
                    let limit = if small { THRESHOLD - 1 } else { MAX_SIZE };
                    let up = rng.range(FIRST as u64, FIRST as u64 + limit);
                    let down = rng.range(0, limit);
                    let seed = 10 * i as u64;
                    sent.push((seed, up, down, exchange(addr, up, down, seed)));
                }
                sent
            })
        })
        .collect();
    let mut expected = std::collections::HashMap::new();
    for client in clients {
        for (seed, up, down, up_hash) in client.join().unwrap() {
            expected.insert(seed, (up, down, up_hash));
        }
    }
    let (outcomes, totals) = proxy.join().unwrap();
    let mut backend_got = 0;
    while let Ok((seed, len, hash)) = received.recv_timeout(Duration::from_secs(5)) {
        let (up, _, up_hash) = expected[&seed];
        assert_eq!(
            len, up,
            "connection {seed}: the backend got {len} of {up} bytes"
        );
        assert!(
            hash == up_hash,
            "connection {seed}: the backend's bytes differ"
        );
        backend_got += 1;
        if backend_got == CONNECTIONS {
            break;
        }
    }
    assert_eq!(backend_got, CONNECTIONS);
    let mut spliced = 0;
    for outcome in &outcomes {
        assert!(!outcome.reset, "{outcome:?}");
        // Each direction's size, as the pipe delivered it.
        let (up, down) = (outcome.to_backend, outcome.to_client);
        let up_copied = up - FIRST as u64;
        if up_copied < THRESHOLD && down < THRESHOLD {
            assert_eq!(outcome.path, Some(Path::Copied), "{outcome:?}");
        } else if up_copied > THRESHOLD + (64 << 10) || down > THRESHOLD + (64 << 10) {
            assert_eq!(outcome.path, Some(Path::Spliced), "{outcome:?}");
        }
        spliced += usize::from(outcome.path == Some(Path::Spliced));
    }
    let sizes: u64 = expected.values().map(|(up, down, _)| up + down).sum();
    let delivered: u64 = outcomes.iter().map(|o| o.to_backend + o.to_client).sum();
    eprintln!("{spliced} of {CONNECTIONS} spliced mid-stream; {sizes} bytes; kernel {totals:?}");
    assert_eq!(delivered, sizes);
    assert!(spliced > CONNECTIONS / 2, "{spliced} spliced");
    assert!(totals.redirected_bytes > sizes / 2, "{totals:?}");
    assert_eq!((totals.routes, totals.broken), (0, 0), "{totals:?}");
}

/// One client of [`Backend::exchange`]: sends `up` bytes (the header, then
/// the stream seeded with `seed`) while it reads `down` and checks them,
/// then half-closes and waits for the backend's end of stream. Returns the
/// SHA-256 of what it sent.
fn exchange(addr: SocketAddr, up: u64, down: u64, seed: u64) -> [u8; 32] {
    let mut payload = Vec::with_capacity(up as usize);
    for field in [up, down, seed] {
        payload.extend(field.to_le_bytes());
    }
    payload.extend(Rng::new(seed).bytes(up as usize - EXCHANGE_HEADER));
    let up_hash: [u8; 32] = Sha256::digest(&payload).into();
    let mut stream = clients::connect(addr).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || writer.write_all(&payload));
    let mut hasher = Sha256::new();
    let mut left = down as usize;
    let mut buffer = vec![0u8; 1 << 16];
    while left > 0 {
        let n = stream.read(&mut buffer[..left.min(1 << 16)]).unwrap();
        assert!(
            n > 0,
            "connection {seed}: the stream back ended {left} bytes short"
        );
        hasher.update(&buffer[..n]);
        left -= n;
    }
    sender.join().unwrap().unwrap();
    let got: [u8; 32] = hasher.finalize().into();
    assert!(
        got == testkit::backends::stream_hash(down as usize, seed + 1),
        "connection {seed}: the bytes back differ"
    );
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "connection {seed}: {} bytes too many back",
        rest.len()
    );
    up_hash
}

/// [`run_pipe`] for `count` clients at once, each a task of its own on one
/// executor: the outcomes and the probe's counters once all ended.
fn run_pipes(
    listener: TcpListener,
    backend: SocketAddr,
    config: ProbeConfig,
    count: usize,
) -> (Vec<Outcome>, KernelTotals) {
    listener.set_nonblocking(true).unwrap();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let spec = ProbeSpec {
                object: Arc::new(router::startup::ROUTER_PROBE.to_vec()),
                config,
                what: "router probe",
            };
            let (probe, view) = ShardProbe::load(&spec, 0, Arc::new(SpliceStats::default()))
                .expect("the router probe loads");
            let probe = Rc::new(probe);
            let readiness = Readiness::start().unwrap();
            let listener = OwnSocket::new(OwnedFd::from(listener), &readiness);
            let mut tasks = Vec::with_capacity(count);
            for _ in 0..count {
                let (client, _) = listener.accept().await.unwrap();
                let client = OwnSocket::new(client, &readiness);
                let readiness = Rc::clone(&readiness);
                let probe = Rc::clone(&probe);
                tasks.push(glommio::spawn_local(async move {
                    let (mut reader, writer) = halves::split(client);
                    let mut first = vec![0u8; FIRST];
                    reader.read_exact(&mut first).await.unwrap();
                    let backend = OwnSocket::connect(backend, &readiness).await.unwrap();
                    pipe::run((reader, writer), backend, Some(&probe), first).await
                }));
            }
            let mut outcomes = Vec::with_capacity(count);
            for task in tasks {
                outcomes.push(task.await);
            }
            (outcomes, view.totals().unwrap())
        })
        .unwrap()
        .join()
        .unwrap()
}
