//! Flow control for spliced sockets (see [`splice_common`]): one task per
//! executor keeps every spliced source's credit a window ahead of what its
//! destination's peer acknowledged.
//!
//! The rules (credit, renewal, window growth, stuck) are pure code in
//! [`credit`]; this task reads the counters and applies them. The window
//! starts at [`credit::INITIAL_WINDOW`] and doubles, up to the in-flight
//! limit, each time a source ran out of credit while its destination kept
//! up ([`credit::grown_window`]). A destination that does not keep up never
//! grows its window, so what the probe redirects to it stays within one
//! window; and
//! the leg forwards bytes passed up only while the destination's send
//! queue holds less than a window (`forward.rs`: a reader that stopped had
//! 33 MB queued for it before, docs/RELIABILITY.md). (Measured with
//! iperf3 over loopback, one stream: a fixed 4 MiB window let ~95% of the
//! bytes take the userspace path at 10 Gbit/s.)
//!
//! Counting from acknowledged bytes (not bytes merely queued in the
//! destination socket) bounds everything the kernel holds for a direction,
//! queued in the kernel's redirect queue or in TCP, by the limit. Spliced
//! sockets get a send buffer of several limits, so the redirect queue always
//! drains into TCP: then bytes passed up land at once in the source's
//! receive queue, where they count against its receive buffer. Bytes passed
//! up while the redirect queue of the same socket is not empty queue behind
//! it uncharged, and TCP flow control does not hold the sender back: an
//! echo whose client sent without reading made the kernel take 300 MB that
//! way (the same happens to a router connection whose two directions both
//! stall). So the scan also resets a connection whose source has more bytes
//! passed up and not yet forwarded than a receive buffer can hold plus
//! [`credit::STUCK_LIMITS`] limits (see [`credit::stuck_limit`]).
//!
//! A check costs no system call while the source still has more than half
//! its credit left: it reads the redirected count from the memory-mapped
//! `STREAMS`. Only then does it look at the destination's TCP counters and
//! write new credit to the memory-mapped `CONTROL`. A source that outruns
//! the scan just runs out of credit: the probe then passes its bytes up and
//! TCP flow control holds the sender, until its leg forwarded them.
//! The scan runs every millisecond while sources move and backs off to
//! [`MAX_SCAN`] when all are quiet. It also wakes a source's read when the
//! probe passed its bytes up (see [`super::spliced_read`]).
use std::{
    cell::{Cell, RefCell},
    os::fd::{BorrowedFd, RawFd},
    rc::Rc,
    time::Duration,
};

use super::{
    credit::{self, SEND_BUFFER_LIMITS},
    delivery::Delivery,
    kernel_view::KernelView,
    maps::Maps,
    probe::Probe,
    socket,
    spliced_read::Waiting,
    watches::{Watch, Watches},
};
use splice_common::Control;

/// Shortest pause between two scans.
pub const MIN_SCAN: Duration = Duration::from_millis(1);
/// Longest pause between two scans.
pub const MAX_SCAN: Duration = Duration::from_millis(4);

/// The flow-control state of one probe: the watched sources, each slot's
/// window, and the probe's passed-up count at the previous scan.
pub(crate) struct FlowControl {
    watches: Watches,
    /// Per slot: the credit kept ahead of its destination.
    windows: Vec<Cell<u64>>,
    in_flight_limit: u64,
    /// The largest receive buffer TCP gives a socket.
    receive_buffer_max: u64,
    passed_total: u64,
}

impl FlowControl {
    pub(crate) fn new(slots: u32, in_flight_limit: u64) -> Self {
        Self {
            watches: Watches::default(),
            windows: (0..slots).map(|_| Cell::new(0)).collect(),
            in_flight_limit,
            receive_buffer_max: socket::receive_buffer_max(),
            passed_total: 0,
        }
    }

    /// The window a new source starts with.
    pub(crate) fn initial_window(&self) -> u64 {
        credit::INITIAL_WINDOW.min(self.in_flight_limit)
    }

    pub(crate) fn in_flight_limit(&self) -> u64 {
        self.in_flight_limit
    }

    /// The window of the socket in `slot`, and setting it.
    pub(crate) fn window(&self, slot: u32) -> u64 {
        self.windows[slot as usize].get()
    }

    pub(crate) fn set_window(&self, slot: u32, window: u64) {
        self.windows[slot as usize].set(window);
    }

    /// Watches the source in `slot` (see [`Watches`]).
    pub(crate) fn watch(
        &mut self,
        slot: u32,
        source_fd: RawFd,
        delivery: Rc<Delivery>,
        reader: Rc<Waiting>,
    ) {
        self.watches.add(slot, source_fd, delivery, reader);
    }

    pub(crate) fn unwatch(&mut self, slot: u32) {
        self.watches.remove(slot);
    }

    /// The source in `slot` moved: every scan looks at it again.
    pub(crate) fn heat(&mut self, slot: u32) {
        self.watches.heat(slot);
    }

