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
    io,
    os::fd::{BorrowedFd, RawFd},
    rc::Rc,
    time::Duration,
};

use super::{credit, probe::Probe, socket, spliced_read::Waiting};
use splice_common::Control;

const MIN_SCAN: Duration = Duration::from_millis(1);
/// Longest pause between two scans.
pub const MAX_SCAN: Duration = Duration::from_millis(4);

/// A spliced socket's send buffer, in windows of the direction that sends
/// into it: room for what the flow control lets the kernel hold, with the
/// kernel's per-buffer overhead.
pub const SEND_BUFFER_LIMITS: u64 = 4;
/// `net.ipv4.tcp_rmem`'s maximum: what a slow but reading peer may
/// legitimately leave in a receive buffer.
pub fn receive_buffer_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse::<u64>().ok())
        .unwrap_or(32 << 20)
}

/// How much a destination took: what the flow control and a leg's drain
/// both measure, from the counters of the destination socket.
pub struct Delivery {
    destination_fd: RawFd,
    /// `bytes_handed_to_tcp(destination)` and `tcpi_bytes_acked` of the
    /// destination when the leg began; `None` for a leg that only copies
    /// (everything it delivers is its own writes, nothing to measure).
    baselines: Option<(u64, u64)>,
    /// Bytes userspace wrote to the destination since.
    written: Cell<u64>,
    /// Set when the connection is given up (reset): by the flow control, or
    /// by the server when the other direction failed.
    abandoned: Cell<bool>,
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
            baselines,
            written: Cell::new(0),
            abandoned: Cell::new(false),
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

    /// Gives the connection up: the leg stops at its next step with an
    /// error (the caller resets the sockets).
    pub fn abandon(&self) {
        self.abandoned.set(true);
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
        self.baselines.is_some()
    }

