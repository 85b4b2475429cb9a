//! The in-kernel half of splicing, for the probe binaries (`router-probe`,
//! `echo-probe`): the maps and the stream verdict they export, and the items
//! every probe needs. Built for bpfel-unknown-none only; on the host this
//! crate is empty, so that `cargo check --workspace` works.
#![no_std]

#[cfg(target_arch = "bpf")]
pub mod verdict;

#[cfg(target_arch = "bpf")]
pub use verdict::verdict;
