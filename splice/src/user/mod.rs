//! The userspace side of splicing: what a loader does around the probe.
//!
//! - [`capabilities`]: can this process load probes at all?
//! - [`probe`]: one loaded copy of a probe (per executor), its slots, and
//!   [`probe::Splice`], the guard of the sockets it holds;
//! - [`socket`]: the few raw socket queries the design needs (cookie, bytes
//!   handed to TCP, kick, abort);
//! - [`forward`]: one direction of a connection, which copies what the probe
//!   passed up and, at end of stream, waits until every byte reached the
//!   destination socket before sending FIN;
//! - [`kernel_view`]: the maps of a loaded probe, readable from any thread;
//! - [`runtime`]: listeners, one pinned executor per core, signals.
pub mod capabilities;
pub mod forward;
pub mod kernel_view;
pub mod probe;
pub mod runtime;
pub mod socket;

pub use forward::{Leg, LegError, Spliced};
pub use kernel_view::{KernelTotals, KernelView};
pub use probe::{InsertError, LoadError, Probe, ProbeConfig, Splice};
