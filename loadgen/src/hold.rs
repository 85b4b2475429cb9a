//! `loadgen hold`: opens N connections, each sending a first packet and
//! waiting for the backend's answer (so it is routed, connected and, through
//! the router, spliced), then keeps them all idle until stdin closes.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

pub fn hold(
    addr: SocketAddr,
    first: Vec<u8>,
    connections: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    // Opened by a few threads at once: one at a time, a proxy's per-connection
    // latency (not its capacity) would set how long this takes.
    let openers = connections.clamp(1, 16);
    let first: std::sync::Arc<[u8]> = first.into();
    let threads: Vec<_> = (0..openers)
        .map(|t| {
            let first = std::sync::Arc::clone(&first);
            thread::spawn(move || -> anyhow::Result<Vec<TcpStream>> {
                (t..connections)
                    .step_by(openers)
                    .map(|i| open(addr, &first, i))
                    .collect()
            })
        })
        .collect();
    let mut held = Vec::with_capacity(connections);
    for opener in threads {
        held.extend(
            opener
                .join()
                .map_err(|_| anyhow::anyhow!("opener thread panicked"))??,
        );
    }
    println!(
        "workload=hold connections={connections} open_seconds={:.2}",
        start.elapsed().as_secs_f64()
    );
    // Wait for stdin to close (the bench script's signal), at most `limit`.
    let (closed, stdin_closed) = mpsc::channel();
    thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = closed.send(());
    });
    let _ = stdin_closed.recv_timeout(limit);
    drop(held);
    Ok(())
}

/// Connection `i`: connected, first packet sent, answer read.
fn open(addr: SocketAddr, first: &[u8], i: usize) -> anyhow::Result<TcpStream> {
    let mut stream =
        TcpStream::connect(addr).with_context(|| format!("connection {i} to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(first)?;
    let mut answer = [0u8; 64];
    if stream
        .read(&mut answer)
        .with_context(|| format!("answer on connection {i}"))?
        == 0
    {
        anyhow::bail!("connection {i} closed without an answer");
    }
    Ok(stream)
}
