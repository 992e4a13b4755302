//! DataStore: the chunk files of one copyset.
//!
//! Each chunk is one file of `META_PAGE + chunk_size` bytes taken from the ChunkFilePool:
//!
//! ```text
//!  0      meta page (4 KiB): magic "CRVCHNK1", version 2, chunk id, sn, epoch, volume, crc32
//!         (version 1, written before volumes were recorded, has no volume: read as 0)
//!  4096   chunk data (chunk_size bytes), written in place
//! ```
//!
//! A chunk exists from its first write (created from the pool) until it is deleted (returned
//! to the pool). Offsets and lengths must be multiples of the page size (4096 or 512) and stay
//! inside the chunk. The epoch of the last writer is recorded in the meta page: a write with an
//! older epoch is refused (fencing of a writer whose session was taken over). The volume a
//! chunk belongs to is recorded at its first write that names one (auth on: from the ticket);
//! a write or read naming another volume is refused.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::chunkfilepool::ChunkFilePool;

/// Size of the meta page at the head of every chunk file.
pub const META_PAGE: u64 = 4096;
const MAGIC: &[u8; 8] = b"CRVCHNK1";
const VERSION: u8 = 2;

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

/// The meta page of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkMeta {
    /// Chunk id.
    pub id: u64,
    /// Sequence number (snapshots).
    pub sn: u64,
    /// Epoch of the last writer.
    pub epoch: u64,
    /// The volume the chunk belongs to (0: not recorded).
    pub volume: u64,
}

impl ChunkMeta {
    fn encode(&self) -> [u8; 45] {
        let mut b = [0u8; 45];
        b[..8].copy_from_slice(MAGIC);
        b[8] = VERSION;
        b[9..17].copy_from_slice(&self.id.to_le_bytes());
        b[17..25].copy_from_slice(&self.sn.to_le_bytes());
        b[25..33].copy_from_slice(&self.epoch.to_le_bytes());
        b[33..41].copy_from_slice(&self.volume.to_le_bytes());
        let crc = crc32fast::hash(&b[..41]);
        b[41..45].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<ChunkMeta> {
        if b.len() < 45 || &b[..8] != MAGIC {
            return None;
        }
        // Version 1: no volume, the crc after the epoch.
        let end = match b[8] {
            1 => 33,
            2 => 41,
            _ => return None,
        };
        let crc = u32::from_le_bytes(b[end..end + 4].try_into().ok()?);
        if crc != crc32fast::hash(&b[..end]) {
            return None;
        }
        let u = |i: usize| b[i..i + 8].try_into().ok().map(u64::from_le_bytes);
        Some(ChunkMeta {
            id: u(9)?,
            sn: u(17)?,
            epoch: u(25)?,
            volume: if end == 41 { u(33)? } else { 0 },
        })
    }
}

struct Chunk {
    file: File,
    meta: Mutex<ChunkMeta>,
}

/// The chunks of one copyset.
pub struct DataStore {
    dir: PathBuf,
    chunk_size: u64,
    page_size: u64,
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

fn chunk_name(id: u64) -> String {
    format!("chunk_{id}")
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
        let mut chunks = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_prefix("chunk_"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(entry.path())?;
            let mut page = [0u8; 64];
            file.read_exact_at(&mut page, 0)?;
            let meta = ChunkMeta::decode(&page)
                .filter(|m| m.id == id)
                .ok_or_else(|| DataStoreError::Corrupt(entry.path()))?;
            chunks.insert(
                id,
                Arc::new(Chunk {
                    file,
                    meta: Mutex::new(meta),
                }),
            );
        }
        Ok(DataStore {
            dir: dir.to_owned(),
            chunk_size,
            page_size,
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

    fn get_or_create(
        &self,
        id: u64,
        sn: u64,
        epoch: u64,
        volume: u64,
    ) -> Result<Arc<Chunk>, DataStoreError> {
        if let Some(c) = self.chunks.read().get(&id) {
            return Ok(c.clone());
        }
        let mut chunks = self.chunks.write();
        if let Some(c) = chunks.get(&id) {
            return Ok(c.clone());
        }
        let path = self.dir.join(chunk_name(id));
        self.pool.take(&path)?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let meta = ChunkMeta {
            id,
            sn,
            epoch,
            volume,
        };
        file.write_all_at(&meta.encode(), 0)?;
        file.sync_data()?;
        let c = Arc::new(Chunk {
            file,
            meta: Mutex::new(meta),
        });
        chunks.insert(id, c.clone());
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
        self.check(offset, data.len() as u64)?;
        let chunk = self.get_or_create(id, sn, epoch, volume)?;
        {
            let mut meta = chunk.meta.lock();
            if volume != 0 && meta.volume != 0 && meta.volume != volume {
                return Err(DataStoreError::WrongVolume {
                    chunk: id,
                    got: volume,
                    have: meta.volume,
                });
            }
            if epoch < meta.epoch {
                return Err(DataStoreError::EpochTooOld {
                    got: epoch,
                    have: meta.epoch,
                });
            }
            if epoch > meta.epoch || (volume != 0 && meta.volume == 0) {
                meta.epoch = epoch;
                if volume != 0 {
                    meta.volume = volume;
                }
                chunk.file.write_all_at(&meta.encode(), 0)?;
            }
        }
        chunk.file.write_all_at(data, META_PAGE + offset)?;
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
        self.check(offset, buf.len() as u64)?;
        let chunk = self
            .chunks
            .read()
            .get(&id)
            .cloned()
            .ok_or(DataStoreError::NotExist(id))?;
        let have = chunk.meta.lock().volume;
        if volume != 0 && have != 0 && have != volume {
            return Err(DataStoreError::WrongVolume {
                chunk: id,
                got: volume,
                have,
            });
        }
        chunk.file.read_exact_at(buf, META_PAGE + offset)?;
        Ok(())
    }

    /// Deletes chunk `id`, returning its file to the pool.
    pub fn delete_chunk(&self, id: u64) -> Result<(), DataStoreError> {
        let chunk = self
            .chunks
            .write()
            .remove(&id)
            .ok_or(DataStoreError::NotExist(id))?;
        drop(chunk);
        self.pool.give(&self.dir.join(chunk_name(id)), META_PAGE)?;
        Ok(())
    }

    /// The meta of chunk `id`, if it exists.
    pub fn chunk_meta(&self, id: u64) -> Option<ChunkMeta> {
        self.chunks.read().get(&id).map(|c| *c.meta.lock())
    }

    /// Ids of every chunk.
    pub fn chunk_ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.chunks.read().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Makes every write so far durable (all chunk files).
    pub fn sync(&self) -> Result<(), DataStoreError> {
        let chunks: Vec<Arc<Chunk>> = self.chunks.read().values().cloned().collect();
        for c in chunks {
            c.file.sync_data()?;
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
            ChunkMeta::decode(&b),
            Some(ChunkMeta {
                id: 3,
                sn: 1,
                epoch: 4,
                volume: 0
            })
        );
        b[8] = 9;
        assert_eq!(ChunkMeta::decode(&b), None);
    }
}
