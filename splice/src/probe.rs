//! One loaded copy of a probe: its maps, its free slots, and the [`Splice`]
//! guard of the sockets a connection put into it.
//!
//! Each executor (core) loads its own copy, so nothing here is shared between
//! threads: the probe lives in an `Rc<RefCell<_>>` on its executor.
use std::{
    cell::{Cell, RefCell},
    io,
    os::fd::BorrowedFd,
    rc::Rc,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, MapType, SockMap},
    programs::{ProgramError, ProgramType, SkSkb},
};
use thiserror::Error;

use super::{
    capabilities::{self, MissingCapabilities},
    credit,
    credit::SEND_BUFFER_LIMITS,
    delivery::Delivery,
    kernel_view::KernelView,
    socket,
    spliced_read::Waiting,
    streams::MappedArray,
    watches::Watches,
};
use splice_common::{
    CONTROL_MAP, COUNTERS_MAP, Control, HELD_MAP, ROUTES_MAP, Route, SPLICED_MAP, STREAMS_MAP,
    SocketCookie, Stream, stream_flags,
};

/// Why a probe could not be loaded and attached.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error(transparent)]
    MissingCapabilities(#[from] MissingCapabilities),
    #[error(
        "the kernel lacks {0} (needs CONFIG_BPF_SYSCALL, CONFIG_BPF_STREAM_PARSER and \
         CONFIG_NET_SOCK_MSG); use --mode copy on this kernel"
    )]
    KernelLacksSockmap(&'static str),
    #[error(
        "the kernel verifier rejected probe program `{program}` ({io_error}); verifier log:\n{verifier_log}"
    )]
    Rejected {
        program: String,
        io_error: io::Error,
        verifier_log: String,
    },
    #[error(
        "permission denied while {doing}: {io_error} (needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
    )]
    PermissionDenied { doing: String, io_error: io::Error },
    #[error("loading the probe failed while {doing}: {detail}")]
    Other { doing: String, detail: String },
}

impl LoadError {
    fn while_doing(doing: &str, error: impl std::error::Error + 'static) -> Self {
        if let Some(io_error) = find_io_error(&error)
            && io_error.raw_os_error() == Some(libc::EPERM)
        {
            return Self::PermissionDenied {
                doing: doing.to_owned(),
                io_error: io::Error::from_raw_os_error(libc::EPERM),
            };
        }
        Self::Other {
            doing: doing.to_owned(),
            detail: error_chain(&error),
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn find_io_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io_error) = e.downcast_ref::<io::Error>() {
            return Some(io_error);
        }
        current = e.source();
    }
    None
}

/// Why sockets could not be spliced; the connection is then served by
/// userspace alone, which loses nothing.
#[derive(Debug, Error)]
pub enum InsertError {
    #[error("the SockMap is full ({capacity} slots in use)")]
    Full { capacity: u32 },
    /// The socket left ESTABLISHED (e.g. its peer's FIN arrived) before the
    /// insert: the kernel refuses such sockets (EOPNOTSUPP).
    #[error("socket is no longer established (the kernel refuses to insert it)")]
    NotEstablished,
    #[error("SockMap/route update failed: {0}")]
    Kernel(io::Error),
}

/// How a probe is sized and paced.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    /// Sockets per probe (slots in each SockMap).
    pub capacity: u32,
    /// Most bytes of one direction the kernel may hold for a destination
    /// that has not taken them yet: the ceiling of the window the flow
    /// control keeps ahead of the destination (see [`splice_common`] and
    /// [`flow`]; each direction starts at [`credit::INITIAL_WINDOW`] or this,
    /// whichever is smaller).
    pub in_flight_limit: u64,
}

