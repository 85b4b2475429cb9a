//! `ebpf-echo`: the demo of kernel splicing. A glommio executor per core
//! accepts connections and inserts each socket into its own core's SockMap;
//! the echo probe then sends every byte back inside the kernel.
//! `--mode copy` echoes in userspace instead (the original article's naive
//! loop), for comparison.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, ValueEnum};
use tracing_subscriber::EnvFilter;

mod server;
mod stats;

/// How connections are echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// In the kernel: the echo probe redirects every byte (userspace reads none).
    Ebpf,
    /// In userspace: read and write back every byte (the naive loop).
    Copy,
}

#[derive(Debug, Parser)]
#[command(
    name = "ebpf-echo",
    version,
    about = "TCP echo server whose bytes are echoed inside the kernel by a Rust eBPF probe",
    after_help = "Examples:\n  \
        ebpf-echo                                  # 127.0.0.1:10000, all cores, in-kernel echo\n  \
        ebpf-echo --mode copy --cores 1 --stats    # userspace echo on one core, print counters\n  \
        kill -USR1 <pid>                           # print counters now"
)]
pub struct Cli {
    /// Address to listen on (one SO_REUSEPORT listener per core; port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:10000")]
    pub listen: SocketAddr,
    /// Executors to run, one pinned to each core [default: all online cores].
    #[arg(long)]
    pub cores: Option<usize>,
    /// How bytes are echoed.
    #[arg(long, value_enum, default_value_t = Mode::Ebpf)]
    pub mode: Mode,
    /// Print counters (kernel and userspace) every --stats-interval, and at exit.
    #[arg(long)]
    pub stats: bool,
    /// Seconds between two --stats lines.
    #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
    pub stats_interval: f64,
    /// SockMap slots per core; a connection that finds none free is echoed
    /// in userspace (logged once, counted as sockmap_full).
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub sockmap_capacity: u32,
    /// Most bytes per connection the kernel may hold queued for a client
    /// that is slower to read than to send (the window starts at 4 MiB and
    /// grows up to this while the client keeps up); past the window,
    /// userspace echoes with TCP flow control until the client catches up.
    #[arg(long, default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(65536..))]
    pub in_flight_limit: u64,
    /// Load this probe object (ELF) instead of the built-in echo probe.
    #[arg(long, value_name = "PATH")]
    pub probe_object: Option<PathBuf>,
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds >= 0.01 && seconds.is_finite() => Ok(seconds),
        _ => Err(format!("`{text}` is not a number of seconds >= 0.01")),
    }
}

impl Cli {
    fn stats_interval(&self) -> Duration {
        Duration::from_secs_f64(self.stats_interval)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match server::run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ebpf-echo: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
