//! The router's executors and each connection's life, the six steps of the
//! design: listen (one SO_REUSEPORT listener per address and core), accept,
//! read the first packet, decide, connect, forward (splice the two sockets in
//! the kernel, or copy in userspace).
use std::{
    cell::{Cell, RefCell},
    net::{SocketAddr, TcpListener as StdListener},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _, future};
use splice::user::{
    KernelView, Leg, LegError, Member, ProbeConfig, Spliced, capabilities,
    halves::{self, Half, OwnSocket},
    readiness::Readiness,
    runtime::{self, Ready},
    shard::{ProbeSpec, ShardProbe},
    socket,
    stats::add,
};
use tracing::{debug, info, warn};

use crate::{
    backends::{ActiveGuard, Pools},
    config::{Config, Matcher, Mode},
    health::Health,
    limits::{Exceeded, Limits, Permit},
    metrics::{
        self, BackendCounters, CoreMetrics, KernelViews, Labelled, Lifecycle, RouteCounters,
        RouterCollector, Served,
    },
    proxy_protocol, refuse,
    reload::Published,
    routes::{self, Refusal},
    sniff::{self, FirstPacket, Protocol, Sniff},
    stats::RouterStats,
    supervise::Supervisor,
};

/// The router probe, built by build.rs.
static ROUTER_PROBE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/router-probe"));

/// Bytes read per call while reading the first packet.
const FIRST_READ: usize = 4096;

/// Called once every executor serves, with the bound addresses.
pub type OnReady = Box<dyn FnOnce(&[SocketAddr])>;

/// Builds the configuration anew for a reload (SIGHUP): re-reads the file
/// and re-applies the command line, as at start.
pub type Reloader = Box<dyn FnMut() -> anyhow::Result<Config>>;

/// How `run` reports and reloads.
pub struct RunOptions {
    /// Print a `stats:` line every interval (and at exit).
    pub stats_interval: Option<Duration>,
    pub on_ready: OnReady,
    /// Called on SIGHUP.
    pub reload: Reloader,
}

/// What the main thread hands to one executor.
struct ShardInput {
    core: usize,
    listeners: Vec<StdListener>,
    published: Arc<Published>,
    probe: Option<ProbeSpec>,
    stats: Arc<RouterStats>,
    metrics: Arc<CoreMetrics>,
    labelled: Arc<Labelled>,
    lifecycle: Arc<Lifecycle>,
    limits: Arc<Limits>,
}

/// One configuration as an executor uses it: the routes' backend pools and
/// counters. A connection keeps the generation it was accepted under.
struct Generation {
    config: Arc<Config>,
    pools: Pools,
    /// Per route (same index as `config.routes`).
    routes: Vec<Arc<RouteCounters>>,
    /// Per route, per backend (same indices as the route's `backends`).
    backends: Vec<Vec<Arc<BackendCounters>>>,
}

