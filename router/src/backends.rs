//! A route's backends, per executor: which to try first (round-robin or
//! least-connections, counted on this core only: no cross-core locks), and
//! connecting with a timeout, trying the next one on failure.
use std::{cell::Cell, io, net::SocketAddr, time::Duration};

use glommio::net::TcpStream;

use crate::config::{Balance, Route};

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
}

/// A backend connection.
pub struct Connected<'a> {
    pub stream: TcpStream,
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
    pub fn new(routes: &[Route]) -> Self {
        Self {
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

    /// The order in which to try `route`'s backends.
    fn order(&self, route: usize) -> Vec<usize> {
        let pool = &self.pools[route];
        let count = pool.backends.len();
        let start = pool.next.get() % count;
        pool.next.set(start + 1);
        let mut order: Vec<usize> = (0..count).map(|i| (start + i) % count).collect();
        if pool.balance == Balance::LeastConnections {
            // Stable: ties keep the round-robin order.
            order.sort_by_key(|&i| pool.active[i].get());
        }
        order
    }

    /// Connects to one of `route`'s backends, trying each in turn until one
    /// accepts within `timeout`. Returns the failures too (for the counters
    /// and the log).
    pub async fn connect(
        &self,
        route: usize,
        timeout: Duration,
    ) -> (Option<Connected<'_>>, Vec<(SocketAddr, io::Error)>) {
        let pool = &self.pools[route];
        let mut failures = Vec::new();
        for i in self.order(route) {
            let addr = pool.backends[i];
            match TcpStream::connect_timeout(addr, timeout).await {
                Ok(stream) => {
                    pool.active[i].set(pool.active[i].get() + 1);
                    let connected = Connected {
                        stream,
                        addr,
                        guard: ActiveGuard {
                            active: &pool.active[i],
                        },
                    };
                    return (Some(connected), failures);
                }
                Err(e) => failures.push((addr, io::Error::other(e.to_string()))),
            }
        }
        (None, failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn round_robin_rotates_and_least_connections_prefers_idle() {
        let mut config = Config::default();
        config
            .add_route_flag("default=127.0.0.1:1,127.0.0.1:2,127.0.0.1:3")
            .unwrap();
        let pools = Pools::new(&config.routes);
        assert_eq!(pools.order(0), vec![0, 1, 2]);
        assert_eq!(pools.order(0), vec![1, 2, 0]);
        assert_eq!(pools.order(0), vec![2, 0, 1]);
        let mut routes = config.routes.clone();
        routes[0].balance = Balance::LeastConnections;
        let pools = Pools::new(&routes);
        pools.pools[0].active[0].set(5);
        pools.pools[0].active[1].set(1);
        assert_eq!(pools.order(0), vec![2, 1, 0]);
    }
}
