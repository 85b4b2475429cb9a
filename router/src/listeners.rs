//! The listen addresses. Each is bound once per core (`SO_REUSEPORT`
//! copies), at start or when a reload adds it, and the copies are handed to
//! the executors through an [`Inbox`]; a reload that removes an address
//! shuts it, and its connections go on. The main thread keeps a copy of
//! every socket, to shut them on a removal or a drain.
use std::{
    net::{Shutdown, SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{
            AtomicBool, AtomicUsize,
            Ordering::{Relaxed, SeqCst},
        },
    },
};

use anyhow::Context as _;
use splice::runtime;
use tracing::warn;

use crate::{
    config::{Config, Keepalive},
    limits::{Limits, ListenerLimit},
};

/// What every core's copy of one listen address shares.
#[derive(Debug)]
pub(crate) struct ListenerState {
    /// Its connections start with a PROXY protocol header.
    pub(crate) accept_proxy: AtomicBool,
    /// A reload removed it: the accept loops end.
    pub(crate) closed: AtomicBool,
    pub(crate) limit: Arc<ListenerLimit>,
    /// Accept loops on its copies, counted from when an executor takes a
    /// copy until the loop's last connection has started: once a released
    /// listener has none, every connection this process accepted on it is
    /// counted as active.
    pub(crate) accepting: AtomicUsize,
}

/// One core's copy of a listen address, not yet accepted on.
pub(crate) type NewListener = (TcpListener, Arc<ListenerState>);

/// Listeners bound for the executors and not yet taken, by core.
pub(crate) struct Inbox {
    by_core: Mutex<Vec<Vec<NewListener>>>,
    /// Closed: the executors take nothing yet (a new process taking over
    /// accepts only once every core serves, see [`crate::upgrade`]).
    open: AtomicBool,
}

impl Inbox {
    pub(crate) fn new(cores: usize) -> Arc<Self> {
        Self::with_open(cores, true)
    }

    /// An inbox whose listeners wait until [`Self::open`].
    pub(crate) fn closed(cores: usize) -> Arc<Self> {
        Self::with_open(cores, false)
    }

    fn with_open(cores: usize, open: bool) -> Arc<Self> {
        Arc::new(Self {
            by_core: Mutex::new((0..cores).map(|_| Vec::new()).collect()),
            open: AtomicBool::new(open),
        })
    }

    /// Lets the executors take their listeners (at their next look, within
    /// [`crate::reload::ADOPT_EVERY`]).
    pub(crate) fn open(&self) {
        self.open.store(true, Relaxed);
    }

