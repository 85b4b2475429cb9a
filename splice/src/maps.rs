//! The maps of one loaded probe as userspace writes them: the two SockMaps
//! a socket enters (`HELD`, then `SPLICED`), the routes by socket cookie,
//! and the memory-mapped per-slot `STREAMS` and `CONTROL` (see
//! [`splice_common`] for who writes which field). Each call is one map
//! update or one memory access; the order they are made in is
//! [`super::insert`]'s.
use std::{io, os::fd::BorrowedFd};

use aya::maps::{Array, HashMap, MapData, MapError, SockMap};
use splice_common::{Control, Route, SocketCookie, Stream};

use super::streams::MappedArray;

pub(crate) struct Maps {
    pub(super) held: SockMap<MapData>,
    pub(super) spliced: SockMap<MapData>,
    pub(super) routes: HashMap<MapData, SocketCookie, Route>,
    // Keep the maps behind `streams` and `control` open.
    pub(super) _streams_map: Array<MapData, Stream>,
    pub(super) _control_map: Array<MapData, Control>,
    pub(super) streams: MappedArray<Stream>,
    pub(super) control: MappedArray<Control>,
}

impl Maps {
    /// Puts `socket` into `HELD` at `slot`: a redirect may target it.
    pub(crate) fn hold(&mut self, slot: u32, socket: BorrowedFd<'_>) -> io::Result<()> {
        self.held.set(slot, &socket, 0).map_err(io_error)
    }

    /// Puts `socket` into `SPLICED` at `slot`: the verdict program runs on
    /// its incoming bytes.
    pub(crate) fn splice(&mut self, slot: u32, socket: BorrowedFd<'_>) -> io::Result<()> {
        self.spliced.set(slot, &socket, 0).map_err(io_error)
    }

    /// Clears `slot` of both SockMaps as far as it is in them.
    pub(crate) fn release(&mut self, slot: u32, spliced: bool, held: bool) {
        // Not found is fine: the kernel drops a closed socket by itself.
        if spliced {
            let _ = self.spliced.clear_index(&slot);
        }
        if held {
            let _ = self.held.clear_index(&slot);
        }
    }

    pub(crate) fn route(&mut self, cookie: SocketCookie, route: Route) -> io::Result<()> {
        self.routes.insert(cookie, route, 0).map_err(io_error)
    }

    pub(crate) fn unroute(&mut self, cookie: SocketCookie) {
        // Not found is fine: an insert that failed half-way.
        let _ = self.routes.remove(&cookie);
    }

    /// The stream of the socket in `slot`, and setting it (no system call).
    pub(crate) fn stream(&self, slot: u32) -> Stream {
        self.streams.get(slot)
    }

    pub(crate) fn set_stream(&self, slot: u32, stream: Stream) {
        self.streams.set(slot, stream);
    }

    /// The control of the socket in `slot`, and setting it (no system call).
    pub(crate) fn control(&self, slot: u32) -> Control {
        self.control.get(slot)
    }

    pub(crate) fn set_control(&self, slot: u32, control: Control) {
        self.control.set(slot, control);
    }
}

fn io_error(error: MapError) -> io::Error {
    match error {
        MapError::SyscallError(e) => e.io_error,
        other => io::Error::other(other.to_string()),
    }
}
