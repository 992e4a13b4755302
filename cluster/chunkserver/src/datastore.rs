//! DataStore: the chunk files of one copyset, their snapshot (COW) files and clone state.
//!
//! Each chunk is one file of `META_PAGE + chunk_size` bytes taken from the ChunkFilePool:
//!
//! ```text
//!  chunk_<id>
//!  0      meta page (4 KiB): magic "CRVCHNK1", version, chunk id, sn, epoch, volume, [flags],
//!         crc32; version 3 (clone chunks) adds a flags byte and, at byte 64, the bitmap of
//!         the 4 KiB units already filled (written or copied from the clone's source)
//!         (version 2: no flags; version 1, written before volumes were recorded: no volume)
//!  4096   chunk data (chunk_size bytes), written in place
//!
//!  chunk_<id>_snap_<tag>            a COW file: the chunk's units as they were before the
//!  0      meta page: magic "CRVCOW01", version 1, chunk id, tag, crc32 (of the header and
//!         both bitmaps); at 64 the bitmap of units copied, then the bitmap of the units that
//!         were unfilled (clone chunks: their data was the source's) when copied
//!  4096   copied units at their offsets in the chunk
//! ```
//!
//! A chunk exists from its first write (created from the pool) until it is deleted (returned
//! to the pool). Offsets and lengths must be multiples of the page size (4096 or 512) and stay
//! inside the chunk. The epoch of the last writer is recorded in the meta page: a write with an
//! older epoch is refused (fencing of a writer whose session was taken over). The volume a
//! chunk belongs to is recorded at its first write that names one (auth on: from the ticket);
//! a write or read naming another volume is refused.
//!
//! Snapshots (copy-on-write by sequence number, as the seed designs them). A write carries
//! `sn`, the sequence number of its volume's newest snapshot (0: none). A chunk records the sn
//! it was created with: it does not exist in snapshots up to that one. Its COW files are
//! sorted by tag; the file tagged T holds, for the snapshots after the previous file's tag up
//! to T, the units overwritten since. The first write with a newer sn than every tag (and
//! than the chunk's own sn) starts a file tagged with it; every write copies the units it
//! overwrites into the newest file first, unless already there. Reading snapshot S takes each
//! unit from the first file tagged S or later that holds it, else from the chunk. Deleting
//! snapshots drops the files no live snapshot reads, their units merged into the file before
//! (which reads through them). A snapshot costs nothing until its chunks are written.
//!
//! Clones: a clone chunk records which units are filled; a read answers the units that are
//! not (the client reads them from the clone's source); a write fills the units it covers
//! (whole units); a fill writes only units still unfilled (the background copy of the source,
//! never over a newer write).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::chunkfilepool::ChunkFilePool;
use crate::pagecache;

/// Size of the meta page at the head of every chunk file.
pub const META_PAGE: u64 = 4096;
/// Unit of copy-on-write and of clone fills.
pub const UNIT: u64 = 4096;
const MAGIC: &[u8; 8] = b"CRVCHNK1";
const COW_MAGIC: &[u8; 8] = b"CRVCOW01";
/// Where bitmaps start in a meta page.
const BITMAP_AT: usize = 64;
const FLAG_CLONE: u8 = 1;

/// Why a DataStore operation failed; each maps to a chunk status code.
#[derive(Debug, thiserror::Error)]
pub enum DataStoreError {
    /// Misaligned or out-of-chunk range.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The chunk does not exist.
    #[error("chunk {0} does not exist")]
    NotExist(u64),
    /// The chunk belongs to another volume.
    #[error("chunk {chunk} belongs to volume {have}, not {got}")]
    WrongVolume {
        /// The chunk.
        chunk: u64,
        /// The volume of the request.
        got: u64,
        /// The volume recorded on the chunk.
        have: u64,
    },
    /// The write carries an epoch older than the chunk's.
    #[error("epoch {got} is older than the chunk's {have}")]
    EpochTooOld {
        /// Epoch of the request.
        got: u64,
        /// Epoch recorded on the chunk.
        have: u64,
    },
    /// A meta page that does not verify.
    #[error("chunk file {0} has a corrupt meta page")]
    Corrupt(PathBuf),
    /// The disk failed.
    #[error("disk error")]
    Disk(#[from] std::io::Error),
}

/// A bitmap of the units of a chunk (bit i: unit i), least significant bit first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitmap(Vec<u8>);

impl Bitmap {
    /// `bits` bits, all clear.
    pub fn new(bits: usize) -> Self {
        Bitmap(vec![0; bits.div_ceil(8)])
    }

    /// From bytes (as [`Bitmap::bytes`] gives them).
    pub fn from_bytes(b: &[u8]) -> Self {
        Bitmap(b.to_vec())
    }

    /// Bit `i` (false past the end).
    pub fn get(&self, i: usize) -> bool {
        self.0.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Sets bit `i`.
    pub fn set(&mut self, i: usize) {
        self.0[i / 8] |= 1 << (i % 8);
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether any bit is set.
    pub fn any(&self) -> bool {
        self.0.iter().any(|b| *b != 0)
    }
}

/// The meta page of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkMeta {
    /// Chunk id.
    pub id: u64,
    /// Sequence number of the volume's newest snapshot when the chunk was created: the chunk
    /// does not exist in that snapshot or older ones.
    pub sn: u64,
    /// Epoch of the last writer.
    pub epoch: u64,
    /// The volume the chunk belongs to (0: not recorded).
    pub volume: u64,
    /// A chunk of a clone: units not filled yet read from the clone's source.
    pub clone: bool,
}

impl ChunkMeta {
    /// The meta page's bytes (version 2, or 3 with the filled bitmap for clone chunks).
    fn encode(&self, filled: Option<&Bitmap>) -> Vec<u8> {
        let mut b = vec![0u8; 46];
        b[..8].copy_from_slice(MAGIC);
        b[9..17].copy_from_slice(&self.id.to_le_bytes());
        b[17..25].copy_from_slice(&self.sn.to_le_bytes());
        b[25..33].copy_from_slice(&self.epoch.to_le_bytes());
        b[33..41].copy_from_slice(&self.volume.to_le_bytes());
        match filled.filter(|_| self.clone) {
            None => {
                b[8] = 2;
                let crc = crc32fast::hash(&b[..41]);
                b[41..45].copy_from_slice(&crc.to_le_bytes());
                b.truncate(45);
            }
            Some(map) => {
                b[8] = 3;
                b[41] = FLAG_CLONE;
                let mut h = crc32fast::Hasher::new();
                h.update(&b[..42]);
                h.update(map.bytes());
                b[42..46].copy_from_slice(&h.finalize().to_le_bytes());
                b.resize(BITMAP_AT, 0);
                b.extend_from_slice(map.bytes());
            }
        }
        b
    }

