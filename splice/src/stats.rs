//! Counters a splicing server keeps per executor, and the `stats:` line
//! that sums them over executors with the probes' in-kernel counters.
use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use super::kernel_view::{KernelTotals, KernelView};

/// Counters one executor updates and the main thread reads.
#[derive(Debug, Default)]
pub struct SpliceStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    /// Connections whose sockets went into the SockMap.
    pub spliced: AtomicU64,
    /// Spliced connections whose first bytes arrived before the insert.
    pub early: AtomicU64,
    /// Connections forwarded by userspace (copy mode or fallback).
    pub copied: AtomicU64,
    /// Fallbacks because every SockMap slot was taken.
    pub sockmap_full: AtomicU64,
    /// Fallbacks because the insert failed (e.g. the client already closed).
    pub insert_failed: AtomicU64,
    /// Connections ended by an error (reset passed on).
    pub resets: AtomicU64,
    /// Payload bytes userspace read after the first packet.
    pub userspace_bytes: AtomicU64,
    /// SockMap slots held by connections right now.
    pub slots_in_use: AtomicU64,
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

impl SpliceStats {
    /// `key=value` pairs of these counters summed over `shards`.
    pub fn write_sum<'a>(line: &mut String, shards: impl Iterator<Item = &'a SpliceStats> + Clone) {
        let sum = |field: fn(&SpliceStats) -> &AtomicU64| -> u64 {
            shards.clone().map(|s| field(s).load(Relaxed)).sum()
        };
        let _ = write!(
            line,
            " accepted={} active={} spliced={} early={} copied={} sockmap_full={} \
             insert_failed={} resets={} userspace_bytes={} slots_in_use={}",
            sum(|s| &s.accepted),
            sum(|s| &s.active),
            sum(|s| &s.spliced),
            sum(|s| &s.early),
            sum(|s| &s.copied),
            sum(|s| &s.sockmap_full),
            sum(|s| &s.insert_failed),
            sum(|s| &s.resets),
            sum(|s| &s.userspace_bytes),
            sum(|s| &s.slots_in_use),
        );
    }
}

/// `key=value` pairs of the probes' counters summed over `views` (cores),
/// or `kernel=not-loaded`.
pub fn write_kernel(line: &mut String, views: &[KernelView]) {
    if views.is_empty() {
        line.push_str(" kernel=not-loaded");
        return;
    }
    let mut totals = KernelTotals::default();
    for view in views {
        match view.totals() {
            Ok(t) => totals += t,
            Err(e) => {
                let _ = write!(line, " kernel=unreadable({e})");
                return;
            }
        }
    }
    let _ = write!(
        line,
        " kernel_redirected_bytes={} kernel_redirected_skbs={} kernel_passed_bytes={} \
         kernel_redirect_failures={} kernel_credit_exhausted={} kernel_resumed={} \
         kernel_trimmed={} kernel_trimmed_bytes={} kernel_broken={} routes={}",
        totals.redirected_bytes,
        totals.redirected_skbs,
        totals.passed_bytes,
        totals.redirect_failures,
        totals.credit_exhausted,
        totals.resumed,
        totals.trimmed,
        totals.trimmed_bytes,
        totals.broken,
        totals.routes,
    );
}
