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
use std::{cell::RefCell, os::fd::BorrowedFd, rc::Rc, time::Duration};

use super::{
    credit::{self, SEND_BUFFER_LIMITS},
    probe::Probe,
    socket,
    watches::{COOL_AFTER, Watch},
};
use splice_common::Control;

/// Shortest pause between two scans.
pub const MIN_SCAN: Duration = Duration::from_millis(1);
/// Longest pause between two scans.
pub const MAX_SCAN: Duration = Duration::from_millis(4);

impl Probe {
    /// One scan: renews the credit of the sources that used more than half
    /// of it (growing the window of those that ran out while their
    /// destination kept up), gives up on the stuck ones, and wakes the reads
    /// of sources whose bytes were passed up. Looks at the hot
    /// sources and one slice of the cold ones (see
    /// [`super::watches::Watches`]). Returns
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