    /// Decodes a meta page; `bitmap_len` is the byte length of a chunk's unit bitmap.
    fn decode(b: &[u8], bitmap_len: usize) -> Option<(ChunkMeta, Option<Bitmap>)> {
        if b.len() < 46 || &b[..8] != MAGIC {
            return None;
        }
        let u = |i: usize| b[i..i + 8].try_into().ok().map(u64::from_le_bytes);
        let crc_at = |i: usize| b[i..i + 4].try_into().ok().map(u32::from_le_bytes);
        let (volume, clone, filled) = match b[8] {
            // Version 1: no volume, the crc after the epoch.
            1 => (crc_at(33)? == crc32fast::hash(&b[..33])).then_some((0, false, None))?,
            2 => (crc_at(41)? == crc32fast::hash(&b[..41])).then_some((u(33)?, false, None))?,
            3 => {
                let map = b.get(BITMAP_AT..BITMAP_AT + bitmap_len)?;
                let mut h = crc32fast::Hasher::new();
                h.update(&b[..42]);
                h.update(map);
                if crc_at(42)? != h.finalize() {
                    return None;
                }
                let clone = b[41] & FLAG_CLONE != 0;
                (u(33)?, clone, clone.then(|| Bitmap::from_bytes(map)))
            }
            _ => return None,
        };
        Some((
            ChunkMeta {
                id: u(9)?,
                sn: u(17)?,
                epoch: u(25)?,
                volume,
                clone,
            },
            filled,
        ))
    }
}

/// A COW file of a chunk.
#[derive(Debug)]
struct CowFile {
    tag: u64,
    file: File,
    copied: Bitmap,
    unfilled: Bitmap,
}

impl CowFile {
    fn encode(&self, id: u64) -> Vec<u8> {
        let mut b = vec![0u8; BITMAP_AT];
        b[..8].copy_from_slice(COW_MAGIC);
        b[8] = 1;
        b[9..17].copy_from_slice(&id.to_le_bytes());
        b[17..25].copy_from_slice(&self.tag.to_le_bytes());
        b.extend_from_slice(self.copied.bytes());
        b.extend_from_slice(self.unfilled.bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..25]);
        h.update(&b[BITMAP_AT..]);
        let crc = h.finalize();
        b[25..29].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// (chunk id, tag, copied, unfilled) of a COW meta page.
    fn decode(b: &[u8], bitmap_len: usize) -> Option<(u64, u64, Bitmap, Bitmap)> {
        if b.len() < BITMAP_AT + 2 * bitmap_len || &b[..8] != COW_MAGIC || b[8] != 1 {
            return None;
        }
        let maps = &b[BITMAP_AT..BITMAP_AT + 2 * bitmap_len];
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..25]);
        h.update(maps);
        if u32::from_le_bytes(b[25..29].try_into().ok()?) != h.finalize() {
            return None;
        }
        let u = |i: usize| b[i..i + 8].try_into().ok().map(u64::from_le_bytes);
        Some((
            u(9)?,
            u(17)?,
            Bitmap::from_bytes(&maps[..bitmap_len]),
            Bitmap::from_bytes(&maps[bitmap_len..]),
        ))
    }
}

/// What a chunk knows besides its data.
#[derive(Debug)]
struct State {
    meta: ChunkMeta,
    /// Clone chunks: the units filled.
    filled: Option<Bitmap>,
    /// COW files, by tag ascending.
    cows: Vec<CowFile>,
}

struct Chunk {
    file: File,
    state: Mutex<State>,
}

/// A write to a chunk.
#[derive(Debug, Clone, Copy)]
pub struct WriteOp<'a> {
    /// The volume (0: none named).
    pub volume: u64,
    /// Chunk id.
    pub id: u64,
    /// Sequence number of the volume's newest snapshot the writer knows (0: none).
    pub sn: u64,
    /// Offset in the chunk.
    pub offset: u64,
    /// Data.
    pub data: &'a [u8],
    /// Epoch of the writer.
    pub epoch: u64,
    /// The chunk belongs to a clone (recorded when the write creates it).
    pub clone: bool,
}

/// A range of a chunk made to read as zeros ([`DataStore::zero`]).
#[derive(Debug, Clone, Copy)]
pub struct ZeroOp {
    /// The volume (0: none named).
    pub volume: u64,
    /// Chunk id.
    pub id: u64,
    /// Sequence number of the volume's newest snapshot the writer knows (0: none).
    pub sn: u64,
    /// Offset in the chunk.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// Epoch of the writer.
    pub epoch: u64,
}

/// One file of a chunk, for raft snapshot images: the chunk itself, or one of its COW files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRef {
    /// Chunk id.
    pub id: u64,
    /// `None`: the chunk; `Some(tag)`: its COW file of that tag.
    pub cow: Option<u64>,
}

/// The chunks of one copyset.
pub struct DataStore {
    dir: PathBuf,
    chunk_size: u64,
    page_size: u64,
    bitmap_len: usize,
    pool: Arc<ChunkFilePool>,
    chunks: RwLock<HashMap<u64, Arc<Chunk>>>,
}

impl std::fmt::Debug for DataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataStore")
            .field("dir", &self.dir)
            .field("chunks", &self.chunks.read().len())
            .finish()
    }
}

/// Opens a chunk (or COW) file for reading and writing, without readahead (see
/// [`crate::pagecache`]).
/// `fallocate(mode)` over `len` bytes at `offset` of `file`, a mode that makes them read as
/// zeros (a punched hole, or unwritten extents); zeros written where the file system has no
/// such mode.
fn zero_range(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor; it touches no memory of ours.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => pagecache::write_zeroes(file, offset, len),
        _ => Err(e),
    }
}

