//! Counters of one executor, and the `stats:` line that sums them with the
//! probes' in-kernel counters.
use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use splice::user::{KernelTotals, KernelView};

use crate::Mode;

/// Counters one executor updates and the main thread reads.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    /// Connections whose socket went into the SockMap.
    pub spliced: AtomicU64,
    /// Connections echoed by userspace (copy mode or fallback).
    pub copied: AtomicU64,
    /// Spliced connections whose first bytes arrived before the insert.
    pub early: AtomicU64,
    /// Fallbacks because every SockMap slot was taken.
    pub sockmap_full: AtomicU64,
    /// Fallbacks because the insert failed (e.g. the client already closed).
    pub insert_failed: AtomicU64,
    /// Connections ended by an error (reset passed on).
    pub resets: AtomicU64,
    /// Payload bytes userspace read from clients.
    pub userspace_bytes: AtomicU64,
    /// SockMap slots held by connections right now.
    pub slots_in_use: AtomicU64,
}

impl ShardStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Everything a `stats:` line reports.
pub struct Report<'a> {
    pub mode: Mode,
    pub shards: &'a [std::sync::Arc<ShardStats>],
    pub kernel: &'a [KernelView],
}

impl Report<'_> {
    /// One line of `key=value` pairs: userspace counters summed over the
    /// executors, then the probes' counters summed over cores and CPUs.
    pub fn line(&self) -> String {
        let sum = |field: fn(&ShardStats) -> &AtomicU64| -> u64 {
            self.shards.iter().map(|s| field(s).load(Relaxed)).sum()
        };
        let mode = match self.mode {
            Mode::Ebpf => "ebpf",
            Mode::Copy => "copy",
        };
        let mut line = format!(
            "stats: mode={mode} cores={} accepted={} active={} spliced={} early={} copied={} \
             sockmap_full={} insert_failed={} resets={} userspace_bytes={} slots_in_use={}",
            self.shards.len(),
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
        if self.kernel.is_empty() {
            line.push_str(" kernel=not-loaded");
            return line;
        }
        let mut totals = KernelTotals::default();
        for view in self.kernel {
            match view.totals() {
                Ok(t) => totals += t,
                Err(e) => {
                    let _ = write!(line, " kernel=unreadable({e})");
                    return line;
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
        line
    }
}
