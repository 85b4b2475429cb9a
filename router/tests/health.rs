//! Backend health checks: a backend that goes down is marked down after
//! `fall` failed checks and gets no new connection (not even an attempt),
//! comes back after `rise` passed checks; client connections that fail
//! count too (passive ejection). Health does not depend on how bytes are
//! forwarded, so these run in copy mode only.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use testkit::{
    Server, Stats, TempDir,
    backends::{SwitchableBackend, closed_port},
    clients, temp_dir,
};

const BIN: &str = env!("CARGO_BIN_EXE_router");

/// Writes `config` to a file of its own and starts the router with it.
fn start(tag: &str, config: &str) -> (Server, TempDir) {
    let dir = temp_dir(&format!("health-{tag}"));
    let path = dir.path().join("router.toml");
    std::fs::write(&path, config).unwrap();
    let router = Server::start(
        BIN,
        &[
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--mode",
            "copy",
        ],
    );
    (router, dir)
}

/// Opens `count` connections on the `hc` preamble route and counts which
/// backend answered each (backends answer `name:` then an echo).
fn spread(router: &Server, count: usize) -> HashMap<String, usize> {
    let mut answers = HashMap::new();
    for i in 0..count {
        let reply = clients::send_and_receive(router.addr, b"ROUTE hc\r\nhi".to_vec())
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        let reply = String::from_utf8_lossy(&reply).into_owned();
        let name = reply
            .strip_suffix(":hi")
            .unwrap_or_else(|| panic!("client {i}: unexpected reply {reply:?}"));
        *answers.entry(name.to_owned()).or_default() += 1;
    }
    answers
}

/// Polls the stats until `done` holds; returns them and how long it took.
fn wait(router: &mut Server, done: impl Fn(&Stats) -> bool) -> (Stats, Duration) {
    let started = Instant::now();
    let stats = router.wait_stats(done, Duration::from_secs(10));
    (stats, started.elapsed())
}

#[test]
fn a_backend_that_goes_down_is_skipped_until_it_is_back() {
    let a = SwitchableBackend::named("a");
    let b = SwitchableBackend::named("b");
    let config = format!(
        "[[route]]\nname = \"hc\"\npreamble = \"hc\"\nbackends = [\"{}\", \"{}\"]\n\
         health_check = {{ interval = \"100ms\", timeout = \"200ms\", rise = 2, fall = 3 }}\n",
        a.addr, b.addr
    );
    let (mut router, _dir) = start("down-up", &config);

    // Both healthy: round-robin (per core) uses both.
    let answers = spread(&router, 12);
    assert!(answers.get("a").copied().unwrap_or(0) >= 3, "{answers:?}");
    assert!(answers.get("b").copied().unwrap_or(0) >= 3, "{answers:?}");

    // A goes down: after 3 failed checks (about 200 to 300 ms) it is
    // marked down, and no new connection even tries it: the failed
    // attempts counter does not move.
    a.down();
    let (stats, detected) = wait(&mut router, |s| s.get("backends_down") == 1);
    eprintln!("down detected after {detected:?}");
    assert!(detected < Duration::from_secs(2), "{detected:?}");
    let failures = stats.get("backend_failures");
    assert_eq!(failures, 0, "no client tried A before it was marked down");
    let answers = spread(&router, 12);
    assert_eq!(answers.get("b"), Some(&12), "{answers:?}");
    let stats = router.stats();
    assert_eq!(stats.get("backend_failures"), failures, "{stats:?}");
    assert_eq!(stats.get("refused_unavailable"), 0, "{stats:?}");
    assert!(
        router
            .stderr()
            .contains("backend is down after 3 failed connects"),
        "{}",
        router.stderr()
    );

    // Both down: the router still tries them (and refuses only then).
    b.down();
    wait(&mut router, |s| s.get("backends_down") == 2);
    let refused = clients::send_and_receive(router.addr, b"ROUTE hc\r\nhi".to_vec()).unwrap();
    assert_eq!(refused, b"ERR unavailable\r\n");
    let stats = router.stats();
    assert_eq!(stats.get("backend_failures"), failures + 2, "{stats:?}");
    b.up();

    // A comes back: after 2 passed checks it gets connections again.
    a.up();
    let (_, recovered) = wait(&mut router, |s| s.get("backends_down") == 0);
    eprintln!("recovery detected after {recovered:?}");
    assert!(recovered < Duration::from_secs(2), "{recovered:?}");
    assert!(
        router
            .stderr()
            .contains("backend is up again after 2 checks passed"),
        "{}",
        router.stderr()
    );
    let answers = spread(&router, 12);
    assert!(answers.get("a").copied().unwrap_or(0) >= 3, "{answers:?}");
    assert!(answers.get("b").copied().unwrap_or(0) >= 3, "{answers:?}");
}

#[test]
fn failed_client_connects_eject_a_backend_between_checks() {
    let alive = SwitchableBackend::named("alive");
    let dead = closed_port();
    // Checks are rare (one at start, the next a minute later): failures of
    // client connections are what marks the dead backend down.
    let config = format!(
        "[health_check]\ninterval = \"60s\"\nfall = 3\n\
         [[route]]\nname = \"hc\"\npreamble = \"hc\"\nbackends = [\"{dead}\", \"{}\"]\n",
        alive.addr
    );
    let (mut router, _dir) = start("passive", &config);
    let answers = spread(&router, 10);
    assert_eq!(answers.get("alive"), Some(&10), "{answers:?}");
    let stats = router.stats();
    assert_eq!(stats.get("backends_down"), 1, "{stats:?}");
    // The check at start counts as one failure, so at most 3 client
    // connections tried the dead backend, and none after it was ejected.
    let tried = stats.get("backend_failures");
    assert!((2..=3).contains(&tried), "{stats:?}");
    spread(&router, 10);
    assert_eq!(router.stats().get("backend_failures"), tried);
}
