//! The access log: one line per connection at its end, refused ones
//! included, in text or JSON, to stderr or a file that SIGUSR2 (and SIGHUP)
//! reopen; parsed here line by line after real clients (curl, openssl
//! s_client, a preamble client) went through, in both forwarding modes.
mod common;

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::Shutdown,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use common::{both_modes, config_file, curl, idle, send, start};
use testkit::{Server, backends::Backend, tls};

/// Sends `ROUTE echo` and 10 bytes, waits for their echo (the connection
/// is spliced by then in ebpf mode), then the rest of `size` bytes, and
/// checks every byte came back.
fn echo_in_two(addr: std::net::SocketAddr, size: usize) {
    let mut stream = testkit::clients::connect(addr).unwrap();
    stream.write_all(b"ROUTE echo\r\n0123456789").unwrap();
    let mut first = [0u8; 10];
    stream.read_exact(&mut first).unwrap();
    let rest = vec![7u8; size - 10];
    let reader = stream.try_clone().unwrap();
    let writer = thread::spawn(move || {
        stream.write_all(&rest).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::new();
    (&reader).read_to_end(&mut echoed).unwrap();
    writer.join().unwrap();
    assert_eq!(echoed.len(), size - 10);
}

/// A text line's `key=value` pairs (a quoted value kept as written).
fn pairs(line: &str) -> HashMap<String, String> {
    line.split(' ')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Waits until `read` gives at least `count` access lines; returns them.
fn wait_lines(count: usize, read: impl Fn() -> Vec<String>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = read();
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn text_lines(router: &Server) -> Vec<String> {
    router
        .stderr()
        .lines()
        .filter(|l| l.contains(" access "))
        .map(str::to_owned)
        .collect()
}

fn file_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn each_connection_gets_one_text_line_with_its_name_bytes_and_end() {
    both_modes("access_log_text", |mode| {
        let web = Backend::named("web");
        let echo = Backend::echo();
        let tls = tls::TlsBackend::start("s.test");
        let routes = [
            format!("host:a.test={}", web.addr),
            format!("sni:s.test={}", tls.addr),
            format!("preamble:echo={}", echo.addr),
        ];
        let mut router = start(mode, &routes, &[]);
        // A real HTTP client, a real TLS client, a preamble client, and a
        // refusal.
        let body = curl(&["-H", "Host: a.test", &format!("http://{}/", router.addr)]);
        assert_eq!(body, "web\n");
        let handshake = tls::s_client(router.addr, Some("s.test"));
        assert!(
            handshake.contains("CN = s.test") || handshake.contains("CN=s.test"),
            "{handshake}"
        );
        echo_in_two(router.addr, 100_000);
        let refused = send(router.addr, b"ROUTE nowhere\r\n");
        assert!(refused.starts_with(b"ERR "), "{refused:?}");
        router.wait_stats(idle, Duration::from_secs(10));

        let lines = wait_lines(4, || text_lines(&router));
        assert_eq!(lines.len(), 4, "{mode}: {lines:#?}");
        let by_route = |route: &str| {
            let line = lines
                .iter()
                .find(|l| pairs(l).get("route").map(String::as_str) == Some(route))
                .unwrap_or_else(|| panic!("{mode}: no line for {route}: {lines:#?}"));
            pairs(line)
        };
        let spliced_or_copied = if mode == "ebpf" { "spliced" } else { "copied" };
        let http = by_route("host:a.test");
        assert_eq!(http["name"], "a.test");
        assert_eq!(http["backend"], web.addr.to_string());
        assert_eq!(http["listener"], router.addr.to_string());
        assert!(http["client"].starts_with("127.0.0.1:"), "{http:?}");
        assert_eq!(http["end"], "closed");
        let response = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nweb\n";
        assert_eq!(http["bytes_to_client"], response.len().to_string());
        assert!(http["bytes_to_backend"].parse::<u64>().unwrap() > 30);
        let tls_line = by_route("sni:s.test");
        assert_eq!(tls_line["name"], "s.test");
        assert!(tls_line["bytes_to_client"].parse::<u64>().unwrap() > 500);
        let echo_line = by_route("preamble:echo");
        assert_eq!(echo_line["name"], "echo");
        // The preamble is not forwarded; every other byte is counted, the
        // kernel's count when spliced.
        assert_eq!(echo_line["bytes_to_backend"], "100000");
        assert_eq!(echo_line["bytes_to_client"], "100000");
        assert_eq!(echo_line["path"], spliced_or_copied, "{echo_line:?}");
        assert!(echo_line["duration_ms"].parse::<f64>().unwrap() > 0.0);
        let refused = lines
            .iter()
            .map(|l| pairs(l))
            .find(|p| p["end"] == "refused")
            .expect("a line for the refusal");
        assert_eq!(refused["reason"], "no_route");
        assert_eq!(refused["name"], "nowhere");
        assert_eq!(refused["backend"], "-");
        // Every line of stderr is one log line: a timestamp first.
        for line in router.stderr().lines() {
            assert!(line.starts_with("20"), "{mode}: not a log line: {line:?}");
        }
    });
}

#[test]
fn json_lines_go_to_a_file_that_sigusr2_reopens() {
    both_modes("access_log_json", |mode| {
        let echo = Backend::echo();
        let dir = config_file(&format!("access-json-{mode}"), "");
        let path = dir.with_file_name("access.log");
        let rotated = dir.with_file_name("access.log.1");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&rotated);
        let router = start(
            mode,
            &[format!("preamble:echo={}", echo.addr)],
            &[
                "--access-log",
                "json",
                "--access-log-file",
                path.to_str().unwrap(),
            ],
        );
        let echoed = send(router.addr, b"ROUTE echo\r\n12345");
        assert_eq!(echoed, b"12345");
        let lines = wait_lines(1, || file_lines(&path));
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(line["name"], "echo", "{line}");
        assert_eq!(line["route"], "preamble:echo", "{line}");
        assert_eq!(line["bytes_to_backend"], 5, "{line}");
        assert_eq!(line["bytes_to_client"], 5, "{line}");
        assert_eq!(line["end"], "closed", "{line}");
        assert!(line["duration_ms"].is_f64(), "{line}");
        assert_eq!(line["backend"], echo.addr.to_string(), "{line}");
        // Nothing of it on stderr.
        assert!(!router.stderr().contains("bytes_to_client"));

        // logrotate: move the file, then SIGUSR2; the next line goes to a
        // new file at the path.
        std::fs::rename(&path, &rotated).unwrap();
        router.signal(libc::SIGUSR2);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(path.exists(), "SIGUSR2 did not reopen {}", path.display());
        let refused = send(router.addr, b"ROUTE other\r\n");
        assert!(refused.starts_with(b"ERR "));
        let lines = wait_lines(1, || file_lines(&path));
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(line["end"], "refused", "{line}");
        assert_eq!(line["reason"], "no_route", "{line}");
        assert_eq!(line["bytes_to_backend"], 0, "{line}");
        assert_eq!(file_lines(&rotated).len(), 1, "the old file keeps its line");
    });
}

#[test]
fn the_file_can_turn_the_access_log_off_and_a_bad_reload_logs_one_line() {
    let echo = Backend::echo();
    let text = |format: &str| {
        format!(
            "listen = [\"127.0.0.1:0\"]\naccess_log = \"{format}\"\n[[route]]\nname = \"echo\"\npreamble = \"echo\"\nbackends = [\"{}\"]\n",
            echo.addr
        )
    };
    let path = config_file("access-off", &text("off"));
    let mut router = Server::start(
        common::BIN,
        &["--config", path.to_str().unwrap(), "--mode", "copy"],
    );
    assert_eq!(send(router.addr, b"ROUTE echo\r\nx"), b"x");
    router.wait_stats(idle, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(200));
    assert!(text_lines(&router).is_empty(), "{}", router.stderr());
    // A broken file: the error is one line, naming where.
    std::fs::write(&path, "listen = [\"127.0.0.1:0\"\n[[route]]\n").unwrap();
    router.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !router.stderr().contains("invalid") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let log = router.stderr();
    let error = log
        .lines()
        .find(|l| l.contains("the new configuration is invalid"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(error.contains("line 2"), "{error}");
    for line in log.lines() {
        assert!(line.starts_with("20"), "not one line: {line:?} in\n{log}");
    }
    // Turned on by a reload.
    std::fs::write(&path, text("text")).unwrap();
    router.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !router.stderr().contains("configuration reloaded") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(send(router.addr, b"ROUTE echo\r\ny"), b"y");
    let lines = wait_lines(1, || text_lines(&router));
    assert_eq!(lines.len(), 1, "{}", router.stderr());
    assert!(lines[0].contains("route=echo name=echo"), "{lines:?}");
}
