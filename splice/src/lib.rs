//! Splicing TCP sockets inside the kernel, the userspace side: what a
//! loader does around the probe (`splice-common` holds the types both
//! sides share, `splice-ebpf` the in-kernel code).
//!
//! - [`capabilities`]: can this process load probes at all?
//! - [`pipe`]: a connection's two sockets joined until both directions
//!   end, spliced or copied: the one place that knows a splice's order;
//! - [`probe`]: loading one copy of a probe (per executor); its parts are
//!   `maps` (the maps userspace writes), `slots` (which connection holds
//!   which index) and the flow control's state (in [`flow`]);
//! - [`insert`]: a connection's sockets put into a probe, and
//!   [`insert::Splice`], the guard that removes them;
//! - [`streams`]: the probe's per-socket stream state, memory-mapped;
//! - [`credit`]: the flow-control policy, pure: credit, renewal, window
//!   growth, when a connection is stuck;
//! - [`flow`]: the flow control that keeps each spliced source's credit
//!   ahead of its destination, one task per executor;
//! - [`delivery`]: how much a destination took (TCP counters less what
//!   userspace wrote), measured by the flow control and a leg's drain;
//! - [`watches`]: the sources a probe's flow control watches, hot or cold;
//! - [`forward`]: one direction of a connection: copies what userspace must
//!   and, at end of stream, waits until every byte reached the destination
//!   socket before sending FIN;
//! - [`halves`]: a router's sockets outside glommio (accept, connect), and
//!   a connection's socket shared by its two legs;
//! - [`readiness`]: the epoll set where those sockets wait (one per
//!   executor, the only thing glommio polls for them);
//! - [`spliced_read`]: a spliced source's read, woken by the flow control
//!   when the probe passed bytes up;
//! - `epoll`: the epoll set that [`readiness`] uses;
//! - [`socket`]: the raw socket queries the design needs (cookie, sequence,
//!   bytes handed to TCP, kick, reset);
//! - [`kernel_view`]: the maps of a loaded probe, readable from any thread;
//! - [`shard`]: an executor's probe as connection tasks use it;
//! - [`stats`]: the counters of a splicing server and its `stats:` line;
//! - [`runtime`]: listeners, one pinned executor per core, signals.
pub mod capabilities;
pub mod credit;
pub mod delivery;
mod epoll;
pub mod flow;
pub mod forward;
pub mod halves;
pub mod handover;
pub mod insert;
pub mod kernel_view;
mod maps;
pub mod pipe;
pub mod probe;
pub mod readiness;
pub mod runtime;
pub mod shard;
mod slots;
pub mod socket;
pub mod spliced_read;
pub mod stats;
pub mod streams;
pub mod watches;

pub use forward::{Leg, LegError, Spliced};
pub use insert::{InsertError, Member, Splice};
pub use kernel_view::{KernelTotals, KernelView};
pub use probe::{LoadError, Probe, ProbeConfig};
