//! `loadgen`: drives TCP servers and proxies over loopback for the benchmark
//! scripts and prints one `key=value` result line per run.
//!
//! - `echo`: stream to an echo server, count the bytes echoed back.
//! - `serve`: a backend that answers each connection's first bytes with a
//!   fixed reply (a stand-in TLS server, or the idle side of held connections).
//! - `connect`: new connections per second, each sending a first packet that
//!   a router must route (a ClientHello naming `--sni`, or `--first` text).
//! - `hold`: open N connections through a proxy, each routed and answered
//!   once, and keep them idle until stdin closes.
mod connect;
mod echo;
mod hold;
mod serve;

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "loadgen", about = "Load generator for the benchmark scripts")]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// Stream to an echo server and count the bytes echoed back.
    Echo {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Bytes per write.
        #[arg(long, default_value_t = 64 * 1024)]
        chunk: usize,
        /// Most bytes a connection sends ahead of the echo it received.
        #[arg(long, default_value_t = 4 << 20)]
        window: u64,
    },
    /// Serve: read each connection's first bytes, answer `--reply`, then
    /// either close (`--close`) or read until the client closes.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "ok\n")]
        reply: String,
        /// Close right after replying (the server closes first, as an HTTP
        /// server answering `Connection: close` does).
        #[arg(long)]
        close: bool,
    },
    /// Open connections in a loop, each sending a first packet and reading
    /// the reply to its end; report connections per second.
    Connect {
        #[arg(long)]
        addr: SocketAddr,
        #[command(flatten)]
        first: FirstPacket,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Hold N idle connections, each routed and answered once, until stdin
    /// closes (or `--seconds` pass).
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[command(flatten)]
        first: FirstPacket,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 600.0)]
        seconds: f64,
    },
}

/// What each connection sends first.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct FirstPacket {
    /// A TLS ClientHello naming this server.
    #[arg(long)]
    sni: Option<String>,
    /// This text (`\r` and `\n` escapes are understood).
    #[arg(long)]
    first: Option<String>,
}

impl FirstPacket {
    fn bytes(&self) -> Vec<u8> {
        match (&self.sni, &self.first) {
            (Some(name), _) => testkit::tls::client_hello(Some(name)),
            (None, Some(text)) => text.replace("\\r", "\r").replace("\\n", "\n").into_bytes(),
            (None, None) => unreachable!("clap requires one of --sni and --first"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().workload {
        Workload::Echo {
            addr,
            connections,
            seconds,
            chunk,
            window,
        } => echo::echo(
            addr,
            connections,
            Duration::from_secs_f64(seconds),
            chunk,
            window,
        ),
        Workload::Serve {
            listen,
            reply,
            close,
        } => serve::serve(listen, reply.into_bytes(), close),
        Workload::Connect {
            addr,
            first,
            concurrency,
            seconds,
        } => connect::connect(
            addr,
            first.bytes(),
            concurrency,
            Duration::from_secs_f64(seconds),
        ),
        Workload::Hold {
            addr,
            first,
            connections,
            seconds,
        } => hold::hold(
            addr,
            first.bytes(),
            connections,
            Duration::from_secs_f64(seconds),
        ),
    }
}
