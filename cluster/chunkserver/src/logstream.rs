//! LogStream: the raft logs of every copyset of a chunkserver in one stream of segment files
//! on its disk (as TiKV's raft-engine does), so that one fdatasync makes the appends of every
//! copyset durable: group commit across copysets, one flusher per disk instead of one per
//! copyset.
//!
//! ```text
//!  <copysets>/raftlog/seg_<seq, 20 digits>   segments, in the order they were written;
//!                                             written with zeroes when created (appends then
//!                                             never allocate), reused once free
//!      record: len u32 | crc32 u32 | group u64 | index u64 | entry (len bytes, protobuf)
//!      `len`'s flags: PROTOBUF (always), REWRITE (an entry moved from an older segment),
//!      TRUNCATE (the group's entries from `index` on are gone; no entry)
//!      crc32 covers the segment's seq, `len`, group, index and the entry: records left in a
//!      reused segment from its previous use never check out
//!      a zero `len` ends a segment's records
//!  <copysets>/raftlog/free_<n>               free segments kept for reuse
//! ```
//!
//! A group is a copyset's raft log ([`RaftLog`](crate::raftlog::RaftLog)); its vote and last
//! purged index stay in the copyset's own `raft_meta`.
//!
//! Writes go through one lock, in order; an append hands its fsync to the flusher thread while
//! still holding it, so the flusher's queue is in write order and one `fdatasync` answers every
//! append queued since the last (of any copyset). A segment is only ever written by the run
//! that created it: after a restart the next record starts a new segment, so what a crash left
//! after a torn record is never followed by new records it could be mistaken for.
//!
//! Recovery replays the segments in order. For a group: an appended record at `index` replaces
//! the group's entries from `index` on (a truncation by a new leader's entries); a rewritten
//! record replaces only its own index; a truncation record removes from its index on. The
//! group keeps its entries up to the first gap (a record lost in a crash while a later one was
//! written back: neither was acknowledged); its next append at that index replaces the rest.
//!
//! Space: segments are freed oldest first, once no group's entry is in the oldest. A group that
//! stops purging (an idle copyset) would pin the oldest segment: when the stream grows past
//! twice what its groups hold (plus a few segments), the live entries of the oldest segment are
//! rewritten at the end of the stream, synced, and the segment freed ([`LogStream::collect`],
//! on its own thread).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak, mpsc};

use openraft::storage::LogFlushed;
use openraft::{Entry, LogId};
use parking_lot::Mutex;

use crate::chunkfilepool::sync_dir;
use crate::raft::TypeConfig;

pub(crate) const HEADER: u64 = 24;
/// Flags in a record's `len`.
const PROTOBUF: u32 = 1 << 31;
const REWRITE: u32 = 1 << 30;
const TRUNCATE: u32 = 1 << 29;
const LEN_MASK: u32 = TRUNCATE - 1;

/// Free segments kept for reuse; more are deleted.
const MAX_FREE_SEGMENTS: usize = 4;

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An entry appended (replaces the group's entries from its index on).
    Append,
    /// An entry moved from an older segment (replaces its own index only).
    Rewrite,
    /// The group's entries from the index on are gone.
    Truncate,
}

/// A record's entry, to encode or already encoded (a rewrite).
pub(crate) enum Payload<'a> {
    Entry(&'a Entry<TypeConfig>),
    Encoded(&'a [u8]),
    None,
}

/// Where an entry's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    pub log_id: LogId<u64>,
}

/// What a write does once its records are in the page cache.
pub(crate) enum Then {
    /// Hands them to the flusher, which reports them durable through the callback.
    Flush(LogFlushed<TypeConfig>),
    /// Syncs them before the write returns.
    Sync,
    /// Neither: the caller syncs the files written.
    Later,
}

/// Where a write's records went.
pub(crate) struct Written {
    /// (seq, offset, len) of each record.
    pub at: Vec<(u64, u64, u32)>,
    /// The files written, (seq, file), ascending.
    pub files: Vec<(u64, Arc<File>)>,
}

