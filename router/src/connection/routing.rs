//! Routing a connection: reads the first packet (within the route
//! deadline and size limit) until [`crate::sniff`] can tell what it says,
//! then lets [`crate::routes`] pick the route, or say why it is refused.
use std::{sync::atomic::Ordering::Relaxed, time::Instant};

use futures_lite::{AsyncReadExt as _, future};
use splice::halves::Half;
use tracing::debug;

use super::Client;
use crate::{
    config::Matcher,
    proxy_header::{self, Header},
    routes::{self, Refusal},
    shard::Generation,
    sniff::{self, FirstPacket, Protocol, Sniff},
};

/// Why a connection is refused, in which protocol to answer, and the route
/// it named if any (a preamble with a wrong token).
pub(crate) struct Refused {
    pub(crate) protocol: Protocol,
    pub(crate) reason: Refusal,
    pub(crate) route: Option<usize>,
}

impl From<(Protocol, Refusal)> for Refused {
    fn from((protocol, reason): (Protocol, Refusal)) -> Self {
        Self {
            protocol,
            reason,
            route: None,
        }
    }
}

/// Bytes read per call while reading the first packet.
const FIRST_READ: usize = 4096;

/// Why reading more of the first bytes stopped.
enum Stop {
    /// Closed or reset before the bytes said enough.
    Closed,
    /// The first-packet deadline passed.
    TimedOut,
}

/// Reads what the client sends next onto `bytes` (up to `max` in all),
/// until `deadline`.
async fn read_more(
    client: &mut Half,
    bytes: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> Result<(), Stop> {
    let old = bytes.len();
    bytes.resize((old + FIRST_READ).min(max), 0);
    let left = deadline.saturating_duration_since(Instant::now());
    let read = async { Some(client.read(&mut bytes[old..]).await) };
    let timeout = async {
        glommio::timer::sleep(left).await;
        None
    };
    let result = future::or(read, timeout).await;
    match result {
        Some(Ok(n)) if n > 0 => {
            bytes.truncate(old + n);
            Ok(())
        }
        Some(_) => {
            bytes.truncate(old);
            Err(Stop::Closed)
        }
        None => {
            bytes.truncate(old);
            Err(Stop::TimedOut)
        }
    }
}

/// On a listener with `accept_proxy`: reads the PROXY protocol header,
/// takes the client address it carries, and leaves in `bytes` what came
/// after it. Without a valid header the connection is refused.
async fn proxy_header(
    client: &mut Half,
    bytes: &mut Vec<u8>,
    peer: &mut Client,
    deadline: Instant,
) -> Result<(), Refused> {
    let refused = || Refused::from((Protocol::Unknown, Refusal::ProxyHeader));
    loop {
        match proxy_header::parse(bytes) {
            Header::Done { len, client } => {
                if client.is_some() {
                    peer.addr = client;
                }
                bytes.drain(..len);
                return Ok(());
            }
            Header::Invalid(why) => {
                debug!(client = %peer, "no valid PROXY protocol header: {why}");
                return Err(refused());
            }
            Header::NeedMore => {
                if read_more(client, bytes, proxy_header::MAX_LEN, deadline)
                    .await
                    .is_err()
                {
                    return Err(refused());
                }
            }
        }
    }
}

/// Reads the first packet and picks the route; on refusal, says in which
/// protocol to answer. Notes in `peer` the name it was routed on (and the
/// client a PROXY protocol header carried).
pub(crate) async fn route(
    client: &mut Half,
    generation: &Generation,
    peer: &mut Client,
) -> Result<(Vec<u8>, routes::Decision), Refused> {
    let config = &generation.config;
    let deadline = Instant::now() + config.first_packet_timeout;
    let max = config.first_packet_max;
    let mut bytes = Vec::with_capacity(FIRST_READ);
    if peer.listener.state.accept_proxy.load(Relaxed) {
        Box::pin(proxy_header(client, &mut bytes, peer, deadline)).await?;
    }
    let first = loop {
        match sniff::sniff(&bytes, max) {
            Sniff::Done(first) => break first,
            Sniff::Invalid(protocol, why) => {
                debug!("invalid first packet: {why}");
                return Err((protocol, Refusal::Invalid).into());
            }
            Sniff::TooLarge(protocol) => return Err((protocol, Refusal::TooLarge).into()),
            Sniff::NeedMore => {}
        }
        if bytes.len() >= max {
            return Err((sniff::guess(&bytes), Refusal::TooLarge).into());
        }
        match read_more(client, &mut bytes, max, deadline).await {
            Ok(()) => {}
            Err(Stop::Closed) => return Err((sniff::guess(&bytes), Refusal::Invalid).into()),
            Err(Stop::TimedOut) => return Err((sniff::guess(&bytes), Refusal::Timeout).into()),
        }
    };
    peer.name = match &first {
        FirstPacket::Tls { sni: Some(name) }
        | FirstPacket::Http {
            host: Some(name), ..
        } => Some(name.as_str().into()),
        FirstPacket::Preamble { route, .. } => Some(route.as_str().into()),
        _ => None,
    };
    let decision = routes::decide(&config.routes, &first).map_err(|reason| Refused {
        protocol: first.protocol(),
        reason,
        route: named_route(&config.routes, &first),
    })?;
    if let FirstPacket::Tls { sni } = &first {
        debug!(?sni, route = config.routes[decision.route].name, "routed");
    }
    Ok((bytes, decision))
}

/// The route a preamble names, if there is one by that name.
fn named_route(routes: &[crate::config::Route], first: &FirstPacket) -> Option<usize> {
    let FirstPacket::Preamble { route, .. } = first else {
        return None;
    };
    routes
        .iter()
        .position(|r| matches!(&r.matcher, Matcher::Preamble { name, .. } if name == route))
}
