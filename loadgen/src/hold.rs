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
    let mut held = Vec::with_capacity(connections);
    for i in 0..connections {
        let mut stream = TcpStream::connect(addr)
            .with_context(|| format!("connection {i} of {connections} to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(&first)?;
        let mut answer = [0u8; 64];
        if stream
            .read(&mut answer)
            .with_context(|| format!("answer on connection {i}"))?
            == 0
        {
            anyhow::bail!("connection {i} closed without an answer");
        }
        held.push(stream);
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
