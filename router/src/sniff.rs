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

use crate::{
    config::{Secret, validate_route_name, validate_token},
    host,
};

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    /// A TLS ClientHello, with its server name if it has one.
    Tls { sni: Option<String> },
    /// An HTTP/1.x request head of `head` bytes, with the host it names
    /// (its absolute-form target's, else its `Host`; lower case, no port).
    Http { host: Option<String>, head: usize },
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
/// Longest HTTP method taken for one (the longest registered is 17).
const METHOD_MAX: usize = 24;
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
    match request_line(bytes) {
        Line::NeedMore => Sniff::NeedMore,
        Line::Http => sniff_http(bytes, limit),
        Line::Other => Sniff::Done(FirstPacket::Unknown),
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

/// What the first line of bytes that start like an HTTP method says.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    NeedMore,
    /// `METHOD SP target SP HTTP/1.d`: an HTTP/1.x request, parsed in full
    /// (and refused if malformed).
    Http,
    /// Anything else (an h2c preface, RTSP, SIP, a Redis inline command,
    /// a word that is no method): for the default route.
    Other,
}

/// Registered HTTP methods (IANA) and PURGE: bytes that are a prefix of one
/// of these, with no space yet, may still become an HTTP request.
const KNOWN_METHODS: [&[u8]; 41] = [
    b"ACL",
    b"BASELINE-CONTROL",
    b"BIND",
    b"CHECKIN",
    b"CHECKOUT",
    b"CONNECT",
    b"COPY",
    b"DELETE",
    b"GET",
    b"HEAD",
    b"LABEL",
    b"LINK",
    b"LOCK",
    b"MERGE",
    b"MKACTIVITY",
    b"MKCALENDAR",
    b"MKCOL",
    b"MKREDIRECTREF",
    b"MKWORKSPACE",
    b"MOVE",
    b"OPTIONS",
    b"ORDERPATCH",
    b"PATCH",
    b"POST",
    b"PRI",
    b"PROPFIND",
    b"PROPPATCH",
    b"PURGE",
    b"PUT",
    b"QUERY",
    b"REBIND",
    b"REPORT",
    b"SEARCH",
    b"TRACE",
    b"UNBIND",
    b"UNCHECKOUT",
    b"UNLINK",
    b"UNLOCK",
    b"UPDATE",
    b"UPDATEREDIRECTREF",
    b"VERSION-CONTROL",
];
const HTTP1: &[u8] = b"HTTP/1.";

/// Classifies the request line, deciding as soon as the bytes cannot be an
/// HTTP/1.x one: HTTP/1.x is routed on its `Host`, anything else that starts
/// with capitals is some other protocol.
fn request_line(bytes: &[u8]) -> Line {
    let method = bytes
        .iter()
        .take_while(|&&b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
        .count();
    if method == 0 || method > METHOD_MAX {
        return Line::Other;
    }
    if method == bytes.len() {
        let may_grow = KNOWN_METHODS.iter().any(|m| m.starts_with(bytes));
        return if may_grow {
            Line::NeedMore
        } else {
            Line::Other
        };
    }
    let end = bytes.iter().position(|&b| b == b'\n');
    let line = &bytes[..end.unwrap_or(bytes.len())];
    // A CR may wait for its LF in the next segment.
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // Visible ASCII, spaces, and raw non-ASCII bytes (which httparse takes
    // in a target); control characters mean another protocol.
    if !line
        .iter()
        .all(|&b| b.is_ascii_graphic() || b == b' ' || !b.is_ascii())
    {
        return Line::Other;
    }
    let complete = end.is_some();
    let Some(rest) = line[method..].strip_prefix(b" ") else {
        return Line::Other;
    };
    // The version is what follows the last space: an HTTP/1.x line with a
    // malformed target (two spaces) is still HTTP/1.x, refused by httparse.
    let (target, version) = match rest.iter().rposition(|&b| b == b' ') {
        Some(space) => (&rest[..space], &rest[space + 1..]),
        None if complete => return Line::Other,
        None => return Line::NeedMore,
    };
    if target.is_empty() {
        return Line::Other;
    }
    // `HTTP/1.` and a digit: all of it once the line is complete, a prefix
    // of it before.
    let digit = HTTP1.len();
    let fits = if complete {
        version.len() == digit + 1
    } else {
        version.len() <= digit + 1
    };
    let prefix_ok = version.iter().zip(HTTP1).all(|(a, b)| a == b);
    let digit_ok = version.get(digit).is_none_or(u8::is_ascii_digit);
    match (fits && prefix_ok && digit_ok, complete) {
        (true, true) => Line::Http,
        (true, false) => Line::NeedMore,
        (false, _) => Line::Other,
    }
}

fn sniff_http(bytes: &[u8], limit: usize) -> Sniff {
    let invalid = |why| Sniff::Invalid(Protocol::Http, why);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head = match request.parse(bytes) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) if bytes.len() >= limit => {
            return Sniff::TooLarge(Protocol::Http);
        }
        Ok(httparse::Status::Partial) => return Sniff::NeedMore,
        Err(httparse::Error::TooManyHeaders) => return invalid("more than 64 request headers"),
        Err(_) => return invalid("malformed HTTP request head"),
    };
    let mut hosts = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return invalid("more than one Host header"),
        // An empty Host names no host (RFC 9112 §3.2: what a client sends
        // when the target has no authority).
        (Some(h), None) if h.value.trim_ascii().is_empty() => None,
        (Some(h), None) => match host::authority(h.value) {
            Some(host) => Some(host),
            None => return invalid("the Host header is not a host name"),
        },
        (None, _) => None,
    };
    let method = request.method.unwrap_or_default();
    let target = request.path.unwrap_or_default().as_bytes();
    let authority = match target_authority(method, target) {
        Ok(authority) => authority,
        Err(why) => return invalid(why),
    };
    // The backend follows an absolute-form target, not `Host` (RFC 9112
    // §3.2.2): route on what it will follow, and refuse a disagreement.
    let host = match (authority, host) {
        (Some(target), Some(host)) if target != host => {
            return invalid("the Host header disagrees with the request target");
        }
        (Some(target), _) => Some(target),
        (None, host) => host,
    };
    Sniff::Done(FirstPacket::Http { host, head })
}

