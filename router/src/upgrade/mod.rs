//! Upgrading the binary without closing a listener (issue 24).
//!
//! A running router offers its state on a unix socket (`--upgrade-socket
//! PATH`); a new binary started with `--upgrade-from PATH` takes it over:
//!
//! 1. new → old `Hello`: protocol version, cores, the probe's map layout
//!    ([`layout`]). The old one refuses (and keeps serving, saying why) if
//!    any differs, or if it is draining.
//! 2. old → new: every listen address, one `SO_REUSEPORT` copy per core
//!    (`SCM_RIGHTS`), and the metrics listener. Both processes now hold the
//!    same sockets: a connection in an accept queue is taken by exactly one
//!    `accept`, whichever process makes it (the kernel's rule), so nothing is
//!    accepted twice and nothing waiting is lost.
//! 3. The new one starts its executors (and loads its probes) with the
//!    listeners held back; only once every core serves does it accept, then
//!    it sends `Ready`.
//! 4. old: stops accepting (its copies are closed, never shut down: a
//!    `shutdown` would shut the new process's listener, the same socket),
//!    answers `Released`, then each core hands its live connections over
//!    at their next quiet point ([`connections`], `splice::handover`) with
//!    the maps of the probes they are in; the new process's same core
//!    adopts the maps and goes on with each connection. The old process
//!    exits at once if nothing is left; what did not reach a quiet point
//!    within [`connections::QUIET_BOUND`] (connections still being routed
//!    or connected, or draining their end) it finishes within
//!    `drain_timeout`, as a drain does. It sends no FIN/RST on any socket
//!    it handed over.
//!
//! A new binary that fails before `Ready` (refused, crashed, a probe that
//! does not load) has accepted nothing; the old one keeps accepting
//! throughout and logs why the upgrade failed.
pub mod connections;
pub mod socket;
pub mod wire;

use std::{
    io,
    net::{SocketAddr, TcpListener},
    os::{
        fd::AsRawFd as _,
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{listeners::Listeners, telemetry::counters::Lifecycle};

use self::connections::{ConnectionState, CoreBoxes, CoreExport, Handed, ProbeExport};

/// Version of the messages below; a new binary speaking another is refused.
pub const PROTOCOL: u32 = 1;

/// How long the old process waits for the new one to be ready: starting
/// the executors and loading a probe per core takes about a second.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the new process waits for each answer of the old one.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Fault injection for the tests, in the new process: `ROUTER_UPGRADE_FAULT=
/// before-ready` aborts it once its executors serve, before it accepts
/// (the old one must keep serving).
pub const FAULT_VARIABLE: &str = "ROUTER_UPGRADE_FAULT";

#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// New → old: who asks.
    Hello {
        protocol: u32,
        pid: u32,
        cores: usize,
        layout: u64,
    },
    /// Old → new: no upgrade, and why.
    Refused { reason: String },
    /// Old → new: `listeners` [`Message::Listener`] messages follow, then a
    /// [`Message::Metrics`] if `metrics`.
    Offer { listeners: usize, metrics: bool },
    /// One listen address; its per-core copies travel with it, in core
    /// order.
    Listener {
        configured: SocketAddr,
        local: SocketAddr,
    },
    /// The metrics listener, with its descriptor.
    Metrics { configured: SocketAddr },
    /// New → old: every core serves; stop accepting.
    Ready,
    /// Old → new: stopped accepting; `connections` are open.
    Released { connections: u64 },
    /// Old → new: the connections of `cores` cores follow, each core's as a
    /// [`Message::Core`] (with its probes' map descriptors, six each) and
    /// [`Message::Batch`]es.
    Connections { cores: usize },
    Core {
        core: usize,
        probes: Vec<ProbeInfo>,
        connections: usize,
        /// Connections the old process finishes itself.
        left: u64,
    },
    /// Up to [`BATCH`] connections, two descriptors each (client, backend),
    /// carrying up to about [`BATCH_PENDING`] bytes (see [`batches`]).
    Batch { states: Vec<ConnectionState> },
    /// New → old: every connection goes on here.
    Taken,
}

/// One probe's maps, handed over (their descriptors travel with the
/// [`Message::Core`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct ProbeInfo {
    pub key: u64,
    pub capacity: u32,
    pub in_flight_limit: u64,
}