/// `lseek` with SEEK_DATA or SEEK_HOLE from `at`; `None` when no data lies at or after `at`.
fn seek(file: &File, at: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor; it touches no memory of ours.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

fn open_chunk_file(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    pagecache::random_access(&file)?;
    Ok(file)
}

fn chunk_name(id: u64) -> String {
    format!("chunk_{id}")
}

fn cow_name(id: u64, tag: u64) -> String {
    format!("chunk_{id}_snap_{tag}")
}

/// Contiguous runs `[from, to)` of the units in `units` for which `f` holds.
fn runs(units: std::ops::Range<usize>, f: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for u in units {
        if f(u) {
            match out.last_mut() {
                Some(r) if r.1 == u => r.1 = u + 1,
                _ => out.push((u, u + 1)),
            }
        }
    }
    out
}

impl DataStore {
    /// Opens the chunks in `dir` (creating it). `chunk_size` plus [`META_PAGE`] must be the
    /// pool's file size; `page_size` is the I/O alignment (4096 or 512).
    pub fn open(
        dir: &Path,
        chunk_size: u64,
        page_size: u64,
        pool: Arc<ChunkFilePool>,
    ) -> Result<Self, DataStoreError> {
        if pool.file_size() != chunk_size + META_PAGE {
            return Err(DataStoreError::Invalid(format!(
                "pool files of {} bytes do not hold chunks of {chunk_size}",
                pool.file_size()
            )));
        }
        std::fs::create_dir_all(dir)?;
        let bitmap_len = (chunk_size.div_ceil(UNIT) as usize).div_ceil(8);
        let mut chunks = HashMap::new();
        let mut cows: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("chunk_")) else {
                continue;
            };
            if let Some((id, _)) = rest.split_once("_snap_") {
                if let Ok(id) = id.parse::<u64>() {
                    cows.push((id, entry.path()));
                }
                continue;
            }
            let Ok(id) = rest.parse::<u64>() else {
                continue;
            };
            let file = open_chunk_file(&entry.path())?;
            let mut page = vec![0u8; META_PAGE as usize];
            file.read_exact_at(&mut page, 0)?;
            let (meta, filled) = ChunkMeta::decode(&page, bitmap_len)
                .filter(|(m, _)| m.id == id)
                .ok_or_else(|| DataStoreError::Corrupt(entry.path()))?;
            chunks.insert(
                id,
                Arc::new(Chunk {
                    file,
                    state: Mutex::new(State {
                        meta,
                        filled,
                        cows: Vec::new(),
                    }),
                }),
            );
        }
        for (id, path) in cows {
            let file = open_chunk_file(&path)?;
            let mut page = vec![0u8; META_PAGE as usize];
            file.read_exact_at(&mut page, 0)?;
            match (
                CowFile::decode(&page, bitmap_len).filter(|d| d.0 == id),
                chunks.get(&id),
            ) {
                (Some((_, tag, copied, unfilled)), Some(c)) => {
                    let mut st = c.state.lock();
                    st.cows.push(CowFile {
                        tag,
                        file,
                        copied,
                        unfilled,
                    });
                    st.cows.sort_by_key(|c| c.tag);
                }
                // A COW file whose chunk is gone, or one cut short while being started (its
                // meta page is written before anything is copied into it): back to the pool.
                _ => {
                    drop(file);
                    pool.give(&path, META_PAGE)?;
                }
            }
        }
        Ok(DataStore {
            dir: dir.to_owned(),
            chunk_size,
            page_size,
            bitmap_len,
            pool,
            chunks: RwLock::new(chunks),
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DataStoreError> {
        if len == 0 || !offset.is_multiple_of(self.page_size) || !len.is_multiple_of(self.page_size)
        {
            return Err(DataStoreError::Invalid(format!(
                "range {offset}+{len} is not aligned to {} bytes",
                self.page_size
            )));
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.chunk_size)
        {
            return Err(DataStoreError::Invalid(format!(
                "range {offset}+{len} is past the chunk of {} bytes",
                self.chunk_size
            )));
        }
        Ok(())
    }

    /// Whether unit bitmaps fit in a meta page (snapshots and clones need them).
    fn check_bitmaps(&self) -> Result<(), DataStoreError> {
        if BITMAP_AT + 2 * self.bitmap_len > META_PAGE as usize {
            return Err(DataStoreError::Invalid(format!(
                "snapshots and clones need chunks of at most 63 MiB, not {} bytes",
                self.chunk_size
            )));
        }
        Ok(())
    }

    fn units(&self) -> usize {
        self.chunk_size.div_ceil(UNIT) as usize
    }

    fn get(&self, id: u64) -> Result<Arc<Chunk>, DataStoreError> {
        self.chunks
            .read()
            .get(&id)
            .cloned()
            .ok_or(DataStoreError::NotExist(id))
    }

    fn get_or_create(&self, w: &WriteOp<'_>) -> Result<Arc<Chunk>, DataStoreError> {
        if let Some(c) = self.chunks.read().get(&w.id) {
            return Ok(c.clone());
        }
        if w.clone {
            self.check_bitmaps()?;
        }
        let mut chunks = self.chunks.write();
        if let Some(c) = chunks.get(&w.id) {
            return Ok(c.clone());
        }
        let path = self.dir.join(chunk_name(w.id));
        self.pool.take(&path)?;
        let file = open_chunk_file(&path)?;
        let meta = ChunkMeta {
            id: w.id,
            sn: w.sn,
            epoch: w.epoch,
            volume: w.volume,
            clone: w.clone,
        };
        let filled = w.clone.then(|| Bitmap::new(self.units()));
        file.write_all_at(&meta.encode(filled.as_ref()), 0)?;
        file.sync_data()?;
        let c = Arc::new(Chunk {
            file,
            state: Mutex::new(State {
                meta,
                filled,
                cows: Vec::new(),
            }),
        });
        chunks.insert(w.id, c.clone());
        Ok(c)
    }

    /// Writes `data` at `offset` of chunk `id`, creating the chunk on its first write.
    pub fn write_chunk(
        &self,
        id: u64,
        sn: u64,
        offset: u64,
        data: &[u8],
        epoch: u64,
    ) -> Result<(), DataStoreError> {
        self.write_chunk_of(0, id, sn, offset, data, epoch)
    }

    /// As [`Self::write_chunk`] for a write of `volume` (0: none named): the chunk records
    /// the volume of its first such write and refuses any other.
    pub fn write_chunk_of(
        &self,
        volume: u64,
        id: u64,
        sn: u64,
        offset: u64,
        data: &[u8],
        epoch: u64,
    ) -> Result<(), DataStoreError> {
        self.write(&WriteOp {
            volume,
            id,
            sn,
            offset,
            data,
            epoch,
            clone: false,
        })
    }

    /// A write: fencing and volume checks, the units it overwrites copied into the newest
    /// COW file first (a new one when `sn` is newer than the chunk's files), clone units
    /// marked filled.
    pub fn write(&self, w: &WriteOp<'_>) -> Result<(), DataStoreError> {
        let len = w.data.len() as u64;
        self.check(w.offset, len)?;
        let chunk = self.get_or_create(w)?;
        self.modify(&chunk, w, len, |file| {
            pagecache::write_at(file, w.data, META_PAGE + w.offset)
        })
    }

    /// Makes a range of a chunk read as zeros, as a write of zeros would (fencing, volume,
    /// COW and clone units alike), without writing them: a hole is punched in the chunk file
    /// (its blocks go back to the file system), or with `keep_allocated` the range becomes
    /// unwritten extents (allocated, reading zeros). A chunk that does not exist reads as
    /// zeros already and stays so. File systems that can do neither get zeros written.
    pub fn zero(&self, z: &ZeroOp, keep_allocated: bool) -> Result<(), DataStoreError> {
        self.check(z.offset, z.len)?;
        let chunk = match self.get(z.id) {
            Ok(c) => c,
            Err(DataStoreError::NotExist(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let w = WriteOp {
            volume: z.volume,
            id: z.id,
            sn: z.sn,
            offset: z.offset,
            data: &[],
            epoch: z.epoch,
            clone: false,
        };
        let mode = if keep_allocated {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        self.modify(&chunk, &w, z.len, |file| {
            zero_range(file, mode, META_PAGE + z.offset, z.len)
        })
    }

    /// The ranges of chunk `id` within `offset..offset + len` that hold data, as
    /// (offset, len) in the chunk, from the file system's extents (SEEK_DATA/SEEK_HOLE): the
    /// rest reads as zeros. `None`: the chunk does not exist (all of it reads as zeros).
    pub fn data_ranges(
        &self,
        id: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, u64)>>, DataStoreError> {
        self.check(offset, len)?;
        let chunk = match self.get(id) {
            Ok(c) => c,
            Err(DataStoreError::NotExist(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (lo, hi) = (META_PAGE + offset, META_PAGE + offset + len);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = lo;
        while at < hi {
            let Some(data) = seek(&chunk.file, at, libc::SEEK_DATA)? else {
                break;
            };
            if data >= hi {
                break;
            }
            let end = seek(&chunk.file, data, libc::SEEK_HOLE)?
                .unwrap_or(hi)
                .min(hi);
            out.push((data - META_PAGE, end - data));
            at = end;
        }
        Ok(Some(out))
    }

    /// The checks and bookkeeping of a write of `len` bytes at `w.offset` into `chunk` (fencing,
    /// volume, the units it overwrites copied into the newest COW file first, clone units
    /// marked filled), around `body`, which changes the chunk file's data.
    fn modify(
        &self,
        chunk: &Chunk,
        w: &WriteOp<'_>,
        len: u64,
        body: impl FnOnce(&File) -> std::io::Result<()>,
    ) -> Result<(), DataStoreError> {
        let mut guard = chunk.state.lock();
        let st = &mut *guard;
        if w.volume != 0 && st.meta.volume != 0 && st.meta.volume != w.volume {
            return Err(DataStoreError::WrongVolume {
                chunk: w.id,
                got: w.volume,
                have: st.meta.volume,
            });
        }
        if w.epoch < st.meta.epoch {
            return Err(DataStoreError::EpochTooOld {
                got: w.epoch,
                have: st.meta.epoch,
            });
        }
        let units = (w.offset / UNIT) as usize..(w.offset + len).div_ceil(UNIT) as usize;
        if st.filled.is_some()
            && (!w.offset.is_multiple_of(UNIT) || !len.is_multiple_of(UNIT))
            && units
                .clone()
                .any(|u| !st.filled.as_ref().is_some_and(|f| f.get(u)))
        {
            return Err(DataStoreError::Invalid(format!(
                "a write of {}+{len} to unfilled parts of a clone chunk must cover whole {UNIT}-byte units",
                w.offset
            )));
        }
        let top = st.cows.last().map_or(0, |c| c.tag);
        if w.sn > top && w.sn > st.meta.sn {
            self.start_cow(w.id, st, w.sn)?;
        }
        if !st.cows.is_empty() {
            self.copy_on_write(&chunk.file, w.id, st, units.clone())?;
        }
        let meta = &mut st.meta;
        let mut dirty = false;
        if w.epoch > meta.epoch || (w.volume != 0 && meta.volume == 0) {
            meta.epoch = w.epoch;
            if w.volume != 0 {
                meta.volume = w.volume;
            }
            dirty = true;
        }
        if let Some(f) = st.filled.as_mut() {
            for u in units {
                if !f.get(u) {
                    f.set(u);
                    dirty = true;
                }
            }
        }
        if dirty {
            chunk
                .file
                .write_all_at(&st.meta.encode(st.filled.as_ref()), 0)?;
        }
        if st.cows.is_empty() && st.filled.is_none() {
            // The common case: nothing to keep in order with the data, which goes in unlocked.
            drop(guard);
        }
        body(&chunk.file)?;
        Ok(())
    }

    /// A new COW file tagged `tag` (its meta page written before anything is copied).
    fn start_cow(&self, id: u64, st: &mut State, tag: u64) -> Result<(), DataStoreError> {
        self.check_bitmaps()?;
        let path = self.dir.join(cow_name(id, tag));
        self.pool.take_sparse(&path)?;
        let file = open_chunk_file(&path)?;
        let cow = CowFile {
            tag,
            file,
            copied: Bitmap::new(self.units()),
            unfilled: Bitmap::new(self.units()),
        };
        cow.file.write_all_at(&cow.encode(id), 0)?;
        st.cows.push(cow);
        Ok(())
    }

    /// Copies the units of `units` not yet in the newest COW file into it.
    fn copy_on_write(
        &self,
        file: &File,
        id: u64,
        st: &mut State,
        units: std::ops::Range<usize>,
    ) -> Result<(), DataStoreError> {
        let filled = st.filled.clone();
        let cow = st.cows.last_mut().expect("a COW file");
        let todo = runs(units, |u| !cow.copied.get(u));
        if todo.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for (from, to) in todo {
            buf.resize((to - from) * UNIT as usize, 0);
            let at = META_PAGE + from as u64 * UNIT;
            file.read_exact_at(&mut buf, at)?;
            pagecache::write_at(&cow.file, &buf, at)?;
            for u in from..to {
                cow.copied.set(u);
                if filled.as_ref().is_some_and(|f| !f.get(u)) {
                    cow.unfilled.set(u);
                }
            }
        }
        cow.file.write_all_at(&cow.encode(id), 0)?;
        Ok(())
    }

    /// A fill of a clone chunk from its source: `data` goes only where units are unfilled
    /// (never over a write); creates the chunk (as a clone chunk) when missing.
    pub fn fill(
        &self,
        volume: u64,
        id: u64,
        sn: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), DataStoreError> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        if !offset.is_multiple_of(UNIT) || !len.is_multiple_of(UNIT) {
            return Err(DataStoreError::Invalid(format!(
                "a fill of {offset}+{len} must cover whole {UNIT}-byte units"
            )));
        }
        let chunk = self.get_or_create(&WriteOp {
            volume,
            id,
            sn,
            offset,
            data,
            epoch: 0,
            clone: true,
        })?;
        let mut st = chunk.state.lock();
        if volume != 0 && st.meta.volume != 0 && st.meta.volume != volume {
            return Err(DataStoreError::WrongVolume {
                chunk: id,
                got: volume,
                have: st.meta.volume,
            });
        }
        let Some(filled) = st.filled.as_mut() else {
            return Ok(()); // not a clone chunk (flattened long ago, or never one): all filled
        };
        let first = (offset / UNIT) as usize;
        let todo = runs(first..first + (len / UNIT) as usize, |u| !filled.get(u));
        if todo.is_empty() {
            return Ok(());
        }
        for (from, to) in &todo {
            let at = (*from - first) * UNIT as usize;
            let n = (to - from) * UNIT as usize;
            pagecache::write_at(
                &chunk.file,
                &data[at..at + n],
                META_PAGE + *from as u64 * UNIT,
            )?;
            for u in *from..*to {
                filled.set(u);
            }
        }
        chunk
            .file
            .write_all_at(&st.meta.encode(st.filled.as_ref()), 0)?;
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of chunk `id`.
    pub fn read_chunk(&self, id: u64, offset: u64, buf: &mut [u8]) -> Result<(), DataStoreError> {
        self.read_chunk_of(0, id, offset, buf)
    }

    /// As [`Self::read_chunk`] for a read of `volume` (0: none named): a chunk recorded as
    /// another volume's is refused.
    pub fn read_chunk_of(
        &self,
        volume: u64,
        id: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), DataStoreError> {
        self.read_at(volume, id, 0, offset, buf).map(|_| ())
    }

    /// Reads chunk `id` as it is (`sn` 0) or as it was in the snapshot with sequence number
    /// `sn`. Answers the units of the range that are unfilled (clone chunks: the caller reads
    /// them from the clone's source), bit 0 being the unit holding `offset`; `None` when all
    /// are filled. A chunk that did not exist in the snapshot is `NotExist`.
    pub fn read_at(
        &self,
        volume: u64,
        id: u64,
        sn: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Option<Bitmap>, DataStoreError> {
        let len = buf.len() as u64;
        self.check(offset, len)?;
        let chunk = self.get(id)?;
        let st = chunk.state.lock();
        let have = st.meta.volume;
        if volume != 0 && have != 0 && have != volume {
            return Err(DataStoreError::WrongVolume {
                chunk: id,
                got: volume,
                have,
            });
        }
        if sn != 0 && st.meta.sn >= sn {
            return Err(DataStoreError::NotExist(id));
        }
        let first = (offset / UNIT) as usize;
        let units = first..(offset + len).div_ceil(UNIT) as usize;
        let mut unfilled = Bitmap::new(units.len());
        let cows: Vec<&CowFile> = if sn == 0 {
            Vec::new()
        } else {
            st.cows.iter().filter(|c| c.tag >= sn).collect()
        };
        if cows.is_empty() && st.filled.is_none() {
            drop(st);
            chunk.file.read_exact_at(buf, META_PAGE + offset)?;
            return Ok(None);
        }
        for u in units {
            let (lo, hi) = (
                (u as u64 * UNIT).max(offset),
                ((u as u64 + 1) * UNIT).min(offset + len),
            );
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            let (file, is_unfilled) = match cows.iter().find(|c| c.copied.get(u)) {
                Some(c) => (&c.file, c.unfilled.get(u)),
                None => (&chunk.file, st.filled.as_ref().is_some_and(|f| !f.get(u))),
            };
            file.read_exact_at(dst, META_PAGE + lo)?;
            if is_unfilled {
                unfilled.set(u - first);
            }
        }
        Ok(unfilled.any().then_some(unfilled))
    }

    /// Drops what no live snapshot reads any more: every COW file of chunk `id` none of the
    /// snapshots `live` (sequence numbers, of the chunk's volume) reads from, its units merged
    /// into the file before it. Idempotent.
    pub fn delete_snapshots(&self, id: u64, live: &[u64]) -> Result<(), DataStoreError> {
        let Ok(chunk) = self.get(id) else {
            return Ok(());
        };
        let mut st = chunk.state.lock();
        let created = st.meta.sn;
        let cows = std::mem::take(&mut st.cows);
        let mut kept: Vec<CowFile> = Vec::new();
        let mut dropped = Vec::new();
        for cow in cows {
            let from = kept.last().map_or(created, |k| k.tag).max(created);
            if live.iter().any(|s| *s > from && *s <= cow.tag) {
                kept.push(cow);
                continue;
            }
            if let Some(prev) = kept.last_mut() {
                let todo = runs(0..self.units(), |u| {
                    cow.copied.get(u) && !prev.copied.get(u)
                });
                let mut buf = Vec::new();
                for (a, b) in &todo {
                    buf.resize((b - a) * UNIT as usize, 0);
                    let at = META_PAGE + *a as u64 * UNIT;
                    cow.file.read_exact_at(&mut buf, at)?;
                    pagecache::write_at(&prev.file, &buf, at)?;
                    for u in *a..*b {
                        prev.copied.set(u);
                        if cow.unfilled.get(u) {
                            prev.unfilled.set(u);
                        }
                    }
                }
                if !todo.is_empty() {
                    prev.file.write_all_at(&prev.encode(id), 0)?;
                    prev.file.sync_data()?;
                }
            }
            dropped.push(cow.tag);
        }
        st.cows = kept;
        drop(st);
        for tag in dropped {
            self.pool
                .give(&self.dir.join(cow_name(id, tag)), META_PAGE)?;
        }
        Ok(())
    }

    /// Deletes chunk `id` and its COW files, returning them to the pool.
    pub fn delete_chunk(&self, id: u64) -> Result<(), DataStoreError> {
        let chunk = self
            .chunks
            .write()
            .remove(&id)
            .ok_or(DataStoreError::NotExist(id))?;
        let tags: Vec<u64> = chunk.state.lock().cows.iter().map(|c| c.tag).collect();
        drop(chunk);
        for tag in tags {
            self.pool
                .give(&self.dir.join(cow_name(id, tag)), META_PAGE)?;
        }
        self.pool.give(&self.dir.join(chunk_name(id)), META_PAGE)?;
        Ok(())
    }

    /// The meta of chunk `id`, if it exists.
    pub fn chunk_meta(&self, id: u64) -> Option<ChunkMeta> {
        self.chunks.read().get(&id).map(|c| c.state.lock().meta)
    }

    /// Tags of the COW files of chunk `id`, ascending.
    pub fn cow_tags(&self, id: u64) -> Vec<u64> {
        self.chunks
            .read()
            .get(&id)
            .map(|c| c.state.lock().cows.iter().map(|c| c.tag).collect())
            .unwrap_or_default()
    }

    /// Ids of every chunk.
    pub fn chunk_ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.chunks.read().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Every file of the store, for a raft snapshot image: each chunk followed by its COW
    /// files, newest first (the order an image must be read in, see [`crate::snapshot`]).
    pub fn files(&self) -> Vec<FileRef> {
        let mut out = Vec::new();
        for id in self.chunk_ids() {
            out.push(FileRef { id, cow: None });
            for tag in self.cow_tags(id).into_iter().rev() {
                out.push(FileRef { id, cow: Some(tag) });
            }
        }
        out
    }

    /// Reads the bytes of a file at `offset` (meta page included); a file gone since reads
    /// as zeros (an invalid meta page).
    pub fn read_raw(&self, f: FileRef, offset: u64, buf: &mut [u8]) -> Result<(), DataStoreError> {
        let Ok(chunk) = self.get(f.id) else {
            buf.fill(0);
            return Ok(());
        };
        match f.cow {
            None => chunk.file.read_exact_at(buf, offset)?,
            Some(tag) => {
                let st = chunk.state.lock();
                match st.cows.iter().find(|c| c.tag == tag) {
                    Some(c) => c.file.read_exact_at(buf, offset)?,
                    None => buf.fill(0),
                }
            }
        }
        Ok(())
    }

    /// Installs a file of a raft snapshot image (`bytes`: the whole file). A chunk whose meta
    /// page does not verify (deleted while the image was read) is deleted here; a chunk held
    /// here with a newer epoch is kept (the log replays the difference); a COW file of a
    /// chunk not here is skipped.
    pub fn install_raw(&self, f: FileRef, bytes: &[u8]) -> Result<(), DataStoreError> {
        match f.cow {
            None => {
                let Some((meta, filled)) =
                    ChunkMeta::decode(bytes, self.bitmap_len).filter(|(m, _)| m.id == f.id)
                else {
                    return match self.delete_chunk(f.id) {
                        Err(DataStoreError::NotExist(_)) => Ok(()),
                        r => r,
                    };
                };
                if self.chunk_meta(f.id).is_some_and(|m| m.epoch > meta.epoch) {
                    return Ok(());
                }
                self.install_chunk(meta, filled, &bytes[META_PAGE as usize..])
            }
            Some(tag) => {
                let Some((_, _, copied, unfilled)) =
                    CowFile::decode(bytes, self.bitmap_len).filter(|d| d.0 == f.id && d.1 == tag)
                else {
                    return Ok(());
                };
                let Ok(chunk) = self.get(f.id) else {
                    return Ok(());
                };
                let mut st = chunk.state.lock();
                let path = self.dir.join(cow_name(f.id, tag));
                let i = match st.cows.iter().position(|c| c.tag == tag) {
                    Some(i) => i,
                    None => {
                        self.pool.take(&path)?;
                        let file = open_chunk_file(&path)?;
                        st.cows.push(CowFile {
                            tag,
                            file,
                            copied: Bitmap::new(self.units()),
                            unfilled: Bitmap::new(self.units()),
                        });
                        st.cows.sort_by_key(|c| c.tag);
                        st.cows.iter().position(|c| c.tag == tag).expect("pushed")
                    }
                };
                let cow = &mut st.cows[i];
                cow.file.write_all_at(bytes, 0)?;
                cow.copied = copied;
                cow.unfilled = unfilled;
                Ok(())
            }
        }
    }

    /// Writes a whole chunk as given (no COW, no checks): raft snapshot installs.
    pub fn install_chunk(
        &self,
        meta: ChunkMeta,
        filled: Option<Bitmap>,
        data: &[u8],
    ) -> Result<(), DataStoreError> {
        let chunk = self.get_or_create(&WriteOp {
            volume: meta.volume,
            id: meta.id,
            sn: meta.sn,
            offset: 0,
            data,
            epoch: meta.epoch,
            clone: false,
        })?;
        let mut st = chunk.state.lock();
        st.meta = meta;
        st.filled = filled.filter(|_| meta.clone);
        chunk
            .file
            .write_all_at(&st.meta.encode(st.filled.as_ref()), 0)?;
        pagecache::write_sparse(&chunk.file, data, META_PAGE)?;
        Ok(())
    }

    /// Removes the COW files of chunk `id` whose tags are not in `keep` (an installed
    /// snapshot image did not carry them).
    pub fn retain_cows(&self, id: u64, keep: &[u64]) -> Result<(), DataStoreError> {
        let Ok(chunk) = self.get(id) else {
            return Ok(());
        };
        let mut st = chunk.state.lock();
        let mut gone = Vec::new();
        st.cows.retain(|c| {
            let k = keep.contains(&c.tag);
            if !k {
                gone.push(c.tag);
            }
            k
        });
        drop(st);
        for tag in gone {
            self.pool
                .give(&self.dir.join(cow_name(id, tag)), META_PAGE)?;
        }
        Ok(())
    }

    /// Makes every write so far durable (all chunk and COW files).
    pub fn sync(&self) -> Result<(), DataStoreError> {
        let chunks: Vec<Arc<Chunk>> = self.chunks.read().values().cloned().collect();
        for c in chunks {
            c.file.sync_data()?;
            for cow in &c.state.lock().cows {
                cow.file.sync_data()?;
            }
        }
        Ok(())
    }

    /// Path of the file of chunk `id` (for snapshots that copy chunk files).
    pub fn chunk_path(&self, id: u64) -> PathBuf {
        self.dir.join(chunk_name(id))
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// I/O alignment of reads and writes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunkfilepool::PoolOptions;

    const CHUNK: u64 = 256 << 10;

    fn store(dir: &Path) -> DataStore {
        let pool = ChunkFilePool::open(
            &dir.join("pool"),
            PoolOptions {
                file_size: CHUNK + META_PAGE,
                target: 2,
            },
        )
        .unwrap();
        DataStore::open(&dir.join("copyset"), CHUNK, 4096, pool).unwrap()
    }

    #[test]
    fn write_read_delete_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ds = store(dir.path());
        let data = vec![0x5au8; 8192];
        ds.write_chunk(7, 1, 4096, &data, 3).unwrap();
        let mut back = vec![0u8; 8192];
        ds.read_chunk(7, 4096, &mut back).unwrap();
        assert_eq!(back, data);
        let mut zero = vec![1u8; 4096];
        ds.read_chunk(7, 0, &mut zero).unwrap();
        assert!(
            zero.iter().all(|&b| b == 0),
            "unwritten parts of a pool file read as zeroes"
        );
        assert_eq!(
            ds.chunk_meta(7),
            Some(ChunkMeta {
                id: 7,
                sn: 1,
                epoch: 3,
                volume: 0,
                clone: false,
            })
        );
        ds.sync().unwrap();
        drop(ds);
        let ds = store(dir.path());
        assert_eq!(ds.chunk_ids(), vec![7]);
        ds.read_chunk(7, 4096, &mut back).unwrap();
        assert_eq!(back, data);
        ds.delete_chunk(7).unwrap();
        assert!(matches!(
            ds.read_chunk(7, 0, &mut back),
            Err(DataStoreError::NotExist(7))
        ));
        assert!(matches!(
            ds.delete_chunk(7),
            Err(DataStoreError::NotExist(7))
        ));
    }

    #[test]
    fn bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let ds = store(dir.path());
        let e = |r: Result<(), DataStoreError>| r.unwrap_err();
        assert!(matches!(
            e(ds.write_chunk(1, 1, 100, &[0; 4096], 0)),
            DataStoreError::Invalid(_)
        ));
        assert!(matches!(
            e(ds.write_chunk(1, 1, 0, &[0; 100], 0)),
            DataStoreError::Invalid(_)
        ));
        assert!(matches!(
            e(ds.write_chunk(1, 1, CHUNK, &[0; 4096], 0)),
            DataStoreError::Invalid(_)
        ));
        assert!(matches!(
            e(ds.write_chunk(1, 1, u64::MAX - 4095, &[0; 4096], 0)),
            DataStoreError::Invalid(_)
        ));
        ds.write_chunk(1, 1, 0, &[1; 4096], 5).unwrap();
        assert!(matches!(
            e(ds.write_chunk(1, 1, 0, &[2; 4096], 4)),
            DataStoreError::EpochTooOld { got: 4, have: 5 }
        ));
        ds.write_chunk(1, 1, 0, &[3; 4096], 6).unwrap();
        assert_eq!(ds.chunk_meta(1).unwrap().epoch, 6);
    }

    #[test]
    fn corrupt_meta_page_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ds = store(dir.path());
        ds.write_chunk(9, 1, 0, &[1; 4096], 0).unwrap();
        drop(ds);
        let path = dir.path().join("copyset/chunk_9");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", 12).unwrap();
        let pool = ChunkFilePool::open(
            &dir.path().join("pool"),
            PoolOptions {
                file_size: CHUNK + META_PAGE,
                target: 0,
            },
        )
        .unwrap();
        let err = DataStore::open(&dir.path().join("copyset"), CHUNK, 4096, pool).unwrap_err();
        assert!(matches!(err, DataStoreError::Corrupt(_)));
    }

    #[test]
    fn a_chunk_records_its_volume_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let ds = store(dir.path());
        let e = |r: Result<(), DataStoreError>| r.unwrap_err();
        ds.write_chunk_of(5, 1, 1, 0, &[1; 4096], 2).unwrap();
        assert_eq!(ds.chunk_meta(1).unwrap().volume, 5);
        assert!(matches!(
            e(ds.write_chunk_of(6, 1, 1, 0, &[2; 4096], 9)),
            DataStoreError::WrongVolume {
                chunk: 1,
                got: 6,
                have: 5
            }
        ));
        let mut buf = [0u8; 4096];
        assert!(matches!(
            e(ds.read_chunk_of(6, 1, 0, &mut buf)),
            DataStoreError::WrongVolume { .. }
        ));
        ds.read_chunk_of(5, 1, 0, &mut buf).unwrap();
        assert_eq!(buf, [1; 4096]);
        assert_eq!(
            ds.chunk_meta(1).unwrap().epoch,
            2,
            "a refused write changes nothing"
        );
        // A chunk written before volumes were recorded takes the volume of its next write.
        ds.write_chunk(2, 1, 0, &[1; 4096], 1).unwrap();
        ds.write_chunk_of(7, 2, 1, 0, &[1; 4096], 1).unwrap();
        drop(ds);
        let ds = store(dir.path());
        assert_eq!(ds.chunk_meta(2).unwrap().volume, 7);
        assert_eq!(ds.chunk_meta(1).unwrap().volume, 5);
    }

    #[test]
    fn version_1_meta_pages_read_as_no_volume() {
        let mut b = [0u8; 4096];
        b[..8].copy_from_slice(MAGIC);
        b[8] = 1;
        b[9..17].copy_from_slice(&3u64.to_le_bytes());
        b[17..25].copy_from_slice(&1u64.to_le_bytes());
        b[25..33].copy_from_slice(&4u64.to_le_bytes());
        let crc = crc32fast::hash(&b[..33]);
        b[33..37].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            ChunkMeta::decode(&b, 8).map(|d| d.0),
            Some(ChunkMeta {
                id: 3,
                sn: 1,
                epoch: 4,
                volume: 0,
                clone: false,
            })
        );
        b[8] = 9;
        assert_eq!(ChunkMeta::decode(&b, 8), None);
    }

    fn page(v: u8) -> Vec<u8> {
        vec![v; UNIT as usize]
    }

    fn read(ds: &DataStore, id: u64, sn: u64, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        ds.read_at(0, id, sn, offset, &mut b).unwrap();
        b
    }

    /// Allocated bytes of chunk `id`'s file.
    fn allocated(ds: &DataStore, id: u64) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(ds.chunk_path(id)).unwrap().blocks() * 512
    }

    fn zero(
        ds: &DataStore,
        id: u64,
        sn: u64,
        offset: u64,
        len: u64,
        epoch: u64,
    ) -> Result<(), DataStoreError> {
        let z = ZeroOp {
            volume: 0,
            id,
            sn,
            offset,
            len,
            epoch,
        };
        ds.zero(&z, false)
    }

    #[test]
    fn zeroing_punches_holes_keeps_fencing_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let ds = store(dir.path());
        // A chunk that does not exist stays so.
        zero(&ds, 9, 0, 0, CHUNK, 1).unwrap();
        assert!(ds.chunk_meta(9).is_none());
        assert_eq!(ds.data_ranges(9, 0, CHUNK).unwrap(), None);
        ds.write_chunk(1, 0, 0, &vec![5u8; CHUNK as usize], 2)
            .unwrap();
        ds.sync().unwrap();
        let full = allocated(&ds, 1);
        assert!(full >= CHUNK, "written end to end: {full}");
        // A range in the middle: zeros there, the rest kept, the blocks freed.
        zero(&ds, 1, 0, 8192, 16384, 2).unwrap();
        assert_eq!(read(&ds, 1, 0, 4096, 4096), page(5));
        assert_eq!(read(&ds, 1, 0, 8192, 16384), vec![0u8; 16384]);
        assert_eq!(read(&ds, 1, 0, 24576, 4096), page(5));
        assert_eq!(allocated(&ds, 1), full - 16384);
        assert_eq!(
            ds.data_ranges(1, 0, CHUNK).unwrap(),
            Some(vec![(0, 8192), (24576, CHUNK - 24576)])
        );
        assert_eq!(
            ds.data_ranges(1, 8192, 8192).unwrap(),
            Some(vec![]),
            "a range inside the hole holds no data"
        );
        // Fencing as a write: an older epoch is refused and changes nothing.
        assert!(matches!(
            zero(&ds, 1, 0, 0, 4096, 1),
            Err(DataStoreError::EpochTooOld { got: 1, have: 2 })
        ));
        assert_eq!(read(&ds, 1, 0, 0, 4096), page(5));
        // Misaligned and out-of-chunk ranges are refused.
        assert!(matches!(
            zero(&ds, 1, 0, 100, 4096, 2),
            Err(DataStoreError::Invalid(_))
        ));
        assert!(matches!(
            zero(&ds, 1, 0, 0, CHUNK + 4096, 2),
            Err(DataStoreError::Invalid(_))
        ));
        // After a snapshot (sn 1), zeroing copies what it covers first: the snapshot keeps it.
        zero(&ds, 1, 1, 0, CHUNK, 2).unwrap();
        assert_eq!(read(&ds, 1, 0, 0, 4096), vec![0u8; 4096]);
        assert_eq!(read(&ds, 1, 1, 0, 4096), page(5));
        assert_eq!(read(&ds, 1, 1, 8192, 4096), vec![0u8; 4096]);
        assert_eq!(ds.data_ranges(1, 0, CHUNK).unwrap(), Some(vec![]));
        assert_eq!(allocated(&ds, 1), META_PAGE, "only the meta page is left");
        // Zeros that stay allocated (NBD's NO_HOLE): written, then zeroed in place.
        ds.write_chunk(1, 1, 0, &vec![6u8; CHUNK as usize], 2)
            .unwrap();
        ds.sync().unwrap();
        let z = ZeroOp {
            volume: 0,
            id: 1,
            sn: 1,
            offset: 0,
            len: CHUNK,
            epoch: 2,
        };
        ds.zero(&z, true).unwrap();
        assert_eq!(read(&ds, 1, 0, 0, 4096), vec![0u8; 4096]);
        assert!(allocated(&ds, 1) >= CHUNK, "the blocks stay allocated");
        // Reopened: the chunk is there, its data zeros, its epoch kept.
        drop(ds);
        let ds = store(dir.path());
        assert_eq!(
            read(&ds, 1, 0, 0, CHUNK as usize),
            vec![0u8; CHUNK as usize]
        );
        assert_eq!(ds.chunk_meta(1).unwrap().epoch, 2);
    }

    #[test]
    fn a_deleted_chunk_never_lends_its_data_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let ds = store(dir.path());
        // Wait for the pool to be full, then delete more chunks than it keeps.
        assert!(
            (0..500).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                ds.pool.len() == 2
            }),
            "the pool fills"
        );
        for id in 1..=4 {
            ds.write_chunk(id, 0, 0, &vec![id as u8; CHUNK as usize], 1)
                .unwrap();
        }
        for id in 1..=4 {
            ds.delete_chunk(id).unwrap();
        }
        // Four deleted with a target of two (the refill may add one file meanwhile, and be
        // formatting another): the rest went back to the file system.
        let files = std::fs::read_dir(dir.path().join("pool")).unwrap().count();
        assert!(
            files <= 4,
            "deleted files beyond the pool's target are gone: {files}"
        );
        // Chunks made from recycled files read zeros where they were not written.
        for id in 11..=14 {
            ds.write_chunk(id, 0, 0, &page(9), 1).unwrap();
            assert_eq!(
                read(&ds, id, 0, 4096, (CHUNK - 4096) as usize),
                vec![0u8; (CHUNK - 4096) as usize]
            );
        }
    }

    #[test]
    fn snapshots_copy_on_write_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let ds = store(dir.path());
        // Before any snapshot: units 0 and 1 are 1.
        ds.write_chunk(1, 0, 0, &[1; 8192], 1).unwrap();
        assert!(ds.cow_tags(1).is_empty(), "no snapshot: no COW file");
        // Snapshot 1; unit 0 is overwritten twice, unit 2 written first.
        ds.write_chunk(1, 1, 0, &page(2), 1).unwrap();
        ds.write_chunk(1, 1, 0, &page(3), 1).unwrap();
        ds.write_chunk(1, 1, 2 * UNIT, &page(4), 1).unwrap();
        assert_eq!(ds.cow_tags(1), vec![1]);
        // Snapshots 2 and 3 with no write between; then unit 1 overwritten.
        ds.write_chunk(1, 3, UNIT, &page(5), 1).unwrap();
        assert_eq!(ds.cow_tags(1), vec![1, 3]);
        // A chunk created after snapshot 3 is not in it.
        ds.write_chunk(2, 3, 0, &page(6), 1).unwrap();
        let mut b = page(0);
        assert!(matches!(
            ds.read_at(0, 2, 3, 0, &mut b),
            Err(DataStoreError::NotExist(2))
        ));
        assert_eq!(read(&ds, 2, 4, 0, 4096), page(6));
        let at = |sn| read(&ds, 1, sn, 0, 3 * UNIT as usize);
        let cat = |a: u8, b: u8, c: u8| [page(a), page(b), page(c)].concat();
        assert_eq!(at(1), cat(1, 1, 0));
        assert_eq!(at(2), cat(3, 1, 4));
        assert_eq!(at(3), cat(3, 1, 4));
        assert_eq!(at(0), cat(3, 5, 4));
        // A stale writer (sn 1 after snapshot 3) still copies first: snapshot 3 keeps unit 2.
        ds.write_chunk(1, 1, 2 * UNIT, &page(7), 1).unwrap();
        assert_eq!(at(3), cat(3, 1, 4));
        // Survives a reopen.
        drop(ds);
        let ds = store(dir.path());
        let at = |sn| read(&ds, 1, sn, 0, 3 * UNIT as usize);
        assert_eq!(at(1), cat(1, 1, 0));
        assert_eq!(at(3), cat(3, 1, 4));
        assert_eq!(at(0), cat(3, 5, 7));
        // Deleting snapshot 3 (1 lives): file 3 merges into file 1 for what it lacks.
        ds.delete_snapshots(1, &[1]).unwrap();
        assert_eq!(ds.cow_tags(1), vec![1]);
        assert_eq!(at(1), cat(1, 1, 0));
        ds.delete_snapshots(1, &[1]).unwrap(); // idempotent
        assert_eq!(at(1), cat(1, 1, 0));
        ds.delete_snapshots(1, &[]).unwrap();
        assert!(ds.cow_tags(1).is_empty());
        assert!(
            !ds.dir.join(cow_name(1, 1)).exists(),
            "the COW file went back to the pool (or away)"
        );
        assert_eq!(at(0), cat(3, 5, 7));
    }

    #[test]
    fn deleting_the_older_snapshot_keeps_the_newer() {
        let dir = tempfile::tempdir().unwrap();
        let ds = store(dir.path());
        ds.write_chunk(1, 0, 0, &[1; 8192], 1).unwrap();
        ds.write_chunk(1, 1, 0, &page(2), 1).unwrap(); // snap 1 keeps unit 0 = 1
        ds.write_chunk(1, 2, UNIT, &page(3), 1).unwrap(); // snap 2 keeps unit 1 = 1
        ds.delete_snapshots(1, &[2]).unwrap();
        // File 1 served only snapshot 1: gone; snapshot 2 reads unit 0 from file... none
        // before it: unit 0 of snapshot 2 is 2 (the chunk), unit 1 is 1 (file 2).
        assert_eq!(ds.cow_tags(1), vec![2]);
        assert_eq!(
            read(&ds, 1, 2, 0, 8192),
            [page(2), page(1)].concat(),
            "snapshot 2 as it was"
        );
    }

    #[test]
    fn clone_chunks_fill_and_report_unfilled_units() {
        let dir = tempfile::tempdir().unwrap();
        let ds = store(dir.path());
        let w = |offset: u64, data: &[u8], sn: u64| {
            ds.write(&WriteOp {
                volume: 0,
                id: 4,
                sn,
                offset,
                data,
                epoch: 1,
                clone: true,
            })
        };
        w(UNIT, &page(9), 0).unwrap();
        let mut b = vec![0u8; 3 * UNIT as usize];
        let un = ds.read_at(0, 4, 0, 0, &mut b).unwrap().unwrap();
        assert!(un.get(0) && !un.get(1) && un.get(2));
        // A partial unit over an unfilled one needs the source: refused.
        assert!(matches!(
            ds.write(&WriteOp {
                volume: 0,
                id: 4,
                sn: 0,
                offset: 0,
                data: &[1; 512],
                epoch: 1,
                clone: true
            }),
            Err(DataStoreError::Invalid(_))
        ));
        // A fill goes only where nothing was written.
        ds.fill(0, 4, 0, 0, &[5; 3 * UNIT as usize]).unwrap();
        assert_eq!(ds.read_at(0, 4, 0, 0, &mut b).unwrap(), None);
        assert_eq!(b, [page(5), page(9), page(5)].concat());
        // A snapshot of a partly filled clone chunk remembers what was unfilled.
        ds.write(&WriteOp {
            volume: 0,
            id: 5,
            sn: 0,
            offset: 0,
            data: &page(1),
            epoch: 1,
            clone: true,
        })
        .unwrap();
        ds.write(&WriteOp {
            volume: 0,
            id: 5,
            sn: 1,
            offset: UNIT,
            data: &page(2),
            epoch: 1,
            clone: true,
        })
        .unwrap();
        let mut b = vec![0u8; 2 * UNIT as usize];
        let un = ds.read_at(0, 5, 1, 0, &mut b).unwrap().unwrap();
        assert!(
            !un.get(0) && un.get(1),
            "unit 1 was the source's in snapshot 1"
        );
        drop(ds);
        let ds = store(dir.path());
        let un = ds.read_at(0, 5, 1, 0, &mut b).unwrap().unwrap();
        assert!(!un.get(0) && un.get(1));
        assert_eq!(ds.read_at(0, 5, 0, 0, &mut b).unwrap(), None);
    }

    #[test]
    fn raw_files_install_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let a = store(&dir.path().join("a"));
        let b = store(&dir.path().join("b"));
        a.write_chunk(1, 0, 0, &[1; 8192], 1).unwrap();
        a.write_chunk(1, 1, 0, &page(2), 1).unwrap();
        a.write_chunk(1, 2, UNIT, &page(3), 1).unwrap();
        b.write_chunk(9, 0, 0, &page(1), 1).unwrap();
        let files = a.files();
        assert_eq!(
            files,
            vec![
                FileRef { id: 1, cow: None },
                FileRef {
                    id: 1,
                    cow: Some(2)
                },
                FileRef {
                    id: 1,
                    cow: Some(1)
                }
            ]
        );
        let mut buf = vec![0u8; (META_PAGE + CHUNK) as usize];
        for f in files {
            a.read_raw(f, 0, &mut buf).unwrap();
            b.install_raw(f, &buf).unwrap();
        }
        for sn in [0, 1, 2] {
            assert_eq!(
                read(&a, 1, sn, 0, 8192),
                read(&b, 1, sn, 0, 8192),
                "sn {sn}"
            );
        }
        // A file gone since reads as zeros and installs as a deletion.
        b.install_raw(FileRef { id: 9, cow: None }, &vec![0u8; buf.len()])
            .unwrap();
        assert_eq!(b.chunk_ids(), vec![1]);
    }
}
