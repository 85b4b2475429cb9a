//! The echo server: listeners and probes are set up on the main thread (so
//! that every error comes out before serving starts), then one executor per
//! core accepts on its own listener and splices into its own probe.
use std::{
    cell::{Cell, RefCell},
    io::Write as _,
    net::TcpListener as StdListener,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, IntoRawFd as _},
    rc::Rc,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use anyhow::{Context as _, bail};
use glommio::net::{TcpListener, TcpStream};
use splice::user::{
    InsertError, KernelView, Leg, Member, Probe, ProbeConfig, Splice, Spliced,
    runtime::{self, Ready, Signal},
    socket,
};
use tracing::{debug, info, warn};

use crate::{
    Cli, Mode,
    stats::{Report, ShardStats},
};

/// The echo probe, built by build.rs.
static ECHO_PROBE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/echo-probe"));

/// Initial userspace buffer of a spliced connection: it only ever sees bytes
/// the probe passed up, so keep it small (it grows if needed).
const SPLICED_BUFFER: usize = 256;
const COPY_BUFFER: usize = 16 * 1024;

/// What the main thread hands to one executor.
struct ShardInput {
    core: usize,
    listener: StdListener,
    probe: Option<ProbeSpec>,
    stats: Arc<ShardStats>,
}

/// What an executor needs to load its own copy of the probe.
#[derive(Clone)]
struct ProbeSpec {
    object: Arc<Vec<u8>>,
    config: ProbeConfig,
}

/// One executor's state, shared by its connection tasks.
struct Shard {
    probe: Option<Rc<RefCell<Probe>>>,
    stats: Arc<ShardStats>,
    warned_full: Cell<bool>,
}

pub fn run(cli: &Cli) -> anyhow::Result<()> {
    runtime::raise_open_files_limit();
    let online = runtime::online_cores();
    let cores = cli.cores.unwrap_or(online);
    if cores == 0 || cores > online {
        bail!("--cores {cores}: this machine has {online} online cores (use 1 to {online})");
    }
    let listeners = runtime::bind_reuseport(cli.listen, cores)?;
    let local = listeners[0].local_addr()?;
    let probe = probe_spec(cli)?;
    let stats: Vec<Arc<ShardStats>> = (0..cores).map(|_| Arc::default()).collect();
    let inputs = listeners
        .into_iter()
        .zip(&stats)
        .enumerate()
        .map(|(core, (listener, stats))| ShardInput {
            core,
            listener,
            probe: probe.clone(),
            stats: Arc::clone(stats),
        })
        .collect();
    // Each executor loads its own probe (per-core maps) and reports a view
    // on its maps, or why the load failed.
    let (_executors, views) = runtime::spawn_shards(inputs, serve_shard)?;
    let kernel: Vec<KernelView> = views.into_iter().flatten().collect();

    let mode = match cli.mode {
        Mode::Ebpf => "ebpf",
        Mode::Copy => "copy",
    };
    println!("ebpf-echo: listening on {local} (mode {mode}, {cores} cores)");
    let _ = std::io::stdout().flush();
    info!(%local, mode, cores, "serving");

    let report = Report {
        mode: cli.mode,
        shards: &stats,
        kernel: &kernel,
    };
    let print = |line: String| {
        println!("{line}");
        let _ = std::io::stdout().flush();
    };
    let interval = if cli.stats {
        cli.stats_interval()
    } else {
        Duration::from_secs(3600)
    };
    loop {
        match runtime::wait_for_signal(interval) {
            Some(Signal::Stop) => break,
            Some(Signal::Report) => print(report.line()),
            Some(Signal::Reload) => {}
            None if cli.stats => print(report.line()),
            None => {}
        }
    }
    if cli.stats {
        print(report.line());
    }
    Ok(())
}

fn probe_spec(cli: &Cli) -> anyhow::Result<Option<ProbeSpec>> {
    if cli.mode == Mode::Copy {
        return Ok(None);
    }
    // Fail with the clearest message before starting anything.
    splice::user::capabilities::check()?;
    let object = match &cli.probe_object {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("reading probe object {}", path.display()))?,
        None => ECHO_PROBE.to_vec(),
    };
    Ok(Some(ProbeSpec {
        object: Arc::new(object),
        config: ProbeConfig {
            capacity: cli.sockmap_capacity,
            in_flight_limit: cli.in_flight_limit,
        },
    }))
}