/// Connections per [`Message::Batch`]: two descriptors each, within
/// [`wire::MAX_FDS`].
pub const BATCH: usize = wire::MAX_FDS / 2;
/// Bytes read and not yet written that one [`Message::Batch`] carries, about:
/// a connection holds up to one buffer (256 KiB) a direction, and JSON takes
/// up to four characters a byte, so a full batch of busy connections would
/// pass the receiver's [`wire::MAX_MESSAGE`].
const BATCH_PENDING: usize = 8 << 20;

/// `connections` in batches of at most [`BATCH`] connections and, past the
/// first connection of each, at most [`BATCH_PENDING`] pending bytes.
fn batches(connections: &[Handed]) -> Vec<&[Handed]> {
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, connection) in connections.iter().enumerate() {
        let pending: usize = connection
            .state
            .pipe
            .legs
            .iter()
            .map(|l| l.pending.len())
            .sum();
        if i > start && (i - start == BATCH || bytes + pending > BATCH_PENDING) {
            batches.push(&connections[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += pending;
    }
    if start < connections.len() {
        batches.push(&connections[start..]);
    }
    batches
}

/// The probe's map layout as this binary has it: the types and names both
/// sides of the probe share, and this protocol's version. Two binaries
/// with the same layout can hand over kernel state; the value is stable
/// across builds (FNV-1a, not the randomised std hasher).
pub fn layout() -> u64 {
    use splice_common::*;
    let mut hash = Fnv::default();
    hash.add(&PROTOCOL.to_le_bytes());
    for name in [
        HELD_MAP,
        SPLICED_MAP,
        ROUTES_MAP,
        STREAMS_MAP,
        CONTROL_MAP,
        COUNTERS_MAP,
    ] {
        hash.add(name.as_bytes());
        hash.add(&[0]);
    }
    for size in [
        size_of::<Route>(),
        size_of::<Stream>(),
        size_of::<Control>(),
        size_of::<SocketCookie>(),
        Counter::COUNT as usize,
        stream_flags::TO_USERSPACE as usize,
        stream_flags::BROKEN as usize,
    ] {
        hash.add(&(size as u64).to_le_bytes());
    }
    hash.0
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// What the running router needs to offer itself.
pub struct Offering {
    pub cores: usize,
    pub listeners: Arc<Mutex<Listeners>>,
    /// The metrics listener (a copy of the endpoint's), and its address as
    /// configured.
    pub metrics: Option<(SocketAddr, TcpListener)>,
    /// `handed_over` is set once the listeners went to a new process: the
    /// main thread then finishes the connections and exits.
    pub lifecycle: Arc<Lifecycle>,
    /// Connections open now, over every core.
    pub active: Box<dyn Fn() -> u64 + Send>,
    /// Where each core hands its connections over.
    pub boxes: Arc<CoreBoxes>,
}

/// Serves upgrade requests on `listener` from a thread of its own
/// (`router-upgrade`), one at a time, until one succeeds; then wakes the
/// main thread (SIGTERM to itself, with `handed_over` set).
pub fn offer(listener: UnixListener, offering: Offering) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("router-upgrade".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        warn!("upgrade socket: accept failed: {e}");
                        thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match hand_over(&stream, &offering) {
                    Ok(Some(pid)) => {
                        // The main thread waits for signals: this one
                        // tells it to finish (it sees `handed_over`).
                        // SAFETY: kill has no memory effects.
                        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                        info!("upgrade: process {pid} took over the listeners");
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => warn!(
                        "upgrade failed: {e:#}; this router keeps serving as before \
                         (fix the new binary or its flags, then start it again)"
                    ),
                }
            }
        })
}

/// One upgrade request: `Some(pid)` once the new process took over, `None`
/// when it was refused (logged).
fn hand_over(stream: &UnixStream, offering: &Offering) -> anyhow::Result<Option<u32>> {
    socket::check_peer(stream)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let hello = match wire::receive::<Message>(stream) {
        Ok((hello, _)) => hello,
        // A router looking whether this path is taken (`socket::bind`)
        // connects and closes: not an upgrade.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!("upgrade socket: a peer closed without a hello");
            return Ok(None);
        }
        Err(e) => return Err(anyhow::Error::new(e).context("reading the new process's hello")),
    };
    let Message::Hello {
        protocol,
        pid,
        cores,
        layout: theirs,
    } = hello
    else {
        bail!("the new process did not start with a hello: {hello:?}");
    };
    let refusal = if protocol != PROTOCOL {
        Some(format!(
            "it speaks upgrade protocol {protocol}, this router {PROTOCOL}: stop this router \
             and start the new one instead"
        ))
    } else if theirs != layout() {
        Some(format!(
            "its probe's map layout differs ({theirs:#x}, here {:#x}): its kernel state \
             cannot be handed over; stop this router and start the new one instead",
            layout()
        ))
    } else if cores != offering.cores {
        Some(format!(
            "it runs {cores} cores and this router {}: each core's listener goes to the same \
             core; start it with --cores {}",
            offering.cores, offering.cores
        ))
    } else if offering.lifecycle.draining.load(Relaxed) {
        Some("this router is draining (it was told to stop)".to_owned())
    } else {
        None
    };
    if let Some(reason) = refusal {
        warn!("upgrade refused to process {pid}: {reason}; this router keeps serving");
        wire::send(stream, &Message::Refused { reason }, &[])?;
        return Ok(None);
    }
    info!("upgrade: handing the listeners over to process {pid}");
    let _upgrading = offering.boxes.upgrading();
    // Under the lock until released: a reload in between would change the
    // listeners offered (a SIGHUP meanwhile waits, READY_TIMEOUT at most).
    let mut listeners = offering.listeners.lock().expect("no panic under this lock");
    let offered = listeners.offer()?;
    wire::send(
        stream,
        &Message::Offer {
            listeners: offered.len(),
            metrics: offering.metrics.is_some(),
        },
        &[],
    )?;
    for (configured, local, copies) in &offered {
        let fds: Vec<_> = copies.iter().map(|c| c.as_raw_fd()).collect();
        wire::send(
            stream,
            &Message::Listener {
                configured: *configured,
                local: *local,
            },
            &fds,
        )?;
    }
    if let Some((configured, listener)) = &offering.metrics {
        wire::send(
            stream,
            &Message::Metrics {
                configured: *configured,
            },
            &[listener.as_raw_fd()],
        )?;
    }
    drop(offered);
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    match wire::receive::<Message>(stream) {
        Ok((Message::Ready, _)) => {}
        Ok((other, _)) => bail!("process {pid} sent {other:?} instead of ready"),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "process {pid} did not report ready within {} (it failed or crashed)",
                humantime::format_duration(READY_TIMEOUT)
            )));
        }
    }
    // From here on the new process accepts: this one stops, once its
    // accept loops noticed (what they accepted meanwhile is then counted,
    // and handed over or finished here, not cut by an early exit).
    let released = listeners.release_all();
    drop(listeners);
    crate::listeners::wait_accept_loops(&released, Duration::from_secs(2));
    offering.lifecycle.handed_over.store(true, Relaxed);
    let connections = (offering.active)();
    // Not accepting any more: whatever fails from here, this process
    // finishes what it has and exits (the new one accepts).
    if let Err(e) = wire::send(stream, &Message::Released { connections }, &[])
        .map_err(anyhow::Error::from)
        .and_then(|()| send_connections(stream, offering, pid))
    {
        warn!(
            "upgrade: process {pid} took the listeners, then: {e:#}; the connections not \
             handed over finish here"
        );
    }
    Ok(Some(pid))
}

