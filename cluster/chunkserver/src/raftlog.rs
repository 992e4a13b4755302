//! RaftLog: the raft log of one copyset, of our own.
//!
//! ```text
//!  <copyset>/raft/log_<first index, 20 digits>   segments, written with zeroes to `segment_size`
//!                                                 when created (so appends never allocate)
//!      record: len u32 | crc32 u32 | index u64 | entry (len bytes)
//!      `len`'s top bit set: the entry is protobuf (curve.raft.Entry, what this version
//!      writes); clear: bincode of openraft's Entry (logs written before, still read)
//!      a zero `len` ends a segment's records (preallocated space reads as zeroes)
//!  <copyset>/raft/raft_meta                       vote and last purged log id (bincode + crc32,
//!                                                 written tmp + fsync + rename)
//!  <copyset>/raft/free_<n>                        purged segments kept for reuse
//! ```
//!
//! A purged segment is renamed `free_<n>` and becomes the next new segment instead of one
//! written with zeroes: the log's steady state writes each entry once. A reused segment still
//! holds its old records after the new ones; they are older than every index the log will
//! hold again (only purged segments are reused), so recovery, which stops at the first record
//! whose index is not the next one (and at a first record whose index is not the segment's
//! name), never takes them.
//!
//! `append` writes the records of a batch with one `pwrite` and hands the fsync to a flusher
//! thread, which syncs once for every append queued since its last sync and only then
//! reports them flushed: fsyncs are batched across requests, and an entry is never reported
//! durable before it is. `truncate` writes a terminator at the cut and syncs it, so entries
//! past it cannot come back after a crash. Recovery scans the segments up to the first
//! terminator, bad checksum or gap.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::chunkfilepool::sync_dir;
use crate::raft::{StorageError, TypeConfig};

const HEADER: u64 = 16;

/// The top bit of a record's `len`: its entry is protobuf.
const PROTOBUF: u32 = 1 << 31;

/// An entry from its record's payload, in the format the record's `len` names.
fn decode_record(len_field: u32, payload: bytes::Bytes) -> io::Result<Entry<TypeConfig>> {
    if len_field & PROTOBUF != 0 {
        crate::codec::decode_entry(payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    } else {
        bincode::deserialize(&payload).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bincode entry (a log written before protobuf entries): {e}"),
            )
        })
    }
}

static FSYNCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static FLUSHED_APPENDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static APPENDED_ENTRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Raft log fsync batches, the appends they made durable and the entries appended, since
/// start (all logs of the process): appends per fsync and entries per append are the batching
/// factors.
pub fn fsync_stats() -> (u64, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (
        FSYNCS.load(Relaxed),
        FLUSHED_APPENDS.load(Relaxed),
        APPENDED_ENTRIES.load(Relaxed),
    )
}
const META: &str = "raft_meta";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MetaRecord {
    vote: Option<Vote<u64>>,
    last_purged: Option<LogId<u64>>,
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
    log_id: LogId<u64>,
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    write_at: u64,
    size: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Segments by the index of their first record.
    segments: BTreeMap<u64, Segment>,
    entries: BTreeMap<u64, Loc>,
    meta: MetaRecord,
    recent: Recent,
    /// Purged segments ready for reuse (`free_<n>`), each `segment_size` long.
    free: Vec<PathBuf>,
    /// Names the next free segment.
    next_free: u64,
}

/// Purged segments a log keeps for reuse (8 MiB each by default: what a copyset appends
/// between two size-triggered snapshots); more are deleted.
const MAX_FREE_SEGMENTS: usize = 16;

/// Bytes of entries a log keeps in memory after appending them ([`Recent`]).
const RECENT_PER_LOG: u64 = 8 << 20;
/// The same, all logs of the process together.
const RECENT_PER_PROCESS: u64 = 32 << 20;
static RECENT_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The entries a log appended last, kept (their payloads shared, not copied) because the
/// leader's replication to each follower and every replica's apply read them right after the
/// append: from memory, not with a pread and a decode of the record. Bounded per log
/// ([`RECENT_PER_LOG`]) and per process ([`RECENT_PER_PROCESS`]); an entry not here is read
/// from its segment.
#[derive(Debug, Default)]
struct Recent {
    entries: BTreeMap<u64, (Entry<TypeConfig>, u64)>,
    bytes: u64,
}

