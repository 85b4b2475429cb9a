//! Types and names shared by the probe (in the kernel) and its loader.
//! Who writes which field is said on each type.
//!
//! The maps of one loaded probe:
//! - `HELD`: a SockMap with no program; every socket of a splice sits here,
//!   in its slot, for the splice's whole life. Redirects target it, so a
//!   socket's bytes can go to its peer before the peer's own verdict runs.
//! - `SPLICED`: a SockMap with the stream verdict attached, holding the same
//!   sockets (same slots): the kernel forwards their incoming bytes.
//! - `ROUTES`: socket cookie → [`Route`] (its slot and its peer's);
//! - `STREAMS`: per slot, the [`Stream`] state the probe keeps for the
//!   socket as a source; memory-mapped, userspace reads it without a call;
//! - `CONTROL`: per slot, the [`Control`] userspace gives the probe;
//!   memory-mapped too;
//! - `COUNTERS`: per-CPU totals indexed by [`Counter`].
//!
//! Flow control. The kernel queues redirected bytes for a destination
//! without bound and without charging them to the source, so the source's
//! TCP window stays open: a fast sender facing a slow reader made it queue
//! 1.6 GB. So the probe redirects a source's bytes only within a *credit*
//! that userspace sets from the destination's progress. Past it, the probe
//! passes bytes up to the source's own receive queue, where they count
//! against its receive buffer (TCP flow control closes the window), and
//! userspace forwards them at the destination's pace. Once userspace
//! forwarded every byte passed up and there is credit again, the probe
//! redirects again: never out of order. (Taking the socket out of
//! `SPLICED` instead is unsafe: a verdict loop running on another CPU drops
//! the buffers it meets after the program is gone.)
#![no_std]

/// Name of the SockMap every spliced socket stays in.
pub const HELD_MAP: &str = "HELD";
/// Name of the SockMap with the stream verdict.
pub const SPLICED_MAP: &str = "SPLICED";
/// Name of the hash map *socket cookie → [`Route`]*.
pub const ROUTES_MAP: &str = "ROUTES";
/// Name of the memory-mappable array *slot → [`Stream`]*.
pub const STREAMS_MAP: &str = "STREAMS";
/// Name of the memory-mappable array *slot → [`Control`]*.
pub const CONTROL_MAP: &str = "CONTROL";
/// Name of the per-CPU array of [`Counter`] totals.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Capacity compiled into the probe; the loader sets the real one per core.
pub const DEFAULT_CAPACITY: u32 = 4096;

/// `BPF_F_MMAPABLE`: lets userspace map an array's values into memory.
pub const MAP_MMAPABLE: u32 = 1 << 10;

/// Key of `ROUTES`: the kernel's socket cookie (`SO_COOKIE` in userspace,
/// `bpf_get_socket_cookie` in the probe). Unlike addresses, it is never reused.
pub type SocketCookie = u64;

/// A spliced socket's place: its own slot and the slot of the socket whose
/// egress gets its bytes. Written by userspace before the socket enters
/// `SPLICED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Route {
    /// This socket's slot (in `HELD`, `SPLICED` and `STREAMS`).
    pub own: u32,
    /// Slot of the peer (the socket's own slot for an echo).
    pub peer: u32,
}

/// One socket's stream as a source, in its slot of `STREAMS`. Userspace
/// writes it only before the socket enters `SPLICED`; then only the probe
/// writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stream {
    /// TCP sequence number of the next byte of the stream nobody has taken
    /// yet. Userspace sets it before the socket enters `SPLICED`; the probe
    /// advances it and trims whatever a socket buffer repeats before it.
    pub next_seq: u32,
    /// [`stream_flags`].
    pub flags: u32,
    /// Bytes redirected to the peer so far.
    pub redirected: u64,
    /// Socket buffers redirected to the peer so far.
    pub skbs: u64,
    /// Bytes passed up to the socket's own receive queue (for userspace).
    pub passed: u64,
}

/// What userspace tells the probe about one slot's socket as a source.
/// Only userspace writes it; both fields only grow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// The probe may redirect while `Stream::redirected` stays within this.
    pub credit: u64,
    /// Bytes of those passed up that userspace has handed to the
    /// destination.
    pub forwarded: u64,
}

/// Bits of [`Stream::flags`].
pub mod stream_flags {
    /// The probe passes the socket's bytes up to userspace (credit ran out,
    /// or a redirect failed); it redirects again once userspace forwarded
    /// all of them and credit is back.
    pub const TO_USERSPACE: u32 = 1;
    /// The probe met bytes it could not place in the stream (a gap, or a
    /// repeat it failed to trim): it drops what follows and userspace resets
    /// the connection rather than forward a corrupt stream.
    pub const BROKEN: u32 = 2;
}

/// Slots of the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Payload bytes redirected to a peer socket.
    RedirectedBytes = 0,
    /// Socket buffers redirected to a peer socket.
    RedirectedSkbs = 1,
    /// Payload bytes passed to the socket's own receive queue (no route, or
    /// the peer was gone).
    PassedBytes = 2,
    /// Socket buffers passed to the socket's own receive queue.
    PassedSkbs = 3,
    /// Redirects that failed because the peer slot was empty (the peer
    /// closed).
    RedirectFailures = 4,
    /// Socket buffers that began with bytes already delivered (a partially
    /// overlapping retransmission) and were trimmed.
    Trimmed = 5,
    /// Bytes trimmed off such socket buffers.
    TrimmedBytes = 6,
    /// Streams marked [`stream_flags::BROKEN`].
    Broken = 7,
    /// Times a stream ran out of credit and went to userspace.
    CreditExhausted = 8,
    /// Times a stream came back from userspace to redirecting.
    Resumed = 9,
}

impl Counter {
    /// Number of slots in `COUNTERS`.
    pub const COUNT: u32 = 10;
}

// SAFETY: `Route` and `Stream` are `#[repr(C)]`, made of integers only,
// with no padding (u32 pairs, then u64s), so every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Route {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Stream {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Control {}
