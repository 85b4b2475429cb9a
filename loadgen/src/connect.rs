//! `loadgen connect`: new connections per second. Each connection sends its
//! first packet, reads the reply until the server closes, then closes; a
//! connection that fails or gets no reply is an error.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;

pub fn connect(
    addr: SocketAddr,
    first: Vec<u8>,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    if concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first: Arc<[u8]> = first.into();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (stop, done, errors, first) = (
                Arc::clone(&stop),
                Arc::clone(&done),
                Arc::clone(&errors),
                Arc::clone(&first),
            );
            thread::spawn(move || {
                while !stop.load(Relaxed) {
                    match once(addr, &first) {
                        Ok(()) => done.fetch_add(1, Relaxed),
                        Err(_) => errors.fetch_add(1, Relaxed),
                    };
                }
            })
        })
        .collect();
    let start = Instant::now();
    thread::sleep(duration);
    let (completed, failed) = (done.load(Relaxed), errors.load(Relaxed));
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    println!(
        "workload=connect concurrency={concurrency} seconds={elapsed:.2} connections={completed} \
         errors={failed} conn_per_s={:.0}",
        completed as f64 / elapsed
    );
    Ok(())
}

fn once(addr: SocketAddr, first: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(first)?;
    let mut reply = Vec::with_capacity(64);
    stream.read_to_end(&mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::other("closed without a reply"));
    }
    Ok(())
}
