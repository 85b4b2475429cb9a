//! Time budgets of load tests, stretched on machines known to be slow.
//!
//! `TESTKIT_TIME_SCALE=N` (a whole number from 1 to 100; default 1)
//! multiplies them. `scripts/kernel-matrix.sh` sets it in its VMs, where
//! software emulation runs the same code several times slower. Only budgets
//! that bound how long a load may take scale; deadlines that are the
//! behaviour under test (an echo within a second, a server's own timeouts)
//! never do.
use std::time::Duration;

const VARIABLE: &str = "TESTKIT_TIME_SCALE";

/// `budget` times the scale of this machine.
pub fn budget(budget: Duration) -> Duration {
    budget * scale()
}

fn scale() -> u32 {
    match std::env::var(VARIABLE) {
        Err(std::env::VarError::NotPresent) => 1,
        Ok(text) => match text.parse::<u32>() {
            Ok(n @ 1..=100) => n,
            _ => panic!("{VARIABLE}={text:?}: expected a whole number from 1 to 100"),
        },
        Err(e) => panic!("{VARIABLE}: {e}"),
    }
}
