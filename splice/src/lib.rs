//! Splicing TCP sockets inside the kernel with a SockMap and an sk_skb stream
//! verdict.
//!
//! One crate serves both halves of the design so that their shared `#[repr(C)]`
//! types cannot drift apart:
//! - [`shared`] (always, `no_std`): map names and the key/value types both the
//!   probe and userspace read and write;
//! - `verdict` (only when compiled for `target_arch = "bpf"`): the maps and the
//!   stream verdict program body that the probe crates export;
//! - `user` (feature `user`): loading a probe per core, inserting sockets,
//!   flow control, and the careful drain-then-close that loses no byte;
//! - `build` (feature `build`): building a probe crate from a build script.
#![cfg_attr(not(any(feature = "user", feature = "build")), no_std)]

pub mod shared;

#[cfg(target_arch = "bpf")]
pub mod verdict;

#[cfg(feature = "user")]
pub mod user;

#[cfg(feature = "build")]
pub mod build;
