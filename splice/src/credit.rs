//! The flow-control policy, pure (no kernel, no socket): how far a spliced
//! source may redirect (its credit), when that credit is renewed, when its
//! window grows, and when a connection is given up as stuck. The flow task
//! ([`super::flow`]) and a leg forwarding passed-up bytes
//! ([`super::forward`]) read the counters and apply these rules; the probe
//! redirects while a source's redirected count stays within its credit and
//! passes bytes up past it (see [`splice_common`]).

/// A direction's window when it is spliced.
pub const INITIAL_WINDOW: u64 = 4 << 20;

/// A spliced socket's send buffer, in windows of the direction that sends
/// into it: room for what the flow control lets the kernel hold, with the
/// kernel's per-buffer overhead.
pub const SEND_BUFFER_LIMITS: u64 = 4;

/// Bytes passed up but not yet forwarded, beyond what a receive buffer
/// holds, in windows, past which a connection is reset.
pub const STUCK_LIMITS: u64 = 8;

/// Whether a source that redirected `redirected` bytes has less than half
/// its `window` of `credit` left. Only then is the credit renewed: renewing
/// reads the destination's TCP counters (a system call), while this check
/// reads memory-mapped counters only.
pub fn needs_renewal(redirected: u64, window: u64, credit: u64) -> bool {
    redirected + window / 2 > credit
}

/// The credit after a renewal: one window past what the destination's peer
/// acknowledged of the redirected bytes (`acked`), never less than the
/// credit already given (the probe may have redirected up to it).
pub fn renewed(credit: u64, acked: u64, window: u64) -> u64 {
    credit.max(acked + window)
}

/// The window after a renewal. It doubles, up to `limit`, when the source
/// ran out of credit (`ran_out`: it passed bytes up since the last renewal)
/// while its destination kept up (less than half a window of redirected
/// bytes unacknowledged): then the renewals, not the destination, were too
/// slow for the stream, as TCP's receive-buffer autotuning reasons. A
/// destination that does not keep up never grows its window, so what the
/// probe redirects to it stays within one window.
pub fn grown_window(window: u64, limit: u64, ran_out: bool, unacknowledged: u64) -> u64 {
    if ran_out && window < limit && unacknowledged < window / 2 {
        (window * 2).min(limit)
    } else {
        window
    }
}

/// Bytes passed up but not yet forwarded past which a connection is reset:
/// more than the largest receive buffer plus [`STUCK_LIMITS`] windows (the
/// kernel holds bytes passed up behind a busy redirect queue outside any
/// socket buffer, so TCP flow control would not stop the sender).
pub fn stuck_limit(receive_buffer_max: u64, window: u64) -> u64 {
    receive_buffer_max + STUCK_LIMITS * window
}

/// Whether a source with `passed` bytes passed up, of which userspace
/// `forwarded` so far, is stuck (see [`stuck_limit`]).
pub fn is_stuck(passed: u64, forwarded: u64, receive_buffer_max: u64, window: u64) -> bool {
    passed.saturating_sub(forwarded) > stuck_limit(receive_buffer_max, window)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn credit_is_renewed_only_once_less_than_half_a_window_is_left() {
        let window = 4 * MIB;
        assert!(!needs_renewal(0, window, window));
        assert!(!needs_renewal(2 * MIB, window, window));
        assert!(needs_renewal(2 * MIB + 1, window, window));
        assert!(needs_renewal(window, window, window));
    }

    #[test]
    fn a_renewal_gives_a_window_past_what_was_acknowledged_and_never_takes_credit_back() {
        let window = 4 * MIB;
        assert_eq!(renewed(4 * MIB, 3 * MIB, window), 7 * MIB);
        // A destination that acknowledged nothing more: the credit stays.
        assert_eq!(renewed(7 * MIB, MIB, window), 7 * MIB);
    }

    #[test]
    fn the_window_doubles_only_for_a_source_that_ran_out_while_its_destination_kept_up() {
        let (window, limit) = (4 * MIB, 64 * MIB);
        assert_eq!(grown_window(window, limit, true, MIB), 8 * MIB);
        assert_eq!(
            grown_window(window, limit, false, MIB),
            window,
            "had credit left"
        );
        assert_eq!(
            grown_window(window, limit, true, 2 * MIB),
            window,
            "destination lags"
        );
        assert_eq!(
            grown_window(48 * MIB, limit, true, 0),
            limit,
            "capped at the limit"
        );
        assert_eq!(grown_window(limit, limit, true, 0), limit);
    }

    #[test]
    fn a_connection_is_stuck_past_a_receive_buffer_and_eight_windows_unforwarded() {
        let (buffer, window) = (32 * MIB, 4 * MIB);
        assert_eq!(stuck_limit(buffer, window), 64 * MIB);
        assert!(!is_stuck(64 * MIB, 0, buffer, window));
        assert!(is_stuck(64 * MIB + 1, 0, buffer, window));
        assert!(!is_stuck(100 * MIB, 40 * MIB, buffer, window));
        assert!(
            !is_stuck(0, 5, buffer, window),
            "forwarded ahead of the count"
        );
    }

    /// A source sending 64 MiB to a destination whose peer acknowledges a
    /// chunk late, its credit renewed every 10 MiB: with the probe's rule
    /// (redirect within the credit, pass up past it) it runs out while its
    /// window is smaller than the renewal period, passes bytes up, resumes
    /// at the next renewal with a doubled window, and once the window
    /// outgrew the period (at the limit) redirects everything.
    #[test]
    fn a_source_runs_out_passes_up_and_resumes_with_a_grown_window() {
        let (limit, step) = (16 * MIB, MIB);
        let mut window = INITIAL_WINDOW;
        let (mut credit, mut redirected, mut passed) = (window, 0u64, 0u64);
        let mut acked;
        let mut passed_at_renewal = 0;
        let (mut exhaustions, mut resumes, mut exhausted) = (0, 0, false);
        for chunk in 0..64 {
            // The destination's peer acknowledges a chunk late.
            acked = redirected;
            // The probe: redirect within the credit, pass the rest up.
            let room = credit.saturating_sub(redirected);
            let taken = step.min(room);
            redirected += taken;
            passed += step - taken;
            if taken < step && !exhausted {
                exhausted = true;
                exhaustions += 1;
            } else if taken == step && exhausted {
                exhausted = false;
                resumes += 1;
            }
            // Userspace forwards what was passed up (at once, here); a scan
            // renews the credit every 10 MiB, slower than the source at
            // first.
            if chunk % 10 == 9 && needs_renewal(redirected, window, credit) {
                window = grown_window(
                    window,
                    limit,
                    passed > passed_at_renewal,
                    redirected - acked,
                );
                passed_at_renewal = passed;
                credit = renewed(credit, acked, window);
            }
        }
        assert_eq!(redirected + passed, 64 * MIB);
        assert!(
            exhaustions >= 1 && resumes >= 1,
            "{exhaustions} exhaustions, {resumes} resumes"
        );
        assert_eq!(window, limit, "the window grew to the limit");
        assert!(
            redirected > passed,
            "mostly redirected: {redirected} vs {passed}"
        );
    }
}
