//! The upgrade socket's framing: each message is a 4-byte big-endian length
//! and that many bytes of JSON, and the descriptors it carries travel with
//! its first byte as one `SCM_RIGHTS` control message.
//!
//! Written on `libc` directly: the few lines of `sendmsg`/`recvmsg` are all
//! that is needed, and the `nix` crate in the lock file is built by
//! glommio without its `socket` feature (enabling it would rebuild both).
//! Descriptors received are `O_CLOEXEC` (`MSG_CMSG_CLOEXEC`), so a child
//! process never inherits a live connection.
use std::{
    io::{self, Read as _},
    mem,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    ptr,
};

use serde::{Serialize, de::DeserializeOwned};

/// Most descriptors one message carries: the kernel's `SCM_MAX_FD` is 253.
pub const MAX_FDS: usize = 250;
/// Longest message accepted: a peer cannot make us allocate more.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Sends `message` with `fds` (at most [`MAX_FDS`]).
pub fn send<T: Serialize>(stream: &UnixStream, message: &T, fds: &[RawFd]) -> io::Result<()> {
    assert!(
        fds.len() <= MAX_FDS,
        "at most {MAX_FDS} descriptors a message"
    );
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let mut bytes = Vec::with_capacity(4 + body.len());
    bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&body);
    let mut sent = send_with_fds(stream, &bytes, fds)?;
    while sent < bytes.len() {
        sent += send_with_fds(stream, &bytes[sent..], &[])?;
    }
    Ok(())
}

/// Receives one message and the descriptors that came with it.
pub fn receive<T: DeserializeOwned>(stream: &UnixStream) -> io::Result<(T, Vec<OwnedFd>)> {
    let mut head = [0u8; 4];
    let (n, fds) = receive_with_fds(stream, &mut head)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other process closed the upgrade socket",
        ));
    }
    let mut stream_ref = stream;
    if n < head.len() {
        stream_ref.read_exact(&mut head[n..])?;
    }
    let len = u32::from_be_bytes(head) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("an upgrade message of {len} bytes (at most {MAX_MESSAGE})"),
        ));
    }
    let mut body = vec![0u8; len];
    stream_ref.read_exact(&mut body)?;
    let message =
        serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((message, fds))
}

fn control_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic only.
    unsafe { libc::CMSG_SPACE((fds * mem::size_of::<RawFd>()) as u32) as usize }
}

fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // u64 elements: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; control_space(fds.len()).div_ceil(8)];
    // SAFETY: msghdr is plain data; every pointer set below is valid for the
    // call, and the control buffer is as large as CMSG_SPACE asks.
    unsafe {
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control_space(fds.len()) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of_val(fds) as u32) as _;
            ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
        loop {
            let n = libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn receive_with_fds(stream: &UnixStream, into: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: into.as_mut_ptr().cast(),
        iov_len: into.len(),
    };
    let space = control_space(MAX_FDS);
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: as in `send_with_fds`; the descriptors the kernel wrote into
    // the control buffer are new ones, owned from here on.
    unsafe {
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = loop {
            let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "descriptors were cut off (more than the message may carry)",
            ));
        }
        Ok((n, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::{io::Write as _, os::fd::AsFd as _};

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Message {
        text: String,
    }

    #[test]
    fn a_message_and_its_descriptors_arrive_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut x, y) = UnixStream::pair().unwrap();
        let message = Message {
            text: "hello".into(),
        };
        send(&a, &message, &[y.as_raw_fd(), y.as_raw_fd()]).unwrap();
        drop(y);
        let (got, fds) = receive::<Message>(&b).unwrap();
        assert_eq!(got, message);
        assert_eq!(fds.len(), 2);
        // The received descriptor is the same socket: x's bytes reach it.
        x.write_all(b"ping").unwrap();
        let mut received = [0u8; 4];
        let mut y = UnixStream::from(fds[0].as_fd().try_clone_to_owned().unwrap());
        y.read_exact(&mut received).unwrap();
        assert_eq!(&received, b"ping");
        drop(a);
        assert_eq!(
            receive::<Message>(&b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
