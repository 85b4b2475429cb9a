//! The `stats:` line of `ebpf-echo`: the shared splice counters summed over
//! the executors, then the probes' in-kernel counters.
use std::sync::Arc;

use splice::{
    KernelView,
    stats::{self, SpliceStats},
};

use crate::Mode;

/// Everything a `stats:` line reports.
pub struct Report<'a> {
    pub mode: Mode,
    pub shards: &'a [Arc<SpliceStats>],
    pub kernel: &'a [KernelView],
}

impl Report<'_> {
    pub fn line(&self) -> String {
        let mode = match self.mode {
            Mode::Ebpf => "ebpf",
            Mode::Copy => "copy",
        };
        let mut line = format!("stats: mode={mode} cores={}", self.shards.len());
        SpliceStats::write_sum(&mut line, self.shards.iter().map(|s| &**s));
        stats::write_kernel(&mut line, self.kernel);
        line
    }
}