/// Old: has every core hand its connections over, and sends them.
fn send_connections(stream: &UnixStream, offering: &Offering, pid: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    let boxes = &offering.boxes;
    for core in 0..offering.cores {
        boxes.lock(core).asked = true;
    }
    // Each core stops waiting for quiet pipes after QUIET_BOUND; a core
    // starved of CPU may take longer: a core past this bound keeps its
    // connections (it resumes what it stopped, see `connections::watch`).
    boxes.wait(connections::QUIET_BOUND * 10, |b| b.exported.is_some());
    let exports: Vec<CoreExport> = (0..offering.cores)
        .map(|core| {
            let mut core_box = boxes.lock(core);
            core_box.exported.take().unwrap_or_else(|| {
                warn!(
                    core,
                    "upgrade: this core did not hand its connections over in time: it finishes them"
                );
                core_box.abandoned = true;
                CoreExport::default()
            })
        })
        .collect();
    let collected = started.elapsed();
    wire::send(
        stream,
        &Message::Connections {
            cores: offering.cores,
        },
        &[],
    )?;
    let (mut handed, mut left) = (0, 0);
    for (core, export) in exports.into_iter().enumerate() {
        let fds: Vec<_> = export
            .probes
            .iter()
            .flat_map(|p| p.fds.iter().map(|fd| fd.as_raw_fd()))
            .collect();
        wire::send(
            stream,
            &Message::Core {
                core,
                probes: export
                    .probes
                    .iter()
                    .map(|p| ProbeInfo {
                        key: p.key,
                        capacity: p.config.capacity,
                        in_flight_limit: p.config.in_flight_limit,
                    })
                    .collect(),
                connections: export.connections.len(),
                left: export.left,
            },
            &fds,
        )?;
        for batch in batches(&export.connections) {
            let fds: Vec<_> = batch
                .iter()
                .flat_map(|c| c.sockets.iter().map(|fd| fd.as_raw_fd()))
                .collect();
            wire::send(
                stream,
                &Message::Batch {
                    states: batch.iter().map(|c| c.state.clone()).collect(),
                },
                &fds,
            )?;
        }
        handed += export.connections.len();
        left += export.left;
    }
    match wire::receive::<Message>(stream) {
        Ok((Message::Taken, _)) => {}
        Ok((other, _)) => warn!("upgrade: process {pid} answered {other:?} to the connections"),
        Err(e) => warn!("upgrade: process {pid} did not confirm the connections: {e}"),
    }
    info!(
        handed,
        left,
        collect_ms = collected.as_secs_f64() * 1e3,
        total_ms = started.elapsed().as_secs_f64() * 1e3,
        "upgrade: {handed} connection(s) handed over to process {pid}; {left} finish here"
    );
    Ok(())
}

