//! The HTTP endpoint of `--metrics ADDR`: `GET /metrics` (Prometheus text),
//! `GET /healthz` (liveness) and `GET /readyz` (readiness), `HEAD` of each.
//!
//! A liveness probe that times out gets the process killed, so no client
//! can hold the endpoint: each connection is served on a thread of its own,
//! within one deadline for the whole request (reading the head and writing
//! the answer). One client address keeps at most [`PER_CLIENT`] open (past
//! that its own oldest is closed), and at most [`MAX_CONNECTIONS`] are open
//! in all (past that the oldest is closed: a slow client is the one that
//! stays longest), so a flood from one address cannot push another's probe
//! out. Nothing here runs on an executor.
use std::{
    collections::{HashMap, VecDeque},
    io::{self, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    thread,
    time::{Duration, Instant},
};

use prometheus_client::{encoding::prometheus_text, registry::Registry};

use super::{counters::Lifecycle, prometheus::encode};

/// How long one request may take, from accept to the last byte answered.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; a new one past this closes the oldest.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections one client address keeps open; a new one past this closes
/// that address's oldest.
pub const PER_CLIENT: usize = 16;
/// Request threads one client address may have alive (a closed
/// connection's thread ends at its next read or write, but a flood opens
/// faster than threads end); past this that address's new connections are
/// closed at once, and no one else's.
const THREADS_PER_CLIENT: usize = 2 * PER_CLIENT;
/// Request threads alive at once, over every address.
const MAX_THREADS: usize = 8 * MAX_CONNECTIONS;
/// Longest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Stack of a connection's thread: it parses a head and writes a buffer.
const THREAD_STACK: usize = 128 * 1024;

/// How often the accept loop looks whether a new process took the
/// listener over.
const HANDOVER_CHECK: Duration = Duration::from_millis(100);

/// Waits until `listener` has a connection waiting, or `timeout`.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    let mut poll = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(listener),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call.
    unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) };
}

/// Binds the endpoint's listener. With SO_REUSEADDR: the endpoint closes
/// first, so its side of each scrape waits in TIME_WAIT, which would keep
/// a restarted router from binding the port for a minute.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The connections being served, oldest first, by a number of their own,
/// with their client's address; and the request threads alive.
#[derive(Default)]
struct Open {
    next: u64,
    streams: VecDeque<(u64, Option<IpAddr>, TcpStream)>,
    threads: usize,
    threads_per_client: HashMap<Option<IpAddr>, usize>,
}

/// Serves the endpoint on `listener` from a thread of its own
/// (`router-metrics`) and one short-lived thread per connection.
pub fn serve(
    listener: TcpListener,
    registry: Registry,
    lifecycle: Arc<Lifecycle>,
) -> io::Result<thread::JoinHandle<()>> {
    let registry = Arc::new(registry);
    let open = Arc::new(Mutex::new(Open::default()));
    thread::Builder::new()
        .name("router-metrics".into())
        .spawn(move || {
            // Non-blocking, looked at every HANDOVER_CHECK: after an upgrade
            // the new process accepts on the same socket, and this thread
            // stops without shutting it (see `crate::upgrade`).
            if let Err(e) = listener.set_nonblocking(true) {
                tracing::warn!("metrics listener: {e}");
            }
            loop {
                if lifecycle.handed_over.load(Relaxed) {
                    return;
                }
                let stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        wait_readable(&listener, HANDOVER_CHECK);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("metrics listener: accept failed: {e}");
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let accepted = Instant::now();
                let Some((id, client)) = admit(&open, &stream) else {
                    let _ = stream.shutdown(Shutdown::Both);
                    continue;
                };
                let (registry, lifecycle, opened) = (
                    Arc::clone(&registry),
                    Arc::clone(&lifecycle),
                    Arc::clone(&open),
                );
                let open = Arc::clone(&opened);
                let spawned = thread::Builder::new()
                    .name("router-metrics-request".into())
                    .stack_size(THREAD_STACK)
                    .spawn(move || {
                        let deadline = accepted + REQUEST_DEADLINE;
                        if let Err(e) = answer(&stream, deadline, &registry, &lifecycle) {
                            tracing::debug!("metrics request: {e}");
                        }
                        release(&open, id, client);
                    });
                if let Err(e) = spawned {
                    tracing::warn!("metrics request: cannot start its thread: {e}");
                    release(&opened, id, client);
                }
            }
        })
}

