//! One direction of a connection (a *leg*): source socket → destination
//! socket.
//!
//! The same loop serves spliced and copied connections. It copies whatever it
//! can read from the source to the destination: everything, for a copied
//! connection; for a spliced one, only what the probe passed up instead of
//! redirecting (normally nothing). At end of stream it does not forward the
//! FIN at once: bytes the probe redirected may still wait in the kernel's
//! queue for the destination, and a FIN now would cut them off (measured:
//! 16 MiB sent, 4.9 MiB delivered). It waits until the destination's TCP
//! send queue has taken every byte (the ones userspace wrote plus the ones
//! the probe redirected), then shuts the destination down for writing.
use std::{
    io,
    os::fd::{BorrowedFd, RawFd},
    time::Duration,
};

use futures_lite::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use thiserror::Error;

use super::socket::{self, tcp_state};

/// Largest userspace buffer a leg grows to.
const MAX_BUFFER: usize = 64 * 1024;
/// Longest pause between two checks of the destination while draining.
const MAX_DRAIN_PAUSE: Duration = Duration::from_millis(10);

/// Why a leg ended early; the connection should then be reset.
#[derive(Debug, Error)]
pub enum LegError {
    #[error("reading the source failed: {0}")]
    Source(io::Error),
    #[error("writing the destination failed: {0}")]
    Destination(io::Error),
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
    /// spliced leg (it grows if the probe ever passes bytes up), large for a
    /// copied one.
    pub fn new(
        source: R,
        destination: W,
        destination_fd: BorrowedFd<'_>,
        buffer: usize,
    ) -> io::Result<Self> {
        use std::os::fd::AsRawFd as _;
        Ok(Self {
            source,
            destination,
            destination_fd: destination_fd.as_raw_fd(),
            baseline: socket::bytes_handed_to_tcp(destination_fd)?,
            read: 0,
            written: 0,
            buffer: vec![0; buffer.clamp(1, MAX_BUFFER)],
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
        self.destination
            .write_all(bytes)
            .await
            .map_err(LegError::Destination)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Forwards until the source's end of stream, waits until the
    /// destination took every byte, and shuts the destination down for
    /// writing. `redirected` reports how many bytes of the source the probe
    /// redirected to the destination (0 for a copied connection); it is read
    /// once the source reached end of stream, when it no longer changes.
    pub async fn run(&mut self, redirected: impl Fn() -> io::Result<u64>) -> Result<(), LegError> {
        loop {
            let n = match self.source.read(&mut self.buffer).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if retry(&e) => continue,
                Err(e) => return Err(LegError::Source(e)),
            };
            self.read += n as u64;
            let full = n == self.buffer.len();
            let (buffer, destination) = (&self.buffer[..n], &mut self.destination);
            destination
                .write_all(buffer)
                .await
                .map_err(LegError::Destination)?;
            self.written += n as u64;
            if full && self.buffer.len() < MAX_BUFFER {
                self.buffer
                    .resize((self.buffer.len() * 4).min(MAX_BUFFER), 0);
            }
        }
        let target = self.written + redirected().map_err(LegError::Source)?;
        self.wait_handed_to_tcp(target).await?;
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
                    format!(
                        "destination closed with {} of {target} bytes handed over",
                        handed
                    ),
                )));
            }
            glommio::timer::sleep(pause).await;
            pause = (pause * 2).min(MAX_DRAIN_PAUSE);
        }
    }
}

/// A sockmap socket's read can report EAGAIN or EINTR when its peer's FIN
/// arrives; both mean "try again".
fn retry(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
