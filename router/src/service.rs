//! Telling a service manager where the router is (systemd's `Type=notify`
//! protocol, through the `sd-notify` crate): `READY=1` once every executor
//! serves, `RELOADING=1` with `MONOTONIC_USEC` (which systemd 253 and later
//! require) when a SIGHUP reload starts and `READY=1` when it is done,
//! `STOPPING=1` when the drain starts. Without `NOTIFY_SOCKET` in the
//! environment nothing is sent.
use sd_notify::NotifyState;
use tracing::warn;

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!("telling the service manager ({states:?}): {e}");
    }
}

/// Serving (at start, and after a reload).
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Serving, as the service's main process: after an upgrade the new
/// process is the one systemd must follow (`MAINPID`, accepted with
/// `NotifyAccess=all`); at a plain start it is the same process anyway.
pub fn ready_as_main(status: &str) {
    notify(&[
        NotifyState::Ready,
        NotifyState::MainPid(std::process::id()),
        NotifyState::Status(status),
    ]);
}

/// A reload starts.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(e) => warn!("reading the monotonic clock for the service manager: {e}"),
    }
}

/// The drain starts.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}
