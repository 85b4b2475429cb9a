//! Idle connections and dead peers. Each executor keeps the two sockets of
//! its forwarded connections in one table (no timer per connection); a scan
//! a few times per timeout reads each socket's `TCP_INFO`, where the kernel
//! keeps when data last came in and went out, for copied and spliced bytes
//! alike, and shuts both sockets of a connection idle past its
//! `idle_timeout` down: both peers get a FIN, the pipe's legs see the end
//! of both streams and the connection ends, freeing its slots. TCP
//! keepalive ([`set_keepalive`]) finds peers that vanished without a FIN.
use std::{
    cell::RefCell,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, RawFd},
    rc::Rc,
    time::Duration,
};

use slab::Slab;
use tracing::info;

use crate::{config::Keepalive, shard::Shard};

/// Bounds of the scan's period (an eighth of the shortest timeout): a
/// connection is closed at most about an eighth late.
const SCAN_MIN: Duration = Duration::from_millis(50);
const SCAN_MAX: Duration = Duration::from_secs(30);
/// Connections checked between two yields to the executor's other tasks.
const SCAN_BATCH: usize = 256;

/// One executor's forwarded connections with an idle timeout.
#[derive(Default)]
pub(crate) struct Idle {
    watched: RefCell<Slab<Watched>>,
}

#[derive(Clone, Copy)]
struct Watched {
    sockets: [RawFd; 2],
    /// Milliseconds; `u32::MAX` once shut down.
    timeout_ms: u32,
}

/// Keeps a connection in the table while it lives (the pipe owns the
/// sockets and drops this before it closes them... or in the same poll:
/// the scan runs on the same thread, between polls).
pub(crate) struct Watch<'a> {
    idle: &'a Idle,
    key: usize,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.idle.watched.borrow_mut().remove(self.key);
    }
}

impl Idle {
    /// Watches a connection's two sockets; `None` when `timeout` is zero
    /// (off).
    pub(crate) fn watch(&self, sockets: [RawFd; 2], timeout: Duration) -> Option<Watch<'_>> {
        if timeout.is_zero() {
            return None;
        }
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX - 1);
        let key = self.watched.borrow_mut().insert(Watched {
            sockets,
            timeout_ms,
        });
        Some(Watch { idle: self, key })
    }

    /// Shuts down the connections idle past their timeout; returns how
    /// many, and the shortest timeout seen (for the next period).
    async fn scan(&self) -> (usize, Option<Duration>) {
        let mut closed = 0;
        let mut shortest = u32::MAX;
        let capacity = self.watched.borrow().capacity();
        for key in 0..capacity {
            if key % SCAN_BATCH == SCAN_BATCH - 1 {
                glommio::yield_if_needed().await;
            }
            let Some(entry) = self.watched.borrow().get(key).copied() else {
                continue;
            };
            if entry.timeout_ms == u32::MAX {
                continue;
            }
            shortest = shortest.min(entry.timeout_ms);
            // The second socket only if the first is quiet long enough.
            let idle = entry
                .sockets
                .iter()
                .all(|&fd| quiet_ms(fd).is_some_and(|quiet| quiet >= entry.timeout_ms));
            if idle {
                for fd in entry.sockets {
                    // SAFETY: a socket of a live connection (see `Watch`).
                    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                    let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
                }
                if let Some(entry) = self.watched.borrow_mut().get_mut(key) {
                    entry.timeout_ms = u32::MAX;
                }
                closed += 1;
            }
        }
        let shortest = (shortest != u32::MAX).then(|| Duration::from_millis(shortest.into()));
        (closed, shortest)
    }
}

/// How long (ms) since `fd` last received or sent data; `None` if the
/// kernel does not say (then it is not closed).
fn quiet_ms(fd: RawFd) -> Option<u32> {
    // SAFETY: `tcp_info` is plain integers; getsockopt writes at most `len`
    // bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| info.tcpi_last_data_recv.min(info.tcpi_last_data_sent))
}

/// Scans `shard`'s connections for idle ones, forever: every eighth of the
/// shortest idle timeout (of the configuration in force and of the live
/// connections), within [`SCAN_MIN`] and [`SCAN_MAX`].
pub(crate) async fn reap_forever(shard: Rc<Shard>) {
    let mut shortest_live: Option<Duration> = None;
    loop {
        let configured = {
            let current = shard.current.borrow();
            let config = &current.1.config;
            config
                .routes
                .iter()
                .map(|route| config.idle_timeout_of(route))
                .filter(|t| !t.is_zero())
                .min()
        };
        let shortest = match (configured, shortest_live) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(SCAN_MAX * 8),
        };
        glommio::timer::sleep((shortest / 8).clamp(SCAN_MIN, SCAN_MAX)).await;
        let (closed, shortest) = shard.idle.scan().await;
        shortest_live = shortest;
        if closed > 0 {
            info!(
                core = shard.core,
                closed, "closed connection(s) idle past their idle_timeout"
            );
        }
    }
}

/// Sets TCP keepalive on `socket` (off with `None`). On a listener,
/// accepted sockets inherit it.
pub fn set_keepalive(socket: impl AsFd, keepalive: Option<Keepalive>) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(&socket);
    match keepalive {
        Some(k) => socket.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.count),
        ),
        None => socket.set_keepalive(false),
    }
}

/// The raw descriptors of a connection's two sockets, for [`Idle::watch`].
pub(crate) fn raw(client: BorrowedFd<'_>, backend: BorrowedFd<'_>) -> [RawFd; 2] {
    [client.as_raw_fd(), backend.as_raw_fd()]
}