/// A group's entries by index.
pub(crate) type Locs = BTreeMap<u64, Loc>;

/// The groups whose entries are in the stream: those open, and those replayed but not (or no
/// longer) open — their entries are live too (kept, and moved when their segment is freed).
#[derive(Default)]
struct Groups {
    open: HashMap<u64, Weak<dyn Group>>,
    closed: HashMap<u64, Locs>,
}

/// A group as the stream's collector sees it.
pub(crate) trait Group: Send + Sync {
    /// Runs `f` on the group's entries, under the group's lock (no append, truncation or
    /// purge meanwhile).
    fn with_locs(&self, f: &mut dyn FnMut(&mut Locs) -> io::Result<()>) -> io::Result<()>;
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    write_at: u64,
    size: u64,
}

#[derive(Debug, Default)]
struct State {
    /// By seq; the last is the one written to (only one created by this run).
    segments: BTreeMap<u64, Segment>,
    /// Whether the last segment was created by this run (else the next record starts one).
    writable: bool,
    next_seq: u64,
    free: Vec<PathBuf>,
    next_free: u64,
    /// The records of a write, encoded here (the buffer is reused).
    buf: Vec<u8>,
}

struct Flush {
    /// (seq, file), ascending.
    files: Vec<(u64, Arc<File>)>,
    callback: LogFlushed<TypeConfig>,
}

struct Inner {
    dir: PathBuf,
    segment_size: u64,
    state: Mutex<State>,
    groups: Mutex<Groups>,
    flusher: mpsc::Sender<Flush>,
    collector: mpsc::Sender<()>,
    stats: Arc<Stats>,
    /// A write or sync failed: after a failed fsync the kernel may have dropped the dirty
    /// pages it could not write, so no later sync proves anything. Every write and flush
    /// fails from then on, until the chunkserver restarts and replays what is on disk.
    failed: Arc<std::sync::atomic::AtomicBool>,
}

/// Counters of one stream since it was opened.
#[derive(Debug, Default)]
pub struct Stats {
    /// fdatasync batches of the flusher.
    pub fsyncs: AtomicU64,
    /// Appends (of any group) those made durable.
    pub flushed_appends: AtomicU64,
    /// Entries rewritten by the collector.
    pub rewritten: AtomicU64,
    /// Segments freed.
    pub freed: AtomicU64,
}

static FSYNCS: AtomicU64 = AtomicU64::new(0);
static FLUSHED_APPENDS: AtomicU64 = AtomicU64::new(0);
static APPENDED_ENTRIES: AtomicU64 = AtomicU64::new(0);

/// Raft log fsync batches, the appends they made durable and the entries appended, since start
/// (every stream of the process): appends per fsync and entries per append are the batching
/// factors.
pub fn fsync_stats() -> (u64, u64, u64) {
    (
        FSYNCS.load(Relaxed),
        FLUSHED_APPENDS.load(Relaxed),
        APPENDED_ENTRIES.load(Relaxed),
    )
}

/// The raft logs of a disk's copysets. Clones share the stream.
#[derive(Clone)]
pub struct LogStream {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LogStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStream")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg_{seq:020}"))
}

fn checksum(seq: u64, header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&header[0..4]);
    h.update(&header[8..24]);
    h.update(payload);
    h.finalize()
}

/// Applies a record to a group's replayed entries.
fn replay(locs: &mut Locs, kind: Kind, index: u64, loc: Option<Loc>) {
    match kind {
        Kind::Append => {
            locs.split_off(&index);
            locs.insert(index, loc.expect("an entry"));
        }
        Kind::Rewrite => {
            locs.insert(index, loc.expect("an entry"));
        }
        Kind::Truncate => {
            locs.split_off(&index);
        }
    }
}

