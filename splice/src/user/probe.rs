//! One loaded copy of a probe: its maps, its free SockMap slots, and the
//! [`Splice`] guard of the sockets a connection put into it.
//!
//! Each executor (core) loads its own copy, so nothing here is shared between
//! threads: the probe lives in an `Rc<RefCell<_>>` on its executor.
use std::{
    cell::RefCell,
    io,
    os::fd::{AsFd, BorrowedFd},
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
    kernel_view::KernelView,
    socket,
};
use crate::shared::{
    CONTROL_MAP, COUNTERS_MAP, Control, ROUTES_MAP, Route, SOCKETS_MAP, SocketCookie,
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
    #[error("permission denied while {doing}: {io_error} (needs CAP_BPF and CAP_NET_ADMIN)")]
    PermissionDenied { doing: String, io_error: io::Error },
    #[error("loading the probe failed while {doing}: {detail}")]
    Other { doing: String, detail: String },
}

impl LoadError {
    fn while_doing(doing: &str, error: impl std::error::Error + 'static) -> Self {
        let detail = error_chain(&error);
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
            detail,
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
    /// SockMap slots (sockets) per probe.
    pub capacity: u32,
    /// Bytes of one direction the kernel may hold queued for a destination
    /// that has not taken them yet; past that, the probe hands the bytes to
    /// userspace, which forwards them with TCP flow control.
    pub in_flight_limit: u64,
}

/// A probe loaded and attached to its SockMap, with the slots it has free.
pub struct Probe {
    // Keeps the program and its attachment alive.
    _ebpf: Ebpf,
    sockets: SockMap<MapData>,
    routes: HashMap<MapData, SocketCookie, Route>,
    control: Array<MapData, Control>,
    view: KernelView,
    free_slots: Vec<u32>,
    config: ProbeConfig,
}

impl Probe {
    /// Loads `object`, sizes its SockMap and route map for `capacity`
    /// sockets, and attaches every sk_skb program of the object (its stream
    /// parser and stream verdict) to the SockMap.
    pub fn load(object: &[u8], config: ProbeConfig) -> Result<Self, LoadError> {
        capabilities::check()?;
        check_kernel_support()?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(SOCKETS_MAP, config.capacity)
            .map_max_entries(ROUTES_MAP, config.capacity)
            .map_max_entries(CONTROL_MAP, config.capacity)
            .load(object)
            .map_err(load_error)?;
        let sockets: SockMap<MapData> = take_map(&mut ebpf, SOCKETS_MAP)?;
        let routes: HashMap<MapData, SocketCookie, Route> = take_map(&mut ebpf, ROUTES_MAP)?;
        let control: Array<MapData, Control> = take_map(&mut ebpf, CONTROL_MAP)?;
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
            attach(&mut ebpf, &name, &sockets)?;
        }
        Ok(Self {
            _ebpf: ebpf,
            sockets,
            routes,
            control,
            view,
            // Popped from the end: slot 0 is used first.
            free_slots: (0..config.capacity).rev().collect(),
            config,
        })
    }

    /// A handle on this probe's maps that other threads may read.
    pub fn kernel_view(&self) -> io::Result<KernelView> {
        self.view.try_clone()
    }

    /// SockMap slots not held by any connection.
    pub fn free_slots(&self) -> usize {
        self.free_slots.len()
    }

    /// SockMap slots in all.
    pub fn capacity(&self) -> u32 {
        self.config.capacity
    }

    /// See [`ProbeConfig::in_flight_limit`].
    pub fn in_flight_limit(&self) -> u64 {
        self.config.in_flight_limit
    }
}

fn missing(what: &str, name: &str) -> LoadError {
    LoadError::Other {
        doing: format!("looking up {what} `{name}`"),
        detail: "not in the probe object".to_owned(),
    }
}

fn attach(ebpf: &mut Ebpf, name: &str, sockets: &SockMap<MapData>) -> Result<(), LoadError> {
    let program: &mut SkSkb = ebpf
        .program_mut(name)
        .ok_or_else(|| missing("program", name))?
        .try_into()
        .map_err(|e| LoadError::while_doing(&format!("opening program `{name}`"), e))?;
    program.load().map_err(|e| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => LoadError::Rejected {
            program: name.to_owned(),
            io_error,
            verifier_log: verifier_log.to_string(),
        },
        other => LoadError::while_doing(&format!("loading program `{name}`"), other),
    })?;
    program
        .attach(sockets.fd())
        .map_err(|e| LoadError::while_doing(&format!("attaching program `{name}`"), e))?;
    Ok(())
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

/// One socket of a [`Splice`].
#[derive(Debug, Clone, Copy)]
struct Entry {
    slot: u32,
    cookie: SocketCookie,
    inserted: bool,
}

/// Sockets held in a probe's SockMap with their routes. Dropping it removes
/// the routes and clears the slots: do so only once no byte is in flight
/// (after [`super::Leg::run`] returned for every direction), since the kernel
/// discards what a removed socket still had queued.
pub struct Splice {
    probe: Rc<RefCell<Probe>>,
    entries: Vec<Entry>,
    incomplete: Option<InsertError>,
}

