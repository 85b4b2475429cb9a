//! Read-only access to a loaded probe's maps from any thread: the totals
//! `--stats` prints and the tests compare with the bytes they sent.
use std::{io, ops::AddAssign, os::fd::AsFd};

use aya::maps::{HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray};

use splice_common::{Counter, Route, SocketCookie};

/// Duplicated descriptors of one probe's route map and counters.
pub struct KernelView {
    routes: HashMap<MapData, SocketCookie, Route>,
    counters: PerCpuArray<MapData, u64>,
}

/// What the kernel side of one or more probes reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelTotals {
    pub redirected_bytes: u64,
    pub redirected_skbs: u64,
    pub passed_bytes: u64,
    pub passed_skbs: u64,
    pub redirect_failures: u64,
    pub credit_exhausted: u64,
    pub resumed: u64,
    pub trimmed: u64,
    pub trimmed_bytes: u64,
    pub broken: u64,
    /// Entries in the route maps (0 once every connection is closed).
    pub routes: u64,
}

impl AddAssign for KernelTotals {
    fn add_assign(&mut self, other: Self) {
        self.redirected_bytes += other.redirected_bytes;
        self.redirected_skbs += other.redirected_skbs;
        self.passed_bytes += other.passed_bytes;
        self.passed_skbs += other.passed_skbs;
        self.redirect_failures += other.redirect_failures;
        self.credit_exhausted += other.credit_exhausted;
        self.resumed += other.resumed;
        self.trimmed += other.trimmed;
        self.trimmed_bytes += other.trimmed_bytes;
        self.broken += other.broken;
        self.routes += other.routes;
    }
}

fn reopen(data: &MapData) -> io::Result<MapData> {
    let fd = data.fd().as_fd().try_clone_to_owned()?;
    MapData::from_fd(fd).map_err(map_error)
}

fn map_error(error: MapError) -> io::Error {
    io::Error::other(error.to_string())
}

impl KernelView {
    pub(crate) fn new(
        routes: &HashMap<MapData, SocketCookie, Route>,
        counters: &Map,
    ) -> io::Result<Self> {
        let Map::PerCpuArray(counters) = counters else {
            return Err(io::Error::other("COUNTERS is not a per-CPU array"));
        };
        Self::from_data(reopen(routes.map())?, reopen(counters)?)
    }

    fn from_data(routes: MapData, counters: MapData) -> io::Result<Self> {
        Ok(Self {
            routes: HashMap::try_from(Map::HashMap(routes)).map_err(map_error)?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(counters)).map_err(map_error)?,
        })
    }

    /// The `COUNTERS` map's descriptor.
    pub(crate) fn counters_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.counters.map().fd().as_fd()
    }

    /// Another view on the same maps.
    pub fn try_clone(&self) -> io::Result<Self> {
        Self::from_data(reopen(self.routes.map())?, reopen(self.counters.map())?)
    }

    /// Reads the counters (summed over CPUs) and counts the routes.
    pub fn totals(&self) -> io::Result<KernelTotals> {
        Ok(KernelTotals {
            routes: self.routes.keys().count() as u64,
            ..self.counters()?
        })
    }

    /// Bytes the probe passed up to userspace so far (summed over CPUs): one
    /// system call.
    pub fn passed_bytes(&self) -> io::Result<u64> {
        let per_cpu = self
            .counters
            .get(&(Counter::PassedBytes as u32), 0)
            .map_err(map_error)?;
        Ok(per_cpu.iter().sum())
    }

    /// Reads the counters (summed over CPUs), leaving `routes` at 0:
    /// counting them walks the route map, a system call per entry (two per
    /// live connection), too slow for a frequent scrape.
    pub fn counters(&self) -> io::Result<KernelTotals> {
        let counter = |c: Counter| -> io::Result<u64> {
            let per_cpu = self.counters.get(&(c as u32), 0).map_err(map_error)?;
            Ok(per_cpu.iter().sum())
        };
        Ok(KernelTotals {
            redirected_bytes: counter(Counter::RedirectedBytes)?,
            redirected_skbs: counter(Counter::RedirectedSkbs)?,
            passed_bytes: counter(Counter::PassedBytes)?,
            passed_skbs: counter(Counter::PassedSkbs)?,
            redirect_failures: counter(Counter::RedirectFailures)?,
            credit_exhausted: counter(Counter::CreditExhausted)?,
            resumed: counter(Counter::Resumed)?,
            trimmed: counter(Counter::Trimmed)?,
            trimmed_bytes: counter(Counter::TrimmedBytes)?,
            broken: counter(Counter::Broken)?,
            routes: 0,
        })
    }
}
