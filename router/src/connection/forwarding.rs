//! Forwarding a connection: what the backend gets first (the PROXY header,
//! the first packet less a stripped preamble), the [`pipe`] that joins the
//! two sockets until both directions ended, and the counters and log line
//! of its end.
use std::net::SocketAddr;

use splice::{
    halves::{Half, OwnSocket},
    pipe::{self, Outcome, Path},
    stats::add,
};
use tracing::debug;

use crate::{
    access_log::{End, Entry},
    backends::ActiveGuard,
    config::AccessLog,
    shard::Shard,
    telemetry::counters::{Held, RouteCounters, Served},
};

use super::Client;

/// What a forwarded connection holds until it ends, and reports then.
pub(crate) struct Finish<'a> {
    pub(crate) _held: (Held<'a>, Option<Held<'a>>, ActiveGuard<'a>),
    pub(crate) counters: &'a RouteCounters,
    pub(crate) route: &'a crate::config::Route,
    pub(crate) peer: &'a Client,
    pub(crate) backend_addr: SocketAddr,
    pub(crate) shard: &'a Shard,
    pub(crate) format: AccessLog,
}

impl Finish<'_> {
    /// Counts and logs the connection's end (and releases what it held).
    fn record(self, forwarded: &Outcome) {
        let counters = self.counters;
        let served = forwarded.path.map(Served::from);
        if let Some(served) = served {
            add(counters.served(served), 1);
        }
        add(&counters.bytes_to_backend, forwarded.to_backend);
        add(&counters.bytes_to_client, forwarded.to_client);
        debug!(
            client = %self.peer,
            route = self.route.name,
            backend = %self.backend_addr,
            mode = served.map_or("none", Served::name),
            bytes_to_backend = forwarded.to_backend,
            bytes_to_client = forwarded.to_client,
            reset = forwarded.reset,
            duration_ms = self.peer.accepted.elapsed().as_millis() as u64,
            "connection closed"
        );
        let end = if forwarded.reset {
            End::Reset
        } else {
            End::Closed
        };
        self.shard.access_log.record(
            self.shard.core,
            self.format,
            &Entry {
                route: Some(&self.route.name),
                backend: Some(self.backend_addr),
                path: forwarded.path,
                to_backend: forwarded.to_backend,
                to_client: forwarded.to_client,
                ..self.peer.entry(end)
            },
        );
    }
}

/// What the backend gets before the splice: the PROXY protocol header (if
/// any), then the first packet less its first `skip` bytes (a preamble).
pub(crate) struct ToBackend {
    pub(crate) header: Vec<u8>,
    pub(crate) first: Vec<u8>,
    pub(crate) skip: usize,
}

impl ToBackend {
    /// The bytes to send: the header, then the first packet less its skipped
    /// prefix, in one buffer so that they leave together.
    fn assemble(self) -> Vec<u8> {
        let ToBackend {
            header,
            mut first,
            skip,
        } = self;
        first.drain(..skip.min(first.len()));
        if !header.is_empty() {
            first.splice(0..0, header);
        }
        first
    }
}

/// Sends the backend its first bytes, then forwards both directions (a
/// [`pipe`]: spliced, or copied) until both ended; counts and logs the end.
pub(crate) fn forward<'a>(
    client: (Half, Half),
    backend: OwnSocket,
    shard: &'a Shard,
    to_backend: ToBackend,
    finish: Finish<'a>,
    idle_timeout: std::time::Duration,
) -> impl Future<Output = ()> + 'a {
    let first = to_backend.assemble();
    // Until the pipe ends (the closure below runs in the same poll as the
    // sockets' close).
    let watch = shard
        .idle
        .watch(crate::idle::raw(client.0.fd(), backend.fd()), idle_timeout);
    pipe::run_then(
        client,
        backend,
        shard.probe.as_ref(),
        first,
        move |mut outcome| {
            drop(watch);
            if let Some(handed) = outcome.handed_over.take() {
                // An upgrade took it: the new process counts and logs its
                // end.
                return crate::upgrade::connections::keep(
                    shard,
                    *handed,
                    finish.peer,
                    &finish.route.name,
                    finish.backend_addr,
                    finish.peer.accepted.elapsed(),
                );
            }
            let stats = &shard.stats.splice;
            if outcome.path == Some(Path::Copied) {
                add(&stats.copied, 1);
            }
            add(&stats.resets, u64::from(outcome.reset));
            add(&stats.userspace_bytes, outcome.read_in_userspace);
            finish.record(&outcome);
        },
    )
}
