//! Balancing with real backends counting their connections: `weight=N`
//! shares connections in proportion (smooth round-robin, and least
//! connections per weight), and `connect_retries` bounds the connects one
//! client connection may try.
mod common;

use std::{net::SocketAddr, net::TcpStream, time::Duration};

use common::{both_modes, idle, send, start};
use testkit::backends::{Backend, closed_port};

/// Connects and reads the backend's greeting: `Some(name)` of the backend
/// that answered, `None` if the router refused.
fn who(router: SocketAddr) -> Option<String> {
    let reply = String::from_utf8(send(router, b"hello")).unwrap();
    reply.strip_suffix(":hello").map(str::to_owned)
}

#[test]
fn weights_share_connections_in_proportion() {
    both_modes("weights_share_connections_in_proportion", |mode| {
        let (a, b, c) = (
            Backend::named("a"),
            Backend::named("b"),
            Backend::named("c"),
        );
        // One core: its balancer alone sees every connection, so the
        // shares are exact.
        let mut router = start(
            mode,
            &[format!(
                "default={},weight=3,{},{},weight=2",
                a.addr, b.addr, c.addr
            )],
            &["--cores", "1"],
        );
        let mut order = String::new();
        for _ in 0..24 {
            order.push_str(&who(router.addr).expect("routed"));
        }
        assert_eq!((a.accepted(), b.accepted(), c.accepted()), (12, 4, 8));
        // Smooth: never the whole share of one backend in a row.
        assert!(!order.contains("aaaa"), "{order}");
        router.wait_stats(idle, Duration::from_secs(10));
    });
}

#[test]
fn least_connections_counts_connections_per_weight() {
    both_modes("least_connections_counts_connections_per_weight", |mode| {
        let (a, b) = (Backend::named("a"), Backend::named("b"));
        let mut router = start(
            mode,
            &[format!(
                "default={},weight=2,{},balance=least-connections",
                a.addr, b.addr
            )],
            &["--cores", "1"],
        );
        // Held open: each new one goes where the fewest are, per weight.
        let mut held = Vec::new();
        for _ in 0..6 {
            let mut client = TcpStream::connect(router.addr).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            std::io::Write::write_all(&mut client, b"hello").unwrap();
            let mut greeting = [0u8; 7];
            std::io::Read::read_exact(&mut client, &mut greeting).unwrap();
            held.push(client);
        }
        assert_eq!((a.accepted(), b.accepted()), (4, 2));
        drop(held);
        router.wait_stats(idle, Duration::from_secs(10));
    });
}

#[test]
fn connect_retries_bound_the_backends_one_connection_tries() {
    both_modes(
        "connect_retries_bound_the_backends_one_connection_tries",
        |mode| {
            let good = Backend::named("good");
            let (dead1, dead2) = (closed_port(), closed_port());
            // Default: every backend once, so every client gets through.
            let mut router = start(
                mode,
                &[format!("default={dead1},{dead2},{}", good.addr)],
                &["--cores", "1"],
            );
            for _ in 0..3 {
                assert_eq!(who(router.addr).as_deref(), Some("good"));
            }
            router.wait_stats(idle, Duration::from_secs(10));
            drop(router);
            // No retry: a client whose first pick is dead is refused. In turn
            // the first picks are dead1, dead2, good.
            let mut router = start(
                mode,
                &[format!(
                    "default={dead1},{dead2},{},connect_retries=0",
                    good.addr
                )],
                &["--cores", "1"],
            );
            let answers: Vec<Option<String>> = (0..3).map(|_| who(router.addr)).collect();
            assert_eq!(answers, [None, None, Some("good".to_owned())]);
            let stats = router.wait_stats(idle, Duration::from_secs(10));
            assert_eq!(stats.get("backend_failures"), 2);
            drop(router);
            // Retries past the pool's size try its backends again.
            let mut router = start(
                mode,
                &[format!("default={dead1},connect_retries=3")],
                &["--cores", "1"],
            );
            assert_eq!(who(router.addr), None);
            let stats = router.wait_stats(idle, Duration::from_secs(10));
            assert_eq!(stats.get("backend_failures"), 4);
        },
    );
}
