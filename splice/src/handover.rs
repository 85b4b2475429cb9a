//! Handing live pipes to another process (a binary upgrade): a pipe stops
//! at a quiet point, where each leg waits for its source with every byte
//! it read written (or ended), and leaves behind its two sockets and a
//! small state; the other process adopts the probe's maps (the sockets
//! stay in them, with their routes, so the kernel goes on forwarding
//! throughout) and [`resume`]s the pipe from that state.
//!
//! Why a quiet point loses nothing: a leg's read is a non-blocking `recv`
//! made when the socket is ready, so dropping a pending read leaves every
//! unread byte in the socket; its writes are non-blocking `send`s counted
//! as they succeed, so a leg dropped while it waits for room knows exactly
//! which of the bytes it read did not go out, and those travel with the
//! state ([`LegState::pending`], at most one read: 256 KiB); the probe's
//! control is updated only once they are written.
//! What the leg knows besides (bytes read and written, its destination's
//! TCP baselines, how far redirected bytes are known taken) travels in
//! [`LegState`].
//!
//! Why the verdict survives the old process: a SockMap keeps its programs
//! attached until the last user reference to the map goes (the kernel
//! releases them in `map_release_uref`), and the new process holds one.
//!
//! Per executor (thread), as everything here: [`ask`] makes every pipe in
//! its legs phase hand itself over at its next quiet point;
//! [`pipes_running`] says how many have not yet; [`close`] ends the
//! handover (the rest go on here).
use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    os::fd::{AsFd as _, OwnedFd, RawFd},
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
};

use futures_lite::future;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{
    Leg, Splice,
    delivery::Delivery,
    halves::{self, Half, OwnSocket},
    pipe::{self, Outcome, Path},
    readiness::Readiness,
    shard::ShardProbe,
    socket,
};

/// One leg's state at a quiet point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LegState {
    pub read: u64,
    /// Bytes it copied before its source was spliced (a lazy pipe).
    #[serde(default)]
    pub read_before_splice: u64,
    /// Still copying, to be spliced past its pipe's threshold.
    #[serde(default)]
    pub switchable: bool,
    pub written: u64,
    pub baselines: Option<(u64, u64)>,
    pub destination_half_closed: bool,
    pub redirected_taken: u64,
    pub done: bool,
    /// Bytes it read and had not written yet (see the leg's `pending`).
    pub pending: Vec<u8>,
}

/// One socket of a splice: its place in the maps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryState {
    pub slot: u32,
    pub cookie: u64,
    pub held: bool,
    pub spliced: bool,
    /// Its window in the flow control.
    pub window: u64,
}

/// A pipe's state: how it forwards, where its sockets are in the maps
/// (client first, then backend; empty if copied), and its legs (client →
/// backend, backend → client).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipeState {
    /// 0: spliced, 1: fallback (userspace, a probe loaded), 2: copied.
    pub path: u8,
    /// [`ShardProbe::key`] of the probe whose maps hold the sockets.
    pub probe: Option<u64>,
    pub entries: Vec<EntryState>,
    pub legs: [LegState; 2],
    /// A pipe that copies first and splices what proves bulky (see
    /// [`pipe::run`]): its threshold and what became of its insert.
    #[serde(default)]
    pub lazy: Option<LazyState>,
}

/// What a lazy pipe's new process needs besides its legs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LazyState {
    pub splice_after: u64,
    pub insert: LazyInsert,
    /// What each leg had read when the insert was made.
    pub read_at_insert: [u64; 2],
}

/// What became of a lazy pipe's insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LazyInsert {
    /// Not tried yet: no direction carried the threshold.
    NotYet,
    /// Made: the splice's entries are in the state.
    Made,
    /// The kernel refused it.
    Refused,
    /// Not tried: a side had ended its stream first.
    Late,
}

/// A pipe handed over: its sockets (client, backend) and its state.
#[derive(Debug)]
pub struct HandedOver {
    pub sockets: [OwnedFd; 2],
    pub state: PipeState,
}

#[derive(Default)]
struct Registry {
    asked: Cell<bool>,
    next: Cell<u64>,
    running: Cell<usize>,
    wakers: RefCell<HashMap<u64, Waker>>,
}

thread_local! {
    static REGISTRY: Registry = Registry::default();
}