impl Generation {
    fn new(config: Arc<Config>, core: usize, labelled: &Labelled, health: Arc<Health>) -> Self {
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

    fn backend(&self, route: usize, addr: SocketAddr) -> Option<&BackendCounters> {
        let index = self.config.routes[route]
            .backends
            .iter()
            .position(|a| *a == addr)?;
        Some(&self.backends[route][index])
    }
}

/// One executor's state, shared by its connection tasks.
struct Shard {
    core: usize,
    published: Arc<Published>,
    /// The generation in force, with the published version it was built
    /// from.
    current: RefCell<(u64, Rc<Generation>)>,
    probe: Option<ShardProbe>,
    /// Where this executor's sockets wait (see [`halves`]).
    readiness: Rc<Readiness>,
    stats: Arc<RouterStats>,
    metrics: Arc<CoreMetrics>,
    labelled: Arc<Labelled>,
    lifecycle: Arc<Lifecycle>,
    limits: Arc<Limits>,
    /// When a refusal at a connection limit was last logged (at most one
    /// line a second per core), and how many since.
    limit_log: Cell<(Option<Instant>, u64)>,
}

impl Shard {
    /// The generation for a new connection: rebuilt first if a reload
    /// published a new configuration (one atomic load otherwise).
    fn generation(&self) -> Rc<Generation> {
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

/// Adds one to a gauge while it lives.
struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    fn new(gauge: &'a AtomicU64) -> Self {
        add(gauge, 1);
        Self(gauge)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Runs the router until SIGINT/SIGTERM, then drains (see
/// [`crate::supervise`]).
pub fn run(config: Config, options: RunOptions) -> anyhow::Result<()> {
    let open_files = runtime::raise_open_files_limit();
    let online = runtime::online_cores();
    let cores = config.cores.unwrap_or(online);
    if cores > online {
        bail!("cores = {cores}: this machine has {online} online cores (use 1 to {online})");
    }
    let mut per_core: Vec<Vec<StdListener>> = (0..cores).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    // The main thread's copies of the listeners, to close them on stop.
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let copies = runtime::bind_reuseport(*addr, cores)?;
        bound.push(copies[0].local_addr()?);
        for (core, listener) in copies.into_iter().enumerate() {
            listeners.push(listener.try_clone()?);
            per_core[core].push(listener);
        }
    }
    let metrics_listener = match config.metrics {
        Some(addr) => Some(
            crate::endpoint::bind(addr)
                .with_context(|| format!("cannot serve metrics on {addr}"))?,
        ),
        None => None,
    };
    let probe = probe_spec(&config)?;
    let max_connections = config
        .max_connections
        .unwrap_or_else(|| Limits::default_total(open_files));
    let limits = Limits::new(
        max_connections,
        config.max_connections_per_listener,
        config.listen.len(),
    );
    info!(
        max_connections,
        max_connections_per_listener = config.max_connections_per_listener,
        open_files,
        "connection limits"
    );
    let config = Arc::new(config);
    let published = Arc::new(Published::new(Arc::clone(&config)));
    let stats: Vec<Arc<RouterStats>> = (0..cores).map(|_| Arc::default()).collect();
    let core_metrics: Vec<Arc<CoreMetrics>> = (0..cores).map(|_| Arc::default()).collect();
    let labelled = Arc::new(Labelled::new(cores));
    labelled.register(&config);
    let lifecycle = Arc::new(Lifecycle::default());
    let inputs = per_core
        .into_iter()
        .zip(stats.iter().zip(&core_metrics))
        .enumerate()
        .map(|(core, (listeners, (stats, metrics)))| ShardInput {
            core,
            listeners,
            published: Arc::clone(&published),
            probe: probe.clone(),
            stats: Arc::clone(stats),
            metrics: Arc::clone(metrics),
            labelled: Arc::clone(&labelled),
            lifecycle: Arc::clone(&lifecycle),
            limits: Arc::clone(&limits),
        })
        .collect();
    // Listeners are bound: from here on, every thread needs at most what
    // loading the probes takes (executors inherit this).
    let (loading, running): (&[u32], &[u32]) = if probe.is_some() {
        (capabilities::LOAD, capabilities::RUNTIME)
    } else {
        (&[], &[])
    };
    capabilities::limit_bounding_set(running);
    capabilities::retain_only(loading).context("dropping capabilities")?;
    let (_executors, views) = runtime::spawn_shards(inputs, serve_shard)?;
    // Probes loaded: the main thread keeps what the connections need.
    let kept = capabilities::retain_only(if views.iter().any(Option::is_some) {
        capabilities::RUNTIME
    } else {
        &[]
    })
    .context("dropping capabilities")?;
    let bounding = match capabilities::bounding_set() {
        Some(set) if set & !kept == 0 => "cleared",
        Some(_) => {
            "unchanged (clearing it needs CAP_SETPCAP; no_new_privs keeps exec from using it)"
        }
        None => "unknown",
    };
    info!(kept = ?capabilities::names(kept), bounding, no_new_privs = true, "capabilities dropped");
    let kernel: Vec<KernelView> = views.into_iter().flatten().collect();
    let mode = if kernel.len() == cores {
        "ebpf"
    } else if kernel.is_empty() {
        "copy"
    } else {
        "mixed"
    };
    // After spawn_shards: the thread inherits the blocked signals, which
    // only the main thread waits for.
    let labelled_for_reload = Arc::clone(&labelled);
    let metrics_addr = match metrics_listener {
        Some(listener) => {
            let addr = listener.local_addr()?;
            let collector = RouterCollector {
                mode,
                shards: stats.clone(),
                cores: core_metrics,
                labelled,
                kernel: KernelViews(
                    kernel
                        .iter()
                        .map(KernelView::try_clone)
                        .collect::<Result<_, _>>()
                        .context("opening the probe maps for the metrics")?,
                ),
                lifecycle: Arc::clone(&lifecycle),
            };
            crate::endpoint::serve(
                listener,
                metrics::registry(collector),
                Arc::clone(&lifecycle),
            )
            .context("starting the metrics thread")?;
            Some(addr)
        }
        None => None,
    };
    info!(?bound, mode, cores, ?metrics_addr, "serving");
    lifecycle.ready.store(true, Relaxed);
    (options.on_ready)(&bound);
    if let Some(addr) = metrics_addr {
        println!("router: metrics on http://{addr}/metrics");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
    Supervisor {
        mode,
        stats: &stats,
        kernel: &kernel,
        published: &published,
        lifecycle: &lifecycle,
        labelled: &labelled_for_reload,
        listeners,
        stats_interval: options.stats_interval,
        reload: options.reload,
        config,
        limits,
        default_max_connections: Limits::default_total(open_files),
    }
    .run();
    Ok(())
}

fn probe_spec(config: &Config) -> anyhow::Result<Option<ProbeSpec>> {
    match config.mode {
        Mode::Copy => return Ok(None),
        // Fail with the clearest message before starting anything.
        Mode::Ebpf => splice::user::capabilities::check()?,
        Mode::Auto => {
            if let Err(e) = splice::user::capabilities::check() {
                warn!("{e}; forwarding in userspace (--mode copy)");
                return Ok(None);
            }
        }
    }
    Ok(Some(ProbeSpec {
        object: Arc::new(ROUTER_PROBE.to_vec()),
        config: ProbeConfig {
            capacity: config.sockmap_capacity,
            in_flight_limit: config.in_flight_limit,
        },
        what: "router probe",
    }))
}

async fn serve_shard(input: ShardInput, ready: Ready<Option<KernelView>>) {
    let (version, config, health) = input.published.current();
    let loaded = match &input.probe {
        Some(spec) => match ShardProbe::load(spec, input.core, Arc::clone(&input.stats.splice)) {
            Ok((probe, view)) => Some((probe, view)),
            Err(message) if config.mode == Mode::Auto => {
                warn!("{message}; this core forwards in userspace");
                None
            }
            Err(message) => return ready.report(Err(message)),
        },
        None => None,
    };
    // The probe is loaded (or not needed): this executor's threads keep only
    // what connections need. Capabilities belong to threads: the executor's
    // own, and its blocking-pool thread (one per executor), started before
    // the load with the loading set.
    let keep: &'static [u32] = if loaded.is_some() {
        capabilities::RUNTIME
    } else {
        &[]
    };
    let dropped = capabilities::retain_only(keep).and(
        glommio::executor()
            .spawn_blocking(move || capabilities::retain_only(keep))
            .await,
    );
    if let Err(e) = dropped {
        return ready.report(Err(format!("dropping capabilities: {e}")));
    }
    let readiness = match Readiness::start() {
        Ok(readiness) => readiness,
        Err(e) => {
            return ready.report(Err(format!(
                "creating the epoll set of core {}: {e}",
                input.core
            )));
        }
    };
    let probe = match loaded {
        Some((probe, view)) => {
            ready.report(Ok(Some(view)));
            Some(probe)
        }
        None => {
            ready.report(Ok(None));
            None
        }
    };
    if input.core == 0 {
        // One checker for every core: they share its verdicts (atomics).
        health.spawn_checks();
    }
    let generation = Rc::new(Generation::new(config, input.core, &input.labelled, health));
    let shard = Rc::new(Shard {
        core: input.core,
        published: input.published,
        current: RefCell::new((version, generation)),
        probe,
        readiness,
        stats: input.stats,
        metrics: input.metrics,
        labelled: input.labelled,
        lifecycle: input.lifecycle,
        limits: input.limits,
        limit_log: Cell::new((None, 0)),
    });
    // Listeners come in configuration order: the index is the listener's.
    for (index, listener) in input.listeners.into_iter().enumerate() {
        // Non-blocking already (see `runtime::bind_reuseport`).
        let listener = OwnSocket::new(OwnedFd::from(listener), &shard.readiness);
        let shard = Rc::clone(&shard);
        glommio::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok((socket, peer)) => match shard.limits.admit(index) {
                        Ok(permit) => {
                            let client = OwnSocket::new(socket, &shard.readiness);
                            glommio::spawn_local(serve(
                                Box::new(halves::split(client)),
                                Client(peer),
                                Rc::clone(&shard),
                                permit,
                            ))
                            .detach();
                        }
                        Err(exceeded) => refuse_over_limit(socket, &shard, exceeded),
                    },
                    // Stopping: the main thread shut the listener down;
                    // dropping it closes this core's copy.
                    Err(_) if shard.lifecycle.draining.load(Relaxed) => break,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        warn!("accept failed: {e}");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        })
        .detach();
    }
    // The executor lives as long as this task: forever.
    future::pending::<()>().await;
}

/// A connection's client, for the logs.
struct Client(Option<SocketAddr>);

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("unknown"),
        }
    }
}

