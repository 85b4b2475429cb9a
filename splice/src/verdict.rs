//! The in-kernel half: the maps and the stream parser and verdict every
//! probe exports.
//!
//! The verdict looks up the route of the socket the bytes arrived on and
//! redirects them to the egress of the route's peer slot, within the credit
//! userspace granted. Bytes are never dropped here: with no route, no credit
//! left, or an empty peer slot (the peer is not inserted yet), they are
//! passed to the socket's own receive queue, where userspace reads and
//! forwards them; see [`crate::shared`] for the flow control.
use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action,
    helpers::bpf_get_socket_cookie,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, SockMap},
    programs::SkBuffContext,
};

use crate::shared::{Control, Counter, DEFAULT_CAPACITY, Route, SocketCookie, route_flags};

#[map(name = "SOCKETS")]
static SOCKETS: SockMap = SockMap::with_max_entries(DEFAULT_CAPACITY, 0);

#[map(name = "ROUTES")]
static ROUTES: HashMap<SocketCookie, Route> = HashMap::with_max_entries(DEFAULT_CAPACITY, 0);

#[map(name = "CONTROL")]
static CONTROL: Array<Control> = Array::with_max_entries(DEFAULT_CAPACITY, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Redirect flags: 0 sends the bytes out of the peer (its egress);
/// `BPF_F_INGRESS` would queue them to the peer's own receive queue instead.
const TO_PEER_EGRESS: u64 = 0;

/// Body of the `stream_parser` program: every socket buffer is a message of
/// its own, so the verdict runs as soon as bytes arrive.
///
/// The parser is there for correctness, not framing: without one, the kernel
/// hands the verdict whole socket buffers straight from the receive queue,
/// including the already-delivered head of a partially overlapping
/// retransmission, so the peer receives those bytes twice (measured on 6.18:
/// 1 connection in ~4,000 got 95,232 bytes replayed). The parser path reads
/// the queue from the socket's sequence number and skips such overlaps.
#[inline(always)]
pub fn parse(ctx: &SkBuffContext) -> u32 {
    ctx.len()
}

/// Body of the `stream_verdict` program.
#[inline(always)]
pub fn verdict(ctx: &SkBuffContext) -> u32 {
    let len = u64::from(ctx.len());
    // SAFETY: the helper only reads the socket of the skb behind `ctx`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(route) = ROUTES.get_ptr_mut(cookie) else {
        return pass_up(len);
    };
    // SAFETY: entries are preallocated and removed by userspace only after
    // both sockets of a route stopped receiving, so the pointer stays valid;
    // the kernel runs the verdict of one socket under its socket lock, so
    // there is a single writer per route.
    let route = unsafe { &mut *route };
    let control = match CONTROL.get_ptr(route.own) {
        // SAFETY: array values are never freed; userspace rewrites them in
        // place, and a torn read only makes the probe more cautious (both
        // fields only grow).
        Some(control) => unsafe { core::ptr::read_volatile(control) },
        None => Control::default(),
    };
    let within_credit = route.redirected + len <= control.credit;
    if route.flags & route_flags::TO_USERSPACE != 0 {
        // Back to redirecting only once userspace forwarded every byte
        // passed up: none of them can then be overtaken.
        if control.forwarded != route.passed || !within_credit {
            return pass_up_routed(route, len);
        }
        route.flags &= !route_flags::TO_USERSPACE;
        add(Counter::Resumed, 1);
    } else if !within_credit {
        route.flags |= route_flags::TO_USERSPACE;
        add(Counter::CreditExhausted, 1);
        return pass_up_routed(route, len);
    }
    // SAFETY: `ctx` is the skb this program was called with.
    let verdict = unsafe { SOCKETS.redirect_skb(ctx, route.peer, TO_PEER_EGRESS) } as u32;
    if verdict != sk_action::SK_PASS {
        // Empty peer slot: hand the bytes to userspace until it caught up.
        route.flags |= route_flags::TO_USERSPACE;
        add(Counter::RedirectFailures, 1);
        return pass_up_routed(route, len);
    }
    route.redirected += len;
    route.skbs += 1;
    add(Counter::RedirectedBytes, len);
    add(Counter::RedirectedSkbs, 1);
    verdict
}

#[inline(always)]
fn pass_up_routed(route: &mut Route, len: u64) -> u32 {
    route.passed += len;
    pass_up(len)
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
