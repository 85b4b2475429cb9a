//! Checks, before loading anything, that this process may load probes and
//! insert sockets, so that the error names what is missing; and drops, once
//! the probes are loaded, every capability the running server does not need.
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
            "missing capability {}: loading the probe and inserting sockets needs CAP_BPF and \
             CAP_NET_ADMIN, and the verifier accepts the probe only with CAP_PERFMON too (run \
             as root, or grant them: setcap cap_bpf,cap_net_admin,cap_perfmon+ep <binary>)",
            self.0.join(" and ")
        )
    }
}

impl std::error::Error for MissingCapabilities {}

/// Returns which of CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON the process lacks
/// (CAP_SYS_ADMIN stands in for each, as in the kernel's `bpf_capable`,
/// `bpf_net_capable` and `perfmon_capable`). Without CAP_PERFMON the
/// verifier rejects the probe (see [`LOAD`]).
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

/// Capabilities a splicing server needs once its probes are loaded and its
/// listeners bound: CAP_NET_ADMIN only, for the per-connection socket
/// options (`TCP_REPAIR` to read where a stream starts, `SO_SNDBUFFORCE`).
/// Map updates on the maps it already holds need no capability (measured on
/// 6.18: sockets are inserted, routes written and counters read after
/// CAP_BPF is gone).
pub const RUNTIME: &[u32] = &[CAP_NET_ADMIN];

/// Capabilities loading a probe uses: CAP_BPF for the maps and programs,
/// CAP_NET_ADMIN for sk_skb programs and the socket options, and
/// CAP_PERFMON where the process has it. Without CAP_PERFMON the verifier
/// also walks the speculative paths of every branch (Spectre v1
/// mitigation) and rejects the verdict ("The sequence of 8193 jumps is too
/// complex", measured on 6.18), so in practice it is needed too.
pub const LOAD: &[u32] = &[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON];

/// `struct __user_cap_header_struct` and `__user_cap_data_struct` of
/// `linux/capability.h` (version 3: two 32-bit words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Highest capability number the kernel knows, from procfs.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops, for the calling thread, every capability but those of `keep`
/// that it has: from the effective, permitted and inheritable sets, the
/// ambient set and (with CAP_SETPCAP, as root has it) the bounding set; and
/// sets `no_new_privs`, so that no exec can bring any back, whatever the
/// bounding set. Capabilities belong to threads: call it on every thread
/// that should lose them (threads started afterwards inherit the reduced
/// sets). Returns the capabilities kept.
pub fn retain_only(keep: &[u32]) -> std::io::Result<u64> {
    // SAFETY: plain prctl with integer arguments; it needs no privilege.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let keep_mask = mask(keep);
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes one header and two data structs, which both
    // point to, valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let permitted = u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32);
    let kept = permitted & keep_mask;
    // The bounding set first, while CAP_SETPCAP (if any) is still there.
    limit_bounding_set(keep);
    // SAFETY: plain prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let data = [
        CapData {
            effective: kept as u32,
            permitted: kept as u32,
            inheritable: 0,
        },
        CapData {
            effective: (kept >> 32) as u32,
            permitted: (kept >> 32) as u32,
            inheritable: 0,
        },
    ];
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads one header and two data structs, valid for the
    // call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(kept)
}

fn mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |mask, cap| mask | (1 << cap))
}

/// Drops from the calling thread's bounding set every capability not in
/// `keep`, where it may: that takes CAP_SETPCAP, and a later call no longer
/// has it once [`retain_only`] dropped it, so a process that will narrow
/// its capabilities in steps calls this first with the last step's set.
/// Without CAP_SETPCAP nothing changes, which is fine: a thread regains a
/// capability outside its permitted set only through exec, and
/// `no_new_privs` makes exec gain nothing.
pub fn limit_bounding_set(keep: &[u32]) {
    let keep_mask = mask(keep);
    for cap in 0..=last_capability() {
        if keep_mask & (1 << cap) == 0 {
            // SAFETY: plain prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
}

/// The calling thread's bounding set (`CapBnd`), for logs.
pub fn bounding_set() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapBnd:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Names of the capabilities in `mask` that this module knows, for logs.
pub fn names(mask: u64) -> Vec<&'static str> {
    [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_BPF, "CAP_BPF"),
    ]
    .into_iter()
    .filter(|(cap, _)| mask & (1 << cap) != 0)
    .map(|(_, name)| name)
    .collect()
}
