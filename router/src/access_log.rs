//! The access log: one line per connection at its end (refused ones too),
//! as `key=value` text or as a JSON object, to stderr or a file.
//!
//! An executor never writes to the file itself: it formats its line into a
//! buffer of its core (an uncontended lock, no system call), and one writer
//! thread takes every core's buffer a few times a second and writes it. The
//! file is reopened on SIGHUP and SIGUSR2 (after logrotate moved it), and
//! what is buffered is written out before the process exits. A core whose
//! buffer holds [`MAX_BUFFERED`] bytes (the disk is that far behind) drops
//! further lines and counts them, rather than grow without end.
use std::{
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::{self, Write as _},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    thread,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use splice::pipe::Path;

use crate::config::AccessLog as Format;

/// How often the writer thread takes the cores' lines.
const WRITE_EVERY: Duration = Duration::from_millis(50);
/// Bytes a core buffers at most between two writes.
const MAX_BUFFERED: usize = 4 << 20;
/// What one write(2) to stderr carries at most: a pipe keeps writes up to
/// PIPE_BUF whole, so no other line lands inside one of ours.
const PIPE_BUF: usize = 4096;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions ended normally.
    Closed,
    /// An error ended it: a reset was passed on.
    Reset,
    /// Refused, for this reason (a [`crate::routes::Refusal`] name, or
    /// `limit` at a connection limit).
    Refused(&'static str),
}

/// One connection, as its line says it.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// The client: the address a PROXY protocol header carried, else the
    /// peer's.
    pub client: Option<SocketAddr>,
    pub listener: Option<SocketAddr>,
    pub route: Option<&'a str>,
    /// What it was routed on: the TLS server name, HTTP host or preamble
    /// route name.
    pub name: Option<&'a str>,
    pub backend: Option<SocketAddr>,
    /// How it was forwarded (`None`: it was not).
    pub path: Option<Path>,
    /// Bytes delivered each way (the kernel's count for spliced bytes).
    pub to_backend: u64,
    pub to_client: u64,
    pub duration: Duration,
    pub end: End,
}

/// The JSON form of an [`Entry`].
#[derive(Serialize)]
struct JsonLine<'a> {
    time: &'a str,
    client: Option<String>,
    listener: Option<String>,
    route: Option<&'a str>,
    name: Option<&'a str>,
    backend: Option<String>,
    path: &'a str,
    bytes_to_backend: u64,
    bytes_to_client: u64,
    duration_ms: f64,
    end: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

fn path_name(path: Option<Path>) -> &'static str {
    match path {
        Some(Path::Spliced) => "spliced",
        Some(Path::Copied) => "copied",
        Some(Path::Fallback) => "fallback",
        None => "none",
    }
}

impl End {
    fn parts(self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::Closed => ("closed", None),
            Self::Reset => ("reset", None),
            Self::Refused(reason) => ("refused", Some(reason)),
        }
    }
}

/// Appends `entry`'s line (with its newline) to `out`, ended at `now`.
pub fn write_line(out: &mut String, format: Format, entry: &Entry, now: SystemTime) {
    let time = humantime::format_rfc3339_millis(now).to_string();
    let (end, reason) = entry.end.parts();
    let duration_ms = entry.duration.as_secs_f64() * 1e3;
    match format {
        Format::Off => {}
        Format::Json => {
            let line = JsonLine {
                time: &time,
                client: entry.client.map(|a| a.to_string()),
                listener: entry.listener.map(|a| a.to_string()),
                route: entry.route,
                name: entry.name,
                backend: entry.backend.map(|a| a.to_string()),
                path: path_name(entry.path),
                bytes_to_backend: entry.to_backend,
                bytes_to_client: entry.to_client,
                duration_ms: (duration_ms * 1e3).round() / 1e3,
                end,
                reason,
            };
            // serde_json escapes every control character: one line.
            out.push_str(&serde_json::to_string(&line).expect("plain data serializes"));
            out.push('\n');
        }
        Format::Text => {
            let shown = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
            let _ = write!(
                out,
                "{time} access client={} listener={} route={} name={} backend={} path={} \
                 bytes_to_backend={} bytes_to_client={} duration_ms={duration_ms:.3} end={end}",
                shown(entry.client.map(|a| a.to_string())),
                shown(entry.listener.map(|a| a.to_string())),
                text_value(entry.route),
                text_value(entry.name),
                shown(entry.backend.map(|a| a.to_string())),
                path_name(entry.path),
                entry.to_backend,
                entry.to_client,
            );
            if let Some(reason) = reason {
                let _ = write!(out, " reason={reason}");
            }
            out.push('\n');
        }
    }
}