/// Asks every pipe of this executor to hand itself over at its next quiet
/// point (and those that reach their legs phase from now on).
pub fn ask() {
    let wakers: Vec<Waker> = REGISTRY.with(|r| {
        r.asked.set(true);
        r.wakers.borrow_mut().drain().map(|(_, w)| w).collect()
    });
    for waker in wakers {
        waker.wake();
    }
}

/// Ends the handover on this executor: pipes not handed over yet go on
/// here.
pub fn close() {
    REGISTRY.with(|r| r.asked.set(false));
}

/// Pipes of this executor in their legs phase, not handed over.
pub fn pipes_running() -> usize {
    REGISTRY.with(|r| r.running.get())
}

/// Runs `legs` (both legs of a pipe) unless a handover is asked and both
/// legs are quiet: `None` then, with the legs' future dropped at that
/// point.
pub(crate) struct UnlessHandedOver<'a, F> {
    legs: Pin<&'a mut F>,
    deliveries: &'a [Rc<Delivery>; 2],
    id: u64,
}

pub(crate) fn unless_handed_over<'a, F: Future>(
    legs: Pin<&'a mut F>,
    deliveries: &'a [Rc<Delivery>; 2],
) -> UnlessHandedOver<'a, F> {
    let id = REGISTRY.with(|r| {
        r.running.set(r.running.get() + 1);
        let id = r.next.get();
        r.next.set(id + 1);
        id
    });
    UnlessHandedOver {
        legs,
        deliveries,
        id,
    }
}

impl<F: Future> Future for UnlessHandedOver<'_, F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(output) = self.legs.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        // The legs' future is pending: each leg waits, and a quiet one waits
        // for its source with nothing unwritten.
        let id = self.id;
        let quiet = self
            .deliveries
            .iter()
            .all(|d| d.quiet.get() || d.done.get());
        REGISTRY.with(|r| {
            if r.asked.get() && quiet {
                return Poll::Ready(None);
            }
            if !r.asked.get() {
                let mut wakers = r.wakers.borrow_mut();
                match wakers.get_mut(&id) {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    Some(waker) => waker.clone_from(cx.waker()),
                    None => {
                        wakers.insert(id, cx.waker().clone());
                    }
                }
            }
            Poll::Pending
        })
    }
}

impl<F> Drop for UnlessHandedOver<'_, F> {
    fn drop(&mut self) {
        REGISTRY.with(|r| {
            r.running.set(r.running.get() - 1);
            r.wakers.borrow_mut().remove(&self.id);
        });
    }
}

fn path_code(path: Path) -> u8 {
    match path {
        Path::Spliced => 0,
        Path::Fallback => 1,
        Path::Copied => 2,
    }
}

fn path_of(code: u8) -> Path {
    match code {
        0 => Path::Spliced,
        1 => Path::Fallback,
        _ => Path::Copied,
    }
}

/// Takes a quiet pipe's state: copies of its sockets (the pipe then closes
/// its own: the sockets live on in the copies), its legs, and its splice
/// (left in the maps). `None` if the sockets cannot be copied (out of
/// descriptors): the pipe's sockets are then reset.
pub(crate) fn export(
    up: &Leg<Half, Half>,
    down: &Leg<Half, Half>,
    splice: Option<Splice>,
    probe: Option<&ShardProbe>,
    path: Path,
    lazy: Option<LazyState>,
    fds: [RawFd; 2],
) -> Option<Box<HandedOver>> {
    let copies = [up.source(), down.source()].map(|half| half.fd().try_clone_to_owned());
    let [Ok(client), Ok(backend)] = copies else {
        warn!("cannot copy a connection's sockets to hand them over: resetting it");
        for fd in fds {
            let _ = socket::reset_on_close(pipe::borrow(fd));
        }
        if let Some(splice) = splice {
            // Its sockets close with the legs: only the routes remain.
            splice.drop_closed();
        }
        return None;
    };
    // Closing the pipe's descriptors next does not take the sockets out of
    // the epoll set (the copies keep them open): out now.
    up.source().leave_readiness();
    down.source().leave_readiness();
    let entries = splice.map(Splice::hand_over).unwrap_or_default();
    Some(Box::new(HandedOver {
        sockets: [client, backend],
        state: PipeState {
            path: path_code(path),
            // The maps matter only to sockets in them.
            probe: probe.filter(|_| !entries.is_empty()).map(ShardProbe::key),
            entries,
            legs: [up.handover_state(), down.handover_state()],
            lazy,
        },
    }))
}

