//! The ends (FIN, reset, `shutdown`) of spliced sources whose legs parked
//! their reads (glommio streams, see [`super::quiet_read`]): one epoll set
//! per probe, asked without blocking at each flow-control scan.
//!
//! A parked leg keeps no read armed (see [`super::quiet_read`]), so nothing
//! else would tell it that its source ended. The set asks only for
//! `EPOLLRDHUP` (plus the error and hang-up events epoll always reports),
//! not `EPOLLIN`: the kernel filters out the wake-up it makes after every
//! verdict run before it reaches the set, so a busy source costs nothing
//! here. Each registration is one-shot: an end is reported once, and its leg
//! then reads until it sees it.
use std::{
    cell::Cell,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

/// Most ends taken from the kernel per scan (the rest come at the next).
const MAX_ENDS_PER_SCAN: usize = 64;

pub struct SourceEnds {
    epoll: OwnedFd,
    /// Sources registered and not yet removed: the scan skips the system
    /// call while there are none.
    registered: Cell<usize>,
}

impl SourceEnds {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: `fd` is a new descriptor nobody else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            registered: Cell::new(0),
        })
    }

    /// Reports `source`'s end, once, as `slot`. An end that already happened
    /// is reported at the next [`Self::take`].
    pub fn add(&self, source: BorrowedFd<'_>, slot: u32) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: u64::from(slot),
        };
        self.control(libc::EPOLL_CTL_ADD, source, &mut event)?;
        self.registered.set(self.registered.get() + 1);
        Ok(())
    }

    /// Forgets `source` (before its slot is reused).
    pub fn remove(&self, source: BorrowedFd<'_>) {
        let mut unused = libc::epoll_event { events: 0, u64: 0 };
        // Fails only if the socket was closed already, which removed it.
        let _ = self.control(libc::EPOLL_CTL_DEL, source, &mut unused);
        self.registered.set(self.registered.get().saturating_sub(1));
    }

    /// The slots of the sources that ended since the last call.
    pub fn take(&self, ended: &mut Vec<u32>) {
        ended.clear();
        if self.registered.get() == 0 {
            return;
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX_ENDS_PER_SCAN];
        // SAFETY: `events` is valid for writes of MAX_ENDS_PER_SCAN entries.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                MAX_ENDS_PER_SCAN as libc::c_int,
                0,
            )
        };
        for event in events.iter().take(n.max(0) as usize) {
            ended.push(event.u64 as u32);
        }
    }

    fn control(
        &self,
        operation: libc::c_int,
        source: BorrowedFd<'_>,
        event: &mut libc::epoll_event,
    ) -> io::Result<()> {
        // SAFETY: both descriptors are valid; `event` is valid for the call.
        let rc = unsafe {
            libc::epoll_ctl(self.epoll.as_raw_fd(), operation, source.as_raw_fd(), event)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
