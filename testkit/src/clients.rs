//! Blocking loopback clients, bounded in time by socket timeouts.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    thread,
    time::Duration,
};

/// No single read or write of a test client may block longer than this
/// (20 s, stretched on slow machines: [`crate::budget`]).
pub fn io_timeout() -> Duration {
    crate::budget::budget(Duration::from_secs(20))
}

pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, io_timeout())?;
    stream.set_read_timeout(Some(io_timeout()))?;
    stream.set_write_timeout(Some(io_timeout()))?;
    Ok(stream)
}

/// Sends `data` on a new connection (from a second thread, so that a large
/// echo cannot deadlock on full buffers), half-closes, and returns every
/// byte received until the server's end of stream.
pub fn send_and_receive(addr: SocketAddr, data: Vec<u8>) -> io::Result<Vec<u8>> {
    let stream = connect(addr)?;
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || -> io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut received = Vec::new();
    let read = (&stream).read_to_end(&mut received);
    sender
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))??;
    read?;
    Ok(received)
}

/// Sends `data`, reads as many bytes back, and only then half-closes and
/// expects the server's end of stream: the FIN reaches the server after the
/// whole exchange (unlike [`send_and_receive`], whose FIN may arrive before
/// the server even accepted). Returns the bytes received before the FIN.
pub fn exchange_then_close(addr: SocketAddr, data: Vec<u8>) -> io::Result<Vec<u8>> {
    let stream = connect(addr)?;
    let mut writer = stream.try_clone()?;
    let expected = data.len();
    let sender = thread::spawn(move || writer.write_all(&data));
    let mut received = vec![0u8; expected];
    let read = (&stream).read_exact(&mut received);
    sender
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))?
        .map_err(|e| io::Error::new(e.kind(), format!("sending: {e}")))?;
    read.map_err(|e| io::Error::new(e.kind(), format!("reading the echo: {e}")))?;
    stream.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    (&stream)
        .read_to_end(&mut rest)
        .map_err(|e| io::Error::new(e.kind(), format!("reading the end of stream: {e}")))?;
    if !rest.is_empty() {
        return Err(io::Error::other(format!(
            "{} unexpected bytes after the echo",
            rest.len()
        )));
    }
    Ok(received)
}
