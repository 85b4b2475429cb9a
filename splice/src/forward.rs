//! One direction of a connection (a *leg*): source socket → destination
//! socket.
//!
//! The same loop serves spliced and copied connections. It copies whatever it
//! can read from the source to the destination: everything, for a copied
//! connection; for a spliced source, only what the probe passed up (past
//! the credit, see [`splice_common`]), after the bytes the kernel redirected
//! before them reached the destination, and it then tells the probe what it
//! forwarded so that the kernel can take over again.
//!
//! At end of stream it does not forward the FIN at once: bytes the probe
//! redirected may still wait in the kernel's queue for the destination, and a
//! FIN now would cut them off (measured: 16 MiB sent, 4.9 MiB delivered). It
//! waits until the destination's TCP send queue has taken every byte (the
//! ones userspace wrote plus the ones the probe redirected), then shuts the
//! destination down for writing.
use std::{
    cell::RefCell, future::poll_fn, io, os::fd::BorrowedFd, pin::Pin, rc::Rc, time::Duration,
};

use futures_lite::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, future};

use splice_common::{Control, Stream};
use thiserror::Error;

use super::{
    credit,
    delivery::Delivery,
    insert::Splice,
    socket::{self, tcp_state},
    spliced_read::{self, Waiting},
};

/// Initial userspace buffer of a leg that may splice: it only sees the
/// bytes the probe passes up, so it starts small (and grows if needed).
const SPLICEABLE_BUFFER: usize = 256;
/// Initial userspace buffer of a leg that copies and met a full
/// destination (until then it reads into the executor's [`SCRATCH`]).
const COPY_BUFFER: usize = 16 * 1024;
/// Largest userspace buffer a leg grows to.
const MAX_BUFFER: usize = 256 * 1024;
/// Longest pause between two checks of the destination while draining.
const MAX_DRAIN_PAUSE: Duration = Duration::from_millis(10);
/// Bounds of the pause between two send attempts once the destination's
/// peer half-closed (see [`Leg::send_all`]).
const MIN_SEND_PAUSE: Duration = Duration::from_micros(50);
const MAX_SEND_PAUSE: Duration = Duration::from_millis(5);
/// How long a wait for room in the destination may go before the leg checks
/// again whether its peer half-closed.
const SEND_WAIT_SLICE: Duration = Duration::from_millis(10);
/// Bounds of the pause between two looks for passed-up bytes after the
/// source's end of stream.
const MIN_PASSED_PAUSE: Duration = Duration::from_micros(100);
const MAX_PASSED_PAUSE: Duration = Duration::from_millis(50);

thread_local! {
    /// The executor's read buffer for copying legs without one of their
    /// own: bytes read into it are written on in the same poll, so no two
    /// legs ever hold it; only what a full destination does not take yet
    /// moves to a buffer of the leg's own. An idle or interactive copied
    /// connection then holds no buffer at all.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_BUFFER]);
}

/// Why a leg ended early; the connection should then be reset.
#[derive(Debug, Error)]
pub enum LegError {
    #[error("reading the source failed: {0}")]
    Source(io::Error),
    #[error("writing the destination failed: {0}")]
    Destination(io::Error),
    #[error("probe: {0}")]
    Probe(io::Error),
}

/// The source of a leg as the probe sees it: `splice`'s member `index`.
#[derive(Clone, Copy)]
pub struct Spliced<'a> {
    pub splice: &'a Splice,
    pub index: usize,
}

impl Spliced<'_> {
    pub(super) fn stream(&self) -> Result<Stream, LegError> {
        self.splice.stream(self.index).map_err(LegError::Probe)
    }
}

/// How [`Leg::copy_until`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// The source's stream ended and went through: the leg is done.
    Ended,
    /// The source carried the threshold: worth splicing. Every byte read
    /// was written, so the kernel may take the stream over from here.
    Bulky,
}

