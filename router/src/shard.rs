//! One executor's state, shared by its connection tasks: its probe, its
//! counters, its epoll set, and the configuration generation new
//! connections start with (rebuilt when a reload publishes another).
use std::{
    cell::{Cell, RefCell},
    net::SocketAddr,
    rc::Rc,
    sync::Arc,
    time::Instant,
};

use splice::{readiness::Readiness, shard::ShardProbe};
use tracing::debug;

use crate::{
    access_log::AccessLogger,
    backends::Pools,
    config::Config,
    health::Health,
    limits::Limits,
    reload::Published,
    telemetry::{
        counters::{BackendCounters, CoreMetrics, Labelled, RouteCounters},
        stats::RouterStats,
    },
};

/// One configuration as an executor uses it: the routes' backend pools and
/// counters. A connection keeps the generation it was accepted under.
pub(crate) struct Generation {
    pub(crate) config: Arc<Config>,
    pub(crate) pools: Pools,
    /// Per route (same index as `config.routes`).
    pub(crate) routes: Vec<Arc<RouteCounters>>,
    /// Per route, per backend (same indices as the route's `backends`).
    pub(crate) backends: Vec<Vec<Arc<BackendCounters>>>,
}

impl Generation {
    pub(crate) fn new(
        config: Arc<Config>,
        core: usize,
        labelled: &Labelled,
        health: Arc<Health>,
    ) -> Self {
        Self {
            pools: Pools::new(&config.routes, health),
            routes: config
                .routes
                .iter()
                .map(|route| labelled.route(core, &route.name))
                .collect(),
            backends: config
                .routes
                .iter()
                .map(|route| {
                    route
                        .backends
                        .iter()
                        .map(|addr| labelled.backend(core, &route.name, *addr))
                        .collect()
                })
                .collect(),
            config,
        }
    }

    pub(crate) fn backend(&self, route: usize, addr: SocketAddr) -> Option<&BackendCounters> {
        let index = self.config.routes[route]
            .backends
            .iter()
            .position(|a| *a == addr)?;
        Some(&self.backends[route][index])
    }
}

/// One executor's state, shared by its connection tasks.
pub(crate) struct Shard {
    pub(crate) core: usize,
    pub(crate) published: Arc<Published>,
    /// The generation in force, with the published version it was built
    /// from.
    pub(crate) current: RefCell<(u64, Rc<Generation>)>,
    pub(crate) probe: Option<ShardProbe>,
    /// Where this executor's sockets wait (see [`halves`]).
    pub(crate) readiness: Rc<Readiness>,
    pub(crate) stats: Arc<RouterStats>,
    pub(crate) metrics: Arc<CoreMetrics>,
    pub(crate) labelled: Arc<Labelled>,
    pub(crate) limits: Arc<Limits>,
    /// When a refusal at a connection limit was last logged (at most one
    /// line a second per core), and how many since.
    pub(crate) limit_log: Cell<(Option<Instant>, u64)>,
    pub(crate) access_log: Arc<AccessLogger>,
    /// Forwarded connections, for the idle timeout.
    pub(crate) idle: crate::idle::Idle,
    /// Connections handed over, probes adopted (upgrades).
    pub(crate) handover: crate::upgrade::connections::ShardHandover,
}

impl Shard {
    /// The generation for a new connection: rebuilt first if a reload
    /// published a new configuration (one atomic load otherwise).
    pub(crate) fn generation(&self) -> Rc<Generation> {
        let version = self.published.version();
        let mut current = self.current.borrow_mut();
        if current.0 != version {
            let (version, config, health) = self.published.current();
            if self.core == 0 {
                // One checker for every core: they share its verdicts.
                health.spawn_checks();
            }
            *current = (
                version,
                Rc::new(Generation::new(config, self.core, &self.labelled, health)),
            );
            debug!(
                core = self.core,
                version, "adopted the reloaded configuration"
            );
        }
        Rc::clone(&current.1)
    }
}
