//! Raft snapshots of a copyset, streamed: memory stays flat in the size of the copyset.
//!
//! A snapshot is the copyset's chunks as they are plus the last applied log id; applying is
//! idempotent (see [`crate::statemachine`]), so its data need not be frozen: it is read from
//! the chunk files when it is read, not copied when it is built. Building one (log compaction,
//! every few thousand entries) therefore only syncs the store and records the meta.
//!
//! ```text
//!  image:  "CURVESNP" | version u32 | meta len u32 | meta (bincode) | chunk size u64 |
//!          count u64 | count × (chunk id u64, cow tag u64: 0 for the chunk itself) |
//!          count × (4 KiB meta page + chunk size) bytes: each file as it is on disk, read
//!          from it when that part of the image is read (a file deleted since reads as
//!          zeros, an invalid meta page: the install drops it, and the log's delete after the
//!          snapshot removes it again)
//! ```
//!
//! Each chunk comes before its COW files, and those newest first: copies go into the newest
//! COW file before the chunk changes and merges go from newer files into older ones, so an
//! image read while writes and snapshot deletions go on holds every copy it needs for the log
//! replayed after it. Version 2 images (chunk data only, with (id, sn, epoch, volume) rows)
//! and version 1 (no volume) are still installed.
//!
//! The layout is fixed once the file table is taken, so a leader sending the image in pieces
//! seeks anywhere in it. A follower receives the pieces into a file in its copyset directory
//! and installs from it one file at a time.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use openraft::{BasicNode, SnapshotMeta};

use crate::datastore::{ChunkMeta, DataStore, FileRef, META_PAGE};

const MAGIC: &[u8; 8] = b"CURVESNP";
/// Version 3 carries whole files (meta pages, COW files); 2 added the volume to the chunk
/// table; both older versions are still installed.
const VERSION: u32 = 3;
/// Largest piece read from a chunk file per call.
const PIECE: usize = 1 << 20;
/// Largest meta accepted in a received image.
const MAX_META: usize = 1 << 20;

/// The data of a copyset snapshot: an image read from the chunk files, or one being received.
#[derive(Debug)]
pub struct SnapshotData {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Image(Image),
    Received(File),
}

#[derive(Debug)]
struct Image {
    header: Vec<u8>,
    store: Arc<DataStore>,
    files: Vec<FileRef>,
    file_size: u64,
    pos: u64,
}

