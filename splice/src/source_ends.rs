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
use std::{cell::Cell, io, os::fd::BorrowedFd};

use super::epoll::EpollSet;

/// Most ends taken from the kernel per scan (the rest come at the next).
const MAX_ENDS_PER_SCAN: usize = 64;

pub struct SourceEnds {
    epoll: EpollSet,
    /// Sources registered and not yet removed: the scan skips the system
    /// call while there are none.
    registered: Cell<usize>,
}

impl SourceEnds {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: EpollSet::new()?,
            registered: Cell::new(0),
        })
    }

    /// Reports `source`'s end, once, as `slot`. An end that already happened
    /// is reported at the next [`Self::take`].
    pub fn add(&self, source: BorrowedFd<'_>, slot: u32) -> io::Result<()> {
        self.epoll.control(
            libc::EPOLL_CTL_ADD,
            source,
            (libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64::from(slot),
        )?;
        self.registered.set(self.registered.get() + 1);
        Ok(())
    }

    /// Forgets `source` (before its slot is reused).
    pub fn remove(&self, source: BorrowedFd<'_>) {
        // Fails only if the socket was closed already, which removed it.
        let _ = self.epoll.control(libc::EPOLL_CTL_DEL, source, 0, 0);
        self.registered.set(self.registered.get().saturating_sub(1));
    }

    /// The slots of the sources that ended since the last call.
    pub fn take(&self, ended: &mut Vec<u32>) {
        ended.clear();
        if self.registered.get() == 0 {
            return;
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX_ENDS_PER_SCAN];
        let n = self.epoll.ready_now(&mut events);
        ended.extend(events[..n].iter().map(|event| event.u64 as u32));
    }
}