/// Closes a connection past a limit at once, with a reset: nothing is read,
/// and the descriptor is free again before the next accept. Counted, and
/// logged at most once a second per core.
fn refuse_over_limit(socket: OwnedFd, shard: &Shard, exceeded: Exceeded) {
    add(&shard.stats.refused_limit, 1);
    let _ = socket::reset_on_close(socket.as_fd());
    drop(socket);
    let (last, unlogged) = shard.limit_log.get();
    let now = Instant::now();
    if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
        shard.limit_log.set((last, unlogged + 1));
        return;
    }
    shard.limit_log.set((Some(now), 0));
    let (limit, max) = match exceeded {
        Exceeded::Total(max) => ("max_connections", max),
        Exceeded::Listener(max) => ("max_connections_per_listener", max),
    };
    warn!(
        limit,
        max,
        refused_since_last_line = unlogged + 1,
        "connection limit reached: refusing new connections (counted as refused_limit)"
    );
}

/// Serves one accepted connection (a task of its own).
///
/// Not an `async fn`, as [`connect`] and [`splice_or_copy`]: an `async fn`
/// keeps a copy of each argument besides the one its body uses, for the
/// connection's whole life; an `async move` block uses its captures in place.
/// The client comes boxed for the same reason: the task holds its captures
/// for its whole life, and the socket moves on into the legs.
#[allow(clippy::manual_async_fn)]
fn serve(
    mut client: Box<(Half, Half)>,
    peer: Client,
    shard: Rc<Shard>,
    permit: Permit,
) -> impl Future<Output = ()> {
    async move {
        // Held until the connection ends.
        let _permit = &permit;
        let accepted = Instant::now();
        let stats = &shard.stats;
        let generation = shard.generation();
        add(&stats.splice.accepted, 1);
        let _active = Held::new(&stats.splice.active);
        // The short-lived states (routing, connecting, refusing) end with
        // this block, so they share their room in the task with the
        // long-lived forwarding that comes out of it instead of adding to it.
        let forwarding = std::pin::pin!({
            // Boxed, as the backend connect and the refusal below: a task is
            // as large as its largest state.
            let routed = Box::pin(route(&mut client.0, &generation)).await;
            shard.metrics.first_packet.observe(accepted.elapsed());
            match routed {
                Ok((first, decision)) => {
                    add(&stats.routed, 1);
                    add(&generation.routes[decision.route].routed, 1);
                    Box::pin(connect(
                        *client,
                        &shard,
                        &generation,
                        first,
                        decision,
                        &peer,
                        accepted,
                    ))
                    .await
                }
                Err(refused) => {
                    add(stats.refused(refused.reason), 1);
                    let route = refused.route.map(|index| {
                        add(generation.routes[index].refused(refused.reason), 1);
                        generation.config.routes[index].name.as_str()
                    });
                    info!(
                        client = %peer,
                        reason = refused.reason.name(),
                        route,
                        "refused connection"
                    );
                    let response = refuse::response(refused.protocol, refused.reason);
                    Box::pin(answer_then_close(*client, &response)).await;
                    None
                }
            }
        });
        // Polled where it is: moving it into an await would copy it.
        if let Some(forwarding) = forwarding.as_pin_mut() {
            forwarding.await;
        }
    }
}

