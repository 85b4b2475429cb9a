//! One direction of a connection (a *leg*): source socket → destination
//! socket.
//!
//! The same loop serves spliced and copied connections. It copies whatever it
//! can read from the source to the destination: everything, for a copied
//! connection; for a spliced one, only what the probe passed up instead of
//! redirecting (bytes that arrived while the peer was not inserted yet, or
//! past the credit). For a spliced leg it also keeps the probe's credit ahead
//! of the traffic (see [`crate::shared`] for the flow control).
//!
//! At end of stream it does not forward the FIN at once: bytes the probe
//! redirected may still wait in the kernel's queue for the destination, and a
//! FIN now would cut them off (measured: 16 MiB sent, 4.9 MiB delivered). It
//! waits until the destination's TCP send queue has taken every byte (the
//! ones userspace wrote plus the ones the probe redirected), then shuts the
//! destination down for writing.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    time::{Duration, Instant},
};

use futures_lite::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, future};
use thiserror::Error;

use super::{
    probe::Splice,
    socket::{self, tcp_state},
};
use crate::shared::{Control, Route};

/// Largest userspace buffer a leg grows to.
const MAX_BUFFER: usize = 64 * 1024;
/// Longest pause between two checks of the destination while draining.
const MAX_DRAIN_PAUSE: Duration = Duration::from_millis(10);
/// How long bytes the probe passed up may take to become readable after the
/// source's end of stream (they may still sit in the kernel's work queue).
const PASSED_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds of the pause between two send attempts once the destination's
/// peer half-closed (see [`Leg::send_all`]).
const MIN_SEND_PAUSE: Duration = Duration::from_micros(50);
const MAX_SEND_PAUSE: Duration = Duration::from_millis(5);
/// How long a wait for room in the destination may go before the leg checks
/// again whether its peer half-closed.
const SEND_WAIT_SLICE: Duration = Duration::from_millis(10);
/// Bounds of the interval between two credit checks of a spliced leg.
const MIN_TICK: Duration = Duration::from_millis(1);
const MAX_TICK: Duration = Duration::from_secs(1);

/// Why a leg ended early; the connection should then be reset.
#[derive(Debug, Error)]
pub enum LegError {
    #[error("reading the source failed: {0}")]
    Source(io::Error),
    #[error("writing the destination failed: {0}")]
    Destination(io::Error),
    #[error("probe state unreadable: {0}")]
    Probe(io::Error),
}

/// The source of a leg as the probe sees it: `splice`'s socket `index`.
#[derive(Clone, Copy)]
pub struct Spliced<'a> {
    pub splice: &'a Splice,
    pub index: usize,
}

impl Spliced<'_> {
    fn route(&self) -> Result<Route, LegError> {
        self.splice.route(self.index).map_err(LegError::Probe)
    }
}

/// One direction of a connection.
pub struct Leg<R, W> {
    source: R,
    destination: W,
    destination_fd: RawFd,
    /// `bytes_handed_to_tcp(destination)` when the leg was made.
    baseline: u64,
    read: u64,
    written: u64,
    buffer: Vec<u8>,
    /// The destination's peer sent FIN (seen once, it stays so).
    destination_half_closed: bool,
}

enum Event {
    Read(io::Result<usize>),
    Tick,
}

