//! How much a spliced destination took: what the flow control and a leg's
//! drain both measure, from the destination socket's TCP counters (bytes
//! handed to TCP, bytes acknowledged) less what userspace wrote itself.
use std::{
    cell::Cell,
    io,
    os::fd::{BorrowedFd, RawFd},
};

use super::socket;

/// How much a destination took: what the flow control and a leg's drain
/// both measure, from the counters of the destination socket.
pub struct Delivery {
    destination_fd: RawFd,
    /// `bytes_handed_to_tcp(destination)` and `tcpi_bytes_acked` of the
    /// destination when the leg began; `None` for a leg that only copies
    /// (everything it delivers is its own writes, nothing to measure) until
    /// [`Self::measure_from_now`].
    baselines: Cell<Option<(u64, u64)>>,
    /// Bytes userspace wrote to the destination since.
    written: Cell<u64>,
    /// Bytes userspace read from the leg's source.
    read: Cell<u64>,
    /// Set when the connection is given up (reset): by the flow control, or
    /// by the server when the other direction failed.
    abandoned: Cell<bool>,
    /// The leg waits for its source with every byte it read written (or it
    /// ended): a point where it can be handed over ([`super::handover`]).
    pub(crate) quiet: Cell<bool>,
    /// The leg ended (its destination was shut down for writing).
    pub(crate) done: Cell<bool>,
}

impl Delivery {
    /// `destination` must outlive the delivery. Only a `spliceable` one
    /// measures what the kernel redirected to its destination.
    pub fn new(destination: BorrowedFd<'_>, spliceable: bool) -> io::Result<Self> {
        use std::os::fd::AsRawFd as _;
        let baselines = if spliceable {
            Some(socket::bytes_handed_and_acked(destination)?)
        } else {
            None
        };
        Ok(Self {
            destination_fd: destination.as_raw_fd(),
            baselines: Cell::new(baselines),
            written: Cell::new(0),
            read: Cell::new(0),
            abandoned: Cell::new(false),
            quiet: Cell::new(false),
            done: Cell::new(false),
        })
    }

    /// A delivery taken over from another process: its baselines and what
    /// userspace wrote are the ones it had there (`destination` must
    /// outlive it).
    pub(crate) fn restored(
        destination: BorrowedFd<'_>,
        baselines: Option<(u64, u64)>,
        written: u64,
    ) -> Self {
        use std::os::fd::AsRawFd as _;
        Self {
            destination_fd: destination.as_raw_fd(),
            baselines: Cell::new(baselines),
            written: Cell::new(written),
            read: Cell::new(0),
            abandoned: Cell::new(false),
            quiet: Cell::new(false),
            done: Cell::new(false),
        }
    }

    /// The baselines (see [`Self::restored`]).
    pub(crate) fn baseline_values(&self) -> Option<(u64, u64)> {
        self.baselines.get()
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

    /// Bytes userspace read from the leg's source.
    pub fn read(&self) -> u64 {
        self.read.get()
    }

    pub fn add_read(&self, n: u64) {
        self.read.set(self.read.get() + n);
    }

    /// Gives the connection up: the leg stops at its next step with an
    /// error (the caller resets the sockets).
    pub fn abandon(&self) {
        self.abandoned.set(true);
    }

    /// [`Self::abandon`], returning whether this call gave it up (it was
    /// not given up already).
    pub fn abandon_first(&self) -> bool {
        !self.abandoned.replace(true)
    }

    pub fn is_abandoned(&self) -> bool {
        self.abandoned.get()
    }

    /// Bytes the destination's TCP took since the leg began.
    pub fn handed(&self) -> io::Result<u64> {
        let (baseline, _) = self.baselines()?;
        Ok(socket::bytes_handed_to_tcp(self.destination())?.saturating_sub(baseline))
    }

    /// Whether it took the baselines that measure redirected bytes.
    pub fn measures_redirects(&self) -> bool {
        self.baselines.get().is_some()
    }

    /// Takes the baselines of a delivery made to copy, before the kernel
    /// first redirects to its destination. Exact as if taken when the leg
    /// began: until now the destination's TCP took only userspace's writes,
    /// so both counters stood at what they are now less those (a fresh
    /// socket had nothing queued or acknowledged to start with).
    pub fn measure_from_now(&self) -> io::Result<()> {
        if self.baselines.get().is_none() {
            let handed = socket::bytes_handed_to_tcp(self.destination())?;
            let start = handed.saturating_sub(self.written());
            self.baselines.set(Some((start, start)));
        }
        Ok(())
    }

    fn baselines(&self) -> io::Result<(u64, u64)> {
        self.baselines.get().ok_or_else(|| {
            io::Error::other("a leg made to copy only cannot measure redirected bytes")
        })
    }

    /// Bytes the kernel redirected that the destination's TCP took.
    pub fn redirected_taken(&self) -> io::Result<u64> {
        Ok(self.handed()?.saturating_sub(self.written()))
    }

    /// At least how many of the bytes the kernel redirected the
    /// destination's peer acknowledged (userspace's own bytes are counted as
    /// acknowledged first, which can only make this smaller).
    pub fn redirected_acked(&self) -> io::Result<u64> {
        let (_, acked_baseline) = self.baselines()?;
        let acked = socket::tcp_info(self.destination())?.tcpi_bytes_acked;
        Ok(acked
            .saturating_sub(acked_baseline)
            .saturating_sub(self.written()))
    }
}
