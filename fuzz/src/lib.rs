//! What every fuzz target checks on a first packet, whatever its protocol:
//! the sniffer decides the same way twice, never claims more bytes than it
//! was given, and its answer is consistent with the size limit; a decided
//! packet goes through the routing decision and a refusal gets an answer.
use router::{
    config::{Config, Route},
    refuse, rewrite,
    routes::{self, Refusal},
    sniff::{self, FirstPacket, Sniff},
};

/// The limit the router uses by default (`first_packet_max`).
pub const LIMIT: usize = 16 * 1024;

/// Routes of every kind, with a token, for the routing step.
pub fn routes() -> Vec<Route> {
    let mut config = Config::default();
    for spec in [
        "host:a.test=127.0.0.1:1",
        "sni:*.b.test=127.0.0.1:2",
        "preamble:db:s3cret=127.0.0.1:3",
        "preamble:open=127.0.0.1:4",
        "default=127.0.0.1:5",
    ] {
        config.add_route_flag(spec).expect("valid route");
    }
    config.routes
}

/// An `http_close` route's rewrite keeps the request routed the same way,
/// with one `Connection: close` header.
fn check_connection_close(bytes: &[u8], head: usize, host: Option<&str>, limit: usize) {
    assert!(head <= bytes.len(), "HTTP head longer than the bytes");
    let rewritten = rewrite::connection_close(bytes, head);
    match sniff::sniff(&rewritten, limit + 64) {
        Sniff::Done(FirstPacket::Http { host: again, head }) => {
            assert_eq!(again.as_deref(), host, "the rewrite changed the host");
            let head = String::from_utf8_lossy(&rewritten[..head]).to_ascii_lowercase();
            assert_eq!(head.matches("\nconnection:").count(), 1, "{head:?}");
        }
        // One header more than the 64 the sniffer reads.
        Sniff::Invalid(_, "more than 64 request headers") => {}
        other => panic!("the rewrite broke the request: {other:?}"),
    }
}

/// Sniffs `bytes` as the router does, checks the invariants, routes the
/// result. Panics (a fuzzing finding) when an invariant breaks.
pub fn check_first_packet(bytes: &[u8], routes: &[Route]) {
    let limit = LIMIT.min(bytes.len().max(64));
    let outcome = sniff::sniff(bytes, limit);
    assert_eq!(outcome, sniff::sniff(bytes, limit), "sniff is not deterministic");
    let _ = sniff::guess(bytes);
    match outcome {
        Sniff::Done(first) => {
            if let FirstPacket::Preamble { len, .. } = &first {
                assert!(*len <= bytes.len(), "preamble longer than the bytes");
            }
            if let FirstPacket::Http { host, head } = &first {
                check_connection_close(bytes, *head, host.as_deref(), limit);
            }
            let protocol = first.protocol();
            match routes::decide(routes, &first) {
                Ok(decision) => assert!(decision.route < routes.len()),
                Err(refusal) => {
                    let _ = refuse::response(protocol, refusal);
                }
            }
        }
        Sniff::Invalid(protocol, why) => {
            assert!(!why.is_empty());
            let _ = refuse::response(protocol, Refusal::Invalid);
        }
        Sniff::TooLarge(protocol) => {
            let _ = refuse::response(protocol, Refusal::TooLarge);
        }
        Sniff::NeedMore => {}
    }
}
