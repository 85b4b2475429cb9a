//! A route's backends, per executor: which to try first (healthy ones by
//! smooth weighted round-robin, as nginx, or by least connections per
//! weight, as HAProxy; counted on this core only: no cross-core locks; then
//! those marked down), and connecting with a timeout, trying the next one
//! on failure, up to the route's `connect_retries`.
use std::{cell::Cell, io, net::SocketAddr, rc::Rc, sync::Arc, time::Duration};

use futures_lite::future;
use splice::{halves::OwnSocket, readiness::Readiness};

use crate::{
    config::{Balance, Route},
    health::Health,
};

struct Pool {
    backends: Vec<SocketAddr>,
    /// Per backend (same index): its weight, and its current weight in the
    /// smooth weighted round-robin.
    weights: Vec<u32>,
    current: Vec<Cell<i64>>,
    balance: Balance,
    next: Cell<usize>,
    /// Open connections per backend, on this executor.
    active: Vec<Cell<u32>>,
}

impl Pool {
    /// Orders `group` (healthy backends, by index) by nginx's smooth
    /// weighted round-robin: each gains its weight, the one with the most
    /// goes first and gives back the group's total. Over any run of picks
    /// each gets its share, spread out (weights 5,1,1: a a b a c a a).
    fn smooth(&self, group: &mut [usize]) {
        if group.is_empty() {
            return;
        }
        let mut total = 0;
        for &i in group.iter() {
            let weight = i64::from(self.weights[i]);
            self.current[i].set(self.current[i].get() + weight);
            total += weight;
        }
        // Stable: ties go to the lower index, as in nginx.
        group.sort_by_key(|&i| std::cmp::Reverse(self.current[i].get()));
        let first = &self.current[group[0]];
        first.set(first.get() - total);
    }
}

/// The backends of every route, for one executor.
pub struct Pools {
    pools: Vec<Pool>,
    health: Arc<Health>,
}

/// A backend connection.
pub struct Connected<'a> {
    pub socket: OwnSocket,
    pub addr: SocketAddr,
    /// Counts the connection for least-connections while it lives.
    pub guard: ActiveGuard<'a>,
}

/// Counts one open connection to a backend while it lives.
pub struct ActiveGuard<'a> {
    active: &'a Cell<u32>,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.active.set(self.active.get() - 1);
    }
}

impl Pools {
    pub fn new(routes: &[Route], health: Arc<Health>) -> Self {
        Self {
            health,
            pools: routes
                .iter()
                .map(|route| Pool {
                    backends: route.backends.clone(),
                    weights: route.weights.clone(),
                    current: route.backends.iter().map(|_| Cell::new(0)).collect(),
                    balance: route.balance,
                    next: Cell::new(0),
                    active: route.backends.iter().map(|_| Cell::new(0)).collect(),
                })
                .collect(),
        }
    }

    /// The order in which to try `route`'s backends: the healthy ones,
    /// then those marked down (tried only if no healthy one accepts: when
    /// the whole pool is down, a backend that came back before its checks
    /// noticed still gets the connection instead of a refusal).
    fn order(&self, route: usize) -> Vec<usize> {
        let pool = &self.pools[route];
        let turn = pool.next.get();
        pool.next.set(turn.wrapping_add(1));
        let (mut order, mut down): (Vec<usize>, Vec<usize>) =
            (0..pool.backends.len()).partition(|&i| self.health.backend(route, i).healthy());
        let rotate = |group: &mut Vec<usize>| {
            if !group.is_empty() {
                let start = turn % group.len();
                group.rotate_left(start);
            }
        };
        match pool.balance {
            Balance::RoundRobin => pool.smooth(&mut order),
            // Rotating over the healthy ones alone keeps their shares equal.
            Balance::LeastConnections => rotate(&mut order),
        }
        rotate(&mut down);
        if pool.balance == Balance::LeastConnections {
            // Fewest connections per weight, counting the new one (as
            // HAProxy's leastconn); stable: ties keep the rotation.
            let load = |i: usize| u64::from(pool.active[i].get()) + 1;
            for group in [&mut order, &mut down] {
                group.sort_by(|&a, &b| {
                    (load(a) * u64::from(pool.weights[b]))
                        .cmp(&(load(b) * u64::from(pool.weights[a])))
                });
            }
        }
        order.append(&mut down);
        order
    }

