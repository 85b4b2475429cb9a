//! One router per listen address. The executors bind each address with
//! SO_REUSEPORT (one copy per core), which would also let a second router
//! bind it and the kernel split the connections between the two. So before
//! that, a trial bind without SO_REUSEPORT tells whether another socket
//! already listens there; if so the router refuses to start, naming the
//! process that holds it when /proc shows it (its socket's inode in
//! /proc/net/tcp{,6}, then the process with that inode among its fds).
//! The router's own listeners do not count: a reload may bind an address
//! that overlaps one it is about to shut (a port moved to the wildcard).
use std::{
    fs,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use socket2::{Domain, Protocol, Socket, Type};

/// Fails if another socket listens on `addr` (port 0 is always free).
pub fn check_free(addr: SocketAddr) -> anyhow::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Connections in TIME_WAIT on the port do not count, as for the real bind.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    match socket.bind(&addr.into()) {
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            // This router's own listeners (a reload moving a port between an
            // address and the wildcard binds the new one first) do not count.
            // No listener at all: a connection still bound to the port
            // (being torn down) failed the trial; the real bind decides.
            let listening = listening_inodes(addr);
            let own = socket_inodes(std::path::Path::new("/proc/self/fd"));
            if listening.iter().all(|inode| own.contains(inode)) {
                return Ok(());
            }
            let holder = holder(addr).map_or_else(
                || {
                    "another process (not visible from here: run as its user or root to see which)"
                        .to_owned()
                },
                |(pid, command)| format!("pid {pid} ({command})"),
            );
            anyhow::bail!(
                "cannot listen on {addr}: the address is already listened on by {holder}; \
                 stop it or choose another address (two routers on one address would split \
                 its connections between them)"
            )
        }
        // Anything else (no such address, a port below 1024): the real bind
        // says it.
        _ => Ok(()),
    }
}

/// The process (other than this one) holding a listening socket on `addr`:
/// its pid and command line.
fn holder(addr: SocketAddr) -> Option<(u32, String)> {
    let inodes = listening_inodes(addr);
    if inodes.is_empty() {
        return None;
    }
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let holds = socket_inodes(&entry.path().join("fd"))
            .iter()
            .any(|inode| inodes.contains(inode));
        if holds {
            let command = fs::read(entry.path().join("cmdline"))
                .map(|raw| {
                    raw.split(|&b| b == 0)
                        .filter(|part| !part.is_empty())
                        .map(|part| String::from_utf8_lossy(part).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            return Some((pid, command));
        }
    }
    None
}

/// The inodes of the sockets among the descriptors in `fd_dir` (a
/// process's `/proc/PID/fd`).
fn socket_inodes(fd_dir: &std::path::Path) -> Vec<String> {
    let Ok(fds) = fs::read_dir(fd_dir) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let target = fs::read_link(fd.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?;
            Some(inode.to_owned())
        })
        .collect()
}

/// Inodes of the sockets listening on `addr`'s port at its address or a
/// wildcard (either side's), from /proc/net/tcp and tcp6.
fn listening_inodes(addr: SocketAddr) -> Vec<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st ... inode (the 10th field); 0A is LISTEN.
            let (Some(local), Some(&"0A"), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let Some((ip, port)) = parse_local(local) else {
                continue;
            };
            let same_ip = ip == addr.ip() || ip.is_unspecified() || addr.ip().is_unspecified();
            if port == addr.port() && same_ip {
                inodes.push((*inode).to_owned());
            }
        }
    }
    inodes
}

/// `0100007F:1F90` (IPv4) or 32 hex digits then the port (IPv6): each
/// 32-bit word as the kernel holds it, printed in host order.
fn parse_local(text: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
            .ok()
            .map(u32::to_ne_bytes)
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_addresses_parse() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_local("0100007F:1F90"),
                Some(("127.0.0.1".parse().unwrap(), 8080))
            );
            assert_eq!(
                parse_local("00000000000000000000000001000000:0050"),
                Some(("::1".parse().unwrap(), 80))
            );
        }
        assert_eq!(parse_local("zz:1"), None);
    }

    /// This process's own listener does not count (a reload that moves a
    /// port binds the new address before it shuts the old one); another
    /// process's does (`router/tests/exclusive.rs`, with two routers).
    #[test]
    fn this_process_s_own_listener_does_not_count() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // The trial bind itself fails: the check looked past it.
        let trial = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        trial.set_reuse_address(true).unwrap();
        assert!(trial.bind(&addr.into()).is_err());
        check_free(addr).unwrap();
        drop(listener);
        check_free(addr).unwrap();
    }
}
