//! What a route may change in the first packet before forwarding it:
//! `http_close` makes the backend close the connection after its first
//! response, so that the next request on a kept-alive connection, which the
//! router does not look at, cannot reach another virtual host.

/// Replaces the `Connection` and `Keep-Alive` headers of the request head
/// (its first `head` bytes, as the sniffer measured it) with
/// `Connection: close`; what follows the head is kept as it is. A server
/// that receives it closes after its response and processes no later
/// request on the connection (RFC 9112 §9.6). A request that asks for an
/// upgrade (`upgrade` among its `Connection` options: WebSocket, h2c) keeps
/// it, as `Connection: close, upgrade`: a server that switches protocols
/// speaks the new one from there on, and one that declines closes.
pub fn connection_close(first: &[u8], head: usize) -> Vec<u8> {
    let (head, rest) = first.split_at(head.min(first.len()));
    let mut out = Vec::with_capacity(first.len() + 19);
    let mut lines = head.split_inclusive(|&b| b == b'\n');
    if let Some(request_line) = lines.next() {
        out.extend_from_slice(request_line);
    }
    let mut upgrade = false;
    for line in lines {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content.is_empty() {
            // The blank line that ends the head.
            out.extend_from_slice(if upgrade {
                b"Connection: close, upgrade\r\n"
            } else {
                b"Connection: close\r\n"
            });
            out.extend_from_slice(line);
            continue;
        }
        let (name, value) = match content.iter().position(|&b| b == b':') {
            Some(colon) => (&content[..colon], &content[colon + 1..]),
            None => (content, &b""[..]),
        };
        if name.eq_ignore_ascii_case(b"connection") {
            upgrade |= value
                .split(|&b| b == b',')
                .any(|option| option.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        } else if !name.eq_ignore_ascii_case(b"keep-alive") {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(text: &[u8]) -> String {
        let head = text.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        String::from_utf8(connection_close(text, head)).unwrap()
    }

    #[test]
    fn connection_headers_are_replaced_by_close_and_the_body_is_kept() {
        assert_eq!(
            rewrite(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX: y\r\n\r\nGET /2 HTTP/1.1\r\n"),
            "GET / HTTP/1.1\r\nHost: a.test\r\nX: y\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\n"
        );
        assert_eq!(
            rewrite(b"POST / HTTP/1.0\r\nhost: a.test\r\nCONNECTION:close\r\n\r\nbody"),
            "POST / HTTP/1.0\r\nhost: a.test\r\nConnection: close\r\n\r\nbody"
        );
        // An upgrade stays asked for.
        assert_eq!(
            rewrite(b"GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: close, upgrade\r\n\r\n"
        );
        // A header whose name only starts like it stays.
        assert_eq!(
            rewrite(b"GET / HTTP/1.1\r\nConnectionX: 1\r\n\r\n"),
            "GET / HTTP/1.1\r\nConnectionX: 1\r\nConnection: close\r\n\r\n"
        );
    }
}
