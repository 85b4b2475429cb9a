//! PROXY protocol headers (HAProxy's v1 text and v2 binary formats, built
//! with the `ppp` crate) that a route sends its backend before any byte of
//! the client, so that the backend sees the client's address and port
//! rather than the router's.
use std::net::{IpAddr, SocketAddr};

use ppp::{v1, v2};

use crate::config::ProxyProtocol;

/// The header for a client connected from `client` to the router's
/// `local` address. Without both addresses, or with addresses of different
/// families, it says so (v1 `UNKNOWN`, v2 `LOCAL`): the backend then uses
/// the connection's own addresses, as the specification asks.
pub fn header(
    version: ProxyProtocol,
    client: Option<SocketAddr>,
    local: Option<SocketAddr>,
) -> Vec<u8> {
    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; say TCP4
    // for them, as the backends' logs and access lists expect.
    let addresses = client
        .zip(local)
        .map(|(client, local)| (unmapped(client), unmapped(local)))
        .filter(|(client, local)| client.is_ipv4() == local.is_ipv4());
    match version {
        ProxyProtocol::V1 => match addresses {
            Some(pair) => v1::Addresses::from(pair).to_string().into_bytes(),
            None => v1::Addresses::Unknown.to_string().into_bytes(),
        },
        ProxyProtocol::V2 => {
            let builder = match addresses {
                Some(pair) => v2::Builder::with_addresses(
                    v2::Version::Two | v2::Command::Proxy,
                    v2::Protocol::Stream,
                    pair,
                ),
                None => v2::Builder::with_addresses(
                    v2::Version::Two | v2::Command::Local,
                    v2::Protocol::Unspecified,
                    v2::Addresses::Unspecified,
                ),
            };
            builder
                .build()
                .expect("a header of two addresses fits in memory")
        }
    }
}

/// `addr` with an IPv4-mapped IPv6 address turned into IPv4 (port kept).
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn v1_is_the_specification_s_text_line() {
        let header = header(
            ProxyProtocol::V1,
            addr("192.0.2.1:56324"),
            addr("198.51.100.2:443"),
        );
        assert_eq!(header, b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n");
        let header = header_v6(ProxyProtocol::V1);
        assert_eq!(header, b"PROXY TCP6 2001:db8::1 ::1 65535 8080\r\n");
        assert_eq!(
            super::header(ProxyProtocol::V1, None, addr("127.0.0.1:1")),
            b"PROXY UNKNOWN\r\n"
        );
    }

    fn header_v6(version: ProxyProtocol) -> Vec<u8> {
        header(version, addr("[2001:db8::1]:65535"), addr("[::1]:8080"))
    }

    /// The v2 signature, version 2 + PROXY, then the family byte.
    const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

    #[test]
    fn v2_is_the_specification_s_binary_layout() {
        let header = header(
            ProxyProtocol::V2,
            addr("192.0.2.1:56324"),
            addr("198.51.100.2:443"),
        );
        let mut expected = V2_SIGNATURE.to_vec();
        // Version 2, command PROXY; TCP over IPv4; 12 address bytes.
        expected.extend_from_slice(&[0x21, 0x11, 0, 12]);
        expected.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 2]);
        expected.extend_from_slice(&56324u16.to_be_bytes());
        expected.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(header, expected);

        let header = header_v6(ProxyProtocol::V2);
        assert_eq!(&header[..12], V2_SIGNATURE);
        // TCP over IPv6; 36 address bytes.
        assert_eq!(&header[12..16], &[0x21, 0x21, 0, 36]);
        let client: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(&header[16..32], &client.octets());
        assert_eq!(&header[32..48], &std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(&header[48..], &[0xff, 0xff, 0x1f, 0x90]);

        // No addresses: LOCAL, unspecified family, no address bytes.
        let local = super::header(ProxyProtocol::V2, None, None);
        assert_eq!(&local[12..], &[0x20, 0x00, 0, 0]);
    }

    #[test]
    fn ipv4_mapped_clients_are_said_in_ipv4() {
        let header = header(
            ProxyProtocol::V1,
            addr("[::ffff:192.0.2.1]:1000"),
            addr("[::ffff:198.51.100.2]:80"),
        );
        assert_eq!(header, b"PROXY TCP4 192.0.2.1 198.51.100.2 1000 80\r\n");
    }

    #[test]
    fn headers_parse_back_with_the_client_address() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let header = header_v6(version);
            let parsed = ppp::HeaderResult::parse(&header);
            let (source, destination) = match parsed {
                ppp::HeaderResult::V1(Ok(h)) => match h.addresses {
                    v1::Addresses::Tcp6(a) => (
                        SocketAddr::new(a.source_address.into(), a.source_port),
                        SocketAddr::new(a.destination_address.into(), a.destination_port),
                    ),
                    other => panic!("{other:?}"),
                },
                ppp::HeaderResult::V2(Ok(h)) => match h.addresses {
                    v2::Addresses::IPv6(a) => (
                        SocketAddr::new(a.source_address.into(), a.source_port),
                        SocketAddr::new(a.destination_address.into(), a.destination_port),
                    ),
                    other => panic!("{other:?}"),
                },
                other => panic!("{version:?}: {other:?}"),
            };
            assert_eq!(Some(source), addr("[2001:db8::1]:65535"));
            assert_eq!(Some(destination), addr("[::1]:8080"));
        }
    }
}