impl Image {
    fn len(&self) -> u64 {
        self.header.len() as u64 + self.files.len() as u64 * self.file_size
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let hlen = self.header.len() as u64;
        if self.pos >= self.len() || buf.is_empty() {
            return Ok(0);
        }
        if self.pos < hlen {
            let from = self.pos as usize;
            let n = buf.len().min(self.header.len() - from);
            buf[..n].copy_from_slice(&self.header[from..from + n]);
            self.pos += n as u64;
            return Ok(n);
        }
        let body = self.pos - hlen;
        let (index, within) = (body / self.file_size, body % self.file_size);
        let n = buf.len().min((self.file_size - within) as usize).min(PIECE);
        self.store
            .read_raw(self.files[index as usize], within, &mut buf[..n])
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl SnapshotData {
    /// The image of `store` labelled `meta`: the chunk table now, the data when read.
    pub fn image(store: &Arc<DataStore>, meta: &SnapshotMeta<u64, BasicNode>) -> io::Result<Self> {
        let meta = bincode::serialize(meta).map_err(io::Error::other)?;
        let files = store.files();
        let mut header = Vec::with_capacity(40 + meta.len() + files.len() * 16);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        header.extend_from_slice(&meta);
        header.extend_from_slice(&store.chunk_size().to_le_bytes());
        header.extend_from_slice(&(files.len() as u64).to_le_bytes());
        for f in &files {
            header.extend_from_slice(&f.id.to_le_bytes());
            header.extend_from_slice(&f.cow.unwrap_or(0).to_le_bytes());
        }
        Ok(SnapshotData {
            kind: Kind::Image(Image {
                header,
                store: store.clone(),
                files,
                file_size: META_PAGE + store.chunk_size(),
                pos: 0,
            }),
        })
    }

    /// An empty image to receive into, a file at `path` (replaced).
    pub fn receiving(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(SnapshotData {
            kind: Kind::Received(file),
        })
    }

    /// Writes the image's files into `store` (one file in memory at a time): chunks and
    /// COW files not in the image are deleted; a chunk the store holds with a newer epoch is
    /// kept (the log replays the difference). Returns the meta the image carries.
    pub fn install(&mut self, store: &DataStore) -> io::Result<SnapshotMeta<u64, BasicNode>> {
        self.seek(SeekFrom::Start(0))?;
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        let mut fixed = [0u8; 16];
        self.read_exact(&mut fixed)?;
        if &fixed[..8] != MAGIC {
            return Err(bad("not a copyset snapshot image".into()));
        }
        let version = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes"));
        if !(1..=VERSION).contains(&version) {
            return Err(bad(format!("snapshot image version {version}")));
        }
        let meta_len = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes")) as usize;
        if meta_len > MAX_META {
            return Err(bad(format!("snapshot meta of {meta_len} bytes")));
        }
        let mut meta = vec![0u8; meta_len];
        self.read_exact(&mut meta)?;
        let meta: SnapshotMeta<u64, BasicNode> =
            bincode::deserialize(&meta).map_err(|e| bad(format!("snapshot meta: {e}")))?;
        let mut sizes = [0u8; 16];
        self.read_exact(&mut sizes)?;
        let chunk_size = u64::from_le_bytes(sizes[..8].try_into().expect("8 bytes"));
        let count = u64::from_le_bytes(sizes[8..].try_into().expect("8 bytes"));
        if chunk_size != store.chunk_size() {
            return Err(bad(format!(
                "snapshot of {chunk_size}-byte chunks for a store of {}-byte chunks",
                store.chunk_size()
            )));
        }
        let row_len = match version {
            1 => 24,
            2 => 32,
            _ => 16,
        };
        let mut rows = Vec::new();
        let mut row = [0u8; 32];
        for _ in 0..count {
            self.read_exact(&mut row[..row_len])?;
            let v = |i: usize| u64::from_le_bytes(row[i * 8..i * 8 + 8].try_into().expect("8"));
            rows.push([v(0), v(1), v(2), if row_len == 32 { v(3) } else { 0 }]);
        }
        let keep: std::collections::HashSet<u64> = rows.iter().map(|r| r[0]).collect();
        for id in store.chunk_ids() {
            if !keep.contains(&id) {
                store.delete_chunk(id).map_err(io::Error::other)?;
            }
        }
        let err = io::Error::other;
        if version < 3 {
            let mut data = vec![0u8; chunk_size as usize];
            for [id, sn, epoch, volume] in rows {
                self.read_exact(&mut data)?;
                if store.chunk_meta(id).is_some_and(|m| m.epoch > epoch) {
                    // Newer than the snapshot here: the log replays the difference.
                    continue;
                }
                let meta = ChunkMeta {
                    id,
                    sn,
                    epoch,
                    volume,
                    clone: false,
                };
                store.install_chunk(meta, None, &data).map_err(err)?;
                store.retain_cows(id, &[]).map_err(err)?;
            }
            return Ok(meta);
        }
        let mut data = vec![0u8; (META_PAGE + chunk_size) as usize];
        let mut cows: std::collections::HashMap<u64, Vec<u64>> = Default::default();
        for [id, tag, ..] in &rows {
            self.read_exact(&mut data)?;
            let f = FileRef {
                id: *id,
                cow: (*tag != 0).then_some(*tag),
            };
            store.install_raw(f, &data).map_err(err)?;
            cows.entry(*id).or_default().extend(f.cow);
        }
        for (id, tags) in cows {
            store.retain_cows(id, &tags).map_err(err)?;
        }
        Ok(meta)
    }
}

impl Read for SnapshotData {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.kind {
            Kind::Image(i) => i.read(buf),
            Kind::Received(f) => f.read(buf),
        }
    }
}

impl Write for SnapshotData {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.kind {
            Kind::Image(_) => Err(io::Error::other("a snapshot image is read-only")),
            Kind::Received(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.kind {
            Kind::Image(_) => Ok(()),
            Kind::Received(f) => f.flush(),
        }
    }
}

impl Seek for SnapshotData {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        match &mut self.kind {
            Kind::Received(f) => f.seek(to),
            Kind::Image(i) => {
                let target = match to {
                    SeekFrom::Start(p) => Some(p),
                    SeekFrom::End(d) => i.len().checked_add_signed(d),
                    SeekFrom::Current(d) => i.pos.checked_add_signed(d),
                };
                let p = target.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "seek before the start")
                })?;
                i.pos = p;
                Ok(p)
            }
        }
    }
}

// openraft moves snapshot data through tokio's async traits; the work underneath is a
// bounded read or write of a local file (page cache), done in place.
impl tokio::io::AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this.read(buf.initialize_unfilled())?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.get_mut().write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().flush())
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().flush())
    }
}

