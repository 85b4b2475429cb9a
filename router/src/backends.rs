//! A route's backends, per executor: which to try first (healthy ones by
//! round-robin or least-connections, counted on this core only: no
//! cross-core locks; then those marked down), and connecting with a
//! timeout, trying the next one on failure.
use std::{cell::Cell, io, net::SocketAddr, rc::Rc, sync::Arc, time::Duration};

use futures_lite::future;
use splice::{halves::OwnSocket, readiness::Readiness};

use crate::{
    config::{Balance, Route},
    health::Health,
};

struct Pool {
    backends: Vec<SocketAddr>,
    balance: Balance,
    next: Cell<usize>,
    /// Open connections per backend, on this executor.
    active: Vec<Cell<u32>>,
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
        for group in [&mut order, &mut down] {
            // Rotating over the healthy ones alone keeps their shares equal.
            if !group.is_empty() {
                let start = turn % group.len();
                group.rotate_left(start);
            }
            if pool.balance == Balance::LeastConnections {
                // Stable: ties keep the round-robin order.
                group.sort_by_key(|&i| pool.active[i].get());
            }
        }
        order.append(&mut down);
        order
    }

    /// Connects to one of `route`'s backends, trying each in turn until one
    /// accepts within `timeout`. Returns the failures too (for the counters
    /// and the log).
    pub async fn connect(
        &self,
        route: usize,
        timeout: Duration,
        readiness: &Rc<Readiness>,
    ) -> (Option<Connected<'_>>, Vec<(SocketAddr, io::Error)>) {
        let pool = &self.pools[route];
        let mut failures = Vec::new();
        for i in self.order(route) {
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
