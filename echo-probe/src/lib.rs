//! The echo probe's types as its loader sees them: those of the shared splice
//! design (the probe itself is the `echo-probe` binary target, built for
//! bpfel-unknown-none by `echo`'s build script).
#![no_std]

pub use splice_common::*;
