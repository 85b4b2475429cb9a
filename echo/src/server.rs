//! The echo server: listeners are bound on the main thread (so that every
//! error comes out before serving starts), then one executor per core loads
//! its own probe, accepts on its own listener and echoes each connection
//! with [`pipe::echo`], on the same socket type as the router.
use std::{
    io::Write as _,
    net::TcpListener as StdListener,
    os::fd::OwnedFd,
    rc::Rc,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use anyhow::{Context as _, bail};
use splice::{
    KernelView, ProbeConfig,
    halves::OwnSocket,
    pipe::{self, Path},
    readiness::Readiness,
    runtime::{self, Ready, Signal},
    shard::{ProbeSpec, ShardProbe},
    stats::{SpliceStats, add},
};
use tracing::{info, warn};

use crate::{Cli, Mode, stats::Report};

/// The echo probe, built by build.rs.
static ECHO_PROBE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/echo-probe"));

/// What the main thread hands to one executor.
struct ShardInput {
    core: usize,
    listener: StdListener,
    probe: Option<ProbeSpec>,
    stats: Arc<SpliceStats>,
}

/// One executor's state, shared by its connection tasks.
struct Shard {
    probe: Option<ShardProbe>,
    stats: Arc<SpliceStats>,
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
    let stats: Vec<Arc<SpliceStats>> = (0..cores).map(|_| Arc::default()).collect();
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
            Some(Signal::Reload | Signal::Reopen) => {}
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
    splice::capabilities::check()?;
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
            splice_after: 0,
        },
        what: "echo probe",
    }))
}

async fn serve_shard(input: ShardInput, ready: Ready<Option<KernelView>>) {
    // Where this executor's sockets wait (see `splice::halves`).
    let readiness = match Readiness::start() {
        Ok(readiness) => readiness,
        Err(e) => {
            return ready.report(Err(format!(
                "creating the epoll set of core {}: {e}",
                input.core
            )));
        }
    };
    let probe = match &input.probe {
        Some(spec) => match ShardProbe::load(spec, input.core, Arc::clone(&input.stats)) {
            Ok((probe, view)) => {
                ready.report(Ok(Some(view)));
                Some(probe)
            }
            Err(message) => return ready.report(Err(message)),
        },
        None => {
            ready.report(Ok(None));
            None
        }
    };
    // Non-blocking already (see `runtime::bind_reuseport`).
    let listener = OwnSocket::new(OwnedFd::from(input.listener), &readiness);
    let shard = Rc::new(Shard {
        probe,
        stats: input.stats,
    });
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                let socket = OwnSocket::new(socket, &readiness);
                glommio::spawn_local(serve(socket, Rc::clone(&shard))).detach();
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                warn!("accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Echoes one connection (a task of its own) and counts how it went.
async fn serve(socket: OwnSocket, shard: Rc<Shard>) {
    let stats = &shard.stats;
    add(&stats.accepted, 1);
    add(&stats.active, 1);
    let outcome = pipe::echo(socket, shard.probe.as_ref()).await;
    if outcome.path == Some(Path::Copied) {
        add(&stats.copied, 1);
    }
    add(&stats.resets, u64::from(outcome.reset));
    add(&stats.userspace_bytes, outcome.read_in_userspace);
    stats.active.fetch_sub(1, Relaxed);
}
