//! Thread-per-core plumbing shared by the binaries: one SO_REUSEPORT listener
//! per core bound up front (so that errors such as "address in use" come out
//! before anything starts), one glommio executor pinned per core, and the
//! main thread waiting for signals.
use std::{
    future::Future,
    io,
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use glommio::{CpuSet, LocalExecutorPoolBuilder, PoolPlacement, PoolThreadHandles};
use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

/// Memory glommio registers with io_uring per executor. The binaries do no
/// file I/O, so keep it small: the memlock limit here is 8 MiB.
const IO_MEMORY: usize = 512 * 1024;
/// Pending connections per listener.
const BACKLOG: i32 = 4096;

/// Why listeners could not be bound.
#[derive(Debug, Error)]
pub enum BindError {
    #[error("cannot listen on {addr}: address already in use (another process is listening there)")]
    InUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {error}")]
    Other { addr: SocketAddr, error: io::Error },
}

/// Number of online CPUs.
pub fn online_cores() -> usize {
    CpuSet::online().map(|set| set.len()).unwrap_or(1).max(1)
}

/// Binds `copies` listeners to `addr` with SO_REUSEPORT, so that the kernel
/// spreads connections over them. Port 0 picks a free port for the first one
/// and binds the others to the same port.
pub fn bind_reuseport(addr: SocketAddr, copies: usize) -> Result<Vec<TcpListener>, BindError> {
    let mut listeners: Vec<TcpListener> = Vec::with_capacity(copies);
    let mut bound = addr;
    for _ in 0..copies {
        let listener = bind_one(bound).map_err(|error| match error.raw_os_error() {
            Some(libc::EADDRINUSE) => BindError::InUse { addr },
            _ => BindError::Other { addr, error },
        })?;
        if bound.port() == 0 {
            bound = listener
                .local_addr()
                .map_err(|error| BindError::Other { addr, error })?;
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit it: proxies forward small writes as they
    // come, and no call per connection is needed.
    socket.set_nodelay(true)?;
    // Urgent (MSG_OOB) bytes stay in the stream, as the kernel's redirect
    // forwards them, so both modes pass every byte on (accepted sockets
    // inherit it too).
    socket.set_out_of_band_inline(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Raises the soft limit on open files to the hard limit: every connection
/// holds two descriptors on a router. Returns the soft limit in force.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is valid for writes; setrlimit reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// How an executor tells the main thread that it is ready (with what it
/// set up, e.g. a view on the probe it loaded), or why it is not.
pub struct Ready<R> {
    sender: mpsc::Sender<Result<R, String>>,
}

impl<R> Ready<R> {
    pub fn report(self, result: Result<R, String>) {
        // The main thread only stops listening once every shard reported.
        let _ = self.sender.send(result);
    }
}

/// Starts one executor per item of `shards`, each pinned to its own core,
/// and runs `body(item, ready)` on it. Returns once every executor reported
/// through its [`Ready`], with what they reported, or the first error.
/// Blocks the signals [`wait_for_signal`] waits for first, so that only the
/// main thread receives them.
pub fn spawn_shards<S, R, G, F>(
    shards: Vec<S>,
    body: G,
) -> io::Result<(PoolThreadHandles<()>, Vec<R>)>
where
    S: Send + 'static,
    R: Send + 'static,
    G: FnOnce(S, Ready<R>) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + 'static,
{
    block_signals()?;
    let count = shards.len();
    let shards = Arc::new(Mutex::new(shards));
    let (sender, reports) = mpsc::channel::<Result<R, String>>();
    let handles =
        LocalExecutorPoolBuilder::new(PoolPlacement::MaxSpread(count, CpuSet::online().ok()))
            .name("shard")
            .io_memory(IO_MEMORY)
            .on_all_shards(move || {
                let shard = shards
                    .lock()
                    .expect("no shard panics while holding the lock")
                    .pop()
                    .expect("one item per shard");
                body(shard, Ready { sender })
            })
            .map_err(|e| io::Error::other(format!("starting the executors: {e}")))?;
    let mut ready = Vec::with_capacity(count);
    for _ in 0..count {
        match reports.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(value)) => ready.push(value),
            Ok(Err(message)) => return Err(io::Error::other(message)),
            Err(_) => return Err(io::Error::other("an executor failed to start within 60 s")),
        }
    }
    Ok((handles, ready))
}

/// Signals the main thread handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT or SIGTERM: stop.
    Stop,
    /// SIGUSR1: print statistics now.
    Report,
    /// SIGHUP: reload the configuration.
    Reload,
    /// SIGUSR2: reopen the log files (after logrotate moved them).
    Reopen,
}

fn handled_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only adds to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGHUP,
        ] {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks the signals [`wait_for_signal`] waits for in the calling thread
/// and the threads it starts afterwards (they inherit the mask): call it
/// before starting any thread, so that none of them takes the signal (whose
/// default action would end the process).
pub fn block_signals() -> io::Result<()> {
    let set = handled_signals();
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Waits up to `timeout` for one of the handled signals (which
/// [`spawn_shards`] blocked). `None` when the time ran out.
pub fn wait_for_signal(timeout: Duration) -> Option<Signal> {
    let set = handled_signals();
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set` and `timeout` are initialised; no siginfo is wanted.
    let signal = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
    match signal {
        libc::SIGINT | libc::SIGTERM => Some(Signal::Stop),
        libc::SIGUSR1 => Some(Signal::Report),
        libc::SIGHUP => Some(Signal::Reload),
        libc::SIGUSR2 => Some(Signal::Reopen),
        _ => None,
    }
}
