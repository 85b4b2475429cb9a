//! Handing live connections over in an upgrade, per core: the old
//! process's executor k asks its pipes to stop at their next quiet point
//! ([`splice::handover`]), collects them (sockets and state, with what the
//! router knows: client, route, backend, age) and the maps of the probes
//! they are spliced in; the new process's executor k adopts those maps and
//! goes on with each connection. A connection not quiet within
//! [`QUIET_BOUND`] (still being routed or connected, or draining its end)
//! is finished by the old process.
use std::{
    cell::RefCell,
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    rc::Rc,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use splice::{
    ProbeConfig,
    handover::{self, HandedOver, PipeState},
    pipe::Outcome,
    shard::ShardProbe,
    stats::add,
};
use tracing::{debug, info, warn};

use crate::{
    access_log::{End, Entry},
    shard::Shard,
    telemetry::counters::{Held, Served},
};

/// How long an executor waits for its pipes to reach a quiet point. A pipe
/// whose legs wait for their sources is quiet at once; one moving bytes in
/// userspace is within one write.
pub const QUIET_BOUND: Duration = Duration::from_secs(1);
/// How often an executor looks at its box; every
/// [`BOX_CHECK_UPGRADING`] while an upgrade is under way, as a copied
/// connection stopped on one core waits, bytes queued, for the other cores'
/// look, then for the new process's.
const BOX_CHECK: Duration = Duration::from_millis(25);
const BOX_CHECK_UPGRADING: Duration = Duration::from_millis(1);

/// What the router knows of a connection handed over, besides its pipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionState {
    pub pipe: PipeState,
    pub client: Option<SocketAddr>,
    pub listener: Option<SocketAddr>,
    pub name: Option<String>,
    pub route: String,
    pub backend: SocketAddr,
    /// Since it was accepted, in µs (for its access log duration).
    pub age_us: u64,
}

/// A connection handed over: its state and sockets (client, backend).
pub struct Handed {
    pub state: ConnectionState,
    pub sockets: [OwnedFd; 2],
}

/// The maps of one probe, handed over.
pub struct ProbeExport {
    pub key: u64,
    pub fds: Vec<OwnedFd>,
    pub config: ProbeConfig,
}

/// What one core hands over (old) or takes over (new).
#[derive(Default)]
pub struct CoreExport {
    pub probes: Vec<ProbeExport>,
    pub connections: Vec<Handed>,
    /// Connections the old process finishes itself.
    pub left: u64,
}

/// Between the upgrade thread and one executor.
#[derive(Default)]
pub struct CoreBox {
    /// Old: hand the connections over.
    pub asked: bool,
    /// Old: what the executor handed over.
    pub exported: Option<CoreExport>,
    /// New: what the executor is to take over.
    pub incoming: Option<CoreExport>,
    /// New: the executor took `incoming` over.
    pub adopted: bool,
    /// Old: the upgrade thread stopped waiting for `exported`: the
    /// executor goes on with what it handed over itself, as a new process
    /// would (its pipes stopped already).
    pub abandoned: bool,
}

/// One box per core.
pub struct CoreBoxes {
    boxes: Vec<Mutex<CoreBox>>,
    /// An upgrade is under way (see [`BOX_CHECK_UPGRADING`]).
    upgrading: AtomicBool,
}

/// An upgrade under way, until dropped.
pub struct Upgrading<'a>(&'a CoreBoxes);

impl Drop for Upgrading<'_> {
    fn drop(&mut self) {
        self.0.upgrading.store(false, Relaxed);
    }
}

impl CoreBoxes {
    pub fn new(cores: usize) -> Arc<Self> {
        Arc::new(Self {
            boxes: (0..cores).map(|_| Mutex::default()).collect(),
            upgrading: AtomicBool::new(false),
        })
    }

    pub fn cores(&self) -> usize {
        self.boxes.len()
    }

