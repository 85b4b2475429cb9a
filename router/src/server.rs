//! The router's executors and each connection's life, the six steps of the
//! design: listen (one SO_REUSEPORT listener per address and core), accept,
//! read the first packet, decide, connect, forward (splice the two sockets in
//! the kernel, or copy in userspace).
use std::{
    cell::Cell,
    io::Write as _,
    net::{SocketAddr, TcpListener as StdListener},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, IntoRawFd as _, RawFd},
    rc::Rc,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _, future};
use glommio::net::{TcpListener, TcpStream};
use splice::user::{
    KernelView, Leg, LegError, Member, ProbeConfig, Spliced, capabilities,
    runtime::{self, Ready, Signal},
    shard::{ProbeSpec, ShardProbe},
    socket,
    stats::add,
};
use tracing::{debug, info, warn};

use crate::{
    backends::Pools,
    config::{Config, Mode},
    limits::{Exceeded, Limits, Permit},
    refuse,
    routes::{self, Refusal},
    sniff::{self, FirstPacket, Protocol, Sniff},
    stats::{Report, RouterStats},
};

/// The router probe, built by build.rs.
static ROUTER_PROBE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/router-probe"));

/// Initial userspace buffer of a spliced direction (grows if the probe
/// passes bytes up), and of a copied one.
const SPLICED_BUFFER: usize = 256;
const COPY_BUFFER: usize = 16 * 1024;
/// Bytes read per call while reading the first packet.
const FIRST_READ: usize = 4096;

/// Called once every executor serves, with the bound addresses.
pub type OnReady = Box<dyn FnOnce(&[SocketAddr])>;

/// How `run` reports.
pub struct RunOptions {
    /// Print a `stats:` line every interval (and at exit).
    pub stats_interval: Option<Duration>,
    pub on_ready: OnReady,
}

/// What the main thread hands to one executor.
struct ShardInput {
    core: usize,
    listeners: Vec<StdListener>,
    config: Arc<Config>,
    probe: Option<ProbeSpec>,
    stats: Arc<RouterStats>,
    limits: Arc<Limits>,
}

/// One executor's state, shared by its connection tasks.
struct Shard {
    config: Arc<Config>,
    pools: Pools,
    probe: Option<ShardProbe>,
    stats: Arc<RouterStats>,
    limits: Arc<Limits>,
    /// When a refusal at a connection limit was last logged (at most one
    /// line a second per core), and how many since.
    limit_log: Cell<(Option<Instant>, u64)>,
}

