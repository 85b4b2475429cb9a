//! Backends for router tests, each a thread on a loopback port of its own
//! that stops with the test process.
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use sha2::{Digest, Sha256};

use crate::data::Rng;

/// A backend listening on loopback.
pub struct Backend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

fn spawn(handle: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> Backend {
    spawn_at(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), handle)
}

fn spawn_at(at: SocketAddr, handle: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> Backend {
    let listener = TcpListener::bind(at).expect("bind a backend");
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            let handle = handle.clone();
            thread::spawn(move || handle(stream));
        }
    });
    Backend { addr, accepted }
}

impl Backend {
    /// Connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Reads until its connection ends and reports how: `Ok(bytes)` at end
    /// of stream, `Err(kind)` on an error such as a reset.
    pub fn watcher(reports: mpsc::Sender<Result<u64, io::ErrorKind>>) -> Self {
        spawn(move |mut stream| {
            let mut total = 0u64;
            let mut buffer = [0u8; 65536];
            let outcome = loop {
                match stream.read(&mut buffer) {
                    Ok(0) => break Ok(total),
                    Ok(n) => total += n as u64,
                    Err(e) => break Err(e.kind()),
                }
            };
            let _ = reports.send(outcome);
        })
    }

    /// Sends back every byte it receives, and FIN after the client's FIN.
    pub fn echo() -> Self {
        spawn(|stream| greet_then_echo(stream, b""))
    }

    /// Says who it is: to an HTTP request, a `200` whose body is
    /// `name\n`; to anything else, `name:` then an echo of the stream.
    pub fn named(name: &'static str) -> Self {
        spawn(move |mut stream| {
            let mut first = [0u8; 4096];
            let Ok(n) = stream.read(&mut first) else {
                return;
            };
            if n == 0 {
                return;
            }
            if first[..n].starts_with(b"GET ") || first[..n].starts_with(b"POST ") {
                let body = format!("{name}\n");
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                return;
            }
            let greeting = [format!("{name}:").as_bytes(), &first[..n]].concat();
            greet_then_echo(stream, &greeting);
        })
    }

    /// [`Backend::named`] at `addr` (another loopback address, such as
    /// 127.0.0.2, can share a port with a backend on 127.0.0.1).
    pub fn named_at(name: &'static str, addr: SocketAddr) -> Self {
        spawn_at(addr, move |stream| {
            let mut first = [0u8; 4096];
            let Ok(n) = (&stream).read(&mut first) else {
                return;
            };
            if n > 0 {
                greet_then_echo(
                    stream,
                    &[format!("{name}:").as_bytes(), &first[..n]].concat(),
                );
            }
        })
    }

    /// Sends `size` bytes of the stream seeded with `seed` while reading
    /// whatever comes until the client's FIN, then reports (on `reports`)
    /// how many bytes came and their SHA-256, and closes.
    pub fn bulk(size: usize, seed: u64, reports: mpsc::Sender<(u64, [u8; 32])>) -> Self {
        spawn(move |stream| {
            let Ok(mut writer) = stream.try_clone() else {
                return;
            };
            let sender = thread::spawn(move || {
                let _ = write_stream(&mut writer, size, seed);
                let _ = writer.shutdown(Shutdown::Write);
            });
            let report = hash_until_eof(stream);
            let _ = sender.join();
            if let Ok(report) = report {
                let _ = reports.send(report);
            }
        })
    }
}

impl Backend {
    /// Exchanges streams of sizes its client chooses: the client's first
    /// [`EXCHANGE_HEADER`] bytes are its total size, the size to send back
    /// and a seed (little-endian u64s). It sends that many bytes of the
    /// stream seeded with `seed + 1` while it reads the client's; it
    /// half-closes only after the client's end of stream (so both sockets
    /// stay established while either direction carries bytes), and
    /// reports the seed, how many bytes came and their SHA-256.
    pub fn exchange(reports: mpsc::Sender<(u64, u64, [u8; 32])>) -> Self {
        spawn(move |mut stream| {
            let mut header = [0u8; EXCHANGE_HEADER];
            if stream.read_exact(&mut header).is_err() {
                return;
            }
            let field = |i: usize| {
                u64::from_le_bytes(header[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
            };
            let (up, down, seed) = (field(0), field(1), field(2));
            let Ok(mut writer) = stream.try_clone() else {
                return;
            };
            let sender = thread::spawn(move || write_stream(&mut writer, down as usize, seed + 1));
            let mut hasher = Sha256::new();
            hasher.update(header);
            let mut total = EXCHANGE_HEADER as u64;
            let mut buffer = vec![0u8; 1 << 16];
            while total < up {
                let want = buffer.len().min((up - total) as usize);
                match stream.read(&mut buffer[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        hasher.update(&buffer[..n]);
                        total += n as u64;
                    }
                }
            }
            // Anything past the announced size counts too (it must not come).
            let Ok((extra, _)) = hash_until_eof(&stream) else {
                return;
            };
            if !matches!(sender.join(), Ok(Ok(()))) {
                return;
            }
            let _ = stream.shutdown(Shutdown::Write);
            let _ = reports.send((seed, total + extra, hasher.finalize().into()));
        })
    }
}

/// Length of the header a client of [`Backend::exchange`] starts with.
pub const EXCHANGE_HEADER: usize = 24;

impl Backend {
    /// Sends the stream seeded with `seed`, `size` bytes long, as fast as
    /// its client lets it, counting in `written` what its socket took; then
    /// half-closes and reads until the client's end of stream.
    pub fn source(size: usize, seed: u64, written: Arc<AtomicU64>) -> Self {
        spawn(move |mut stream| {
            let mut rng = Rng::new(seed);
            let mut left = size;
            while left > 0 {
                let chunk = rng.bytes(left.min(64 << 10));
                if stream.write_all(&chunk).is_err() {
                    return;
                }
                written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                left -= chunk.len();
            }
            let _ = stream.shutdown(Shutdown::Write);
            let _ = io::copy(&mut stream, &mut io::sink());
        })
    }

    /// Sends `size` bytes of the stream seeded with `seed`, then resets the
    /// connection (SO_LINGER 0 and close: RST instead of FIN).
    pub fn reset_after(size: usize, seed: u64) -> Self {
        spawn(move |mut stream| {
            let _ = write_stream(&mut stream, size, seed);
            // Let the bytes leave before the reset overtakes them.
            thread::sleep(Duration::from_millis(200));
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        })
    }

    /// Sends `banner` as soon as it accepts (as SMTP or Redis replicas
    /// speak first), then echoes.
    pub fn speaks_first(banner: &'static [u8]) -> Self {
        spawn(move |stream| greet_then_echo(stream, banner))
    }

    /// Reads one HTTP request head, answers `reply` and closes at once, as a
    /// server does to `Connection: close`.
    pub fn answers_and_closes(reply: &'static [u8]) -> Self {
        spawn(move |mut stream| {
            let mut head = Vec::new();
            let mut buffer = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buffer[..n]),
                }
            }
            let _ = stream.write_all(reply);
        })
    }
}

