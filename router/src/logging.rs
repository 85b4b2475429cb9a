//! The process log (tracing, to stderr): its level, checked so that a
//! misspelt one is an error rather than silence, and a writer that keeps
//! every record on one line (a multi-line message, such as a library's
//! pretty-printed error, is joined), so that line-based tools see one
//! record per line.
use std::io::{self, Write};

use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

/// The levels `--log-level` takes by name.
pub const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The filter `--log-level` asks for: a level by name, or a tracing filter
/// with a target (`router=debug`, `info,glommio=warn`). A bare word that
/// is no level (`verbose`) would be read as a target name and silence
/// everything else: it is an error that lists the levels.
pub fn filter(level: &str) -> Result<EnvFilter, String> {
    let plain = !level.contains(['=', ',', '[', ':']);
    if plain && !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "--log-level {level}: not a level; use one of {}, or a filter such as `router=debug`",
            LEVELS.join(", ")
        ));
    }
    EnvFilter::try_new(level).map_err(|e| format!("--log-level {level}: {e}"))
}

/// Makes a [`OneLine`] writer per record.
pub struct OneLineStderr;

impl<'a> MakeWriter<'a> for OneLineStderr {
    type Writer = OneLine;

    fn make_writer(&'a self) -> OneLine {
        OneLine(Vec::with_capacity(256))
    }
}

/// Collects one record, and writes it to stderr when dropped, its inner
/// line breaks (and the indentation after them) turned into one space.
pub struct OneLine(Vec<u8>);

impl Write for OneLine {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for OneLine {
    fn drop(&mut self) {
        let line = one_line(&self.0);
        let _ = io::stderr().lock().write_all(&line);
    }
}

/// `record` with its line breaks but the last joined by single spaces.
pub fn one_line(record: &[u8]) -> Vec<u8> {
    let body = record.strip_suffix(b"\n").unwrap_or(record);
    if !body.contains(&b'\n') {
        return record.to_vec();
    }
    let mut line = Vec::with_capacity(record.len());
    let mut rest = body;
    while let Some(at) = rest.iter().position(|b| *b == b'\n') {
        line.extend_from_slice(rest[..at].strip_suffix(b"\r").unwrap_or(&rest[..at]));
        line.push(b' ');
        rest = &rest[at + 1..];
        let indent = rest
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(rest.len());
        rest = &rest[indent..];
    }
    line.extend_from_slice(rest);
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_levels_are_errors_that_list_the_valid_ones() {
        let e = filter("verbose").unwrap_err();
        assert!(e.contains("error, warn, info, debug, trace"), "{e}");
        for ok in ["info", "DEBUG", "router=debug", "info,glommio=warn", "off"] {
            assert!(filter(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn a_multi_line_record_becomes_one_line() {
        let record =
            b"WARN glommio: Error. SkippingOs {\n    code: 12,\n    kind: OutOfMemory,\n}\n";
        assert_eq!(
            one_line(record),
            b"WARN glommio: Error. SkippingOs { code: 12, kind: OutOfMemory, }\n"
        );
        assert_eq!(one_line(b"plain\n"), b"plain\n");
    }
}
