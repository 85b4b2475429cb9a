//! Reading the PROXY protocol header (HAProxy's v1 text or v2 binary form)
//! that a load balancer in front sends before the client's bytes, on a
//! listener with `accept_proxy`: [`parse`] is a pure function of the bytes
//! read so far (parsed by the `ppp` crate, fuzzed by
//! `fuzz/fuzz_targets/proxy_header.rs`). [`crate::proxy_protocol`] builds
//! the headers the router sends on to its backends.
use std::net::SocketAddr;

use ppp::{v1, v2};

/// The v1 header's start, and the v2 header's 12-byte signature.
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest header: v2's 16 bytes and a 16-bit length of addresses and
/// TLVs (a v1 header is at most 107 bytes).
pub const MAX_LEN: usize = 16 + u16::MAX as usize;

/// What the bytes read so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// A header may still come: read more.
    NeedMore,
    /// Not a valid header (why).
    Invalid(String),
    /// A header of `len` bytes; the client's address it carries, if any (a
    /// v1 `UNKNOWN`, a v2 `LOCAL` command such as a load balancer's health
    /// check, or a family other than TCP over IP carry none: then the
    /// connection's own peer is the client, as the specification says).
    Done {
        len: usize,
        client: Option<SocketAddr>,
    },
}

/// Parses the PROXY protocol header at the start of `bytes`.
pub fn parse(bytes: &[u8]) -> Header {
    if bytes.starts_with(V2_SIGNATURE) {
        return v2(bytes);
    }
    if bytes.starts_with(V1_PREFIX) {
        return v1(bytes);
    }
    let short = bytes.len().min(V2_SIGNATURE.len());
    if bytes[..short] == V2_SIGNATURE[..short]
        || bytes[..bytes.len().min(V1_PREFIX.len())]
            == V1_PREFIX[..bytes.len().min(V1_PREFIX.len())]
    {
        return Header::NeedMore;
    }
    Header::Invalid("no PROXY protocol signature".into())
}

fn v1(bytes: &[u8]) -> Header {
    // The header ends at its first LF (which must follow a CR: ppp checks
    // that and what is before).
    let Some(end) = bytes.iter().position(|b| *b == b'\n') else {
        return if bytes.len() < 108 {
            Header::NeedMore
        } else {
            Header::Invalid("v1 header longer than 107 bytes".into())
        };
    };
    let line = &bytes[..=end];
    match v1::Header::try_from(line) {
        Ok(header) => Header::Done {
            len: line.len(),
            client: match header.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            },
        },
        Err(e) => Header::Invalid(format!("v1: {e}")),
    }
}

fn v2(bytes: &[u8]) -> Header {
    // The length is bytes 14 and 15: read no further than the header.
    if bytes.len() < 16 {
        return Header::NeedMore;
    }
    let len = 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if bytes.len() < len {
        return Header::NeedMore;
    }
    match v2::Header::try_from(&bytes[..len]) {
        Ok(header) => Header::Done {
            len,
            client: match (header.command, header.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            },
        },
        Err(e) => Header::Invalid(format!("v2: {e}")),
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;
    use crate::config::ProxyProtocol;

    #[test]
    fn v1_and_v2_headers_give_the_client_and_their_length() {
        let client: SocketAddr = "192.0.2.1:56324".parse().unwrap();
        let local: SocketAddr = "198.51.100.2:443".parse().unwrap();
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let mut bytes = crate::proxy_protocol::header(version, Some(client), Some(local));
            let len = bytes.len();
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(
                parse(&bytes),
                Header::Done {
                    len,
                    client: Some(client)
                },
                "{version:?}"
            );
            // Every prefix of the header asks for more.
            for cut in 0..len {
                assert_eq!(parse(&bytes[..cut]), Header::NeedMore, "{version:?} {cut}");
            }
        }
        let v6 = b"PROXY TCP6 2001:db8::1 ::1 65535 8080\r\nx";
        assert_eq!(
            parse(v6),
            Header::Done {
                len: v6.len() - 1,
                client: Some("[2001:db8::1]:65535".parse().unwrap())
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Header::Done {
                len: 15,
                client: None
            }
        );
    }

    #[test]
    fn anything_else_is_invalid() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
            b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x00",
        ] {
            assert!(
                matches!(parse(bad), Header::Invalid(_)),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        assert!(matches!(parse(&[b'P'; 200][..]), Header::Invalid(_)));
    }
}
