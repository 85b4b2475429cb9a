//! Prometheus metrics (`--metrics ADDR`): the connection path only bumps
//! per-core atomics (no lock, no allocation); a [`Collector`] sums them over
//! the cores when scraped, reads the probes' in-kernel counters, and
//! prometheus-client encodes the whole in the Prometheus text format, which
//! [`crate::endpoint`] serves.
//!
//! Adding a metric (e.g. a backend health gauge): give the per-core struct
//! that owns the state an atomic ([`BackendCounters`] for a per-backend
//! one), and encode the sum in [`RouterCollector::encode`] with [`gauge`],
//! [`counter`] or their `*_family` forms; or register another metric or
//! [`Collector`] on the [`Registry`] that [`registry`] returns.
use std::{
    collections::BTreeMap,
    fmt, io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, prometheus_text},
    metrics::MetricType,
    registry::Registry,
};
use splice::user::{KernelTotals, KernelView, stats::SpliceStats};

use crate::{routes::Refusal, stats::RouterStats};

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
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
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
type PerCore<K, T> = BTreeMap<K, Vec<Arc<T>>>;

/// Per-route and per-backend counters, one per core, created when a
/// configuration (first or reloaded) names the route or backend and kept
/// afterwards: a counter never goes back, and a route that a reload removes
/// keeps reporting its final values. The lock is taken only when an
/// executor adopts a configuration and when a scrape reads.
#[derive(Debug)]
pub struct Labelled {
    cores: usize,
    routes: Mutex<PerCore<String, RouteCounters>>,
    backends: Mutex<PerCore<(String, SocketAddr), BackendCounters>>,
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
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

/// The probes' maps, readable from the metrics thread.
pub struct KernelViews(pub Vec<KernelView>);

impl fmt::Debug for KernelViews {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KernelViews({})", self.0.len())
    }
}

/// Everything a scrape reads.
#[derive(Debug)]
pub struct RouterCollector {
    /// `ebpf`, `copy` or `mixed` (some cores without a probe).
    pub mode: &'static str,
    pub shards: Vec<Arc<RouterStats>>,
    pub cores: Vec<Arc<CoreMetrics>>,
    pub labelled: Arc<Labelled>,
    pub kernel: KernelViews,
    pub lifecycle: Arc<Lifecycle>,
}

type Labels = Vec<(&'static str, String)>;

/// Encodes a counter without labels (`_total` is appended to `name`).
pub fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<Labels, _, u64>(&value, None)
}

/// Encodes a gauge without labels.
pub fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

/// Encodes a labelled counter, one sample per row.
pub fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        metric
            .encode_family(&labels)?
            .encode_counter::<Labels, _, u64>(&value, None)?;
    }
    Ok(())
}

/// Encodes a labelled gauge, one sample per row.
pub fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        metric.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

fn histogram<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    per_core: impl Iterator<Item = &'a Histogram>,
) -> fmt::Result {
    let mut counts = [0u64; LATENCY_BUCKETS.len() + 1];
    let mut sum_nanos = 0u64;
    for histogram in per_core {
        for (total, bucket) in counts.iter_mut().zip(&histogram.buckets) {
            *total += bucket.load(Relaxed);
        }
        sum_nanos = sum_nanos.saturating_add(histogram.sum_nanos.load(Relaxed));
    }
    let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
        .iter()
        .copied()
        .chain([f64::INFINITY])
        .zip(counts)
        .collect();
    encoder
        .encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<Labels>(sum_nanos as f64 / 1e9, counts.iter().sum(), &buckets, None)
}

/// Sums `field` over every core's counters of each label key.
fn sum_per_key<K: Clone, T>(
    map: &Mutex<PerCore<K, T>>,
    field: impl Fn(&T) -> u64,
) -> Vec<(K, u64)> {
    let map = map.lock().expect("no panic under this lock");
    map.iter()
        .map(|(key, cores)| (key.clone(), cores.iter().map(|c| field(c)).sum()))
        .collect()
}

