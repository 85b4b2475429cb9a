//! Connection limits, in total and per listen address, shared by every
//! executor: a connection takes a [`Permit`] when it is accepted and gives it
//! back when it ends; one that finds a limit reached is refused at once
//! (reset, before anything is read), so that a flood of idle connections
//! (slowloris) cannot exhaust the router's descriptors. A reload sets new
//! limits: a lower one refuses new connections until fewer are open, and
//! closes none.
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
    max: AtomicUsize,
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
            max: AtomicUsize::new(max),
        }
    }

    fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Takes a place if one is free.
    fn take(&self) -> bool {
        let max = self.max();
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
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
            return Err(Exceeded::Listener(counter.max()));
        }
        if !self.total.take() {
            counter.give_back();
            return Err(Exceeded::Total(self.total.max()));
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

    /// The limits in force: in total, and per listener (`None`: none).
    pub fn max(&self) -> (usize, Option<usize>) {
        let per_listener = self.listeners.first().map(Counter::max);
        (
            self.total.max(),
            per_listener.filter(|&max| max != usize::MAX),
        )
    }

    /// Puts new limits in force (a reload): connections open past a lower
    /// one stay, and new ones are refused until fewer are open.
    pub fn set(&self, total: usize, per_listener: Option<usize>) {
        self.total.max.store(total, Ordering::Relaxed);
        for counter in &self.listeners {
            counter
                .max
                .store(per_listener.unwrap_or(usize::MAX), Ordering::Relaxed);
        }
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
    fn new_limits_apply_to_the_next_connection_and_close_none() {
        let limits = Limits::new(2, None, 1);
        let a = limits.admit(0).unwrap();
        let b = limits.admit(0).unwrap();
        assert_eq!(limits.admit(0).unwrap_err(), Exceeded::Total(2));
        limits.set(3, None);
        let c = limits.admit(0).unwrap();
        limits.set(1, Some(1));
        assert_eq!(limits.max(), (1, Some(1)));
        assert_eq!(limits.open(), 3);
        assert_eq!(limits.admit(0).unwrap_err(), Exceeded::Listener(1));
        drop((a, b));
        assert_eq!(limits.admit(0).unwrap_err(), Exceeded::Listener(1));
        drop(c);
        let _d = limits.admit(0).unwrap();
        limits.set(5, None);
        assert_eq!(limits.max(), (5, None));
    }

    #[test]
    fn the_default_total_leaves_room_for_two_descriptors_each() {
        assert_eq!(Limits::default_total(20000), (20000 - 256) / 2);
        assert_eq!(Limits::default_total(10), 1);
    }
}
