//! Readiness of the sockets an executor keeps outside glommio (see
//! [`super::halves`]): one epoll set per executor, which glommio watches as
//! a single descriptor.
//!
//! glommio keeps a readiness poll armed on each of its streams from its
//! creation on and after every short read, and an idle proxied connection
//! always waits for a read on both sockets: two polls of 496 B each (plus the
//! kernel's request), for as long as the connection lives, and at thousands
//! of connections a long list that io_uring walks on every cancellation (see
//! docs/performance.md). A socket registered here costs an entry in the
//! kernel's epoll set and a few bytes in [`Readiness`]; only the set itself
//! is polled through glommio.
//!
//! Registrations are one-shot: a waiting reader or writer arms its socket
//! for what it waits for, an event disarms it and wakes both, and whoever
//! still finds nothing arms again. A socket nobody waits on is not armed,
//! and a spliced source's reader waits only for its end ([`Interest::End`]),
//! so the kernel's data wake-ups for it cost nothing.
use std::{
    cell::RefCell,
    io,
    os::fd::{BorrowedFd, FromRawFd, IntoRawFd},
    rc::Rc,
    task::Waker,
};

use futures_lite::AsyncReadExt as _;

use super::epoll::EpollSet;

/// Most events taken from the kernel per `epoll_wait` call.
const EVENTS_PER_CALL: usize = 64;

/// The events a reader waits for (errors and hang-ups always come).
const READ_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
const END_EVENTS: u32 = libc::EPOLLRDHUP as u32;
const WRITE_EVENTS: u32 = libc::EPOLLOUT as u32;

/// An executor's epoll set and the wakers of the sockets in it.
pub struct Readiness {
    epoll: EpollSet,
    waiters: RefCell<Vec<Waiter>>,
    free: RefCell<Vec<u32>>,
}

#[derive(Default)]
struct Waiter {
    /// Tells an event for this entry from one for an earlier socket that
    /// had the same index (the kernel may still report it once).
    generation: u32,
    reader: Option<Waker>,
    /// What the reader waits for: [`READ_EVENTS`] or [`END_EVENTS`].
    reader_events: u32,
    writer: Option<Waker>,
    /// The events the socket is armed for (0: not armed).
    armed: u32,
    /// The socket is in the epoll set (it is added at its first wait).
    added: bool,
}

/// What a socket waits for.
#[derive(Clone, Copy)]
pub enum Interest {
    /// Bytes to read, or the end of the stream.
    Read,
    /// Only the end of the stream (FIN, reset): for a spliced source, whose
    /// data wake-ups (one per verdict run) would otherwise each wake the
    /// set; the flow control tells its reader about passed-up bytes.
    End,
    Write,
}

impl Readiness {
    /// Makes the set and starts the task that watches it on this executor.
    pub fn start() -> io::Result<Rc<Self>> {
        let readiness = Rc::new(Self {
            epoll: EpollSet::new()?,
            waiters: RefCell::default(),
            free: RefCell::default(),
        });
        glommio::spawn_local(watch(Rc::clone(&readiness))).detach();
        Ok(readiness)
    }

    /// A key for a new socket, for [`Self::wait`] and [`Self::forget`].
    pub fn key(&self) -> Key {
        let mut waiters = self.waiters.borrow_mut();
        let index = self.free.borrow_mut().pop().unwrap_or_else(|| {
            waiters.push(Waiter::default());
            (waiters.len() - 1) as u32
        });
        let waiter = &mut waiters[index as usize];
        waiter.generation = waiter.generation.wrapping_add(1);
        Key {
            index,
            generation: waiter.generation,
        }
    }

