//! Connection limits, in total and per listen address, shared by every
//! executor: a connection takes a [`Permit`] when it is accepted and gives it
//! back when it ends; one that finds a limit reached is refused at once
//! (reset, before anything is read), so that a flood of idle connections
//! (slowloris) cannot exhaust the router's descriptors. A reload sets new
//! limits: a lower one refuses new connections until fewer are open, and
//! closes none.
use std::sync::{
    Arc, Mutex, Weak,
    atomic::{AtomicUsize, Ordering},
};

/// Descriptors kept out of the default total: listeners, probe maps and
/// programs, io_uring, the log, backends being connected.
const RESERVED_FILES: usize = 256;

/// Limits and the connections counted against them.
#[derive(Debug)]
pub struct Limits {
    total: Counter,
    /// The limit of each listen address (`usize::MAX`: none).
    per_listener: AtomicUsize,
    /// Every listen address's counter, to set new limits on a reload
    /// (addresses a reload removed drop out once their connections ended).
    listeners: Mutex<Vec<Weak<ListenerLimit>>>,
    /// The counter of connections taken over in an upgrade: under no
    /// listener's limit, and one for all (a counter each, registered above,
    /// made taking thousands of connections over quadratic).
    taken_over: Arc<ListenerLimit>,
}

/// The connections of one listen address and its limit.
#[derive(Debug)]
pub struct ListenerLimit(Counter);

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
    listener: Arc<ListenerLimit>,
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
    /// `total` over everything, `per_listener` for each listen address
    /// (`None`: no limit of its own).
    pub fn new(total: usize, per_listener: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            total: Counter::new(total),
            per_listener: AtomicUsize::new(per_listener.unwrap_or(usize::MAX)),
            listeners: Mutex::new(Vec::new()),
            taken_over: Arc::new(ListenerLimit(Counter::new(usize::MAX))),
        })
    }

    /// The counter of a new listen address, under the limit in force.
    pub fn listener(&self) -> Arc<ListenerLimit> {
        let limit = Arc::new(ListenerLimit(Counter::new(
            self.per_listener.load(Ordering::Relaxed),
        )));
        let mut listeners = self.listeners.lock().expect("no panic under this lock");
        listeners.retain(|l| l.strong_count() > 0);
        listeners.push(Arc::downgrade(&limit));
        limit
    }

    /// The default total: what the open-files limit leaves room for, two
    /// descriptors per connection.
    pub fn default_total(open_files: u64) -> usize {
        let files = usize::try_from(open_files).unwrap_or(usize::MAX);
        (files.saturating_sub(RESERVED_FILES) / 2).max(1)
    }

    /// Admits a connection accepted on `listener`, or says which limit it
    /// would pass.
    pub fn admit(self: &Arc<Self>, listener: &Arc<ListenerLimit>) -> Result<Permit, Exceeded> {
        let counter = &listener.0;
        if !counter.take() {
            return Err(Exceeded::Listener(counter.max()));
        }
        if !self.total.take() {
            counter.give_back();
            return Err(Exceeded::Total(self.total.max()));
        }
        Ok(Permit {
            limits: Arc::clone(self),
            listener: Arc::clone(listener),
        })
    }

    /// Admits a connection that is open already (taken over from another
    /// process in an upgrade): counted in the total, never refused.
    pub fn admit_anyway(self: &Arc<Self>) -> Permit {
        let listener = Arc::clone(&self.taken_over);
        listener.0.open.fetch_add(1, Ordering::AcqRel);
        self.total.open.fetch_add(1, Ordering::AcqRel);
        Permit {
            limits: Arc::clone(self),
            listener,
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.open.load(Ordering::Acquire)
    }

    /// The limits in force: in total, and per listener (`None`: none).
    pub fn max(&self) -> (usize, Option<usize>) {
        let per_listener = self.per_listener.load(Ordering::Relaxed);
        (
            self.total.max(),
            Some(per_listener).filter(|&max| max != usize::MAX),
        )
    }

    /// Puts new limits in force (a reload): connections open past a lower
    /// one stay, and new ones are refused until fewer are open.
    pub fn set(&self, total: usize, per_listener: Option<usize>) {
        let per_listener = per_listener.unwrap_or(usize::MAX);
        self.total.max.store(total, Ordering::Relaxed);
        self.per_listener.store(per_listener, Ordering::Relaxed);
        let listeners = self.listeners.lock().expect("no panic under this lock");
        for listener in listeners.iter().filter_map(Weak::upgrade) {
            listener.0.max.store(per_listener, Ordering::Relaxed);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.listener.0.give_back();
        self.limits.total.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_listener_and_in_total_and_free_on_drop() {
        let limits = Limits::new(3, Some(2));
        let (a, b) = (limits.listener(), limits.listener());
        let a1 = limits.admit(&a).unwrap();
        let _a2 = limits.admit(&a).unwrap();
        assert_eq!(limits.admit(&a).unwrap_err(), Exceeded::Listener(2));
        let _b1 = limits.admit(&b).unwrap();
        assert_eq!(limits.admit(&b).unwrap_err(), Exceeded::Total(3));
        assert_eq!(limits.open(), 3);
        drop(a1);
        // The refused attempts gave back what they took.
        assert_eq!(limits.open(), 2);
        let _b2 = limits.admit(&b).unwrap();
        assert_eq!(limits.open(), 3);
    }

    #[test]
    fn new_limits_apply_to_the_next_connection_and_close_none() {
        let limits = Limits::new(2, None);
        let l = limits.listener();
        let a = limits.admit(&l).unwrap();
        let b = limits.admit(&l).unwrap();
        assert_eq!(limits.admit(&l).unwrap_err(), Exceeded::Total(2));
        limits.set(3, None);
        let c = limits.admit(&l).unwrap();
        limits.set(1, Some(1));
        assert_eq!(limits.max(), (1, Some(1)));
        assert_eq!(limits.open(), 3);
        assert_eq!(limits.admit(&l).unwrap_err(), Exceeded::Listener(1));
        drop((a, b));
        assert_eq!(limits.admit(&l).unwrap_err(), Exceeded::Listener(1));
        drop(c);
        let _d = limits.admit(&l).unwrap();
        // A listen address added later gets the limit in force.
        let added = limits.listener();
        limits.set(5, None);
        assert_eq!(limits.max(), (5, None));
        let _e = limits.admit(&added).unwrap();
        let _f = limits.admit(&added).unwrap();
    }

    #[test]
    fn connections_taken_over_count_in_the_total_and_are_never_refused() {
        let limits = Limits::new(2, Some(1));
        let l = limits.listener();
        let taken: Vec<_> = (0..3).map(|_| limits.admit_anyway()).collect();
        assert_eq!(limits.open(), 3);
        assert_eq!(limits.admit(&l).unwrap_err(), Exceeded::Total(2));
        // Under no listener's limit: a reload's new limits leave them be.
        limits.set(10, Some(1));
        let _a = limits.admit(&l).unwrap();
        assert_eq!(limits.admit(&l).unwrap_err(), Exceeded::Listener(1));
        drop(taken);
        assert_eq!(limits.open(), 1);
        assert_eq!(limits.listeners.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_default_total_leaves_room_for_two_descriptors_each() {
        assert_eq!(Limits::default_total(20000), (20000 - 256) / 2);
        assert_eq!(Limits::default_total(10), 1);
    }
}