    /// Waits (up to `timeout`) until every executor took what waits for
    /// it: then each accepts on its copies. False if one did not.
    pub(crate) fn wait_taken(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let taken = self
                .by_core
                .lock()
                .expect("no panic under this lock")
                .iter()
                .all(Vec::is_empty);
            if taken {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The listeners bound for `core` since it last looked.
    pub(crate) fn take(&self, core: usize) -> Vec<NewListener> {
        if !self.open.load(Relaxed) {
            return Vec::new();
        }
        let mut by_core = self.by_core.lock().expect("no panic under this lock");
        std::mem::take(&mut by_core[core])
    }

    fn put(&self, copies: Vec<TcpListener>, state: &Arc<ListenerState>) {
        let mut by_core = self.by_core.lock().expect("no panic under this lock");
        for (core, copy) in copies.into_iter().enumerate() {
            by_core[core].push((copy, Arc::clone(state)));
        }
    }
}

/// One listen address as the main thread keeps it.
struct Bound {
    /// As the configuration has it (port 0: any free port).
    configured: SocketAddr,
    local: SocketAddr,
    /// The main thread's copy of each core's socket.
    copies: Vec<TcpListener>,
    state: Arc<ListenerState>,
}

/// Every listen address in force.
pub struct Listeners {
    bound: Vec<Bound>,
    cores: usize,
    inbox: Arc<Inbox>,
    limits: Arc<Limits>,
}

impl Listeners {
    pub(crate) fn new(cores: usize, inbox: Arc<Inbox>, limits: Arc<Limits>) -> Self {
        Self {
            bound: Vec::new(),
            cores,
            inbox,
            limits,
        }
    }

    /// The bound addresses, in the configuration's order.
    pub(crate) fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound.iter().map(|b| b.local).collect()
    }

    /// Makes the listen addresses those of `config`: binds the added ones
    /// (every one, or none: then nothing changed), sets `accept_proxy` on
    /// the kept ones, and shuts the removed ones. Returns what changed, a
    /// phrase each.
    pub(crate) fn apply(&mut self, config: &Config) -> anyhow::Result<Vec<String>> {
        let accept_proxy = |addr: &SocketAddr| config.accept_proxy.contains(addr);
        let mut added = Vec::new();
        for &addr in &config.listen {
            // Kept, or named twice (the file and --listen).
            if self.bound.iter().any(|b| b.configured == addr)
                || added.iter().any(|(b, _): &(Bound, _)| b.configured == addr)
            {
                continue;
            }
            // Before the SO_REUSEPORT copies, which another router could share.
            crate::exclusive::check_free(addr)?;
            let copies = runtime::bind_reuseport(addr, self.cores).map_err(bind_error)?;
            for copy in &copies {
                // Accepted sockets inherit it.
                crate::idle::set_keepalive(copy, config.tcp_keepalive)
                    .with_context(|| format!("setting TCP keepalive on {addr}"))?;
            }
            let local = copies[0].local_addr()?;
            let state = Arc::new(ListenerState {
                accept_proxy: AtomicBool::new(accept_proxy(&addr)),
                closed: AtomicBool::new(false),
                limit: self.limits.listener(),
                accepting: AtomicUsize::new(0),
            });
            let kept = copies
                .iter()
                .map(TcpListener::try_clone)
                .collect::<Result<_, _>>()?;
            added.push((
                Bound {
                    configured: addr,
                    local,
                    copies: kept,
                    state,
                },
                copies,
            ));
        }
        let mut changes = Vec::new();
        self.bound.retain(|b| {
            if config.listen.contains(&b.configured) {
                return true;
            }
            b.state.closed.store(true, Relaxed);
            shut(&b.copies);
            changes.push(format!(
                "stopped listening on {} (its connections go on)",
                b.local
            ));
            false
        });
        for b in &self.bound {
            let wanted = accept_proxy(&b.configured);
            if b.state.accept_proxy.swap(wanted, Relaxed) != wanted {
                changes.push(format!("accept_proxy {wanted} on {}", b.local));
            }
        }
        for (bound, copies) in added {
            self.inbox.put(copies, &bound.state);
            changes.push(format!("listening on {}", bound.local));
            self.bound.push(bound);
        }
        // The configuration's order, for the addresses reported.
        self.bound
            .sort_by_key(|b| config.listen.iter().position(|&addr| addr == b.configured));
        Ok(changes)
    }

    /// Sets TCP keepalive on every listener (accepted sockets inherit it).
    pub(crate) fn set_keepalive(&self, keepalive: Option<Keepalive>) {
        for copy in self.bound.iter().flat_map(|b| &b.copies) {
            if let Err(e) = crate::idle::set_keepalive(copy, keepalive) {
                warn!("setting TCP keepalive on a listener: {e}");
            }
        }
    }

    /// Takes over listen addresses a running router sent (see
    /// [`crate::upgrade`]): those `config` still names are kept (with its
    /// `accept_proxy` and keepalive), the others are closed (never shut
    /// down: the old router may still accept on them until it released
    /// them). Then binds what `config` adds, as [`Self::apply`] does.
    pub(crate) fn adopt(
        &mut self,
        received: Vec<crate::upgrade::ReceivedListener>,
        config: &Config,
    ) -> anyhow::Result<Vec<String>> {
        for listener in received {
            let addr = listener.configured;
            if !config.listen.contains(&addr) || self.bound.iter().any(|b| b.configured == addr) {
                continue;
            }
            if listener.copies.len() != self.cores {
                anyhow::bail!(
                    "{} came with {} copies for {} cores",
                    listener.local,
                    listener.copies.len(),
                    self.cores
                );
            }
            for copy in &listener.copies {
                // The executors' accept loops expect non-blocking sockets;
                // the flag belongs to the socket, so it is so already.
                copy.set_nonblocking(true)?;
                crate::idle::set_keepalive(copy, config.tcp_keepalive)
                    .with_context(|| format!("setting TCP keepalive on {addr}"))?;
            }
            let state = Arc::new(ListenerState {
                accept_proxy: AtomicBool::new(config.accept_proxy.contains(&addr)),
                closed: AtomicBool::new(false),
                limit: self.limits.listener(),
                accepting: AtomicUsize::new(0),
            });
            let kept = listener
                .copies
                .iter()
                .map(TcpListener::try_clone)
                .collect::<Result<_, _>>()?;
            self.inbox.put(listener.copies, &state);
            self.bound.push(Bound {
                configured: addr,
                local: listener.local,
                copies: kept,
                state,
            });
        }
        self.apply(config)
    }

    /// Copies of every listen address's per-core sockets, to send to a
    /// new process: (configured, local address, copies in core order).
    pub(crate) fn offer(&self) -> std::io::Result<Vec<(SocketAddr, SocketAddr, Vec<TcpListener>)>> {
        self.bound
            .iter()
            .map(|b| {
                let copies = b
                    .copies
                    .iter()
                    .map(TcpListener::try_clone)
                    .collect::<Result<_, _>>()?;
                Ok((b.configured, b.local, copies))
            })
            .collect()
    }

    /// Stops accepting on every listener without shutting it: a new
    /// process accepts on the same sockets (see [`crate::upgrade`]). The
    /// accept loops see `closed` within a millisecond (they look that often
    /// during an upgrade, see [`crate::executor::CLOSED_CHECK`]) and close
    /// their copies.
    pub(crate) fn release_all(&mut self) -> Vec<Arc<ListenerState>> {
        self.bound
            .drain(..)
            .map(|b| {
                b.state.closed.store(true, Relaxed);
                b.state
            })
            .collect()
    }

    /// Shuts every listener (a drain).
    pub(crate) fn shut_all(&mut self) {
        for b in self.bound.drain(..) {
            b.state.closed.store(true, Relaxed);
            shut(&b.copies);
        }
    }
}

/// Waits (at most `bound`) until no accept loop runs on `released`
/// listeners: they notice within a millisecond during an upgrade, and a
/// connection one accepted meanwhile is then counted as active.
pub(crate) fn wait_accept_loops(released: &[Arc<ListenerState>], bound: std::time::Duration) {
    let deadline = std::time::Instant::now() + bound;
    while released.iter().any(|s| s.accepting.load(SeqCst) > 0)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Shuts a listen address's sockets: that takes them out of the kernel's
/// lookup (new SYNs get a reset once every core's copy is shut) and wakes
/// the executors' pending accepts, which then drop their copies.
fn shut(copies: &[TcpListener]) {
    for copy in copies {
        if let Err(e) = socket2::SockRef::from(copy).shutdown(Shutdown::Both) {
            warn!("closing a listener: {e}");
        }
    }
}

/// Why a listen address could not be bound, with the fix when it is a
/// privileged port.
fn bind_error(error: runtime::BindError) -> anyhow::Error {
    match &error {
        runtime::BindError::Other { addr, error: e }
            if e.kind() == std::io::ErrorKind::PermissionDenied && addr.port() < 1024 =>
        {
            anyhow::anyhow!(
                "cannot listen on {addr}: {e}: a port below 1024 needs the \
                 CAP_NET_BIND_SERVICE capability (`setcap cap_net_bind_service=+ep` on the \
                 binary, or AmbientCapabilities=CAP_NET_BIND_SERVICE in a systemd unit, as \
                 packaging/router.service does), or listen on a port from 1024 up"
            )
        }
        _ => error.into(),
    }
}
