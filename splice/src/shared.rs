//! Types and names shared by the probe (in the kernel) and its loader.
//!
//! The maps of one loaded probe:
//! - `SOCKETS`: a SockMap, one slot per spliced socket;
//! - `ROUTES`: socket cookie of a source socket → [`Route`] (which slot its
//!   bytes go to, and how many went);
//! - `CONTROL`: per slot, the [`Control`] userspace gives the probe (how far
//!   it may redirect, how far userspace forwarded);
//! - `COUNTERS`: per-CPU totals indexed by [`Counter`].
//!
//! Flow control: the kernel queues redirected bytes for the destination
//! without any bound (a fast sender facing a slow reader filled 1.6 GB of
//! kernel memory in seconds). So the probe redirects a source's bytes only
//! up to a *credit* userspace sets from the destination's progress; past it,
//! the probe passes bytes up to the source's own receive queue, which TCP
//! flow control does bound, and userspace forwards them at the pace the
//! destination takes them. Once userspace forwarded every byte passed up
//! and credit is back, the probe redirects again: never out of order.
/// Name of the SockMap holding every spliced socket.
pub const SOCKETS_MAP: &str = "SOCKETS";
/// Name of the hash map *source socket cookie → [`Route`]*.
pub const ROUTES_MAP: &str = "ROUTES";
/// Name of the array *slot → [`Control`]*.
pub const CONTROL_MAP: &str = "CONTROL";
/// Name of the per-CPU array of [`Counter`] totals.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Capacity compiled into the probe; the loader sets the real one per core.
pub const DEFAULT_CAPACITY: u32 = 4096;

/// Key of `ROUTES`: the kernel's socket cookie (`SO_COOKIE` in userspace,
/// `bpf_get_socket_cookie` in the probe). Unlike addresses, it is never reused.
pub type SocketCookie = u64;

/// Where the bytes received on one socket go, and how many went there.
/// Written by userspace only before the socket enters the SockMap; after
/// that, only the probe writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Route {
    /// SockMap slot of the socket whose egress receives this socket's bytes
    /// (the socket's own slot for an echo).
    pub peer: u32,
    /// SockMap slot of this socket (its [`Control`] index).
    pub own: u32,
    /// [`route_flags`].
    pub flags: u32,
    pub reserved: u32,
    /// Bytes redirected to `peer` so far.
    pub redirected: u64,
    /// Socket buffers redirected to `peer` so far.
    pub skbs: u64,
    /// Bytes passed up to this socket's own receive queue (for userspace).
    pub passed: u64,
}

/// Bits of [`Route::flags`].
pub mod route_flags {
    /// The probe passes this socket's bytes up to userspace instead of
    /// redirecting them: set when the credit ran out or a redirect failed
    /// (the peer slot was empty), cleared by the probe once userspace
    /// forwarded every byte passed up and credit is available again.
    pub const TO_USERSPACE: u32 = 1;
}

/// What userspace tells the probe about one slot's socket (as a source).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// The probe may redirect while `Route::redirected` stays within this.
    pub credit: u64,
    /// Bytes of those passed up that userspace has handed to the
    /// destination's TCP send queue.
    pub forwarded: u64,
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
    /// the route fell back to userspace).
    PassedBytes = 2,
    /// Socket buffers passed to the socket's own receive queue.
    PassedSkbs = 3,
    /// Redirects that failed because the peer slot was empty.
    RedirectFailures = 4,
    /// Times a route ran out of credit and went to userspace.
    CreditExhausted = 5,
    /// Times a route came back from userspace to redirecting.
    Resumed = 6,
}

impl Counter {
    /// Number of slots in `COUNTERS`.
    pub const COUNT: u32 = 7;
}

// SAFETY: `Route` and `Control` are `#[repr(C)]`, made of integers only,
// with no padding (4 × u32 then u64s), so every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Route {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Control {}
