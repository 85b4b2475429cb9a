//! Whether this process may load BPF programs. Kernel tests call
//! [`require_bpf`] first: outside CI they are skipped (with a message) when
//! not privileged; under `CI=true` a missing privilege fails the test, so CI
//! can never pass by skipping.
use caps::{CapSet, Capability};

/// True when CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN) are
/// effective (see `splice::capabilities`).
pub fn has_bpf_privileges() -> bool {
    let effective = caps::read(None, CapSet::Effective).unwrap_or_default();
    effective.contains(&Capability::CAP_SYS_ADMIN)
        || [
            Capability::CAP_BPF,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_PERFMON,
        ]
        .iter()
        .all(|cap| effective.contains(cap))
}

/// Returns whether the calling test may go on. Panics under `CI=true` when
/// the privileges are missing.
pub fn require_bpf(test: &str) -> bool {
    if has_bpf_privileges() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "{test}: needs CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON (root); CI=true forbids skipping"
        );
    }
    eprintln!("SKIPPED {test}: needs CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON (run as root)");
    false
}