impl LogStream {
    /// Opens (or creates) the stream in `dir`, replaying what a previous run wrote.
    pub fn open(dir: &Path, segment_size: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut seqs: Vec<u64> = Vec::new();
        let mut state = State::default();
        for e in std::fs::read_dir(dir)?.filter_map(|e| e.ok()) {
            let name = e.file_name();
            let name = name.to_str().unwrap_or_default();
            if let Some(seq) = name.strip_prefix("seg_").and_then(|n| n.parse().ok()) {
                seqs.push(seq);
            } else if let Some(n) = name
                .strip_prefix("free_")
                .and_then(|n| n.parse::<u64>().ok())
            {
                state.next_free = state.next_free.max(n + 1);
                if e.metadata()?.len() == segment_size && state.free.len() < MAX_FREE_SEGMENTS {
                    state.free.push(e.path());
                } else {
                    std::fs::remove_file(e.path())?;
                }
            }
        }
        seqs.sort_unstable();
        let mut replayed: HashMap<u64, Locs> = HashMap::new();
        for &seq in &seqs {
            let path = segment_path(dir, seq);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let size = file.metadata()?.len();
            let end = replay_segment(&file, &path, seq, size, &mut replayed)?;
            state.segments.insert(
                seq,
                Segment {
                    file: Arc::new(file),
                    write_at: end,
                    size,
                },
            );
        }
        state.next_seq = seqs.last().map_or(1, |s| s + 1);
        let stats = Arc::new(Stats::default());
        let failed: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (flusher, rx) = mpsc::channel::<Flush>();
        let (fstats, ffailed) = (stats.clone(), failed.clone());
        std::thread::Builder::new()
            .name("raftlog-flush".into())
            .spawn(move || flush_loop(rx, &fstats, &ffailed))?;
        let (collector, crx) = mpsc::channel::<()>();
        let groups = Groups {
            open: HashMap::new(),
            closed: replayed,
        };
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            segment_size,
            state: Mutex::new(state),
            groups: Mutex::new(groups),
            flusher,
            collector,
            stats,
            failed,
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("raftlog-gc".into())
            .spawn(move || collect_loop(crx, weak))?;
        let stream = LogStream { inner };
        stream.nudge();
        Ok(stream)
    }

    /// The stream's counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Asks the collector to look for segments to free.
    pub(crate) fn nudge(&self) {
        let _ = self.inner.collector.send(());
    }

