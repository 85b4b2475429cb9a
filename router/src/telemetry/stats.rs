//! The router's counters per executor and its `stats:` line: the shared
//! splice counters, refusals by reason, backend failures and backends
//! marked down, then the probes' in-kernel counters.
use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use splice::{
    KernelView,
    stats::{self, SpliceStats},
};

use crate::{health::Health, routes::Refusal};

/// One executor's counters.
#[derive(Debug, Default)]
pub struct RouterStats {
    pub splice: Arc<SpliceStats>,
    /// Connections given a backend.
    pub routed: AtomicU64,
    /// Refused connections, by [`Refusal::ALL`] index.
    pub refused: [AtomicU64; Refusal::ALL.len()],
    /// Backend connection attempts that failed (the next one was tried).
    pub backend_failures: AtomicU64,
    /// Connections closed at accept because a connection limit was reached.
    pub refused_limit: AtomicU64,
}

impl RouterStats {
    pub fn refused(&self, refusal: Refusal) -> &AtomicU64 {
        let index = Refusal::ALL
            .iter()
            .position(|r| *r == refusal)
            .expect("every refusal is in ALL");
        &self.refused[index]
    }
}

/// Everything a `stats:` line reports.
pub struct Report<'a> {
    pub mode: &'a str,
    pub shards: &'a [Arc<RouterStats>],
    pub kernel: &'a [KernelView],
    pub health: &'a Health,
}

impl Report<'_> {
    pub fn line(&self) -> String {
        let mut line = format!("stats: mode={} cores={}", self.mode, self.shards.len());
        SpliceStats::write_sum(&mut line, self.shards.iter().map(|s| &*s.splice));
        let sum = |field: &dyn Fn(&RouterStats) -> &AtomicU64| -> u64 {
            self.shards.iter().map(|s| field(s).load(Relaxed)).sum()
        };
        let _ = write!(line, " routed={}", sum(&|s| &s.routed));
        for refusal in Refusal::ALL {
            let _ = write!(
                line,
                " refused_{}={}",
                refusal.name(),
                sum(&|s| s.refused(refusal))
            );
        }
        let _ = write!(line, " refused_limit={}", sum(&|s| &s.refused_limit));
        let _ = write!(line, " backend_failures={}", sum(&|s| &s.backend_failures));
        let _ = write!(line, " backends_down={}", self.health.down());
        stats::write_kernel(&mut line, self.kernel);
        line
    }
}
