//! Loading one copy of a probe: the program attached, and its parts, each
//! with a module of its own: the `Maps` userspace writes, the `Slots`
//! connections take, the `FlowControl` state, and a [`KernelView`] of its
//! counters. [`super::insert`] puts sockets into it.
//!
//! Each executor (core) loads its own copy, so nothing here is shared between
//! threads: the probe lives in an `Rc<RefCell<_>>` on its executor.
use std::io;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, MapType, SockMap},
    programs::{ProgramError, ProgramType, SkSkb},
};
use thiserror::Error;

use super::{
    capabilities::{self, MissingCapabilities},
    flow::FlowControl,
    kernel_view::KernelView,
    maps::Maps,
    slots::Slots,
    streams::MappedArray,
};
use splice_common::{
    CONTROL_MAP, COUNTERS_MAP, Control, HELD_MAP, ROUTES_MAP, Route, SPLICED_MAP, STREAMS_MAP,
    SocketCookie, Stream,
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

/// How a probe is sized and paced.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    /// Sockets per probe (slots in each SockMap).
    pub capacity: u32,
    /// Most bytes of one direction the kernel may hold for a destination
    /// that has not taken them yet: the ceiling of the window the flow
    /// control keeps ahead of the destination (see [`splice_common`] and
    /// [`super::flow`]; each direction starts at
    /// [`super::credit::INITIAL_WINDOW`] or this, whichever is smaller).
    pub in_flight_limit: u64,
    /// Bytes a direction of a routed connection carries in userspace before
    /// its source is spliced (0: both at once, from the first packet on).
    /// Short connections never pay the splice's set-up (see
    /// [`super::pipe::run`]).
    pub splice_after: u64,
}

/// A probe loaded and attached: its parts.
pub struct Probe {
    // Keeps the program and its attachment alive; `None` for maps adopted
    // from another process (the SockMap holds the program attached for as
    // long as any process holds the map, see [`super::handover`]).
    _ebpf: Option<Ebpf>,
    pub(crate) maps: Maps,
    pub(crate) slots: Slots,
    pub(crate) flow: FlowControl,
    pub(crate) view: KernelView,
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
            _ebpf: Some(ebpf),
            maps: Maps {
                held,
                spliced,
                routes,
                _streams_map: streams_map,
                _control_map: control_map,
                streams,
                control,
            },
            slots: Slots::new(config.capacity),
            flow: FlowControl::new(config.capacity, config.in_flight_limit),
            view,
        })
    }

    /// Maps another process loaded and handed over, in the order of
    /// [`Self::map_fds`]: connections handed over with them go on in them;
    /// no new connection takes a slot here.
    pub fn adopt(fds: Vec<std::os::fd::OwnedFd>, config: ProbeConfig) -> Result<Self, LoadError> {
        let [held, spliced, routes, streams, control, counters]: [std::os::fd::OwnedFd; 6] =
            fds.try_into().map_err(|_| LoadError::Other {
                doing: "adopting the maps of another process".to_owned(),
                detail: "not six map descriptors".to_owned(),
            })?;
        let data = |fd, name: &str| {
            MapData::from_fd(fd)
                .map_err(|e| LoadError::while_doing(&format!("adopting map `{name}`"), e))
        };
        let map = |fd, name: &str| {
            aya::maps::Map::from_map_data(data(fd, name)?)
                .map_err(|e| LoadError::while_doing(&format!("adopting map `{name}`"), e))
        };
        fn typed<T: TryFrom<aya::maps::Map, Error = MapError>>(
            map: aya::maps::Map,
            name: &str,
        ) -> Result<T, LoadError> {
            T::try_from(map)
                .map_err(|e| LoadError::while_doing(&format!("opening map `{name}`"), e))
        }
        let held: SockMap<MapData> = typed(map(held, HELD_MAP)?, HELD_MAP)?;
        let spliced: SockMap<MapData> = typed(map(spliced, SPLICED_MAP)?, SPLICED_MAP)?;
        let routes: HashMap<MapData, SocketCookie, Route> =
            typed(map(routes, ROUTES_MAP)?, ROUTES_MAP)?;
        let streams_map: Array<MapData, Stream> = typed(map(streams, STREAMS_MAP)?, STREAMS_MAP)?;
        let control_map: Array<MapData, Control> = typed(map(control, CONTROL_MAP)?, CONTROL_MAP)?;
        let streams = map_array(&streams_map, config.capacity)?;
        let control = map_array(&control_map, config.capacity)?;
        let counters = map(counters, COUNTERS_MAP)?;
        let view = KernelView::new(&routes, &counters)
            .map_err(|e| LoadError::while_doing("opening the counters", e))?;
        Ok(Self {
            _ebpf: None,
            maps: Maps {
                held,
                spliced,
                routes,
                _streams_map: streams_map,
                _control_map: control_map,
                streams,
                control,
            },
            slots: Slots::none(config.capacity),
            flow: FlowControl::new(config.capacity, config.in_flight_limit),
            view,
        })
    }

    /// Copies of the descriptors of this probe's maps, to hand over:
    /// `HELD`, `SPLICED`, `ROUTES`, `STREAMS`, `CONTROL`, `COUNTERS`.
    pub fn map_fds(&self) -> io::Result<Vec<std::os::fd::OwnedFd>> {
        use std::os::fd::AsFd as _;
        let maps = &self.maps;
        [
            maps.held.fd().as_fd(),
            maps.spliced.fd().as_fd(),
            aya::maps::IterableMap::map(&maps.routes).fd().as_fd(),
            aya::maps::IterableMap::map(&maps._streams_map).fd().as_fd(),
            aya::maps::IterableMap::map(&maps._control_map).fd().as_fd(),
            self.view.counters_fd(),
        ]
        .into_iter()
        .map(|fd| fd.try_clone_to_owned())
        .collect()
    }

    /// A handle on this probe's maps that other threads may read.
    pub fn kernel_view(&self) -> io::Result<KernelView> {
        self.view.try_clone()
    }

    /// Slots not held by any connection.
    pub fn free_slots(&self) -> usize {
        self.slots.free()
    }

    /// Slots in all.
    pub fn capacity(&self) -> u32 {
        self.slots.capacity()
    }

    /// See [`ProbeConfig::in_flight_limit`].
    pub fn in_flight_limit(&self) -> u64 {
        self.flow.in_flight_limit()
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
