//! Host names as routes compare them, from a TLS server name, an HTTP
//! `Host` or request target, or a route's pattern: valid names are
//! lower-cased and lose one final dot; anything else is refused, never
//! normalised into a match (`a.test...`, `..w.test`, `[a.test]evil.test`).
use std::net::Ipv6Addr;

/// Longest host name (RFC 1035: 253 characters without the final dot).
const NAME_MAX: usize = 253;
/// Longest label.
const LABEL_MAX: usize = 63;

/// `name` lower-cased without its final dot, if it is a host name: labels
/// of 1 to 63 of `A-Z a-z 0-9 - _`, separated by single dots, at most one
/// final dot, 253 characters at most.
pub fn normalize(name: &[u8]) -> Option<String> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    let valid = !name.is_empty()
        && name.len() <= NAME_MAX
        && name.split(|&b| b == b'.').all(|label| {
            (1..=LABEL_MAX).contains(&label.len())
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    // Valid means ASCII, so the conversion cannot fail.
    valid.then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// The host of an HTTP authority (`host[:port]`, `[IPv6][:port]`; a `Host`
/// value or the authority of a request target), as [`normalize`] gives it
/// (an IPv6 address without its brackets). `None` if it is not one: a port
/// must be up to 5 digits up to 65535 (none: the default), and nothing else
/// may follow.
pub fn authority(value: &[u8]) -> Option<String> {
    // Only SP and HTAB surround a field value (RFC 9110 §5.5), not other
    // white space such as a non-breaking space.
    let value = value.trim_ascii_start();
    let value = value
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(&value[..0], |end| &value[..=end]);
    let (host, port) = if let Some(rest) = value.strip_prefix(b"[") {
        let end = rest.iter().position(|&b| b == b']')?;
        let address = std::str::from_utf8(&rest[..end]).ok()?;
        address.parse::<Ipv6Addr>().ok()?;
        (Some(address.to_ascii_lowercase()), &rest[end + 1..])
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        (normalize(&value[..end]), &value[end..])
    };
    // RFC 3986: `port = *DIGIT`, so `a.test:` is the default port.
    let port_ok = match port {
        [] | [b':'] => true,
        [b':', digits @ ..] => {
            digits.len() <= 5
                && digits.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse::<u32>().ok())
                    .is_some_and(|port| port <= u32::from(u16::MAX))
        }
        _ => false,
    };
    if port_ok { host } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_lower_cased_and_lose_one_final_dot() {
        assert_eq!(normalize(b"A.Test").as_deref(), Some("a.test"));
        assert_eq!(normalize(b"a.test.").as_deref(), Some("a.test"));
        assert_eq!(normalize(b"x_y-z.test").as_deref(), Some("x_y-z.test"));
        assert_eq!(normalize(b"192.0.2.1").as_deref(), Some("192.0.2.1"));
    }

    #[test]
    fn what_is_not_a_host_name_is_refused_not_normalised() {
        for bad in [
            &b"a.test.."[..],
            b"a.test...",
            b"..w.test",
            b".a.test",
            b"a..test",
            b"",
            b".",
            b"a test",
            b"a.test\xc2\xa0",
            b"a.t\xc3\xa9st",
            b"a/b",
            b"a:b",
        ] {
            assert_eq!(normalize(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(normalize(&[b'a'; 64]).is_none());
        let long = [
            &[b'a'; 63][..],
            b".",
            &[b'b'; 63],
            b".",
            &[b'c'; 63],
            b".",
            &[b'd'; 62],
        ]
        .concat();
        assert_eq!(long.len(), 254);
        assert!(normalize(&long).is_none());
        assert!(normalize(&long[1..]).is_some());
    }

    #[test]
    fn authorities_give_their_host_without_the_port() {
        assert_eq!(authority(b"A.Test:8080").as_deref(), Some("a.test"));
        assert_eq!(authority(b" a.test \t").as_deref(), Some("a.test"));
        assert_eq!(authority(b"a.test.:80").as_deref(), Some("a.test"));
        assert_eq!(authority(b"[::1]:80").as_deref(), Some("::1"));
        assert_eq!(authority(b"[FE80::1]").as_deref(), Some("fe80::1"));
        assert_eq!(authority(b"a.test:65535").as_deref(), Some("a.test"));
        assert_eq!(authority(b"a.test:").as_deref(), Some("a.test"));
    }

    #[test]
    fn authorities_with_anything_after_the_host_or_port_are_refused() {
        for bad in [
            &b"[a.test]evil.test"[..],
            b"[::1]evil",
            b"[::1",
            b"[a.test]",
            b"a.test:evil",
            b"a.test:80:80",
            b"a.test:65536",
            b"a.test:123456",
            b"a.test...",
            b"a.test\xc2\xa0",
            b"user@a.test",
            b"a.test/x",
            b"",
        ] {
            assert_eq!(authority(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