    /// Takes group `id` as open: its replayed entries are handed to `open`, which builds the
    /// group; from then on the group holds them. Under the groups' lock: the collector never
    /// sees the entries in neither place.
    pub(crate) fn open_group<G: Group + 'static>(
        &self,
        id: u64,
        open: impl FnOnce(Locs) -> io::Result<Arc<G>>,
    ) -> io::Result<Arc<G>> {
        let mut groups = self.inner.groups.lock();
        // A group being dropped has no strong handle left but has not handed its entries
        // back yet: wait for it.
        let mut waited = 0;
        while let Some(w) = groups.open.get(&id) {
            if w.strong_count() > 0 {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("raft log group {id} is open already"),
                ));
            }
            if waited == 1000 {
                return Err(io::Error::other(format!(
                    "raft log group {id} did not close within 10 s"
                )));
            }
            drop(groups);
            std::thread::sleep(std::time::Duration::from_millis(10));
            waited += 1;
            groups = self.inner.groups.lock();
        }
        let locs = groups.closed.remove(&id).unwrap_or_default();
        let g = match open(locs.clone()) {
            Ok(g) => g,
            Err(e) => {
                groups.closed.insert(id, locs);
                return Err(e);
            }
        };
        let weak: Weak<dyn Group> = Arc::downgrade(&(g.clone() as Arc<dyn Group>));
        groups.open.insert(id, weak);
        Ok(g)
    }

    /// A group closes (its last handle is dropped): its entries stay live in the stream.
    /// `group` is the closing group's address: only its own registration is removed (a new
    /// one of the same id cannot exist before this one is gone, see `open_group`; checked
    /// anyway).
    pub(crate) fn close_group(&self, id: u64, group: *const (), locs: Locs) {
        let mut groups = self.inner.groups.lock();
        if groups
            .open
            .get(&id)
            .is_some_and(|w| std::ptr::addr_eq(w.as_ptr(), group))
        {
            groups.open.remove(&id);
        }
        if !locs.is_empty() {
            groups.closed.insert(id, locs);
        }
        drop(groups);
        self.nudge();
    }

    /// Forgets group `id` for good (its copyset replica is deleted): a truncation from index 0
    /// is written (synced), so that a replay drops its entries too, and they stop pinning
    /// segments. An open group must close first: waits up to 10 s for its last handle to go.
    pub(crate) fn drop_group(&self, id: u64) -> io::Result<()> {
        let mut waited = 0;
        loop {
            let mut groups = self.inner.groups.lock();
            if !groups.open.contains_key(&id) {
                groups.closed.remove(&id);
                break;
            }
            drop(groups);
            if waited == 1000 {
                return Err(io::Error::other(format!(
                    "raft log group {id} did not close within 10 s"
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            waited += 1;
        }
        self.write(id, Kind::Truncate, &[(0, Payload::None)], Then::Sync)?;
        self.nudge();
        Ok(())
    }

    /// The groups with entries in the stream that nothing has open.
    pub(crate) fn closed_groups(&self) -> Vec<u64> {
        let groups = self.inner.groups.lock();
        groups
            .closed
            .iter()
            .filter(|(_, locs)| !locs.is_empty())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Writes records of group `group`, in order, and returns where each went.
    pub(crate) fn write(
        &self,
        group: u64,
        kind: Kind,
        records: &[(u64, Payload<'_>)],
        then: Then,
    ) -> io::Result<Written> {
        let mut at = Vec::with_capacity(records.len());
        let mut touched: Vec<(u64, Arc<File>)> = Vec::new();
        let flags = PROTOBUF
            | match kind {
                Kind::Append => 0,
                Kind::Rewrite => REWRITE,
                Kind::Truncate => TRUNCATE,
            };
        let mut guard = self.inner.state.lock();
        self.check()?;
        let st = &mut *guard;
        st.buf.clear();
        let result = self.write_locked(st, group, flags, records, &mut at, &mut touched);
        if let Err(e) = &result
            && e.kind() != io::ErrorKind::InvalidInput
        {
            self.inner.failed.store(true, Relaxed);
        }
        result?;
        match then {
            Then::Flush(callback) => {
                if kind == Kind::Append {
                    APPENDED_ENTRIES.fetch_add(records.len() as u64, Relaxed);
                }
                // Still under the lock: the flusher's queue is in write order.
                if let Err(mpsc::SendError(f)) = self.inner.flusher.send(Flush {
                    files: touched.clone(),
                    callback,
                }) {
                    f.callback
                        .log_io_completed(Err(io::Error::other("raft log flusher stopped")));
                }
            }
            Then::Sync => {
                drop(guard);
                for (_, f) in &touched {
                    if let Err(e) = f.sync_data() {
                        self.inner.failed.store(true, Relaxed);
                        return Err(e);
                    }
                }
            }
            Then::Later => {}
        }
        Ok(Written { at, files: touched })
    }

    /// The records of a write, under the stream's lock.
    fn write_locked(
        &self,
        st: &mut State,
        group: u64,
        flags: u32,
        records: &[(u64, Payload<'_>)],
        at: &mut Vec<(u64, u64, u32)>,
        touched: &mut Vec<(u64, Arc<File>)>,
    ) -> io::Result<()> {
        // (seq, offset) where `buf` goes.
        let mut buf_at: Option<(u64, u64)> = None;
        // Encoded lengths first: a write refused is refused before anything moved.
        let mut encoded = Vec::with_capacity(records.len());
        for (index, payload) in records {
            let record = match payload {
                Payload::Entry(e) => Some(crate::codec::EntryRecord::new(e)),
                _ => None,
            };
            let len = match (payload, &record) {
                (Payload::Entry(_), Some(r)) => r.len(),
                (Payload::Encoded(b), _) => b.len(),
                _ => 0,
            };
            if len as u64 > u64::from(LEN_MASK) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("raft log entry {index} of {len} bytes is too large"),
                ));
            }
            encoded.push((record, len));
        }
        for ((index, payload), (record, len)) in records.iter().zip(encoded) {
            let need = HEADER + len as u64;
            let fits = st.writable
                && st
                    .segments
                    .last_key_value()
                    .is_some_and(|(_, s)| s.write_at + need + HEADER <= s.size);
            if !fits {
                if let Some((seq, off)) = buf_at.take() {
                    Self::put(st, seq, off)?;
                }
                self.roll_over(st, need + HEADER)?;
            }
            let (&seq, seg) = st.segments.last_key_value().expect("a segment");
            let offset = seg.write_at;
            if buf_at.is_none() {
                buf_at = Some((seq, offset));
            }
            let start = st.buf.len();
            st.buf
                .extend_from_slice(&(len as u32 | flags).to_le_bytes());
            st.buf.extend_from_slice(&[0; 4]);
            st.buf.extend_from_slice(&group.to_le_bytes());
            st.buf.extend_from_slice(&index.to_le_bytes());
            match (payload, &record) {
                (_, Some(r)) => r.encode_into(&mut st.buf),
                (Payload::Encoded(b), _) => st.buf.extend_from_slice(b),
                _ => {}
            }
            let (header, body) = st.buf[start..].split_at(HEADER as usize);
            let crc = checksum(seq, header, body);
            st.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
            let seg = st.segments.get_mut(&seq).expect("just looked up");
            seg.write_at += need;
            if !touched.iter().any(|(s, _)| *s == seq) {
                touched.push((seq, seg.file.clone()));
            }
            at.push((seq, offset, len as u32));
        }
        if let Some((seq, off)) = buf_at {
            Self::put(st, seq, off)?;
        }
        Ok(())
    }

    /// Fails once a write or sync of the stream has failed.
    fn check(&self) -> io::Result<()> {
        if self.inner.failed.load(Relaxed) {
            return Err(io::Error::other(
                "raft log stream failed earlier (a write or fsync error): restart the chunkserver",
            ));
        }
        Ok(())
    }

    /// Writes the records encoded in `st.buf` at `off` of segment `seq`. A write that fails
    /// takes the segment's end back to `off`: the next records go there, never after a hole
    /// that recovery would take for the end of the stream.
    fn put(st: &mut State, seq: u64, off: u64) -> io::Result<()> {
        let seg = st.segments.get_mut(&seq).expect("the segment written");
        let r = crate::pagecache::write_at(&seg.file, &st.buf, off);
        if r.is_err() {
            seg.write_at = off;
        }
        st.buf.clear();
        r
    }

    /// Starts a new segment (a free one, or one written with zeroes) at least `need` long.
    fn roll_over(&self, st: &mut State, need: u64) -> io::Result<()> {
        let seq = st.next_seq;
        let path = segment_path(&self.inner.dir, seq);
        let size = self.inner.segment_size.max(need);
        let free = if size == self.inner.segment_size {
            st.free.pop()
        } else {
            None
        };
        let file = match free {
            // Its old records check out against their own seq, never this one.
            Some(free) => {
                std::fs::rename(&free, &path)?;
                let file = OpenOptions::new().read(true).write(true).open(&path)?;
                file.write_all_at(&[0u8; HEADER as usize], 0)?;
                file
            }
            None => formatted(&path, size)?,
        };
        // The name is durable before any record in it is reported flushed.
        sync_dir(&path)?;
        st.next_seq += 1;
        st.writable = true;
        st.segments.insert(
            seq,
            Segment {
                file: Arc::new(file),
                write_at: 0,
                size,
            },
        );
        self.nudge();
        Ok(())
    }

    /// The record at `loc`'s encoded entry, if it is still there (the segment may have been
    /// freed and reused since `loc` was taken: then `None`).
    pub(crate) fn read(&self, group: u64, index: u64, loc: &Loc) -> io::Result<Option<Vec<u8>>> {
        let Some(file) = self
            .inner
            .state
            .lock()
            .segments
            .get(&loc.seq)
            .map(|s| s.file.clone())
        else {
            return Ok(None);
        };
        let mut record = vec![0u8; HEADER as usize + loc.len as usize];
        file.read_exact_at(&mut record, loc.offset)?;
        let (header, body) = record.split_at(HEADER as usize);
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4"));
        if header[8..16] != group.to_le_bytes()
            || header[16..24] != index.to_le_bytes()
            || u32::from_le_bytes(header[0..4].try_into().expect("4")) & LEN_MASK != loc.len
            || checksum(loc.seq, header, body) != crc
        {
            return Ok(None);
        }
        record.drain(..HEADER as usize);
        Ok(Some(record))
    }

    /// Frees what can be freed: the oldest segments while no group's entry is in them, and,
    /// while the stream is more than twice what its groups hold (plus four segments), the
    /// oldest after moving its entries to the end of the stream.
    pub fn collect(&self) -> io::Result<()> {
        loop {
            // Entries moved but not synced must never let their old segment go.
            self.check()?;
            let (oldest, count) = {
                let st = self.inner.state.lock();
                if st.segments.len() < 2 {
                    return Ok(());
                }
                let (&oldest, _) = st.segments.first_key_value().expect("two");
                (oldest, st.segments.len() as u64)
            };
            // Groups upgraded here are dropped after the groups' lock is released (a group
            // that closes takes it).
            let mut open: Vec<(u64, Arc<dyn Group>)> = Vec::new();
            let free = self.collect_step(oldest, count, &mut open);
            drop(open);
            if !free? {
                return Ok(());
            }
            self.free_oldest(oldest)?;
        }
    }

    /// One step of [`collect`](Self::collect): whether segment `oldest` (of `count`) can be
    /// freed now, its entries moved if that is due.
    fn collect_step(
        &self,
        oldest: u64,
        count: u64,
        open: &mut Vec<(u64, Arc<dyn Group>)>,
    ) -> io::Result<bool> {
        let seg_size = self.inner.segment_size;
        let mut groups = self.inner.groups.lock();
        // A group that is closing holds its entries until it hands them back: nothing is
        // freed meanwhile (its close nudges the collector again).
        for (id, w) in groups.open.iter() {
            match w.upgrade() {
                Some(g) => open.push((*id, g)),
                None => return Ok(false),
            }
        }
        let mut live: HashMap<u64, u64> = HashMap::new();
        let mut count_live = |locs: &mut Locs| {
            for l in locs.values() {
                *live.entry(l.seq).or_default() += HEADER + u64::from(l.len);
            }
            Ok(())
        };
        for (_, g) in open.iter() {
            g.with_locs(&mut count_live)?;
        }
        for locs in groups.closed.values_mut() {
            count_live(locs)?;
        }
        if live.get(&oldest).copied().unwrap_or(0) == 0 {
            return Ok(true);
        }
        let total: u64 = live.values().sum();
        if count * seg_size <= 2 * total + 4 * seg_size {
            return Ok(false);
        }
        // Move the oldest's entries to the end, then sync them before it is freed.
        let mut files: Vec<(u64, Arc<File>)> = Vec::new();
        for (id, g) in open.iter() {
            g.with_locs(&mut |locs| self.relocate(*id, oldest, locs, &mut files))?;
        }
        for (id, locs) in groups.closed.iter_mut() {
            self.relocate(*id, oldest, locs, &mut files)?;
        }
        files.sort_by_key(|(s, _)| *s);
        for (_, f) in &files {
            if let Err(e) = f.sync_data() {
                self.inner.failed.store(true, Relaxed);
                return Err(e);
            }
        }
        Ok(true)
    }

    /// Rewrites group `id`'s entries that are in segment `seq` at the end of the stream.
    fn relocate(
        &self,
        id: u64,
        seq: u64,
        locs: &mut Locs,
        files: &mut Vec<(u64, Arc<File>)>,
    ) -> io::Result<()> {
        let moving: Vec<(u64, Loc)> = locs
            .iter()
            .filter(|(_, l)| l.seq == seq)
            .map(|(i, l)| (*i, *l))
            .collect();
        // In batches of a few MiB.
        for batch in moving.chunk_by(|a, b| a.1.offset / (4 << 20) == b.1.offset / (4 << 20)) {
            let mut encoded = Vec::with_capacity(batch.len());
            for (i, l) in batch {
                let e = self.read(id, *i, l)?.ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("raft log group {id} entry {i}: its record is gone"),
                    )
                })?;
                encoded.push((*i, e));
            }
            let records: Vec<(u64, Payload<'_>)> = encoded
                .iter()
                .map(|(i, e)| (*i, Payload::Encoded(e)))
                .collect();
            // Not synced here: the caller syncs every file written, once.
            let w = self.write(id, Kind::Rewrite, &records, Then::Later)?;
            for ((i, l), (s, offset, _)) in batch.iter().zip(w.at) {
                locs.insert(
                    *i,
                    Loc {
                        seq: s,
                        offset,
                        ..*l
                    },
                );
            }
            for (s, f) in w.files {
                if !files.iter().any(|(x, _)| *x == s) {
                    files.push((s, f));
                }
            }
            self.inner
                .stats
                .rewritten
                .fetch_add(batch.len() as u64, Relaxed);
        }
        Ok(())
    }

    /// Frees segment `seq` (the oldest; none of its records is live): kept for reuse or
    /// deleted.
    fn free_oldest(&self, seq: u64) -> io::Result<()> {
        let mut st = self.inner.state.lock();
        let Some(seg) = st.segments.remove(&seq) else {
            return Ok(());
        };
        let path = segment_path(&self.inner.dir, seq);
        if seg.size == self.inner.segment_size && st.free.len() < MAX_FREE_SEGMENTS {
            let free = self.inner.dir.join(format!("free_{}", st.next_free));
            st.next_free += 1;
            std::fs::rename(&path, &free)?;
            st.free.push(free);
        } else {
            std::fs::remove_file(&path)?;
        }
        sync_dir(&path)?;
        self.inner.stats.freed.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Makes sure a free segment is ready, so that a roll-over does not write one with zeroes
    /// under the stream's lock.
    fn prepare_spare(&self) -> io::Result<()> {
        let path = {
            let mut st = self.inner.state.lock();
            // Not before this run has written (a chunkserver that starts does not write
            // a segment of zeroes it may not need yet).
            if !st.free.is_empty() || !st.writable {
                return Ok(());
            }
            let n = st.next_free;
            st.next_free += 1;
            self.inner.dir.join(format!("free_{n}"))
        };
        formatted(&path, self.inner.segment_size)?;
        self.inner.state.lock().free.push(path);
        Ok(())
    }
}

/// A new segment file at `path`, `size` bytes of zeroes written and synced: appends then
/// overwrite allocated blocks, and their fdatasync commits no file-system metadata. Left in the
/// page cache: an append writes parts of pages, and a page not cached would be read from the
/// disk first.
fn formatted(path: &Path, size: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    crate::pagecache::write_zeroes(&file, 0, size)?;
    file.sync_all()?;
    Ok(file)
}

/// Scans one segment's records into `replay`; returns where its records end.
fn replay_segment(
    file: &File,
    path: &Path,
    seq: u64,
    size: u64,
    replayed: &mut HashMap<u64, Locs>,
) -> io::Result<u64> {
    let mut at = 0u64;
    let mut header = [0u8; HEADER as usize];
    let mut payload = Vec::new();
    while at + HEADER <= size {
        file.read_exact_at(&mut header, at)?;
        let len_field = u32::from_le_bytes(header[0..4].try_into().expect("4"));
        let len = len_field & LEN_MASK;
        if len_field == 0 || at + HEADER + u64::from(len) > size {
            break;
        }
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4"));
        let group = u64::from_le_bytes(header[8..16].try_into().expect("8"));
        let index = u64::from_le_bytes(header[16..24].try_into().expect("8"));
        payload.resize(len as usize, 0);
        file.read_exact_at(&mut payload, at + HEADER)?;
        if checksum(seq, &header, &payload) != crc {
            break;
        }
        let kind = if len_field & TRUNCATE != 0 {
            Kind::Truncate
        } else if len_field & REWRITE != 0 {
            Kind::Rewrite
        } else {
            Kind::Append
        };
        let loc = if kind == Kind::Truncate {
            None
        } else {
            // The checksum matched: a record that does not decode is not a torn write but a
            // format this version cannot read; refused, never taken for the log's end.
            let entry = crate::codec::decode_entry(bytes::Bytes::copy_from_slice(&payload))
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "raft log {}: record of group {group} index {index} at {at} \
                             does not decode: {e}",
                            path.display()
                        ),
                    )
                })?;
            Some(Loc {
                seq,
                offset: at,
                len,
                log_id: entry.log_id,
            })
        };
        replay(replayed.entry(group).or_default(), kind, index, loc);
        at += HEADER + u64::from(len);
    }
    Ok(at)
}

