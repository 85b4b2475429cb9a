//! One executor per core: loads its probe, keeps only the capabilities
//! connections need, builds its [`Shard`], and accepts on its copy of each
//! listener; each accepted connection is a task of its own
//! ([`crate::connection`]).
use std::{
    cell::{Cell, RefCell},
    net::{SocketAddr, TcpListener as StdListener},
    os::fd::OwnedFd,
    pin::pin,
    rc::Rc,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use futures_lite::future;
use splice::{
    KernelView,
    capabilities::{self, Capability},
    halves::{self, OwnSocket},
    readiness::Readiness,
    runtime::Ready,
    shard::{ProbeSpec, ShardProbe},
};
use tracing::warn;

use crate::{
    access_log::AccessLogger,
    config::Mode,
    connection::{self, Client, refusing::refuse_over_limit},
    limits::Limits,
    listeners::{Inbox, ListenerState},
    reload::{ADOPT_EVERY, Published},
    shard::{Generation, Shard},
    telemetry::{
        counters::{CoreMetrics, Labelled},
        stats::RouterStats,
    },
    upgrade::connections::CoreBoxes,
};

/// One listen address as its connections see it.
#[derive(Debug)]
pub(crate) struct Listener {
    /// The address it is bound to.
    pub(crate) addr: Option<SocketAddr>,
    /// What every core's copy shares: `accept_proxy`, closed, its limit.
    pub(crate) state: Arc<ListenerState>,
}

/// What the main thread hands to one executor.
pub(crate) struct ShardInput {
    pub(crate) core: usize,
    /// Where this core's copy of each listener arrives (at start, and
    /// after a reload that adds one).
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) access_log: Arc<AccessLogger>,
    pub(crate) published: Arc<Published>,
    pub(crate) probe: Option<ProbeSpec>,
    pub(crate) stats: Arc<RouterStats>,
    pub(crate) metrics: Arc<CoreMetrics>,
    pub(crate) labelled: Arc<Labelled>,
    pub(crate) limits: Arc<Limits>,
    /// Where the upgrade thread asks for this core's connections, or
    /// hands it the old process's.
    pub(crate) boxes: Arc<CoreBoxes>,
}

pub(crate) async fn serve_shard(input: ShardInput, ready: Ready<Option<KernelView>>) {
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
    let keep: &'static [Capability] = if loaded.is_some() {
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
        limits: input.limits,
        limit_log: Cell::new((None, 0)),
        access_log: input.access_log,
        idle: Default::default(),
        handover: Default::default(),
    });
    glommio::spawn_local(crate::upgrade::connections::watch(
        Rc::clone(&shard),
        Arc::clone(&input.boxes),
    ))
    .detach();
    glommio::spawn_local(crate::idle::reap_forever(Rc::clone(&shard))).detach();
    // Listeners arrive through the inbox: at start, and after a reload
    // that adds one. A published configuration is adopted at the next
    // accept, or here if none comes: the health checks (core 0) follow it
    // without traffic. The executor lives as long as this task: forever.
    loop {
        for (listener, state) in input.inbox.take(input.core) {
            // Counted before the loop runs: a release must wait for it.
            state
                .accepting
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let info = Rc::new(Listener {
                addr: listener.local_addr().ok(),
                state,
            });
            glommio::spawn_local(accept_forever(
                listener,
                info,
                Rc::clone(&shard),
                Arc::clone(&input.boxes),
            ))
            .detach();
        }
        glommio::timer::sleep(ADOPT_EVERY).await;
        shard.generation();
    }
}

/// How often an accept loop looks whether its listener was released to a
/// new process ([`crate::listeners::Listeners::release_all`]): a released
/// listener is not shut down, so no failed accept wakes the loop. Every
/// millisecond while an upgrade is under way ([`CoreBoxes::upgrading`]).
pub(crate) const CLOSED_CHECK: Duration = Duration::from_millis(100);

/// Accepts on this core's copy of one listener until the router stops;
/// each connection is a task of its own.
async fn accept_forever(
    listener: StdListener,
    info: Rc<Listener>,
    shard: Rc<Shard>,
    boxes: Arc<CoreBoxes>,
) {
    // Non-blocking already (see `runtime::bind_reuseport`).
    let listener = OwnSocket::new(OwnedFd::from(listener), &shard.readiness);
    // One timer for the loop's life, not one per accept.
    let released = async {
        loop {
            glommio::timer::sleep(boxes.check_every(CLOSED_CHECK)).await;
            if info.state.closed.load(Relaxed) {
                return None;
            }
        }
    };
    let mut released = pin!(released);
    loop {
        // A pending accept holds nothing (a non-blocking accept4 on
        // readiness): dropping it loses no connection.
        let accepted = future::or(async { Some(listener.accept().await) }, released.as_mut()).await;
        let Some(accepted) = accepted else {
            // Released to a new process: this core's copy leaves the epoll
            // set (the socket lives on in the new process, so closing the
            // descriptor would not take it out) and is closed.
            listener.leave_readiness();
            break;
        };
        match accepted {
            Ok((socket, peer)) => match shard.limits.admit(&info.state.limit) {
                Ok(permit) => {
                    let client = OwnSocket::new(socket, &shard.readiness);
                    glommio::spawn_local(connection::serve(
                        Box::new(halves::split(client)),
                        Client {
                            addr: peer,
                            listener: Rc::clone(&info),
                            name: None,
                            accepted: Instant::now(),
                        },
                        Rc::clone(&shard),
                        permit,
                    ))
                    .detach();
                }
                Err(exceeded) => refuse_over_limit(socket, &shard, exceeded, peer, &info),
            },
            // A reload removed it, or the drain shut it (not before: during
            // `drain_delay` it still accepts): dropping it closes this
            // core's copy.
            Err(_) if info.state.closed.load(Relaxed) => break,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                warn!("accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // The connections spawned above run first (the queue is FIFO): each
    // counts itself as active in its first step.
    futures_lite::future::yield_now().await;
    info.state
        .accepting
        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
}
