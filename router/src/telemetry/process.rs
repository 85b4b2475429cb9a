//! The standard process metrics, under the names Prometheus client
//! libraries give them (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`,
//! `process_start_time_seconds`), read from `/proc/self` when scraped.
use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

/// Reads `/proc/self` when encoded; registered without the `router_`
/// prefix.
#[derive(Debug)]
pub struct ProcessCollector;

/// What `/proc/self/stat` and friends say.
#[derive(Debug, Default, PartialEq)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub open_fds: u64,
    pub start_time_seconds: f64,
}

/// Clock ticks per second and the page size (of `/proc`'s figures).
fn sysconf(name: libc::c_int) -> u64 {
    // SAFETY: sysconf reads a system setting.
    u64::try_from(unsafe { libc::sysconf(name) }).unwrap_or(0)
}

/// Parses `/proc/self/stat` (fields after the command name, which may hold
/// spaces and parentheses) and `/proc/stat`'s `btime` line.
pub fn parse(stat: &str, proc_stat: &str, ticks: u64, page: u64) -> Option<Sample> {
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name, field 3 (state) is index 0: utime is field 14,
    // stime 15, starttime 22, rss (pages) 24.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let boot: u64 = proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())?;
    let ticks = ticks.max(1) as f64;
    Some(Sample {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        resident_bytes: field(24)? * page,
        open_fds: 0,
        start_time_seconds: boot as f64 + field(22)? as f64 / ticks,
    })
}

/// The process as it is now.
pub fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let proc_stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut sample = parse(
        &stat,
        &proc_stat,
        sysconf(libc::_SC_CLK_TCK),
        sysconf(libc::_SC_PAGESIZE),
    )?;
    sample.open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(sample)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(sample) = sample() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(sample.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                sample.resident_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                sample.open_fds as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                sample.start_time_seconds,
            ),
        ] {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_give_cpu_memory_and_start() {
        let stat = "4242 (router (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 3 0 1000 123456789 512 18446744073709551615";
        let sample = parse(stat, "cpu 1 2 3\nbtime 1700000000\n", 100, 4096).unwrap();
        assert_eq!(sample.cpu_seconds, 3.0);
        assert_eq!(sample.resident_bytes, 512 * 4096);
        assert_eq!(sample.start_time_seconds, 1_700_000_010.0);
        let now = self::sample().unwrap();
        assert!(now.open_fds >= 3 && now.resident_bytes > 0, "{now:?}");
    }
}
