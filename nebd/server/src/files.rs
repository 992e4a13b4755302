//! The File Manager: files part1 opened, by fd, each a volume opened through the seam.
//!
//! A file whose part1 stops sending heartbeats is closed (its device dropped) but keeps its fd
//! and its metafile record; the next request on that fd reopens it first, as in the seed. An
//! explicit CLOSE forgets it. fds survive part2 restarts: they are restored from the metafile.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use curve_blockdev::BlockDevice;
use nebd_proto::FileInfo;
use parking_lot::RwLock;

use crate::metafile::{FileRecord, Metafile};
use crate::volume::VolumeSpec;

struct Entry {
    name: String,
    spec: VolumeSpec,
    /// None while closed by a heartbeat timeout (or if reopening failed).
    device: Option<Arc<dyn BlockDevice>>,
    /// Milliseconds since the manager's epoch of the last heartbeat or open.
    last_beat: AtomicU64,
}

/// Why a file operation failed, as an errno for the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FileError {
    /// Negative errno for the wire.
    pub errno: i32,
    /// What happened.
    pub message: String,
}

fn err(errno: i32, message: impl Into<String>) -> FileError {
    FileError {
        errno,
        message: message.into(),
    }
}

pub use crate::control::FileStatus;

/// Every file part1 has open.
pub struct FileManager {
    files: RwLock<HashMap<u32, Entry>>,
    /// Serialises opens, closes and metafile writes (control path only).
    control: parking_lot::Mutex<()>,
    next_fd: AtomicU32,
    meta: Arc<Metafile>,
    epoch: Instant,
}

impl std::fmt::Debug for FileManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileManager")
            .field("files", &self.files.read().len())
            .finish()
    }
}

fn info(fd: u32, dev: &dyn BlockDevice) -> FileInfo {
    FileInfo {
        fd,
        block_size: dev.info().block_size,
        size: dev.info().size,
    }
}

fn part1_labels(name: &str) -> curve_metrics::Labels {
    crate::metered::labels("", "part1", name)
}

/// `dev`, counted as part1's file `name`.
fn metered(dev: Arc<dyn BlockDevice>, name: &str) -> Arc<dyn BlockDevice> {
    crate::metered::Metered::wrap(dev, &part1_labels(name))
}