/// How long, and how much, a refused client may still send after its
/// answer: closing with unread bytes would reset the connection and the
/// client could lose the answer (nginx's `lingering_close`, bounded).
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Sends `answer` and a FIN, then reads and discards what the client still
/// sends (bounded) so that the close does not reset the connection.
async fn answer_then_close((mut reader, mut writer): (Half, Half), answer: &[u8]) {
    if !answer.is_empty() && writer.write_all(answer).await.is_err() {
        return;
    }
    // Sends FIN.
    if writer.close().await.is_err() {
        return;
    }
    let drain = async {
        // On the heap: an array here would make every connection's task
        // (its future holds every state) 16 KiB larger.
        let mut sink = vec![0u8; 16 * 1024];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match reader.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let give_up = glommio::timer::sleep(LINGER_TIME);
    future::or(drain, give_up).await;
}

/// Why a connection is refused, in which protocol to answer, and the route
/// it named if any (a preamble with a wrong token).
struct Refused {
    protocol: Protocol,
    reason: Refusal,
    route: Option<usize>,
}

impl From<(Protocol, Refusal)> for Refused {
    fn from((protocol, reason): (Protocol, Refusal)) -> Self {
        Self {
            protocol,
            reason,
            route: None,
        }
    }
}

/// Reads the first packet and picks the route; on refusal, says in which
/// protocol to answer.
async fn route(
    client: &mut Half,
    generation: &Generation,
) -> Result<(Vec<u8>, routes::Decision), Refused> {
    let config = &generation.config;
    let deadline = Instant::now() + config.first_packet_timeout;
    let max = config.first_packet_max;
    let mut bytes = Vec::with_capacity(FIRST_READ);
    let first = loop {
        match sniff::sniff(&bytes, max) {
            Sniff::Done(first) => break first,
            Sniff::Invalid(protocol, why) => {
                debug!("invalid first packet: {why}");
                return Err((protocol, Refusal::Invalid).into());
            }
            Sniff::TooLarge(protocol) => return Err((protocol, Refusal::TooLarge).into()),
            Sniff::NeedMore => {}
        }
        if bytes.len() >= max {
            return Err((sniff::guess(&bytes), Refusal::TooLarge).into());
        }
        let old = bytes.len();
        bytes.resize((old + FIRST_READ).min(max), 0);
        let left = deadline.saturating_duration_since(Instant::now());
        let read = async { Some(client.read(&mut bytes[old..]).await) };
        let timeout = async {
            glommio::timer::sleep(left).await;
            None
        };
        match future::or(read, timeout).await {
            Some(Ok(0)) | Some(Err(_)) => {
                // Closed (or reset) before saying where to go.
                bytes.truncate(old);
                return Err((sniff::guess(&bytes), Refusal::Invalid).into());
            }
            Some(Ok(n)) => bytes.truncate(old + n),
            None => {
                bytes.truncate(old);
                return Err((sniff::guess(&bytes), Refusal::Timeout).into());
            }
        }
    };
    let decision = routes::decide(&config.routes, &first).map_err(|reason| Refused {
        protocol: first.protocol(),
        reason,
        route: named_route(&config.routes, &first),
    })?;
    if let FirstPacket::Tls { sni } = &first {
        debug!(?sni, route = config.routes[decision.route].name, "routed");
    }
    Ok((bytes, decision))
}

/// The route a preamble names, if there is one by that name.
fn named_route(routes: &[crate::config::Route], first: &FirstPacket) -> Option<usize> {
    let FirstPacket::Preamble { route, .. } = first else {
        return None;
    };
    routes
        .iter()
        .position(|r| matches!(&r.matcher, Matcher::Preamble { name, .. } if name == route))
}

/// Connects the route's backend; returns the forwarding of the connection:
/// it sends the backend the first packet and forwards both directions until
/// both ended. `None` when no backend could be reached (the client was
/// answered).
async fn connect<'a>(
    client: (Half, Half),
    shard: &'a Shard,
    generation: &'a Generation,
    first: Vec<u8>,
    decision: routes::Decision,
    peer: &'a Client,
    accepted: Instant,
) -> Option<impl Future<Output = ()> + 'a> {
    let stats = &shard.stats;
    let route = &generation.config.routes[decision.route];
    let counters = &generation.routes[decision.route];
    let route_active = Held::new(&counters.active);
    let connecting = Instant::now();
    let (connected, failures) = Box::pin(generation.pools.connect(
        decision.route,
        generation.config.connect_timeout,
        &shard.readiness,
    ))
    .await;
    for (addr, error) in &failures {
        add(&stats.backend_failures, 1);
        if let Some(backend) = generation.backend(decision.route, *addr) {
            add(&backend.failures, 1);
        }
        warn!(route = route.name, backend = %addr, "backend connection failed: {error}");
    }
    let protocol = sniff::guess(&first);
    let Some(backend) = connected else {
        add(stats.refused(Refusal::Unavailable), 1);
        add(counters.refused(Refusal::Unavailable), 1);
        info!(
            client = %peer,
            reason = Refusal::Unavailable.name(),
            route = route.name,
            "refused connection"
        );
        let (_, mut writer) = client;
        let _ = writer
            .write_all(&refuse::response(protocol, Refusal::Unavailable))
            .await;
        let _ = writer.close().await;
        return None;
    };
    shard.metrics.backend_connect.observe(connecting.elapsed());
    let backend_counters = generation.backend(decision.route, backend.addr);
    if let Some(backend) = backend_counters {
        add(&backend.connections, 1);
    }
    let backend_active = backend_counters.map(|backend| Held::new(&backend.active));
    let backend_addr = backend.addr;
    let guard = backend.guard;
    // Before any byte of the client, the backend learns who it is.
    let header = route
        .proxy_protocol
        .map(|version| {
            let local = socket2::SockRef::from(&client.0.fd()).local_addr();
            proxy_protocol::header(version, peer.0, local.ok().and_then(|a| a.as_socket()))
        })
        .unwrap_or_default();
    Some(splice_or_copy(
        client,
        backend.socket,
        shard,
        ToBackend {
            header,
            first: match decision.close_http {
                Some(head) => crate::rewrite::connection_close(&first, head),
                None => first,
            },
            skip: decision.skip,
        },
        Finish {
            _held: (route_active, backend_active, guard),
            counters,
            route,
            peer,
            backend_addr,
            accepted,
        },
    ))
}

