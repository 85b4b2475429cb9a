//! A connection's two sockets joined until both directions end: the one
//! place that knows the order of a splice. Take the legs' baselines, insert
//! both sockets (the backend's spliced at once, the client's held), write
//! the first bytes to the backend, start the client's splice, run both legs
//! (each drains what the kernel or userspace still has to deliver before it
//! passes FIN on), then close the sockets and remove the routes. Without a
//! probe, or when the kernel refuses the insert, the same legs copy in
//! userspace. A failed direction resets both sides.
use std::{
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    rc::Rc,
};

use futures_lite::future;
use tracing::debug;

use super::{
    Leg, LegError, Member, Splice, Spliced,
    delivery::Delivery,
    halves::{self, Half, OwnSocket},
    shard::ShardProbe,
    socket,
};

/// How a pipe forwarded its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// In the kernel, by the executor's probe.
    Spliced,
    /// In userspace although a probe is loaded: the kernel refused the
    /// insert (a full SockMap, a socket no longer established).
    Fallback,
    /// In userspace: no probe.
    Copied,
}

/// What running a pipe did, for the caller to count and log.
#[derive(Debug, Default)]
pub struct Outcome {
    /// How it forwarded (`None`: it failed before forwarding anything).
    pub path: Option<Path>,
    /// Bytes delivered to each side: redirected by the kernel plus written
    /// by userspace (the first bytes included).
    pub to_backend: u64,
    pub to_client: u64,
    /// Bytes userspace read from either socket (copied, or passed up by the
    /// probe).
    pub read_in_userspace: u64,
    /// Ended by an error: a reset was passed on to both sides.
    pub reset: bool,
    /// Handed over to another process (an upgrade) instead of ended: its
    /// sockets and state ([`super::handover`]); the byte counts are those
    /// so far.
    pub handed_over: Option<Box<super::handover::HandedOver>>,
}

/// Joins `client` (its two halves) and `backend`, sends the backend `first`,
/// and forwards both directions until both ended.
pub fn run<'a>(
    client: (Half, Half),
    backend: OwnSocket,
    probe: Option<&'a ShardProbe>,
    first: Vec<u8>,
) -> impl Future<Output = Outcome> + 'a {
    run_then(client, backend, probe, first, |outcome| outcome)
}

/// [`run`], then `end` with the outcome, in the same future: a caller that
/// counts the outcome passes its counting here rather than awaiting `run`
/// in a future of its own, which would hold the pipe twice (an awaited
/// future moves into a slot of its own, next to the one it was kept in).
///
/// Not an `async fn`: the backend is split and the legs made here, so the
/// future (which lives as long as the connection) holds the legs only, not
/// also the arguments and locals they were made from (an `async fn` keeps
/// its arguments, and a local moved from, for its whole life: 1,896 B,
/// ~800 of them dead, per connection).
pub fn run_then<'a, R>(
    (client_reader, client_writer): (Half, Half),
    backend: OwnSocket,
    probe: Option<&'a ShardProbe>,
    first: Vec<u8>,
    end: impl FnOnce(Outcome) -> R + 'a,
) -> impl Future<Output = R> + 'a {
    let spliceable = probe.is_some();
    let (backend_reader, backend_writer) = halves::split(backend);
    let fds = [
        client_reader.fd().as_raw_fd(),
        backend_reader.fd().as_raw_fd(),
    ];
    // Legs take their baselines before anything is written to either side.
    let mut legs = Leg::new(client_reader, backend_writer, borrow(fds[1]), spliceable)
        .and_then(|up| {
            let down = Leg::new(backend_reader, client_writer, borrow(fds[0]), spliceable)?;
            Ok((up, down, fds))
        })
        .inspect_err(|_| reset_on_close(fds));
    async move {
        let outcome = 'pipe: {
            let mut outcome = Outcome::default();
            // Borrowed in place: moving them out would keep two copies.
            let (up, down, [client_fd, backend_fd]) = match &mut legs {
                Ok((up, down, fds)) => (up, down, *fds),
                Err(e) => {
                    // Both sockets were reset.
                    debug!("cannot forward: {e}");
                    outcome.reset = true;
                    break 'pipe outcome;
                }
            };
            // Spliced before the first bytes go out: the backend cannot have
            // answered (and closed, which the kernel would refuse) yet. The
            // client's later bytes wait in the kernel until the first are
            // written.
            // The members are a temporary: nothing of them stays in the
            // future across its awaits.
            let (mut splice, path) = insert(
                probe,
                &[
                    Member {
                        socket: borrow(client_fd),
                        peer: 1,
                        start: false,
                    },
                    Member {
                        socket: borrow(backend_fd),
                        peer: 0,
                        start: true,
                    },
                ],
            );
            outcome.path = Some(path);
            if let Err(e) = up.write(&first).await {
                debug!("sending the first bytes failed: {e}");
                reset_on_close([client_fd, backend_fd]);
                outcome.reset = true;
                outcome.to_backend = up.bytes_written();
                break 'pipe outcome;
            }
            drop(first);
            if let Some(splice) = &mut splice {
                splice.start(0);
                for (index, source) in [up.source(), down.source()].into_iter().enumerate() {
                    if splice.is_spliced(index) {
                        source.set_spliced();
                    }
                }
            }
            let spliced = |index| splice.as_ref().map(|splice| Spliced { splice, index });
            let reset = Reset {
                sockets: [client_fd, backend_fd],
                legs: [up.delivery(), down.delivery()],
            };
            // Unless an upgrade takes the pipe at a quiet point (see
            // `handover`): then the legs' future is dropped there.
            let results = {
                let legs_run = std::pin::pin!(future::zip(
                    run_leg(up, spliced(0), &reset),
                    run_leg(down, spliced(1), &reset),
                ));
                super::handover::unless_handed_over(legs_run, &reset.legs).await
            };
            let Some((up_result, down_result)) = results else {
                outcome.to_backend = up.bytes_written() + redirected(&splice, 0);
                outcome.to_client = down.bytes_written() + redirected(&splice, 1);
                outcome.handed_over =
                    super::handover::export(up, down, splice, probe, path, [client_fd, backend_fd]);
                drop(legs);
                break 'pipe outcome;
            };
            outcome.reset = up_result.is_err() || down_result.is_err();
            outcome.to_backend = up.bytes_written() + redirected(&splice, 0);
            outcome.to_client = down.bytes_written() + redirected(&splice, 1);
            outcome.read_in_userspace = up.bytes_read() + down.bytes_read();
            // The sockets close first (dropping the legs closes them): then the
            // splice has only its routes left to remove.
            drop(legs);
            remove(splice, probe);
            outcome
        };
        end(outcome)
    }
}

