//! An epoll set, as the two kinds of socket waits here use it: asked without
//! blocking (the flow-control scan, or once glommio reported the set ready).
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

pub struct EpollSet {
    fd: OwnedFd,
}

impl EpollSet {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.fd.as_fd()
    }

    /// `epoll_ctl(operation)` for `socket`, with `events` and `data`.
    pub fn control(
        &self,
        operation: libc::c_int,
        socket: BorrowedFd<'_>,
        events: u32,
        data: u64,
    ) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: data };
        // SAFETY: both descriptors are valid; `event` is valid for the call.
        let rc = unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                operation,
                socket.as_raw_fd(),
                &mut event,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Fills `events` with the events ready now, without waiting; returns
    /// how many.
    pub fn ready_now(&self, events: &mut [libc::epoll_event]) -> usize {
        // SAFETY: `events` is valid for writes of its length.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len().min(libc::c_int::MAX as usize) as libc::c_int,
                0,
            )
        };
        n.max(0) as usize
    }
}
