//! The slots of one probe's maps: a socket of a spliced connection holds one
//! (its index in both SockMaps, `STREAMS` and `CONTROL`) until the
//! connection is removed.

pub(crate) struct Slots {
    free: Vec<u32>,
    capacity: u32,
}

impl Slots {
    pub(crate) fn new(capacity: u32) -> Self {
        Self {
            // Popped from the end: slot 0 is used first.
            free: (0..capacity).rev().collect(),
            capacity,
        }
    }

    /// An allocator with every slot taken: the probe of an adopted probe
    /// ([`super::handover`]) only gets slots back, from the connections
    /// handed over with it; new connections go to the process's own probe.
    pub(crate) fn none(capacity: u32) -> Self {
        Self {
            free: Vec::new(),
            capacity,
        }
    }

    /// `n` free slots, or none if fewer are free.
    pub(crate) fn take(&mut self, n: usize) -> Option<Vec<u32>> {
        let at = self.free.len().checked_sub(n)?;
        Some(self.free.split_off(at).into_iter().rev().collect())
    }

    pub(crate) fn put(&mut self, slot: u32) {
        debug_assert!(slot < self.capacity && !self.free.contains(&slot));
        self.free.push(slot);
    }

    pub(crate) fn free(&self) -> usize {
        self.free.len()
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_lowest_first_and_never_twice() {
        let mut slots = Slots::new(3);
        assert_eq!(slots.take(2), Some(vec![0, 1]));
        assert_eq!(slots.take(2), None, "only one is free");
        assert_eq!(slots.free(), 1);
        slots.put(0);
        assert_eq!(slots.take(2), Some(vec![0, 2]));
        assert_eq!(slots.free(), 0);
        assert_eq!(slots.capacity(), 3);
    }
}