    pub fn lock(&self, core: usize) -> std::sync::MutexGuard<'_, CoreBox> {
        self.boxes[core].lock().expect("no panic under this lock")
    }

    /// The executors look at their boxes often until the guard drops: the
    /// old process's from the new one's hello, the new process's from its
    /// start until it took the connections over.
    pub fn upgrading(&self) -> Upgrading<'_> {
        self.upgrading.store(true, Relaxed);
        Upgrading(self)
    }

    /// How long a loop that looks for an upgrade's next step sleeps:
    /// `normal`, or [`BOX_CHECK_UPGRADING`] while one is under way.
    pub fn check_every(&self, normal: Duration) -> Duration {
        if self.upgrading.load(Relaxed) {
            BOX_CHECK_UPGRADING
        } else {
            normal
        }
    }

    /// Waits (up to `timeout`) until `done` holds for every core's box.
    pub fn wait(&self, timeout: Duration, done: impl Fn(&CoreBox) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if (0..self.cores()).all(|core| done(&self.lock(core))) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// What an executor keeps for handovers: the connections handed over so
/// far (old), the probes adopted (new, by their own key).
#[derive(Default)]
pub(crate) struct ShardHandover {
    pub(crate) handed: RefCell<Vec<Handed>>,
    pub(crate) adopted: RefCell<HashMap<u64, Rc<ShardProbe>>>,
}

/// A forwarded connection's pipe was handed over: keeps it for the
/// upgrade thread, with what the router knows of it.
pub(crate) fn keep(
    shard: &Shard,
    handed: HandedOver,
    peer: &super::super::connection::Client,
    route: &str,
    backend: SocketAddr,
    age: Duration,
) {
    let HandedOver { sockets, state } = handed;
    shard.handover.handed.borrow_mut().push(Handed {
        state: ConnectionState {
            pipe: state,
            client: peer.addr,
            listener: peer.listener.addr,
            name: peer.name.as_deref().map(str::to_owned),
            route: route.to_owned(),
            backend,
            age_us: age.as_micros() as u64,
        },
        sockets,
    });
}

/// Watches this executor's box for as long as it runs.
pub(crate) async fn watch(shard: Rc<Shard>, boxes: Arc<CoreBoxes>) {
    loop {
        glommio::timer::sleep(boxes.check_every(BOX_CHECK)).await;
        let (asked, incoming) = {
            let mut core_box = boxes.lock(shard.core);
            let asked = std::mem::take(&mut core_box.asked);
            (asked, core_box.incoming.take())
        };
        if asked {
            let export = hand_over(&shard).await;
            let mut core_box = boxes.lock(shard.core);
            if core_box.abandoned {
                drop(core_box);
                warn!(
                    core = shard.core,
                    "upgrade: the hand-over came too late; this process goes on with these \
                     connections"
                );
                take_over(&shard, export);
            } else {
                core_box.exported = Some(export);
            }
        }
        if let Some(incoming) = incoming {
            take_over(&shard, incoming);
            boxes.lock(shard.core).adopted = true;
        }
    }
}

/// Old: hands every pipe over at its next quiet point (waiting up to
/// [`QUIET_BOUND`]), with the maps of the probes they are in.
async fn hand_over(shard: &Shard) -> CoreExport {
    let started = Instant::now();
    handover::ask();
    while handover::pipes_running() > 0 && started.elapsed() < QUIET_BOUND {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    handover::close();
    let connections = std::mem::take(&mut *shard.handover.handed.borrow_mut());
    let mut probes = Vec::new();
    let adopted = shard.handover.adopted.borrow();
    for key in connections
        .iter()
        .filter_map(|c| c.state.pipe.probe)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let probe = match &shard.probe {
            Some(own) if own.key() == key => own,
            _ => match adopted.get(&key) {
                Some(probe) => probe,
                None => {
                    warn!("a handed-over connection names an unknown probe");
                    continue;
                }
            },
        };
        match probe.export() {
            Ok((fds, config)) => probes.push(ProbeExport { key, fds, config }),
            Err(e) => warn!("cannot copy the probe's map descriptors: {e}"),
        }
    }
    let left = shard
        .stats
        .splice
        .active
        .load(std::sync::atomic::Ordering::Relaxed);
    info!(
        core = shard.core,
        connections = connections.len(),
        left,
        took_ms = started.elapsed().as_secs_f64() * 1e3,
        "upgrade: connections handed over"
    );
    CoreExport {
        probes,
        connections,
        left,
    }
}

/// New: adopts the probes and goes on with every connection.
fn take_over(shard: &Rc<Shard>, incoming: CoreExport) {
    let mut by_old_key = HashMap::new();
    for probe in incoming.probes {
        match ShardProbe::adopt(probe.fds, probe.config, Arc::clone(&shard.stats.splice)) {
            Ok(adopted) => {
                let adopted = Rc::new(adopted);
                shard
                    .handover
                    .adopted
                    .borrow_mut()
                    .insert(adopted.key(), Rc::clone(&adopted));
                by_old_key.insert(probe.key, adopted);
            }
            Err(e) => warn!("upgrade: cannot adopt the old probe's maps: {e}"),
        }
    }
    let count = incoming.connections.len();
    for handed in incoming.connections {
        let probe = match handed.state.pipe.probe {
            Some(key) => match by_old_key.get(&key) {
                Some(probe) => Some(Rc::clone(probe)),
                None => {
                    warn!("upgrade: a connection's probe was not adopted: resetting it");
                    for fd in &handed.sockets {
                        let _ = splice::socket::reset_on_close(std::os::fd::AsFd::as_fd(fd));
                    }
                    continue;
                }
            },
            None => None,
        };
        glommio::spawn_local(resume(Rc::clone(shard), probe, handed)).detach();
    }
    debug!(core = shard.core, count, "upgrade: connections taken over");
}

/// New: one connection taken over, until it ends (or is handed over
/// again); counted and logged at its end as any other. Not an `async fn`,
/// as [`crate::connection::serve`]: its arguments would be kept twice.
#[allow(clippy::manual_async_fn)]
fn resume(
    shard: Rc<Shard>,
    probe: Option<Rc<ShardProbe>>,
    handed: Handed,
) -> impl Future<Output = ()> {
    async move {
        let Handed { state, sockets } = handed;
        let stats = &shard.stats;
        let _active = Held::new(&stats.splice.active);
        let _permit = shard.limits.admit_anyway();
        let since = Instant::now();
        let age = Duration::from_micros(state.age_us);
        // The route's, as the connection had it (the running
        // configuration's, if the route is gone).
        let generation = shard.generation();
        let config = &generation.config;
        let idle_timeout = config
            .routes
            .iter()
            .find(|r| r.name == state.route)
            .map_or(config.idle_timeout, |route| config.idle_timeout_of(route));
        drop(generation);
        let watch = shard.idle.watch(
            [sockets[0].as_raw_fd(), sockets[1].as_raw_fd()],
            idle_timeout,
        );
        let pipe = HandedOver {
            sockets,
            state: state.pipe.clone(),
        };
        let shard_ref = &shard;
        let state_ref = &state;
        // A lazy pipe not spliced yet splices, when it gets there, in this
        // executor's own probe; the others go on in the maps they are in.
        let not_spliced_yet = state
            .pipe
            .lazy
            .as_ref()
            .is_some_and(|lazy| lazy.insert == splice::handover::LazyInsert::NotYet);
        let probe = match &probe {
            Some(adopted) => Some(&**adopted),
            None if not_spliced_yet => shard.probe.as_ref(),
            None => None,
        };
        splice::handover::resume(pipe, probe, &shard.readiness, move |outcome| {
            drop(watch);
            end(shard_ref, state_ref, outcome, age + since.elapsed());
        })
        .await;
    }
}

/// A taken-over connection's end: counted and logged, or kept for the next
/// upgrade.
fn end(shard: &Shard, state: &ConnectionState, mut outcome: Outcome, age: Duration) {
    if let Some(handed) = outcome.handed_over.take() {
        let HandedOver {
            sockets,
            state: pipe,
        } = *handed;
        shard.handover.handed.borrow_mut().push(Handed {
            state: ConnectionState {
                pipe,
                age_us: age.as_micros() as u64,
                ..state.clone()
            },
            sockets,
        });
        return;
    }
    let stats = &shard.stats.splice;
    add(&stats.resets, u64::from(outcome.reset));
    add(&stats.userspace_bytes, outcome.read_in_userspace);
    let generation = shard.generation();
    if let Some(index) = generation
        .config
        .routes
        .iter()
        .position(|r| r.name == state.route)
    {
        let counters = &generation.routes[index];
        if let Some(path) = outcome.path {
            add(counters.served(Served::from(path)), 1);
        }
        add(&counters.bytes_to_backend, outcome.to_backend);
        add(&counters.bytes_to_client, outcome.to_client);
    }
    let end = if outcome.reset {
        End::Reset
    } else {
        End::Closed
    };
    shard.access_log.record(
        shard.core,
        generation.config.access_log,
        &Entry {
            client: state.client,
            listener: state.listener,
            route: Some(&state.route),
            name: state.name.as_deref(),
            backend: Some(state.backend),
            path: outcome.path,
            to_backend: outcome.to_backend,
            to_client: outcome.to_client,
            duration: age,
            end,
        },
    );
}