/// What a new process received from the old one.
pub struct Received {
    /// The upgrade connection, to report ready on.
    stream: UnixStream,
    pub listeners: Vec<ReceivedListener>,
    pub metrics: Option<(SocketAddr, TcpListener)>,
    pub old_pid: Option<u32>,
}

/// One listen address taken over: its per-core copies.
pub struct ReceivedListener {
    pub configured: SocketAddr,
    pub local: SocketAddr,
    pub copies: Vec<TcpListener>,
}

/// Connects to the running router at `path` and takes its listeners: the
/// new process's first step. Fails (the old one keeps serving) if it is
/// refused. `None` when no router offers itself there (nothing at `path`,
/// or a file nothing listens on, left by a router that was killed): a
/// first start, as a systemd template's first instance makes, binds its
/// listeners itself.
pub fn take_over(path: &Path, cores: usize) -> anyhow::Result<Option<Received>> {
    let stream = match UnixStream::connect(path) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            info!(
                path = %path.display(),
                "--upgrade-from: no router offers itself there ({e}): starting afresh"
            );
            return Ok(None);
        }
        connected => connected,
    };
    let stream = stream.with_context(|| {
        format!(
            "cannot reach the running router on its upgrade socket {}: is it running with \
             --upgrade-socket {} (the default is {})?",
            path.display(),
            path.display(),
            socket::DEFAULT_PATH
        )
    })?;
    let old_pid = socket::peer_pid(&stream);
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    wire::send(
        &stream,
        &Message::Hello {
            protocol: PROTOCOL,
            pid: std::process::id(),
            cores,
            layout: layout(),
        },
        &[],
    )?;
    let (listeners, metrics) = match wire::receive::<Message>(&stream)?.0 {
        Message::Offer { listeners, metrics } => (listeners, metrics),
        Message::Refused { reason } => {
            bail!("the running router refused the upgrade: {reason}")
        }
        other => bail!("the running router answered {other:?} to the hello"),
    };
    let mut received = Received {
        stream,
        listeners: Vec::with_capacity(listeners),
        metrics: None,
        old_pid,
    };
    for _ in 0..listeners {
        let (message, fds) = wire::receive::<Message>(&received.stream)?;
        let Message::Listener { configured, local } = message else {
            bail!("the running router sent {message:?} instead of a listener");
        };
        if fds.len() != cores {
            bail!(
                "the running router sent {} copies of {local}, not {cores}",
                fds.len()
            );
        }
        received.listeners.push(ReceivedListener {
            configured,
            local,
            copies: fds.into_iter().map(TcpListener::from).collect(),
        });
    }
    if metrics {
        let (message, mut fds) = wire::receive::<Message>(&received.stream)?;
        let (Message::Metrics { configured }, Some(fd)) = (message, fds.pop()) else {
            bail!("the running router's metrics listener did not come");
        };
        received.metrics = Some((configured, TcpListener::from(fd)));
    }
    Ok(Some(received))
}

