//! ChunkFilePool: chunk files formatted in advance, so that creating a chunk is a rename.
//!
//! A chunk file written for the first time would allocate its blocks (file-system metadata
//! updates on every first write). The pool holds files already written end to end once with
//! zeroes: taking one is a `rename` into the copyset's directory. Deleting a chunk gives its
//! file back: while the pool is short of its target the file's data is made to read as zeros
//! (unwritten extents, nothing written) and it rejoins the pool; otherwise it is deleted and its
//! space goes back to the file system. A background thread keeps the pool at its target size;
//! when the pool is empty a file is formatted synchronously.
//!
//! Files are named `<n>` inside the pool directory; formatting writes `<n>.tmp` and renames it
//! when complete, so a crash never leaves a half-formatted file in the pool.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// How a pool is sized.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Size of each file: chunk size plus the meta page.
    pub file_size: u64,
    /// Files the pool keeps ready.
    pub target: usize,
}

/// A pool of preformatted chunk files in one directory.
#[derive(Debug)]
pub struct ChunkFilePool {
    shared: Arc<Shared>,
    refill: Mutex<Option<JoinHandle<()>>>,
}

/// What the pool and its refill thread share.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    opts: PoolOptions,
    free: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
    stop: AtomicBool,
    wake: Condvar,
}

impl ChunkFilePool {
    /// Opens (or creates) the pool in `dir`, collects the files already there and starts the
    /// background refill.
    pub fn open(dir: &Path, opts: PoolOptions) -> io::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        let mut free = Vec::new();
        let mut max = 0u64;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                // Formatting was interrupted: start that file again.
                std::fs::remove_file(entry.path())?;
                continue;
            }
            let Ok(n) = name.parse::<u64>() else {
                continue;
            };
            if entry.metadata()?.len() != opts.file_size {
                std::fs::remove_file(entry.path())?;
                continue;
            }
            // Versions before this one gave deleted chunks back with their data: whatever a
            // file held reads as zeros now (a metadata change), or the file goes.
            let zeroed = OpenOptions::new()
                .write(true)
                .open(entry.path())
                .is_ok_and(|f| zero_range(&f, 0, opts.file_size));
            if !zeroed {
                std::fs::remove_file(entry.path())?;
                continue;
            }
            max = max.max(n + 1);
            free.push(entry.path());
        }
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            opts,
            free: Mutex::new(free),
            next: AtomicU64::new(max),
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
        });
        let pool = shared.clone();
        let handle = std::thread::Builder::new()
            .name("chunkfilepool".into())
            .spawn(move || {
                loop {
                    if pool.stop.load(Ordering::Acquire) {
                        return;
                    }
                    if pool.len() < pool.opts.target {
                        match pool.format_one() {
                            Ok(path) => pool.free.lock().push(path),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot format a chunk file");
                                std::thread::sleep(Duration::from_secs(1));
                            }
                        }
                        continue;
                    }
                    let mut g = pool.free.lock();
                    pool.wake.wait_for(&mut g, Duration::from_millis(500));
                }
            })?;
        Ok(Arc::new(ChunkFilePool {
            shared,
            refill: Mutex::new(Some(handle)),
        }))
    }

    /// Files ready now.
    pub fn len(&self) -> usize {
        self.shared.len()
    }

    /// Whether no file is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size of every file of the pool.
    pub fn file_size(&self) -> u64 {
        self.shared.opts.file_size
    }

    /// Moves a formatted file to `dest` (which must not exist), formatting one now if the
    /// pool is empty.
    pub fn take(&self, dest: &Path) -> io::Result<()> {
        self.shared.take(dest)
    }

    /// As [`ChunkFilePool::take`], but when the pool is empty the file is made sparse (its
    /// length set, nothing written) instead of formatted: for COW files, of which only the
    /// units copied are ever read, and which a burst of first writes after a snapshot needs
    /// many of at once.
    pub fn take_sparse(&self, dest: &Path) -> io::Result<()> {
        self.shared.take_sparse(dest)
    }

    /// Takes a chunk file back: its meta page is cleared and it rejoins the pool.
    pub fn give(&self, path: &Path, meta_page: u64) -> io::Result<()> {
        self.shared.give(path, meta_page)
    }
}

impl Shared {
    fn len(&self) -> usize {
        self.free.lock().len()
    }

