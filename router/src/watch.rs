//! `watch_config`: notices that the configuration file changed, so that the
//! supervisor reloads it exactly as on SIGHUP. A Kubernetes ConfigMap volume
//! is updated by renaming a `..data` symlink over the previous one: the
//! file's own path is never written, so an inotify watch on it would see
//! nothing. The watch reads the file through its path (following the links)
//! every [`POLL`] and compares the bytes with those it read last: one small
//! read a second on the main thread, nothing on the connection path.
use std::{path::PathBuf, time::Duration};

/// How often the file is read again.
pub const POLL: Duration = Duration::from_secs(1);

/// The configuration file and what it held when last read.
pub struct ConfigWatch {
    path: PathBuf,
    seen: Option<Vec<u8>>,
}

impl ConfigWatch {
    /// Starts from what the file holds now: made before the configuration
    /// is built from the file, a change in between is seen at the first poll.
    pub fn new(path: PathBuf) -> Self {
        let seen = std::fs::read(&path).ok();
        Self { path, seen }
    }

    /// Whether the file holds other bytes than at the last call. A file
    /// that cannot be read counts as unchanged (a swap under way, or a
    /// removed file: the running configuration stays, and the next poll
    /// reads it again); a changed file is reported once, valid or not.
    pub fn changed(&mut self) -> bool {
        match std::fs::read(&self.path) {
            Ok(bytes) if self.seen.as_ref() != Some(&bytes) => {
                self.seen = Some(bytes);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink, path::Path};

    use super::*;

    /// Lays `dir` out as the kubelet does: `router.toml -> ..data/router.toml`,
    /// `..data -> <version>`, and swaps `..data` to `version` by a rename.
    fn publish(dir: &Path, version: &str, text: &str) {
        fs::create_dir_all(dir.join(version)).unwrap();
        fs::write(dir.join(version).join("router.toml"), text).unwrap();
        symlink(version, dir.join("..data_tmp")).unwrap();
        fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        if !dir.join("router.toml").exists() {
            symlink("..data/router.toml", dir.join("router.toml")).unwrap();
        }
    }

    #[test]
    fn a_configmap_style_symlink_swap_is_noticed_once_and_the_same_bytes_are_not() {
        let dir = std::env::temp_dir().join(format!("router-watch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        publish(&dir, "..v1", "cores = 1\n");
        let mut watch = ConfigWatch::new(dir.join("router.toml"));
        assert!(!watch.changed(), "nothing changed yet");
        publish(&dir, "..v2", "cores = 2\n");
        assert!(watch.changed(), "the swap to ..v2 is a change");
        assert!(!watch.changed(), "a change is reported once");
        publish(&dir, "..v3", "cores = 2\n");
        assert!(
            !watch.changed(),
            "the same bytes in a new version are no change"
        );
        fs::remove_dir_all(dir.join("..v3")).unwrap();
        assert!(
            !watch.changed(),
            "a dangling link keeps the running configuration"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