impl FileManager {
    /// Restores the files recorded in the metafile, reopening each. A volume that fails to
    /// reopen stays recorded, closed: requests on it retry the open and report its error.
    pub fn restore(meta: Arc<Metafile>) -> Self {
        let epoch = Instant::now();
        let mut files = HashMap::new();
        let mut max_fd = 0;
        for FileRecord { fd, name } in meta.state().files {
            max_fd = max_fd.max(fd);
            let Ok(spec) = name.parse::<VolumeSpec>() else {
                tracing::error!(fd, %name, "metafile names an unparsable volume; skipped");
                continue;
            };
            let device = match spec.open(false) {
                Ok(d) => Some(metered(d, &name)),
                Err(e) => {
                    tracing::error!(fd, %name, error = %crate::exports::error_chain(&e), "cannot reopen");
                    None
                }
            };
            tracing::info!(fd, %name, open = device.is_some(), "file restored");
            files.insert(
                fd,
                Entry {
                    name,
                    spec,
                    device,
                    last_beat: AtomicU64::new(0),
                },
            );
        }
        FileManager {
            files: RwLock::new(files),
            control: parking_lot::Mutex::new(()),
            next_fd: AtomicU32::new(max_fd + 1),
            meta,
            epoch,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Writes the current set of files to the metafile; callers hold `control`, so records
    /// are collected and written in the order of the changes they reflect.
    fn persist(&self) -> Result<(), FileError> {
        let mut records: Vec<FileRecord> = self
            .files
            .read()
            .iter()
            .map(|(fd, e)| FileRecord {
                fd: *fd,
                name: e.name.clone(),
            })
            .collect();
        records.sort_by_key(|r| r.fd);
        self.meta
            .update(|s| s.files = records)
            .map_err(|e| err(-libc::EIO, format!("cannot write the metafile: {e}")))
    }

    /// Opens a volume (or returns the fd it is already open under).
    pub fn open(&self, name: &str) -> Result<FileInfo, FileError> {
        let spec: VolumeSpec = name
            .parse()
            .map_err(|e| err(-libc::EINVAL, format!("{e}")))?;
        let _control = self.control.lock();
        let existing = self
            .files
            .read()
            .iter()
            .find(|(_, e)| e.name == name)
            .map(|(fd, _)| *fd);
        if let Some(fd) = existing {
            let dev = self.device(fd)?;
            return Ok(info(fd, dev.as_ref()));
        }
        let dev = spec
            .open(false)
            .map_err(|e| err(-libc::EIO, crate::exports::error_chain(&e)))?;
        let dev = metered(dev, name);
        let fd = self.next_fd.fetch_add(1, Ordering::Relaxed);
        let i = info(fd, dev.as_ref());
        self.files.write().insert(
            fd,
            Entry {
                name: name.to_owned(),
                spec,
                device: Some(dev),
                last_beat: AtomicU64::new(self.now_ms()),
            },
        );
        if let Err(e) = self.persist() {
            // Not recorded, so not opened: a restart would not know this fd.
            self.files.write().remove(&fd);
            return Err(e);
        }
        tracing::info!(fd, name, "file opened");
        Ok(i)
    }

    /// Closes and forgets a file.
    pub fn close(&self, fd: u32) -> Result<(), FileError> {
        let _control = self.control.lock();
        let Some(entry) = self.files.write().remove(&fd) else {
            return Err(err(-libc::EBADF, format!("no open file with fd {fd}")));
        };
        if !self.files.read().values().any(|e| e.name == entry.name) {
            crate::metered::forget(&part1_labels(&entry.name));
        }
        self.persist()?;
        tracing::info!(fd, "file closed");
        Ok(())
    }

    /// The device of `fd`, reopening it first if a heartbeat timeout closed it.
    pub fn device(&self, fd: u32) -> Result<Arc<dyn BlockDevice>, FileError> {
        {
            let files = self.files.read();
            match files.get(&fd) {
                None => return Err(err(-libc::EBADF, format!("no open file with fd {fd}"))),
                Some(Entry {
                    device: Some(d), ..
                }) => return Ok(d.clone()),
                Some(_) => {}
            }
        }
        let mut files = self.files.write();
        let entry = files
            .get_mut(&fd)
            .ok_or_else(|| err(-libc::EBADF, format!("no open file with fd {fd}")))?;
        if let Some(d) = &entry.device {
            return Ok(d.clone());
        }
        let dev = entry
            .spec
            .open(false)
            .map_err(|e| err(-libc::EIO, crate::exports::error_chain(&e)))?;
        let dev = metered(dev, &entry.name);
        entry.device = Some(dev.clone());
        entry.last_beat.store(self.now_ms(), Ordering::Relaxed);
        tracing::info!(fd, name = %entry.name, "file reopened on request");
        Ok(dev)
    }

    /// Size and block size of `fd`.
    pub fn info(&self, fd: u32) -> Result<FileInfo, FileError> {
        Ok(info(fd, self.device(fd)?.as_ref()))
    }

    /// Grows a file volume to `size` bytes.
    pub fn resize(&self, fd: u32, size: u64) -> Result<FileInfo, FileError> {
        let current = self.device(fd)?;
        let mut files = self.files.write();
        let entry = files
            .get_mut(&fd)
            .ok_or_else(|| err(-libc::EBADF, format!("no open file with fd {fd}")))?;
        let VolumeSpec::File { path, .. } = &entry.spec else {
            return Err(err(-libc::ENOTSUP, "only file: volumes can be resized"));
        };
        if size < current.info().size {
            return Err(err(-libc::EINVAL, "volumes only grow"));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(size))
            .map_err(|e| err(-libc::EIO, format!("cannot grow {}: {e}", path.display())))?;
        let dev = entry
            .spec
            .open(false)
            .map_err(|e| err(-libc::EIO, crate::exports::error_chain(&e)))?;
        let dev = metered(dev, &entry.name);
        entry.device = Some(dev.clone());
        tracing::info!(fd, size, "file resized");
        Ok(info(fd, dev.as_ref()))
    }

    /// Records a heartbeat from part1 for these fds.
    pub fn heartbeat(&self, fds: &[u32]) {
        let now = self.now_ms();
        let files = self.files.read();
        for fd in fds {
            if let Some(e) = files.get(fd) {
                e.last_beat.store(now, Ordering::Relaxed);
            }
        }
    }

    /// Closes open files whose last heartbeat is older than `timeout`; keeps their records.
    pub fn expire(&self, timeout: Duration) -> Vec<u32> {
        let now = self.now_ms();
        let limit = timeout.as_millis() as u64;
        let mut closed = Vec::new();
        let mut files = self.files.write();
        for (fd, e) in files.iter_mut() {
            let age = now.saturating_sub(e.last_beat.load(Ordering::Relaxed));
            // Closing a RAM volume would destroy its data: it stays open.
            let is_ram = matches!(e.spec, VolumeSpec::Mem { .. });
            if e.device.is_some() && age > limit && !is_ram {
                e.device = None;
                closed.push(*fd);
                tracing::info!(fd, name = %e.name, age_ms = age, "file closed: heartbeat timeout");
            }
        }
        closed
    }

    /// Every file.
    pub fn list(&self) -> Vec<FileStatus> {
        let mut v: Vec<_> = self
            .files
            .read()
            .iter()
            .map(|(fd, e)| FileStatus {
                fd: *fd,
                name: e.name.clone(),
                open: e.device.is_some(),
            })
            .collect();
        v.sort_by_key(|s| s.fd);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_close_expire_reopen_restore() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("v.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let name = format!("file:{}", img.display());
        let meta = Arc::new(Metafile::open(dir.path()).unwrap());
        let fm = FileManager::restore(meta.clone());
        let i = fm.open(&name).unwrap();
        assert_eq!(i.size, 1 << 20);
        assert_eq!(fm.open(&name).unwrap().fd, i.fd, "same volume, same fd");
        assert_eq!(fm.expire(Duration::from_secs(60)), Vec::<u32>::new());
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(fm.expire(Duration::from_millis(5)), vec![i.fd]);
        assert!(!fm.list()[0].open);
        fm.device(i.fd).expect("reopens on request");
        assert!(fm.list()[0].open);
        assert_eq!(fm.resize(i.fd, 2 << 20).unwrap().size, 2 << 20);
        assert_eq!(fm.resize(i.fd, 1 << 20).unwrap_err().errno, -libc::EINVAL);
        // A new manager over the same metafile finds the same fd.
        let again = FileManager::restore(Arc::new(Metafile::open(dir.path()).unwrap()));
        assert_eq!(again.info(i.fd).unwrap().size, 2 << 20);
        assert_eq!(again.open("mem:1M").unwrap().fd, i.fd + 1);
        fm.close(i.fd).unwrap();
        assert_eq!(fm.close(i.fd).unwrap_err().errno, -libc::EBADF);
        assert_eq!(fm.device(999).unwrap_err().errno, -libc::EBADF);
        assert_eq!(fm.open("nonsense").unwrap_err().errno, -libc::EINVAL);
    }
}