impl Received {
    /// Tells the old process every core serves, and waits until it stopped
    /// accepting: returns how many connections it had open then (its
    /// connections follow: [`Self::take_connections`]).
    pub fn ready(&self) -> anyhow::Result<u64> {
        wire::send(&self.stream, &Message::Ready, &[])?;
        match wire::receive::<Message>(&self.stream)
            .context("waiting for the old router to stop accepting")?
            .0
        {
            Message::Released { connections } => Ok(connections),
            other => bail!("the old router answered {other:?} to ready"),
        }
    }

    /// Takes the old router's connections over: each core's go to this
    /// process's executor of the same core (`boxes`); returns how many were
    /// taken and how many the old one finishes.
    pub fn take_connections(&self, boxes: &CoreBoxes) -> anyhow::Result<(usize, u64)> {
        let cores = match wire::receive::<Message>(&self.stream)?.0 {
            Message::Connections { cores } => cores,
            other => bail!("the old router sent {other:?} instead of its connections"),
        };
        let (mut taken, mut left_total) = (0, 0);
        for _ in 0..cores {
            let (message, mut fds) = wire::receive::<Message>(&self.stream)?;
            let Message::Core {
                core,
                probes,
                connections,
                left,
            } = message
            else {
                bail!("the old router sent {message:?} instead of a core");
            };
            if core >= boxes.cores() || fds.len() != probes.len() * 6 {
                bail!(
                    "the old router sent core {core} with {} map descriptors",
                    fds.len()
                );
            }
            let mut export = CoreExport {
                left,
                ..CoreExport::default()
            };
            for info in probes.into_iter().rev() {
                let at = fds.len() - 6;
                export.probes.push(ProbeExport {
                    key: info.key,
                    fds: fds.split_off(at),
                    config: splice::ProbeConfig {
                        capacity: info.capacity,
                        in_flight_limit: info.in_flight_limit,
                        // Adopted maps splice no new connection.
                        splice_after: 0,
                    },
                });
            }
            while export.connections.len() < connections {
                let (message, fds) = wire::receive::<Message>(&self.stream)?;
                let Message::Batch { states } = message else {
                    bail!("the old router sent {message:?} instead of connections");
                };
                if fds.len() != states.len() * 2 {
                    bail!(
                        "a batch of {} connections came with {} descriptors",
                        states.len(),
                        fds.len()
                    );
                }
                let mut fds = fds.into_iter();
                for state in states {
                    let (Some(client), Some(backend)) = (fds.next(), fds.next()) else {
                        unreachable!("counted above");
                    };
                    export.connections.push(Handed {
                        state,
                        sockets: [client, backend],
                    });
                }
            }
            taken += export.connections.len();
            left_total += left;
            let mut core_box = boxes.lock(core);
            core_box.adopted = false;
            core_box.incoming = Some(export);
        }
        // Each executor goes on with its connections before the old router
        // exits (it would not lose them, but they wait meanwhile).
        if !boxes.wait(Duration::from_secs(10), |b| {
            b.incoming.is_none() && b.adopted
        }) {
            warn!("upgrade: an executor did not take its connections over within 10 s");
        }
        wire::send(&self.stream, &Message::Taken, &[])?;
        Ok((taken, left_total))
    }
}

