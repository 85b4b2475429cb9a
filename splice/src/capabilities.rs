//! Checks, before loading anything, that this process may load probes and
//! insert sockets, so that the error names what is missing; and drops, once
//! the probes are loaded, every capability the running server does not need
//! (with the `caps` crate: capget/capset, prctl).
//!
//! CAP_PERFMON is needed as well as CAP_BPF: without it the verifier also
//! walks the speculative paths of every branch (Spectre v1 hardening for
//! programs of unprivileged users) and gives up on the probes ("The
//! sequence of 8193 jumps is too complex"), measured on 6.18.
use std::{collections::HashSet, fmt, io};

use caps::CapSet;
pub use caps::Capability;

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
    let effective = caps::read(None, CapSet::Effective).unwrap_or_default();
    let admin = effective.contains(&Capability::CAP_SYS_ADMIN);
    let missing: Vec<&'static str> = [
        (Capability::CAP_BPF, "CAP_BPF"),
        (Capability::CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (Capability::CAP_PERFMON, "CAP_PERFMON"),
    ]
    .into_iter()
    .filter(|(cap, _)| !admin && !effective.contains(cap))
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingCapabilities(missing))
    }
}

/// Makes every permitted capability of the calling thread effective. A
/// binary given file capabilities without the effective bit (`setcap
/// cap_bpf,...=p`, as the container image does, for a non-root user where
/// the runtime sets no ambient capabilities) starts with them permitted
/// only. The effective bit would do this in the kernel, but then exec fails
/// outright wherever the bounding set lacks one of them (a container run
/// without them); this way the router starts and [`check`] says what is
/// missing. Call it before any thread starts, so that they inherit it.
pub fn raise_permitted() -> io::Result<()> {
    let permitted = caps::read(None, CapSet::Permitted).map_err(other)?;
    caps::set(None, CapSet::Effective, &permitted).map_err(other)
}

/// Capabilities a splicing server needs once its probes are loaded and its
/// listeners bound: CAP_NET_ADMIN only, for the per-connection socket
/// options (`TCP_REPAIR` to read where a stream starts, `SO_SNDBUFFORCE`).
/// Map updates on the maps it already holds need no capability (measured on
/// 6.18: sockets are inserted, routes written and counters read after
/// CAP_BPF is gone).
pub const RUNTIME: &[Capability] = &[Capability::CAP_NET_ADMIN];

/// Capabilities loading a probe uses: CAP_BPF for the maps and programs,
/// CAP_NET_ADMIN for sk_skb programs and the socket options, and
/// CAP_PERFMON where the process has it. Without CAP_PERFMON the verifier
/// also walks the speculative paths of every branch (Spectre v1
/// mitigation) and rejects the verdict ("The sequence of 8193 jumps is too
/// complex", measured on 6.18), so in practice it is needed too.
pub const LOAD: &[Capability] = &[
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_PERFMON,
];

fn other(error: caps::errors::CapsError) -> io::Error {
    io::Error::other(error.to_string())
}

/// Drops, for the calling thread, every capability but those of `keep`
/// that it has: from the effective, permitted and inheritable sets, the
/// ambient set and (with CAP_SETPCAP, as root has it) the bounding set; and
/// sets `no_new_privs`, so that no exec can bring any back, whatever the
/// bounding set. Capabilities belong to threads: call it on every thread
/// that should lose them (threads started afterwards inherit the reduced
/// sets). Returns the capabilities kept.
pub fn retain_only(keep: &[Capability]) -> io::Result<HashSet<Capability>> {
    // SAFETY: plain prctl with integer arguments; it needs no privilege.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The bounding set first, while CAP_SETPCAP (if any) is still there.
    limit_bounding_set(keep);
    // Best effort, as the bounding set: a kernel without ambient
    // capabilities has none to clear.
    let _ = caps::clear(None, CapSet::Ambient);
    let kept: HashSet<Capability> = caps::read(None, CapSet::Permitted)
        .map_err(other)?
        .into_iter()
        .filter(|cap| keep.contains(cap))
        .collect();
    caps::clear(None, CapSet::Inheritable).map_err(other)?;
    // Effective must stay within permitted: narrow it first.
    caps::set(None, CapSet::Effective, &kept).map_err(other)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(other)?;
    Ok(kept)
}

/// Drops from the calling thread's bounding set every capability not in
/// `keep`, where it may: that takes CAP_SETPCAP, and a later call no longer
/// has it once [`retain_only`] dropped it, so a process that will narrow
/// its capabilities in steps calls this first with the last step's set.
/// Without CAP_SETPCAP nothing changes, which is fine: a thread regains a
/// capability outside its permitted set only through exec, and
/// `no_new_privs` makes exec gain nothing.
pub fn limit_bounding_set(keep: &[Capability]) {
    for cap in caps::runtime::thread_all_supported() {
        if !keep.contains(&cap) {
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
}

/// Whether the calling thread's bounding set holds nothing but `kept`.
pub fn bounding_set_within(kept: &HashSet<Capability>) -> Option<bool> {
    let bounding = caps::read(None, CapSet::Bounding).ok()?;
    Some(bounding.is_subset(kept))
}

/// Names of `caps`, sorted, for logs.
pub fn names(caps: &HashSet<Capability>) -> Vec<String> {
    let mut names: Vec<String> = caps.iter().map(ToString::to_string).collect();
    names.sort();
    names
}