/// What a forwarded connection holds until it ends, and reports then.
struct Finish<'a> {
    _held: (Held<'a>, Option<Held<'a>>, ActiveGuard<'a>),
    counters: &'a RouteCounters,
    route: &'a crate::config::Route,
    peer: &'a Client,
    backend_addr: SocketAddr,
    accepted: Instant,
}

impl Finish<'_> {
    /// Counts and logs the connection's end (and releases what it held).
    fn record(self, forwarded: &Forwarded) {
        let counters = self.counters;
        if let Some(served) = forwarded.served {
            add(counters.served(served), 1);
        }
        add(&counters.bytes_to_backend, forwarded.to_backend);
        add(&counters.bytes_to_client, forwarded.to_client);
        debug!(
            client = %self.peer,
            route = self.route.name,
            backend = %self.backend_addr,
            mode = forwarded.served.map_or("none", Served::name),
            bytes_to_backend = forwarded.to_backend,
            bytes_to_client = forwarded.to_client,
            reset = forwarded.reset,
            duration_ms = self.accepted.elapsed().as_millis() as u64,
            "connection closed"
        );
    }
}

/// What forwarding a connection did, for the counters and the log.
#[derive(Debug, Default)]
struct Forwarded {
    /// How it was forwarded (`None`: it failed before).
    served: Option<Served>,
    /// Bytes delivered to each side: redirected by the kernel plus written
    /// by userspace (the first packet included).
    to_backend: u64,
    to_client: u64,
    /// Ended by an error (reset passed on).
    reset: bool,
}

