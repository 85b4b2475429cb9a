//! Flow control for spliced sockets: one task per executor watches every
//! spliced source and parks the ones whose destination lags too far behind
//! what the kernel redirected to it (see [`crate::shared`] for why the kernel
//! cannot be left to it).
//!
//! A check costs no system call while the kernel redirected less than the
//! in-flight limit since the destination was last seen caught up: it reads
//! the redirected count from the memory-mapped `STREAMS`. Only a source past
//! that mark costs a look at its destination's TCP state. The scan runs every
//! millisecond while sources move and backs off to [`MAX_SCAN`] when all are
//! quiet, so what the kernel may hold beyond the limit is bounded by what a
//! sender pushes in that time.
use std::{
    cell::{Cell, RefCell},
    io,
    os::fd::{BorrowedFd, RawFd},
    rc::Rc,
    time::Duration,
};

use super::{probe::Probe, socket};

const MIN_SCAN: Duration = Duration::from_millis(1);
/// Longest pause between two scans: the window in which a burst after a
/// quiet spell goes unchecked.
pub const MAX_SCAN: Duration = Duration::from_millis(8);

/// How much a destination took: what the flow control and a leg's drain
/// both measure, from the counters of the destination socket.
pub struct Delivery {
    destination_fd: RawFd,
    /// `bytes_handed_to_tcp(destination)` when the leg began.
    baseline: u64,
    /// Bytes userspace wrote to the destination since.
    written: Cell<u64>,
}

impl Delivery {
    /// `destination` must outlive the delivery.
    pub fn new(destination: BorrowedFd<'_>) -> io::Result<Self> {
        use std::os::fd::AsRawFd as _;
        Ok(Self {
            destination_fd: destination.as_raw_fd(),
            baseline: socket::bytes_handed_to_tcp(destination)?,
            written: Cell::new(0),
        })
    }

    pub fn destination(&self) -> BorrowedFd<'_> {
        // SAFETY: `new`'s contract: the socket outlives us.
        unsafe { BorrowedFd::borrow_raw(self.destination_fd) }
    }

    /// Bytes userspace wrote to the destination.
    pub fn written(&self) -> u64 {
        self.written.get()
    }

    pub fn add_written(&self, n: u64) {
        self.written.set(self.written.get() + n);
    }

    /// Bytes the destination's TCP took since the leg began.
    pub fn handed(&self) -> io::Result<u64> {
        Ok(socket::bytes_handed_to_tcp(self.destination())?.saturating_sub(self.baseline))
    }

    /// Bytes the kernel redirected that the destination's TCP took.
    pub fn redirected_taken(&self) -> io::Result<u64> {
        Ok(self.handed()?.saturating_sub(self.written()))
    }
}

/// One watched source.
struct Watch {
    slot: u32,
    source_fd: RawFd,
    delivery: Rc<Delivery>,
    /// Redirected bytes the destination was last seen to have taken.
    taken: Cell<u64>,
    /// Redirected count at the previous scan.
    seen: Cell<u64>,
}

/// The watched sources of one probe.
#[derive(Default)]
pub struct Watches {
    list: Vec<Watch>,
}

impl Watches {
    pub(super) fn add(&mut self, slot: u32, source_fd: RawFd, delivery: Rc<Delivery>) {
        self.remove(slot);
        self.list.push(Watch {
            slot,
            source_fd,
            delivery,
            taken: Cell::new(0),
            seen: Cell::new(0),
        });
    }

    pub(super) fn remove(&mut self, slot: u32) {
        if let Some(i) = self.list.iter().position(|w| w.slot == slot) {
            self.list.swap_remove(i);
        }
    }
}

impl Probe {
    /// One scan: parks the sources whose destination lags by more than the
    /// limit. Returns whether any source moved much since the last scan.
    fn scan(&mut self) -> bool {
        let limit = self.in_flight_limit();
        let mut moving = false;
        let mut lagging = Vec::new();
        for watch in &self.watches.list {
            if !self.is_spliced(watch.slot) {
                continue;
            }
            let redirected = self.stream(watch.slot).redirected;
            moving |= redirected.saturating_sub(watch.seen.replace(redirected)) > limit / 8;
            if redirected <= watch.taken.get() + limit {
                continue;
            }
            match watch.delivery.redirected_taken() {
                Ok(taken) => {
                    watch.taken.set(taken);
                    if redirected.saturating_sub(taken) > limit {
                        lagging.push((watch.slot, watch.source_fd));
                    }
                }
                // A dead destination: its leg sees the error itself.
                Err(_) => {}
            }
        }
        for (slot, fd) in lagging {
            // SAFETY: a watch lives no longer than its splice, whose sockets
            // outlive it.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            if let Err(e) = self.park(slot, fd) {
                tracing::debug!("parking slot {slot} failed: {e}");
            }
        }
        moving
    }
}

/// Runs the flow control of `probe` (on its executor) forever.
pub async fn run(probe: Rc<RefCell<Probe>>) {
    let mut interval = MIN_SCAN;
    loop {
        glommio::timer::sleep(interval).await;
        let moving = probe.borrow_mut().scan();
        interval = if moving {
            MIN_SCAN
        } else {
            (interval * 2).min(MAX_SCAN)
        };
    }
}