    /// Wakes `waker` when `socket` (registered under `key`) may be ready for
    /// `interest`: arms the socket if it is not armed for it yet.
    pub fn wait(
        &self,
        key: Key,
        socket: BorrowedFd<'_>,
        interest: Interest,
        waker: &Waker,
    ) -> io::Result<()> {
        let mut waiters = self.waiters.borrow_mut();
        let waiter = &mut waiters[key.index as usize];
        let slot = match interest {
            Interest::Read => {
                waiter.reader_events = READ_EVENTS;
                &mut waiter.reader
            }
            Interest::End => {
                waiter.reader_events = END_EVENTS;
                &mut waiter.reader
            }
            Interest::Write => &mut waiter.writer,
        };
        match slot {
            Some(current) if current.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
        let mut wanted = 0;
        if waiter.reader.is_some() {
            wanted |= waiter.reader_events;
        }
        if waiter.writer.is_some() {
            wanted |= WRITE_EVENTS;
        }
        if wanted == waiter.armed {
            return Ok(());
        }
        let operation = if waiter.added {
            libc::EPOLL_CTL_MOD
        } else {
            libc::EPOLL_CTL_ADD
        };
        self.epoll.control(
            operation,
            socket,
            wanted | libc::EPOLLONESHOT as u32,
            key.to_u64(),
        )?;
        waiter.added = true;
        waiter.armed = wanted;
        Ok(())
    }

    /// Takes `socket` (registered under `key`) out of the set, if it is in
    /// it; its waiters are not woken. [`Self::forget`] still follows.
    pub fn remove(&self, key: Key, socket: BorrowedFd<'_>) {
        let mut waiters = self.waiters.borrow_mut();
        let waiter = &mut waiters[key.index as usize];
        if waiter.added {
            let _ = self.epoll.control(libc::EPOLL_CTL_DEL, socket, 0, 0);
            waiter.added = false;
            waiter.armed = 0;
        }
    }

    /// Frees `key` once its socket is closed (closing it removed it from
    /// the set).
    pub fn forget(&self, key: Key) {
        let mut waiters = self.waiters.borrow_mut();
        let waiter = &mut waiters[key.index as usize];
        let generation = waiter.generation;
        *waiter = Waiter {
            generation,
            ..Waiter::default()
        };
        self.free.borrow_mut().push(key.index);
    }

    /// Takes the events the kernel has and wakes their sockets' waiters;
    /// returns how many it took.
    fn dispatch(&self) -> usize {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_CALL];
        let n = self.epoll.ready_now(&mut events);
        let mut woken = Vec::new();
        {
            let mut waiters = self.waiters.borrow_mut();
            for event in &events[..n] {
                let key = Key::from_u64(event.u64);
                let Some(waiter) = waiters.get_mut(key.index as usize) else {
                    continue;
                };
                if waiter.generation != key.generation {
                    continue;
                }
                // One-shot: the event disarmed the socket for everything,
                // so both sides look again (and arm again if they must).
                waiter.armed = 0;
                woken.extend(waiter.reader.take());
                woken.extend(waiter.writer.take());
            }
        }
        for waker in woken {
            waker.wake();
        }
        n
    }
}

/// A socket's place in a [`Readiness`].
#[derive(Clone, Copy, Debug)]
pub struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    fn to_u64(self) -> u64 {
        u64::from(self.index) | u64::from(self.generation) << 32
    }

    fn from_u64(value: u64) -> Self {
        Self {
            index: value as u32,
            generation: (value >> 32) as u32,
        }
    }
}

/// Waits for events in the set and hands them out, for as long as the
/// executor runs.
async fn watch(readiness: Rc<Readiness>) {
    let mut warned = false;
    loop {
        if let Err(e) = set_has_events(readiness.epoll.fd()).await {
            // Only running out of descriptors makes this fail; the sockets
            // wait meanwhile.
            if !std::mem::replace(&mut warned, true) {
                tracing::warn!("cannot watch the epoll set of spliced sockets: {e}");
            }
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        while readiness.dispatch() == EVENTS_PER_CALL {}
    }
}

/// Returns once the epoll set `epoll` has events.
///
/// glommio offers no wait on an arbitrary descriptor, but each stream arms a
/// readiness poll on its descriptor when it is made: a stream made from a
/// copy of the set's descriptor does, and its first read returns (with
/// ENOTSOCK) once that poll completed. The copy is closed after each wait.
async fn set_has_events(epoll: BorrowedFd<'_>) -> io::Result<()> {
    let copy = epoll.try_clone_to_owned()?.into_raw_fd();
    // SAFETY: `copy` is a new descriptor owned by the stream from here on.
    let mut stream = unsafe { <glommio::net::TcpStream as FromRawFd>::from_raw_fd(copy) };
    let _ = stream.read(&mut [0u8; 1]).await;
    Ok(())
}
