//! Connection limits, in total and per listen address, shared by every
//! executor: a connection takes a [`Permit`] when it is accepted and gives it
//! back when it ends; one that finds a limit reached is refused at once
//! (reset, before anything is read), so that a flood of idle connections
//! (slowloris) cannot exhaust the router's descriptors.
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// Descriptors kept out of the default total: listeners, probe maps and
/// programs, io_uring, the log, backends being connected.
const RESERVED_FILES: usize = 256;

/// Limits and the connections counted against them.
#[derive(Debug)]
pub struct Limits {
    total: Counter,
    listeners: Vec<Counter>,
}

#[derive(Debug)]
struct Counter {
    open: AtomicUsize,
    max: usize,
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Total(usize),
    Listener(usize),
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<Limits>,
    listener: usize,
}

impl Counter {
    fn new(max: usize) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes a place if one is free.
    fn take(&self) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limits {
    /// `total` over everything, `per_listener` for each of `listeners`
    /// addresses (`None`: no limit of its own).
    pub fn new(total: usize, per_listener: Option<usize>, listeners: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Counter::new(total),
            listeners: (0..listeners)
                .map(|_| Counter::new(per_listener.unwrap_or(usize::MAX)))
                .collect(),
        })
    }

    /// The default total: what the open-files limit leaves room for, two
    /// descriptors per connection.
    pub fn default_total(open_files: u64) -> usize {
        let files = usize::try_from(open_files).unwrap_or(usize::MAX);
        (files.saturating_sub(RESERVED_FILES) / 2).max(1)
    }

    /// Admits a connection accepted on listener `listener` (its index in
    /// the configuration), or says which limit it would pass.
    pub fn admit(self: &Arc<Self>, listener: usize) -> Result<Permit, Exceeded> {
        let counter = &self.listeners[listener];
        if !counter.take() {
            return Err(Exceeded::Listener(counter.max));
        }
        if !self.total.take() {
            counter.give_back();
            return Err(Exceeded::Total(self.total.max));
        }
        Ok(Permit {
            limits: Arc::clone(self),
            listener,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.open.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.listeners[self.listener].give_back();
        self.limits.total.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_listener_and_in_total_and_free_on_drop() {
        let limits = Limits::new(3, Some(2), 2);
        let a1 = limits.admit(0).unwrap();
        let _a2 = limits.admit(0).unwrap();
        assert_eq!(limits.admit(0).unwrap_err(), Exceeded::Listener(2));
        let _b1 = limits.admit(1).unwrap();
        assert_eq!(limits.admit(1).unwrap_err(), Exceeded::Total(3));
        assert_eq!(limits.open(), 3);
        drop(a1);
        // The refused attempts gave back what they took.
        assert_eq!(limits.open(), 2);
        let _b2 = limits.admit(1).unwrap();
        assert_eq!(limits.open(), 3);
    }

    #[test]
    fn the_default_total_leaves_room_for_two_descriptors_each() {
        assert_eq!(Limits::default_total(20000), (20000 - 256) / 2);
        assert_eq!(Limits::default_total(10), 1);
    }
}
