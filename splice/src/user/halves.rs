//! A connection's socket as its two legs share it: the source of one leg
//! and the destination of the other.
//!
//! A socket stays a glommio stream, or, for a connection forwarded next to
//! a probe, leaves glommio for the forwarding: it is then read and written
//! with plain non-blocking calls and waits in the executor's
//! [`Readiness`] set, which costs no armed glommio poll per socket (see
//! there).
use std::{
    cell::{Cell, RefCell},
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    pin::Pin,
    rc::Rc,
    task::{Context, Poll},
};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use super::{
    readiness::{Interest, Key, Readiness},
    socket,
};

/// One side's view of a shared socket: it reads and writes.
pub enum Half {
    Glommio(Rc<RefCell<TcpStream>>),
    Own(Rc<OwnSocket>),
}

/// Two halves of `stream`, one for each leg. With `readiness`, the socket
/// leaves glommio (its descriptor number changes: take it from the halves,
/// see [`Half::fd`]); if it cannot, the stream is closed with a reset.
pub fn split(stream: TcpStream, readiness: Option<&Rc<Readiness>>) -> io::Result<(Half, Half)> {
    Ok(match readiness {
        Some(readiness) => {
            let socket = Rc::new(OwnSocket::take(stream, readiness)?);
            (Half::Own(Rc::clone(&socket)), Half::Own(socket))
        }
        None => {
            let stream = Rc::new(RefCell::new(stream));
            (Half::Glommio(Rc::clone(&stream)), Half::Glommio(stream))
        }
    })
}

impl Half {
    /// The kernel forwards this socket's bytes (it is spliced): its reads
    /// wait only for the end of the stream from now on, and the flow control
    /// wakes them for bytes the probe passes up (see [`Interest::End`]).
    pub fn set_spliced(&self) {
        if let Self::Own(socket) = self {
            socket.spliced.set(true);
        }
    }

    /// The socket's descriptor; valid as long as a half lives.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            // SAFETY: the stream owns the descriptor and lives in `self`.
            Self::Glommio(stream) => unsafe { BorrowedFd::borrow_raw(stream.borrow().as_raw_fd()) },
            Self::Own(socket) => socket.fd.as_fd(),
        }
    }
}

impl AsyncRead for Half {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffer: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match &*self {
            Self::Glommio(stream) => Pin::new(&mut *stream.borrow_mut()).poll_read(cx, buffer),
            Self::Own(own) => own.poll_io(cx, own.read_interest(), |fd| {
                socket::recv_nonblocking(fd, buffer)
            }),
        }
    }
}

impl AsyncWrite for Half {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &*self {
            Self::Glommio(stream) => Pin::new(&mut *stream.borrow_mut()).poll_write(cx, bytes),
            Self::Own(own) => own.poll_io(cx, Interest::Write, |fd| {
                socket::send_nonblocking(fd, bytes)
            }),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &*self {
            Self::Glommio(stream) => Pin::new(&mut *stream.borrow_mut()).poll_flush(cx),
            Self::Own(_) => Poll::Ready(Ok(())),
        }
    }

    /// Shuts the socket down for writing (sends FIN).
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &*self {
            Self::Glommio(stream) => Pin::new(&mut *stream.borrow_mut()).poll_close(cx),
            Self::Own(own) => Poll::Ready(socket::shutdown_write(own.fd.as_fd())),
        }
    }
}

/// A socket taken out of glommio, waiting in a [`Readiness`] set.
pub struct OwnSocket {
    fd: OwnedFd,
    key: Key,
    readiness: Rc<Readiness>,
    spliced: Cell<bool>,
}

impl OwnSocket {
    /// Takes `stream`'s socket out of glommio: a copy of its descriptor
    /// stays, the stream (and the poll it had armed) goes.
    fn take(stream: TcpStream, readiness: &Rc<Readiness>) -> io::Result<Self> {
        // SAFETY: the stream owns the descriptor and outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        let copy = fd.try_clone_to_owned().inspect_err(|_| {
            // Closed as a failure, not as an end of stream.
            let _ = socket::reset_on_close(fd);
        })?;
        drop(stream);
        Ok(Self {
            fd: copy,
            key: readiness.key(),
            readiness: Rc::clone(readiness),
            spliced: Cell::new(false),
        })
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
    fn poll_io(
        &self,
        cx: &Context<'_>,
        interest: Interest,
        mut operation: impl FnMut(BorrowedFd<'_>) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
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
