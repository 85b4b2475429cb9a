//! The TLS ClientHello parser: record reassembly and tls-parser, on bytes
//! that start like a TLS handshake record.
#![no_main]
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use router::config::Route;

static ROUTES: LazyLock<Vec<Route>> = LazyLock::new(router_fuzz::routes);

fuzz_target!(|data: &[u8]| {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    if data.first() != Some(&0x16) {
        bytes.push(0x16);
    }
    bytes.extend_from_slice(data);
    router_fuzz::check_first_packet(&bytes, &ROUTES);
});
