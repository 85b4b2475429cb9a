//! A connection's two sockets joined until both directions end: the one
//! place that knows the order of a splice. By default ([`Lazy`]) the legs
//! copy first, and each direction, once it carried the probe's
//! `splice_after` bytes, is spliced from its next unread byte (the first
//! one inserts both sockets). Spliced from the start (`splice_after` 0):
//! take the legs' baselines, insert both sockets (the backend's spliced at
//! once, the client's held), write the first bytes to the backend, start
//! the client's splice. Either way both legs then run (each drains what the
//! kernel or userspace still has to deliver before it passes FIN on), and
//! the sockets close before the routes are removed. Without a probe, or
//! when the kernel refuses the insert, the same legs copy in userspace. A
//! failed direction resets both sides; an upgrade may take the pipe at a
//! quiet point ([`super::handover`]).
use std::{
    cell::OnceCell,
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    rc::Rc,
};

use futures_lite::future;
use tracing::debug;

use super::{
    Leg, LegError, Member, Splice, Spliced,
    delivery::Delivery,
    forward::Copied,
    halves::{self, Half, OwnSocket},
    handover::{LazyInsert, LazyState},
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
    // Spliced from the start, or copied first (without a probe, or until
    // a direction proves worth splicing).
    let eager = probe.is_some_and(|probe| probe.splice_after() == 0);
    let (backend_reader, backend_writer) = halves::split(backend);
    let fds = [
        client_reader.fd().as_raw_fd(),
        backend_reader.fd().as_raw_fd(),
    ];
    // Legs take their baselines before anything is written to either side.
    let mut legs = Leg::new(client_reader, backend_writer, borrow(fds[1]), eager)
        .and_then(|up| {
            let down = Leg::new(backend_reader, client_writer, borrow(fds[0]), eager)?;
            Ok((up, down, fds))
        })
        .inspect_err(|_| reset_on_close(fds));
    async move {
        let outcome = 'pipe: {
            let mut outcome = Outcome::default();
            // Borrowed in place: moving them out would keep two copies.
            let (up, down, fds) = match &mut legs {
                Ok((up, down, fds)) => (up, down, *fds),
                Err(e) => {
                    // Both sockets were reset.
                    debug!("cannot forward: {e}");
                    outcome.reset = true;
                    break 'pipe outcome;
                }
            };
            let reset = Reset {
                sockets: fds,
                legs: [up.delivery(), down.delivery()],
            };
            let splice = if eager {
                // Spliced before the first bytes go out: the backend cannot
                // have answered (and closed, which the kernel would refuse)
                // yet. The client's later bytes wait in the kernel until the
                // first are written.
                // The members are a temporary: nothing of them stays in the
                // future across its awaits.
                let (splice, path) = insert(probe, &members(fds, [false, true]));
                outcome.path = Some(path);
                if let Err(e) = up.write(&first).await {
                    break 'pipe first_failed(e, fds, up.bytes_written());
                }
                drop(first);
                if let Some(splice) = &splice {
                    splice.start(0);
                    for (index, source) in [up.source(), down.source()].into_iter().enumerate() {
                        if splice.is_spliced(index) {
                            source.set_spliced();
                        }
                    }
                }
                let spliced = |index| splice.as_ref().map(|splice| Spliced { splice, index });
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
                    break 'pipe handed_over(up, down, splice, probe, path, None, fds);
                };
                outcome.reset = up_result.is_err() || down_result.is_err();
                splice
            } else {
                if let Err(e) = up.write(&first).await {
                    break 'pipe first_failed(e, fds, up.bytes_written());
                }
                drop(first);
                let lazy = Lazy::new(probe, fds);
                let results = {
                    let legs_run = std::pin::pin!(future::zip(
                        run_lazy_leg(up, 0, true, &lazy, &reset),
                        run_lazy_leg(down, 1, true, &lazy, &reset),
                    ));
                    super::handover::unless_handed_over(legs_run, &reset.legs).await
                };
                let Some((up_result, down_result)) = results else {
                    let (splice, path, state) = lazy.hand_over();
                    break 'pipe handed_over(up, down, splice, probe, path, state, fds);
                };
                outcome.reset = up_result.is_err() || down_result.is_err();
                let (splice, path) = lazy.end();
                outcome.path = Some(path);
                splice
            };
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

/// The outcome of a pipe whose first bytes could not be sent: both sides
/// are reset.
fn first_failed(error: LegError, fds: [RawFd; 2], to_backend: u64) -> Outcome {
    debug!("sending the first bytes failed: {error}");
    reset_on_close(fds);
    Outcome {
        reset: true,
        to_backend,
        ..Outcome::default()
    }
}

/// The outcome of a pipe taken at a quiet point by an upgrade: its byte
/// counts so far and what the new process needs ([`super::handover`]).
/// The legs (and this process's descriptors) drop after it.
pub(crate) fn handed_over(
    up: &Leg<Half, Half>,
    down: &Leg<Half, Half>,
    splice: Option<Splice>,
    probe: Option<&ShardProbe>,
    path: Path,
    lazy: Option<super::handover::LazyState>,
    fds: [RawFd; 2],
) -> Outcome {
    Outcome {
        path: Some(path),
        to_backend: up.bytes_written() + redirected(&splice, 0),
        to_client: down.bytes_written() + redirected(&splice, 1),
        read_in_userspace: up.bytes_read() + down.bytes_read(),
        handed_over: super::handover::export(up, down, splice, probe, path, lazy, fds),
        ..Outcome::default()
    }
}

/// A pipe's two sockets as members of a splice: the client's bytes go to
/// the backend and the backend's to the client; `start` says which the
/// kernel forwards at the insert.
fn members([client, backend]: [RawFd; 2], start: [bool; 2]) -> [Member<'static>; 2] {
    [
        Member {
            socket: borrow(client),
            peer: 1,
            start: start[0],
        },
        Member {
            socket: borrow(backend),
            peer: 0,
            start: start[1],
        },
    ]
}

/// A pipe that copies first: each direction is spliced once it carried
/// the probe's [`ShardProbe::splice_after`] bytes (the first to get there
/// inserts both sockets).
pub(crate) struct Lazy<'a> {
    probe: Option<&'a ShardProbe>,
    fds: [RawFd; 2],
    /// Bytes a direction copies before it is spliced.
    splice_after: u64,
    splice: OnceCell<Insert>,
}

