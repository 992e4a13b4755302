//! The data disk's free space, watched: below a reserve (a share of the file system, 5% by
//! default) the disk is *full* for this chunkserver. A full chunkserver takes no new writes as
//! a leader (it hands its copysets' leadership to a follower, and neither campaigns nor takes
//! leadership until space is back), reports the state in its heartbeats (the MDS shows it), and
//! keeps the reserve for what raft still has to write. Nothing is lost: writes go to the
//! copysets' new leaders, on the healthy replicas.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a leader on a full disk answers writes with a redirect (while its leadership
/// moves to a follower) before it answers NOSPACE (no follower could take it: they are full
/// too).
pub const REDIRECT_WHILE_FULL: Duration = Duration::from_secs(10);

/// Free space of a data disk against its reserve.
#[derive(Debug)]
pub struct DiskWatch {
    dir: PathBuf,
    reserve_percent: u8,
    full: AtomicBool,
    since: Mutex<Option<Instant>>,
    capacity: AtomicU64,
    used: AtomicU64,
}

/// What one look at the disk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskState {
    /// Bytes the file system holds.
    pub capacity: u64,
    /// Bytes used (as `df` counts them: what is not available to us).
    pub used: u64,
    /// Free space is below the reserve.
    pub full: bool,
}

/// Total and used bytes of the file system holding `dir` (zeros when it cannot be read).
pub fn usage(dir: &Path) -> (u64, u64) {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs writes into the zeroed struct we pass, for a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return (0, 0);
        }
        let total = s.f_blocks * s.f_frsize;
        (total, total - s.f_bavail * s.f_frsize)
    }
}

impl DiskWatch {
    /// Watches the file system of `dir`, keeping `reserve_percent` of it free.
    pub fn new(dir: &Path, reserve_percent: u8) -> Self {
        DiskWatch {
            dir: dir.to_owned(),
            reserve_percent: reserve_percent.min(50),
            full: AtomicBool::new(false),
            since: Mutex::new(None),
            capacity: AtomicU64::new(0),
            used: AtomicU64::new(0),
        }
    }

    /// Looks at the disk now; returns what it found and whether `full` changed.
    pub fn check(&self) -> (DiskState, bool) {
        let (capacity, used) = usage(&self.dir);
        let free = capacity.saturating_sub(used);
        let full = capacity > 0 && free < capacity / 100 * u64::from(self.reserve_percent);
        self.capacity.store(capacity, Ordering::Relaxed);
        self.used.store(used, Ordering::Relaxed);
        let was = self.full.swap(full, Ordering::AcqRel);
        if full != was {
            *self.since.lock() = full.then(Instant::now);
        }
        (
            DiskState {
                capacity,
                used,
                full,
            },
            full != was,
        )
    }

    /// The state as last checked.
    pub fn state(&self) -> DiskState {
        DiskState {
            capacity: self.capacity.load(Ordering::Relaxed),
            used: self.used.load(Ordering::Relaxed),
            full: self.is_full(),
        }
    }

    /// Free space is below the reserve (as last checked).
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// How long the disk has been full (`None`: it is not).
    pub fn full_for(&self) -> Option<Duration> {
        self.since.lock().map(|t| t.elapsed())
    }

    /// The reserve, percent of the file system.
    pub fn reserve_percent(&self) -> u8 {
        self.reserve_percent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_of_everything_is_full_and_none_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let never = DiskWatch::new(dir.path(), 0);
        let (s, changed) = never.check();
        assert!(s.capacity > 0 && !s.full && !changed);
        assert_eq!(never.full_for(), None);
        // Half the disk kept free: this machine's disk is not that empty... unless it is.
        let half = DiskWatch::new(dir.path(), 50);
        let (s, changed) = half.check();
        let free = s.capacity - s.used;
        assert_eq!(s.full, free < s.capacity / 100 * 50);
        assert_eq!(changed, s.full);
        assert_eq!(half.full_for().is_some(), s.full);
        assert_eq!(half.state(), s);
    }
}