/// Runs the router until SIGINT/SIGTERM.
pub fn run(config: Config, options: RunOptions) -> anyhow::Result<()> {
    let open_files = runtime::raise_open_files_limit();
    let online = runtime::online_cores();
    let cores = config.cores.unwrap_or(online);
    if cores > online {
        bail!("cores = {cores}: this machine has {online} online cores (use 1 to {online})");
    }
    let mut per_core: Vec<Vec<StdListener>> = (0..cores).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for addr in &config.listen {
        let listeners = runtime::bind_reuseport(*addr, cores)?;
        bound.push(listeners[0].local_addr()?);
        for (core, listener) in listeners.into_iter().enumerate() {
            per_core[core].push(listener);
        }
    }
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
    let stats: Vec<Arc<RouterStats>> = (0..cores).map(|_| Arc::default()).collect();
    let inputs = per_core
        .into_iter()
        .zip(&stats)
        .enumerate()
        .map(|(core, (listeners, stats))| ShardInput {
            core,
            listeners,
            config: Arc::clone(&config),
            probe: probe.clone(),
            stats: Arc::clone(stats),
            limits: Arc::clone(&limits),
        })
        .collect();
    // Listeners are bound: from here on, every thread needs at most what
    // loading the probes takes (executors inherit this).
    let loading: &[u32] = if probe.is_some() {
        capabilities::LOAD
    } else {
        &[]
    };
    capabilities::retain_only(loading).context("dropping capabilities")?;
    let (_executors, views) = runtime::spawn_shards(inputs, serve_shard)?;
    // Probes loaded: the main thread keeps what the connections need.
    let kept = capabilities::retain_only(if views.iter().any(Option::is_some) {
        capabilities::RUNTIME
    } else {
        &[]
    })
    .context("dropping capabilities")?;
    info!(kept = ?capabilities::names(kept), "capabilities dropped");
    let kernel: Vec<KernelView> = views.into_iter().flatten().collect();
    let mode = if kernel.len() == cores {
        "ebpf"
    } else if kernel.is_empty() {
        "copy"
    } else {
        "mixed"
    };
    info!(?bound, mode, cores, "serving");
    (options.on_ready)(&bound);

    let report = Report {
        mode,
        shards: &stats,
        kernel: &kernel,
    };
    let print = |line: String| {
        println!("{line}");
        let _ = std::io::stdout().flush();
    };
    let interval = options.stats_interval.unwrap_or(Duration::from_secs(3600));
    loop {
        match runtime::wait_for_signal(interval) {
            Some(Signal::Stop) => break,
            Some(Signal::Report) => print(report.line()),
            Some(Signal::Reload) => info!("SIGHUP: reloading is not supported yet; ignored"),
            None if options.stats_interval.is_some() => print(report.line()),
            None => {}
        }
    }
    if options.stats_interval.is_some() {
        print(report.line());
    }
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
    let loaded = match &input.probe {
        Some(spec) => match ShardProbe::load(spec, input.core, Arc::clone(&input.stats.splice)) {
            Ok((probe, view)) => Some((probe, view)),
            Err(message) if input.config.mode == Mode::Auto => {
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
    let shard = Rc::new(Shard {
        pools: Pools::new(&input.config.routes),
        config: input.config,
        probe,
        stats: input.stats,
        limits: input.limits,
        limit_log: Cell::new((None, 0)),
    });
    // Listeners come in configuration order: the index is the listener's.
    for (index, listener) in input.listeners.into_iter().enumerate() {
        // SAFETY: the descriptor comes from a listener we own and hand over.
        let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
        let shard = Rc::clone(&shard);
        glommio::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => match shard.limits.admit(index) {
                        Ok(permit) => {
                            glommio::spawn_local(serve(stream, Rc::clone(&shard), permit)).detach();
                        }
                        Err(exceeded) => refuse_over_limit(stream, &shard, exceeded),
                    },
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

/// Closes a connection past a limit at once, with a reset: nothing is read,
/// and the descriptor is free again before the next accept. Counted, and
/// logged at most once a second per core.
fn refuse_over_limit(stream: TcpStream, shard: &Shard, exceeded: Exceeded) {
    add(&shard.stats.refused_limit, 1);
    // SAFETY: the descriptor belongs to `stream`, alive for this call.
    let _ = socket::reset_on_close(unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) });
    drop(stream);
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

async fn serve(mut client: TcpStream, shard: Rc<Shard>, _permit: Permit) {
    let stats = &shard.stats;
    add(&stats.splice.accepted, 1);
    add(&stats.splice.active, 1);
    let peer = client.peer_addr().ok();
    match route(&mut client, &shard).await {
        Ok((first, decision)) => {
            add(&stats.routed, 1);
            forward(client, &shard, first, decision).await;
        }
        Err((protocol, refusal)) => {
            add(stats.refused(refusal), 1);
            info!(
                client = ?peer,
                reason = refusal.name(),
                "refused connection"
            );
            let response = refuse::response(protocol, refusal);
            answer_then_close(client, &response).await;
        }
    }
    stats.splice.active.fetch_sub(1, Relaxed);
}

/// How long, and how much, a refused client may still send after its
/// answer: closing with unread bytes would reset the connection and the
/// client could lose the answer (nginx's `lingering_close`, bounded).
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Sends `answer` and a FIN, then reads and discards what the client still
/// sends (bounded) so that the close does not reset the connection.
async fn answer_then_close(mut client: TcpStream, answer: &[u8]) {
    if !answer.is_empty() && client.write_all(answer).await.is_err() {
        return;
    }
    if client.shutdown(std::net::Shutdown::Write).await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 16 * 1024];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let give_up = glommio::timer::sleep(LINGER_TIME);
    future::or(drain, give_up).await;
    let _ = client.close().await;
}

/// Reads the first packet and picks the route; on refusal, says in which
/// protocol to answer.
async fn route(
    client: &mut TcpStream,
    shard: &Shard,
) -> Result<(Vec<u8>, routes::Decision), (Protocol, Refusal)> {
    let config = &shard.config;
    let deadline = Instant::now() + config.first_packet_timeout;
    let max = config.first_packet_max;
    let mut bytes = Vec::with_capacity(FIRST_READ);
    let first = loop {
        match sniff::sniff(&bytes, max) {
            Sniff::Done(first) => break first,
            Sniff::Invalid(protocol, why) => {
                debug!("invalid first packet: {why}");
                return Err((protocol, Refusal::Invalid));
            }
            Sniff::TooLarge(protocol) => return Err((protocol, Refusal::TooLarge)),
            Sniff::NeedMore => {}
        }
        if bytes.len() >= max {
            return Err((sniff::guess(&bytes), Refusal::TooLarge));
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
                return Err((sniff::guess(&bytes), Refusal::Invalid));
            }
            Some(Ok(n)) => bytes.truncate(old + n),
            None => {
                bytes.truncate(old);
                return Err((sniff::guess(&bytes), Refusal::Timeout));
            }
        }
    };
    let decision =
        routes::decide(&config.routes, &first).map_err(|refusal| (first.protocol(), refusal))?;
    if let FirstPacket::Tls { sni } = &first {
        debug!(?sni, route = config.routes[decision.route].name, "routed");
    }
    Ok((bytes, decision))
}

/// Connects the route's backend, sends it the first packet, and forwards
/// both directions until both ended.
async fn forward(client: TcpStream, shard: &Shard, first: Vec<u8>, decision: routes::Decision) {
    let stats = &shard.stats;
    let route = &shard.config.routes[decision.route];
    let (connected, failures) = shard
        .pools
        .connect(decision.route, shard.config.connect_timeout)
        .await;
    for (addr, error) in &failures {
        add(&stats.backend_failures, 1);
        warn!(route = route.name, backend = %addr, "backend connection failed: {error}");
    }
    let protocol = sniff::guess(&first);
    let Some(backend) = connected else {
        add(stats.refused(Refusal::Unavailable), 1);
        info!(
            route = route.name,
            reason = "unavailable",
            "refused connection: no backend answered"
        );
        let mut client = client;
        let _ = client
            .write_all(&refuse::response(protocol, Refusal::Unavailable))
            .await;
        let _ = client.close().await;
        return;
    };
    let _guard = backend.guard;
    let client_fd = client.as_raw_fd();
    let backend_fd = backend.stream.as_raw_fd();
    // Latency over batching: a proxy forwards small writes as they come.
    let _ = client.set_nodelay(true);
    let _ = backend.stream.set_nodelay(true);
    // SAFETY: the streams move into the legs below, which live until the
    // end of this function, after every use of these descriptors.
    let (client_socket, backend_socket) = unsafe {
        (
            BorrowedFd::borrow_raw(client_fd),
            BorrowedFd::borrow_raw(backend_fd),
        )
    };
    let buffer = if shard.probe.is_some() {
        SPLICED_BUFFER
    } else {
        COPY_BUFFER
    };
    let (client_reader, client_writer) = futures_lite::io::split(client);
    let (backend_reader, backend_writer) = futures_lite::io::split(backend.stream);
    // Legs take their baselines before anything is written to either side.
    let legs = Leg::new(client_reader, backend_writer, backend_socket, buffer).and_then(|up| {
        Ok((
            up,
            Leg::new(backend_reader, client_writer, client_socket, buffer)?,
        ))
    });
    let (mut up, mut down) = match legs {
        Ok(legs) => legs,
        Err(e) => {
            debug!("cannot forward: {e}");
            add(&stats.splice.resets, 1);
            reset_on_close([client_fd, backend_fd]);
            return;
        }
    };
    if let Err(e) = up.write(&first[decision.skip.min(first.len())..]).await {
        debug!("sending the first packet failed: {e}");
        add(&stats.splice.resets, 1);
        reset_on_close([client_fd, backend_fd]);
        return;
    }
    drop(first);
    let splice = match &shard.probe {
        Some(probe) => {
            let early = socket::bytes_readable(client_socket).unwrap_or(0) > 0
                || socket::bytes_readable(backend_socket).unwrap_or(0) > 0;
            let members = [
                Member {
                    socket: client_socket,
                    peer: 1,
                },
                Member {
                    socket: backend_socket,
                    peer: 0,
                },
            ];
            probe.splice(&members, early)
        }
        None => {
            add(&stats.splice.copied, 1);
            None
        }
    };
    let spliced = |index| splice.as_ref().map(|splice| Spliced { splice, index });
    let reset = Reset {
        sockets: [client_fd, backend_fd],
        legs: [up.delivery(), down.delivery()],
    };
    let (up_result, down_result) = future::zip(
        run_leg(&mut up, spliced(0), &reset),
        run_leg(&mut down, spliced(1), &reset),
    )
    .await;
    if up_result.is_err() || down_result.is_err() {
        add(&stats.splice.resets, 1);
    }
    drop(splice);
    if let Some(probe) = &shard.probe {
        probe.update_slots_gauge();
    }
    add(
        &stats.splice.userspace_bytes,
        up.bytes_read() + down.bytes_read(),
    );
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
            // SAFETY: both sockets outlive every caller (see `forward`).
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
        // SAFETY: both sockets outlive every caller (see `forward`).
        let _ = socket::reset_on_close(unsafe { BorrowedFd::borrow_raw(fd) });
    }
}