/// Whether the tests asked this process to fail at `point`.
pub fn fault(point: &str) -> bool {
    std::env::var(FAULT_VARIABLE).is_ok_and(|value| value == point)
}

/// The upgrade socket this process offers itself on.
#[derive(Debug, Clone)]
pub struct SocketOption {
    pub path: PathBuf,
    /// Given on the command line: failing to bind it fails the start.
    pub explicit: bool,
}

#[cfg(test)]
mod tests {
    use splice::handover::{LegState, PipeState};

    use super::*;

    /// A copied connection holding `pending` unwritten bytes each way.
    fn busy(pending: usize) -> Handed {
        let leg = LegState {
            read: pending as u64,
            read_before_splice: 0,
            switchable: false,
            written: 0,
            baselines: None,
            destination_half_closed: false,
            redirected_taken: 0,
            done: false,
            pending: vec![255; pending],
        };
        let null = || std::fs::File::open("/dev/null").unwrap().into();
        Handed {
            state: ConnectionState {
                pipe: PipeState {
                    path: 2,
                    probe: None,
                    entries: Vec::new(),
                    legs: [leg.clone(), leg],
                    lazy: None,
                },
                client: None,
                listener: None,
                name: None,
                route: "default".into(),
                backend: "127.0.0.1:1".parse().unwrap(),
                age_us: 0,
            },
            sockets: [null(), null()],
        }
    }

    #[test]
    fn batches_of_busy_connections_stay_under_the_receivers_message_limit() {
        // Every connection holds a full buffer each way: as one batch of
        // BATCH they would take 125 x 512 KiB x ~4 characters of JSON.
        let connections: Vec<_> = (0..BATCH + 3).map(|_| busy(256 * 1024)).collect();
        let split = batches(&connections);
        assert!(split.len() > 2, "{} batches", split.len());
        assert_eq!(
            split.iter().map(|b| b.len()).sum::<usize>(),
            connections.len()
        );
        // Each batch as full as the first, whose JSON is measured.
        assert!(split.iter().all(|b| b.len() <= split[0].len()));
        let message = Message::Batch {
            states: split[0].iter().map(|c| c.state.clone()).collect(),
        };
        let json = serde_json::to_vec(&message).unwrap();
        assert!(json.len() < wire::MAX_MESSAGE, "{} bytes", json.len());
        // Idle connections still go BATCH at a time (their descriptors).
        let idle: Vec<_> = (0..BATCH + 3).map(|_| busy(0)).collect();
        let sizes: Vec<_> = batches(&idle).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [BATCH, 3]);
    }
}