impl<R, W> Leg<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Makes a leg. Must happen before anything is written to `destination`
    /// (by userspace or the probe): it takes the baseline the drain counts
    /// from. `destination_fd` is the socket behind `destination`, which must
    /// outlive the leg. `buffer` is the initial userspace buffer: small for a
    /// spliced leg (it grows if the probe passes bytes up), large for a
    /// copied one.
    pub fn new(
        source: R,
        destination: W,
        destination_fd: BorrowedFd<'_>,
        buffer: usize,
    ) -> io::Result<Self> {
        Ok(Self {
            source,
            destination,
            destination_fd: destination_fd.as_raw_fd(),
            baseline: socket::bytes_handed_to_tcp(destination_fd)?,
            read: 0,
            written: 0,
            buffer: vec![0; buffer.clamp(1, MAX_BUFFER)],
            destination_half_closed: false,
        })
    }

    fn destination_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `new`'s contract: the socket outlives the leg.
        unsafe { BorrowedFd::borrow_raw(self.destination_fd) }
    }

    /// Bytes userspace read from the source.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// Bytes userspace wrote to the destination.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Writes bytes already read from the source elsewhere (e.g. the first
    /// packet a router routed on) to the destination.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), LegError> {
        Self::send_all(
            &mut self.destination,
            self.destination_fd,
            &mut self.destination_half_closed,
            &mut self.written,
            bytes,
        )
        .await
    }

    /// Writes all of `bytes` to the destination, counting them in `written`.
    ///
    /// glommio waits for room with an io_uring poll, which always reports
    /// POLLRDHUP: once the destination's peer half-closed, that wait returns at
    /// once and the writer spins at 100% CPU until room appears (seen with a
    /// client that sent, shut down its side, and read only later). So after a
    /// peer FIN the leg polls for room on a timer instead, and a wait that
    /// lasts re-checks the peer's state every [`SEND_WAIT_SLICE`].
    async fn send_all(
        destination: &mut W,
        fd: RawFd,
        half_closed: &mut bool,
        written: &mut u64,
        mut bytes: &[u8],
    ) -> Result<(), LegError> {
        // SAFETY: `Leg::new`'s contract: the socket outlives the leg.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut pause = MIN_SEND_PAUSE;
        while !bytes.is_empty() {
            let sent = match socket::send_nonblocking(fd, bytes) {
                Ok(n) => Some(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
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
                        Some(result) => Some(result.map_err(LegError::Destination)?),
                        None => None,
                    }
                }
            };
            if let Some(n) = sent {
                bytes = &bytes[n..];
                *written += n as u64;
                pause = MIN_SEND_PAUSE;
            }
        }
        Ok(())
    }

    /// Bytes the probe redirected that the destination's TCP took.
    fn redirected_delivered(&self) -> Result<u64, LegError> {
        let handed = socket::bytes_handed_to_tcp(self.destination_fd())
            .map_err(LegError::Destination)?;
        Ok(handed.saturating_sub(self.baseline + self.written))
    }

    /// Gives the probe credit for `limit` bytes beyond what the destination
    /// took, and reports what userspace forwarded.
    fn grant_credit(&self, spliced: Spliced<'_>) -> Result<u64, LegError> {
        let credit = self.redirected_delivered()? + spliced.splice.in_flight_limit();
        spliced
            .splice
            .set_control(
                spliced.index,
                Control {
                    credit,
                    forwarded: self.read,
                },
            )
            .map_err(LegError::Probe)?;
        Ok(credit)
    }

    /// Forwards until the source's end of stream, waits until the
    /// destination took every byte, and shuts the destination down for
    /// writing. `spliced` is the source's place in the probe, if it has one.
    pub async fn run(&mut self, spliced: Option<Spliced<'_>>) -> Result<(), LegError> {
        let mut pacer = spliced.map(|s| Pacer::new(s.splice.in_flight_limit()));
        let mut eof_at = None;
        loop {
            let event = match &pacer {
                Some(pacer) => {
                    let read = async { Event::Read(self.source.read(&mut self.buffer).await) };
                    let tick = async {
                        glommio::timer::sleep(pacer.interval).await;
                        Event::Tick
                    };
                    future::or(read, tick).await
                }
                None => Event::Read(self.source.read(&mut self.buffer).await),
            };
            let n = match event {
                Event::Tick => {
                    let (pacer, spliced) = (pacer.as_mut().expect("ticks"), spliced.expect("ticks"));
                    let route = spliced.route()?;
                    if pacer.tick(&route, spliced.splice.in_flight_limit()) {
                        pacer.credit = self.grant_credit(spliced)?;
                    }
                    continue;
                }
                Event::Read(Ok(0)) => {
                    // End of stream, unless bytes the probe passed up are
                    // still on their way to the receive queue.
                    let Some(spliced) = spliced else { break };
                    if spliced.route()?.passed <= self.read {
                        break;
                    }
                    let since = *eof_at.get_or_insert_with(Instant::now);
                    if since.elapsed() > PASSED_BYTES_TIMEOUT {
                        return Err(LegError::Source(io::Error::other(
                            "bytes passed up by the probe never became readable",
                        )));
                    }
                    glommio::timer::sleep(Duration::from_micros(200)).await;
                    continue;
                }
                Event::Read(Ok(n)) => n,
                Event::Read(Err(e)) if retry(&e) => continue,
                Event::Read(Err(e)) => return Err(LegError::Source(e)),
            };
            self.read += n as u64;
            let full = n == self.buffer.len();
            Self::send_all(
                &mut self.destination,
                self.destination_fd,
                &mut self.destination_half_closed,
                &mut self.written,
                &self.buffer[..n],
            )
            .await?;
            if full && self.buffer.len() < MAX_BUFFER {
                self.buffer.resize((self.buffer.len() * 4).min(MAX_BUFFER), 0);
            }
            if let (Some(spliced), Some(pacer)) = (spliced, pacer.as_mut()) {
                // The probe waits for this report before it redirects again.
                pacer.credit = self.grant_credit(spliced)?;
                pacer.interval = MIN_TICK;
            }
        }
        let redirected = match spliced {
            Some(spliced) => spliced.route()?.redirected,
            None => 0,
        };
        self.wait_handed_to_tcp(self.written + redirected).await?;
        self.destination
            .close()
            .await
            .map_err(LegError::Destination)
    }

    /// Waits until the destination's TCP send queue took `target` bytes
    /// since the baseline, or fails if the destination died meanwhile.
    async fn wait_handed_to_tcp(&self, target: u64) -> Result<(), LegError> {
        let mut pause = Duration::from_micros(50);
        loop {
            let fd = self.destination_fd();
            let handed = socket::bytes_handed_to_tcp(fd)
                .map_err(LegError::Destination)?
                .saturating_sub(self.baseline);
            if handed >= target {
                return Ok(());
            }
            if let Some(e) = socket::take_error(fd).map_err(LegError::Destination)? {
                return Err(LegError::Destination(e));
            }
            let state = socket::tcp_info(fd)
                .map_err(LegError::Destination)?
                .tcpi_state;
            if state == tcp_state::CLOSE {
                return Err(LegError::Destination(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("destination closed with {handed} of {target} bytes handed over"),
                )));
            }
            glommio::timer::sleep(pause).await;
            pause = (pause * 2).min(MAX_DRAIN_PAUSE);
        }
    }
}

/// When a spliced leg checks the probe's credit: often while bytes flow,
/// rarely when idle (a burst that outruns it makes the probe pass bytes up,
/// which wakes the leg anyway).
struct Pacer {
    interval: Duration,
    credit: u64,
    last_redirected: u64,
}

impl Pacer {
    /// `credit`: what the splice started with.
    fn new(credit: u64) -> Self {
        Self {
            interval: MIN_TICK * 4,
            credit,
            last_redirected: 0,
        }
    }

    /// Adapts the interval to the rate seen; returns whether the credit
    /// needs renewing (less than half of `limit` left).
    fn tick(&mut self, route: &Route, limit: u64) -> bool {
        let grew = route.redirected - self.last_redirected.min(route.redirected);
        self.last_redirected = route.redirected;
        if grew > limit / 4 {
            self.interval = (self.interval / 2).max(MIN_TICK);
        } else if grew < limit / 16 {
            self.interval = (self.interval * 2).min(MAX_TICK);
        }
        route.redirected + limit / 2 > self.credit
    }
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
