//! Backends by name: a real DNS server (dnsmasq on loopback, started by the
//! test) answers for `db.test`; the router resolves it at start and every
//! `resolve_interval`, uses every address it returns, follows the record
//! when it changes, keeps the last addresses when it stops resolving, and
//! refuses to start on a name that does not resolve.
mod common;

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{BIN, both_modes, config_file, send};
use testkit::{Server, backends::Backend, dns::Dns, server::run_to_failure};

const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// Which backends answer `rounds` connections (each says its name first).
fn answering(router: SocketAddr, rounds: usize) -> HashSet<String> {
    (0..rounds)
        .map(|_| {
            let reply = String::from_utf8(send(router, b"hello")).unwrap();
            assert!(reply.ends_with(":hello"), "{reply:?}");
            reply.trim_end_matches(":hello").to_owned()
        })
        .collect()
}

/// Polls until `rounds` connections reach exactly `wanted` (bounded).
fn wait_answering(router: &Server, rounds: usize, wanted: &[&str], why: &str) {
    let wanted: HashSet<String> = wanted.iter().map(|s| s.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = answering(router.addr, rounds);
        if seen == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{why}: still reaching {seen:?}, not {wanted:?}; stderr:\n{}",
            router.stderr()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_backend_name_follows_its_dns_record_and_keeps_its_addresses_when_it_stops_resolving() {
    both_modes(
        "a_backend_name_follows_its_dns_record_and_keeps_its_addresses_when_it_stops_resolving",
        |mode| {
            let Some(dns) = Dns::start(&format!("follow-{mode}"), &[("db.test", A)]) else {
                return;
            };
            // Same port, two loopback addresses: only the record tells them apart.
            let a = Backend::named_at("a", SocketAddr::new(A, 0));
            let _b = Backend::named_at("b", SocketAddr::new(B, a.addr.port()));
            let config = config_file(
                &format!("names-{mode}"),
                &format!(
                    "listen = [\"127.0.0.1:0\"]\nresolvers = [\"{}\"]\nresolve_interval = \"200ms\"\n\
                     [[route]]\nname = \"db\"\ndefault = true\nbackends = [\"db.test:{}\"]\n",
                    dns.addr,
                    a.addr.port()
                ),
            );
            let router =
                Server::start(BIN, &["--config", config.to_str().unwrap(), "--mode", mode]);
            assert_eq!(answering(router.addr, 4), HashSet::from(["a".to_owned()]));
            // Every address the name returns is a backend.
            dns.set(&[("db.test", A), ("db.test", B)]);
            wait_answering(&router, 6, &["a", "b"], "both addresses");
            // The record moves: so does the traffic.
            dns.set(&[("db.test", B)]);
            wait_answering(&router, 6, &["b"], "moved to 127.0.0.2");
            // The name stops resolving: its last addresses stay, with a line.
            dns.set(&[]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !router.stderr().contains("backend name no longer resolves") {
                assert!(
                    Instant::now() < deadline,
                    "no log line:\n{}",
                    router.stderr()
                );
                thread::sleep(Duration::from_millis(50));
            }
            assert_eq!(answering(router.addr, 4), HashSet::from(["b".to_owned()]));
            let line = router
                .stderr()
                .lines()
                .find(|l| l.contains("no longer resolves"))
                .unwrap()
                .to_owned();
            assert!(
                line.contains("db.test:") && line.contains("127.0.0.2"),
                "{line}"
            );
            // It logs the change once, not at every interval.
            thread::sleep(Duration::from_millis(600));
            assert_eq!(router.stderr().matches("no longer resolves").count(), 1);
            // It comes back.
            dns.set(&[("db.test", A)]);
            wait_answering(&router, 4, &["a"], "back to 127.0.0.1");
            assert!(router.stderr().contains("backend name resolves again"));
        },
    );
}

#[test]
fn a_backend_name_that_does_not_resolve_stops_the_start_and_fails_check_config() {
    let Some(dns) = Dns::start("unresolved", &[("db.test", A)]) else {
        return;
    };
    let config = config_file(
        "names-unresolved",
        &format!(
            "listen = [\"127.0.0.1:0\"]\nresolvers = [\"{}\"]\nmode = \"copy\"\n\
             [[route]]\nname = \"db\"\ndefault = true\nbackends = [\"db.test:1\", \"nope.test:5432\"]\n",
            dns.addr
        ),
    );
    let path = config.to_str().unwrap();
    for extra in [&[][..], &["--check-config"][..]] {
        let started = Instant::now();
        let (status, stderr) =
            run_to_failure(Command::new(BIN).args(["--config", path]).args(extra));
        assert!(!status.success(), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("route `db`: backend `nope.test:5432`: cannot resolve `nope.test`: "),
            "{extra:?}: {stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{extra:?}");
    }
    // On the command line too: NAME:PORT is a backend address.
    let (status, stderr) = run_to_failure(Command::new(BIN).args([
        "--listen",
        "127.0.0.1:0",
        "--route",
        "default=nope.invalid:5432",
        "--check-config",
    ]));
    assert!(!status.success());
    assert!(
        stderr.contains("backend `nope.invalid:5432`: cannot resolve `nope.invalid`"),
        "{stderr}"
    );
}
