//! A stream verdict the verifier rejects (it reads a map value without the
//! null check) but is otherwise the echo probe, with the same maps. Only the
//! tests load it, to see the verifier log surface.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod probe {
    use aya_ebpf::{
        bindings::sk_action,
        macros::{map, stream_verdict},
        maps::Array,
        programs::SkBuffContext,
    };

    #[map(name = "REJECT")]
    static REJECT: Array<u32> = Array::with_max_entries(1, 0);

    #[stream_verdict]
    pub fn reject_verdict(ctx: SkBuffContext) -> u32 {
        let index = ctx.len();
        // The verifier cannot prove `index` is in bounds, so `get_ptr` may
        // return null, and reading through it unchecked is refused.
        let value = REJECT.get_ptr(index).unwrap_or(core::ptr::null());
        // SAFETY: deliberately unsound for the verifier to reject; never run.
        if unsafe { core::ptr::read_volatile(value) } == 0 {
            return sk_action::SK_PASS;
        }
        splice_ebpf::verdict(&ctx)
    }

    splice_ebpf::probe_support!();
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