/// A probe loaded and attached, with the slots it has free.
pub struct Probe {
    // Keeps the program and its attachment alive.
    _ebpf: Ebpf,
    held: SockMap<MapData>,
    spliced: SockMap<MapData>,
    routes: HashMap<MapData, SocketCookie, Route>,
    // Keep the maps behind `streams` and `control` open.
    _streams_map: Array<MapData, Stream>,
    _control_map: Array<MapData, Control>,
    streams: MappedArray<Stream>,
    control: MappedArray<Control>,
    pub(super) watches: Watches,
    pub(super) view: KernelView,
    free_slots: Vec<u32>,
    /// Per slot: the credit the flow control keeps ahead of its destination.
    windows: Vec<Cell<u64>>,
    config: ProbeConfig,
    receive_buffer_max: u64,
    /// The probe's count of bytes passed up, at the previous flow-control
    /// scan.
    pub(super) passed_total: u64,
}

impl Probe {
    /// Loads `object`, sizes its maps for `config.capacity` sockets, and
    /// attaches every sk_skb program of the object (its stream verdict) to
    /// the `SPLICED` SockMap.
    pub fn load(object: &[u8], config: ProbeConfig) -> Result<Self, LoadError> {
        capabilities::check()?;
        check_kernel_support()?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(HELD_MAP, config.capacity)
            .map_max_entries(SPLICED_MAP, config.capacity)
            .map_max_entries(ROUTES_MAP, config.capacity)
            .map_max_entries(STREAMS_MAP, config.capacity)
            .map_max_entries(CONTROL_MAP, config.capacity)
            .load(object)
            .map_err(load_error)?;
        let held: SockMap<MapData> = take_map(&mut ebpf, HELD_MAP)?;
        let spliced: SockMap<MapData> = take_map(&mut ebpf, SPLICED_MAP)?;
        let routes: HashMap<MapData, SocketCookie, Route> = take_map(&mut ebpf, ROUTES_MAP)?;
        let streams_map: Array<MapData, Stream> = take_map(&mut ebpf, STREAMS_MAP)?;
        let control_map: Array<MapData, Control> = take_map(&mut ebpf, CONTROL_MAP)?;
        let streams = map_array(&streams_map, config.capacity)?;
        let control = map_array(&control_map, config.capacity)?;
        let view = KernelView::new(
            &routes,
            ebpf.map(COUNTERS_MAP)
                .ok_or_else(|| missing("map", COUNTERS_MAP))?,
        )
        .map_err(|e| LoadError::while_doing("opening the counters", e))?;
        let programs: Vec<String> = ebpf
            .programs()
            .filter(|(_, p)| p.prog_type() == ProgramType::SkSkb)
            .map(|(name, _)| name.to_owned())
            .collect();
        if programs.is_empty() {
            return Err(missing("program", "sk_skb"));
        }
        for name in programs {
            attach(&mut ebpf, &name, &spliced)?;
        }
        Ok(Self {
            _ebpf: ebpf,
            held,
            spliced,
            routes,
            _streams_map: streams_map,
            _control_map: control_map,
            streams,
            control,
            watches: Watches::default(),
            view,
            // Popped from the end: slot 0 is used first.
            free_slots: (0..config.capacity).rev().collect(),
            windows: (0..config.capacity).map(|_| Cell::new(0)).collect(),
            receive_buffer_max: socket::receive_buffer_max(),
            passed_total: 0,
            config,
        })
    }

    /// A handle on this probe's maps that other threads may read.
    pub fn kernel_view(&self) -> io::Result<KernelView> {
        self.view.try_clone()
    }

    /// Slots not held by any connection.
    pub fn free_slots(&self) -> usize {
        self.free_slots.len()
    }

    /// Slots in all.
    pub fn capacity(&self) -> u32 {
        self.config.capacity
    }

    /// See [`ProbeConfig::in_flight_limit`].
    pub fn in_flight_limit(&self) -> u64 {
        self.config.in_flight_limit
    }

    /// The largest receive buffer TCP gives a socket (see [`flow`]).
    pub(super) fn receive_buffer_max(&self) -> u64 {
        self.receive_buffer_max
    }

    /// The window of the socket in `slot`, and setting it.
    pub(super) fn window(&self, slot: u32) -> u64 {
        self.windows[slot as usize].get()
    }

    pub(super) fn set_window(&self, slot: u32, window: u64) {
        self.windows[slot as usize].set(window);
    }

