//! What every fuzz target checks on a first packet, whatever its protocol:
//! the sniffer decides the same way twice, never claims more bytes than it
//! was given, and its answer is consistent with the size limit; a decided
//! packet goes through the routing decision and a refusal gets an answer.
use router::{
    config::{Config, Route},
    refuse,
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
