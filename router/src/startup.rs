//! Process start-up: binds every listener (one SO_REUSEPORT copy per core),
//! sets the connection limits, drops capabilities, starts one executor per
//! core ([`crate::shard`]) and the metrics endpoint, then gives the main
//! thread to the [`Supervisor`] (signals: report, reload, drain) until the
//! router stops.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use anyhow::{Context as _, bail};
use splice::{
    KernelView, ProbeConfig,
    capabilities::{self, Capability},
    runtime,
    shard::ProbeSpec,
};
use tracing::{info, warn};

use crate::{
    access_log::AccessLogger,
    config::{Config, Mode},
    executor::{ShardInput, serve_shard},
    limits::Limits,
    listeners::{Inbox, Listeners},
    reload::{Published, Reloader},
    supervise::Supervisor,
    telemetry::{
        counters::{CoreMetrics, Labelled, Lifecycle},
        endpoint,
        prometheus::{self, KernelViews, RouterCollector},
        stats::RouterStats,
    },
    upgrade::{self, SocketOption},
    watch::ConfigWatch,
};

/// The router probe, built by build.rs (the bpfel-unknown-none object).
pub static ROUTER_PROBE: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/router-probe"));

/// Called once every executor serves, with the bound addresses.
pub type OnReady = Box<dyn FnOnce(&[SocketAddr])>;

/// How `run` reports and reloads.
pub struct RunOptions {
    /// Print a `stats:` line every interval (and at exit).
    pub stats_interval: Option<Duration>,
    pub on_ready: OnReady,
    /// Called on SIGHUP, and when the watched file changes.
    pub reload: Reloader,
    /// The configuration file, watched while `watch_config` is on.
    pub watch: Option<ConfigWatch>,
    /// `--upgrade-from PATH`: take over from the router offering itself
    /// there instead of binding the listeners ([`crate::upgrade`]).
    pub upgrade_from: Option<PathBuf>,
    /// `--upgrade-socket PATH`: where this router offers itself.
    pub upgrade_socket: SocketOption,
}