impl Splice {
    /// Inserts `sockets[i]` with a route to the slot of `sockets[peers[i]]`.
    ///
    /// Routes go in first, then the sockets in order. Bytes that reach an
    /// inserted socket while its peer's slot is still empty are passed up to
    /// userspace by the probe (and from then on all of that socket's bytes):
    /// the callers' [`super::Leg`]s forward them, so nothing is lost.
    ///
    /// If the first socket cannot be inserted, nothing is held and the error is
    /// returned. If a later one cannot, the splice is kept but incomplete
    /// ([`Splice::incomplete`]): routes to the empty slot make the probe pass
    /// everything to userspace, and removing the inserted sockets now could
    /// discard bytes they already queued.
    pub fn insert(
        probe: &Rc<RefCell<Probe>>,
        sockets: &[BorrowedFd<'_>],
        peers: &[usize],
    ) -> Result<Self, InsertError> {
        assert_eq!(sockets.len(), peers.len(), "one peer per socket");
        let cookies = sockets
            .iter()
            .map(|socket| socket::cookie(socket.as_fd()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(InsertError::Kernel)?;
        let entries = {
            let mut p = probe.borrow_mut();
            if p.free_slots.len() < sockets.len() {
                return Err(InsertError::Full {
                    capacity: p.config.capacity,
                });
            }
            let split = p.free_slots.len() - sockets.len();
            let slots = p.free_slots.split_off(split);
            cookies
                .into_iter()
                .zip(slots.into_iter().rev())
                .map(|(cookie, slot)| Entry {
                    slot,
                    cookie,
                    inserted: false,
                })
                .collect()
        };
        let mut splice = Self {
            probe: Rc::clone(probe),
            entries,
            incomplete: None,
        };
        let mut p = probe.borrow_mut();
        let control = Control {
            credit: p.config.in_flight_limit,
            forwarded: 0,
        };
        for (i, &peer) in peers.iter().enumerate() {
            let own = splice.entries[i].slot;
            p.control
                .set(own, control, 0)
                .map_err(|e| InsertError::Kernel(map_io_error(e)))?;
            let route = Route {
                peer: splice.entries[peer].slot,
                own,
                ..Route::default()
            };
            p.routes
                .insert(splice.entries[i].cookie, route, 0)
                .map_err(|e| InsertError::Kernel(map_io_error(e)))?;
        }
        for (i, socket) in sockets.iter().enumerate() {
            let slot = splice.entries[i].slot;
            match p.sockets.set(slot, socket, 0) {
                Ok(()) => splice.entries[i].inserted = true,
                Err(e) => {
                    let io_error = map_io_error(e);
                    let error = if io_error.raw_os_error() == Some(libc::EOPNOTSUPP) {
                        InsertError::NotEstablished
                    } else {
                        InsertError::Kernel(io_error)
                    };
                    if i == 0 {
                        drop(p);
                        return Err(error); // `splice` drops: routes removed, slots freed
                    }
                    splice.incomplete = Some(error);
                    break;
                }
            }
        }
        Ok(splice)
    }

    /// Why the splice is incomplete, if it is: then every byte goes through
    /// userspace.
    pub fn incomplete(&self) -> Option<&InsertError> {
        self.incomplete.as_ref()
    }

    /// The route of `sockets[index]` (as given to [`Splice::insert`]), as
    /// the probe keeps it.
    pub fn route(&self, index: usize) -> io::Result<Route> {
        let probe = self.probe.borrow();
        probe
            .routes
            .get(&self.entries[index].cookie, 0)
            .map_err(map_io_error)
    }

    /// Tells the probe how far it may redirect from `sockets[index]` and how
    /// many bytes passed up userspace forwarded.
    pub fn set_control(&self, index: usize, control: Control) -> io::Result<()> {
        let mut probe = self.probe.borrow_mut();
        probe
            .control
            .set(self.entries[index].slot, control, 0)
            .map_err(map_io_error)
    }

    /// See [`ProbeConfig::in_flight_limit`].
    pub fn in_flight_limit(&self) -> u64 {
        self.probe.borrow().config.in_flight_limit
    }
}

impl Drop for Splice {
    fn drop(&mut self) {
        let mut p = self.probe.borrow_mut();
        for entry in &self.entries {
            // Not found is fine: a failed insert rolled back before the route
            // went in, or the kernel already dropped a closed socket's slot.
            let _ = p.routes.remove(&entry.cookie);
            if entry.inserted {
                let _ = p.sockets.clear_index(&entry.slot);
            }
            p.free_slots.push(entry.slot);
        }
    }
}

fn map_io_error(error: MapError) -> io::Error {
    match error {
        MapError::SyscallError(e) => e.io_error,
        other => io::Error::other(other.to_string()),
    }
}