/// The echo form: one socket whose bytes go back to itself, spliced (the
/// probe redirects them to the socket's own egress) or copied, until its
/// end of stream has gone back too. The order is the pipe's: the leg's
/// baseline, the insert, the leg, the close, the routes.
pub fn echo(socket: OwnSocket, probe: Option<&ShardProbe>) -> impl Future<Output = Outcome> + '_ {
    let (reader, writer) = halves::split(socket);
    let fd = reader.fd().as_raw_fd();
    // The leg takes its baseline before the probe can echo anything.
    let mut made = Leg::new(reader, writer, borrow(fd), probe.is_some()).inspect_err(|_| {
        let _ = socket::reset_on_close(borrow(fd));
    });
    async move {
        let mut outcome = Outcome::default();
        // Borrowed in place: moving it out would keep two copies.
        let Ok(leg) = &mut made else {
            outcome.reset = true;
            return outcome;
        };
        let (splice, path) = insert(
            probe,
            &[Member {
                socket: borrow(fd),
                peer: 0,
                start: true,
            }],
        );
        outcome.path = Some(path);
        if let Some(splice) = &splice
            && splice.is_spliced(0)
        {
            leg.source().set_spliced();
        }
        let spliced = splice.as_ref().map(|splice| Spliced { splice, index: 0 });
        if let Err(e) = leg.run(spliced).await {
            debug!("connection reset: {e}");
            let _ = socket::reset_on_close(borrow(fd));
            outcome.reset = true;
        }
        outcome.to_client = leg.bytes_written() + redirected(&splice, 0);
        outcome.read_in_userspace = leg.bytes_read();
        // The socket closes first, then the splice removes its route.
        drop(made);
        remove(splice, probe);
        outcome
    }
}

/// Inserts `members` into the executor's probe, if it has one: the splice,
/// and how the pipe forwards (userspace when the kernel refused).
fn insert(probe: Option<&ShardProbe>, members: &[Member<'_>]) -> (Option<Splice>, Path) {
    match probe {
        Some(probe) => {
            let splice = probe.splice(members);
            let path = if splice.is_some() {
                Path::Spliced
            } else {
                Path::Fallback
            };
            (splice, path)
        }
        None => (None, Path::Copied),
    }
}

/// The probe's count of what member `index` redirected to its peer (a
/// stream it gave up on counts only what userspace wrote).
pub(crate) fn redirected(splice: &Option<Splice>, index: usize) -> u64 {
    splice
        .as_ref()
        .and_then(|splice| splice.stream(index).ok())
        .map_or(0, |stream| stream.redirected)
}

/// Removes what is left of a splice whose sockets are closed: its routes.
pub(crate) fn remove(splice: Option<Splice>, probe: Option<&ShardProbe>) {
    if let Some(splice) = splice {
        splice.drop_closed();
    }
    if let Some(probe) = probe {
        probe.update_slots_gauge();
    }
}

/// One of the pipe's sockets, by descriptor.
pub(crate) fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: only called on the pipe's two sockets, which the legs own
    // for as long as the pipe runs; every use ends before the legs drop
    // (and on failure to make them, the sockets are still owned by the
    // halves being dropped after the reset).
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// A pipe's two sockets and legs, to reset when a direction fails.
pub(crate) struct Reset {
    pub(crate) sockets: [RawFd; 2],
    pub(crate) legs: [Rc<Delivery>; 2],
}

impl Reset {
    /// Passes a reset on: both legs stop, both sockets send RST when closed,
    /// and blocked reads wake up now (without sending the peers anything).
    fn now(&self) {
        for leg in &self.legs {
            leg.abandon();
        }
        reset_on_close(self.sockets);
        for fd in self.sockets {
            let _ = socket::shutdown_read(borrow(fd));
        }
    }
}

/// Runs one direction; if it fails, resets the pipe, which also ends the
/// other direction.
pub(crate) async fn run_leg<R, W>(
    leg: &mut Leg<R, W>,
    spliced: Option<Spliced<'_>>,
    reset: &Reset,
) -> Result<(), LegError>
where
    R: futures_lite::AsyncRead + Unpin,
    W: futures_lite::AsyncWrite + Unpin,
{
    let result = leg.run(spliced).await;
    if let Err(e) = &result {
        debug!("connection reset: {e}");
        reset.now();
    }
    result
}

fn reset_on_close(sockets: [RawFd; 2]) {
    for fd in sockets {
        let _ = socket::reset_on_close(borrow(fd));
    }
}