    /// One scan: renews the credit of the sources that used more than half
    /// of it (growing the window of those that ran out while their
    /// destination kept up), gives up on the stuck ones, and wakes the reads
    /// of sources whose bytes were passed up. Looks at the hot sources and
    /// one slice of the cold ones, or every cold one when the probe passed
    /// up bytes the hot ones do not account for (see [`Watches`]). Returns
    /// whether any source moved much since the last scan.
    fn scan(&mut self, maps: &Maps, view: &KernelView, since: Duration) -> bool {
        // Bytes passed up since the previous scan, in all: those of a cold
        // source show as a shortfall once the hot ones are looked at.
        let passed_total = view.passed_bytes().unwrap_or(self.passed_total);
        let unexplained = Cell::new(passed_total.saturating_sub(self.passed_total));
        self.passed_total = passed_total;
        let mut moving = false;
        let Self {
            watches,
            windows,
            in_flight_limit,
            receive_buffer_max,
            ..
        } = self;
        let policy = Policy {
            maps,
            windows,
            in_flight_limit: *in_flight_limit,
            receive_buffer_max: *receive_buffer_max,
        };
        let mut look = |watch: &Watch| {
            let (moved, much) = policy.check(watch, &unexplained);
            moving |= much;
            moved
        };
        watches.look_at_hot(&mut look);
        let all_cold = unexplained.get() > 0;
        watches.look_at_cold(since, all_cold, &mut look);
        moving
    }
}

/// The credit rules applied to one source at a time, with what they read
/// and write.
struct Policy<'a> {
    maps: &'a Maps,
    windows: &'a [Cell<u64>],
    in_flight_limit: u64,
    receive_buffer_max: u64,
}

impl Policy<'_> {
    /// Looks at one source (see [`FlowControl::scan`]). Returns whether it
    /// moved (redirected bytes, or bytes passed up and not forwarded yet),
    /// and whether it moved much (an eighth of its window).
    /// Takes what it passed up since the previous look off `unexplained`.
    fn check(&self, watch: &Watch, unexplained: &Cell<u64>) -> (bool, bool) {
        let stream = self.maps.stream(watch.slot);
        let passed_since = stream
            .passed
            .saturating_sub(watch.passed_seen.replace(stream.passed));
        unexplained.set(unexplained.get().saturating_sub(passed_since));
        let redirected = stream.redirected;
        let window_cell = &self.windows[watch.slot as usize];
        let mut window = window_cell.get();
        let since = redirected.saturating_sub(watch.seen.replace(redirected));
        let control = self.maps.control(watch.slot);
        let waiting = stream.passed > control.forwarded;
        let moved = (since > 0 || waiting, since > window / 8);
        if credit::is_stuck(
            stream.passed,
            control.forwarded,
            self.receive_buffer_max,
            window,
        ) && watch.delivery.abandon_first()
        {
            // SAFETY: a watch lives no longer than its splice, whose
            // sockets outlive it.
            let source = unsafe { BorrowedFd::borrow_raw(watch.source_fd) };
            tracing::warn!(
                passed = stream.passed,
                forwarded = control.forwarded,
                "resetting a connection whose peer sends without reading: the kernel \
                 holds what it passed up outside any socket buffer"
            );
            // Reset on close, and wake the leg (its reads end).
            let _ = socket::reset_on_close(source);
            let _ = socket::shutdown_read(source);
        }
        if waiting {
            watch.reader.wake();
        }
        if !credit::needs_renewal(redirected, window, control.credit) {
            return moved;
        }
        // A dead destination: its leg sees the error itself.
        let Ok(acked) = watch.delivery.redirected_acked() else {
            return moved;
        };
        let ran_out = stream.passed > watch.passed.replace(stream.passed);
        let grown = credit::grown_window(
            window,
            self.in_flight_limit,
            ran_out,
            redirected.saturating_sub(acked),
        );
        if grown > window {
            // Room in the destination for the larger window, first.
            let send_buffer = (SEND_BUFFER_LIMITS * grown) as usize;
            if socket::set_send_buffer(watch.delivery.destination(), send_buffer).is_ok() {
                window_cell.set(grown);
                window = grown;
            }
        }
        let credit = credit::renewed(control.credit, acked, window);
        if credit > control.credit {
            self.maps
                .set_control(watch.slot, Control { credit, ..control });
        }
        moved
    }
}

/// Runs the flow control of `probe` (on its executor) forever.
pub async fn run(probe: Rc<RefCell<Probe>>) {
    let mut interval = MIN_SCAN;
    loop {
        glommio::timer::sleep(interval).await;
        let moving = {
            let probe = &mut *probe.borrow_mut();
            probe.flow.scan(&probe.maps, &probe.view, interval)
        };
        interval = if moving {
            MIN_SCAN
        } else {
            (interval * 2).min(MAX_SCAN)
        };
    }
}