    /// The stream of the socket in `slot` (no system call).
    pub(super) fn stream(&self, slot: u32) -> Stream {
        self.streams.get(slot)
    }

    /// The control of the socket in `slot`, and setting it (no system call).
    pub(super) fn control(&self, slot: u32) -> Control {
        self.control.get(slot)
    }

    pub(super) fn set_control(&self, slot: u32, control: Control) {
        self.control.set(slot, control);
    }
}

fn missing(what: &str, name: &str) -> LoadError {
    LoadError::Other {
        doing: format!("looking up {what} `{name}`"),
        detail: "not in the probe object".to_owned(),
    }
}

/// Loads of a program interrupted by a pending signal (EAGAIN) before
/// giving up.
const LOAD_ATTEMPTS: u32 = 10;

fn attach(ebpf: &mut Ebpf, name: &str, map: &SockMap<MapData>) -> Result<(), LoadError> {
    let program: &mut SkSkb = ebpf
        .program_mut(name)
        .ok_or_else(|| missing("program", name))?
        .try_into()
        .map_err(|e| LoadError::while_doing(&format!("opening program `{name}`"), e))?;
    // The verifier gives up with EAGAIN when the loading thread has a
    // signal pending, and io_uring's task-work notification counts as one:
    // an executor's own ring can interrupt its load (seen once in a
    // benchmark run: core 1's probe refused with EAGAIN). libbpf retries
    // likewise.
    let mut attempts_left = LOAD_ATTEMPTS;
    loop {
        attempts_left -= 1;
        match program.load() {
            Ok(()) => break,
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts_left > 0 => {}
            Err(ProgramError::LoadError {
                io_error,
                verifier_log,
            }) => {
                return Err(LoadError::Rejected {
                    program: name.to_owned(),
                    io_error,
                    verifier_log: verifier_log.to_string(),
                });
            }
            Err(other) => {
                return Err(LoadError::while_doing(
                    &format!("loading program `{name}`"),
                    other,
                ));
            }
        }
    }
    program
        .attach(map.fd())
        .map_err(|e| LoadError::while_doing(&format!("attaching program `{name}`"), e))?;
    Ok(())
}

fn map_array<T: Copy + aya::Pod>(
    array: &Array<MapData, T>,
    slots: u32,
) -> Result<MappedArray<T>, LoadError> {
    MappedArray::map(aya::maps::IterableMap::map(array), slots)
        .map_err(|e| LoadError::while_doing("mapping the stream state into memory", e))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| missing("map", name))?;
    T::try_from(map).map_err(|e| LoadError::while_doing(&format!("opening map `{name}`"), e))
}

fn load_error(error: EbpfError) -> LoadError {
    LoadError::while_doing("creating the maps and relocating the probe", error)
}

fn check_kernel_support() -> Result<(), LoadError> {
    // A failed probe of the feature itself (e.g. EPERM) is left to the real
    // load below, which reports it with more context.
    if matches!(aya::sys::is_map_supported(MapType::SockMap), Ok(false)) {
        return Err(LoadError::KernelLacksSockmap("BPF_MAP_TYPE_SOCKMAP"));
    }
    if matches!(
        aya::sys::is_program_supported(ProgramType::SkSkb),
        Ok(false)
    ) {
        return Err(LoadError::KernelLacksSockmap("BPF_PROG_TYPE_SK_SKB"));
    }
    Ok(())
}

/// A socket to splice, and where its bytes go.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// Must outlive the [`Splice`].
    pub socket: BorrowedFd<'a>,
    /// Index (in the same list) of the member whose egress gets this
    /// socket's bytes: itself for an echo.
    pub peer: usize,
    /// Whether the kernel starts forwarding this socket's bytes at the
    /// insert. `false` leaves that to [`Splice::start`]: for a socket whose
    /// later bytes must wait until userspace wrote to the peer what it read
    /// before them.
    pub start: bool,
}

/// One socket of a [`Splice`].
struct Entry {
    fd: std::os::fd::RawFd,
    slot: u32,
    cookie: SocketCookie,
    held: bool,
    /// In `SPLICED`: the kernel forwards its incoming bytes.
    spliced: bool,
}

