//! Checks, before loading anything, that this process may load probes and
//! insert sockets, so that the error names what is missing.
//!
//! CAP_PERFMON is needed as well as CAP_BPF: without it the verifier also
//! walks the speculative paths of every branch (Spectre v1 hardening for
//! programs of unprivileged users) and gives up on the probes ("The
//! sequence of 8193 jumps is too complex"), measured on 6.18.
use std::fmt;

/// Capability numbers from `linux/capability.h`.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Capabilities missing from the effective set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingCapabilities(pub Vec<&'static str>);

impl fmt::Display for MissingCapabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "missing capability {}: loading the probe and inserting sockets needs CAP_BPF, \
             CAP_NET_ADMIN and CAP_PERFMON (run as root, or grant them: \
             setcap cap_bpf,cap_net_admin,cap_perfmon+ep <binary>)",
            self.0.join(" and ")
        )
    }
}

impl std::error::Error for MissingCapabilities {}

/// Returns which of CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON the process lacks
/// (CAP_SYS_ADMIN stands in for each, as in the kernel's `bpf_capable`,
/// `bpf_net_capable` and `perfmon_capable`).
pub fn check() -> Result<(), MissingCapabilities> {
    let effective = effective_capabilities().unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingCapabilities(missing))
    }
}

fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}
