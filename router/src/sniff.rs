//! Reading the routing information in a connection's first bytes: a TLS
//! ClientHello's server name, an HTTP/1.x `Host`, or a preamble line.
//!
//! [`sniff`] is called on everything read so far and says whether it needs
//! more bytes; it never consumes anything, so a message split across many
//! segments (a ClientHello sent byte by byte) is handled by calling it again.
//!
//! The preamble, for clients that can name their route (and authenticate):
//!
//! ```text
//! ROUTE <name> [<token>]\r\n
//! ```
//!
//! `name` is 1 to 64 of `A-Z a-z 0-9 . _ -`, `token` 1 to 256 printable ASCII
//! characters; the line is at most 512 bytes. What follows the line is the
//! client's stream, forwarded to the backend (the line itself is stripped
//! unless the route says `keep_preamble = true`).
use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extensions,
    parse_tls_message_handshake,
};

use crate::config::{Secret, validate_route_name, validate_token};

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    /// A TLS ClientHello, with its server name if it has one.
    Tls { sni: Option<String> },
    /// An HTTP/1.x request head, with its `Host` (lower case, no port).
    Http { host: Option<String> },
    /// A preamble line of `len` bytes (with its CRLF).
    Preamble {
        route: String,
        token: Option<Secret>,
        len: usize,
    },
    /// None of the above: only a `default` route takes it.
    Unknown,
}

/// The outcome of looking at the bytes read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// More bytes are needed to decide.
    NeedMore,
    Done(FirstPacket),
    /// The bytes claim a protocol but break it.
    Invalid(Protocol, &'static str),
    /// The routing information does not fit in the first-packet limit.
    TooLarge(Protocol),
}

/// The protocol a first packet speaks (for refusals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tls,
    Http,
    Preamble,
    Unknown,
}

impl FirstPacket {
    pub fn protocol(&self) -> Protocol {
        match self {
            Self::Tls { .. } => Protocol::Tls,
            Self::Http { .. } => Protocol::Http,
            Self::Preamble { .. } => Protocol::Preamble,
            Self::Unknown => Protocol::Unknown,
        }
    }
}

/// The protocol the bytes read so far seem to speak, for a refusal sent
/// before they could be fully parsed (timeout, size limit).
pub fn guess(bytes: &[u8]) -> Protocol {
    match bytes.first() {
        Some(&TLS_HANDSHAKE) => Protocol::Tls,
        Some(_) if bytes.starts_with(&PREAMBLE[..bytes.len().min(PREAMBLE.len())]) => {
            Protocol::Preamble
        }
        Some(b) if b.is_ascii_uppercase() => Protocol::Http,
        _ => Protocol::Unknown,
    }
}

const PREAMBLE: &[u8] = b"ROUTE ";
const PREAMBLE_MAX: usize = 512;
/// Longest HTTP method we wait for before calling the bytes unknown.
const METHOD_MAX: usize = 16;
const TLS_HANDSHAKE: u8 = 0x16;
const TLS_CLIENT_HELLO: u8 = 0x01;
const MAX_HEADERS: usize = 64;

/// Classifies `bytes` (everything read so far; `limit` is the most the
/// caller will read).
pub fn sniff(bytes: &[u8], limit: usize) -> Sniff {
    let Some(&first) = bytes.first() else {
        return Sniff::NeedMore;
    };
    if first == TLS_HANDSHAKE {
        return sniff_tls(bytes, limit);
    }
    let prefix = bytes.len().min(PREAMBLE.len());
    if bytes[..prefix] == PREAMBLE[..prefix] {
        return if bytes.len() < PREAMBLE.len() {
            Sniff::NeedMore
        } else {
            sniff_preamble(bytes)
        };
    }
    let method_len = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match bytes.get(method_len) {
        None if method_len < METHOD_MAX => Sniff::NeedMore,
        Some(b' ') if method_len > 0 => sniff_http(bytes, limit),
        _ => Sniff::Done(FirstPacket::Unknown),
    }
}

