//! The router probe: every byte a spliced socket receives goes out of the
//! other socket of its connection, without reaching userspace.
//!
//! The loader routes the client socket to the backend's slot and the
//! backend socket to the client's; the shared verdict does the rest.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod probe {
    use aya_ebpf::{macros::stream_verdict, programs::SkBuffContext};

    #[stream_verdict]
    pub fn router_verdict(ctx: SkBuffContext) -> u32 {
        splice_ebpf::verdict(&ctx)
    }

    splice_ebpf::probe_support!();
}

/// Built for the host only so that `cargo check --workspace` works; the real
/// artefact is the bpfel-unknown-none object that `router`'s build script
/// makes.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