impl tokio::io::AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        self.get_mut().seek(position).map(|_| ())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(self.get_mut().stream_position())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunkfilepool::{ChunkFilePool, PoolOptions};
    use crate::datastore::META_PAGE;
    use openraft::testing::log_id;

    const CHUNK: u64 = 64 << 10;

    fn store(dir: &Path) -> Arc<DataStore> {
        let pool = ChunkFilePool::open(
            &dir.join("pool"),
            PoolOptions {
                file_size: CHUNK + META_PAGE,
                target: 0,
            },
        )
        .unwrap();
        Arc::new(DataStore::open(&dir.join("d"), CHUNK, 4096, pool).unwrap())
    }

    fn meta() -> SnapshotMeta<u64, BasicNode> {
        SnapshotMeta {
            last_log_id: Some(log_id(3, 1, 42)),
            last_membership: Default::default(),
            snapshot_id: "3-1-42-1".into(),
        }
    }

    /// A leader's image sent in odd-sized pieces at seeked offsets (as openraft sends it),
    /// received into a file, installed on a follower that had other chunks: the follower ends
    /// with the leader's chunks; a chunk deleted after the table was taken is not installed.
    #[test]
    fn an_image_goes_through_in_pieces_and_installs() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (leader, follower) = (store(a.path()), store(b.path()));
        for id in 0..6u64 {
            let data: Vec<u8> = (0..CHUNK).map(|i| (i as u8) ^ (id as u8 * 37)).collect();
            leader.write_chunk(id, 1, 0, &data, 2).unwrap();
        }
        follower.write_chunk(100, 1, 0, &[9u8; 4096], 1).unwrap();
        follower.write_chunk(3, 1, 0, &[7u8; 4096], 5).unwrap(); // newer epoch: kept
        let mut image = SnapshotData::image(&leader, &meta()).unwrap();
        leader.delete_chunk(4).unwrap();
        let total = image.seek(SeekFrom::End(0)).unwrap();
        assert!(total > 6 * CHUNK);
        let mut received = SnapshotData::receiving(&b.path().join("recv")).unwrap();
        let mut at = 0u64;
        let mut piece = 1000usize;
        while at < total {
            image.seek(SeekFrom::Start(at)).unwrap();
            let mut buf = vec![0u8; piece];
            let n = image.read(&mut buf).unwrap();
            assert!(n > 0);
            received.seek(SeekFrom::Start(at)).unwrap();
            received.write_all(&buf[..n]).unwrap();
            at += n as u64;
            piece = piece * 3 % 200_003 + 1;
        }
        let carried = received.install(&follower).unwrap();
        assert_eq!(carried, meta());
        assert_eq!(follower.chunk_ids(), vec![0, 1, 2, 3, 5]);
        for id in [0u64, 1, 2, 5] {
            let (mut x, mut y) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
            leader.read_chunk(id, 0, &mut x).unwrap();
            follower.read_chunk(id, 0, &mut y).unwrap();
            assert!(x == y, "chunk {id}");
        }
        let mut y = vec![1u8; 4096];
        follower.read_chunk(3, 0, &mut y).unwrap();
        assert_eq!(y, vec![7u8; 4096], "a newer epoch here is kept");
    }

    /// COW files travel with their chunks: the follower reads every snapshot as the leader.
    #[test]
    fn an_image_carries_snapshots() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (leader, follower) = (store(a.path()), store(b.path()));
        leader.write_chunk(1, 0, 0, &[1u8; 8192], 1).unwrap();
        leader.write_chunk(1, 1, 0, &[2u8; 4096], 1).unwrap();
        leader.write_chunk(1, 2, 4096, &[3u8; 4096], 1).unwrap();
        follower.write_chunk(1, 5, 0, &[8u8; 4096], 1).unwrap();
        follower.write_chunk(1, 6, 0, &[9u8; 4096], 1).unwrap(); // a COW file not in the image
        let mut image = SnapshotData::image(&leader, &meta()).unwrap();
        let mut bytes = Vec::new();
        image.read_to_end(&mut bytes).unwrap();
        let mut received = SnapshotData::receiving(&b.path().join("recv")).unwrap();
        received.write_all(&bytes).unwrap();
        received.install(&follower).unwrap();
        assert_eq!(follower.cow_tags(1), vec![1, 2]);
        for sn in [0u64, 1, 2] {
            let (mut x, mut y) = (vec![0u8; 8192], vec![0u8; 8192]);
            leader.read_at(0, 1, sn, 0, &mut x).unwrap();
            follower.read_at(0, 1, sn, 0, &mut y).unwrap();
            assert_eq!(x, y, "snapshot {sn}");
        }
    }

    /// Received images are bytes off the wire: mutated ones are refused or installed, never a
    /// panic, and what installs reads back.
    #[test]
    fn mutated_images_never_panic() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (leader, follower) = (store(a.path()), store(b.path()));
        leader.write_chunk(1, 0, 0, &[1u8; 8192], 1).unwrap();
        leader.write_chunk(1, 1, 0, &[2u8; 4096], 1).unwrap();
        let mut bytes = Vec::new();
        SnapshotData::image(&leader, &meta())
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200 {
            let mut m = bytes.clone();
            // Flip bytes in the header and meta pages (where the parsers look), or truncate.
            for _ in 0..1 + next() % 8 {
                let i = (next() % 9000) as usize % m.len();
                m[i] ^= (next() % 255 + 1) as u8;
            }
            if round % 5 == 0 {
                m.truncate((next() as usize) % m.len());
            }
            let mut r = SnapshotData::receiving(&b.path().join("recv")).unwrap();
            r.write_all(&m).unwrap();
            let _ = r.install(&follower);
        }
    }

    #[test]
    fn garbage_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let mut r = SnapshotData::receiving(&d.path().join("recv")).unwrap();
        r.write_all(b"not an image at all").unwrap();
        assert!(r.install(&s).is_err());
        let mut img = SnapshotData::image(&s, &meta()).unwrap();
        assert!(img.write(b"x").is_err(), "an image is read-only");
        assert!(img.seek(SeekFrom::Current(-1)).is_err());
    }
}
