//! Helpers for the integration tests of the binaries: start a server as a
//! child process, read its `stats:` lines, count its descriptors, and drive
//! clients over loopback with reproducible random data.
pub mod backends;
pub mod clients;
pub mod data;
pub mod privileges;
pub mod server;
pub mod soak;
pub mod tls;

pub use server::{Server, Stats};