/// A text value: as it is when it is one plain word (host names, route
/// names), else quoted with Rust's escapes, so a line stays one line.
fn text_value(value: Option<&str>) -> String {
    match value {
        None => "-".to_owned(),
        Some(v)
            if !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' && b != b'=') =>
        {
            v.to_owned()
        }
        Some(v) => format!("{v:?}"),
    }
}

/// Where the lines go.
enum Sink {
    Stderr,
    File(PathBuf, File),
}

impl Sink {
    fn open(path: Option<&PathBuf>) -> io::Result<Self> {
        Ok(match path {
            None => Self::Stderr,
            Some(path) => Self::File(
                path.clone(),
                OpenOptions::new().create(true).append(true).open(path)?,
            ),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::File(_, file) => file.write_all(bytes),
            Self::Stderr => {
                let mut stderr = io::stderr().lock();
                for piece in line_pieces(bytes, PIPE_BUF) {
                    stderr.write_all(piece)?;
                }
                Ok(())
            }
        }
    }
}

/// `bytes` (whole lines) cut into pieces of whole lines of at most `max`
/// bytes where the lines allow.
fn line_pieces(bytes: &[u8], max: usize) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let window = &rest[..rest.len().min(max)];
        let cut = match window.iter().rposition(|b| *b == b'\n') {
            Some(at) if rest.len() > max => at + 1,
            _ if rest.len() <= max => rest.len(),
            // One line longer than `max`: whole.
            _ => rest
                .iter()
                .position(|b| *b == b'\n')
                .map_or(rest.len(), |at| at + 1),
        };
        let (piece, after) = rest.split_at(cut);
        rest = after;
        Some(piece)
    })
}

/// The access log of the process: one buffer per core, one writer thread.
pub struct AccessLogger {
    cores: Vec<Mutex<String>>,
    sink: Mutex<Sink>,
    /// Set by [`AccessLogger::reopen`]: the writer opens this path next.
    reopen: Mutex<Option<Option<PathBuf>>>,
    wake: Condvar,
    /// Lines dropped because a core's buffer was full.
    pub dropped: AtomicU64,
}

impl AccessLogger {
    /// Opens `path` (stderr if `None`); [`AccessLogger::start_writer`]
    /// starts writing.
    pub fn open(cores: usize, path: Option<&PathBuf>) -> io::Result<Arc<Self>> {
        let sink = Sink::open(path).map_err(|e| with_path(e, path))?;
        Ok(Arc::new(Self {
            cores: (0..cores).map(|_| Mutex::default()).collect(),
            sink: Mutex::new(sink),
            reopen: Mutex::new(None),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
        }))
    }

    /// Starts the writer thread. Called once the main thread dropped its
    /// capabilities: a thread keeps the set it was started with.
    pub fn start_writer(self: &Arc<Self>) -> io::Result<()> {
        let writer = Arc::clone(self);
        thread::Builder::new()
            .name("router-access-log".into())
            .spawn(move || writer.write_forever())?;
        Ok(())
    }

