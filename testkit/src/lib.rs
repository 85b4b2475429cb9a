//! Helpers for the integration tests of the binaries: start a server as a
//! child process, read its `stats:` lines, count its descriptors, and drive
//! clients over loopback with reproducible random data; backends that read
//! PROXY protocol headers (one in Rust, nginx) or that go down and up.
pub mod backends;
pub mod budget;
pub mod clients;
pub mod data;
pub mod dns;
pub mod netns;
pub mod no_sockmap;
pub mod privileges;
pub mod proxy_protocol;
pub mod server;
pub mod soak;
pub mod tls;
pub mod tools;

pub use server::{Server, Stats};
pub use tempfile::TempDir;

/// A directory for one test's files, named after `name`, removed with them
/// when dropped (a failing test's too).
pub fn temp_dir(name: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("router-{name}-"))
        .tempdir()
        .expect("a directory under the system's temporary one")
}