/// Syncs the files of every queued append once, then reports them all flushed.
fn flush_loop(rx: mpsc::Receiver<Flush>, stats: &Stats, failed: &std::sync::atomic::AtomicBool) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut files: Vec<(u64, Arc<File>)> = Vec::new();
        for (s, f) in batch.iter().flat_map(|r| r.files.iter()) {
            if !files.iter().any(|(x, _)| x == s) {
                files.push((*s, f.clone()));
            }
        }
        // Older segments first: an entry is never durable while one written before it is not.
        files.sort_by_key(|(s, _)| *s);
        let started = std::time::Instant::now();
        let result = if failed.load(Relaxed) {
            Err(io::Error::other(
                "raft log stream failed earlier: restart the chunkserver",
            ))
        } else {
            files.iter().try_for_each(|(_, f)| f.sync_data())
        };
        if result.is_err() {
            failed.store(true, Relaxed);
        }
        if !files.is_empty() {
            crate::metrics::raft_fsync(started.elapsed());
            FSYNCS.fetch_add(1, Relaxed);
            stats.fsyncs.fetch_add(1, Relaxed);
        }
        FLUSHED_APPENDS.fetch_add(batch.len() as u64, Relaxed);
        stats.flushed_appends.fetch_add(batch.len() as u64, Relaxed);
        for r in batch {
            r.callback.log_io_completed(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

/// The collector's thread: on each nudge, frees what it can and keeps a spare segment ready.
fn collect_loop(rx: mpsc::Receiver<()>, stream: Weak<Inner>) {
    while rx.recv().is_ok() {
        while rx.try_recv().is_ok() {}
        let Some(inner) = stream.upgrade() else {
            return;
        };
        let s = LogStream { inner };
        if let Err(e) = s.collect().and_then(|()| s.prepare_spare()) {
            tracing::error!(dir = %s.inner.dir.display(), error = %e, "raft log collector");
        }
    }
}

#[cfg(test)]
impl LogStream {
    /// The shared state, to wait until a closed stream is gone.
    pub(crate) fn inner_for_test(self) -> Arc<impl Sized> {
        self.inner
    }
}
