//! Socket queries and options the splice design relies on: socket2's where
//! it has them, `libc` for the rest (TCP_INFO, SIOCOUTQ, FIONREAD,
//! TCP_REPAIR, SO_SNDBUFFORCE, SO_RCVLOWAT).
use std::{
    io, mem,
    net::Shutdown,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use socket2::{Protocol, SockRef, Type};

/// TCP states from `include/net/tcp_states.h`, as `tcpi_state` reports them.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
}

fn getsockopt<T: Copy>(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<T> {
    // SAFETY: `T` is a plain C value (only integers and C structs are used
    // here); zeroed is a valid initial value and the kernel writes at most
    // `len` bytes into it.
    let mut value: T = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes for the duration of
    // the call, and `len` is the size of `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setsockopt<T: Copy>(fd: BorrowedFd<'_>, level: i32, name: i32, value: T) -> io::Result<()> {
    // SAFETY: `value` is a plain C value valid for reads of its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `net.ipv4.tcp_rmem`'s maximum: what a slow but reading peer may
/// legitimately leave in a receive buffer.
pub fn receive_buffer_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse::<u64>().ok())
        .unwrap_or(32 << 20)
}

/// The kernel's cookie of a socket: the key of the probe's `ROUTES` map.
pub fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    SockRef::from(&fd).cookie()
}

/// `send(2)` without blocking (and without SIGPIPE).
pub fn send_nonblocking(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    SockRef::from(&fd).send_with_flags(bytes, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
}

/// Whether a send into a TCP socket failed because the kernel had no memory
/// for it at that moment, which Linux (6.1 to 6.18 at least) reports as
/// EFAULT, not EAGAIN: under TCP memory pressure `tcp_wmem_schedule`
/// returns the socket's forward allocation, negative on a sockmap socket
/// charged for bytes its probe passed up, and the copy of a negative size
/// fails (the kernel warns in `check_copy_size`). Nothing was queued: the
/// send is tried again later. Our buffers are valid, so EFAULT means
/// nothing else here.
pub fn short_of_kernel_memory(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::EFAULT)
}

/// `recv(2)` without blocking.
pub fn recv_nonblocking(fd: BorrowedFd<'_>, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` is valid for writes of its length.
    let received = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if received < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(received as usize)
    }
}

/// Sets the send buffer to `bytes` (SO_SNDBUFFORCE, which CAP_NET_ADMIN
/// allows past `net.core.wmem_max`; plain SO_SNDBUF otherwise). The kernel
/// doubles the value for its bookkeeping.
pub fn set_send_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes)
        .or_else(|_| setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes))
}

/// The socket's `TCP_INFO`.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    getsockopt::<libc::tcp_info>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// Bytes ever handed to this socket's TCP send queue, plus a constant that
/// depends on the connection (its SYN may be counted): only differences
/// between two readings mean anything.
///
/// It is `bytes_acked + SIOCOUTQ` (acknowledged + still queued). Reading the
/// acknowledged count first means an ACK arriving in between can only make
/// the sum smaller than the truth, never larger, so a caller waiting for it
/// to reach a target never stops early.
pub fn bytes_handed_to_tcp(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(bytes_handed_and_acked(fd)?.0)
}

/// [`bytes_handed_to_tcp`] and the `tcpi_bytes_acked` it was computed
/// from, read together.
pub fn bytes_handed_and_acked(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let acked = tcp_info(fd)?.tcpi_bytes_acked;
    Ok((acked + bytes_queued(fd)?, acked))
}

/// Bytes in the send queue not yet acknowledged by the peer (SIOCOUTQ).
pub fn bytes_queued(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int into `queued`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued.max(0) as u64)
}

/// Bytes waiting in the receive queue (FIONREAD).
pub fn bytes_readable(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut readable: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `readable`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &raw mut readable) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(readable.max(0) as usize)
}

/// TCP sequence number of the next byte userspace would read: where the
/// probe must start taking a socket's stream; and how many bytes were
/// waiting to be read then.
///
/// It is `rcv_nxt` (read with TCP_REPAIR_QUEUE/TCP_QUEUE_SEQ: repair mode
/// is switched on for the one read and off again, without the window probe
/// that leaving it otherwise sends; it needs CAP_NET_ADMIN)
/// minus the bytes waiting to be read. Bytes arriving in between would make
/// the two readings disagree, so it reads until the waiting count is stable
/// around the sequence read. Only for sockets not in a SockMap (whose
/// FIONREAD counts something else).
pub fn next_unread_seq(fd: BorrowedFd<'_>) -> io::Result<(u32, usize)> {
    const TCP_REPAIR: libc::c_int = 19;
    const TCP_REPAIR_QUEUE: libc::c_int = 20;
    const TCP_QUEUE_SEQ: libc::c_int = 21;
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_REPAIR_ON: libc::c_int = 1;
    // Leaving repair mode with plain TCP_REPAIR_OFF (0) sends a window
    // probe, which the peer answers: two packets per socket for nothing.
    const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
    for _ in 0..100 {
        let waiting = bytes_readable(fd)?;
        setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)?;
        let rcv_nxt = setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            .and_then(|()| getsockopt::<u32>(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ));
        setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)?;
        let rcv_nxt = rcv_nxt?;
        if bytes_readable(fd)? == waiting {
            return Ok((rcv_nxt.wrapping_sub(waiting as u32), waiting));
        }
    }
    Err(io::Error::other(
        "bytes kept arriving while reading the receive sequence",
    ))
}

/// Makes the kernel run the verdict on bytes that reached the receive queue
/// before the socket was inserted into the SockMap (otherwise they wait for
/// the next segment, and a client waiting for a reply would hang).
pub fn kick_receive_queue(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
}

/// Makes the next close send RST instead of FIN (SO_LINGER with 0 timeout):
/// the way to pass a reset on to the other side of a connection.
pub fn reset_on_close(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_linger(Some(Duration::ZERO))
}

/// `shutdown(SHUT_RD)`: wakes the socket's readers (their reads end)
/// without sending anything to the peer.
pub fn shutdown_read(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).shutdown(Shutdown::Read)
}

/// `shutdown(SHUT_WR)`: sends FIN after what is queued.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).shutdown(Shutdown::Write)
}

/// The pending socket error (`SO_ERROR`), cleared by reading it.
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    SockRef::from(&fd).take_error()
}

/// Makes every connected TCP socket this process holds send RST when it is
/// closed (listening sockets are left alone): for an exit that cuts live
/// connections, so that no peer takes a cut stream for a finished one.
/// Returns how many sockets it changed.
pub fn reset_every_connection_on_close() -> io::Result<usize> {
    let mut changed = 0;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(fd) = entry?.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        // Standard input, output and error are not connections, even when
        // they are sockets (a supervisor's log stream).
        if fd <= 2 {
            continue;
        }
        // A duplicate of our own: the listed descriptor may be closed (and
        // its number reused) meanwhile, the duplicate cannot.
        // SAFETY: F_DUPFD_CLOEXEC reads no memory; a closed `fd` gives EBADF.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if copy < 0 {
            continue;
        }
        // SAFETY: `copy` is a new descriptor that nothing else owns.
        let copy = unsafe { OwnedFd::from_raw_fd(copy) };
        let socket = SockRef::from(&copy);
        let connected_tcp = socket.r#type().is_ok_and(|t| t == Type::STREAM)
            && socket.protocol().is_ok_and(|p| p == Some(Protocol::TCP))
            && socket.is_listener().is_ok_and(|listening| !listening);
        if connected_tcp && reset_on_close(copy.as_fd()).is_ok() {
            changed += 1;
        }
    }
    Ok(changed)
}
