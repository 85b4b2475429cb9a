//! What a refused client receives, in its own protocol: an HTTP status, a
//! TLS alert, a preamble error line, or nothing (unknown protocols are just
//! closed).
use crate::{routes::Refusal, sniff::Protocol};

/// TLS alert descriptions (RFC 8446 §6).
const DECODE_ERROR: u8 = 50;
const INTERNAL_ERROR: u8 = 80;
const UNRECOGNIZED_NAME: u8 = 112;
const ACCESS_DENIED: u8 = 49;

/// The bytes to send before closing a refused connection.
pub fn response(protocol: Protocol, refusal: Refusal) -> Vec<u8> {
    match protocol {
        Protocol::Http => http(refusal),
        Protocol::Tls => tls_alert(match refusal {
            Refusal::NoRoute => UNRECOGNIZED_NAME,
            Refusal::Unauthorized => ACCESS_DENIED,
            Refusal::Invalid | Refusal::TooLarge | Refusal::ProxyHeader => DECODE_ERROR,
            Refusal::Unavailable | Refusal::Timeout => INTERNAL_ERROR,
        }),
        Protocol::Preamble => format!("ERR {}\r\n", preamble_reason(refusal)).into_bytes(),
        Protocol::Unknown => Vec::new(),
    }
}

fn http(refusal: Refusal) -> Vec<u8> {
    let (status, body) = match refusal {
        Refusal::NoRoute => ("421 Misdirected Request", "no route for this host\n"),
        Refusal::Unavailable => ("502 Bad Gateway", "no backend available\n"),
        Refusal::Invalid => ("400 Bad Request", "malformed request\n"),
        Refusal::TooLarge => (
            "431 Request Header Fields Too Large",
            "request head too large\n",
        ),
        Refusal::Timeout => ("408 Request Timeout", "request head not received in time\n"),
        Refusal::Unauthorized => ("403 Forbidden", "forbidden\n"),
        Refusal::ProxyHeader => ("400 Bad Request", "PROXY protocol header expected\n"),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A fatal alert record.
fn tls_alert(description: u8) -> Vec<u8> {
    vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]
}

fn preamble_reason(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::NoRoute => "no route",
        Refusal::Unauthorized => "unauthorized",
        Refusal::Invalid => "bad preamble",
        Refusal::Unavailable => "unavailable",
        Refusal::Timeout => "timeout",
        Refusal::TooLarge => "too large",
        Refusal::ProxyHeader => "PROXY protocol header expected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_gets_its_own_refusal() {
        let http = String::from_utf8(response(Protocol::Http, Refusal::NoRoute)).unwrap();
        assert!(
            http.starts_with("HTTP/1.1 421 Misdirected Request\r\n"),
            "{http}"
        );
        assert!(http.contains("Content-Length: 23\r\n"), "{http}");
        let gateway = String::from_utf8(response(Protocol::Http, Refusal::Unavailable)).unwrap();
        assert!(gateway.starts_with("HTTP/1.1 502 Bad Gateway"), "{gateway}");
        assert_eq!(
            response(Protocol::Tls, Refusal::NoRoute),
            [0x15, 3, 3, 0, 2, 2, 112]
        );
        assert_eq!(
            response(Protocol::Preamble, Refusal::Unauthorized),
            b"ERR unauthorized\r\n"
        );
        assert!(response(Protocol::Unknown, Refusal::NoRoute).is_empty());
    }
}