/// The host a request target names: an absolute-form URI's authority, or a
/// CONNECT's authority-form target; `None` for origin- and asterisk-form.
fn target_authority(method: &str, target: &[u8]) -> Result<Option<String>, &'static str> {
    let not_a_host = "the request target's authority is not a host name";
    if method == "CONNECT" {
        return host::authority(target).map(Some).ok_or(not_a_host);
    }
    let scheme = target.iter().position(|&b| b == b':').filter(|&end| {
        end > 0
            && target[0].is_ascii_alphabetic()
            && target[..end]
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    });
    let Some(scheme) = scheme else {
        return Ok(None);
    };
    let Some(rest) = target[scheme + 1..].strip_prefix(b"//") else {
        return Err("an absolute request target without an authority");
    };
    let end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    // Userinfo (`user@host`) is not allowed in http(s) URIs (RFC 9110 §4.2.4).
    host::authority(&rest[..end]).map(Some).ok_or(not_a_host)
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
                Ok((_, extensions)) => match server_name(&extensions) {
                    Ok(sni) => Sniff::Done(FirstPacket::Tls { sni }),
                    Err(()) => invalid("the server name is not a host name"),
                },
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

/// The ClientHello's host name, if it names one; an error if it names one
/// that is not a valid host name, or more than one (RFC 6066 §3).
fn server_name(extensions: &[TlsExtension<'_>]) -> Result<Option<String>, ()> {
    let mut names = extensions
        .iter()
        .filter_map(|extension| match extension {
            TlsExtension::SNI(names) => Some(names),
            _ => None,
        })
        .flatten()
        .filter(|(kind, _)| *kind == SNIType::HostName);
    match (names.next(), names.next()) {
        (Some((_, name)), None) => host::normalize(name).map(Some).ok_or(()),
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(()),
    }
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

    fn host_of(bytes: &[u8]) -> Option<String> {
        match sniff(bytes, 16384) {
            Sniff::Done(FirstPacket::Http { host, .. }) => host,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn is_invalid_http(bytes: &[u8]) -> bool {
        matches!(sniff(bytes, 16384), Sniff::Invalid(Protocol::Http, _))
    }

    #[test]
    fn http_heads_give_their_host() {
        let head = b"GET / HTTP/1.1\r\nHost: A.Test:8080\r\nUser-Agent: x\r\n\r\nbody";
        assert_eq!(
            sniff(head, 16384),
            Sniff::Done(FirstPacket::Http {
                host: Some("a.test".into()),
                head: head.len() - 4,
            })
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a", 16384), Sniff::NeedMore);
        assert_eq!(sniff(b"GE", 16384), Sniff::NeedMore);
        assert_eq!(host_of(b"GET / HTTP/1.0\r\n\r\n"), None);
        assert_eq!(
            host_of(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").as_deref(),
            Some("::1")
        );
        assert_eq!(
            host_of(b"GET / HTTP/1.1\r\nHost:a.test.\t\r\n\r\n").as_deref(),
            Some("a.test")
        );
        assert!(is_invalid_http(b"GET / HTTP/1.1\r\nHost a\r\n\r\n"));
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nX: y\r\n", 20),
            Sniff::TooLarge(Protocol::Http)
        );
    }

    #[test]
    fn an_absolute_form_target_is_routed_on_its_authority_and_must_agree_with_host() {
        assert_eq!(
            host_of(b"GET http://Internal.Test:8080/x?y HTTP/1.1\r\n\r\n").as_deref(),
            Some("internal.test")
        );
        assert_eq!(
            host_of(b"GET https://a.test HTTP/1.1\r\nHost: A.test:443\r\n\r\n").as_deref(),
            Some("a.test")
        );
        assert!(is_invalid_http(
            b"GET http://internal.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"
        ));
        assert!(is_invalid_http(
            b"GET http://user@internal.test/ HTTP/1.1\r\nHost: internal.test\r\n\r\n"
        ));
        assert!(is_invalid_http(
            b"GET http:/x HTTP/1.1\r\nHost: a.test\r\n\r\n"
        ));
        assert_eq!(
            host_of(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n").as_deref(),
            Some("a.test")
        );
        assert!(is_invalid_http(
            b"CONNECT internal.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n"
        ));
        // Origin and asterisk forms name no host of their own.
        assert_eq!(
            host_of(b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n").as_deref(),
            Some("a.test")
        );
    }

    #[test]
    fn two_host_headers_or_a_host_that_is_no_host_name_are_refused() {
        assert!(is_invalid_http(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nhost: internal.test\r\n\r\n"
        ));
        for host in [
            &b"[a.test]evil.test"[..],
            b"a.test:evil",
            b"a.test...",
            b"a.test\xc2\xa0",
            b"..a.test",
            b"a.test, internal.test",
        ] {
            let head = [&b"GET / HTTP/1.1\r\nHost: "[..], host, b"\r\n\r\n"].concat();
            assert!(
                is_invalid_http(&head),
                "{:?}: {:?}",
                String::from_utf8_lossy(host),
                sniff(&head, 16384)
            );
        }
    }

    #[test]
    fn what_is_not_http_1_goes_to_the_default_route_at_once() {
        for bytes in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"OPTIONS rtsp://a.test/media RTSP/1.0\r\nCSeq: 1\r\n\r\n",
            b"OPTIONS sip:a@a.test SIP/2.0\r\n",
            b"SET k v\r\n",
            b"SET k v",
            b"GET k\r\n",
            b"HELLO",
            b"HELLO 3\r\n",
            b"QUIT\r\n",
            b"GET / HTTP/1.1 x\r\n\r\n",
            b"GET\r\n",
        ] {
            assert_eq!(
                sniff(bytes, 16384),
                Sniff::Done(FirstPacket::Unknown),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn a_request_line_arriving_in_pieces_waits_while_it_can_still_be_http_1() {
        let head = b"GET /index.html HTTP/1.1\r\nHost: a.test\r\n\r\n";
        for end in 1..head.len() {
            assert_eq!(sniff(&head[..end], 16384), Sniff::NeedMore, "at {end}");
        }
        assert_eq!(host_of(head).as_deref(), Some("a.test"));
        assert_eq!(sniff(b"PROPFI", 16384), Sniff::NeedMore);
        assert_eq!(
            sniff(b"GET / HTTP/2", 16384),
            Sniff::Done(FirstPacket::Unknown)
        );
        assert!(is_invalid_http(b"GET / HTTP/1.9\r\n\r\n"));
        // HTTP/1.x with a malformed request line is refused, not rerouted.
        assert!(is_invalid_http(b"GET  / HTTP/1.1\r\n\r\n"));
        // A raw non-ASCII target is HTTP/1.x still, routed on its Host.
        assert_eq!(
            host_of("GET /café HTTP/1.1\r\nHost: a.test\r\n\r\n".as_bytes()).as_deref(),
            Some("a.test")
        );
        // An empty Host names no host.
        assert_eq!(host_of(b"GET / HTTP/1.1\r\nHost: \r\n\r\n"), None);
    }

    #[test]
    fn server_names_that_are_not_host_names_are_refused() {
        for name in ["..w.test", "b.test...", "a..b.test", "b.test\u{a0}"] {
            assert!(
                matches!(
                    sniff(&client_hello(Some(name)), 16384),
                    Sniff::Invalid(Protocol::Tls, _)
                ),
                "{name:?}"
            );
        }
        assert_eq!(
            sniff(&client_hello(Some("b.test.")), 16384),
            Sniff::Done(FirstPacket::Tls {
                sni: Some("b.test".into())
            })
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
        assert_eq!(sniff(b"GETX", 16384), Sniff::Done(FirstPacket::Unknown));
        assert_eq!(
            sniff(b"SSH-2.0-x", 16384),
            Sniff::Done(FirstPacket::Unknown)
        );
        assert_eq!(sniff(b"", 16384), Sniff::NeedMore);
    }
}
