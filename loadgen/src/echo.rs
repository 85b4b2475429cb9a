//! `loadgen echo`: N connections each stream fixed-size chunks to an echo
//! server while reading the echo back, never more than a window ahead of
//! what came back (a client that reads what it sends); reports the echoed
//! bytes per second.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub fn echo(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    chunk: usize,
    window: u64,
) -> anyhow::Result<()> {
    if connections == 0 || chunk == 0 || window < chunk as u64 {
        bail!("--connections and --chunk must be at least 1, --window at least --chunk");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..connections {
        let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut writer = stream.try_clone()?;
        let stop_writing = Arc::clone(&stop);
        let received = Arc::new(AtomicU64::new(0));
        let received_by_reader = Arc::clone(&received);
        threads.push(thread::spawn(move || -> std::io::Result<u64> {
            let data = vec![0x5au8; chunk];
            let mut sent = 0u64;
            while !stop_writing.load(Relaxed) {
                if sent - received.load(Relaxed) + chunk as u64 > window {
                    thread::sleep(Duration::from_micros(50));
                    continue;
                }
                writer.write_all(&data)?;
                sent += chunk as u64;
            }
            writer.shutdown(Shutdown::Write)?;
            Ok(sent)
        }));
        let counter = Arc::clone(&echoed);
        let mut reader = stream;
        threads.push(thread::spawn(move || -> std::io::Result<u64> {
            let mut buffer = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buffer)?;
                if n == 0 {
                    return Ok(total);
                }
                total += n as u64;
                received_by_reader.store(total, Relaxed);
                counter.fetch_add(n as u64, Relaxed);
            }
        }));
    }
    // Measure a window that starts after a short warm-up.
    let warmup = Duration::from_millis(300);
    thread::sleep(warmup);
    let start_bytes = echoed.load(Relaxed);
    let start = Instant::now();
    thread::sleep(duration);
    let bytes = echoed.load(Relaxed) - start_bytes;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    let mut sent = 0;
    let mut received = 0;
    for (i, t) in threads.into_iter().enumerate() {
        let n = t
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?
            .context("client I/O")?;
        if i % 2 == 0 { sent += n } else { received += n }
    }
    if sent != received {
        bail!("sent {sent} bytes but {received} came back");
    }
    println!(
        "workload=echo connections={connections} seconds={elapsed:.2} bytes={bytes} gbit_per_s={:.3}",
        bytes as f64 * 8.0 / elapsed / 1e9
    );
    Ok(())
}
