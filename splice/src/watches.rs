//! The sources one probe's flow control watches, by slot, and which of them
//! every scan looks at (the hot ones) or only a slice of scans (the cold
//! ones).
use std::{cell::Cell, os::fd::RawFd, rc::Rc, time::Duration};

use super::{delivery::Delivery, spliced_read::Waiting};

/// One watched source.
pub(super) struct Watch {
    pub(super) slot: u32,
    pub(super) source_fd: RawFd,
    pub(super) delivery: Rc<Delivery>,
    /// The leg's read of the source, woken when the probe passed bytes up
    /// (see [`super::spliced_read`]).
    pub(super) reader: Rc<Waiting>,
    /// Redirected count at the previous scan.
    pub(super) seen: Cell<u64>,
    /// Passed-up count when the credit was last renewed.
    pub(super) passed: Cell<u64>,
    /// Passed-up count at the previous look (see [`super::flow`]).
    pub(super) passed_seen: Cell<u64>,
    /// Looked at by every scan (see [`Watches`]).
    pub(super) hot: Cell<bool>,
    /// Scans in a row that saw the source still.
    pub(super) still_scans: Cell<u32>,
}

/// The watched sources of one probe, by slot.
///
/// Looking at a source costs little, but a scan every millisecond over
/// thousands of idle connections does not (measured: with 9,799 idle
/// connections held, the active stream got 0.82 of its 1-connection
/// throughput through the router, and 1.06 through the router's copy mode,
/// which has no scan). So only the *hot* sources, those that moved in the
/// last `COOL_AFTER` scans, are looked at by every
/// scan; the scans look at each of the others once per `COLD_PERIOD`, a
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

    fn get(&self, slot: u32) -> Option<&Watch> {
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

    /// A scan's look at every hot source: `look` says whether the source
    /// moved; one still for [`COOL_AFTER`] scans turns cold.
    pub(super) fn look_at_hot(&mut self, look: &mut impl FnMut(&Watch) -> bool) {
        let mut cooled = Vec::new();
        for &slot in &self.hot {
            let Some(watch) = self.get(slot) else {
                continue;
            };
            let still = if look(watch) {
                0
            } else {
                watch.still_scans.get() + 1
            };
            watch.still_scans.set(still);
            if still >= COOL_AFTER {
                cooled.push(slot);
            }
        }
        for slot in cooled {
            self.cool(slot);
        }
    }

    /// A scan's look at the cold sources: the slice due `since` the
    /// previous scan, or every one when `all`; one that moved turns hot.
    pub(super) fn look_at_cold(
        &mut self,
        since: Duration,
        all: bool,
        look: &mut impl FnMut(&Watch) -> bool,
    ) {
        let slice = self.next_cold_slice(since);
        let cold = if all { 0..self.by_slot.len() } else { slice };
        let mut warmed = Vec::new();
        for watch in self.by_slot[cold].iter().flatten() {
            if !watch.hot.get() && look(watch) {
                warmed.push(watch.slot);
            }
        }
        for slot in warmed {
            self.heat(slot);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{MAX_SCAN, MIN_SCAN};

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
