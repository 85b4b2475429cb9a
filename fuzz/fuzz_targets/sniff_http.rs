//! The HTTP/1.x request head parser (httparse and the Host normalisation),
//! on bytes that start like a request method.
#![no_main]
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use router::config::Route;

static ROUTES: LazyLock<Vec<Route>> = LazyLock::new(router_fuzz::routes);

fuzz_target!(|data: &[u8]| {
    let mut bytes = Vec::with_capacity(data.len() + 4);
    if !data.first().is_some_and(u8::is_ascii_uppercase) || data.starts_with(b"ROUTE ") {
        bytes.extend_from_slice(b"GET ");
    }
    bytes.extend_from_slice(data);
    router_fuzz::check_first_packet(&bytes, &ROUTES);
});
