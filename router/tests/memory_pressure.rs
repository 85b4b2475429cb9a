//! Spliced connections under TCP memory pressure: `net.ipv4.tcp_mem`, a
//! limit of the whole machine, is lowered for the test and restored after
//! it, even when it fails. This file holds this one test: cargo runs test
//! binaries one at a time, so no other test shares the lowered limit.
mod common;

use std::{
    io::Write,
    net::{Shutdown, SocketAddr},
    sync::mpsc,
    thread,
    time::Duration,
};

use common::{idle, start};
use sha2::{Digest, Sha256};
use testkit::{
    backends::{self, Backend, EXCHANGE_HEADER},
    clients,
    data::Rng,
    privileges::require_bpf,
};

const TCP_MEM: &str = "/proc/sys/net/ipv4/tcp_mem";

/// `net.ipv4.tcp_mem` set to other pages until dropped.
struct TcpMem(String);

impl TcpMem {
    fn set(pages: &str) -> Self {
        let before = std::fs::read_to_string(TCP_MEM).expect("reading net.ipv4.tcp_mem");
        std::fs::write(TCP_MEM, pages)
            .unwrap_or_else(|e| panic!("setting net.ipv4.tcp_mem (root only): {e}"));
        Self(before)
    }
}

impl Drop for TcpMem {
    fn drop(&mut self) {
        let _ = std::fs::write(TCP_MEM, &self.0);
    }
}

/// A counter of the kernel's TCP extension statistics (`nstat`'s TcpExt*).
fn tcp_ext(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let names = lines[0].split_whitespace();
    let values = lines[1].split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no TcpExt {name}"))
}

/// Under TCP memory pressure the kernel fails a send into a spliced socket
/// with EFAULT (its forward allocation went negative with bytes the probe
/// passed up); the router waits and sends again instead of resetting the
/// connection. 64 connections exchange up to 32 MiB each way under a
/// 128 MiB limit: the pressure is real (the kernel counts it), and no
/// connection was reset for a send that failed so (the old code reset
/// several each run). Every stream that reached its end is intact (SHA-256)
/// both ways; the kernel itself may still reset a connection it closes
/// while TCP memory is exhausted, which is not the router's.
#[test]
fn sends_into_spliced_sockets_wait_out_tcp_memory_pressure() {
    const CONNECTIONS: u64 = 64;
    const MAX_SIZE: u64 = 32 << 20;
    if !require_bpf("memory_pressure") {
        return;
    }
    let (reports, received) = mpsc::channel();
    let backend = Backend::exchange(reports);
    let mut router = start(
        "ebpf",
        &[format!("default={}", backend.addr)],
        &["--log-level", "info,splice::pipe=debug"],
    );
    let pressures = tcp_ext("TCPMemoryPressures");
    let limit = TcpMem::set("8192 12288 32768");
    let mut rng = Rng::new(64);
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            // A first byte of 0 (the size's low byte): no protocol the
            // router knows, so the default route.
            let up = rng.range(256, MAX_SIZE) & !0xff;
            let down = rng.range(1, MAX_SIZE);
            let addr = router.addr;
            thread::spawn(move || (up, down, exchange(addr, up, down, 10 * i)))
        })
        .collect();
    let mut up_hashes = std::collections::HashMap::new();
    let mut ended = 0;
    for (i, client) in clients.into_iter().enumerate() {
        let (up, down, outcome) = client.join().unwrap();
        match outcome {
            Ok((got, hash, up_hash)) => {
                assert_eq!(got, down, "connection {i}: bytes back");
                assert!(
                    hash == backends::stream_hash(down as usize, 10 * i as u64 + 1),
                    "connection {i}: the bytes back differ"
                );
                up_hashes.insert(10 * i as u64, (up, up_hash));
                ended += 1;
            }
            Err(e) => eprintln!("connection {i}: {e}"),
        }
    }
    drop(limit);
    let mut reported = 0;
    while let Ok((seed, len, hash)) = received.recv_timeout(Duration::from_secs(5)) {
        if let Some(&(up, up_hash)) = up_hashes.get(&seed) {
            reported += 1;
            assert_eq!(len, up, "connection {}: bytes to the backend", seed / 10);
            assert!(
                hash == up_hash,
                "connection {}: the backend's bytes differ",
                seed / 10
            );
        }
    }
    // The backend half-closes only after the client's end: a client that
    // got its end had its stream read to the end.
    assert_eq!(reported, ended, "streams the backend reported");
    let pressured = tcp_ext("TCPMemoryPressures") - pressures;
    let stats = router.wait_stats(idle, Duration::from_secs(20));
    let log = router.stderr();
    eprintln!("{ended} of {CONNECTIONS} ended; {pressured} memory pressure episode(s); {stats:?}");
    for reset in log.lines().filter(|l| l.contains("connection reset")) {
        eprintln!("router: {reset}");
    }
    assert!(
        pressured > 0,
        "no TCP memory pressure: the test proves nothing"
    );
    assert!(
        !log.contains("os error 14"),
        "a send that failed with EFAULT reset a connection:\n{log}"
    );
    assert_eq!(stats.get("slots_in_use"), 0, "{stats:?}");
}

/// One client of [`Backend::exchange`]: sends `up` bytes while it reads
/// `down` to its end. Returns what came back
/// (bytes, SHA-256) and the SHA-256 of what it sent, or the error that
/// ended it.
fn exchange(
    addr: SocketAddr,
    up: u64,
    down: u64,
    seed: u64,
) -> std::io::Result<(u64, [u8; 32], [u8; 32])> {
    let mut payload = Vec::with_capacity(up as usize);
    for field in [up, down, seed] {
        payload.extend(field.to_le_bytes());
    }
    payload.extend(Rng::new(seed).bytes(up as usize - EXCHANGE_HEADER));
    let up_hash: [u8; 32] = Sha256::digest(&payload).into();
    let stream = clients::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || {
        writer.write_all(&payload)?;
        writer.shutdown(Shutdown::Write)
    });
    let (got, hash) = backends::hash_until_eof(&stream)?;
    sender.join().unwrap()?;
    Ok((got, hash, up_hash))
}
