//! Routing a connection: reads the first packet (within the route
//! deadline and size limit) until [`crate::sniff`] can tell what it says,
//! then lets [`crate::routes`] pick the route, or say why it is refused.
use std::time::Instant;

use futures_lite::{AsyncReadExt as _, future};
use splice::halves::Half;
use tracing::debug;

use crate::{
    config::Matcher,
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

/// Reads the first packet and picks the route; on refusal, says in which
/// protocol to answer.
pub(crate) async fn route(
    client: &mut Half,
    generation: &Generation,
) -> Result<(Vec<u8>, routes::Decision), Refused> {
    let config = &generation.config;
    let deadline = Instant::now() + config.first_packet_timeout;
    let max = config.first_packet_max;
    let mut bytes = Vec::with_capacity(FIRST_READ);
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
        let old = bytes.len();
        bytes.resize((old + FIRST_READ).min(max), 0);
        let left = deadline.saturating_duration_since(Instant::now());
        let read = async { Some(client.read(&mut bytes[old..]).await) };
        let timeout = async {
            glommio::timer::sleep(left).await;
            None
        };
        match future::or(read, timeout).await {
            Some(Ok(0)) | Some(Err(_)) => {
                // Closed (or reset) before saying where to go.
                bytes.truncate(old);
                return Err((sniff::guess(&bytes), Refusal::Invalid).into());
            }
            Some(Ok(n)) => bytes.truncate(old + n),
            None => {
                bytes.truncate(old);
                return Err((sniff::guess(&bytes), Refusal::Timeout).into());
            }
        }
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