fn sniff_preamble(bytes: &[u8]) -> Sniff {
    let invalid = |why| Sniff::Invalid(Protocol::Preamble, why);
    let window = &bytes[..bytes.len().min(PREAMBLE_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() >= PREAMBLE_MAX {
            invalid("preamble line longer than 512 bytes")
        } else {
            Sniff::NeedMore
        };
    };
    let Ok(line) = std::str::from_utf8(&bytes[PREAMBLE.len()..end]) else {
        return invalid("preamble is not text");
    };
    let mut fields = line.split(' ');
    let route = fields.next().unwrap_or_default();
    let token = fields.next();
    if fields.next().is_some() {
        return invalid("preamble has more than a route and a token");
    }
    if validate_route_name(route).is_err() {
        return invalid("bad route name in preamble");
    }
    if token.is_some_and(|t| validate_token(t).is_err()) {
        return invalid("bad token in preamble");
    }
    Sniff::Done(FirstPacket::Preamble {
        route: route.to_owned(),
        token: token.map(Secret::from),
        len: end + 2,
    })
}

fn sniff_http(bytes: &[u8], limit: usize) -> Sniff {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {
            let host = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(normalize_host);
            Sniff::Done(FirstPacket::Http { host })
        }
        Ok(httparse::Status::Partial) if bytes.len() >= limit => Sniff::TooLarge(Protocol::Http),
        Ok(httparse::Status::Partial) => Sniff::NeedMore,
        Err(httparse::Error::TooManyHeaders) => {
            Sniff::Invalid(Protocol::Http, "more than 64 request headers")
        }
        Err(_) => Sniff::Invalid(Protocol::Http, "malformed HTTP request head"),
    }
}

