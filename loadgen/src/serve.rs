//! `loadgen serve`: a backend with a thread per connection (small stacks, so
//! ten thousand idle connections are cheap) that answers each connection's
//! first bytes with a fixed reply.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
};

use anyhow::Context as _;

const STACK: usize = 64 * 1024;

pub fn serve(listen: SocketAddr, reply: Vec<u8>, close: bool) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    let reply: &'static [u8] = reply.leak();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        // Out of threads or memory: drop this connection, keep serving.
        let _ = thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || answer(stream, reply, close));
    }
    Ok(())
}

fn answer(mut stream: TcpStream, reply: &[u8], close: bool) -> std::io::Result<()> {
    let mut buffer = [0u8; 4096];
    if stream.read(&mut buffer)? == 0 {
        return Ok(());
    }
    stream.write_all(reply)?;
    if close {
        return Ok(());
    }
    while stream.read(&mut buffer)? > 0 {}
    Ok(())
}
