//! Hot reload (SIGHUP, or a changed file under `watch_config`): the main
//! thread re-reads the configuration, [`merge`]s it with the running one
//! (keeping what only a restart can change) and [`Published::publish`]es it; each executor adopts the new
//! configuration at its next accept, after one atomic load that tells it
//! something changed. Connections already accepted keep the configuration
//! they started with (their routes, backend pools and timeouts), so spliced
//! and copied connections are untouched.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{config::Config, health::Health};

/// How soon an executor without new connections adopts a published
/// configuration (its checks and listeners follow it).
pub const ADOPT_EVERY: Duration = Duration::from_millis(200);

/// Builds the configuration anew for a reload (SIGHUP): re-reads the file
/// and re-applies the command line, as at start.
pub type Reloader = Box<dyn FnMut() -> anyhow::Result<Config>>;

/// The configuration executors should use, with the health of its backends
/// and a version that changes on every publication.
#[derive(Debug)]
pub struct Published {
    version: AtomicU64,
    config: Mutex<(Arc<Config>, Arc<Health>)>,
}

impl Published {
    pub fn new(config: Arc<Config>) -> Self {
        let health = Health::new(&config.routes);
        Self {
            version: AtomicU64::new(0),
            config: Mutex::new((config, health)),
        }
    }

    /// Replaces the configuration, with health state for its backends that
    /// keeps what was known of the unchanged ones
    /// ([`Health::carried_over`]); the executor that runs the checks starts
    /// them when it adopts it, and the previous checks stop once no
    /// connection holds the previous configuration. Executors pick it up
    /// at their next accept, or within [`ADOPT_EVERY`].
    pub fn publish(&self, config: Arc<Config>) {
        self.publish_if_at(None, config);
    }

    /// [`Published::publish`], unless another publication came after
    /// `version` (the resolver thread's, which must not undo a reload).
    /// Whether it published.
    pub fn publish_if(&self, version: u64, config: Arc<Config>) -> bool {
        self.publish_if_at(Some(version), config)
    }

    fn publish_if_at(&self, version: Option<u64>, config: Arc<Config>) -> bool {
        let mut current = self.config.lock().expect("no panic under this lock");
        if version.is_some_and(|v| v != self.version.load(Ordering::Acquire)) {
            return false;
        }
        let health = Health::carried_over(&config.routes, &current.1);
        *current = (config, health);
        // Under the lock: whoever sees the new version and then takes the
        // lock gets the new configuration.
        self.version.fetch_add(1, Ordering::Release);
        true
    }

    /// The version to compare with the one a [`Published::current`] call
    /// returned: one atomic load, for the connection path.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The configuration, its backends' health and its version.
    pub fn current(&self) -> (u64, Arc<Config>, Arc<Health>) {
        let current = self.config.lock().expect("no panic under this lock");
        (
            self.version.load(Ordering::Acquire),
            Arc::clone(&current.0),
            Arc::clone(&current.1),
        )
    }
}

/// The configuration a reload puts in force: `new`, except for the settings
/// that need a restart (cores, mode, the probes' sizes, the metrics
/// address), which keep their running values. Listen addresses change
/// (see [`crate::listeners`]). Returns a warning
/// for each of those that `new` changes.
pub fn merge(running: &Config, new: Config) -> (Config, Vec<String>) {
    let mut warnings = Vec::new();
    let mut merged = new;
    let mut keep = |what: &str, changed: bool, running: String| {
        if changed {
            warnings.push(format!(
                "`{what}` changed: that needs a restart; keeping {running} until then"
            ));
        }
    };
    keep(
        "cores",
        merged.cores != running.cores,
        format!("{:?}", running.cores),
    );
    keep(
        "mode",
        merged.mode != running.mode,
        format!("{:?}", running.mode),
    );
    keep(
        "in_flight_limit",
        merged.in_flight_limit != running.in_flight_limit,
        running.in_flight_limit.to_string(),
    );
    keep(
        "splice_after",
        merged.splice_after != running.splice_after,
        running.splice_after.to_string(),
    );
    keep(
        "sockmap_capacity",
        merged.sockmap_capacity != running.sockmap_capacity,
        running.sockmap_capacity.to_string(),
    );
    keep(
        "metrics",
        merged.metrics != running.metrics,
        format!("{:?}", running.metrics),
    );
    merged.cores = running.cores;
    merged.mode = running.mode;
    merged.in_flight_limit = running.in_flight_limit;
    merged.sockmap_capacity = running.sockmap_capacity;
    merged.splice_after = running.splice_after;
    merged.metrics = running.metrics;
    (merged, warnings)
}

