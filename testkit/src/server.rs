//! A server binary under test, run as a child process.
//!
//! The binaries print `… listening on ADDR …` once ready and a `stats:` line
//! of `key=value` pairs on SIGUSR1; [`Server`] reads both from the child's
//! stdout and keeps its stderr for failure messages.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One `stats:` line, parsed.
#[derive(Debug, Clone)]
pub struct Stats(pub HashMap<String, String>);

impl Stats {
    fn parse(line: &str) -> Self {
        Self(
            line.trim_start_matches("stats:")
                .split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    /// The value of `key` as a number; panics (failing the test) if absent.
    pub fn get(&self, key: &str) -> u64 {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("stats has no `{key}`: {:?}", self.0))
            .parse()
            .unwrap_or_else(|_| panic!("stats `{key}` is not a number: {:?}", self.0))
    }

    pub fn text(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// A running server; killed when dropped.
pub struct Server {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts `program` with `args` and waits for its `listening on ADDR`
    /// line.
    pub fn start(program: &str, args: &[&str]) -> Self {
        Self::start_command(Command::new(program).args(args))
    }

    /// Like [`Server::start`], for a prepared command.
    pub fn start_command(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut child_stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = child_stderr.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        let mut server = Self {
            child,
            lines,
            stderr,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let line = server.next_line(|l| l.contains("listening on"), START_TIMEOUT);
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.trim_end_matches(',').parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        server.addr = addr;
        server
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits up to `timeout` until the server's stderr says `text`.
    pub fn wait_stderr(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} on stderr within {timeout:?}:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for a stdout line for which `wanted` holds.
    pub fn next_line(&mut self, wanted: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if wanted(&line) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no expected line within {timeout:?}; stderr:\n{}",
                        self.stderr()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!(
                        "server exited ({status:?}) before the expected line; stderr:\n{}",
                        self.stderr()
                    )
                }
            }
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Asks for a `stats:` line (SIGUSR1) and returns it.
    pub fn stats(&mut self) -> Stats {
        self.signal(libc::SIGUSR1);
        let line = self.next_line(|l| l.starts_with("stats:"), Duration::from_secs(10));
        Stats::parse(&line)
    }

    /// Polls the stats until `done` holds, for at most `timeout`.
    pub fn wait_stats(&mut self, done: impl Fn(&Stats) -> bool, timeout: Duration) -> Stats {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats();
            if done(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "stats never reached the expected state within {timeout:?}: {:?}",
                stats.0
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Open file descriptors of the server process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("reading the server's /proc/PID/fd")
            .count()
    }

    /// Waits up to `timeout` for the server to exit; `None` if it still
    /// runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the server") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `timeout` for the server to exit, and asserts that it
    /// exited with success (`what` and its stderr say which, if not).
    pub fn assert_exits_ok(&mut self, timeout: Duration, what: &str) {
        let exited = self.wait_exit(timeout);
        assert!(
            exited.is_some_and(|status| status.success()),
            "{what}: {exited:?}\n{}",
            self.stderr()
        );
    }

    /// Resident memory of the server process, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading the server's /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Ids of the BPF programs and maps the server holds descriptors of
    /// (`prog_id:` / `map_id:` in `/proc/PID/fdinfo`), as `(programs, maps)`.
    pub fn bpf_objects(&self) -> (Vec<u32>, Vec<u32>) {
        let (mut programs, mut maps) = (Vec::new(), Vec::new());
        let dir = format!("/proc/{}/fdinfo", self.pid());
        for entry in std::fs::read_dir(&dir).expect("reading fdinfo").flatten() {
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            for line in info.lines() {
                let id = |prefix| line.strip_prefix(prefix)?.trim().parse::<u32>().ok();
                if let Some(id) = id("prog_id:") {
                    programs.push(id);
                } else if let Some(id) = id("map_id:") {
                    maps.push(id);
                }
            }
        }
        programs.sort_unstable();
        programs.dedup();
        maps.sort_unstable();
        maps.dedup();
        (programs, maps)
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill(mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().expect("reaping the server")
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the server") {
                return status;
            }
            assert!(Instant::now() < deadline, "server ignored SIGTERM for 10 s");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command that is expected to fail at start-up; returns its exit
/// status and stderr. Bounded: killed after 30 s.
pub fn run_to_failure(command: &mut Command) -> (ExitStatus, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .expect("piped")
                .read_to_string(&mut stderr)
                .expect("reading stderr");
            return (status, stderr);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{command:?} did not exit within {START_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}