/// Counts `stream` and its thread among the open ones, closing its
/// client's oldest connection, or the oldest of all, if there is no room;
/// `None` if it cannot be served (too many threads alive for its address or
/// in all, or no copy of the socket): then the caller closes it. Returns
/// its number and client address.
fn admit(open: &Mutex<Open>, stream: &TcpStream) -> Option<(u64, Option<IpAddr>)> {
    let copy = stream.try_clone().ok()?;
    let client = stream.peer_addr().ok().map(|addr| addr.ip());
    let mut open = open.lock().expect("no panic under this lock");
    let client_threads = open.threads_per_client.get(&client).copied().unwrap_or(0);
    if open.threads >= MAX_THREADS || client_threads >= THREADS_PER_CLIENT {
        return None;
    }
    let same_client = open
        .streams
        .iter()
        .filter(|(_, ip, _)| *ip == client)
        .count();
    let evict = if same_client >= PER_CLIENT {
        open.streams.iter().position(|(_, ip, _)| *ip == client)
    } else if open.streams.len() >= MAX_CONNECTIONS {
        Some(0)
    } else {
        None
    };
    if let Some((_, _, oldest)) = evict.and_then(|index| open.streams.remove(index)) {
        // Its thread's read or write ends at once, and the thread with it.
        let _ = oldest.shutdown(Shutdown::Both);
    }
    let id = open.next;
    open.next += 1;
    open.threads += 1;
    *open.threads_per_client.entry(client).or_default() += 1;
    open.streams.push_back((id, client, copy));
    Some((id, client))
}

/// A request's thread ended (or could not start): forgets its connection.
fn release(open: &Mutex<Open>, id: u64, client: Option<IpAddr>) {
    let mut open = open.lock().expect("no panic under this lock");
    open.threads -= 1;
    if let Some(count) = open.threads_per_client.get_mut(&client) {
        *count -= 1;
        if *count == 0 {
            open.threads_per_client.remove(&client);
        }
    }
    if let Some(index) = open.streams.iter().position(|(other, _, _)| *other == id) {
        open.streams.remove(index);
    }
}

/// Time left before `deadline`, as a socket timeout (never zero, which
/// would mean none).
fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "request deadline passed",
        ));
    }
    Ok(left)
}

fn answer(
    mut stream: &TcpStream,
    deadline: Instant,
    registry: &Registry,
    lifecycle: &Lifecycle,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    let (method, path) = loop {
        stream.set_read_timeout(Some(left(deadline)?))?;
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    request.method.unwrap_or_default().to_owned(),
                    request.path.unwrap_or_default().to_owned(),
                );
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_REQUEST => {}
            Ok(httparse::Status::Partial) => {
                return respond(
                    stream,
                    deadline,
                    431,
                    "text/plain",
                    "request too large\n",
                    true,
                );
            }
            Err(_) => return respond(stream, deadline, 400, "text/plain", "bad request\n", true),
        }
    };
    let with_body = method == "GET";
    if !with_body && method != "HEAD" {
        return respond(
            stream,
            deadline,
            405,
            "text/plain",
            "only GET and HEAD\n",
            true,
        );
    }
    // The query string does not matter (Prometheus may add one).
    let path = path.split('?').next().unwrap_or_default();
    let draining = lifecycle.draining.load(Relaxed);
    let (status, content_type, body) = match path {
        "/metrics" => (200, prometheus_text::CONTENT_TYPE, encode(registry)),
        // Liveness: the process answers, draining or not.
        "/healthz" => (200, "text/plain", "ok\n".to_owned()),
        "/readyz" if draining => (503, "text/plain", "draining\n".to_owned()),
        "/readyz" if !lifecycle.ready.load(Relaxed) => (503, "text/plain", "starting\n".to_owned()),
        "/readyz" => (200, "text/plain", "ready\n".to_owned()),
        _ => (
            404,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    };
    respond(stream, deadline, status, content_type, &body, with_body)
}

fn respond(
    mut stream: &TcpStream,
    deadline: Instant,
    status: u16,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        answer.extend_from_slice(body.as_bytes());
    }
    let mut rest = &answer[..];
    while !rest.is_empty() {
        stream.set_write_timeout(Some(left(deadline)?))?;
        let n = stream.write(rest)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        rest = &rest[n..];
    }
    Ok(())
}