impl RouterCollector {
    fn sum(&self, field: impl Fn(&RouterStats) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| field(s).load(Relaxed)).sum()
    }

    fn splice_sum(&self, field: impl Fn(&SpliceStats) -> &AtomicU64) -> u64 {
        self.sum(|s| field(&s.splice))
    }

    fn kernel_totals(&self) -> Option<io::Result<KernelTotals>> {
        if self.kernel.0.is_empty() {
            return None;
        }
        let mut totals = KernelTotals::default();
        for view in &self.kernel.0 {
            match view.counters() {
                Ok(t) => totals += t,
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(totals))
    }

    fn encode_connections(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        counter(
            encoder,
            "connections_accepted",
            "Connections accepted.",
            self.splice_sum(|s| &s.accepted),
        )?;
        gauge(
            encoder,
            "connections_active",
            "Connections open now (reading the first packet, forwarding, or being refused).",
            self.splice_sum(|s| &s.active),
        )?;
        counter(
            encoder,
            "connections_routed",
            "Connections given a route.",
            self.sum(|s| &s.routed),
        )?;
        counter_family(
            encoder,
            "connections_refused",
            "Connections refused, by reason.",
            Refusal::ALL.map(|refusal| {
                (
                    vec![("reason", refusal.name().to_owned())],
                    self.sum(|s| s.refused(refusal)),
                )
            }),
        )?;
        counter_family(
            encoder,
            "connections_served",
            "Forwarded connections by how: ebpf (spliced in the kernel), copy (userspace, no \
             probe), fallback (userspace although a probe is loaded: SockMap full or insert failed).",
            [
                (Served::Ebpf, self.splice_sum(|s| &s.spliced)),
                (
                    // `copied` counts fallbacks too.
                    Served::Copy,
                    self.splice_sum(|s| &s.copied).saturating_sub(
                        self.splice_sum(|s| &s.sockmap_full)
                            + self.splice_sum(|s| &s.insert_failed),
                    ),
                ),
                (
                    Served::Fallback,
                    self.splice_sum(|s| &s.sockmap_full) + self.splice_sum(|s| &s.insert_failed),
                ),
            ]
            .map(|(served, value)| (vec![("mode", served.name().to_owned())], value)),
        )?;
        counter_family(
            encoder,
            "fallbacks",
            "Connections copied in userspace although a probe is loaded, by cause.",
            [
                ("sockmap_full", self.splice_sum(|s| &s.sockmap_full)),
                ("insert_failed", self.splice_sum(|s| &s.insert_failed)),
            ]
            .map(|(cause, value)| (vec![("cause", cause.to_owned())], value)),
        )?;
        counter(
            encoder,
            "connections_reset",
            "Forwarded connections ended by an error (reset passed on).",
            self.splice_sum(|s| &s.resets),
        )?;
        counter(
            encoder,
            "backend_failures",
            "Backend connection attempts that failed (the next backend was tried).",
            self.sum(|s| &s.backend_failures),
        )?;
        counter(
            encoder,
            "userspace_bytes",
            "Payload bytes userspace read after the first packet (copied connections, and what \
             the probe passed up under flow control).",
            self.splice_sum(|s| &s.userspace_bytes),
        )?;
        gauge(
            encoder,
            "sockmap_slots_in_use",
            "SockMap slots held by spliced connections (two per connection).",
            self.splice_sum(|s| &s.slots_in_use),
        )
    }

    fn encode_kernel(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let Some(Ok(totals)) = self.kernel_totals() else {
            // No probe loaded (copy mode), or its maps unreadable: say
            // nothing rather than report zeros.
            return Ok(());
        };
        for (name, help, value) in [
            (
                "kernel_redirected_bytes",
                "Bytes the probes redirected between spliced sockets inside the kernel.",
                totals.redirected_bytes,
            ),
            (
                "kernel_redirected_skbs",
                "Socket buffers the probes redirected.",
                totals.redirected_skbs,
            ),
            (
                "kernel_passed_bytes",
                "Bytes the probes passed up to userspace (flow control).",
                totals.passed_bytes,
            ),
            (
                "kernel_redirect_failures",
                "Redirects that failed because the peer socket was gone.",
                totals.redirect_failures,
            ),
            (
                "kernel_credit_exhausted",
                "Times a spliced direction ran out of credit and went through userspace.",
                totals.credit_exhausted,
            ),
            (
                "kernel_resumed",
                "Times a spliced direction came back to the kernel.",
                totals.resumed,
            ),
            (
                "kernel_trimmed_bytes",
                "Repeated bytes (overlapping retransmissions) the probes trimmed.",
                totals.trimmed_bytes,
            ),
            (
                "kernel_broken_streams",
                "Streams the probes could not place (connection reset).",
                totals.broken,
            ),
        ] {
            counter(encoder, name, help, value)?;
        }
        // Not the route map's size (`routes` in the `stats:` line): walking
        // it costs a system call per entry; `sockmap_slots_in_use` tells
        // the same from userspace.
        Ok(())
    }

    fn encode_routes(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let routes = &self.labelled.routes;
        let route = |name: &String| vec![("route", name.clone())];
        counter_family(
            encoder,
            "route_connections",
            "Connections given this route.",
            sum_per_key(routes, |c| c.routed.load(Relaxed))
                .into_iter()
                .map(|(name, value)| (route(&name), value)),
        )?;
        gauge_family(
            encoder,
            "route_connections_active",
            "Connections being forwarded on this route now.",
            sum_per_key(routes, |c| c.active.load(Relaxed))
                .into_iter()
                .map(|(name, value)| (route(&name), value)),
        )?;
        let mut served = Vec::new();
        for mode in Served::ALL {
            for (name, value) in sum_per_key(routes, |c| c.served(mode).load(Relaxed)) {
                served.push((
                    vec![("route", name), ("mode", mode.name().to_owned())],
                    value,
                ));
            }
        }
        counter_family(
            encoder,
            "route_connections_served",
            "Forwarded connections of this route by how (ebpf, copy, fallback).",
            served,
        )?;
        let mut refused = Vec::new();
        for refusal in Refusal::ALL {
            for (name, value) in sum_per_key(routes, |c| c.refused(refusal).load(Relaxed)) {
                if value > 0 {
                    refused.push((
                        vec![("route", name), ("reason", refusal.name().to_owned())],
                        value,
                    ));
                }
            }
        }
        counter_family(
            encoder,
            "route_connections_refused",
            "Connections refused after picking (or naming) this route, by reason.",
            refused,
        )?;
        let mut bytes = Vec::new();
        type Field = fn(&RouteCounters) -> &AtomicU64;
        let directions: [(&str, Field); 2] = [
            ("to_backend", |c| &c.bytes_to_backend),
            ("to_client", |c| &c.bytes_to_client),
        ];
        for (direction, field) in directions {
            for (name, value) in sum_per_key(routes, |c| field(c).load(Relaxed)) {
                bytes.push((
                    vec![("route", name), ("direction", direction.to_owned())],
                    value,
                ));
            }
        }
        counter_family(
            encoder,
            "route_bytes",
            "Bytes forwarded on this route's closed connections, by direction (in the kernel \
             and in userspace; the first packet included, a stripped preamble not).",
            bytes,
        )
    }

    fn encode_backends(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let backends = &self.labelled.backends;
        let labels = |(route, addr): &(String, SocketAddr)| {
            vec![("route", route.clone()), ("backend", addr.to_string())]
        };
        type Field = fn(&BackendCounters) -> &AtomicU64;
        let metrics: [(&str, &str, Field, bool); 3] = [
            (
                "backend_connections",
                "Connections this backend accepted.",
                |c| &c.connections,
                false,
            ),
            (
                "backend_connections_active",
                "Connections to this backend open now.",
                |c| &c.active,
                true,
            ),
            (
                "backend_connect_failures",
                "Connection attempts to this backend that failed.",
                |c| &c.failures,
                false,
            ),
        ];
        for (name, help, field, is_gauge) in metrics {
            let rows = sum_per_key(backends, |c| field(c).load(Relaxed))
                .into_iter()
                .map(|(key, value)| (labels(&key), value));
            if is_gauge {
                gauge_family(encoder, name, help, rows)?;
            } else {
                counter_family(encoder, name, help, rows)?;
            }
        }
        Ok(())
    }
}

