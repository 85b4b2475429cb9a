//! Whether this process may load BPF programs. Kernel tests call
//! [`require_bpf`] first: outside CI they are skipped (with a message) when
//! not privileged; under `CI=true` a missing privilege fails the test, so CI
//! can never pass by skipping.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .unwrap_or(0)
}

/// True when CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN) are
/// effective (see `splice::user::capabilities`).
pub fn has_bpf_privileges() -> bool {
    let caps = effective_capabilities();
    let has = |cap: u32| caps & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_NET_ADMIN) && has(CAP_PERFMON))
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