/// One line on what a reload changed, for the log: every setting it put in
/// force, by name, with its old and new value.
pub fn summary(old: &Config, new: &Config, took: Duration) -> String {
    let names = |c: &Config| c.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    let mut changed = Vec::new();
    let mut compare = |what: &str, old: String, new: String| {
        if old != new {
            changed.push(format!("{what} {old} -> {new}"));
        }
    };
    let duration = |d: Duration| humantime::format_duration(d).to_string();
    let limit = |l: Option<usize>| l.map_or_else(|| "default".to_owned(), |l| l.to_string());
    compare(
        "first_packet_timeout",
        duration(old.first_packet_timeout),
        duration(new.first_packet_timeout),
    );
    compare(
        "first_packet_max",
        old.first_packet_max.to_string(),
        new.first_packet_max.to_string(),
    );
    compare(
        "connect_timeout",
        duration(old.connect_timeout),
        duration(new.connect_timeout),
    );
    compare(
        "drain_timeout",
        duration(old.drain_timeout),
        duration(new.drain_timeout),
    );
    compare(
        "drain_delay",
        duration(old.drain_delay),
        duration(new.drain_delay),
    );
    compare(
        "max_connections",
        limit(old.max_connections),
        limit(new.max_connections),
    );
    compare(
        "max_connections_per_listener",
        limit(old.max_connections_per_listener),
        limit(new.max_connections_per_listener),
    );
    compare(
        "health_check",
        format!("{:?}", old.health_check),
        format!("{:?}", new.health_check),
    );
    compare(
        "watch_config",
        old.watch_config.to_string(),
        new.watch_config.to_string(),
    );
    compare(
        "idle_timeout",
        duration(old.idle_timeout),
        duration(new.idle_timeout),
    );
    compare(
        "tcp_keepalive",
        format!("{:?}", old.tcp_keepalive),
        format!("{:?}", new.tcp_keepalive),
    );
    compare(
        "connect_retries",
        format!("{:?}", old.connect_retries),
        format!("{:?}", new.connect_retries),
    );
    compare(
        "resolve_interval",
        duration(old.resolve_interval),
        duration(new.resolve_interval),
    );
    compare(
        "resolvers",
        format!("{:?}", old.resolvers),
        format!("{:?}", new.resolvers),
    );
    if old.routes != new.routes {
        changed.push("routes".to_owned());
    }
    format!(
        "configuration reloaded in {:.2} ms: {} route(s) {:?}; {}",
        took.as_secs_f64() * 1e3,
        new.routes.len(),
        names(new),
        if changed.is_empty() {
            "nothing changed".to_owned()
        } else {
            format!("changed: {}", changed.join(", "))
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str, route: &str) -> Config {
        let mut config = Config::default();
        config.listen.push(listen.parse().unwrap());
        config.add_route_flag(route).unwrap();
        config
    }

    #[test]
    fn routes_and_listen_change_and_restart_only_settings_are_kept_with_a_warning() {
        let running = config("127.0.0.1:8080", "default=127.0.0.1:1");
        let mut new = config("127.0.0.1:9090", "default=127.0.0.1:2");
        new.first_packet_max = 1024;
        new.sockmap_capacity = 16;
        let (merged, warnings) = merge(&running, new);
        // Listen addresses change on a reload (see `crate::listeners`).
        assert_eq!(merged.listen, ["127.0.0.1:9090".parse().unwrap()]);
        assert_eq!(merged.sockmap_capacity, running.sockmap_capacity);
        assert_eq!(merged.routes[0].backends[0].port(), 2);
        assert_eq!(merged.first_packet_max, 1024);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("`sockmap_capacity` changed"),
            "{warnings:?}"
        );
        let (_, warnings) = merge(&running, running.clone());
        assert!(warnings.is_empty());
    }

    #[test]
    fn the_summary_names_every_setting_put_in_force() {
        let old = config("127.0.0.1:1", "default=127.0.0.1:1");
        let mut new = old.clone();
        assert!(summary(&old, &new, Duration::ZERO).ends_with("; nothing changed"));
        new.max_connections = Some(20);
        new.max_connections_per_listener = Some(3);
        new.connect_timeout = Duration::from_millis(500);
        new.idle_timeout = Duration::from_secs(60);
        let line = summary(&old, &new, Duration::ZERO);
        assert!(
            line.ends_with(
                "changed: connect_timeout 2s -> 500ms, max_connections default -> 20, \
                 max_connections_per_listener default -> 3, idle_timeout 1h -> 1m"
            ),
            "{line}"
        );
    }

    #[test]
    fn a_publication_changes_the_version() {
        let published = Published::new(Arc::new(config("127.0.0.1:1", "default=127.0.0.1:1")));
        let (version, _, _) = published.current();
        assert_eq!(published.version(), version);
        published.publish(Arc::new(config("127.0.0.1:1", "default=127.0.0.1:3")));
        assert_ne!(published.version(), version);
        let (_, config, _) = published.current();
        assert_eq!(config.routes[0].backends[0].port(), 3);
    }
}