/// Loads this executor's probe, if the mode wants one.
fn load_probe(input: &ShardInput) -> Result<Option<(Probe, KernelView)>, String> {
    let Some(spec) = &input.probe else {
        return Ok(None);
    };
    let core = input.core;
    let probe = Probe::load(&spec.object, spec.config)
        .map_err(|e| format!("loading the echo probe for core {core}: {e}"))?;
    let view = probe
        .kernel_view()
        .map_err(|e| format!("opening the probe maps of core {core}: {e}"))?;
    Ok(Some((probe, view)))
}

async fn serve_shard(input: ShardInput, ready: Ready<Option<KernelView>>) {
    let probe = match load_probe(&input) {
        Ok(Some((probe, view))) => {
            ready.report(Ok(Some(view)));
            Some(probe)
        }
        Ok(None) => {
            ready.report(Ok(None));
            None
        }
        Err(message) => return ready.report(Err(message)),
    };
    // SAFETY: the descriptor comes from a listener we own and hand over.
    let listener = unsafe { TcpListener::from_raw_fd(input.listener.into_raw_fd()) };
    let shard = Rc::new(Shard {
        probe: probe.map(|probe| Rc::new(RefCell::new(probe))),
        stats: input.stats,
        warned_full: Cell::new(false),
    });
    if let Some(probe) = &shard.probe {
        glommio::spawn_local(splice::user::flow::run(Rc::clone(probe))).detach();
    }
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(serve(stream, Rc::clone(&shard))).detach();
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                warn!("accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve(stream: TcpStream, shard: Rc<Shard>) {
    let stats = &shard.stats;
    ShardStats::add(&stats.accepted, 1);
    ShardStats::add(&stats.active, 1);
    let fd = stream.as_raw_fd();
    // SAFETY: `stream` moves into `leg`, which lives until the end of this
    // function, after every use of `socket`.
    let socket = unsafe { BorrowedFd::borrow_raw(fd) };
    let (reader, writer) = futures_lite::io::split(stream);
    // The leg takes its baseline before the probe can echo anything.
    let buffer = if shard.probe.is_some() {
        SPLICED_BUFFER
    } else {
        COPY_BUFFER
    };
    let leg = Leg::new(reader, writer, socket, buffer);
    let mut leg = match leg {
        Ok(leg) => leg,
        Err(e) => {
            debug!("cannot serve connection: {e}");
            ShardStats::add(&stats.resets, 1);
            stats.active.fetch_sub(1, Relaxed);
            return;
        }
    };
    let splice = shard.try_splice(socket);
    let spliced = splice.as_ref().map(|splice| Spliced { splice, index: 0 });
    let result = leg.run(spliced).await;
    if let Err(e) = result {
        debug!("connection reset: {e}");
        let _ = socket::reset_on_close(socket);
        ShardStats::add(&stats.resets, 1);
    }
    drop(splice);
    shard.update_slots_gauge();
    ShardStats::add(&stats.userspace_bytes, leg.bytes_read());
    drop(leg);
    stats.active.fetch_sub(1, Relaxed);
}

impl Shard {
    /// Inserts the socket with a route to itself; `None` means userspace
    /// echoes this connection.
    fn try_splice(&self, socket: BorrowedFd<'_>) -> Option<Splice> {
        let Some(probe) = &self.probe else {
            ShardStats::add(&self.stats.copied, 1);
            return None;
        };
        let early = socket::bytes_readable(socket).unwrap_or(0) > 0;
        let member = Member { socket, peer: 0 };
        match Splice::insert(probe, &[member]) {
            Ok(splice) => {
                ShardStats::add(&self.stats.spliced, 1);
                ShardStats::add(&self.stats.early, u64::from(early));
                self.update_slots_gauge();
                Some(splice)
            }
            Err(InsertError::Full { capacity }) => {
                if !self.warned_full.replace(true) {
                    warn!(
                        "SockMap full ({capacity} slots on this core): connections are echoed in \
                         userspace until slots free up (logged once; counted as sockmap_full)"
                    );
                }
                ShardStats::add(&self.stats.sockmap_full, 1);
                ShardStats::add(&self.stats.copied, 1);
                None
            }
            Err(e) => {
                debug!("not spliced ({e}): echoing in userspace");
                ShardStats::add(&self.stats.insert_failed, 1);
                ShardStats::add(&self.stats.copied, 1);
                None
            }
        }
    }

    fn update_slots_gauge(&self) {
        if let Some(probe) = &self.probe {
            let probe = probe.borrow();
            let in_use = u64::from(probe.capacity()) - probe.free_slots() as u64;
            self.stats.slots_in_use.store(in_use, Relaxed);
        }
    }
}
