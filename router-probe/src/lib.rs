//! The router probe's types as its loader sees them: those of the shared
//! splice design (the probe itself is the `router-probe` binary target, built
//! for bpfel-unknown-none by `router`'s build script).
#![no_std]

pub use splice_common::*;