/// What became of a [`Lazy`] pipe's insert.
enum Insert {
    /// Made, when each leg had read this much.
    Made(Splice, [u64; 2]),
    /// The kernel refused it.
    Refused,
    /// Not tried: a side had ended its stream already (the kernel refuses
    /// such sockets, and what is left of the stream is all in userspace's
    /// reach), so the pipe copies to the end.
    Late,
}

impl<'a> Lazy<'a> {
    fn new(probe: Option<&'a ShardProbe>, fds: [RawFd; 2]) -> Self {
        Self {
            probe,
            fds,
            splice_after: probe.map_or(0, ShardProbe::splice_after),
            splice: OnceCell::new(),
        }
    }

    /// A lazy pipe taken over from another process at `state`, with its
    /// splice (restored in `probe`) if its insert was made there.
    pub(crate) fn restored(
        probe: Option<&'a ShardProbe>,
        fds: [RawFd; 2],
        state: &LazyState,
        splice: Option<Splice>,
    ) -> Self {
        let insert = OnceCell::new();
        let made = match (state.insert, splice) {
            (LazyInsert::Made, Some(splice)) => Some(Insert::Made(splice, state.read_at_insert)),
            (LazyInsert::Refused, _) => Some(Insert::Refused),
            (LazyInsert::Late, _) => Some(Insert::Late),
            _ => None,
        };
        if let Some(made) = made {
            let _ = insert.set(made);
        }
        Self {
            probe,
            fds,
            splice_after: state.splice_after,
            splice: insert,
        }
    }

