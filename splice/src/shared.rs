//! Types and names shared by the probe (in the kernel) and its loader.
//!
//! The maps of one loaded probe:
//! - `SOCKETS`: a SockMap, one slot per spliced socket;
//! - `ROUTES`: socket cookie of a source socket → [`Route`] (which slot its
//!   bytes go to, and how many went);
//! - `COUNTERS`: per-CPU totals indexed by [`Counter`].

/// Name of the SockMap holding every spliced socket.
pub const SOCKETS_MAP: &str = "SOCKETS";
/// Name of the hash map *source socket cookie → [`Route`]*.
pub const ROUTES_MAP: &str = "ROUTES";
/// Name of the per-CPU array of [`Counter`] totals.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Capacity compiled into the probe; the loader sets the real one per core.
pub const DEFAULT_CAPACITY: u32 = 4096;

/// Key of `ROUTES`: the kernel's socket cookie (`SO_COOKIE` in userspace,
/// `bpf_get_socket_cookie` in the probe). Unlike addresses, it is never reused.
pub type SocketCookie = u64;

/// Where the bytes received on one socket go, and how many went there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Route {
    /// SockMap slot of the socket whose egress receives this socket's bytes
    /// (the socket's own slot for an echo).
    pub peer: u32,
    /// [`route_flags`].
    pub flags: u32,
    /// Bytes redirected to `peer` so far (written only by the probe).
    pub bytes: u64,
    /// Socket buffers redirected to `peer` so far.
    pub skbs: u64,
}

/// Bits of [`Route::flags`].
pub mod route_flags {
    /// Set by the probe when a redirect failed (the peer slot was empty): from
    /// then on every byte of this source is passed to its own receive queue,
    /// for userspace to forward. Sticky, so that no later byte can overtake
    /// the ones already passed up.
    pub const TO_USERSPACE: u32 = 1;
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
}

impl Counter {
    /// Number of slots in `COUNTERS`.
    pub const COUNT: u32 = 5;
    /// Every counter, in slot order.
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::RedirectedBytes,
        Counter::RedirectedSkbs,
        Counter::PassedBytes,
        Counter::PassedSkbs,
        Counter::RedirectFailures,
    ];
}

// SAFETY: `Route` is `#[repr(C)]`, made of integers only, with no padding
// (u32, u32, u64, u64), so every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Route {}