/// Writes `size` bytes of the stream seeded with `seed`.
pub fn write_stream(writer: &mut impl Write, size: usize, seed: u64) -> io::Result<()> {
    let mut rng = Rng::new(seed);
    let mut left = size;
    while left > 0 {
        let chunk = rng.bytes(left.min(1 << 20));
        writer.write_all(&chunk)?;
        left -= chunk.len();
    }
    Ok(())
}

/// SHA-256 of the stream seeded with `seed`, `size` bytes long.
pub fn stream_hash(size: usize, seed: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut rng = Rng::new(seed);
    let mut left = size;
    while left > 0 {
        let chunk = rng.bytes(left.min(1 << 20));
        hasher.update(&chunk);
        left -= chunk.len();
    }
    hasher.finalize().into()
}

/// Reads until end of stream; returns the byte count and SHA-256.
pub fn hash_until_eof(mut reader: impl Read) -> io::Result<(u64, [u8; 32])> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            return Ok((total, hasher.finalize().into()));
        }
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
}

/// A backend that says its name like [`Backend::named`] (to a non-HTTP
/// stream: `name:` then an echo) and that can go down (its listener closes:
/// connects are refused) and come back up on the same port.
pub struct SwitchableBackend {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Listener changes the accept thread made (down or up), to wait for.
    switched: Arc<AtomicUsize>,
}

impl SwitchableBackend {
    pub fn named(name: &'static str) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a backend");
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let switched = Arc::new(AtomicUsize::new(0));
        let (wanted, done) = (Arc::clone(&up), Arc::clone(&switched));
        thread::spawn(move || {
            let mut listener = Some(listener);
            loop {
                match (&listener, wanted.load(Ordering::SeqCst)) {
                    (Some(_), false) => {
                        listener = None;
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    (None, true) => {
                        // std sets SO_REUSEADDR: the port's TIME_WAITs do
                        // not stand in the way.
                        listener = Some(TcpListener::bind(addr).expect("re-bind the backend"));
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
                if let Some(open) = &listener {
                    open.set_nonblocking(true).expect("non-blocking listener");
                    while let Ok((stream, _)) = open.accept() {
                        let _ = stream.set_nonblocking(false);
                        thread::spawn(move || say_name(name, stream));
                    }
                }
                thread::sleep(Duration::from_millis(2));
            }
        });
        Self { addr, up, switched }
    }

    /// Closes the listener (and returns once it is closed).
    pub fn down(&self) {
        self.switch(false);
    }

    /// Listens again on the same port (and returns once it does).
    pub fn up(&self) {
        self.switch(true);
    }

    fn switch(&self, up: bool) {
        let before = self.switched.load(Ordering::SeqCst);
        assert_ne!(
            self.up.swap(up, Ordering::SeqCst),
            up,
            "already in that state"
        );
        while self.switched.load(Ordering::SeqCst) == before {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// `name:` then an echo of the stream, FIN after the client's.
fn say_name(name: &str, stream: TcpStream) {
    greet_then_echo(stream, format!("{name}:").as_bytes());
}

/// Sends `greeting`, then an echo of the stream, and FIN after the
/// client's.
fn greet_then_echo(mut stream: TcpStream, greeting: &[u8]) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let _ = writer.write_all(greeting);
    let _ = io::copy(&mut stream, &mut writer);
    let _ = writer.shutdown(Shutdown::Write);
}

/// A port on loopback nobody listens on (bound, then closed).
pub fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    thread::sleep(Duration::from_millis(10));
    addr
}

/// A loopback port that never completes a handshake: its listener's accept
/// queue is full (backlog 0, filled by connections nobody accepts), so the
/// kernel drops every further SYN. Silent for as long as it lives.
pub struct SilentPort {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<socket2::Socket>,
}

impl SilentPort {
    pub fn new() -> Self {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let fillers = (0..2)
            .map(|_| {
                let filler = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                filler.set_nonblocking(true).unwrap();
                // In progress (or done): the queue takes the first, the
                // kernel drops the second's SYN.
                let _ = filler.connect(&addr.into());
                filler
            })
            .collect();
        thread::sleep(Duration::from_millis(50));
        Self {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}

impl Default for SilentPort {
    fn default() -> Self {
        Self::new()
    }
}