/// Runs the router until SIGINT/SIGTERM, then drains (see
/// [`crate::supervise`]).
pub fn run(config: Config, options: RunOptions) -> anyhow::Result<()> {
    // Before binding (a port below 1024 needs CAP_NET_BIND_SERVICE) and
    // before the capability check.
    capabilities::raise_permitted().context("raising the permitted capabilities")?;
    let open_files = runtime::raise_open_files_limit();
    let online = runtime::online_cores();
    let cores = config.cores.unwrap_or(online);
    if cores > online {
        bail!("cores = {cores}: this machine has {online} online cores (use 1 to {online})");
    }
    // A reload without `max_connections` goes back to this default too.
    let default_max_connections = Limits::default_total(open_files);
    let max_connections = config.max_connections.unwrap_or(default_max_connections);
    let limits = Limits::new(max_connections, config.max_connections_per_listener);
    // Taken over before anything is bound: the old router's listeners are
    // the ones this one serves on.
    let mut received = match &options.upgrade_from {
        Some(path) => upgrade::take_over(path, cores)?,
        None => None,
    };
    // Not taken over: bound now, so that a path another router holds fails
    // the start before anything serves.
    let mut upgrade_socket = match &received {
        None => bind_upgrade_socket(&options.upgrade_socket, false)?,
        Some(_) => None,
    };
    // Bound before the capabilities are dropped; the executors take their
    // copies from the inbox, now and after a reload that adds an address.
    // Taking over, they take them only once every core serves.
    let inbox = if received.is_some() {
        Inbox::closed(cores)
    } else {
        Inbox::new(cores)
    };
    let mut listeners = Listeners::new(cores, Arc::clone(&inbox), Arc::clone(&limits));
    match received.as_mut() {
        Some(received) => {
            listeners.adopt(std::mem::take(&mut received.listeners), &config)?;
        }
        None => {
            listeners.apply(&config)?;
        }
    }
    let bound = listeners.local_addrs();
    let access_log = AccessLogger::open(cores, config.access_log_file.as_ref())
        .context("starting the access log")?;
    let received_metrics = received.as_mut().and_then(|r| r.metrics.take());
    let metrics_listener = match config.metrics {
        // The old router's, when it serves the same address.
        Some(addr) if received_metrics.as_ref().is_some_and(|(at, _)| *at == addr) => {
            received_metrics.map(|(_, listener)| listener)
        }
        Some(addr) => {
            Some(endpoint::bind(addr).with_context(|| format!("cannot serve metrics on {addr}"))?)
        }
        None => None,
    };
    // A copy to hand over in the next upgrade.
    let metrics_offered = match (&metrics_listener, config.metrics) {
        (Some(listener), Some(addr)) => Some((addr, listener.try_clone()?)),
        _ => None,
    };
    let probe = probe_spec(&config)?;
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
    let boxes = upgrade::connections::CoreBoxes::new(cores);
    let upgrading = received.is_some().then(|| boxes.upgrading());
    let inputs = stats
        .iter()
        .zip(&core_metrics)
        .enumerate()
        .map(|(core, (stats, metrics))| ShardInput {
            core,
            inbox: Arc::clone(&inbox),
            published: Arc::clone(&published),
            probe: probe.clone(),
            stats: Arc::clone(stats),
            metrics: Arc::clone(metrics),
            labelled: Arc::clone(&labelled),
            limits: Arc::clone(&limits),
            access_log: Arc::clone(&access_log),
            boxes: Arc::clone(&boxes),
        })
        .collect();
    // Listeners are bound: from here on, every thread needs at most what
    // loading the probes takes (executors inherit this).
    let (loading, running): (&[Capability], &[Capability]) = if probe.is_some() {
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
    let bounding = match capabilities::bounding_set_within(&kept) {
        Some(true) => "cleared",
        Some(false) => {
            "unchanged (clearing it needs CAP_SETPCAP; no_new_privs keeps exec from using it)"
        }
        None => "unknown",
    };
    info!(kept = ?capabilities::names(&kept), bounding, no_new_privs = true, "capabilities dropped");
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
                published: Arc::clone(&published),
            };
            endpoint::serve(
                listener,
                prometheus::registry(collector),
                Arc::clone(&lifecycle),
            )
            .context("starting the metrics thread")?;
            Some(addr)
        }
        None => None,
    };
    // Threads started from here on inherit the main thread's reduced
    // capabilities.
    access_log
        .start_writer()
        .context("starting the access log")?;
    crate::resolve::spawn_refresh(Arc::clone(&published), Arc::clone(&labelled_for_reload))?;
    if let Some(received) = received {
        if upgrade::fault("before-ready") {
            tracing::error!("{}=before-ready: aborting", upgrade::FAULT_VARIABLE);
            std::process::abort();
        }
        // Every core serves: accept from here on, then tell the old router
        // to stop.
        inbox.open();
        // Accepting on every core before the old router stops: a queue no
        // one takes from meanwhile would hold its connections back.
        if !inbox.wait_taken(Duration::from_secs(5)) {
            bail!(
                "an executor did not take its listeners within 5 s; the old router keeps serving"
            );
        }
        let old = received.old_pid;
        let started = std::time::Instant::now();
        // From here this process accepts: whatever goes wrong with the old
        // one, it serves on (two routers accepting on one socket is safe;
        // none would not be).
        match received
            .ready()
            .and_then(|open| Ok((open, received.take_connections(&boxes)?)))
        {
            Ok((open, (taken, left))) => info!(
                old_pid = old,
                open,
                taken,
                left,
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                "upgrade: took over the listeners and {taken} connection(s); the old router \
                 finishes {left} and exits"
            ),
            Err(e) => warn!(
                old_pid = old,
                "upgrade: {e:#}; serving on the listeners taken over (the old router's \
                 connections stay with it)"
            ),
        }
        drop(upgrading);
        upgrade_socket = match bind_upgrade_socket(&options.upgrade_socket, true) {
            Ok(bound) => bound,
            Err(e) => {
                warn!("{e:#}; this router cannot be upgraded in turn");
                None
            }
        };
    }
    let listeners = Arc::new(Mutex::new(listeners));
    let upgrade_file = match upgrade_socket {
        Some((listener, file)) => {
            let shards = stats.clone();
            upgrade::offer(
                listener,
                upgrade::Offering {
                    cores,
                    listeners: Arc::clone(&listeners),
                    metrics: metrics_offered,
                    lifecycle: Arc::clone(&lifecycle),
                    active: Box::new(move || {
                        shards.iter().map(|s| s.splice.active.load(Relaxed)).sum()
                    }),
                    boxes: Arc::clone(&boxes),
                },
            )
            .context("starting the upgrade thread")?;
            Some(file)
        }
        None => None,
    };
    info!(?bound, mode, cores, ?metrics_addr, "serving");
    lifecycle.ready.store(true, Relaxed);
    (options.on_ready)(&bound);
    crate::service::ready_as_main(&format!("serving on {bound:?}, mode {mode}"));
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
        watch: options.watch,
        config,
        limits,
        default_max_connections,
        access_log,
    }
    .run();
    // The socket's file goes with it, unless a new router replaced it.
    drop(upgrade_file);
    Ok(())
}

/// The upgrade socket, bound (see [`upgrade::socket::bind`]); `None` when
/// the default path cannot be used (this router then cannot be upgraded,
/// which is said once). A path given on the command line must work.
fn bind_upgrade_socket(
    option: &SocketOption,
    replace: bool,
) -> anyhow::Result<Option<(std::os::unix::net::UnixListener, upgrade::socket::Bound)>> {
    match upgrade::socket::bind(&option.path, replace) {
        Ok(bound) => {
            info!(path = %option.path.display(), "offering upgrades");
            Ok(Some(bound))
        }
        Err(e) if option.explicit => Err(e.context("--upgrade-socket")),
        Err(e) => {
            info!(
                "no upgrade socket: {e:#}; this router cannot be upgraded in place \
                 (give --upgrade-socket PATH)"
            );
            Ok(None)
        }
    }
}

fn probe_spec(config: &Config) -> anyhow::Result<Option<ProbeSpec>> {
    match config.mode {
        Mode::Copy => return Ok(None),
        // Fail with the clearest message before starting anything.
        Mode::Ebpf => splice::capabilities::check()?,
        Mode::Auto => {
            if let Err(e) = splice::capabilities::check() {
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
            splice_after: config.splice_after,
        },
        what: "router probe",
    }))
}
