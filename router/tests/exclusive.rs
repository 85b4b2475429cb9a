//! One router per address: a second router asked to listen where one
//! already does exits at once, saying so and naming the first; the first
//! keeps every connection.
mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{BIN, send, start};
use testkit::{backends::Backend, server::run_to_failure};

#[test]
fn a_second_router_on_a_listened_address_refuses_to_start_and_names_the_first() {
    let backend = Backend::echo();
    let route = format!("default={}", backend.addr);
    let first = start("copy", std::slice::from_ref(&route), &[]);
    let wildcard = format!("0.0.0.0:{}", first.addr.port());
    for listen in [first.addr.to_string(), wildcard] {
        let started = Instant::now();
        let (status, stderr) = run_to_failure(
            Command::new(BIN).args(["--listen", &listen, "--mode", "copy", "--route", &route]),
        );
        assert!(!status.success(), "{listen}: {stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{listen}: took {:?}",
            started.elapsed()
        );
        assert!(
            stderr.contains(&format!(
                "cannot listen on {listen}: the address is already listened on by pid {} ({BIN} ",
                first.pid()
            )),
            "{listen}: {stderr}"
        );
    }
    // The first one still takes every connection.
    for _ in 0..6 {
        assert_eq!(send(first.addr, b"ping"), b"ping");
    }
}
