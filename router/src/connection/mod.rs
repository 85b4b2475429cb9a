//! One connection's life, a task of its own, in explicit phases:
//! [`routing`] (read the first packet and decide, or refuse),
//! [`connecting`] (a backend of the route), [`forwarding`] (send the first
//! bytes, then splice the two sockets in the kernel or copy, until both
//! directions end), and [`refusing`] (answer a refused client in its
//! protocol).
pub mod connecting;
pub mod forwarding;
pub mod refusing;
pub mod routing;

use std::{net::SocketAddr, rc::Rc, time::Instant};

use splice::{halves::Half, stats::add};
use tracing::info;

use crate::{
    access_log::{End, Entry},
    executor::Listener,
    limits::Permit,
    refuse,
    shard::Shard,
    telemetry::counters::Held,
};

use self::{connecting::connect, refusing::answer_then_close, routing::route};

/// A connection's client, for the logs and the backend's PROXY header.
pub(crate) struct Client {
    /// The client's address: the one a PROXY protocol header carried (on a
    /// listener with `accept_proxy`), else the peer's.
    pub(crate) addr: Option<SocketAddr>,
    /// The listener it came in on.
    pub(crate) listener: Rc<Listener>,
    /// What it was routed on: the TLS server name, HTTP host or preamble
    /// route name, once read.
    pub(crate) name: Option<Box<str>>,
    pub(crate) accepted: Instant,
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("unknown"),
        }
    }
}

impl Client {
    /// Its access log entry, ended as `end`; the caller adds what is known
    /// of the route, backend and bytes.
    pub(crate) fn entry(&self, end: End) -> Entry<'_> {
        Entry {
            client: self.addr,
            listener: self.listener.addr,
            route: None,
            name: self.name.as_deref(),
            backend: None,
            path: None,
            to_backend: 0,
            to_client: 0,
            duration: self.accepted.elapsed(),
            end,
        }
    }
}

/// Serves one accepted connection (a task of its own).
///
/// Not an `async fn`, as [`connect`] and [`forwarding::forward`]: an `async fn`
/// keeps a copy of each argument besides the one its body uses, for the
/// connection's whole life; an `async move` block uses its captures in place.
/// The client comes boxed for the same reason: the task holds its captures
/// for its whole life, and the socket moves on into the legs.
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve(
    mut client: Box<(Half, Half)>,
    mut peer: Client,
    shard: Rc<Shard>,
    permit: Permit,
) -> impl Future<Output = ()> {
    async move {
        // Held until the connection ends.
        let _permit = &permit;
        let accepted = peer.accepted;
        let stats = &shard.stats;
        let generation = shard.generation();
        add(&stats.splice.accepted, 1);
        let _active = Held::new(&stats.splice.active);
        // The short-lived states (routing, connecting, refusing) end with
        // this block, so they share their room in the task with the
        // long-lived forwarding that comes out of it instead of adding to it.
        let forwarding = std::pin::pin!({
            // Boxed, as the backend connect and the refusal below: a task is
            // as large as its largest state.
            let routed = Box::pin(route(&mut client.0, &generation, &mut peer)).await;
            shard.metrics.first_packet.observe(accepted.elapsed());
            match routed {
                Ok((first, decision)) => {
                    add(&stats.routed, 1);
                    add(&generation.routes[decision.route].routed, 1);
                    Box::pin(connect(
                        *client,
                        &shard,
                        &generation,
                        first,
                        decision,
                        &peer,
                    ))
                    .await
                }
                Err(refused) => {
                    add(stats.refused(refused.reason), 1);
                    let route = refused.route.map(|index| {
                        add(generation.routes[index].refused(refused.reason), 1);
                        generation.config.routes[index].name.as_str()
                    });
                    info!(
                        client = %peer,
                        reason = refused.reason.name(),
                        route,
                        "refused connection"
                    );
                    shard.access_log.record(
                        shard.core,
                        generation.config.access_log,
                        &Entry {
                            route,
                            ..peer.entry(End::Refused(refused.reason.name()))
                        },
                    );
                    let response = refuse::response(refused.protocol, refused.reason);
                    Box::pin(answer_then_close(*client, &response)).await;
                    None
                }
            }
        });
        // Polled where it is: moving it into an await would copy it.
        if let Some(forwarding) = forwarding.as_pin_mut() {
            forwarding.await;
        }
    }
}