/// What the backend gets before the splice: the PROXY protocol header (if
/// any), then the first packet less its first `skip` bytes (a preamble).
struct ToBackend {
    header: Vec<u8>,
    first: Vec<u8>,
    skip: usize,
}

impl ToBackend {
    /// The bytes to send: the header, then the first packet less its skipped
    /// prefix, in one buffer so that they leave together.
    fn assemble(self) -> Vec<u8> {
        let ToBackend {
            header,
            mut first,
            skip,
        } = self;
        first.drain(..skip.min(first.len()));
        if !header.is_empty() {
            first.splice(0..0, header);
        }
        first
    }
}

/// Sends the backend its first bytes, then splices the two sockets (or
/// copies, without a probe or when the splice fails) until both directions
/// ended.
///
/// Not an `async fn`: the backend is split and the legs made here, so the
/// future (which lives as long as the connection) holds the legs only, not
/// also the arguments and locals they were made from (an `async fn` keeps
/// its arguments, and a local moved from, for its whole life: 1,896 B,
/// ~800 of them dead, per connection).
fn splice_or_copy<'a>(
    (client_reader, client_writer): (Half, Half),
    backend: OwnSocket,
    shard: &'a Shard,
    to_backend: ToBackend,
    finish: Finish<'a>,
) -> impl Future<Output = ()> + 'a {
    let spliceable = shard.probe.is_some();
    let (backend_reader, backend_writer) = halves::split(backend);
    let fds = [
        client_reader.fd().as_raw_fd(),
        backend_reader.fd().as_raw_fd(),
    ];
    // SAFETY: each socket lives as long as one of its halves: the legs hold
    // them, and on failure the reset below comes first.
    let [client_socket, backend_socket] = fds.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) });
    // Legs take their baselines before anything is written to either side.
    let mut legs = Leg::new(client_reader, backend_writer, backend_socket, spliceable)
        .and_then(|up| {
            let down = Leg::new(backend_reader, client_writer, client_socket, spliceable)?;
            Ok((up, down, fds))
        })
        .inspect_err(|_| reset_on_close(fds));
    let first = to_backend.assemble();
    async move {
        let stats = &shard.stats;
        let forwarded = 'forward: {
            let mut forwarded = Forwarded::default();
            // Borrowed in place: moving them out would keep two copies.
            let (up, down, [client_fd, backend_fd]) = match &mut legs {
                Ok((up, down, fds)) => (up, down, *fds),
                Err(e) => {
                    // Both sockets were reset.
                    debug!("cannot forward: {e}");
                    add(&stats.splice.resets, 1);
                    forwarded.reset = true;
                    break 'forward forwarded;
                }
            };
            // SAFETY: the legs own the sockets and outlive these.
            let [client_socket, backend_socket] =
                [client_fd, backend_fd].map(|fd| unsafe { BorrowedFd::borrow_raw(fd) });
            // Spliced before the first packet goes out: the backend cannot
            // have answered (and closed, which the kernel would refuse) yet.
            // The client's later bytes wait in the kernel until the first
            // packet is written.
            let mut splice = match &shard.probe {
                Some(probe) => {
                    let members = [
                        Member {
                            socket: client_socket,
                            peer: 1,
                            start: false,
                        },
                        Member {
                            socket: backend_socket,
                            peer: 0,
                            start: true,
                        },
                    ];
                    let splice = probe.splice(&members);
                    forwarded.served = Some(if splice.is_some() {
                        Served::Ebpf
                    } else {
                        Served::Fallback
                    });
                    splice
                }
                None => {
                    add(&stats.splice.copied, 1);
                    forwarded.served = Some(Served::Copy);
                    None
                }
            };
            if let Err(e) = up.write(&first).await {
                debug!("sending the first packet failed: {e}");
                add(&stats.splice.resets, 1);
                reset_on_close([client_fd, backend_fd]);
                forwarded.reset = true;
                forwarded.to_backend = up.bytes_written();
                break 'forward forwarded;
            }
            drop(first);
            if let Some(splice) = &mut splice {
                splice.start(0);
                for (index, source) in [up.source(), down.source()].into_iter().enumerate() {
                    if splice.is_spliced(index) {
                        source.set_spliced();
                    }
                }
            }
            let spliced = |index| splice.as_ref().map(|splice| Spliced { splice, index });
            let reset = Reset {
                sockets: [client_fd, backend_fd],
                legs: [up.delivery(), down.delivery()],
            };
            let (up_result, down_result) = future::zip(
                run_leg(up, spliced(0), &reset),
                run_leg(down, spliced(1), &reset),
            )
            .await;
            if up_result.is_err() || down_result.is_err() {
                add(&stats.splice.resets, 1);
                forwarded.reset = true;
            }
            // The probe's per-socket count of what it redirected to the peer (a
            // stream it gave up on counts only what userspace wrote).
            let redirected = |index| {
                splice
                    .as_ref()
                    .and_then(|splice| splice.stream(index).ok())
                    .map_or(0, |stream| stream.redirected)
            };
            forwarded.to_backend = up.bytes_written() + redirected(0);
            forwarded.to_client = down.bytes_written() + redirected(1);
            add(
                &stats.splice.userspace_bytes,
                up.bytes_read() + down.bytes_read(),
            );
            // The sockets close first (dropping the legs closes them): then
            // the splice has only its routes left to remove.
            drop(legs);
            if let Some(splice) = splice {
                splice.drop_closed();
            }
            if let Some(probe) = &shard.probe {
                probe.update_slots_gauge();
            }
            forwarded
        };
        finish.record(&forwarded);
    }
}