/// Goes on with a pipe another process handed over, in `probe` (the
/// adopted one its sockets are in, if spliced), until both directions
/// ended, as [`pipe::run_then`] does; `end` gets the outcome (its byte
/// counts include what went before the handover).
pub fn resume<'a, R>(
    handed: HandedOver,
    probe: Option<&'a ShardProbe>,
    readiness: &Rc<Readiness>,
    end: impl FnOnce(Outcome) -> R + 'a,
) -> impl Future<Output = R> + 'a {
    let HandedOver {
        sockets: [client, backend],
        state,
    } = handed;
    let fds = [client.as_fd(), backend.as_fd()].map(|fd| std::os::fd::AsRawFd::as_raw_fd(&fd));
    let (client_reader, client_writer) = halves::split(OwnSocket::new(client, readiness));
    let (backend_reader, backend_writer) = halves::split(OwnSocket::new(backend, readiness));
    let path = path_of(state.path);
    let splice = match probe {
        Some(probe) if !state.entries.is_empty() => {
            Some(Splice::restore(probe.probe(), &state.entries, &fds))
        }
        _ => None,
    };
    for (index, source) in [&client_reader, &backend_reader].into_iter().enumerate() {
        if splice.as_ref().is_some_and(|s| s.is_spliced(index)) {
            source.set_spliced();
        }
    }
    let up = Leg::restored(
        client_reader,
        backend_writer,
        pipe::borrow(fds[1]),
        &state.legs[0],
    );
    let down = Leg::restored(
        backend_reader,
        client_writer,
        pipe::borrow(fds[0]),
        &state.legs[1],
    );
    let done = [state.legs[0].done, state.legs[1].done];
    let switchable = [state.legs[0].switchable, state.legs[1].switchable];
    // Every pipe goes on as a lazy one: a pipe spliced from its start is one
    // whose insert was made and whose legs are past their copy phase.
    let (lazy_state, first_path) = match &state.lazy {
        Some(lazy) => (lazy.clone(), None),
        None => (
            LazyState {
                splice_after: 0,
                insert: if splice.is_some() {
                    LazyInsert::Made
                } else {
                    LazyInsert::NotYet
                },
                read_at_insert: [0; 2],
            },
            Some(path),
        ),
    };
    let lazy_probe = probe.filter(|_| state.lazy.is_some() || splice.is_some());
    let lazy = pipe::Lazy::restored(lazy_probe, fds, &lazy_state, splice);
    let mut legs = (up, down);
    async move {
        let (up, down) = (&mut legs.0, &mut legs.1);
        let mut outcome = Outcome::default();
        let reset = pipe::Reset {
            sockets: fds,
            legs: [up.delivery(), down.delivery()],
        };
        let run = future::zip(
            async {
                if done[0] {
                    Ok(())
                } else {
                    pipe::run_lazy_leg(up, 0, switchable[0], &lazy, &reset).await
                }
            },
            async {
                if done[1] {
                    Ok(())
                } else {
                    pipe::run_lazy_leg(down, 1, switchable[1], &lazy, &reset).await
                }
            },
        );
        // Dropped at the end of the block: at a quiet point if handed over.
        let results = {
            let run = std::pin::pin!(run);
            unless_handed_over(run, &reset.legs).await
        };
        let (up, down) = (&legs.0, &legs.1);
        match results {
            Some((up_result, down_result)) => {
                let (splice, path) = lazy.end();
                outcome.path = Some(first_path.unwrap_or(path));
                outcome.reset = up_result.is_err() || down_result.is_err();
                outcome.to_backend = up.bytes_written() + pipe::redirected(&splice, 0);
                outcome.to_client = down.bytes_written() + pipe::redirected(&splice, 1);
                outcome.read_in_userspace = up.bytes_read() + down.bytes_read();
                drop(legs);
                pipe::remove(splice, probe);
            }
            None => {
                // Handed over again (another upgrade).
                let (splice, path, lazy_state) = lazy.hand_over();
                let path = first_path.unwrap_or(path);
                outcome = pipe::handed_over(up, down, splice, probe, path, lazy_state, fds);
                drop(legs);
            }
        }
        end(outcome)
    }
}