impl Collector for RouterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let encoder = &mut encoder;
        gauge_family(
            encoder,
            "info",
            "The router: version, forwarding mode (ebpf, copy, or mixed) and cores.",
            [(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_owned()),
                    ("mode", self.mode.to_owned()),
                    ("cores", self.shards.len().to_string()),
                ],
                1,
            )],
        )?;
        gauge(
            encoder,
            "draining",
            "1 while the router stops: listeners closed, live connections finishing.",
            u64::from(self.lifecycle.draining.load(Relaxed)),
        )?;
        counter_family(
            encoder,
            "config_reloads",
            "Configuration reloads (SIGHUP), by result.",
            [
                ("ok", self.lifecycle.reloads_ok.load(Relaxed)),
                ("error", self.lifecycle.reloads_failed.load(Relaxed)),
            ]
            .map(|(result, value)| (vec![("result", result.to_owned())], value)),
        )?;
        self.encode_connections(encoder)?;
        histogram(
            encoder,
            "first_packet_seconds",
            "Time from accept to the routing decision (routed or refused).",
            self.cores.iter().map(|c| &c.first_packet),
        )?;
        histogram(
            encoder,
            "backend_connect_seconds",
            "Time from the routing decision to a backend accepting (failovers included).",
            self.cores.iter().map(|c| &c.backend_connect),
        )?;
        self.encode_routes(encoder)?;
        self.encode_backends(encoder)?;
        self.encode_kernel(encoder)
    }
}

