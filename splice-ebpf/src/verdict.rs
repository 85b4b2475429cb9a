//! The in-kernel half: the maps and the stream verdict every probe exports.
//!
//! The verdict looks up the route of the socket the bytes arrived on and
//! redirects them to the egress of the route's peer, within the credit
//! userspace granted (see [`crate::shared`]). Bytes are never dropped here
//! (but for a stream that cannot be placed, see `BROKEN`): with no route, no
//! credit left, or the peer gone, they are passed to the socket's own
//! receive queue, where userspace reads and forwards them.
use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action,
    helpers::{bpf_get_socket_cookie, bpf_skb_adjust_room},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, SockMap},
    programs::SkBuffContext,
};

use splice_common::{
    Control, Counter, DEFAULT_CAPACITY, MAP_MMAPABLE, Route, SocketCookie, Stream, stream_flags,
};

#[map(name = "HELD")]
static HELD: SockMap = SockMap::with_max_entries(DEFAULT_CAPACITY, 0);

#[map(name = "SPLICED")]
static SPLICED: SockMap = SockMap::with_max_entries(DEFAULT_CAPACITY, 0);

#[map(name = "ROUTES")]
static ROUTES: HashMap<SocketCookie, Route> = HashMap::with_max_entries(DEFAULT_CAPACITY, 0);

#[map(name = "STREAMS")]
static STREAMS: Array<Stream> = Array::with_max_entries(DEFAULT_CAPACITY, MAP_MMAPABLE);

#[map(name = "CONTROL")]
static CONTROL: Array<Control> = Array::with_max_entries(DEFAULT_CAPACITY, MAP_MMAPABLE);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Redirect flags: 0 sends the bytes out of the peer (its egress);
/// `BPF_F_INGRESS` would queue them to the peer's own receive queue instead.
const TO_PEER_EGRESS: u64 = 0;
/// Most bytes one `bpf_skb_adjust_room` call may remove from an sk_skb.
const TRIM_STEP: u32 = 0xfff;
/// Trim calls per socket buffer: 128 × 4095 B covers any skb here (64 KiB
/// with GSO, 512 KiB with BIG TCP).
const MAX_TRIM_STEPS: u32 = 128;

/// Body of the `stream_verdict` program, attached to `SPLICED`.
///
/// It runs without a stream parser, on socket buffers taken straight off the
/// TCP receive queue. The kernel hands them over whole: one that partially
/// repeats bytes already taken (a retransmission that overlaps) would reach
/// the peer twice (measured on 6.18: 1 connection in ~4,000 got up to
/// 208 KB replayed). So the verdict follows each socket's TCP sequence and
/// trims the repeat. (A stream parser skips such repeats itself, but bytes it
/// passes up can deadlock the socket, measured: recv returns EAGAIN forever
/// once they fill the receive buffer, which rules out the flow control.)
#[inline(always)]
pub fn verdict(ctx: &SkBuffContext) -> u32 {
    // A buffer without payload (the FIN arrived on its own) carries nothing
    // to forward, and redirecting it breaks the peer: the kernel's redirect
    // worker takes the 0-byte send for a hard error and sets EPIPE on the
    // peer socket (measured: echo connections reset at their end).
    if ctx.len() == 0 {
        return sk_action::SK_DROP;
    }
    // SAFETY: the helper only reads the socket of the skb behind `ctx`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: userspace writes a route before the socket enters `SPLICED`
    // and removes it after the socket left, so a found route is stable.
    let Some(route) = (unsafe { ROUTES.get(cookie) }) else {
        return pass_up(u64::from(ctx.len()));
    };
    let (own, peer) = (route.own, route.peer);
    let Some(stream) = STREAMS.get_ptr_mut(own) else {
        return pass_up(u64::from(ctx.len()));
    };
    // SAFETY: array values live as long as the map; the kernel runs the
    // verdict of one socket under its socket lock and userspace writes a
    // slot only while its socket is out of `SPLICED`: a single writer.
    let stream = unsafe { &mut *stream };
    if stream.flags & stream_flags::BROKEN != 0 || !align_to_stream(ctx, stream) {
        return sk_action::SK_DROP;
    }
    let len = u64::from(ctx.len());
    let control = match CONTROL.get_ptr(own) {
        // SAFETY: array values live as long as the map; userspace rewrites
        // them in place, and a torn read only makes the probe more cautious
        // (both fields only grow).
        Some(control) => unsafe { core::ptr::read_volatile(control) },
        None => Control::default(),
    };
    let within_credit = stream.redirected + len <= control.credit;
    if stream.flags & stream_flags::TO_USERSPACE != 0 {
        // Back to redirecting only once userspace forwarded every byte
        // passed up: none of them can then be overtaken.
        if control.forwarded != stream.passed || !within_credit {
            return pass_up_stream(stream, len);
        }
        stream.flags &= !stream_flags::TO_USERSPACE;
        add(Counter::Resumed, 1);
    } else if !within_credit {
        stream.flags |= stream_flags::TO_USERSPACE;
        add(Counter::CreditExhausted, 1);
        return pass_up_stream(stream, len);
    }
    // SAFETY: `ctx` is the skb this program was called with.
    let verdict = unsafe { HELD.redirect_skb(ctx, peer, TO_PEER_EGRESS) } as u32;
    if verdict != sk_action::SK_PASS {
        // The peer left `HELD` (it closed): hand the bytes to userspace,
        // which sees the peer gone.
        stream.flags |= stream_flags::TO_USERSPACE;
        add(Counter::RedirectFailures, 1);
        return pass_up_stream(stream, len);
    }
    stream.redirected += len;
    stream.skbs += 1;
    add(Counter::RedirectedBytes, len);
    add(Counter::RedirectedSkbs, 1);
    verdict
}