/// One direction of a connection.
pub struct Leg<R, W> {
    source: R,
    destination: W,
    delivery: Rc<Delivery>,
    /// Bytes read before the source was spliced (copied ones): the probe
    /// counts the bytes it passes up from there.
    read_before_splice: u64,
    /// In [`Self::copy_until`]: a handover carries that the leg may still
    /// be spliced.
    switchable: bool,
    /// Empty until the first read that needs it (see [`Self::run`]).
    buffer: Vec<u8>,
    /// The destination's peer sent FIN (seen once, it stays so).
    destination_half_closed: bool,
    /// Every byte the kernel redirected before this count is known to be in
    /// the destination's TCP send queue, so userspace may write after it.
    redirected_taken: u64,
    /// Bytes read and not all written yet: the first `.0` of the buffer (or
    /// `first_byte`), of which what userspace wrote past `.1` went out. Set
    /// from the read until the write ends, so that a handover in between
    /// carries the rest ([`super::handover`]); a leg taken over with such
    /// bytes starts by writing them.
    pending: Option<(u32, u64)>,
    /// The read of a spliced leg without a buffer.
    first_byte: [u8; 1],
}

impl<R, W> Leg<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Makes a leg. Must happen before anything is written to `destination`
    /// (by userspace or the kernel): it takes the baseline the drain counts
    /// from. `destination_fd`, the socket behind `destination`, must outlive
    /// the leg. Only a `spliceable` leg may [`Self::run`] with a spliced
    /// source: it takes the baseline (one that copies only saves those
    /// calls), and its userspace buffer starts small, since it grows if the
    /// probe passes bytes up. A spliced leg allocates it only when the probe
    /// first passes bytes up: most spliced connections never need it.
    pub fn new(
        source: R,
        destination: W,
        destination_fd: BorrowedFd<'_>,
        spliceable: bool,
    ) -> io::Result<Self> {
        Ok(Self {
            source,
            destination,
            delivery: Rc::new(Delivery::new(destination_fd, spliceable)?),
            read_before_splice: 0,
            switchable: false,
            buffer: Vec::new(),
            destination_half_closed: false,
            redirected_taken: 0,
            pending: None,
            first_byte: [0],
        })
    }

    /// The source.
    pub fn source(&self) -> &R {
        &self.source
    }

    /// What this leg delivered to its destination, shared: the caller can
    /// [`Delivery::abandon`] the leg through it.
    pub fn delivery(&self) -> Rc<Delivery> {
        Rc::clone(&self.delivery)
    }

    /// Bytes userspace read from the source.
    pub fn bytes_read(&self) -> u64 {
        self.delivery.read()
    }

    /// Bytes read from a spliced source that the probe passed up.
    fn read_passed_up(&self) -> u64 {
        self.delivery.read() - self.read_before_splice
    }

    /// Bytes userspace wrote to the destination.
    pub fn bytes_written(&self) -> u64 {
        self.delivery.written()
    }

    /// Writes bytes already read from the source elsewhere (e.g. the first
    /// packet a router routed on) to the destination.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), LegError> {
        Self::send_all(
            &mut self.destination,
            &self.delivery,
            &mut self.destination_half_closed,
            bytes,
        )
        .await
    }

    /// Forwards until the source's end of stream, waits until the
    /// destination took every byte, and shuts the destination down for
    /// writing. `spliced` is the source's place in the probe, if it has one.
    pub async fn run(&mut self, spliced: Option<Spliced<'_>>) -> Result<(), LegError> {
        self.run_until(spliced, None).await.map(drop)
    }

    /// Copies (the source is not spliced) until the source's end of stream,
    /// as [`Self::run`], or until it carried `threshold` bytes: then it
    /// returns [`Copied::Bulky`] between two reads, for the caller to
    /// [`Self::prepare_splice`] and splice the source.
    pub async fn copy_until(&mut self, threshold: u64) -> Result<Copied, LegError> {
        self.switchable = true;
        let copied = self.run_until(None, Some(threshold)).await;
        self.switchable = false;
        copied
    }

    /// Readies a leg that copied for its source to be spliced from its next
    /// unread byte: it measures what the kernel redirects to the
    /// destination from now on, and gives back its copy buffer (the probe
    /// passes bytes up rarely; a buffer is made again then).
    pub fn prepare_splice(&mut self) -> Result<(), LegError> {
        self.delivery
            .measure_from_now()
            .map_err(LegError::Destination)?;
        self.read_before_splice = self.delivery.read();
        self.buffer = Vec::new();
        Ok(())
    }

    async fn run_until(
        &mut self,
        spliced: Option<Spliced<'_>>,
        threshold: Option<u64>,
    ) -> Result<Copied, LegError> {
        let spliced = spliced.filter(|s| s.splice.is_spliced(s.index));
        if spliced.is_some() && !self.delivery.measures_redirects() {
            return Err(LegError::Probe(io::Error::other(
                "a spliced source for a leg made to copy only",
            )));
        }
        // Woken by the flow control when the probe passed bytes up.
        let waiting = spliced.map(|spliced| {
            let waiting = Rc::new(Waiting::default());
            spliced.splice.watch(
                spliced.index,
                Rc::clone(&self.delivery),
                Rc::clone(&waiting),
            );
            waiting
        });
        // A spliced leg without a buffer waits with a read of one byte.
        let mut pause = MIN_PASSED_PAUSE;
        loop {
            // Bytes a leg taken over from another process had not written
            // yet go first (they are counted as read already).
            let n = if let Some((n, _)) = self.pending {
                n as usize
            } else {
                // Quiet while it waits: every byte read so far was written.
                self.delivery.quiet.set(true);
                let read = match &waiting {
                    Some(waiting) => {
                        let into = if self.buffer.is_empty() {
                            &mut self.first_byte[..]
                        } else {
                            &mut self.buffer[..]
                        };
                        spliced_read::read(&mut self.source, into, waiting).await
                    }
                    None if self.buffer.is_empty() => {
                        let limit = self.copy_limit(threshold, MAX_BUFFER);
                        let source = &mut self.source;
                        let read = poll_fn(|cx| {
                            SCRATCH.with_borrow_mut(|scratch| {
                                Pin::new(&mut *source).poll_read(cx, &mut scratch[..limit])
                            })
                        })
                        .await;
                        match read {
                            // In the same poll as the read, before any other
                            // leg can use the scratch buffer.
                            Ok(n) if n > 0 => {
                                self.delivery.quiet.set(false);
                                if self.delivery.is_abandoned() {
                                    return Err(abandoned());
                                }
                                self.delivery.add_read(n as u64);
                                Box::pin(self.forward_scratch(n)).await?;
                                if threshold
                                    .is_some_and(|threshold| self.delivery.read() >= threshold)
                                {
                                    return Ok(Copied::Bulky);
                                }
                                continue;
                            }
                            other => other,
                        }
                    }
                    None => {
                        let limit = self.copy_limit(threshold, self.buffer.len());
                        self.source.read(&mut self.buffer[..limit]).await
                    }
                };
                self.delivery.quiet.set(false);
                if self.delivery.is_abandoned() {
                    return Err(abandoned());
                }
                let n = match read {
                    Ok(0) => match spliced {
                        // End of stream, unless bytes the probe passed up are
                        // still on their way to the receive queue (queued
                        // behind bytes waiting to leave through the same
                        // socket).
                        Some(spliced) if spliced.stream()?.passed > self.read_passed_up() => {
                            glommio::timer::sleep(pause).await;
                            pause = (pause * 2).min(MAX_PASSED_PAUSE);
                            continue;
                        }
                        _ => break,
                    },
                    Ok(n) => n,
                    Err(e) if retry(&e) => continue,
                    Err(e) => return Err(LegError::Source(e)),
                };
                self.delivery.add_read(n as u64);
                self.pending = Some((n as u32, self.delivery.written()));
                n
            };
            // Quiet while these wait too: the bytes not written yet would
            // travel with a handover.
            self.delivery.quiet.set(true);
            if let Some(spliced) = spliced {
                // Bytes the kernel redirected before these must reach the
                // destination first.
                let redirected = spliced.stream()?.redirected;
                // Boxed, as the write below: the future of a leg is as large
                // as its largest state, and these are the rare ones.
                Box::pin(self.wait_redirected_taken(redirected)).await?;
                Box::pin(self.wait_for_room(spliced.splice.window(spliced.index))).await?;
            }
            let bytes = if self.buffer.is_empty() {
                &self.first_byte[..n]
            } else {
                &self.buffer[..n]
            };
            let full = n == self.buffer.len();
            Box::pin(Self::send_all(
                &mut self.destination,
                &self.delivery,
                &mut self.destination_half_closed,
                bytes,
            ))
            .await?;
            self.delivery.quiet.set(false);
            self.pending = None;
            if self.buffer.is_empty() {
                self.allocate_buffer();
            } else if full && self.buffer.len() < MAX_BUFFER {
                self.buffer
                    .resize((self.buffer.len() * 4).min(MAX_BUFFER), 0);
            }
            if let Some(spliced) = spliced {
                // Everything read from a spliced source was passed up: the
                // probe redirects again once this catches up with it.
                let window = spliced.splice.window(spliced.index);
                let control = spliced.splice.control(spliced.index);
                let credit = if credit::needs_renewal(
                    spliced.stream()?.redirected,
                    window,
                    control.credit,
                ) {
                    let acked = self
                        .delivery
                        .redirected_acked()
                        .map_err(LegError::Destination)?;
                    credit::renewed(control.credit, acked, window)
                } else {
                    control.credit
                };
                spliced.splice.set_control(
                    spliced.index,
                    Control {
                        credit,
                        forwarded: self.read_passed_up(),
                    },
                );
            } else if threshold.is_some_and(|threshold| self.delivery.read() >= threshold) {
                return Ok(Copied::Bulky);
            }
        }
        // End of stream: the source's bytes all went through (no verdict
        // runs any more), so the redirected count is final. Bytes written
        // here are in the destination's TCP already (the FIN queues behind
        // them): only redirected ones not yet known taken are waited for,
        // none when the kernel redirected nothing (a client that sent only
        // its first packet).
        if let Some(spliced) = spliced {
            let redirected = spliced.stream()?.redirected;
            self.wait_redirected_taken(redirected).await?;
        }
        self.destination
            .close()
            .await
            .map_err(LegError::Destination)?;
        self.delivery.done.set(true);
        Ok(Copied::Ended)
    }

    /// How much the next read may take, of `room`: in a copy phase, no more
    /// than the threshold still wants, so that the kernel takes the stream
    /// over where it said (what is left waits in the socket for it).
    fn copy_limit(&self, threshold: Option<u64>, room: usize) -> usize {
        threshold.map_or(room, |threshold| {
            let wanted = threshold.saturating_sub(self.delivery.read()).max(1);
            room.min(usize::try_from(wanted).unwrap_or(usize::MAX))
        })
    }

    /// Writes the `n` bytes just read into [`SCRATCH`] to the destination:
    /// what it takes at once, then (a full destination) the rest from a
    /// buffer of the leg's own, which it keeps reading into from then on.
    async fn forward_scratch(&mut self, n: usize) -> Result<(), LegError> {
        let fd = self.delivery.destination();
        let sent = SCRATCH.with_borrow(|scratch| {
            let mut sent = 0;
            while sent < n {
                match socket::send_nonblocking(fd, &scratch[sent..n]) {
                    Ok(k) => sent += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The rest waits in the leg's buffer, as for a full socket.
                    Err(e) if socket::short_of_kernel_memory(&e) => break,
                    Err(e) => return Err(LegError::Destination(e)),
                }
            }
            Ok(sent)
        })?;
        self.delivery.add_written(sent as u64);
        if sent == n {
            return Ok(());
        }
        let rest = n - sent;
        self.buffer = vec![0; rest.max(COPY_BUFFER)];
        SCRATCH.with_borrow(|scratch| self.buffer[..rest].copy_from_slice(&scratch[sent..n]));
        // As any write that waits: quiet, the rest travelling with a
        // handover.
        self.pending = Some((rest as u32, self.delivery.written()));
        self.delivery.quiet.set(true);
        Self::send_all(
            &mut self.destination,
            &self.delivery,
            &mut self.destination_half_closed,
            &self.buffer[..rest],
        )
        .await?;
        self.delivery.quiet.set(false);
        self.pending = None;
        Ok(())
    }

    /// What another process needs to go on with this leg (see
    /// [`super::handover`]); meaningful at a quiet point only.
    pub(crate) fn handover_state(&self) -> super::handover::LegState {
        super::handover::LegState {
            read: self.delivery.read(),
            read_before_splice: self.read_before_splice,
            switchable: self.switchable,
            written: self.delivery.written(),
            baselines: self.delivery.baseline_values(),
            destination_half_closed: self.destination_half_closed,
            redirected_taken: self.redirected_taken,
            done: self.delivery.done.get(),
            pending: self.pending.map_or_else(Vec::new, |(n, before)| {
                let bytes = if self.buffer.is_empty() {
                    &self.first_byte[..n as usize]
                } else {
                    &self.buffer[..n as usize]
                };
                let sent = (self.delivery.written() - before) as usize;
                bytes[sent.min(bytes.len())..].to_vec()
            }),
        }
    }

    /// A leg taken over from another process at `state`.
    pub(crate) fn restored(
        source: R,
        destination: W,
        destination_fd: BorrowedFd<'_>,
        state: &super::handover::LegState,
    ) -> Self {
        let delivery = Delivery::restored(destination_fd, state.baselines, state.written);
        delivery.done.set(state.done);
        delivery.add_read(state.read);
        Self {
            source,
            destination,
            delivery: Rc::new(delivery),
            read_before_splice: state.read_before_splice,
            switchable: false,
            destination_half_closed: state.destination_half_closed,
            redirected_taken: state.redirected_taken,
            pending: (!state.pending.is_empty())
                .then_some((state.pending.len() as u32, state.written)),
            buffer: state.pending.clone(),
            first_byte: [0],
        }
    }

    fn allocate_buffer(&mut self) {
        if self.buffer.is_empty() {
            let size = if self.delivery.measures_redirects() {
                SPLICEABLE_BUFFER
            } else {
                COPY_BUFFER
            };
            self.buffer = vec![0; size];
        }
    }

    /// Waits until the destination's TCP took the first `redirected` bytes
    /// the kernel redirected to it.
    async fn wait_redirected_taken(&mut self, redirected: u64) -> Result<(), LegError> {
        if redirected > self.redirected_taken {
            self.wait_handed_to_tcp(self.delivery.written() + redirected)
                .await?;
            self.redirected_taken = redirected;
        }
        Ok(())
    }

    /// Waits until the destination's send queue holds less than `window`
    /// bytes its peer has not acknowledged: bytes passed up then go on at
    /// the pace of the destination's reader, as the credit makes redirected
    /// ones do. Without it a reader that stopped let the leg fill the
    /// destination's send buffer, which is sized for four windows (and
    /// doubled by the kernel): 33 MB queued at the initial window
    /// (docs/RELIABILITY.md, "Memory limits"). A reset destination keeps
    /// its queue count, so a wait that lasts checks the destination is
    /// alive.
    async fn wait_for_room(&self, window: u64) -> Result<(), LegError> {
        let fd = self.delivery.destination();
        let mut pause = MIN_SEND_PAUSE;
        loop {
            let queued = socket::bytes_queued(fd).map_err(LegError::Destination)?;
            if queued < window {
                return Ok(());
            }
            if self.delivery.is_abandoned() {
                return Err(abandoned());
            }
            self.check_destination(|| format!("destination closed with {queued} bytes queued"))?;
            glommio::timer::sleep(pause).await;
            // As long as a full send buffer makes `send_all` wait between
            // two looks at the destination.
            pause = (pause * 2).min(SEND_WAIT_SLICE);
        }
    }

    /// Fails if the destination died: a pending socket error, or a closed
    /// socket (TCP keeps its queue counters as they were when it reset).
    fn check_destination(&self, closed: impl FnOnce() -> String) -> Result<(), LegError> {
        let fd = self.delivery.destination();
        if let Some(e) = socket::take_error(fd).map_err(LegError::Destination)? {
            return Err(LegError::Destination(e));
        }
        let state = socket::tcp_info(fd)
            .map_err(LegError::Destination)?
            .tcpi_state;
        if state == tcp_state::CLOSE {
            return Err(LegError::Destination(io::Error::new(
                io::ErrorKind::ConnectionReset,
                closed(),
            )));
        }
        Ok(())
    }

    /// Writes all of `bytes` to the destination, counting them in `delivery`.
    ///
    /// glommio waits for room with an io_uring poll, which always reports
    /// POLLRDHUP: once the destination's peer half-closed, that wait returns at
    /// once and the writer spins at 100% CPU until room appears (seen with a
    /// client that sent, shut down its side, and read only later). So after a
    /// peer FIN the leg polls for room on a timer instead, and a wait that
    /// lasts re-checks the peer's state every [`SEND_WAIT_SLICE`].
    async fn send_all(
        destination: &mut W,
        delivery: &Delivery,
        half_closed: &mut bool,
        mut bytes: &[u8],
    ) -> Result<(), LegError> {
        let fd = delivery.destination();
        let mut pause = MIN_SEND_PAUSE;
        while !bytes.is_empty() {
            if delivery.is_abandoned() {
                return Err(abandoned());
            }
            let sent = match socket::send_nonblocking(fd, bytes) {
                Ok(n) => Some(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // No wake-up comes when kernel memory frees up: a timer.
                Err(e) if socket::short_of_kernel_memory(&e) => {
                    glommio::timer::sleep(pause).await;
                    pause = (pause * 2).min(MAX_SEND_PAUSE);
                    continue;
                }
                Err(e) => return Err(LegError::Destination(e)),
            };
            let sent = match sent {
                Some(n) => Some(n),
                None if *half_closed || peer_half_closed(fd)? => {
                    *half_closed = true;
                    glommio::timer::sleep(pause).await;
                    pause = (pause * 2).min(MAX_SEND_PAUSE);
                    None
                }
                None => {
                    let write = async { Some(destination.write(bytes).await) };
                    let slice = async {
                        glommio::timer::sleep(SEND_WAIT_SLICE).await;
                        None
                    };
                    match future::or(write, slice).await {
                        // Tried again above, where it waits on a timer.
                        Some(Err(e)) if socket::short_of_kernel_memory(&e) => None,
                        Some(result) => Some(result.map_err(LegError::Destination)?),
                        None => None,
                    }
                }
            };
            if let Some(n) = sent {
                bytes = &bytes[n..];
                delivery.add_written(n as u64);
                pause = MIN_SEND_PAUSE;
            }
        }
        Ok(())
    }

    /// Waits until the destination's TCP send queue took `target` bytes
    /// since the leg began, or fails if the destination died meanwhile.
    async fn wait_handed_to_tcp(&self, target: u64) -> Result<(), LegError> {
        let mut pause = Duration::from_micros(50);
        loop {
            let handed = self.delivery.handed().map_err(LegError::Destination)?;
            if handed >= target {
                return Ok(());
            }
            self.check_destination(|| {
                format!("destination closed with {handed} of {target} bytes handed over")
            })?;
            glommio::timer::sleep(pause).await;
            pause = (pause * 2).min(MAX_DRAIN_PAUSE);
        }
    }
}

fn abandoned() -> LegError {
    LegError::Source(io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection given up (reset)",
    ))
}

fn peer_half_closed(fd: BorrowedFd<'_>) -> Result<bool, LegError> {
    let state = socket::tcp_info(fd)
        .map_err(LegError::Destination)?
        .tcpi_state;
    Ok(state == tcp_state::CLOSE_WAIT)
}

/// A sockmap socket's read can report EAGAIN or EINTR when its peer's FIN
/// arrives; both mean "try again".
fn retry(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