/// The registry a scrape encodes: every metric is prefixed `router_`.
pub fn registry(collector: RouterCollector) -> Registry {
    let mut registry = Registry::with_prefix("router");
    registry.register_collector(Box::new(collector));
    registry
}

/// Encodes `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::with_capacity(16 * 1024);
    prometheus_text::encode(&mut text, registry).expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collector(shards: usize) -> RouterCollector {
        RouterCollector {
            mode: "copy",
            shards: (0..shards).map(|_| Arc::default()).collect(),
            cores: (0..shards).map(|_| Arc::default()).collect(),
            labelled: Arc::new(Labelled::new(shards)),
            kernel: KernelViews(Vec::new()),
            lifecycle: Arc::default(),
        }
    }

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn per_core_counters_are_summed_and_labelled() {
        let collector = collector(2);
        collector.shards[0].splice.accepted.fetch_add(3, Relaxed);
        collector.shards[1].splice.accepted.fetch_add(4, Relaxed);
        collector.shards[1]
            .refused(Refusal::NoRoute)
            .fetch_add(2, Relaxed);
        let labelled = Arc::clone(&collector.labelled);
        labelled.route(0, "api").routed.fetch_add(5, Relaxed);
        labelled.route(1, "api").routed.fetch_add(6, Relaxed);
        labelled
            .route(1, "api")
            .served(Served::Fallback)
            .fetch_add(1, Relaxed);
        let backend = "127.0.0.1:9001".parse().unwrap();
        labelled
            .backend(0, "api", backend)
            .failures
            .fetch_add(1, Relaxed);
        collector.cores[0]
            .first_packet
            .observe(Duration::from_micros(300));
        collector.cores[1]
            .first_packet
            .observe(Duration::from_secs(10));
        let text = encode(&registry(collector));
        assert_eq!(
            sample(&text, "router_connections_accepted_total"),
            Some("7")
        );
        assert_eq!(
            sample(
                &text,
                "router_connections_refused_total{reason=\"no_route\"}"
            ),
            Some("2")
        );
        assert_eq!(
            sample(&text, "router_route_connections_total{route=\"api\"}"),
            Some("11")
        );
        assert_eq!(
            sample(
                &text,
                "router_route_connections_served_total{route=\"api\",mode=\"fallback\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "router_backend_connect_failures_total{route=\"api\",backend=\"127.0.0.1:9001\"}"
            ),
            Some("1")
        );
        // Cumulative buckets: 300 µs falls in le=0.0005, 10 s only in +Inf.
        assert_eq!(
            sample(&text, "router_first_packet_seconds_bucket{le=\"0.00025\"}"),
            Some("0")
        );
        assert_eq!(
            sample(&text, "router_first_packet_seconds_bucket{le=\"0.0005\"}"),
            Some("1")
        );
        assert_eq!(
            sample(&text, "router_first_packet_seconds_bucket{le=\"5\"}"),
            Some("1")
        );
        assert_eq!(
            sample(&text, "router_first_packet_seconds_bucket{le=\"+Inf\"}"),
            Some("2")
        );
        assert_eq!(
            sample(&text, "router_first_packet_seconds_count"),
            Some("2")
        );
        // No probe: no kernel series rather than zeros.
        assert!(!text.contains("router_kernel_"), "{text}");
    }
}
