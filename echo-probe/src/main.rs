//! The echo probe: every byte a spliced socket receives goes back out of the
//! same socket, without reaching userspace.
//!
//! The loader routes each socket to its own SockMap slot, so the shared
//! verdict (source socket → destination slot, the router's design) echoes.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod probe {
    use aya_ebpf::{macros::stream_verdict, programs::SkBuffContext};

    #[stream_verdict]
    pub fn echo_verdict(ctx: SkBuffContext) -> u32 {
        splice_ebpf::verdict(&ctx)
    }

    splice_ebpf::probe_support!();
}

/// Built for the host only so that `cargo check --workspace` works; the real
/// artefact is the bpfel-unknown-none object that `echo`'s build script makes.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