impl Recent {
    fn forget_oldest(&mut self) -> bool {
        let Some((_, (_, n))) = self.entries.pop_first() else {
            return false;
        };
        self.bytes -= n;
        RECENT_BYTES.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Keeps `entry` (`n` bytes encoded), forgetting this log's oldest to stay in bounds.
    fn keep(&mut self, index: u64, entry: Entry<TypeConfig>, n: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if n > RECENT_PER_LOG {
            return;
        }
        while self.bytes + n > RECENT_PER_LOG {
            self.forget_oldest();
        }
        while RECENT_BYTES.load(Relaxed) + n > RECENT_PER_PROCESS && self.forget_oldest() {}
        if RECENT_BYTES.load(Relaxed) + n > RECENT_PER_PROCESS {
            return; // the other logs hold the process's share
        }
        RECENT_BYTES.fetch_add(n, Relaxed);
        self.bytes += n;
        if let Some((_, old)) = self.entries.insert(index, (entry, n)) {
            self.bytes -= old;
            RECENT_BYTES.fetch_sub(old, Relaxed);
        }
    }

    /// Forgets the entries at `index` and after (a truncation).
    fn forget_from(&mut self, index: u64) {
        let gone = self.entries.split_off(&index);
        self.drop_all(gone);
    }

    /// Forgets the entries up to `index` (a purge).
    fn forget_to(&mut self, index: u64) {
        let kept = self.entries.split_off(&(index + 1));
        let gone = std::mem::replace(&mut self.entries, kept);
        self.drop_all(gone);
    }

    fn drop_all(&mut self, gone: BTreeMap<u64, (Entry<TypeConfig>, u64)>) {
        let n: u64 = gone.values().map(|(_, n)| n).sum();
        self.bytes -= n;
        RECENT_BYTES.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Recent {
    fn drop(&mut self) {
        RECENT_BYTES.fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

struct FlushRequest {
    files: Vec<Arc<File>>,
    callback: LogFlushed<TypeConfig>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    segment_size: u64,
    state: Mutex<State>,
    flusher: Mutex<mpsc::Sender<FlushRequest>>,
    /// Bytes of records appended since the log was opened.
    appended: std::sync::atomic::AtomicU64,
}

/// The raft log of one copyset. Clones share the same log (a clone is its reader).
#[derive(Debug, Clone)]
pub struct RaftLog {
    inner: Arc<Inner>,
}

fn io_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("log_{first:020}"))
}

impl RaftLog {
    /// Opens (or creates) the log in `dir`, recovering what a previous run wrote.
    pub fn open(dir: &Path, segment_size: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut state = State::default();
        if let Ok(bytes) = std::fs::read(dir.join(META)) {
            state.meta = decode_meta(&bytes).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "raft_meta is corrupt")
            })?;
        }
        let mut firsts: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("log_"))
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        firsts.sort_unstable();
        let purged = state.meta.last_purged.map(|l| l.index);
        let mut expect: Option<u64> = None;
        // Terms never decrease along a log: a record of an older term after a newer one is
        // what a truncation cut off (new records of the same size end where an old one
        // starts), never part of the log.
        let mut last_term: Option<u64> = None;
        for first in firsts {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(segment_path(dir, first))?;
            let size = file.metadata()?.len();
            let mut at = 0u64;
            let mut header = [0u8; HEADER as usize];
            while at + HEADER <= size {
                file.read_exact_at(&mut header, at)?;
                let len_field = u32::from_le_bytes(header[0..4].try_into().expect("4"));
                let len = len_field & !PROTOBUF;
                let crc = u32::from_le_bytes(header[4..8].try_into().expect("4"));
                let index = u64::from_le_bytes(header[8..16].try_into().expect("8"));
                if len_field == 0 || at + HEADER + u64::from(len) > size {
                    break;
                }
                let mut payload = vec![0u8; len as usize];
                file.read_exact_at(&mut payload, at + HEADER)?;
                let mut h = crc32fast::Hasher::new();
                h.update(&header[8..16]);
                h.update(&payload);
                if h.finalize() != crc
                    || expect.is_some_and(|e| e != index)
                    || (at == 0 && index != first)
                {
                    break;
                }
                // The checksum matched: a record that does not decode is not a torn write but
                // a format this version cannot read; refused, never taken for the log's end.
                let entry = decode_record(len_field, payload.into()).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "raft log {}: record {index} does not decode: {e}",
                            segment_path(dir, first).display()
                        ),
                    )
                })?;
                let term = entry.log_id.leader_id.term;
                if last_term.is_some_and(|t| term < t) {
                    break;
                }
                last_term = Some(term);
                if purged.is_none_or(|p| index > p) {
                    state.entries.insert(
                        index,
                        Loc {
                            segment: first,
                            offset: at,
                            len,
                            log_id: entry.log_id,
                        },
                    );
                }
                expect = Some(index + 1);
                at += HEADER + u64::from(len);
            }
            if at == 0 {
                // Nothing in it continues the log (created, or reused, and never written; or
                // after a cut in an earlier one): gone, so that the next record starts a
                // segment named after it.
                drop(file);
                std::fs::remove_file(segment_path(dir, first))?;
                continue;
            }
            state.segments.insert(
                first,
                Segment {
                    file: Arc::new(file),
                    write_at: at,
                    size,
                },
            );
        }
        for e in std::fs::read_dir(dir)?.filter_map(|e| e.ok()) {
            let Some(n) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("free_"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            state.next_free = state.next_free.max(n + 1);
            if e.metadata()?.len() == segment_size && state.free.len() < MAX_FREE_SEGMENTS {
                state.free.push(e.path());
            } else {
                std::fs::remove_file(e.path())?;
            }
        }
        let (tx, rx) = mpsc::channel::<FlushRequest>();
        std::thread::Builder::new()
            .name("raftlog-flush".into())
            .spawn(move || flusher(rx))?;
        Ok(RaftLog {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                segment_size,
                state: Mutex::new(state),
                flusher: Mutex::new(tx),
                appended: Default::default(),
            }),
        })
    }

    /// Bytes of records appended since the log was opened (what the copyset's size-based
    /// snapshot trigger counts).
    pub fn appended_bytes(&self) -> u64 {
        self.inner
            .appended
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The newest index such that the entries after it hold at most `bytes`: purging up to
    /// it keeps about `bytes` of log. `None`: the log holds less.
    pub fn index_keeping(&self, bytes: u64) -> Option<u64> {
        let st = self.inner.state.lock();
        let mut sum = 0u64;
        for (i, l) in st.entries.iter().rev() {
            sum += u64::from(l.len);
            if sum > bytes {
                return Some(*i);
            }
        }
        None
    }

    fn save_meta(&self, meta: &MetaRecord) -> io::Result<()> {
        let path = self.inner.dir.join(META);
        let tmp = self.inner.dir.join("raft_meta.tmp");
        std::fs::write(&tmp, encode_meta(meta))?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(&path)
    }

    /// Writes the records of `entries` (one pwrite per segment touched) and returns the files
    /// that need a sync before they are durable.
    fn write_records(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> Result<Vec<Arc<File>>, StorageError> {
        let mut touched: Vec<Arc<File>> = Vec::new();
        {
            let mut st = self.inner.state.lock();
            // Records of the batch for the current segment, written with one pwrite.
            let mut buf: Vec<u8> = Vec::new();
            let mut buf_seg: Option<(u64, u64)> = None; // (segment, offset of buf)
            for entry in entries {
                // Encoded straight into the batch's buffer, after its header.
                let record = crate::codec::EntryRecord::new(&entry);
                let payload_len = record.len();
                APPENDED_ENTRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.inner
                    .appended
                    .fetch_add(payload_len as u64, std::sync::atomic::Ordering::Relaxed);
                let need = HEADER + payload_len as u64;
                let index = entry.log_id.index;
                let fits = st
                    .segments
                    .last_key_value()
                    .is_some_and(|(_, s)| s.write_at + need + HEADER <= s.size);
                if !fits {
                    if let Some((seg, off)) = buf_seg.take() {
                        let file = st.segments[&seg].file.clone();
                        crate::pagecache::write_at(&file, &buf, off).map_err(io_err)?;
                        buf.clear();
                    }
                    let size = self.inner.segment_size.max(need + HEADER);
                    let path = segment_path(&self.inner.dir, index);
                    let reuse = if size == self.inner.segment_size {
                        st.free.pop()
                    } else {
                        None
                    };
                    let file = match reuse {
                        // A purged segment: its blocks are written already. The terminator
                        // makes it read as empty until the first record is in.
                        Some(free) => {
                            std::fs::rename(&free, &path).map_err(io_err)?;
                            let file = OpenOptions::new()
                                .read(true)
                                .write(true)
                                .open(&path)
                                .map_err(io_err)?;
                            file.write_all_at(&[0u8; HEADER as usize], 0)
                                .map_err(io_err)?;
                            file
                        }
                        None => {
                            let file = OpenOptions::new()
                                .read(true)
                                .write(true)
                                .create(true)
                                .truncate(true)
                                .open(&path)
                                .map_err(io_err)?;
                            format_segment(&file, size).map_err(io_err)?;
                            file
                        }
                    };
                    // The name is durable before any record in it is reported flushed.
                    sync_dir(&path).map_err(io_err)?;
                    st.segments.insert(
                        index,
                        Segment {
                            file: Arc::new(file),
                            write_at: 0,
                            size,
                        },
                    );
                }
                let (&first, seg) = st.segments.last_key_value().expect("a segment exists");
                let offset = seg.write_at;
                if buf_seg.is_none() {
                    buf_seg = Some((first, offset));
                }
                let at = buf.len();
                buf.extend_from_slice(&(payload_len as u32 | PROTOBUF).to_le_bytes());
                buf.extend_from_slice(&[0; 4]); // the checksum, below
                buf.extend_from_slice(&index.to_le_bytes());
                record.encode_into(&mut buf);
                let crc = crc32fast::hash(&buf[at + 8..]);
                buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
                let seg = st.segments.get_mut(&first).expect("just looked up");
                seg.write_at += need;
                if !touched.iter().any(|f| Arc::ptr_eq(f, &seg.file)) {
                    touched.push(seg.file.clone());
                }
                st.entries.insert(
                    index,
                    Loc {
                        segment: first,
                        offset,
                        len: payload_len as u32,
                        log_id: entry.log_id,
                    },
                );
                st.recent.keep(index, entry, payload_len as u64);
            }
            if let Some((seg, off)) = buf_seg {
                let file = st.segments[&seg].file.clone();
                crate::pagecache::write_at(&file, &buf, off).map_err(io_err)?;
            }
        }
        Ok(touched)
    }

    /// Reads entries in `range` (only those present).
    fn read(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        self.read_limited(range, u64::MAX)
    }

    /// Reads the entries of `range` up to about `max_bytes` of payload (always at least one).
    fn read_limited(
        &self,
        range: impl RangeBounds<u64>,
        max_bytes: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        // Each entry from memory (Ok) or where to read it (Err).
        type Source = Result<Entry<TypeConfig>, (Arc<File>, Loc)>;
        let locs: Vec<Source> = {
            let st = self.inner.state.lock();
            let mut bytes = 0u64;
            st.entries
                .range(range)
                .take_while(|(_, l)| {
                    let first = bytes == 0;
                    bytes += u64::from(l.len);
                    first || bytes <= max_bytes
                })
                .map(|(i, l)| match st.recent.entries.get(i) {
                    Some((e, _)) => Ok(e.clone()),
                    None => Err((st.segments[&l.segment].file.clone(), *l)),
                })
                .collect()
        };
        let mut out = Vec::with_capacity(locs.len());
        for loc in locs {
            let (file, l) = match loc {
                Ok(entry) => {
                    out.push(entry);
                    continue;
                }
                Err(at) => at,
            };
            let read_err = |e: io::Error| StorageError::from(StorageIOError::read_logs(&e));
            let mut record = vec![0u8; HEADER as usize + l.len as usize];
            file.read_exact_at(&mut record, l.offset)
                .map_err(read_err)?;
            // The record is still the one located (a segment purged meanwhile may have been
            // reused already): never decode another in its place.
            if record[8..16] != l.log_id.index.to_le_bytes() {
                return Err(read_err(io::Error::other(format!(
                    "raft log entry {} was purged while being read",
                    l.log_id.index
                ))));
            }
            let len_field = u32::from_le_bytes(record[0..4].try_into().expect("4"));
            let payload = bytes::Bytes::from(record).slice(HEADER as usize..);
            out.push(decode_record(len_field, payload).map_err(read_err)?);
        }
        Ok(out)
    }
}

/// Writes a new segment end to end with zeroes and syncs it: later appends then overwrite
/// allocated blocks, and their fdatasync commits no file-system metadata (a sparse or merely
/// fallocated file would make every first write to a block a journal commit).
///
/// In pieces, which stay cached (appends write parts of pages: a page not cached would be
/// read first) in small folios (see crate::pagecache).
fn format_segment(file: &File, size: u64) -> io::Result<()> {
    crate::pagecache::write_zeroes(file, 0, size)?;
    file.sync_all()
}

fn encode_meta(m: &MetaRecord) -> Vec<u8> {
    let mut b = bincode::serialize(m).expect("meta serialises");
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn decode_meta(b: &[u8]) -> Option<MetaRecord> {
    let (body, crc) = b.split_at_checked(b.len().checked_sub(4)?)?;
    (crc32fast::hash(body) == u32::from_le_bytes(crc.try_into().ok()?))
        .then(|| bincode::deserialize(body).ok())
        .flatten()
}

/// Syncs the files of every queued append once, then reports them all flushed.
fn flusher(rx: mpsc::Receiver<FlushRequest>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut files: Vec<Arc<File>> = Vec::new();
        for f in batch.iter().flat_map(|r| r.files.iter()) {
            if !files.iter().any(|g| Arc::ptr_eq(g, f)) {
                files.push(f.clone());
            }
        }
        let started = std::time::Instant::now();
        let result = files.iter().try_for_each(|f| f.sync_data());
        // A batch with no records (an append of no entries) syncs nothing: not an fsync.
        if !files.is_empty() {
            crate::metrics::raft_fsync(started.elapsed());
            FSYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        FLUSHED_APPENDS.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for r in batch {
            r.callback.log_io_completed(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

impl RaftLogReader<TypeConfig> for RaftLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        self.read(range)
    }

    /// What the leader sends in one AppendEntries: bounded in bytes, so that catching up a
    /// follower that was down is a stream of RPCs that each fit in openraft's timeout (the
    /// heartbeat interval) even on a loaded machine, instead of one that never does.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        self.read_limited(start..end, MAX_APPEND_BYTES)
    }
}

/// Payload bytes per AppendEntries (at least one entry): the 1 MiB writes a client keeps in
/// flight go to a follower together, with one fsync there, instead of one RPC and one fsync
/// each (openraft 0.9 has one AppendEntries in flight per follower); and catching up a follower
/// is still a stream of RPCs that each fit in the heartbeat-interval timeout.
const MAX_APPEND_BYTES: u64 = 4 << 20;

impl RaftLogStorage<TypeConfig> for RaftLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let st = self.inner.state.lock();
        let last_purged_log_id = st.meta.last_purged;
        let last_log_id = st
            .entries
            .last_key_value()
            .map(|(_, l)| l.log_id)
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let meta = {
            let mut st = self.inner.state.lock();
            st.meta.vote = Some(*vote);
            st.meta.clone()
        };
        self.save_meta(&meta)
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        Ok(self.inner.state.lock().meta.vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let touched = self.write_records(entries)?;
        let sent = self.inner.flusher.lock().send(FlushRequest {
            files: touched,
            callback,
        });
        if let Err(mpsc::SendError(req)) = sent {
            req.callback
                .log_io_completed(Err(io::Error::other("raft log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let mut st = self.inner.state.lock();
        let Some(cut) = st.entries.get(&log_id.index).copied() else {
            return Ok(());
        };
        st.entries.split_off(&log_id.index);
        st.recent.forget_from(log_id.index);
        let seg = st
            .segments
            .get_mut(&cut.segment)
            .expect("segment of a record");
        seg.write_at = cut.offset;
        seg.file
            .write_all_at(&[0u8; HEADER as usize], cut.offset)
            .and_then(|()| seg.file.sync_data())
            .map_err(io_err)?;
        let later: Vec<u64> = st
            .segments
            .range(cut.segment + 1..)
            .map(|(k, _)| *k)
            .collect();
        for first in later {
            st.segments.remove(&first);
            std::fs::remove_file(segment_path(&self.inner.dir, first)).map_err(io_err)?;
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let meta = {
            let mut st = self.inner.state.lock();
            st.meta.last_purged = Some(log_id);
            st.entries = st.entries.split_off(&(log_id.index + 1));
            st.recent.forget_to(log_id.index);
            st.meta.clone()
        };
        self.save_meta(&meta).map_err(io_err)?;
        let mut st = self.inner.state.lock();
        // A segment whose successor starts at or before the purge point holds only purged
        // records.
        // Kept for reuse as later segments (up to MAX_FREE_SEGMENTS), else deleted.
        let firsts: Vec<u64> = st.segments.keys().copied().collect();
        for pair in firsts.windows(2) {
            if pair[1] <= log_id.index + 1 {
                let seg = st.segments.remove(&pair[0]).expect("listed above");
                let path = segment_path(&self.inner.dir, pair[0]);
                if seg.size == self.inner.segment_size && st.free.len() < MAX_FREE_SEGMENTS {
                    let free = self.inner.dir.join(format!("free_{}", st.next_free));
                    st.next_free += 1;
                    std::fs::rename(&path, &free).map_err(io_err)?;
                    st.free.push(free);
                } else {
                    std::fs::remove_file(path).map_err(io_err)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;
    use openraft::testing::log_id;

    use super::*;

    fn blank(index: u64) -> Entry<TypeConfig> {
        openraft::testing::blank_ent::<TypeConfig>(1, 1, index)
    }

    fn write(log: &RaftLog, range: std::ops::Range<u64>) {
        for f in log.write_records(range.map(blank)).unwrap() {
            f.sync_data().unwrap();
        }
    }

    fn indexes(log: &mut RaftLog) -> Vec<u64> {
        block_on(log.try_get_log_entries(0..u64::MAX))
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect()
    }

    #[test]
    fn recovers_truncates_and_purges_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path(), 256).unwrap();
        write(&log, 1..40);
        block_on(log.save_vote(&Vote::new(3, 2))).unwrap();
        let segments = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(segments > 3, "small segments roll over: {segments}");
        drop(log);
        let mut log = RaftLog::open(dir.path(), 256).unwrap();
        assert_eq!(indexes(&mut log), (1..40).collect::<Vec<_>>());
        assert_eq!(block_on(log.read_vote()).unwrap(), Some(Vote::new(3, 2)));
        // Truncate in the middle: the tail never comes back, even after a restart.
        block_on(log.truncate(log_id(1, 1, 25))).unwrap();
        write(&log, 25..30);
        drop(log);
        let mut log = RaftLog::open(dir.path(), 256).unwrap();
        assert_eq!(indexes(&mut log), (1..30).collect::<Vec<_>>());
        // Purge: gone from reads, remembered as last purged, old segments deleted.
        block_on(log.purge(log_id(1, 1, 20))).unwrap();
        drop(log);
        let mut log = RaftLog::open(dir.path(), 256).unwrap();
        assert_eq!(indexes(&mut log), (21..30).collect::<Vec<_>>());
        let st = block_on(log.get_log_state()).unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(1, 1, 20)));
        assert_eq!(st.last_log_id, Some(log_id(1, 1, 29)));
        assert!(files(dir.path(), "log_") < segments);
    }

    /// New records of a truncated log's same size end where a cut-off one starts: that one
    /// (an older term) never comes back.
    #[test]
    fn records_cut_off_by_a_truncation_stay_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path(), 1 << 20).unwrap();
        write(&log, 1..10);
        block_on(log.clone().truncate(log_id(1, 1, 5))).unwrap();
        let newer = (5..7).map(|i| openraft::testing::blank_ent::<TypeConfig>(2, 1, i));
        for f in log.write_records(newer).unwrap() {
            f.sync_data().unwrap();
        }
        drop(log);
        let mut log = RaftLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(indexes(&mut log), (1..7).collect::<Vec<_>>());
        let got = block_on(log.try_get_log_entries(5..7)).unwrap();
        assert!(got.iter().all(|e| e.log_id.leader_id.term == 2));
    }

    /// Purged segments come back as new ones (no formatting), and their old records never
    /// read as new ones, however the log is reopened.
    #[test]
    fn purged_segments_are_reused_and_their_old_records_stay_dead() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 64 << 10;
        let mut log = RaftLog::open(dir.path(), seg).unwrap();
        let free = |d: &Path| files(d, "free_");
        let put = |log: &RaftLog, r: std::ops::Range<u64>, fill: u8| {
            for f in log
                .write_records(r.map(|i| sized(i, fill, 10 << 10)))
                .unwrap()
            {
                f.sync_data().unwrap();
            }
        };
        put(&log, 1..60, 1);
        block_on(log.purge(log_id(1, 1, 40))).unwrap();
        let freed = free(dir.path());
        assert!(freed >= 3, "purged segments kept for reuse: {freed}");
        // New segments take the free ones: no new file, fewer free ones.
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        put(&log, 60..90, 2);
        assert!(free(dir.path()) < freed);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), files);
        let check = |log: &mut RaftLog| {
            let got = block_on(log.try_get_log_entries(0..u64::MAX)).unwrap();
            assert_eq!(
                got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
                (41..90).collect::<Vec<_>>()
            );
            for e in &got {
                let want = if e.log_id.index < 60 { 1 } else { 2 };
                assert!(data_of(e).iter().all(|b| *b == want), "{}", e.log_id.index);
            }
        };
        check(&mut log);
        drop(log);
        // Reopened: the reused segments' old records (indexes 1..40) after the new ones are
        // not taken; and a reused segment whose first record never got in reads as empty.
        let mut log = RaftLog::open(dir.path(), seg).unwrap();
        check(&mut log);
        let spare = log.inner.state.lock().free.pop().unwrap();
        drop(log);
        std::fs::rename(&spare, segment_path(dir.path(), 90)).unwrap();
        let mut log = RaftLog::open(dir.path(), seg).unwrap();
        check(&mut log);
        put(&log, 90..95, 3);
        drop(log);
        let mut log = RaftLog::open(dir.path(), seg).unwrap();
        let got = block_on(log.try_get_log_entries(0..u64::MAX)).unwrap();
        assert_eq!(got.last().unwrap().log_id.index, 94);
        assert_eq!(got.len(), 54);
    }

    /// Writes `entries` as a log before protobuf entries did: bincode records in a segment
    /// named after the first, the rest of it zeroes.
    fn write_bincode_log(dir: &Path, entries: &[Entry<TypeConfig>], size: u64) {
        let mut buf = Vec::new();
        for e in entries {
            let payload = bincode::serialize(e).unwrap();
            let index = e.log_id.index;
            let mut h = crc32fast::Hasher::new();
            h.update(&index.to_le_bytes());
            h.update(&payload);
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&h.finalize().to_le_bytes());
            buf.extend_from_slice(&index.to_le_bytes());
            buf.extend_from_slice(&payload);
        }
        buf.resize(size as usize, 0);
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(segment_path(dir, entries[0].log_id.index), buf).unwrap();
    }

    /// A log written before entries were protobuf reads back entry for entry, takes new
    /// (protobuf) records after its own, and the mixed log recovers after a restart.
    #[test]
    fn a_log_written_in_bincode_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 1 << 20;
        let mut old: Vec<Entry<TypeConfig>> = (1..6).map(|i| sized(i, i as u8, 3000)).collect();
        old[0] = blank(1);
        write_bincode_log(dir.path(), &old, seg);
        let log = RaftLog::open(dir.path(), seg).unwrap();
        assert_eq!(log.read(0..u64::MAX).unwrap(), old);
        let new: Vec<Entry<TypeConfig>> = (6..9).map(|i| sized(i, 50 + i as u8, 700)).collect();
        for f in log.write_records(new.clone()).unwrap() {
            f.sync_data().unwrap();
        }
        drop(log);
        let mut log = RaftLog::open(dir.path(), seg).unwrap();
        let all: Vec<_> = old.iter().chain(&new).cloned().collect();
        assert_eq!(block_on(log.try_get_log_entries(0..u64::MAX)).unwrap(), all);
        // The old records are bincode on disk, the new ones protobuf (flagged in `len`).
        let bytes = std::fs::read(segment_path(dir.path(), 1)).unwrap();
        let len0 = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
        assert_eq!(len0 & PROTOBUF, 0);
        let at = log.inner.state.lock().entries[&6].offset as usize;
        let len6 = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_ne!(len6 & PROTOBUF, 0);
        assert_eq!(
            crate::codec::decode_entry(bytes::Bytes::copy_from_slice(
                &bytes[at + HEADER as usize..at + HEADER as usize + (len6 & !PROTOBUF) as usize]
            ))
            .unwrap(),
            new[0]
        );
    }

    /// A whole record (its checksum right) that does not decode is refused with a message that
    /// names the log and the record, never taken for the end of the log (which would drop the
    /// acknowledged entries after it).
    #[test]
    fn a_record_that_does_not_decode_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let payload = [0xffu8; 40];
        let mut h = crc32fast::Hasher::new();
        h.update(&1u64.to_le_bytes());
        h.update(&payload);
        for flag in [0, PROTOBUF] {
            let mut buf = Vec::new();
            buf.extend_from_slice(&(payload.len() as u32 | flag).to_le_bytes());
            buf.extend_from_slice(&h.clone().finalize().to_le_bytes());
            buf.extend_from_slice(&1u64.to_le_bytes());
            buf.extend_from_slice(&payload);
            buf.resize(1 << 20, 0);
            std::fs::write(segment_path(dir.path(), 1), buf).unwrap();
            let e = RaftLog::open(dir.path(), 1 << 20).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            let msg = e.to_string();
            assert!(
                msg.contains("log_00000000000000000001")
                    && msg.contains("record 1 does not decode"),
                "{msg}"
            );
        }
    }

    #[test]
    fn append_entries_batches_are_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path(), 64 << 20).unwrap();
        for f in log
            .write_records((1..100).map(|i| sized(i, 7, 100 << 10)))
            .unwrap()
        {
            f.sync_data().unwrap();
        }
        let got = block_on(log.limited_get_log_entries(1, 100)).unwrap();
        let n = got.len() as u64;
        let most = MAX_APPEND_BYTES / (100 << 10);
        assert!(
            (most / 2..=most).contains(&n),
            "{n} entries of 100 KiB in one batch"
        );
        assert_eq!(got.last().unwrap().log_id.index, n);
        // Never an empty batch, however big one entry is.
        let got = log.read_limited(5..20, 1).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].log_id.index, 5);
    }

    /// A write entry of `len` bytes of `fill`.
    fn sized(index: u64, fill: u8, len: usize) -> Entry<TypeConfig> {
        let mut e = blank(index);
        e.payload = openraft::EntryPayload::Normal(crate::raft::ChunkCommand::Write {
            chunk_id: 1,
            sn: 0,
            offset: 0,
            data: vec![fill; len].into(),
            epoch: 0,
        });
        e
    }

    fn filled(index: u64, fill: u8) -> Entry<TypeConfig> {
        sized(index, fill, 1 << 20)
    }

    /// Files in `d` whose names start with `prefix`.
    fn files(d: &Path, prefix: &str) -> usize {
        std::fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                let e = e.as_ref().unwrap();
                e.file_name().to_str().unwrap().starts_with(prefix)
            })
            .count()
    }

    fn data_of(e: &Entry<TypeConfig>) -> bytes::Bytes {
        match &e.payload {
            openraft::EntryPayload::Normal(crate::raft::ChunkCommand::Write { data, .. }) => {
                data.clone()
            }
            p => panic!("not a write: {p:?}"),
        }
    }

    #[test]
    fn recent_entries_are_read_from_memory_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path(), 64 << 20).unwrap();
        for f in log
            .write_records((1..21).map(|i| filled(i, i as u8)))
            .unwrap()
        {
            f.sync_data().unwrap();
        }
        {
            let st = log.inner.state.lock();
            assert!(st.recent.bytes > 0 && st.recent.bytes <= RECENT_PER_LOG);
            assert!(
                !st.recent.entries.contains_key(&1),
                "the oldest are forgotten"
            );
            assert!(st.recent.entries.contains_key(&20), "the newest are kept");
        }
        // Every entry reads back, from memory or from its segment.
        let got = log.read(1..21).unwrap();
        assert_eq!(got.len(), 20);
        for (i, e) in (1..21u64).zip(&got) {
            assert_eq!(e.log_id.index, i);
            assert!(data_of(e).iter().all(|b| *b == i as u8), "entry {i}");
        }
        // A kept entry is the appended one, shared: two reads give the same buffer.
        let again = log.read(20..21).unwrap();
        assert_eq!(data_of(&again[0]).as_ptr(), data_of(&got[19]).as_ptr());
        // A truncation forgets: the entries written in place of the cut ones read back.
        block_on(log.clone().truncate(log_id(1, 1, 15))).unwrap();
        for f in log
            .write_records((15..21).map(|i| filled(i, 100 + i as u8)))
            .unwrap()
        {
            f.sync_data().unwrap();
        }
        for (i, e) in (13..21u64).zip(&log.read(13..21).unwrap()) {
            let want = if i < 15 { i as u8 } else { 100 + i as u8 };
            assert!(data_of(e).iter().all(|b| *b == want), "entry {i}");
        }
        // A purge forgets what it purges.
        block_on(log.clone().purge(log_id(1, 1, 18))).unwrap();
        assert!(
            log.inner
                .state
                .lock()
                .recent
                .entries
                .keys()
                .all(|i| *i > 18)
        );
        assert_eq!(log.read(0..u64::MAX).unwrap().len(), 2);
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path(), 1 << 20).unwrap();
        write(&log, 1..6);
        drop(log);
        // Damage the last record's payload.
        let seg = segment_path(dir.path(), 1);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&seg)
            .unwrap();
        let st = RaftLog::open(dir.path(), 1 << 20).unwrap();
        let last = st.inner.state.lock().entries[&5];
        drop(st);
        f.write_all_at(b"garbage", last.offset + HEADER + 1)
            .unwrap();
        let mut log = RaftLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(indexes(&mut log), vec![1, 2, 3, 4]);
    }
}
