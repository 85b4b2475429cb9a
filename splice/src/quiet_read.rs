//! Reading from a spliced socket without answering every wake-up.
//!
//! This is for sources that stay glommio streams (the echo demo). A socket
//! taken out of glommio (see [`super::halves`]) waits, once spliced, only
//! for its end, so the data wake-ups never reach its read: no wake-up is
//! empty, and the read never pauses nor parks. What both kinds share: the
//! flow control wakes a waiting read when the probe passed bytes up.
//!
//! A leg keeps a read armed on its spliced source only for the rare bytes the
//! probe passes up and for the end of stream. But the kernel wakes the
//! socket's readers after every verdict run (sk_psock_verdict_data_ready
//! calls the original data_ready even when it redirected everything, so that
//! a FIN is seen), and glommio's readiness poll takes the wake-up's word: each
//! one completes the poll, the read finds nothing (EAGAIN), and a new poll is
//! submitted. Measured during a 21 Gbit/s iperf3 stream: ~7,000 such empty
//! reads per second, with the io_uring submissions and task wake-ups around
//! them the larger part of the router's userspace CPU.
//!
//! So a read woken for nothing pauses before polling the socket again, for
//! [`MIN_PAUSE`] doubling while wake-ups stay empty; during the pause at most
//! one more wake-up reaches it (glommio's poll is one-shot). Once the pause
//! would reach [`PARK_AT`] the stream is a busy one and the read *parks*: it
//! polls the socket no more, and the flow control's scan (every 1–4 ms) wakes
//! it when the probe passed bytes up or when the source ended (the probe's
//! epoll set of ends, [`super::source_ends`], which the kernel does not wake
//! for data). A parked leg costs no wake-up while the kernel forwards.
//! An idle connection is not woken, so it never pauses nor parks.
//! A read never pauses while the probe has passed up bytes not yet read:
//! those are read at once, and the scan wakes a paused or parked read as soon
//! as it sees such bytes. The cost is that a busy stream's end of stream is
//! seen up to a scan period (or a pause) later.
//!
//! Measured with iperf3 through the router, before and after the pause,
//! alternating (userspace CPU seconds per GB): 1 stream 0.17–0.21 →
//! 0.05–0.08; 64 streams 0.19–0.20 → 0.08–0.09, with 18.3 → 21.3 Gbit/s.
//! With pauses alone (up to 8 ms) 64 streams still made ~26,000 io_uring
//! calls a second (each leg re-polling every 8 ms); parked, see the
//! docs/performance.md.
use std::{
    cell::Cell,
    future::Future,
    io,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use futures_lite::AsyncRead;
use glommio::timer::Timer;

use super::forward::Spliced;

/// First pause; it doubles while empty wake-ups keep coming.
pub const MIN_PAUSE: Duration = Duration::from_micros(250);
/// A read whose next pause would be this long parks instead.
pub const PARK_AT: Duration = Duration::from_millis(4);
/// The pause of a read that could not park (the epoll set refused it).
pub const MAX_PAUSE: Duration = Duration::from_millis(8);

/// The quiet reads of one leg: how long the next empty wake-up pauses,
/// whether the leg parked, and the waker the flow control ends a pause with.
/// Kept across reads.
pub struct QuietReads {
    pause: Duration,
    parked: bool,
    paused: Rc<PausedReader>,
}

impl Default for QuietReads {
    fn default() -> Self {
        Self {
            pause: MIN_PAUSE,
            parked: false,
            paused: Rc::default(),
        }
    }
}

/// What a read woken for nothing does next.
#[derive(Debug, PartialEq, Eq)]
enum Quiet {
    Pause(Duration),
    Park,
}

impl QuietReads {
    /// Whether the read parked (it stays so).
    pub fn parked(&self) -> bool {
        self.parked
    }

    /// What the flow control wakes (see [`super::probe::Splice::watch`]).
    pub fn paused_reader(&self) -> Rc<PausedReader> {
        Rc::clone(&self.paused)
    }

    /// Reads from a spliced `source` into `buffer` like
    /// `AsyncReadExt::read`, pausing between empty wake-ups (see the
    /// module). `read` is what the leg read from the source so far.
    pub fn read<'a, R: AsyncRead + Unpin>(
        &'a mut self,
        source: &'a mut R,
        buffer: &'a mut [u8],
        spliced: Spliced<'a>,
        read: u64,
    ) -> QuietRead<'a, R> {
        QuietRead {
            source,
            buffer,
            spliced,
            read,
            reads: self,
            pause: None,
            polled: false,
        }
    }

    /// Counts one wake-up that found nothing; says what to do next.
    fn empty_wake(&mut self) -> Quiet {
        if self.pause >= PARK_AT {
            return Quiet::Park;
        }
        let pause = self.pause;
        self.pause *= 2;
        Quiet::Pause(pause)
    }

    /// Bytes came: the next empty wake-up pauses briefly again.
    fn bytes_read(&mut self) {
        self.pause = MIN_PAUSE;
    }
}

