//! Many concurrent connections exchanging random traffic with an echo
//! backend for a while, each checking the SHA-256 of what it sent against
//! what came back. Clients and backend each run as tasks of one glommio
//! executor (a thread apiece), so ten thousand connections need no ten
//! thousand threads.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::mpsc,
    time::{Duration, Instant},
};

use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _, future};
use glommio::{
    LocalExecutorBuilder,
    net::{TcpListener, TcpStream},
    timer::sleep,
};
use sha2::{Digest, Sha256};

use crate::data::Rng;

/// Memory each executor registers with io_uring (the memlock limit here is
/// 8 MiB, shared by the router's executors when run as the same user).
const IO_MEMORY: usize = 512 * 1024;
/// Largest chunk one exchange sends (and reads back).
const MAX_CHUNK: u64 = 16 * 1024;
/// Longest pause between two exchanges of a connection: random traffic,
/// not a throughput benchmark.
const MAX_PAUSE_MS: u64 = 400;
/// No single connect, write or read may take longer.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// An echo backend on loopback, served by one executor thread for the rest
/// of the process's life.
pub fn echo_backend() -> SocketAddr {
    let (sender, addr) = mpsc::channel();
    LocalExecutorBuilder::default()
        .name("soak-echo")
        .io_memory(IO_MEMORY)
        .spawn(move || async move {
            let listener =
                TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the soak echo backend");
            sender
                .send(listener.local_addr().expect("local address"))
                .expect("report the address");
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        glommio::spawn_local(echo(stream)).detach();
                    }
                    Err(_) => sleep(Duration::from_millis(10)).await,
                }
            }
        })
        .expect("start the soak echo executor");
    addr.recv().expect("the soak echo backend started")
}

async fn echo(mut stream: TcpStream) {
    let mut buffer = vec![0u8; 8 * 1024];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) => {
                let _ = stream.shutdown(std::net::Shutdown::Write).await;
                return;
            }
            Ok(n) => {
                if stream.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// What a soak run did.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// Connections that ran to the end with equal hashes.
    pub completed: usize,
    /// One line per failed connection.
    pub errors: Vec<String>,
    /// Bytes sent (and so echoed) over all connections.
    pub bytes: u64,
    /// Send-and-read-back exchanges over all connections.
    pub exchanges: u64,
    /// From the first connect to the last close.
    pub elapsed: Duration,
}

/// Opens `connections` connections to `addr` (spread over `ramp`), each
/// sending `preamble` first, then exchanging random chunks with the echo
/// behind it until `duration` passed; then each half-closes, expects the
/// echo's end of stream and compares the SHA-256 of both directions.
pub fn run(
    addr: SocketAddr,
    preamble: &'static [u8],
    connections: usize,
    ramp: Duration,
    duration: Duration,
    seed: u64,
) -> SoakReport {
    LocalExecutorBuilder::default()
        .name("soak-clients")
        .io_memory(IO_MEMORY)
        .spawn(move || async move {
            let started = Instant::now();
            let deadline = started + ramp + duration;
            let tasks: Vec<_> = (0..connections)
                .map(|i| {
                    let delay = ramp.mul_f64(i as f64 / connections.max(1) as f64);
                    glommio::spawn_local(connection(
                        addr,
                        preamble,
                        seed + i as u64,
                        delay,
                        deadline,
                    ))
                })
                .collect();
            let mut report = SoakReport::default();
            for (i, task) in tasks.into_iter().enumerate() {
                match task.await {
                    Ok((bytes, exchanges)) => {
                        report.completed += 1;
                        report.bytes += bytes;
                        report.exchanges += exchanges;
                    }
                    Err(e) => report.errors.push(format!("connection {i}: {e}")),
                }
            }
            report.elapsed = started.elapsed();
            report
        })
        .expect("start the soak client executor")
        .join()
        .expect("the soak client executor")
}

async fn within<T>(
    what: &str,
    operation: impl Future<Output = io::Result<T>>,
) -> Result<T, String> {
    let timeout = async {
        sleep(IO_TIMEOUT).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
    };
    future::or(operation, timeout)
        .await
        .map_err(|e| format!("{what}: {e}"))
}

async fn connection(
    addr: SocketAddr,
    preamble: &[u8],
    seed: u64,
    delay: Duration,
    deadline: Instant,
) -> Result<(u64, u64), String> {
    sleep(delay).await;
    let connect = async { TcpStream::connect(addr).await.map_err(io::Error::from) };
    let mut stream = within("connect", connect).await?;
    within("send the preamble", stream.write_all(preamble)).await?;
    let mut rng = Rng::new(seed);
    let (mut sent, mut received) = (Sha256::new(), Sha256::new());
    let (mut bytes, mut exchanges) = (0u64, 0u64);
    let mut back = vec![0u8; MAX_CHUNK as usize];
    loop {
        let size = rng.range(1, MAX_CHUNK) as usize;
        let chunk = rng.bytes(size);
        sent.update(&chunk);
        within("send", stream.write_all(&chunk)).await?;
        within("read the echo", stream.read_exact(&mut back[..size])).await?;
        received.update(&back[..size]);
        bytes += size as u64;
        exchanges += 1;
        if Instant::now() >= deadline {
            break;
        }
        sleep(Duration::from_millis(rng.range(0, MAX_PAUSE_MS))).await;
    }
    let half_close = async {
        stream
            .shutdown(std::net::Shutdown::Write)
            .await
            .map_err(io::Error::from)
    };
    within("half-close", half_close).await?;
    let mut rest = Vec::new();
    within("read to the end", stream.read_to_end(&mut rest)).await?;
    if !rest.is_empty() {
        return Err(format!("{} bytes more than were sent", rest.len()));
    }
    if sent.finalize() != received.finalize() {
        return Err(format!("SHA-256 differs after {bytes} bytes"));
    }
    let _ = stream.close().await;
    Ok((bytes, exchanges))
}