    fn baselines(&self) -> io::Result<(u64, u64)> {
        self.baselines.ok_or_else(|| {
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

/// One watched source.
pub(super) struct Watch {
    slot: u32,
    source_fd: RawFd,
    delivery: Rc<Delivery>,
    /// The leg's read of the source, woken when the probe passed bytes up
    /// (see [`super::spliced_read`]).
    reader: Rc<Waiting>,
    /// Redirected count at the previous scan.
    seen: Cell<u64>,
    /// Passed-up count when the credit was last renewed.
    passed: Cell<u64>,
    /// Passed-up count at the previous look (see [`Probe::scan`]).
    passed_seen: Cell<u64>,
    /// Looked at by every scan (see [`Watches`]).
    hot: Cell<bool>,
    /// Scans in a row that saw the source still.
    still_scans: Cell<u32>,
}

/// The watched sources of one probe, by slot.
///
/// Looking at a source costs little, but a scan every millisecond over
/// thousands of idle connections does not (measured: with 9,799 idle
/// connections held, the active stream got 0.82 of its 1-connection
/// throughput through the router, and 1.06 through the router's copy mode,
/// which has no scan). So only the *hot* sources, those that moved in the
/// last [`COOL_AFTER`] scans, are looked at by every
/// scan; the scans look at each of the others once per [`COLD_PERIOD`], a
/// slice at a time. A cold source that starts sending has a full window of
/// credit, so it waits for its slice without passing bytes up unless it
/// sends more than that window first. Then the probe's count of passed-up
/// bytes grows by more than the hot sources account for, and that scan
/// looks at every cold source: the leg is woken, forwards them, renews its
/// credit itself and makes it hot.
#[derive(Default)]
pub struct Watches {
    by_slot: Vec<Option<Watch>>,
    hot: Vec<u32>,
    /// Where the next scan's slice of the cold sources starts.
    cold_cursor: usize,
}

/// A still source stays hot for this many scans.
const COOL_AFTER: u32 = 32;
/// Time in which the scans look at every cold source once.
const COLD_PERIOD: Duration = Duration::from_millis(100);

impl Watches {
    pub(super) fn add(
        &mut self,
        slot: u32,
        source_fd: RawFd,
        delivery: Rc<Delivery>,
        reader: Rc<Waiting>,
    ) {
        self.remove(slot);
        let index = slot as usize;
        if self.by_slot.len() <= index {
            self.by_slot.resize_with(index + 1, || None);
        }
        // New sources start hot: most send at once.
        self.by_slot[index] = Some(Watch {
            slot,
            source_fd,
            delivery,
            reader,
            seen: Cell::new(0),
            passed: Cell::new(0),
            passed_seen: Cell::new(0),
            hot: Cell::new(true),
            still_scans: Cell::new(0),
        });
        self.hot.push(slot);
    }

    pub(super) fn remove(&mut self, slot: u32) -> Option<Watch> {
        let watch = self.by_slot.get_mut(slot as usize)?.take()?;
        if watch.hot.get() {
            self.cool(slot);
        }
        Some(watch)
    }

    pub(super) fn get(&self, slot: u32) -> Option<&Watch> {
        self.by_slot.get(slot as usize)?.as_ref()
    }

    /// Makes `slot`'s source hot, if it is watched and cold.
    pub(super) fn heat(&mut self, slot: u32) {
        if let Some(watch) = self.get(slot)
            && !watch.hot.get()
        {
            watch.hot.set(true);
            watch.still_scans.set(0);
            self.hot.push(slot);
        }
    }

    /// Takes `slot` out of the hot list.
    fn cool(&mut self, slot: u32) {
        if let Some(i) = self.hot.iter().position(|&s| s == slot) {
            self.hot.swap_remove(i);
        }
        if let Some(watch) = self.get(slot) {
            watch.hot.set(false);
        }
    }

    /// The slots of the slice of all sources (cold or not) a scan looks at
    /// `since` the previous one.
    fn next_cold_slice(&mut self, since: Duration) -> std::ops::Range<usize> {
        let len = self.by_slot.len();
        let size = (len as u128 * since.as_micros()).div_ceil(COLD_PERIOD.as_micros()) as usize;
        if self.cold_cursor >= len {
            self.cold_cursor = 0;
        }
        let start = self.cold_cursor;
        self.cold_cursor = start + size;
        start..(start + size).min(len)
    }
}

impl Probe {
    /// One scan: renews the credit of the sources that used more than half
    /// of it (growing the window of those that ran out while their
    /// destination kept up), gives up on the stuck ones, and wakes the reads
    /// of sources whose bytes were passed up. Looks at the hot
    /// sources and one slice of the cold ones (see [`Watches`]). Returns
    /// whether any source moved much since the last scan.
    fn scan(&mut self, since: Duration) -> bool {
        // Bytes passed up since the previous scan, in all: those of a cold
        // source show as a shortfall once the hot ones are looked at.
        let passed_total = self.view.passed_bytes().unwrap_or(self.passed_total);
        let mut unexplained = passed_total.saturating_sub(self.passed_total);
        self.passed_total = passed_total;
        let mut moving = false;
        let mut cooled = Vec::new();
        for &slot in &self.watches.hot {
            let Some(watch) = self.watches.get(slot) else {
                continue;
            };
            let (moved, much) = self.check(watch, &mut unexplained);
            moving |= much;
            let still = if moved {
                0
            } else {
                watch.still_scans.get() + 1
            };
            watch.still_scans.set(still);
            if still >= COOL_AFTER {
                cooled.push(slot);
            }
        }
        // Bytes passed up that the hot sources do not account for came from
        // a cold one: this scan looks at all of them, not a slice.
        let slice = self.watches.next_cold_slice(since);
        let cold = if unexplained > 0 {
            0..self.watches.by_slot.len()
        } else {
            slice
        };
        let mut warmed = Vec::new();
        for index in cold {
            let Some(Some(watch)) = self.watches.by_slot.get(index) else {
                continue;
            };
            if watch.hot.get() {
                continue;
            }
            let (moved, much) = self.check(watch, &mut unexplained);
            moving |= much;
            if moved {
                warmed.push(watch.slot);
            }
        }
        for slot in cooled {
            self.watches.cool(slot);
        }
        for slot in warmed {
            self.watches.heat(slot);
        }
        moving
    }

    /// Looks at one source (see [`Self::scan`]). Returns whether it moved
    /// (redirected bytes, or bytes passed up and not forwarded yet), and
    /// whether it moved much (an eighth of its window).
    /// Takes what it passed up since the previous look off `unexplained`.
    fn check(&self, watch: &Watch, unexplained: &mut u64) -> (bool, bool) {
        let limit = self.in_flight_limit();
        let stream = self.stream(watch.slot);
        let passed_since = stream
            .passed
            .saturating_sub(watch.passed_seen.replace(stream.passed));
        *unexplained = unexplained.saturating_sub(passed_since);
        let redirected = stream.redirected;
        let mut window = self.window(watch.slot);
        let since = redirected.saturating_sub(watch.seen.replace(redirected));
        let control = self.control(watch.slot);
        let waiting = stream.passed > control.forwarded;
        let moved = (since > 0 || waiting, since > window / 8);
        if credit::is_stuck(
            stream.passed,
            control.forwarded,
            self.receive_buffer_max(),
            window,
        ) && !watch.delivery.abandoned.replace(true)
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
        let grown = credit::grown_window(window, limit, ran_out, redirected.saturating_sub(acked));
        if grown > window {
            // Room in the destination for the larger window, first.
            let send_buffer = (SEND_BUFFER_LIMITS * grown) as usize;
            if socket::set_send_buffer(watch.delivery.destination(), send_buffer).is_ok() {
                self.set_window(watch.slot, grown);
                window = grown;
            }
        }
        let credit = credit::renewed(control.credit, acked, window);
        if credit > control.credit {
            self.set_control(watch.slot, Control { credit, ..control });
        }
        moved
    }
}

/// Runs the flow control of `probe` (on its executor) forever.
pub async fn run(probe: Rc<RefCell<Probe>>) {
    let mut interval = MIN_SCAN;
    loop {
        glommio::timer::sleep(interval).await;
        let moving = probe.borrow_mut().scan(interval);
        interval = if moving {
            MIN_SCAN
        } else {
            (interval * 2).min(MAX_SCAN)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watches(slots: usize) -> Watches {
        Watches {
            by_slot: (0..slots).map(|_| None).collect(),
            ..Watches::default()
        }
    }

    /// Every slot is looked at within each COLD_PERIOD, whatever the scan
    /// period, at a cost of about one look per slot (rounding adds at most
    /// one per scan).
    #[test]
    fn cold_slices_cover_every_slot_once_per_cold_period() {
        for (slots, scan) in [(19_600, MIN_SCAN), (19_600, MAX_SCAN), (7, MIN_SCAN)] {
            let mut watches = watches(slots);
            let mut seen = vec![0usize; slots];
            let scans = (COLD_PERIOD.as_micros() / scan.as_micros()) as usize;
            for _ in 0..scans {
                for slot in watches.next_cold_slice(scan) {
                    seen[slot] += 1;
                }
            }
            let looks: usize = seen.iter().sum();
            assert!(
                seen.iter().all(|&n| n >= 1) && looks <= slots + scans,
                "{slots} slots, scans every {scan:?}: {looks} looks, {:?}",
                (seen.iter().min(), seen.iter().max())
            );
        }
    }
}