impl Entry {
    /// Puts the socket into `SPLICED`, unless the kernel refuses: then it is
    /// not established any more and userspace forwards its bytes.
    fn start(&mut self, p: &mut Probe) {
        // SAFETY: the splice's sockets outlive it.
        let socket = unsafe { BorrowedFd::borrow_raw(self.fd) };
        if p.spliced.set(self.slot, &socket, 0).is_ok() {
            self.spliced = true;
            // Bytes that reached the receive queue before the insert wait
            // there until the next segment unless the kernel is nudged.
            let _ = socket::kick_receive_queue(socket);
        }
    }
}

/// Sockets held in a probe with their routes. Dropping it removes the routes
/// and clears the slots: do so only once no byte is in flight (after every
/// [`super::Leg::run`] returned), since the kernel discards what a removed
/// socket still had queued.
pub struct Splice {
    probe: Rc<RefCell<Probe>>,
    entries: Vec<Entry>,
    /// Some socket had bytes waiting to be read when it was inserted.
    early: bool,
    /// The sockets are closed (see [`Splice::drop_closed`]).
    closed: bool,
}

impl Splice {
    /// Inserts each member's socket with a route to its peer's egress, in
    /// three steps: every socket into `HELD` (so that any of them can be
    /// redirected to), the routes, streams and credits, then every member
    /// that [`Member::start`]s into `SPLICED` (from then on the kernel
    /// forwards its incoming bytes; [`Splice::start`] does it for the
    /// others). Userspace may have read from the sockets before: each stream
    /// starts at the socket's next unread byte.
    ///
    /// Fails, holding nothing, if any socket cannot be held. A socket that
    /// cannot enter `SPLICED` (its peer's FIN arrived meanwhile) stays out
    /// ([`Splice::is_spliced`]): userspace forwards its bytes itself.
    pub fn insert(probe: &Rc<RefCell<Probe>>, members: &[Member<'_>]) -> Result<Self, InsertError> {
        let mut entries = Vec::with_capacity(members.len());
        for member in members {
            entries.push(Entry {
                fd: std::os::fd::AsRawFd::as_raw_fd(&member.socket),
                slot: 0,
                cookie: socket::cookie(member.socket).map_err(InsertError::Kernel)?,
                held: false,
                spliced: false,
            });
        }
        let next_seqs = members
            .iter()
            .map(|member| socket::next_unread_seq(member.socket).map_err(not_established))
            .collect::<Result<Vec<_>, _>>()?;
        let early = next_seqs.iter().any(|&(_, waiting)| waiting > 0);
        {
            let mut p = probe.borrow_mut();
            if p.free_slots.len() < members.len() {
                return Err(InsertError::Full {
                    capacity: p.config.capacity,
                });
            }
            for entry in &mut entries {
                entry.slot = p.free_slots.pop().expect("checked above");
            }
        }
        let mut splice = Self {
            probe: Rc::clone(probe),
            entries,
            early,
            closed: false,
        };
        let mut p = probe.borrow_mut();
        let window = credit::INITIAL_WINDOW.min(p.config.in_flight_limit);
        let send_buffer = (SEND_BUFFER_LIMITS * window) as usize;
        for (i, member) in members.iter().enumerate() {
            // See `flow`: the kernel's redirect queue must always drain.
            socket::set_send_buffer(member.socket, send_buffer).map_err(InsertError::Kernel)?;
            let entry = &mut splice.entries[i];
            p.held
                .set(entry.slot, &member.socket, 0)
                .map_err(|e| not_established(map_io_error(e)))?;
            entry.held = true;
        }
        for (i, member) in members.iter().enumerate() {
            let own = splice.entries[i].slot;
            p.streams.set(
                own,
                Stream {
                    next_seq: next_seqs[i].0,
                    ..Stream::default()
                },
            );
            p.set_window(own, window);
            p.control.set(
                own,
                Control {
                    credit: window,
                    forwarded: 0,
                },
            );
            let route = Route {
                own,
                peer: splice.entries[member.peer].slot,
            };
            p.routes
                .insert(splice.entries[i].cookie, route, 0)
                .map_err(|e| InsertError::Kernel(map_io_error(e)))?;
        }
        for (entry, member) in splice.entries.iter_mut().zip(members) {
            if member.start {
                entry.start(&mut p);
            }
        }
        drop(p);
        Ok(splice)
    }

    /// Puts `members[index]`, inserted without [`Member::start`], into
    /// `SPLICED`: the kernel forwards its bytes from its next unread one
    /// at the insert on (see [`Splice::is_spliced`]).
    pub fn start(&mut self, index: usize) {
        let entry = &mut self.entries[index];
        if !entry.spliced {
            entry.start(&mut self.probe.borrow_mut());
        }
    }

    /// Whether some socket had bytes waiting to be read when it was
    /// inserted (they reached it before the kernel could take them).
    pub fn had_early_bytes(&self) -> bool {
        self.early
    }

    /// Whether the kernel forwards `members[index]`'s bytes.
    pub fn is_spliced(&self, index: usize) -> bool {
        self.entries[index].spliced
    }

    /// The stream of `members[index]` as the probe keeps it; an error once
    /// the probe gave up on it.
    pub fn stream(&self, index: usize) -> io::Result<Stream> {
        let stream = self.probe.borrow().stream(self.entries[index].slot);
        if stream.flags & stream_flags::BROKEN != 0 {
            return Err(io::Error::other(
                "the probe could not place received bytes in the stream",
            ));
        }
        Ok(stream)
    }

    /// Reports to the probe that userspace forwarded `forwarded` of the
    /// bytes it passed up from `members[index]`, and sets how far it may
    /// redirect.
    ///
    /// The source is then looked at by every flow-control scan (see
    /// [`Watches`]): it moves.
    pub fn set_control(&self, index: usize, control: Control) {
        let slot = self.entries[index].slot;
        let mut p = self.probe.borrow_mut();
        p.set_control(slot, control);
        p.watches.heat(slot);
    }

    /// The control last set for `members[index]`.
    pub fn control(&self, index: usize) -> Control {
        self.probe.borrow().control(self.entries[index].slot)
    }

    /// Lets the flow control keep credit ahead of the destination behind
    /// `delivery` for `members[index]` (until the splice drops), and wake
    /// `reader` when passed-up bytes wait.
    pub fn watch(&self, index: usize, delivery: Rc<Delivery>, reader: Rc<Waiting>) {
        let entry = &self.entries[index];
        self.probe
            .borrow_mut()
            .watches
            .add(entry.slot, entry.fd, delivery, reader);
    }

    /// Drops the splice after its sockets were closed. Closing a socket
    /// took it out of the SockMaps (and out of the epoll sets) in the
    /// kernel, so only the routes are left to remove: two calls for a
    /// connection instead of six.
    pub fn drop_closed(mut self) {
        self.closed = true;
    }

    /// The credit the flow control keeps ahead of the destination of
    /// `members[index]` (see [`flow`]).
    pub fn window(&self, index: usize) -> u64 {
        self.probe.borrow().window(self.entries[index].slot)
    }
}

impl Drop for Splice {
    fn drop(&mut self) {
        let mut p = self.probe.borrow_mut();
        for entry in &self.entries {
            p.watches.remove(entry.slot);
            // Not found is fine: an insert that failed half-way, or the
            // kernel already dropped a closed socket from its maps.
            let _ = p.routes.remove(&entry.cookie);
            if entry.spliced && !self.closed {
                let _ = p.spliced.clear_index(&entry.slot);
            }
            if entry.held && !self.closed {
                let _ = p.held.clear_index(&entry.slot);
            }
            p.free_slots.push(entry.slot);
        }
    }
}

fn not_established(error: io::Error) -> InsertError {
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP) => InsertError::NotEstablished,
        _ => InsertError::Kernel(error),
    }
}

fn map_io_error(error: MapError) -> io::Error {
    match error {
        MapError::SyscallError(e) => e.io_error,
        other => io::Error::other(other.to_string()),
    }
}
