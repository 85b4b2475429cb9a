//! Connecting a routed connection's backend (failing over within the
//! route's pool); on success, hands the sockets to [`super::forwarding`].
use std::time::Instant;

use futures_lite::AsyncWriteExt as _;
use splice::{halves::Half, stats::add};
use tracing::{info, warn};

use crate::{
    access_log::{End, Entry},
    proxy_protocol, refuse,
    routes::{self, Refusal},
    shard::{Generation, Shard},
    sniff,
    telemetry::counters::Held,
};

use super::{
    Client,
    forwarding::{Finish, ToBackend, forward},
};

/// Connects the route's backend; returns the forwarding of the connection:
/// it sends the backend the first packet and forwards both directions until
/// both ended. `None` when no backend could be reached (the client was
/// answered).
pub(crate) async fn connect<'a>(
    client: (Half, Half),
    shard: &'a Shard,
    generation: &'a Generation,
    first: Vec<u8>,
    decision: routes::Decision,
    peer: &'a Client,
) -> Option<impl Future<Output = ()> + 'a> {
    let stats = &shard.stats;
    let route = &generation.config.routes[decision.route];
    let counters = &generation.routes[decision.route];
    let route_active = Held::new(&counters.active);
    let connecting = Instant::now();
    let (connected, failures) = Box::pin(generation.pools.connect(
        decision.route,
        generation.config.connect_timeout,
        generation.config.connect_attempts_of(route),
        &shard.readiness,
    ))
    .await;
    for (addr, error) in &failures {
        add(&stats.backend_failures, 1);
        if let Some(backend) = generation.backend(decision.route, *addr) {
            add(&backend.failures, 1);
        }
        warn!(route = route.name, backend = %addr, "backend connection failed: {error}");
    }
    let protocol = sniff::guess(&first);
    let Some(backend) = connected else {
        add(stats.refused(Refusal::Unavailable), 1);
        add(counters.refused(Refusal::Unavailable), 1);
        info!(
            client = %peer,
            reason = Refusal::Unavailable.name(),
            route = route.name,
            "refused connection"
        );
        shard.access_log.record(
            shard.core,
            generation.config.access_log,
            &Entry {
                route: Some(&route.name),
                ..peer.entry(End::Refused(Refusal::Unavailable.name()))
            },
        );
        let (_, mut writer) = client;
        let _ = writer
            .write_all(&refuse::response(protocol, Refusal::Unavailable))
            .await;
        let _ = writer.close().await;
        return None;
    };
    shard.metrics.backend_connect.observe(connecting.elapsed());
    let backend_counters = generation.backend(decision.route, backend.addr);
    if let Some(backend) = backend_counters {
        add(&backend.connections, 1);
    }
    let backend_active = backend_counters.map(|backend| Held::new(&backend.active));
    let backend_addr = backend.addr;
    let guard = backend.guard;
    if let Some(keepalive) = generation.config.tcp_keepalive
        && let Err(e) = crate::idle::set_keepalive(backend.socket.fd(), Some(keepalive))
    {
        tracing::debug!(backend = %backend_addr, "TCP keepalive not set: {e}");
    }
    // Before any byte of the client, the backend learns who it is.
    let header = route
        .proxy_protocol
        .map(|version| {
            let local = socket2::SockRef::from(&client.0.fd()).local_addr();
            proxy_protocol::header(version, peer.addr, local.ok().and_then(|a| a.as_socket()))
        })
        .unwrap_or_default();
    Some(forward(
        client,
        backend.socket,
        shard,
        ToBackend {
            header,
            first: match decision.close_http {
                Some(head) => crate::rewrite::connection_close(&first, head),
                None => first,
            },
            skip: decision.skip,
        },
        Finish {
            _held: (route_active, backend_active, guard),
            counters,
            route,
            peer,
            backend_addr,
            shard,
            format: generation.config.access_log,
        },
        generation.config.idle_timeout_of(route),
    ))
}