#[inline(always)]
fn pass_up_stream(stream: &mut Stream, len: u64) -> u32 {
    stream.passed += len;
    pass_up(len)
}

/// Trims the bytes of `ctx` that come before `stream.next_seq` and advances
/// it past the rest. Returns false (and marks the stream broken) if the
/// buffer cannot be placed: a gap before it, or a failed trim.
#[inline(always)]
fn align_to_stream(ctx: &SkBuffContext, stream: &mut Stream) -> bool {
    // The kernel's TCP_SKB_CB(skb)->seq, which an sk_skb program reads as
    // cb[0] (the two control buffers overlap) for buffers taken straight off
    // the receive queue.
    let seq = ctx.cb()[0];
    let len = ctx.len();
    // Wrapping distance: positive when the buffer starts before the next
    // untaken byte (a repeat), negative when bytes are missing.
    let repeat = stream.next_seq.wrapping_sub(seq) as i32;
    if repeat < 0 || (repeat > 0 && repeat as u32 >= len) {
        return break_stream(stream);
    }
    if repeat > 0 {
        if !trim_front(ctx, repeat as u32) {
            return break_stream(stream);
        }
        add(Counter::Trimmed, 1);
        add(Counter::TrimmedBytes, repeat as u64);
    }
    stream.next_seq = stream.next_seq.wrapping_add(ctx.len());
    true
}

/// Removes `n` bytes from the front of `ctx`.
#[inline(always)]
fn trim_front(ctx: &SkBuffContext, mut n: u32) -> bool {
    for _ in 0..MAX_TRIM_STEPS {
        if n == 0 {
            return true;
        }
        let step = if n < TRIM_STEP { n } else { TRIM_STEP };
        // SAFETY: `ctx` is the skb this program runs on; a negative length
        // pulls bytes off its front (sk_skb supports no other mode).
        if unsafe { bpf_skb_adjust_room(ctx.skb.skb, -(step as i32), 0, 0) } != 0 {
            return false;
        }
        n -= step;
    }
    n == 0
}

#[inline(always)]
fn break_stream(stream: &mut Stream) -> bool {
    stream.flags |= stream_flags::BROKEN;
    add(Counter::Broken, 1);
    false
}

#[inline(always)]
fn pass_up(len: u64) -> u32 {
    add(Counter::PassedBytes, len);
    add(Counter::PassedSkbs, 1);
    sk_action::SK_PASS
}

#[inline(always)]
fn add(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only written by the program running on
        // that CPU, with preemption disabled.
        unsafe { *slot += n };
    }
}

/// The items every probe binary needs besides its program: a panic handler
/// (the verifier rejects any path that could reach it) and the licence the
/// kernel requires for the helpers used.
#[macro_export]
macro_rules! probe_support {
    () => {
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
            loop {}
        }

        // SAFETY: `license` is the section the loader reads the licence
        // from, and no other item of a probe is named LICENSE (no_mangle).
        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 4] = *b"GPL\0";
    };
}