    fn format_one(&self) -> io::Result<PathBuf> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("{n}.tmp"));
        let path = self.dir.join(n.to_string());
        let f = File::create(&tmp)?;
        crate::pagecache::write_zeroes(&f, 0, self.opts.file_size)?;
        f.sync_all()?;
        // Nothing reads the zeroes: out of the cache, where a file's first writes would find
        // them in folios (see crate::pagecache).
        crate::pagecache::drop_cached(&f)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    fn take(&self, dest: &Path) -> io::Result<()> {
        let src = self.free.lock().pop();
        self.wake.notify_one();
        let src = match src {
            Some(p) => p,
            None => self.format_one()?,
        };
        std::fs::rename(&src, dest)?;
        sync_dir(dest)?;
        Ok(())
    }

    fn take_sparse(&self, dest: &Path) -> io::Result<()> {
        let src = self.free.lock().pop();
        self.wake.notify_one();
        match src {
            Some(p) => std::fs::rename(&p, dest)?,
            None => OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dest)?
                .set_len(self.opts.file_size)?,
        }
        sync_dir(dest)
    }

    fn give(&self, path: &Path, meta_page: u64) -> io::Result<()> {
        // A full pool, or a file whose old data cannot be zeroed cheaply: deleted, its space
        // back to the file system (a chunk taken later must never read another's data).
        let keep = self.len() < self.opts.target && {
            let f = OpenOptions::new().write(true).open(path)?;
            f.write_all_at(&vec![0u8; meta_page as usize], 0)?;
            let zeroed = zero_range(&f, meta_page, self.opts.file_size - meta_page);
            f.sync_data()?;
            crate::pagecache::drop_cached(&f)?;
            zeroed
        };
        if !keep {
            std::fs::remove_file(path)?;
            return sync_dir(path);
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dest = self.dir.join(n.to_string());
        std::fs::rename(path, &dest)?;
        sync_dir(path)?;
        self.free.lock().push(dest);
        Ok(())
    }
}

impl Drop for ChunkFilePool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        // The refill thread holds only the shared part: this never runs on it.
        if let Some(h) = self.refill.lock().take() {
            let _ = h.join();
        }
    }
}

/// Makes `len` bytes at `offset` read as zeros and stay allocated (unwritten extents: a
/// metadata change, nothing written). `false` where the file system cannot.
fn zero_range(f: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor; it touches no memory of ours.
    unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        ) == 0
    }
}

/// fsyncs the directory holding `path`, making a rename into or out of it durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file given back to a pool short of its target reads as zeros when taken again: a new
    /// chunk never reads a deleted one's data.
    #[test]
    fn a_file_given_back_holds_no_old_data() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let opts = PoolOptions {
            file_size: 64 << 10,
            // Never reached while the test runs: every file given back is kept.
            target: 100_000,
        };
        let pool = ChunkFilePool::open(&dir.path().join("pool"), opts).unwrap();
        let chunk = dir.path().join("chunk_1");
        pool.take(&chunk).unwrap();
        std::fs::write(&chunk, vec![7u8; 64 << 10]).unwrap();
        let ino = std::fs::metadata(&chunk).unwrap().ino();
        pool.give(&chunk, 4096).unwrap();
        let found = (0..1000).find_map(|i| {
            let d = dir.path().join(format!("c{i}"));
            pool.take(&d).unwrap();
            (std::fs::metadata(&d).unwrap().ino() == ino).then(|| std::fs::read(&d).unwrap())
        });
        let data = found.expect("the file given back is taken again");
        assert_eq!(data.len(), 64 << 10);
        assert!(data.iter().all(|&b| b == 0), "its old data is gone");
    }

    #[test]
    fn fills_takes_and_recycles() {
        let dir = tempfile::tempdir().unwrap();
        let opts = PoolOptions {
            file_size: 64 << 10,
            target: 3,
        };
        let pool = ChunkFilePool::open(&dir.path().join("pool"), opts.clone()).unwrap();
        let filled = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            pool.len() == 3
        });
        assert!(filled, "the pool refills in the background");
        let dest = dir.path().join("chunk_1");
        pool.take(&dest).unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 64 << 10);
        std::fs::write(dir.path().join("junk"), b"x").unwrap();
        {
            let f = OpenOptions::new().write(true).open(&dest).unwrap();
            f.write_all_at(b"meta", 0).unwrap();
        }
        pool.give(&dest, 4096).unwrap();
        assert!(!dest.exists());
        drop(pool);
        // Reopened, it finds its files again; a leftover .tmp is discarded; a file an older
        // version gave back with its data is zeroed.
        std::fs::write(dir.path().join("pool/99.tmp"), b"half").unwrap();
        let old = std::fs::read_dir(dir.path().join("pool"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_none())
            .unwrap();
        std::fs::write(&old, vec![9u8; 64 << 10]).unwrap();
        let pool = ChunkFilePool::open(&dir.path().join("pool"), opts).unwrap();
        assert!(pool.len() >= 3);
        assert!(!dir.path().join("pool/99.tmp").exists());
        // Every file in the pool reads as zeros.
        for _ in 0..pool.len() {
            let d = dir.path().join("c");
            pool.take(&d).unwrap();
            let b = std::fs::read(&d).unwrap();
            assert!(b.iter().all(|&x| x == 0));
            std::fs::remove_file(&d).unwrap();
        }
        // Empty: take formats synchronously.
        pool.take(&dir.path().join("sync")).unwrap();
    }
}