    /// Connects to one of `route`'s backends, trying them in turn (again
    /// from the first once each was tried) until one accepts within
    /// `timeout`, `attempts` connects at most. Returns the failures too (for
    /// the counters and the log).
    pub async fn connect(
        &self,
        route: usize,
        timeout: Duration,
        attempts: usize,
        readiness: &Rc<Readiness>,
    ) -> (Option<Connected<'_>>, Vec<(SocketAddr, io::Error)>) {
        let pool = &self.pools[route];
        let mut failures = Vec::new();
        for i in self.order(route).into_iter().cycle().take(attempts) {
            let addr = pool.backends[i];
            let health = self.health.backend(route, i);
            let timed_out = async {
                glommio::timer::sleep(timeout).await;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out after {timeout:?}"),
                ))
            };
            match future::or(OwnSocket::connect(addr, readiness), timed_out).await {
                Ok(socket) => {
                    health.connected();
                    pool.active[i].set(pool.active[i].get() + 1);
                    let connected = Connected {
                        socket,
                        addr,
                        guard: ActiveGuard {
                            active: &pool.active[i],
                        },
                    };
                    return (Some(connected), failures);
                }
                Err(e) => {
                    health.failed(&format_args!("client connection: {e}"));
                    failures.push((addr, e));
                }
            }
        }
        (None, failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, HealthCheck};

    fn pools(routes: &[Route]) -> Pools {
        Pools::new(routes, Health::new(routes))
    }

    #[test]
    fn round_robin_rotates_and_least_connections_prefers_idle() {
        let mut config = Config::default();
        config
            .add_route_flag("default=127.0.0.1:1,127.0.0.1:2,127.0.0.1:3")
            .unwrap();
        let pools = pools(&config.routes);
        assert_eq!(pools.order(0), vec![0, 1, 2]);
        assert_eq!(pools.order(0), vec![1, 2, 0]);
        assert_eq!(pools.order(0), vec![2, 0, 1]);
        let mut routes = config.routes.clone();
        routes[0].balance = Balance::LeastConnections;
        let pools = self::pools(&routes);
        pools.pools[0].active[0].set(5);
        pools.pools[0].active[1].set(1);
        assert_eq!(pools.order(0), vec![2, 1, 0]);
    }

    #[test]
    fn weights_spread_smoothly_and_weigh_least_connections() {
        let mut config = Config::default();
        config
            .add_route_flag("default=127.0.0.1:1,weight=5,127.0.0.1:2,127.0.0.1:3")
            .unwrap();
        let pools = pools(&config.routes);
        let firsts: Vec<usize> = (0..14).map(|_| pools.order(0)[0]).collect();
        // nginx's example: a a b a c a a, then again.
        assert_eq!(firsts, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
        let mut routes = config.routes.clone();
        routes[0].balance = Balance::LeastConnections;
        let pools = self::pools(&routes);
        // 4 connections on weight 5 weigh less than 1 on weight 1.
        pools.pools[0].active[0].set(4);
        pools.pools[0].active[1].set(1);
        pools.pools[0].active[2].set(2);
        assert_eq!(pools.order(0), vec![0, 1, 2]);
        pools.pools[0].active[0].set(10);
        assert_eq!(pools.order(0), vec![1, 0, 2]);
    }

    #[test]
    fn backends_marked_down_come_last_and_the_rest_share_evenly() {
        let mut config = Config {
            health_check: Some(HealthCheck {
                fall: 1,
                ..HealthCheck::default()
            }),
            ..Config::default()
        };
        config
            .add_route_flag("default=127.0.0.1:1,127.0.0.1:2,127.0.0.1:3")
            .unwrap();
        let pools = pools(&config.routes);
        pools.health.backend(0, 1).failed(&"refused");
        let firsts: Vec<usize> = (0..4).map(|_| pools.order(0)[0]).collect();
        assert_eq!(firsts, vec![0, 2, 0, 2]);
        assert_eq!(pools.order(0), vec![0, 2, 1]);
        // All down: all are still tried, in turn.
        pools.health.backend(0, 0).failed(&"refused");
        pools.health.backend(0, 2).failed(&"refused");
        let (first, second) = (pools.order(0), pools.order(0));
        assert_eq!(first.len(), 3);
        assert_ne!(first[0], second[0]);
    }
}
