//! The router's counters as the connection path updates them: per-core
//! atomics (no lock, no allocation) for connections, routes and backends,
//! latency histograms, and the process's lifecycle flags. Read by
//! [`super::prometheus`] when scraped and by the `stats:` line
//! ([`super::stats`]).
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use splice::{pipe::Path, stats::add};

use crate::routes::Refusal;

/// Upper bounds (seconds) of the latency histograms' buckets: from 50 µs
/// (a first packet already in the socket) to the default timeouts.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// A latency histogram one core updates with atomics: per-bucket counts
/// (not cumulative; the last slot is past every bound), the sum in
/// nanoseconds.
#[derive(Debug, Default)]
pub struct Histogram {
    pub(crate) buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    pub(crate) sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }
}

/// One executor's latency histograms.
#[derive(Debug, Default)]
pub struct CoreMetrics {
    /// Accept → routing decision (routed or refused), for every connection.
    pub first_packet: Histogram,
    /// Routing decision → a backend accepted (failovers included).
    pub backend_connect: Histogram,
}

/// How a connection was forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Spliced in the kernel by the probe.
    Ebpf,
    /// Copied in userspace because this core has no probe (`--mode copy`,
    /// or `auto` where the probe did not load).
    Copy,
    /// Copied in userspace although the core has a probe: the SockMap was
    /// full or the insert failed (e.g. a peer already closed).
    Fallback,
}

impl Served {
    pub const ALL: [Served; 3] = [Served::Ebpf, Served::Copy, Served::Fallback];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Copy => "copy",
            Self::Fallback => "fallback",
        }
    }
}

impl From<Path> for Served {
    fn from(path: Path) -> Self {
        match path {
            Path::Spliced => Self::Ebpf,
            Path::Copied => Self::Copy,
            Path::Fallback => Self::Fallback,
        }
    }
}

/// One route's counters on one core.
#[derive(Debug, Default)]
pub struct RouteCounters {
    /// Connections the route was picked for.
    pub routed: AtomicU64,
    /// Connections being forwarded on this route now.
    pub active: AtomicU64,
    /// Forwarded connections, by [`Served::ALL`] index.
    pub served: [AtomicU64; Served::ALL.len()],
    /// Refusals after this route was picked (or named), by
    /// [`Refusal::ALL`] index.
    pub refused: [AtomicU64; Refusal::ALL.len()],
    /// Bytes delivered to the backend / to the client, counted when the
    /// connection closes (kernel-redirected plus userspace-written).
    pub bytes_to_backend: AtomicU64,
    pub bytes_to_client: AtomicU64,
}

impl RouteCounters {
    pub fn served(&self, served: Served) -> &AtomicU64 {
        &self.served[served as usize]
    }

    pub fn refused(&self, refusal: Refusal) -> &AtomicU64 {
        &self.refused[refusal_index(refusal)]
    }
}

/// One backend's counters on one core.
#[derive(Debug, Default)]
pub struct BackendCounters {
    /// Connections it accepted.
    pub connections: AtomicU64,
    /// Connections to it open now.
    pub active: AtomicU64,
    /// Connection attempts that failed (refused or timed out).
    pub failures: AtomicU64,
}

fn refusal_index(refusal: Refusal) -> usize {
    Refusal::ALL
        .iter()
        .position(|r| *r == refusal)
        .expect("every refusal is in ALL")
}

/// Label key → one set of counters per core.
pub(crate) type PerCore<K, T> = BTreeMap<K, Vec<Arc<T>>>;

/// Per-route and per-backend counters, one per core, created when a
/// configuration (first or reloaded) names the route or backend and kept
/// afterwards: a counter never goes back, and a route that a reload removes
/// keeps reporting its final values. The lock is taken only when an
/// executor adopts a configuration and when a scrape reads.
#[derive(Debug)]
pub struct Labelled {
    cores: usize,
    pub(crate) routes: Mutex<PerCore<String, RouteCounters>>,
    pub(crate) backends: Mutex<PerCore<(String, SocketAddr), BackendCounters>>,
}

impl Labelled {
    pub fn new(cores: usize) -> Self {
        Self {
            cores,
            routes: Mutex::default(),
            backends: Mutex::default(),
        }
    }

    /// Creates the counters of every route and backend of `config` (if
    /// new), so that a scrape lists them before their first connection.
    pub fn register(&self, config: &crate::config::Config) {
        for route in &config.routes {
            self.route(0, &route.name);
            for backend in &route.backends {
                self.backend(0, &route.name, *backend);
            }
        }
    }

    /// `core`'s counters of the route named `route`.
    pub fn route(&self, core: usize, route: &str) -> Arc<RouteCounters> {
        let mut routes = self.routes.lock().expect("no panic under this lock");
        let per_core = routes
            .entry(route.to_owned())
            .or_insert_with(|| (0..self.cores).map(|_| Arc::default()).collect());
        Arc::clone(&per_core[core])
    }

    /// `core`'s counters of `backend` in the route named `route`.
    pub fn backend(&self, core: usize, route: &str, backend: SocketAddr) -> Arc<BackendCounters> {
        let mut backends = self.backends.lock().expect("no panic under this lock");
        let per_core = backends
            .entry((route.to_owned(), backend))
            .or_insert_with(|| (0..self.cores).map(|_| Arc::default()).collect());
        Arc::clone(&per_core[core])
    }
}

/// Process-wide state the metrics report besides the counters.
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// Serving: every executor started (with its probe, if any).
    pub ready: AtomicBool,
    /// Stopping: listeners closed, live connections finishing.
    pub draining: AtomicBool,
    /// Upgraded: a new process took over the listeners (and the metrics
    /// listener); this one finishes its connections and exits.
    pub handed_over: AtomicBool,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

/// Adds one to a gauge while it lives.
pub struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    pub fn new(gauge: &'a AtomicU64) -> Self {
        add(gauge, 1);
        Self(gauge)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}
