//! Idle connections are reaped: one that moves no byte for `idle_timeout`
//! is closed on both sides and its slot freed, spliced or copied, while one
//! that moves a byte now and then stays; a peer that vanishes without a FIN
//! (its packets dropped in a network namespace the test creates) is found
//! by TCP keepalive.
mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::{BIN, both_modes, config_file, idle, start};
use testkit::{Server, backends::Backend, netns::Netns};

fn connect(addr: SocketAddr, first: &[u8]) -> TcpStream {
    let mut client = TcpStream::connect(addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(first).unwrap();
    client
}

/// Waits until the router's connections are all gone, spliced slots too.
fn wait_freed(router: &mut Server, mode: &str) {
    let stats = router.wait_stats(idle, Duration::from_secs(10));
    if mode == "ebpf" {
        assert_eq!(stats.get("slots_in_use"), 0, "{stats:?}");
    }
}

#[test]
fn connections_idle_past_the_timeout_are_closed_on_both_sides_and_active_ones_are_not() {
    both_modes(
        "connections_idle_past_the_timeout_are_closed_on_both_sides_and_active_ones_are_not",
        |mode| {
            let (reports, ends) = mpsc::channel();
            let backend = Backend::watcher(reports);
            let mut router = start(
                mode,
                &[format!("default={}", backend.addr)],
                &["--idle-timeout", "1s"],
            );
            // A byte every 200 ms for 3 s: never idle for 1 s.
            let active_addr = router.addr;
            let active = thread::spawn(move || {
                let mut client = connect(active_addr, b"hello");
                for _ in 0..15 {
                    thread::sleep(Duration::from_millis(200));
                    client
                        .write_all(b".")
                        .expect("the active connection stays open");
                }
                client
            });
            let mut quiet = connect(router.addr, b"hello");
            let sent = Instant::now();
            let mut buffer = [0u8; 16];
            // The router closes it: the client reads its end of stream...
            assert_eq!(quiet.read(&mut buffer).expect("a FIN, not an error"), 0);
            let closed_after = sent.elapsed();
            assert!(
                closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(4),
                "closed after {closed_after:?}"
            );
            // ...and so does the backend, having got every byte.
            assert_eq!(
                ends.recv_timeout(Duration::from_secs(5))
                    .expect("backend end"),
                Ok(5)
            );
            let mut client = active.join().unwrap();
            client
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let still_open = client.read(&mut buffer).unwrap_err().kind();
            assert!(
                matches!(still_open, ErrorKind::WouldBlock | ErrorKind::TimedOut),
                "{still_open:?}"
            );
            drop(client);
            assert_eq!(
                ends.recv_timeout(Duration::from_secs(5))
                    .expect("backend end"),
                Ok(20)
            );
            wait_freed(&mut router, mode);
            assert!(
                router
                    .stderr()
                    .contains("closed connection(s) idle past their idle_timeout"),
                "{}",
                router.stderr()
            );
        },
    );
}

#[test]
fn a_peer_that_vanishes_without_a_fin_is_reaped_by_keepalive() {
    both_modes(
        "a_peer_that_vanishes_without_a_fin_is_reaped_by_keepalive",
        |mode| {
            let test = "a_peer_that_vanishes_without_a_fin_is_reaped_by_keepalive";
            let Some(ns) = Netns::create(test, &format!("keepalive-{mode}")) else {
                return;
            };
            if !testkit::tools::require_tool(test, "nft", "nftables") {
                return;
            }
            let backend =
                ns.enter(|| Backend::named_at("b", SocketAddr::from(([127, 0, 0, 1], 0))));
            // Idle timeout off: only keepalive can find the dead peers.
            let config = config_file(
                &format!("keepalive-{mode}"),
                "idle_timeout = \"0s\"\n[tcp_keepalive]\nidle = \"1s\"\ninterval = \"1s\"\ncount = 2\n",
            );
            let route = format!("default={}", backend.addr);
            let mut router = Server::start_command(ns.command(BIN).args([
                "--config",
                config.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--route",
                &route,
                "--mode",
                mode,
            ]));
            let addr = router.addr;
            let (mut survivor, vanished_client) = ns.enter(move || {
                let open = || {
                    let mut client = connect(addr, b"hello");
                    let mut greeting = [0u8; 7];
                    client.read_exact(&mut greeting).unwrap();
                    assert_eq!(&greeting, b"b:hello");
                    client
                };
                (open(), open())
            });
            // The backend vanishes for the first connection's router side, the
            // client for the second's: their packets are dropped, no FIN, no
            // reset.
            let client_port = vanished_client.local_addr().unwrap().port();
            ns.nft(&format!(
            "table inet vanish {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  \
             tcp sport {client_port} drop\n  tcp dport {client_port} drop\n }}\n}}\n"
        ))
        .unwrap();
            let stats = router.stats();
            assert_eq!(stats.get("active"), 2, "{stats:?}");
            let started = Instant::now();
            router.wait_stats(|s| s.get("active") == 1, Duration::from_secs(10));
            let reaped_after = started.elapsed();
            assert!(reaped_after >= Duration::from_secs(1), "{reaped_after:?}");
            // Now the backend vanishes under the first connection.
            ns.nft(&format!(
            "table inet vanish {{\n chain input {{\n  tcp sport {port} drop\n  tcp dport {port} drop\n }}\n}}\n",
            port = backend.addr.port()
        ))
        .unwrap();
            wait_freed(&mut router, mode);
            // Its client hears of it: the connection was cut, not ended.
            let mut buffer = [0u8; 16];
            match survivor.read(&mut buffer) {
                Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
                Ok(n) => panic!("read {n} bytes instead of a reset"),
            }
            drop(vanished_client);
        },
    );
}
