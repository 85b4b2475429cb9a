//! Putting a connection's sockets into a probe: [`Splice::insert`] takes
//! slots, holds the sockets, writes their routes, streams and credit, and
//! starts the kernel's forwarding; the [`Splice`] it returns is the guard
//! that removes them again.
use std::{
    cell::{Cell, RefCell},
    io,
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    rc::Rc,
};

use thiserror::Error;

use super::{
    credit::SEND_BUFFER_LIMITS, delivery::Delivery, probe::Probe, socket, spliced_read::Waiting,
};
use splice_common::{Control, Route, SocketCookie, Stream, stream_flags};

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
    fd: RawFd,
    slot: u32,
    cookie: SocketCookie,
    held: bool,
    /// In `SPLICED`: the kernel forwards its incoming bytes.
    spliced: Cell<bool>,
}

impl Entry {
    /// Puts the socket into `SPLICED`, unless the kernel refuses: then it is
    /// not established any more and userspace forwards its bytes.
    fn start(&self, p: &mut Probe) {
        // SAFETY: the splice's sockets outlive it.
        let socket = unsafe { BorrowedFd::borrow_raw(self.fd) };
        if p.maps.splice(self.slot, socket).is_ok() {
            self.spliced.set(true);
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
                fd: member.socket.as_raw_fd(),
                slot: 0,
                cookie: socket::cookie(member.socket).map_err(InsertError::Kernel)?,
                held: false,
                spliced: Cell::new(false),
            });
        }
        let next_seqs = members
            .iter()
            .map(|member| socket::next_unread_seq(member.socket).map_err(not_established))
            .collect::<Result<Vec<_>, _>>()?;
        let early = next_seqs.iter().any(|&(_, waiting)| waiting > 0);
        {
            let mut p = probe.borrow_mut();
            let Some(slots) = p.slots.take(members.len()) else {
                return Err(InsertError::Full {
                    capacity: p.slots.capacity(),
                });
            };
            for (entry, slot) in entries.iter_mut().zip(slots) {
                entry.slot = slot;
            }
        }
        let mut splice = Self {
            probe: Rc::clone(probe),
            entries,
            early,
            closed: false,
        };
        let mut p = probe.borrow_mut();
        let window = p.flow.initial_window();
        let send_buffer = (SEND_BUFFER_LIMITS * window) as usize;
        for (i, member) in members.iter().enumerate() {
            // See `flow`: the kernel's redirect queue must always drain.
            socket::set_send_buffer(member.socket, send_buffer).map_err(InsertError::Kernel)?;
            let entry = &mut splice.entries[i];
            p.maps
                .hold(entry.slot, member.socket)
                .map_err(not_established)?;
            entry.held = true;
        }
        for (i, member) in members.iter().enumerate() {
            let own = splice.entries[i].slot;
            p.maps.set_stream(
                own,
                Stream {
                    next_seq: next_seqs[i].0,
                    ..Stream::default()
                },
            );
            p.flow.set_window(own, window);
            p.maps.set_control(
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
            p.maps
                .route(splice.entries[i].cookie, route)
                .map_err(InsertError::Kernel)?;
        }
        for (entry, member) in splice.entries.iter().zip(members) {
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
    pub fn start(&self, index: usize) {
        let entry = &self.entries[index];
        if !entry.spliced.get() {
            entry.start(&mut self.probe.borrow_mut());
        }
    }

    /// [`Self::start`] for a socket userspace went on reading after the
    /// insert, `read_since` bytes: its stream first moves on by as many
    /// (only userspace writes a stream before its socket enters `SPLICED`;
    /// counting beats asking the kernel, whose FIONREAD on a SockMap socket
    /// no longer counts the TCP receive queue). Returns whether the kernel
    /// forwards its bytes from there on; if the socket is no longer
    /// established, userspace goes on.
    pub fn start_after_reading(&self, index: usize, read_since: u64) -> bool {
        let entry = &self.entries[index];
        if !entry.spliced.get() {
            let mut p = self.probe.borrow_mut();
            let stream = p.maps.stream(entry.slot);
            p.maps.set_stream(
                entry.slot,
                Stream {
                    // Sequence numbers wrap at 2^32.
                    next_seq: stream.next_seq.wrapping_add(read_since as u32),
                    ..Stream::default()
                },
            );
            entry.start(&mut p);
        }
        entry.spliced.get()
    }

    /// Whether some socket had bytes waiting to be read when it was
    /// inserted (they reached it before the kernel could take them).
    pub fn had_early_bytes(&self) -> bool {
        self.early
    }

    /// Whether the kernel forwards `members[index]`'s bytes.
    pub fn is_spliced(&self, index: usize) -> bool {
        self.entries[index].spliced.get()
    }

    /// The stream of `members[index]` as the probe keeps it; an error once
    /// the probe gave up on it.
    pub fn stream(&self, index: usize) -> io::Result<Stream> {
        let stream = self.probe.borrow().maps.stream(self.entries[index].slot);
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
    /// [`super::watches::Watches`]): it moves.
    pub fn set_control(&self, index: usize, control: Control) {
        let slot = self.entries[index].slot;
        let mut p = self.probe.borrow_mut();
        p.maps.set_control(slot, control);
        p.flow.heat(slot);
    }

    /// The control last set for `members[index]`.
    pub fn control(&self, index: usize) -> Control {
        self.probe.borrow().maps.control(self.entries[index].slot)
    }

    /// Lets the flow control keep credit ahead of the destination behind
    /// `delivery` for `members[index]` (until the splice drops), and wake
    /// `reader` when passed-up bytes wait.
    pub fn watch(&self, index: usize, delivery: Rc<Delivery>, reader: Rc<Waiting>) {
        let entry = &self.entries[index];
        self.probe
            .borrow_mut()
            .flow
            .watch(entry.slot, entry.fd, delivery, reader);
    }

    /// Drops the splice after its sockets were closed. Closing a socket
    /// took it out of the SockMaps (and out of the epoll sets) in the
    /// kernel, so only the routes are left to remove: two calls for a
    /// connection instead of six.
    pub fn drop_closed(mut self) {
        self.closed = true;
    }

    /// Gives the splice to another process ([`super::handover`]): its
    /// sockets stay in the maps with their routes and slots, which that
    /// process takes over with the maps; here only the flow control stops
    /// watching them. Nothing is removed when it goes.
    pub(crate) fn hand_over(mut self) -> Vec<super::handover::EntryState> {
        let entries = std::mem::take(&mut self.entries);
        let p = &mut *self.probe.borrow_mut();
        entries
            .iter()
            .map(|entry| {
                p.flow.unwatch(entry.slot);
                super::handover::EntryState {
                    slot: entry.slot,
                    cookie: entry.cookie,
                    held: entry.held,
                    spliced: entry.spliced.get(),
                    window: p.flow.window(entry.slot),
                }
            })
            .collect()
    }

    /// A splice taken over from another process: `entries` are in the
    /// maps of `probe` already (adopted with them), sockets `fds` in the
    /// same order.
    pub(crate) fn restore(
        probe: &Rc<RefCell<Probe>>,
        entries: &[super::handover::EntryState],
        fds: &[RawFd],
    ) -> Self {
        let p = probe.borrow();
        let entries = entries
            .iter()
            .zip(fds)
            .map(|(entry, &fd)| {
                p.flow.set_window(entry.slot, entry.window);
                Entry {
                    fd,
                    slot: entry.slot,
                    cookie: entry.cookie,
                    held: entry.held,
                    spliced: Cell::new(entry.spliced),
                }
            })
            .collect();
        drop(p);
        Self {
            probe: Rc::clone(probe),
            entries,
            early: false,
            closed: false,
        }
    }

    /// The credit the flow control keeps ahead of the destination of
    /// `members[index]` (see [`super::flow`]).
    pub fn window(&self, index: usize) -> u64 {
        self.probe.borrow().flow.window(self.entries[index].slot)
    }
}

impl Drop for Splice {
    fn drop(&mut self) {
        let p = &mut *self.probe.borrow_mut();
        for entry in &self.entries {
            p.flow.unwatch(entry.slot);
            p.maps.unroute(entry.cookie);
            // A closed socket left the SockMaps by itself.
            if !self.closed {
                p.maps.release(entry.slot, entry.spliced.get(), entry.held);
            }
            p.slots.put(entry.slot);
        }
    }
}

fn not_established(error: io::Error) -> InsertError {
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP) => InsertError::NotEstablished,
        _ => InsertError::Kernel(error),
    }
}
