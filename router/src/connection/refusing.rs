//! Refusing a connection: past a connection limit, a reset before anything
//! is read; after routing, the answer [`crate::refuse`] gives in the
//! client's protocol, then a bounded lingering close.
use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    time::{Duration, Instant},
};

use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _, future};
use splice::{halves::Half, socket, stats::add};
use tracing::warn;

use crate::{
    access_log::{End, Entry},
    executor::Listener,
    limits::Exceeded,
    shard::Shard,
};

/// Closes a connection past a limit at once, with a reset: nothing is read,
/// and the descriptor is free again before the next accept. Counted, and
/// logged at most once a second per core.
pub(crate) fn refuse_over_limit(
    socket: OwnedFd,
    shard: &Shard,
    exceeded: Exceeded,
    peer: Option<SocketAddr>,
    listener: &Listener,
) {
    add(&shard.stats.refused_limit, 1);
    let _ = socket::reset_on_close(socket.as_fd());
    drop(socket);
    let format = shard.current.borrow().1.config.access_log;
    shard.access_log.record(
        shard.core,
        format,
        &Entry {
            client: peer,
            listener: listener.addr,
            route: None,
            name: None,
            backend: None,
            path: None,
            to_backend: 0,
            to_client: 0,
            duration: Duration::ZERO,
            end: End::Refused("limit"),
        },
    );
    let (last, unlogged) = shard.limit_log.get();
    let now = Instant::now();
    if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
        shard.limit_log.set((last, unlogged + 1));
        return;
    }
    shard.limit_log.set((Some(now), 0));
    let (limit, max) = match exceeded {
        Exceeded::Total(max) => ("max_connections", max),
        Exceeded::Listener(max) => ("max_connections_per_listener", max),
    };
    warn!(
        limit,
        max,
        refused_since_last_line = unlogged + 1,
        "connection limit reached: refusing new connections (counted as refused_limit)"
    );
}

/// How long, and how much, a refused client may still send after its
/// answer: closing with unread bytes would reset the connection and the
/// client could lose the answer (nginx's `lingering_close`, bounded).
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Sends `answer` and a FIN, then reads and discards what the client still
/// sends (bounded) so that the close does not reset the connection.
pub(crate) async fn answer_then_close((mut reader, mut writer): (Half, Half), answer: &[u8]) {
    if !answer.is_empty() && writer.write_all(answer).await.is_err() {
        return;
    }
    // Sends FIN.
    if writer.close().await.is_err() {
        return;
    }
    let drain = async {
        // On the heap: an array here would make every connection's task
        // (its future holds every state) 16 KiB larger.
        let mut sink = vec![0u8; 16 * 1024];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match reader.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let give_up = glommio::timer::sleep(LINGER_TIME);
    future::or(drain, give_up).await;
}