/// The waker of a read while it pauses or parks, for the flow control to
/// wake it when the probe passed bytes up or the source ended.
#[derive(Default)]
pub struct PausedReader {
    waker: Cell<Option<Waker>>,
    /// The source ended (or failed): its reads poll the socket from now on.
    ended: Cell<bool>,
}

impl PausedReader {
    /// Ends the pause, if the read is paused or parked.
    pub fn wake(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// The source ended: wakes the read, which then reads until it sees it.
    pub fn source_ended(&self) {
        self.ended.set(true);
        self.wake();
    }
}

pub struct QuietRead<'a, R> {
    source: &'a mut R,
    buffer: &'a mut [u8],
    spliced: Spliced<'a>,
    read: u64,
    reads: &'a mut QuietReads,
    pause: Option<Timer>,
    /// The source was polled and said Pending: a later poll is a wake-up.
    polled: bool,
}

impl<R: AsyncRead + Unpin> Future for QuietRead<'_, R> {
    type Output = io::Result<usize>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // A broken stream reads at once too: the leg reports it.
        let passed_up = this
            .spliced
            .stream()
            .map_or(true, |stream| stream.passed > this.read);
        let read_now = passed_up || this.reads.paused.ended.get();
        if read_now {
            this.pause = None;
        } else if this.reads.parked {
            this.reads.paused.waker.set(Some(cx.waker().clone()));
            return Poll::Pending;
        } else if let Some(pause) = &mut this.pause {
            if Pin::new(pause).poll(cx).is_pending() {
                this.reads.paused.waker.set(Some(cx.waker().clone()));
                return Poll::Pending;
            }
            this.pause = None;
        }
        this.reads.paused.waker.set(None);
        match Pin::new(&mut *this.source).poll_read(cx, this.buffer) {
            Poll::Ready(result) => {
                if matches!(result, Ok(n) if n > 0) {
                    this.reads.bytes_read();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let woken = std::mem::replace(&mut this.polled, true);
                if woken && !read_now {
                    let pause = match this.reads.empty_wake() {
                        Quiet::Pause(pause) => Some(pause),
                        Quiet::Park => match this.spliced.splice.park(this.spliced.index) {
                            Ok(()) => None,
                            Err(e) => {
                                tracing::debug!("cannot park a spliced read: {e}");
                                Some(MAX_PAUSE)
                            }
                        },
                    };
                    match pause {
                        None => this.reads.parked = true,
                        Some(pause) => {
                            let mut timer = Timer::new(pause);
                            // Registers the waker; a fresh timer is not due yet.
                            if Pin::new(&mut timer).poll(cx).is_pending() {
                                this.pause = Some(timer);
                            }
                        }
                    }
                }
                // The flow control wakes it for passed-up bytes too: a source
                // that waits only for its end (see `halves`) is not woken
                // for them otherwise.
                this.reads.paused.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_until_the_read_parks_and_reset_when_bytes_come() {
        let mut reads = QuietReads::default();
        let quiet: Vec<_> = (0..6).map(|_| reads.empty_wake()).collect();
        let pause = |us| Quiet::Pause(Duration::from_micros(us));
        assert_eq!(
            quiet,
            [
                pause(250),
                pause(500),
                pause(1000),
                pause(2000),
                Quiet::Park,
                Quiet::Park
            ]
        );
        reads.bytes_read();
        assert_eq!(reads.empty_wake(), Quiet::Pause(MIN_PAUSE));
    }
}