/// `Host` as routes compare it: lower case, without port or final dot.
fn normalize_host(value: &str) -> String {
    let value = value.trim();
    let host = if let Some(rest) = value.strip_prefix('[') {
        // [IPv6]:port
        rest.split(']').next().unwrap_or_default()
    } else {
        value.rsplit_once(':').map_or(value, |(host, _port)| host)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Reassembles the handshake bytes of the TLS records read so far (a
/// ClientHello may span several records) and parses the ClientHello once
/// all of it is there.
fn sniff_tls(bytes: &[u8], limit: usize) -> Sniff {
    let invalid = |why| Sniff::Invalid(Protocol::Tls, why);
    let mut handshake = Vec::new();
    let mut rest = bytes;
    loop {
        if rest.len() < 5 {
            break;
        }
        if rest[0] != TLS_HANDSHAKE || rest[1] != 3 {
            return invalid("not a TLS handshake record");
        }
        let length = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if length == 0 || length > 1 << 14 {
            return invalid("bad TLS record length");
        }
        let Some(fragment) = rest.get(5..5 + length) else {
            handshake.extend_from_slice(&rest[5..]);
            break;
        };
        handshake.extend_from_slice(fragment);
        rest = &rest[5 + length..];
        if handshake_complete(&handshake) || rest.is_empty() {
            break;
        }
    }
    if handshake.len() >= 4 {
        if handshake[0] != TLS_CLIENT_HELLO {
            return invalid("first TLS handshake message is not a ClientHello");
        }
        let body = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
        if body + 9 > limit {
            return Sniff::TooLarge(Protocol::Tls);
        }
    }
    if !handshake_complete(&handshake) {
        return if bytes.len() >= limit {
            Sniff::TooLarge(Protocol::Tls)
        } else {
            Sniff::NeedMore
        };
    }
    match parse_tls_message_handshake(&handshake) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => {
            let Some(extensions) = hello.ext else {
                return Sniff::Done(FirstPacket::Tls { sni: None });
            };
            match parse_tls_client_hello_extensions(extensions) {
                Ok((_, extensions)) => Sniff::Done(FirstPacket::Tls {
                    sni: server_name(&extensions),
                }),
                Err(_) => invalid("malformed ClientHello extensions"),
            }
        }
        _ => invalid("malformed ClientHello"),
    }
}

fn handshake_complete(handshake: &[u8]) -> bool {
    handshake.len() >= 4
        && handshake.len() - 4
            >= u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize
}

fn server_name(extensions: &[TlsExtension<'_>]) -> Option<String> {
    extensions.iter().find_map(|extension| match extension {
        TlsExtension::SNI(names) => names
            .iter()
            .find(|(kind, _)| *kind == SNIType::HostName)
            .and_then(|(_, name)| std::str::from_utf8(name).ok())
            .map(|name| name.trim_end_matches('.').to_ascii_lowercase()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use testkit::tls::client_hello;

    use super::*;

    #[test]
    fn a_client_hello_gives_its_server_name() {
        let hello = client_hello(Some("B.Test"));
        assert_eq!(
            sniff(&hello, 16384),
            Sniff::Done(FirstPacket::Tls {
                sni: Some("b.test".into())
            })
        );
        assert_eq!(
            sniff(&client_hello(None), 16384),
            Sniff::Done(FirstPacket::Tls { sni: None })
        );
    }

    #[test]
    fn a_client_hello_split_byte_by_byte_needs_more_until_complete() {
        let hello = client_hello(Some("split.test"));
        for end in 1..hello.len() {
            assert_eq!(sniff(&hello[..end], 16384), Sniff::NeedMore, "at {end}");
        }
        assert!(matches!(
            sniff(&hello, 16384),
            Sniff::Done(FirstPacket::Tls { .. })
        ));
    }

    #[test]
    fn a_client_hello_split_across_records_is_reassembled() {
        let hello = client_hello(Some("records.test"));
        let handshake = &hello[5..];
        let (a, b) = handshake.split_at(20);
        let mut records = Vec::new();
        for part in [a, b] {
            records.extend_from_slice(&[0x16, 3, 1]);
            records.extend_from_slice(&(part.len() as u16).to_be_bytes());
            records.extend_from_slice(part);
        }
        assert_eq!(
            sniff(&records, 16384),
            Sniff::Done(FirstPacket::Tls {
                sni: Some("records.test".into())
            })
        );
    }

    #[test]
    fn an_oversized_client_hello_is_too_large() {
        let hello = client_hello(Some("big.test"));
        assert_eq!(sniff(&hello, 64), Sniff::TooLarge(Protocol::Tls));
    }

    #[test]
    fn http_heads_give_their_host() {
        let head = b"GET / HTTP/1.1\r\nHost: A.Test:8080\r\nUser-Agent: x\r\n\r\nbody";
        assert_eq!(
            sniff(head, 16384),
            Sniff::Done(FirstPacket::Http {
                host: Some("a.test".into())
            })
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a", 16384), Sniff::NeedMore);
        assert_eq!(sniff(b"GE", 16384), Sniff::NeedMore);
        assert_eq!(
            sniff(b"GET / HTTP/1.0\r\n\r\n", 16384),
            Sniff::Done(FirstPacket::Http { host: None })
        );
        let ipv6 = b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n";
        assert_eq!(
            sniff(ipv6, 16384),
            Sniff::Done(FirstPacket::Http {
                host: Some("::1".into())
            })
        );
        assert!(matches!(
            sniff(b"GET / HTTP/1.1\r\nHost a\r\n\r\n", 16384),
            Sniff::Invalid(Protocol::Http, _)
        ));
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nX: y\r\n", 20),
            Sniff::TooLarge(Protocol::Http)
        );
    }

    #[test]
    fn preambles_name_a_route_and_maybe_a_token() {
        assert_eq!(
            sniff(b"ROUTE db s3cret\r\nhello", 16384),
            Sniff::Done(FirstPacket::Preamble {
                route: "db".into(),
                token: Some("s3cret".into()),
                len: 17
            })
        );
        assert_eq!(
            sniff(b"ROUTE db\r\n", 16384),
            Sniff::Done(FirstPacket::Preamble {
                route: "db".into(),
                token: None,
                len: 10
            })
        );
        assert_eq!(sniff(b"ROU", 16384), Sniff::NeedMore);
        assert_eq!(sniff(b"ROUTE db", 16384), Sniff::NeedMore);
        assert!(matches!(
            sniff(b"ROUTE a b c\r\n", 16384),
            Sniff::Invalid(Protocol::Preamble, _)
        ));
        assert!(matches!(
            sniff(b"ROUTE bad/name\r\n", 16384),
            Sniff::Invalid(Protocol::Preamble, _)
        ));
        assert!(matches!(
            sniff(&[b"ROUTE ".as_slice(), &[b'a'; 600]].concat(), 16384),
            Sniff::Invalid(Protocol::Preamble, _)
        ));
    }

    #[test]
    fn anything_else_is_unknown_at_once() {
        assert_eq!(
            sniff(b"\x00\x01binary", 16384),
            Sniff::Done(FirstPacket::Unknown)
        );
        assert_eq!(sniff(b"hello", 16384), Sniff::Done(FirstPacket::Unknown));
        assert_eq!(
            sniff(b"SSH-2.0-x", 16384),
            Sniff::Done(FirstPacket::Unknown)
        );
        assert_eq!(sniff(b"", 16384), Sniff::NeedMore);
    }
}
