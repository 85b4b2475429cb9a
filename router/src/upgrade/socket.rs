//! The upgrade socket's file: bound so that a router never takes another
//! live router's socket, replaced atomically by the router that took over,
//! and removed at exit only by the router it still belongs to.
//!
//! Whoever connects gets live listening sockets, so the file is made
//! `0600` (bound under a `0077` umask) and each peer must run as this
//! process's user or as root (`SO_PEERCRED`).
use std::{
    fs, io,
    os::{
        fd::AsRawFd as _,
        unix::{
            fs::{MetadataExt as _, PermissionsExt as _},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// Where a router offers itself when `--upgrade-socket` is not given
/// (`RuntimeDirectory=router` in the systemd unit makes it writable).
pub const DEFAULT_PATH: &str = "/run/router/upgrade.sock";

/// The bound upgrade socket: its file is removed on drop if it is still
/// this one's.
pub struct Bound {
    path: PathBuf,
    identity: (u64, u64),
}

impl Drop for Bound {
    fn drop(&mut self) {
        // A router that took over replaced the file: leave its own alone.
        if fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds the upgrade socket at `path`. `replace`: the process that holds it
/// now handed over to this one, so its file is replaced; otherwise a live
/// router's socket there is an error (two routers cannot share one path).
/// The file appears complete or not at all: it is bound under a temporary
/// name and renamed.
pub fn bind(path: &Path, replace: bool) -> anyhow::Result<(UnixListener, Bound)> {
    if !replace && UnixStream::connect(path).is_ok() {
        bail!(
            "another router offers its upgrade socket at {}: give this one another \
             --upgrade-socket PATH",
            path.display()
        );
    }
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let temporary = dir.join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&temporary);
    // SAFETY: umask only swaps the process's mask; restored below. The
    // socket file is created with the mask applied.
    let old = unsafe { libc::umask(0o077) };
    let listener = UnixListener::bind(&temporary);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("binding {}", temporary.display()))?;
    fs::rename(&temporary, path).with_context(|| {
        let _ = fs::remove_file(&temporary);
        format!("moving the upgrade socket to {}", path.display())
    })?;
    let metadata = fs::symlink_metadata(path)?;
    Ok((
        listener,
        Bound {
            path: path.to_owned(),
            identity: (metadata.dev(), metadata.ino()),
        },
    ))
}

fn credentials(stream: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// Fails unless the peer runs as this process's user, or as root.
pub fn check_peer(stream: &UnixStream) -> anyhow::Result<()> {
    let cred = credentials(stream).context("reading the upgrade peer's credentials")?;
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    if cred.uid != own && cred.uid != 0 {
        bail!(
            "process {} (uid {}) is not allowed to take over: run the new binary as uid {own}",
            cred.pid,
            cred.uid
        );
    }
    Ok(())
}

/// The process on the other end, if the kernel says.
pub fn peer_pid(stream: &UnixStream) -> Option<u32> {
    credentials(stream).ok().map(|cred| cred.pid as u32)
}