/// A connection's two sockets and legs, to reset when a direction fails.
struct Reset {
    sockets: [RawFd; 2],
    legs: [Rc<splice::user::flow::Delivery>; 2],
}

impl Reset {
    /// Passes a reset on: both legs stop, both sockets send RST when closed,
    /// and blocked reads wake up now (without sending the peers anything).
    fn now(&self) {
        for leg in &self.legs {
            leg.abandon();
        }
        reset_on_close(self.sockets);
        for fd in self.sockets {
            // SAFETY: both sockets outlive every caller (see `splice_or_copy`).
            let _ = socket::shutdown_read(unsafe { BorrowedFd::borrow_raw(fd) });
        }
    }
}

/// Runs one direction; if it fails, resets the connection, which also ends
/// the other direction.
async fn run_leg<R, W>(
    leg: &mut Leg<R, W>,
    spliced: Option<Spliced<'_>>,
    reset: &Reset,
) -> Result<(), LegError>
where
    R: futures_lite::AsyncRead + Unpin,
    W: futures_lite::AsyncWrite + Unpin,
{
    let result = leg.run(spliced).await;
    if let Err(e) = &result {
        debug!("connection reset: {e}");
        reset.now();
    }
    result
}

fn reset_on_close(sockets: [RawFd; 2]) {
    for fd in sockets {
        // SAFETY: both sockets outlive every caller (see `splice_or_copy`).
        let _ = socket::reset_on_close(unsafe { BorrowedFd::borrow_raw(fd) });
    }
}
