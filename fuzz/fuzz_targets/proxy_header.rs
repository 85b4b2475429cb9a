//! The PROXY protocol header parser of `accept_proxy` listeners: never
//! panics, a header it accepts fits in the bytes given, and every prefix
//! of an accepted header asks for more rather than failing.
#![no_main]
use libfuzzer_sys::fuzz_target;
use router::proxy_header::{self, Header};

fuzz_target!(|data: &[u8]| {
    match proxy_header::parse(data) {
        Header::Done { len, .. } => {
            assert!(len > 0 && len <= data.len() && len <= proxy_header::MAX_LEN);
            for cut in [0, len / 2, len - 1] {
                assert_eq!(proxy_header::parse(&data[..cut]), Header::NeedMore);
            }
            // What follows the header does not change it.
            assert_eq!(proxy_header::parse(&data[..len]), proxy_header::parse(data));
        }
        Header::NeedMore => assert!(data.len() < proxy_header::MAX_LEN),
        Header::Invalid(_) => {}
    }
});
