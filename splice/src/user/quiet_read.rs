//! Reading from a spliced socket without answering every wake-up.
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
//! [`MIN_PAUSE`] doubling up to [`MAX_PAUSE`] while wake-ups stay empty;
//! during the pause at most one more wake-up reaches it (glommio's poll is
//! one-shot). An idle connection is not woken, so it never pauses.
//! It never pauses while the probe has passed up bytes not yet read: those
//! are read at once, and the flow control's scan wakes a paused read as soon
//! as it sees such bytes (within its 1–4 ms period). The cost is that a hot
//! stream's end of stream waits up to [`MAX_PAUSE`] to be seen.
//!
//! Measured with iperf3 through the router, before and after, alternating
//! (userspace CPU seconds per GB): 1 stream 0.17–0.21 → 0.05–0.08; 64 streams
//! 0.19–0.20 → 0.08–0.09, with 18.3 → 21.3 Gbit/s. With a 2 ms maximum
//! pause the 64 streams did not gain (0.21 s/GB): 128 legs each re-polling
//! every 2 ms still woke the executor ~4,400 times a second.
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

/// Bounds of a pause; it doubles while empty wake-ups keep coming.
pub const MIN_PAUSE: Duration = Duration::from_micros(250);
pub const MAX_PAUSE: Duration = Duration::from_millis(8);

/// The quiet reads of one leg: how long the next empty wake-up pauses, and
/// the waker the flow control ends a pause with. Kept across reads.
pub struct QuietReads {
    pause: Duration,
    paused: Rc<PausedReader>,
}

impl Default for QuietReads {
    fn default() -> Self {
        Self {
            pause: MIN_PAUSE,
            paused: Rc::default(),
        }
    }
}

impl QuietReads {
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

    /// Counts one wake-up that found nothing; returns the pause to take.
    fn empty_wake(&mut self) -> Duration {
        let pause = self.pause;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        pause
    }

    /// Bytes came: the next empty wake-up pauses briefly again.
    fn bytes_read(&mut self) {
        self.pause = MIN_PAUSE;
    }
}

/// The waker of a read while it pauses, for the flow control to end the
/// pause when the probe passed bytes up.
#[derive(Default)]
pub struct PausedReader {
    waker: Cell<Option<Waker>>,
}

impl PausedReader {
    /// Ends the pause, if the read is paused.
    pub fn wake(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
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
        if passed_up {
            this.pause = None;
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
                if woken && !passed_up {
                    let mut timer = Timer::new(this.reads.empty_wake());
                    // Registers the waker; a fresh timer is not due yet.
                    if Pin::new(&mut timer).poll(cx).is_pending() {
                        this.pause = Some(timer);
                        this.reads.paused.waker.set(Some(cx.waker().clone()));
                    }
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_maximum_and_reset_when_bytes_come() {
        let mut reads = QuietReads::default();
        let pauses: Vec<_> = (0..7).map(|_| reads.empty_wake()).collect();
        assert_eq!(
            pauses,
            [250, 500, 1000, 2000, 4000, 8000, 8000].map(Duration::from_micros)
        );
        assert_eq!(pauses[6], MAX_PAUSE);
        reads.bytes_read();
        assert_eq!(reads.empty_wake(), MIN_PAUSE);
    }
}