    /// Logs `entry` from `core`, in `format` (nothing if `off`).
    pub fn record(&self, core: usize, format: Format, entry: &Entry) {
        if format == Format::Off {
            return;
        }
        let mut buffer = self.cores[core].lock().expect("no panic under this lock");
        if buffer.len() >= MAX_BUFFERED {
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        write_line(&mut buffer, format, entry, SystemTime::now());
    }

    /// Asks the writer to reopen the log at `path` (stderr if `None`):
    /// on SIGHUP (the path may have changed) and SIGUSR2 (logrotate).
    pub fn reopen(&self, path: Option<PathBuf>) {
        *self.reopen.lock().expect("no panic under this lock") = Some(path);
        self.wake.notify_one();
    }

    /// Writes every core's buffered lines now (before the process exits).
    pub fn flush(&self) {
        // First the sink: a batch the writer thread took is written before
        // this returns (the process exits after it).
        let mut sink = self.sink.lock().expect("no panic under this lock");
        let mut pending = String::new();
        for core in &self.cores {
            let mut buffer = core.lock().expect("no panic under this lock");
            if pending.is_empty() {
                std::mem::swap(&mut pending, &mut buffer);
            } else {
                pending.push_str(&buffer);
                buffer.clear();
            }
        }
        if pending.is_empty() {
            return;
        }
        if let Err(e) = sink.write(pending.as_bytes()) {
            tracing::warn!(
                "access log: write failed, {} bytes lost: {e}",
                pending.len()
            );
        }
    }

    fn write_forever(&self) {
        let mut reported_drops = 0;
        loop {
            let request = {
                let reopen = self.reopen.lock().expect("no panic under this lock");
                let (mut reopen, _) = self
                    .wake
                    .wait_timeout(reopen, WRITE_EVERY)
                    .expect("no panic under this lock");
                reopen.take()
            };
            // Lines logged before the reopen go to the old file.
            self.flush();
            if let Some(path) = request {
                match Sink::open(path.as_ref()) {
                    Ok(sink) => *self.sink.lock().expect("no panic under this lock") = sink,
                    Err(e) => tracing::error!(
                        "access log: {}; writing on to the previous one",
                        with_path(e, path.as_ref())
                    ),
                }
            }
            let dropped = self.dropped.load(Relaxed);
            if dropped != reported_drops {
                tracing::warn!(
                    "access log: {} line(s) dropped: the log is written slower than connections end",
                    dropped - reported_drops
                );
                reported_drops = dropped;
            }
        }
    }

    /// The file written to (`None`: stderr).
    pub fn path(&self) -> Option<PathBuf> {
        match &*self.sink.lock().expect("no panic under this lock") {
            Sink::Stderr => None,
            Sink::File(path, _) => Some(path.clone()),
        }
    }
}

fn with_path(e: io::Error, path: Option<&PathBuf>) -> io::Error {
    match path {
        Some(path) => io::Error::new(
            e.kind(),
            format!("cannot open the access log {}: {e}", path.display()),
        ),
        None => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            client: Some("192.0.2.1:5000".parse().unwrap()),
            listener: Some("127.0.0.1:80".parse().unwrap()),
            route: Some("web"),
            name: Some("a.test"),
            backend: Some("127.0.0.1:9001".parse().unwrap()),
            path: Some(Path::Spliced),
            to_backend: 120,
            to_client: 4096,
            duration: Duration::from_micros(1500),
            end: End::Closed,
        }
    }

    #[test]
    fn a_text_line_is_one_line_of_key_value_pairs() {
        let mut out = String::new();
        write_line(&mut out, Format::Text, &entry(), SystemTime::UNIX_EPOCH);
        assert_eq!(
            out,
            "1970-01-01T00:00:00.000Z access client=192.0.2.1:5000 listener=127.0.0.1:80 \
             route=web name=a.test backend=127.0.0.1:9001 path=spliced bytes_to_backend=120 \
             bytes_to_client=4096 duration_ms=1.500 end=closed\n"
        );
        let mut odd = entry();
        odd.name = Some("a b\nc");
        odd.end = End::Refused("no_route");
        odd.backend = None;
        out.clear();
        write_line(&mut out, Format::Text, &odd, SystemTime::UNIX_EPOCH);
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains(r#"name="a b\nc""#), "{out}");
        assert!(out.ends_with("backend=- path=spliced bytes_to_backend=120 bytes_to_client=4096 duration_ms=1.500 end=refused reason=no_route\n"), "{out}");
    }

    #[test]
    fn a_json_line_carries_numbers_and_the_routed_name() {
        let mut out = String::new();
        write_line(&mut out, Format::Json, &entry(), SystemTime::UNIX_EPOCH);
        assert_eq!(out.lines().count(), 1);
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value["name"], "a.test");
        assert_eq!(value["bytes_to_backend"], 120);
        assert_eq!(value["bytes_to_client"], 4096);
        assert_eq!(value["path"], "spliced");
        assert_eq!(value["duration_ms"], 1.5);
        assert!(value.get("reason").is_none());
    }

    #[test]
    fn stderr_pieces_are_whole_lines_within_pipe_buf() {
        let text = "aaaa\nbbbb\ncc\n".repeat(3);
        let pieces: Vec<&[u8]> = line_pieces(text.as_bytes(), 11).collect();
        assert!(pieces.iter().all(|p| p.ends_with(b"\n")), "{pieces:?}");
        assert_eq!(pieces.concat(), text.as_bytes());
        let long = "x".repeat(20) + "\n";
        let pieces: Vec<&[u8]> = line_pieces(long.as_bytes(), 8).collect();
        assert_eq!(pieces, vec![long.as_bytes()]);
    }
}
