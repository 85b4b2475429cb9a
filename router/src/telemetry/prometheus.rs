//! Prometheus encoding (`--metrics ADDR`): a [`Collector`] sums the per-core
//! [`super::counters`] when scraped, reads the probes' in-kernel counters,
//! and prometheus-client encodes the whole in the Prometheus text format,
//! which [`super::endpoint`] serves.
//!
//! Adding a metric (e.g. a backend health gauge): give the per-core struct
//! that owns the state an atomic ([`BackendCounters`] for a per-backend
//! one), and encode the sum in [`RouterCollector::encode`] with [`gauge`],
//! [`counter`] or their `*_family` forms; or register another metric or
//! [`Collector`] on the [`Registry`] that [`registry`] returns.
use std::{
    fmt, io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, prometheus_text},
    metrics::MetricType,
    registry::Registry,
};
use splice::{KernelTotals, KernelView, stats::SpliceStats};

use super::process::ProcessCollector;
use super::{
    counters::{
        BackendCounters, CoreMetrics, Histogram, LATENCY_BUCKETS, Labelled, Lifecycle, PerCore,
        RouteCounters, Served,
    },
    stats::RouterStats,
};
use crate::{reload::Published, routes::Refusal};

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
    /// The configuration in force, with its backends' health.
    pub published: Arc<Published>,
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
            "Connections refused, by reason (limit: at a connection limit, before anything \
             was read).",
            Refusal::ALL
                .map(|refusal| {
                    (
                        vec![("reason", refusal.name().to_owned())],
                        self.sum(|s| s.refused(refusal)),
                    )
                })
                .into_iter()
                .chain([(
                    vec![("reason", "limit".to_owned())],
                    self.sum(|s| &s.refused_limit),
                )]),
        )?;
        counter(
            encoder,
            "connections_spliced_early",
            "Spliced connections whose first bytes arrived before their sockets were in the \
             SockMap (userspace passed them on).",
            self.splice_sum(|s| &s.early),
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
                "kernel_trimmed",
                "Overlapping retransmissions the probes trimmed.",
                totals.trimmed,
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
        // The route map's size (`routes` in the `stats:` line): walking it
        // costs a system call per entry, which a scrape every few seconds
        // can afford.
        let routes = self
            .kernel
            .0
            .iter()
            .map(|view| view.totals().map(|t| t.routes))
            .sum::<io::Result<u64>>();
        match routes {
            Ok(routes) => gauge(
                encoder,
                "kernel_routes",
                "Entries of the probes' route maps (one per spliced socket).",
                routes,
            ),
            Err(_) => Ok(()),
        }
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
        // Health: of the configuration in force only.
        let (_, _, health) = self.published.current();
        let health_labels = |b: &crate::health::BackendHealth| {
            vec![
                ("route", b.route().to_owned()),
                ("backend", b.addr().to_string()),
            ]
        };
        gauge_family(
            encoder,
            "backend_up",
            "1 while the balancers send new connections to this backend, 0 once its health \
             checks (or failed connects) marked it down.",
            health
                .backends()
                .map(|b| (health_labels(b), u64::from(b.healthy()))),
        )?;
        counter_family(
            encoder,
            "backend_check_failures",
            "Health checks of this backend that failed.",
            health
                .backends()
                .filter(|b| b.checked())
                .map(|b| (health_labels(b), b.check_failures())),
        )?;
        gauge(
            encoder,
            "backends_down",
            "Backends marked down now (counted once per route that lists them).",
            health.down() as u64,
        )
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
        gauge_family(
            encoder,
            "build_info",
            "The router's build: its version.",
            [(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1)],
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

/// The registry a scrape encodes: the router's metrics are prefixed
/// `router_`, the standard process metrics are not.
pub fn registry(collector: RouterCollector) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector));
    registry
        .sub_registry_with_prefix("router")
        .register_collector(Box::new(collector));
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
    use std::time::Duration;

    use super::*;

    fn collector(shards: usize) -> RouterCollector {
        RouterCollector {
            mode: "copy",
            shards: (0..shards).map(|_| Arc::default()).collect(),
            cores: (0..shards).map(|_| Arc::default()).collect(),
            labelled: Arc::new(Labelled::new(shards)),
            kernel: KernelViews(Vec::new()),
            lifecycle: Arc::default(),
            published: Arc::new(Published::new(Arc::new(crate::config::Config::default()))),
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
