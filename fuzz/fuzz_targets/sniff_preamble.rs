//! The `ROUTE <name> [token]\r\n` preamble parser and the token check.
#![no_main]
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use router::config::Route;

static ROUTES: LazyLock<Vec<Route>> = LazyLock::new(router_fuzz::routes);

fuzz_target!(|data: &[u8]| {
    let mut bytes = b"ROUTE ".to_vec();
    bytes.extend_from_slice(data.strip_prefix(b"ROUTE ").unwrap_or(data));
    router_fuzz::check_first_packet(&bytes, &ROUTES);
});
