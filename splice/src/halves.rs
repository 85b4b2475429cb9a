//! A router's sockets, outside glommio: accepted, connected, read and
//! written with plain non-blocking calls, waiting in the executor's
//! [`Readiness`] set, and shared by a connection's two legs (the source of
//! one and the destination of the other).
//!
//! A glommio stream costs, per connection, an io_uring request for its
//! accept or connect and a readiness poll armed from its creation on, which
//! is cancelled when the stream goes (task work delivered to the executor);
//! and an idle proxied connection keeps one armed on both sockets (see
//! [`Readiness`]). A socket here costs an entry in the kernel's epoll set and
//! a few bytes in [`Readiness`]: only the set itself is polled through
//! glommio.
use std::{
    cell::Cell,
    future::poll_fn,
    io,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    pin::Pin,
    rc::Rc,
    task::{Context, Poll},
};

use futures_lite::{AsyncRead, AsyncWrite};
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use super::{
    readiness::{Interest, Key, Readiness},
    socket,
};

/// One side's view of a shared socket: it reads and writes.
pub struct Half(Rc<OwnSocket>);

/// Two halves of `socket`, one for each leg.
pub fn split(socket: OwnSocket) -> (Half, Half) {
    let socket = Rc::new(socket);
    (Half(Rc::clone(&socket)), Half(socket))
}

impl Half {
    /// The kernel forwards this socket's bytes (it is spliced): its reads
    /// wait only for the end of the stream from now on, and the flow control
    /// wakes them for bytes the probe passes up (see [`Interest::End`]).
    pub fn set_spliced(&self) {
        self.0.spliced.set(true);
    }

    /// The socket's descriptor; valid as long as a half lives.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.fd.as_fd()
    }

    /// See [`OwnSocket::leave_readiness`].
    pub fn leave_readiness(&self) {
        self.0.leave_readiness();
    }
}

impl AsyncRead for Half {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffer: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let own = &self.0;
        own.poll_io(cx, own.read_interest(), |fd| {
            socket::recv_nonblocking(fd, buffer)
        })
    }
}

impl AsyncWrite for Half {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_io(cx, Interest::Write, |fd| {
            socket::send_nonblocking(fd, bytes)
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Shuts the socket down for writing (sends FIN).
    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket::shutdown_write(self.0.fd.as_fd()))
    }
}

/// A non-blocking socket (or listener) waiting in a [`Readiness`] set.
pub struct OwnSocket {
    fd: OwnedFd,
    key: Key,
    readiness: Rc<Readiness>,
    spliced: Cell<bool>,
}

impl OwnSocket {
    /// Registers the non-blocking socket `fd` (under a key only: it enters
    /// the epoll set at its first wait).
    pub fn new(fd: OwnedFd, readiness: &Rc<Readiness>) -> Self {
        Self {
            fd,
            key: readiness.key(),
            readiness: Rc::clone(readiness),
            spliced: Cell::new(false),
        }
    }

    /// The socket's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Connects a new non-blocking TCP socket to `addr`, with `TCP_NODELAY`
    /// (a proxy forwards small writes as they come) and `SO_OOBINLINE` (an
    /// urgent byte is read with the stream and passed on, not dropped).
    pub async fn connect(addr: SocketAddr, readiness: &Rc<Readiness>) -> io::Result<Self> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        socket.set_nodelay(true)?;
        socket.set_out_of_band_inline(true)?;
        let addr = SockAddr::from(addr);
        let in_progress = match socket.connect(&addr) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
            Err(e) => return Err(e),
        };
        let own = Self::new(socket.into(), readiness);
        if in_progress {
            // Asked again once writable: EISCONN then means connected, and
            // a failed connection returns its error.
            poll_fn(|cx| {
                own.poll_io(cx, Interest::Write, |fd| {
                    match SockRef::from(&fd).connect(&addr) {
                        Err(e) if e.raw_os_error() == Some(libc::EISCONN) => Ok(()),
                        Err(e) if e.raw_os_error() == Some(libc::EALREADY) => {
                            Err(io::ErrorKind::WouldBlock.into())
                        }
                        other => other,
                    }
                })
            })
            .await?;
        }
        Ok(own)
    }

    /// Accepts a connection on this listening socket: a new non-blocking
    /// socket, and its peer's address. A connection that failed while it
    /// waited in the queue is skipped: accept(2) reports its error, which
    /// says nothing about the listener.
    pub async fn accept(&self) -> io::Result<(OwnedFd, Option<SocketAddr>)> {
        loop {
            match poll_fn(|cx| self.poll_io(cx, Interest::Read, accept_nonblocking)).await {
                Err(e) if failed_in_queue(&e) => continue,
                accepted => return accepted,
            }
        }
    }

    /// Takes the socket out of the epoll set now. For a socket another
    /// process holds too (a listener handed over in an upgrade): closing
    /// the descriptor removes it from the set only once every process
    /// closed it.
    pub fn leave_readiness(&self) {
        self.readiness.remove(self.key, self.fd.as_fd());
    }

    fn read_interest(&self) -> Interest {
        if self.spliced.get() {
            Interest::End
        } else {
            Interest::Read
        }
    }

    /// Runs `operation` (a non-blocking system call); if it would block,
    /// waits for `interest`.
    fn poll_io<T>(
        &self,
        cx: &Context<'_>,
        interest: Interest,
        mut operation: impl FnMut(BorrowedFd<'_>) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            let error = match operation(self.fd.as_fd()) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(error) => error,
            };
            match error.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    return match self.readiness.wait(
                        self.key,
                        self.fd.as_fd(),
                        interest,
                        cx.waker(),
                    ) {
                        Ok(()) => Poll::Pending,
                        Err(e) => Poll::Ready(Err(e)),
                    };
                }
                _ => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl Drop for OwnSocket {
    fn drop(&mut self) {
        // Closing the descriptor (next) removes it from the set.
        self.readiness.forget(self.key);
    }
}

/// `accept4(2)` of a non-blocking, close-on-exec socket, with its peer.
fn accept_nonblocking(listener: BorrowedFd<'_>) -> io::Result<(OwnedFd, Option<SocketAddr>)> {
    let (socket, peer) =
        SockRef::from(&listener).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    Ok((socket.into(), peer.as_socket()))
}

/// Errors accept(2) returns for a queued connection that failed, not for
/// the listener (its manual page: retry as for EAGAIN).
fn failed_in_queue(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_skips_failed_queued_connections_but_not_listener_errors() {
        let error = io::Error::from_raw_os_error;
        for errno in [libc::ECONNABORTED, libc::EPROTO, libc::ENETUNREACH] {
            assert!(failed_in_queue(&error(errno)), "errno {errno}");
        }
        // Out of descriptors or memory: retrying at once would spin.
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!failed_in_queue(&error(errno)), "errno {errno}");
        }
        assert!(!failed_in_queue(&io::ErrorKind::WouldBlock.into()));
    }
}
