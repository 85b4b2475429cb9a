//! A spliced source's read. A socket taken out of glommio (see
//! [`super::halves`]) waits, once spliced, only for its end: the wake-ups
//! the kernel sends after every verdict run never reach its read, so a busy
//! spliced stream costs userspace nothing. The bytes the probe passes up
//! (past the credit, see [`super::credit`]) would then wait unseen, so the
//! flow control's scan wakes the read when it sees them ([`Waiting::wake`]).
use std::{
    cell::Cell,
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use futures_lite::AsyncRead;

/// The waker of a spliced source's pending read, for the flow control to
/// wake it when the probe passed bytes up.
#[derive(Default)]
pub struct Waiting {
    waker: Cell<Option<Waker>>,
}

impl Waiting {
    /// Wakes the read, if one is pending.
    pub fn wake(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// Reads from a spliced `source` into `buffer` like `AsyncReadExt::read`,
/// leaving its waker with `waiting` while it is pending.
pub fn read<'a, R: AsyncRead + Unpin>(
    source: &'a mut R,
    buffer: &'a mut [u8],
    waiting: &'a Waiting,
) -> SplicedRead<'a, R> {
    SplicedRead {
        source,
        buffer,
        waiting,
    }
}

pub struct SplicedRead<'a, R> {
    source: &'a mut R,
    buffer: &'a mut [u8],
    waiting: &'a Waiting,
}

impl<R: AsyncRead + Unpin> Future for SplicedRead<'_, R> {
    type Output = io::Result<usize>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.waiting.waker.set(None);
        let read = Pin::new(&mut *this.source).poll_read(cx, this.buffer);
        if read.is_pending() {
            this.waiting.waker.set(Some(cx.waker().clone()));
        }
        read
    }
}
