//! Backend health: active TCP connect checks and passive ejection.
//!
//! Each backend of a checked route has a few atomics: whether it is
//! healthy, and how many failures (or, while down, successful checks) came
//! in a row. One set of checking tasks, on executor 0, connects to every
//! checked backend each `interval`; every executor also counts its client
//! connections' failed connects (passive ejection). The balancers only read
//! `healthy`: the connection path takes no lock, and every core sees the
//! same state. State changes are logged once, by whoever made them.
use std::{
    fmt::Display,
    net::SocketAddr,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use futures_lite::AsyncWriteExt as _;
use glommio::net::TcpStream;
use tracing::{info, warn};

use crate::config::{HealthCheck, Route};

/// One backend of one route.
#[derive(Debug)]
pub struct BackendHealth {
    route: String,
    addr: SocketAddr,
    check: Option<HealthCheck>,
    healthy: AtomicBool,
    /// Failed connects in a row (checks and client connections).
    failures: AtomicU32,
    /// Successful checks in a row while down.
    successes: AtomicU32,
    /// Health checks that failed, in all.
    check_failures: AtomicU64,
}

impl BackendHealth {
    fn new(route: &Route, addr: SocketAddr) -> Self {
        Self {
            route: route.name.clone(),
            addr,
            check: route.health_check,
            // Optimistic: a backend is tried until checks say otherwise.
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
            check_failures: AtomicU64::new(0),
        }
    }

    /// Health checks of it that failed so far.
    pub fn check_failures(&self) -> u64 {
        self.check_failures.load(Relaxed)
    }

    pub fn route(&self) -> &str {
        &self.route
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the route checks this backend (else it is always healthy).
    pub fn checked(&self) -> bool {
        self.check.is_some()
    }

    /// Whether the balancers send new connections to it (they still try it
    /// when every backend of its route is down).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// A connect to it failed, from a check or for a client (passive
    /// ejection): `fall` in a row mark it down. Without checks nothing is
    /// counted, since nothing would bring it back.
    pub fn failed(&self, why: &dyn Display) {
        let Some(check) = self.check else { return };
        self.successes.store(0, Relaxed);
        let failures = self.failures.fetch_add(1, Relaxed).saturating_add(1);
        if failures >= check.fall && self.healthy.swap(false, Relaxed) {
            warn!(
                route = self.route,
                backend = %self.addr,
                "backend is down after {failures} failed connects in a row (last: {why})"
            );
        }
    }

    /// A client connection reached it: the failures in a row end.
    pub fn connected(&self) {
        // Read first: a healthy backend's line is then only ever read.
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
    }

    /// A check reached it: `rise` in a row bring it back up.
    fn check_passed(&self) {
        let Some(check) = self.check else { return };
        self.connected();
        if self.healthy() {
            return;
        }
        let successes = self.successes.fetch_add(1, Relaxed).saturating_add(1);
        if successes >= check.rise && !self.healthy.swap(true, Relaxed) {
            self.successes.store(0, Relaxed);
            info!(
                route = self.route,
                backend = %self.addr,
                "backend is up again after {successes} checks passed in a row"
            );
        }
    }
}

/// The health of every route's backends, shared by the executors.
#[derive(Debug)]
pub struct Health {
    /// Per route, per backend (the route's order).
    routes: Vec<Vec<BackendHealth>>,
}

impl Health {
    pub fn new(routes: &[Route]) -> Arc<Self> {
        Arc::new(Self {
            routes: routes
                .iter()
                .map(|route| {
                    route
                        .backends
                        .iter()
                        .map(|addr| BackendHealth::new(route, *addr))
                        .collect()
                })
                .collect(),
        })
    }

    /// Health for `routes` that keeps the state `previous` knew of each
    /// backend it already checked the same way (same route name, address
    /// and checks): a reload neither makes a dead backend healthy again
    /// nor logs it down once more.
    pub fn carried_over(routes: &[Route], previous: &Health) -> Arc<Self> {
        let health = Self::new(routes);
        for backend in health.backends() {
            let Some(old) = previous.backends().find(|old| {
                old.route == backend.route && old.addr == backend.addr && old.check == backend.check
            }) else {
                continue;
            };
            backend.healthy.store(old.healthy(), Relaxed);
            backend.failures.store(old.failures.load(Relaxed), Relaxed);
            backend
                .successes
                .store(old.successes.load(Relaxed), Relaxed);
            backend.check_failures.store(old.check_failures(), Relaxed);
        }
        health
    }

    /// Backend `index` of route `route` (indices of the configuration).
    pub fn backend(&self, route: usize, index: usize) -> &BackendHealth {
        &self.routes[route][index]
    }

    /// Every backend of every route, in configuration order (for metrics).
    pub fn backends(&self) -> impl Iterator<Item = &BackendHealth> {
        self.routes.iter().flatten()
    }

    /// Backends currently marked down (counted per route).
    pub fn down(&self) -> usize {
        self.backends().filter(|b| !b.healthy()).count()
    }

    /// Starts one task per checked backend on the calling glommio executor;
    /// they run as long as it does and this `Health` is in use (a
    /// configuration reload that replaces it ends them).
    pub fn spawn_checks(self: &Arc<Self>) {
        for (route, backends) in self.routes.iter().enumerate() {
            for (index, backend) in backends.iter().enumerate() {
                if backend.checked() {
                    glommio::spawn_local(check_forever(Arc::downgrade(self), route, index))
                        .detach();
                }
            }
        }
    }
}

/// Connects to one backend every `interval` (a check that took longer
/// starts the next at once), and closes each check connection right away;
/// stops once nothing else holds the `Health`.
async fn check_forever(health: Weak<Health>, route: usize, index: usize) {
    loop {
        let Some(health) = health.upgrade() else {
            return;
        };
        let backend = health.backend(route, index);
        let Some(check) = backend.check else { return };
        let started = Instant::now();
        match TcpStream::connect_timeout(backend.addr, check.timeout).await {
            Ok(mut stream) => {
                let _ = stream.close().await;
                backend.check_passed();
            }
            Err(e) => {
                backend.check_failures.fetch_add(1, Relaxed);
                backend.failed(&format_args!("health check: {e}"));
            }
        }
        drop(health);
        glommio::timer::sleep(check.interval.saturating_sub(started.elapsed())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn route(check: Option<HealthCheck>) -> Vec<Route> {
        let mut config = Config {
            health_check: check,
            ..Config::default()
        };
        config.add_route_flag("default=127.0.0.1:1").unwrap();
        config.routes
    }

    #[test]
    fn fall_failures_in_a_row_mark_down_and_rise_checks_mark_up() {
        let check = HealthCheck {
            rise: 2,
            fall: 3,
            ..HealthCheck::default()
        };
        let health = Health::new(&route(Some(check)));
        let backend = health.backend(0, 0);
        backend.failed(&"refused");
        backend.failed(&"refused");
        // A success in between restarts the count.
        backend.connected();
        backend.failed(&"refused");
        backend.failed(&"refused");
        assert!(backend.healthy());
        backend.failed(&"refused");
        assert!(!backend.healthy());
        assert_eq!(health.down(), 1);
        // A client connection that got through (every backend was down) does
        // not bring it back: only checks do, `rise` in a row.
        backend.connected();
        backend.check_passed();
        assert!(!backend.healthy());
        backend.failed(&"refused");
        backend.check_passed();
        assert!(!backend.healthy());
        backend.check_passed();
        assert!(backend.healthy());
        assert_eq!(health.down(), 0);
    }

    #[test]
    fn unchecked_backends_stay_healthy() {
        let health = Health::new(&route(None));
        let backend = health.backend(0, 0);
        for _ in 0..10 {
            backend.failed(&"refused");
        }
        assert!(backend.healthy());
        assert!(!backend.checked());
    }
}