    /// The splice, made at the first call, and what each leg had read then.
    fn splice(&self, reset: &Reset) -> Option<(&Splice, [u64; 2])> {
        let insert = self.splice.get_or_init(|| {
            let ended = self.fds.iter().any(|&fd| {
                socket::tcp_info(borrow(fd)).map_or(true, |info| {
                    info.tcpi_state != socket::tcp_state::ESTABLISHED
                })
            });
            if ended {
                return Insert::Late;
            }
            // Nothing runs between these counts and the insert's reading of
            // where each stream stands.
            let read = [reset.legs[0].read(), reset.legs[1].read()];
            match insert(self.probe, &members(self.fds, [false, false])) {
                (Some(splice), _) => Insert::Made(splice, read),
                (None, _) => Insert::Refused,
            }
        });
        match insert {
            Insert::Made(splice, read) => Some((splice, *read)),
            Insert::Refused | Insert::Late => None,
        }
    }

    /// The splice, if one was made, and how the pipe forwarded.
    pub(crate) fn end(self) -> (Option<Splice>, Path) {
        let insert = self.splice.into_inner();
        let path = path_of(insert.as_ref());
        match insert {
            Some(Insert::Made(splice, _)) => (Some(splice), path),
            _ => (None, path),
        }
    }

    /// [`Self::end`] for a handover, with what the other process needs to
    /// go on (`None` without a probe: the pipe only copies).
    pub(crate) fn hand_over(self) -> (Option<Splice>, Path, Option<LazyState>) {
        let (splice_after, with_probe) = (self.splice_after, self.probe.is_some());
        let insert = self.splice.into_inner();
        let path = path_of(insert.as_ref());
        let (made, read_at_insert, splice) = match insert {
            None => (LazyInsert::NotYet, [0; 2], None),
            Some(Insert::Made(splice, read)) => (LazyInsert::Made, read, Some(splice)),
            Some(Insert::Refused) => (LazyInsert::Refused, [0; 2], None),
            Some(Insert::Late) => (LazyInsert::Late, [0; 2], None),
        };
        let state = with_probe.then_some(LazyState {
            splice_after,
            insert: made,
            read_at_insert,
        });
        (splice, path, state)
    }
}

/// How a lazy pipe forwarded, from what became of its insert.
fn path_of(insert: Option<&Insert>) -> Path {
    match insert {
        None | Some(Insert::Late) => Path::Copied,
        Some(Insert::Refused) => Path::Fallback,
        Some(Insert::Made(splice, _)) if splice.is_spliced(0) || splice.is_spliced(1) => {
            Path::Spliced
        }
        Some(Insert::Made(..)) => Path::Fallback,
    }
}

/// Runs one direction of a [`Lazy`] pipe: copies until it carried the
/// threshold, then splices its source from its next unread byte (every
/// byte it read was written: the kernel's follow them) and runs on. A
/// direction taken over past its copy phase (not `switchable`) runs on as
/// it was, spliced or copied.
pub(crate) async fn run_lazy_leg(
    leg: &mut Leg<Half, Half>,
    index: usize,
    switchable: bool,
    lazy: &Lazy<'_>,
    reset: &Reset,
) -> Result<(), LegError> {
    if lazy.probe.is_none() {
        return run_leg(leg, None, reset).await;
    }
    if !switchable {
        let spliced = lazy.splice.get().and_then(|insert| match insert {
            Insert::Made(splice, _) if splice.is_spliced(index) => Some(Spliced { splice, index }),
            _ => None,
        });
        return run_leg(leg, spliced, reset).await;
    }
    match leg.copy_until(lazy.splice_after).await {
        Ok(Copied::Ended) => return Ok(()),
        Ok(Copied::Bulky) => {}
        Err(e) => return Err(reset.failed(e)),
    }
    let mut spliced = None;
    if let Some((splice, read_at_insert)) = lazy.splice(reset) {
        // Before the kernel redirects anything to the destination.
        leg.prepare_splice().map_err(|e| reset.failed(e))?;
        if splice.start_after_reading(index, leg.bytes_read() - read_at_insert[index]) {
            leg.source().set_spliced();
            spliced = Some(Spliced { splice, index });
        }
    }
    run_leg(leg, spliced, reset).await
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
    /// A direction failed with `error`: passes the reset on.
    fn failed(&self, error: LegError) -> LegError {
        debug!("connection reset: {error}");
        self.now();
        error
    }

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
    leg.run(spliced).await.map_err(|e| reset.failed(e))
}

fn reset_on_close(sockets: [RawFd; 2]) {
    for fd in sockets {
        let _ = socket::reset_on_close(borrow(fd));
    }
}
