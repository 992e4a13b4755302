//! RaftLog: the raft log of one copyset (a group of the disk's [`LogStream`]).
//!
//! ```text
//!  <copyset>/raft/raft_meta    vote and last purged log id (bincode + crc32, written tmp +
//!                              fsync + rename)
//! ```
//!
//! The entries are records in the stream; the log keeps where each is ([`Loc`]) and the ones
//! appended last in memory ([`Recent`]). `append` writes its records and hands the fsync to the
//! stream's flusher, which syncs once for every append of every copyset queued since its last
//! sync and only then reports them flushed. `truncate` writes a truncation record and syncs it,
//! so entries past the cut cannot come back after a crash.
//!
//! A copyset whose directory still holds a log of the format before the stream
//! ([`crate::legacylog`]: segments of its own, bincode or protobuf entries) has it moved into the
//! stream when it opens, entry for entry, then deleted.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::chunkfilepool::sync_dir;
use crate::logstream::{Group, Kind, Loc, Locs, LogStream, Payload, Then};
use crate::raft::{StorageError, TypeConfig};

pub use crate::logstream::fsync_stats;

const META: &str = "raft_meta";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MetaRecord {
    vote: Option<Vote<u64>>,
    last_purged: Option<LogId<u64>>,
}

#[derive(Debug, Default)]
struct State {
    entries: Locs,
    meta: MetaRecord,
    recent: Recent,
}

/// Bytes of entries a log keeps in memory after appending them ([`Recent`]).
const RECENT_PER_LOG: u64 = 8 << 20;
/// The same, all logs of the process together.
const RECENT_PER_PROCESS: u64 = 32 << 20;
static RECENT_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Payloads under this size are copied into an allocation of their own when kept: a small
/// payload is a slice of the buffer its request arrived in (tonic's, 8 KiB at least for a 4K
/// write; a whole AppendEntries batch of up to 4 MiB on a follower), which it would keep alive,
/// so the bytes kept would be a fraction of the memory held. Larger ones are most of their
/// buffer and are shared.
const COMPACT_BELOW: usize = 64 << 10;

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
        let mut entry = entry;
        if let openraft::EntryPayload::Normal(cmd) = &mut entry.payload
            && let Some(data) = cmd.data_mut()
            && data.len() < COMPACT_BELOW
        {
            *data = bytes::Bytes::copy_from_slice(data);
        }
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

struct Inner {
    stream: LogStream,
    group: u64,
    dir: PathBuf,
    state: Mutex<State>,
    /// Bytes of records appended since the log was opened.
    appended: std::sync::atomic::AtomicU64,
    /// Bytes one AppendEntries carries now ([`AppendBudget`]).
    append_budget: Arc<AppendBudget>,
}

impl Group for Inner {
    fn with_locs(&self, f: &mut dyn FnMut(&mut Locs) -> io::Result<()>) -> io::Result<()> {
        f(&mut self.state.lock().entries)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Its entries stay live in the stream (the copyset opens again, or they are moved).
        let locs = std::mem::take(&mut self.state.get_mut().entries);
        let me = self as *const Inner as *const ();
        self.stream.close_group(self.group, me, locs);
    }
}

/// The raft log of one copyset. Clones share the same log (a clone is its reader).
#[derive(Clone)]
pub struct RaftLog {
    inner: Arc<Inner>,
}

impl Debug for RaftLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLog")
            .field("group", &self.inner.group)
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn io_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

/// The stream group of copyset `copyset` of logical pool `pool`.
pub fn group_id(pool: u32, copyset: u32) -> u64 {
    (u64::from(pool) << 32) | u64::from(copyset)
}

/// Bytes of entries moved from a log of the old format per stream write.
const MOVE_BATCH_BYTES: u64 = 4 << 20;

impl RaftLog {
    /// Opens (or creates) group `group`'s log in `stream`, with its vote and purge record in
    /// `dir`; a log of the format before the stream found in `dir` is moved into the stream.
    pub fn open(stream: &LogStream, group: u64, dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut meta = MetaRecord::default();
        if let Ok(bytes) = std::fs::read(dir.join(META)) {
            meta = decode_meta(&bytes).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is corrupt", dir.join(META).display()),
                )
            })?;
        }
        let inner = stream.open_group(group, |mut entries| {
            let purged = meta.last_purged.map(|l| l.index);
            if crate::legacylog::present(dir)? {
                move_legacy(stream, group, dir, purged, &mut entries)?;
            }
            // The entries after the purge point, up to the first gap.
            if let Some(p) = purged {
                entries = entries.split_off(&(p + 1));
            }
            let start = purged
                .map(|p| p + 1)
                .or_else(|| entries.first_key_value().map(|(i, _)| *i));
            let mut expect = start;
            let cut = entries.keys().find(|i| {
                let gap = Some(**i) != expect;
                expect = Some(**i + 1);
                gap
            });
            if let Some(&cut) = cut {
                tracing::warn!(
                    group,
                    index = cut,
                    "raft log: entries from a record lost in a crash on are dropped"
                );
                entries.split_off(&cut);
                // On disk too: the records past the gap must not come back after a purge
                // beyond them (a snapshot installed) and another restart.
                stream.write(group, Kind::Truncate, &[(cut, Payload::None)], Then::Sync)?;
            }
            Ok(Arc::new(Inner {
                stream: stream.clone(),
                group,
                dir: dir.to_owned(),
                state: Mutex::new(State {
                    entries,
                    meta: meta.clone(),
                    recent: Recent::default(),
                }),
                appended: Default::default(),
                append_budget: Arc::default(),
            }))
        })?;
        Ok(RaftLog { inner })
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

    /// Writes the records of `entries` (one pwrite per segment touched); `then` says who makes
    /// them durable.
    fn write_records(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
        then: Then,
    ) -> Result<(), StorageError> {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let mut st = self.inner.state.lock();
        let records: Vec<(u64, Payload<'_>)> = entries
            .iter()
            .map(|e| (e.log_id.index, Payload::Entry(e)))
            .collect();
        let w = self
            .inner
            .stream
            .write(self.inner.group, Kind::Append, &records, then)
            .map_err(io_err)?;
        drop(records);
        for (entry, (seq, offset, len)) in entries.into_iter().zip(w.at) {
            self.inner
                .appended
                .fetch_add(u64::from(len), std::sync::atomic::Ordering::Relaxed);
            let index = entry.log_id.index;
            // An append at `index` replaces what the log held from there on.
            if st
                .entries
                .last_key_value()
                .is_some_and(|(l, _)| *l >= index)
            {
                st.entries.split_off(&index);
                st.recent.forget_from(index);
            }
            st.entries.insert(
                index,
                Loc {
                    seq,
                    offset,
                    len,
                    log_id: entry.log_id,
                },
            );
            st.recent.keep(index, entry, u64::from(len));
        }
        Ok(())
    }

    /// Appends `entries` and syncs them (tests that build logs).
    #[cfg(test)]
    pub(crate) fn append_for_test(&self, entries: impl IntoIterator<Item = Entry<TypeConfig>>) {
        self.write_records(entries, Then::Sync).expect("append");
    }

    /// Reads entries in `range` (only those present).
    fn read(
        &self,
        range: impl RangeBounds<u64> + Clone,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        self.read_limited(range, u64::MAX)
    }

    /// Reads the entries of `range` up to about `max_bytes` of payload (always at least one).
    fn read_limited(
        &self,
        range: impl RangeBounds<u64> + Clone,
        max_bytes: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let read_err = |e: io::Error| StorageError::from(StorageIOError::read_logs(&e));
        // A record moved or freed between taking its place and reading it: look again.
        for _ in 0..8 {
            // Each entry from memory (Ok) or where to read it (Err).
            type Source = Result<Entry<TypeConfig>, Loc>;
            let locs: Vec<(u64, Source)> = {
                let st = self.inner.state.lock();
                let mut bytes = 0u64;
                st.entries
                    .range(range.clone())
                    .take_while(|(_, l)| {
                        let first = bytes == 0;
                        bytes += u64::from(l.len);
                        first || bytes <= max_bytes
                    })
                    .map(|(i, l)| {
                        (
                            *i,
                            match st.recent.entries.get(i) {
                                Some((e, _)) => Ok(e.clone()),
                                None => Err(*l),
                            },
                        )
                    })
                    .collect()
            };
            let mut out = Vec::with_capacity(locs.len());
            let mut moved = false;
            for (index, src) in locs {
                let l = match src {
                    Ok(entry) => {
                        out.push(entry);
                        continue;
                    }
                    Err(l) => l,
                };
                match self
                    .inner
                    .stream
                    .read(self.inner.group, index, &l)
                    .map_err(read_err)?
                {
                    Some(payload) => out
                        .push(crate::codec::decode_entry(payload.into()).map_err(|e| {
                            read_err(io::Error::new(io::ErrorKind::InvalidData, e))
                        })?),
                    None => {
                        moved = true;
                        break;
                    }
                }
            }
            if !moved {
                return Ok(out);
            }
        }
        Err(read_err(io::Error::other(
            "raft log entries were purged while being read",
        )))
    }
}

/// Moves the log of the old format in `dir` into the stream (entries after `purged`), syncs
/// them, deletes the old segments.
fn move_legacy(
    stream: &LogStream,
    group: u64,
    dir: &Path,
    purged: Option<u64>,
    entries: &mut Locs,
) -> io::Result<()> {
    let mut batch: Vec<Entry<TypeConfig>> = Vec::new();
    let mut bytes = 0u64;
    let mut files: Vec<(u64, Arc<File>)> = Vec::new();
    let mut moved = 0u64;
    let mut put = |batch: &mut Vec<Entry<TypeConfig>>| -> io::Result<()> {
        let records: Vec<(u64, Payload<'_>)> = batch
            .iter()
            .map(|e| (e.log_id.index, Payload::Entry(e)))
            .collect();
        // Rewrites: a move that a crash interrupted and that runs again replaces its own.
        let w = stream.write(group, Kind::Rewrite, &records, Then::Later)?;
        for (e, (seq, offset, len)) in batch.iter().zip(w.at) {
            entries.insert(
                e.log_id.index,
                Loc {
                    seq,
                    offset,
                    len,
                    log_id: e.log_id,
                },
            );
        }
        for (s, f) in w.files {
            if !files.iter().any(|(x, _)| *x == s) {
                files.push((s, f));
            }
        }
        moved += batch.len() as u64;
        batch.clear();
        Ok(())
    };
    crate::legacylog::read(dir, purged, |e| {
        bytes += crate::codec::EntryRecord::new(&e).len() as u64;
        batch.push(e);
        if bytes >= MOVE_BATCH_BYTES {
            bytes = 0;
            put(&mut batch)?;
        }
        Ok(())
    })?;
    put(&mut batch)?;
    files.sort_by_key(|(s, _)| *s);
    for (_, f) in &files {
        f.sync_data()?;
    }
    crate::legacylog::remove(dir)?;
    tracing::info!(
        group,
        entries = moved,
        dir = %dir.display(),
        "raft log of the per-copyset format moved into the disk's log stream"
    );
    Ok(())
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
        self.read_limited(start..end, self.inner.append_budget.get())
    }
}

/// The bytes one AppendEntries of a copyset carries, fitted to openraft's timeout for it (the
/// heartbeat interval, whatever is sent): the network halves it when an AppendEntries took
/// more than half that timeout or was abandoned at it, and grows it by a quarter when one
/// took less than a quarter. So replication under load sends what gets through in time
/// instead of retrying, forever, a batch that never does (a livelock seen with MiB batches
/// and 166 ms).
#[derive(Debug)]
pub struct AppendBudget(std::sync::atomic::AtomicU64);

/// The least an AppendEntries is cut to (it always carries at least one entry).
pub const MIN_APPEND_BYTES: u64 = 128 << 10;

impl Default for AppendBudget {
    fn default() -> Self {
        AppendBudget(std::sync::atomic::AtomicU64::new(MAX_APPEND_BYTES))
    }
}

impl AppendBudget {
    /// Bytes the next AppendEntries may carry.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// An AppendEntries was slow or abandoned: half as much next time.
    pub fn shrink(&self) {
        let _ = self.0.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |b| Some((b / 2).max(MIN_APPEND_BYTES)),
        );
    }

    /// An AppendEntries went through quickly: a quarter more next time.
    pub fn grow(&self) {
        let _ = self.0.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |b| Some((b + b / 4).min(MAX_APPEND_BYTES)),
        );
    }
}

impl RaftLog {
    /// The copyset's AppendEntries budget, which its network adapts.
    pub fn append_budget(&self) -> Arc<AppendBudget> {
        self.inner.append_budget.clone()
    }
}

/// Payload bytes per AppendEntries at most (at least one entry): the 1 MiB writes a client keeps in
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
        self.write_records(entries, Then::Flush(callback))
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let mut st = self.inner.state.lock();
        if !st.entries.contains_key(&log_id.index) {
            return Ok(());
        }
        st.entries.split_off(&log_id.index);
        st.recent.forget_from(log_id.index);
        self.inner
            .stream
            .write(
                self.inner.group,
                Kind::Truncate,
                &[(log_id.index, Payload::None)],
                Then::Sync,
            )
            .map_err(io_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let meta = {
            let mut st = self.inner.state.lock();
            st.meta.last_purged = Some(log_id);
            st.meta.clone()
        };
        // Durable before the entries are dropped: the stream may free their segments then.
        self.save_meta(&meta).map_err(io_err)?;
        {
            let mut st = self.inner.state.lock();
            st.entries = st.entries.split_off(&(log_id.index + 1));
            st.recent.forget_to(log_id.index);
        }
        self.inner.stream.nudge();
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

    /// A write entry of `len` bytes of `fill`.
    fn sized(index: u64, fill: u8, len: usize) -> Entry<TypeConfig> {
        of(index, vec![fill; len].into())
    }

    fn filled(index: u64, fill: u8) -> Entry<TypeConfig> {
        sized(index, fill, 1 << 20)
    }

    fn data_of(e: &Entry<TypeConfig>) -> bytes::Bytes {
        match &e.payload {
            openraft::EntryPayload::Normal(crate::raft::ChunkCommand::Write { data, .. }) => {
                data.clone()
            }
            p => panic!("not a write: {p:?}"),
        }
    }

    /// A stream in `<d>/stream` and groups with their meta in `<d>/g<n>`.
    struct Disk {
        dir: std::path::PathBuf,
        seg: u64,
        stream: Option<LogStream>,
    }

    impl Disk {
        fn new(dir: &Path, seg: u64) -> Self {
            let mut d = Disk {
                dir: dir.to_owned(),
                seg,
                stream: None,
            };
            d.stream = Some(LogStream::open(&d.dir.join("stream"), seg).unwrap());
            d
        }

        fn stream(&self) -> &LogStream {
            self.stream.as_ref().unwrap()
        }

        fn log(&self, g: u64) -> RaftLog {
            RaftLog::open(self.stream(), g, &self.dir.join(format!("g{g}"))).unwrap()
        }

        /// Closes the stream (every log of it dropped first) and opens it again: a restart.
        fn restart(&mut self) {
            let weak = Arc::downgrade(&self.stream.take().unwrap().inner_for_test());
            // The collector's thread may hold it a moment longer.
            while weak.strong_count() > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.stream = Some(LogStream::open(&self.dir.join("stream"), self.seg).unwrap());
        }

        fn segments(&self) -> usize {
            files(&self.dir.join("stream"), "seg_")
        }
    }

    fn write(log: &RaftLog, entries: impl IntoIterator<Item = Entry<TypeConfig>>) {
        log.write_records(entries, Then::Sync).unwrap();
    }

    fn indexes(log: &mut RaftLog) -> Vec<u64> {
        block_on(log.try_get_log_entries(0..u64::MAX))
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect()
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

    /// Two copysets' logs interleaved in one stream: each recovers its own entries, vote,
    /// truncation and purge after restarts.
    #[test]
    fn logs_interleaved_in_one_stream_recover_truncate_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Disk::new(dir.path(), 4096);
        let (mut a, b) = (disk.log(1), disk.log(2));
        for i in 1..40 {
            write(&a, [sized(i, 1, 100)]);
            write(&b, [sized(i, 2, 150)]);
        }
        block_on(a.save_vote(&Vote::new(3, 2))).unwrap();
        assert!(
            disk.segments() > 3,
            "small segments roll over: {}",
            disk.segments()
        );
        drop((a, b));
        disk.restart();
        let (mut a, mut b) = (disk.log(1), disk.log(2));
        assert_eq!(indexes(&mut a), (1..40).collect::<Vec<_>>());
        assert_eq!(indexes(&mut b), (1..40).collect::<Vec<_>>());
        assert_eq!(block_on(a.read_vote()).unwrap(), Some(Vote::new(3, 2)));
        assert_eq!(block_on(b.read_vote()).unwrap(), None);
        for e in a.read(0..u64::MAX).unwrap() {
            assert!(data_of(&e).iter().all(|x| *x == 1));
        }
        // Truncate one in the middle: its tail never comes back, even after a restart.
        block_on(a.truncate(log_id(1, 1, 25))).unwrap();
        write(&a, (25..30).map(|i| sized(i, 3, 100)));
        drop((a, b));
        disk.restart();
        let (mut a, mut b) = (disk.log(1), disk.log(2));
        assert_eq!(indexes(&mut a), (1..30).collect::<Vec<_>>());
        assert_eq!(indexes(&mut b), (1..40).collect::<Vec<_>>());
        // Purge: gone from reads, remembered as last purged.
        block_on(a.purge(log_id(1, 1, 20))).unwrap();
        block_on(b.purge(log_id(1, 1, 35))).unwrap();
        drop((a, b));
        disk.restart();
        let (mut a, mut b) = (disk.log(1), disk.log(2));
        assert_eq!(indexes(&mut a), (21..30).collect::<Vec<_>>());
        assert_eq!(indexes(&mut b), (36..40).collect::<Vec<_>>());
        let st = block_on(a.get_log_state()).unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(1, 1, 20)));
        assert_eq!(st.last_log_id, Some(log_id(1, 1, 29)));
        let got = a.read(25..30).unwrap();
        assert!(got.iter().all(|e| data_of(e).iter().all(|x| *x == 3)));
    }

    /// A deleted copyset's log: its entries are gone from the stream for good (after a
    /// restart too, so a replica created again later starts empty), they stop pinning
    /// segments, and the other group keeps its own.
    #[test]
    fn a_dropped_group_is_gone_after_restarts_and_frees_its_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Disk::new(dir.path(), 4096);
        let (a, b) = (disk.log(1), disk.log(2));
        for i in 1..40 {
            write(&a, [sized(i, 1, 100)]);
        }
        write(&b, [sized(1, 2, 100)]);
        let before = disk.segments();
        drop(a);
        disk.stream().drop_group(1).unwrap();
        assert!(disk.stream().closed_groups().is_empty());
        disk.stream().collect().unwrap();
        assert!(
            disk.segments() < before,
            "its segments are freed: {} then {}",
            before,
            disk.segments()
        );
        drop(b);
        disk.restart();
        assert_eq!(disk.stream().closed_groups(), vec![2]);
        let (mut a, mut b) = (disk.log(1), disk.log(2));
        assert!(indexes(&mut a).is_empty());
        assert_eq!(indexes(&mut b), vec![1]);
    }

    /// A truncation written and synced, then a crash before any new entry: the cut entries
    /// stay cut; entries of a newer term written in their place are the ones read back.
    #[test]
    fn entries_cut_by_a_truncation_stay_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Disk::new(dir.path(), 1 << 20);
        let mut log = disk.log(7);
        write(&log, (1..10).map(blank));
        block_on(log.truncate(log_id(1, 1, 5))).unwrap();
        drop(log);
        disk.restart();
        let mut log = disk.log(7);
        assert_eq!(indexes(&mut log), (1..5).collect::<Vec<_>>());
        write(
            &log,
            (5..7).map(|i| openraft::testing::blank_ent::<TypeConfig>(2, 1, i)),
        );
        drop(log);
        disk.restart();
        let mut log = disk.log(7);
        assert_eq!(indexes(&mut log), (1..7).collect::<Vec<_>>());
        let got = block_on(log.try_get_log_entries(5..7)).unwrap();
        assert!(got.iter().all(|e| e.log_id.leader_id.term == 2));
    }

    /// Purged entries free their segments (oldest first), which come back as new ones; their
    /// old records never read as new ones.
    #[test]
    fn purged_segments_are_freed_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 64 << 10;
        let mut disk = Disk::new(dir.path(), seg);
        let log = disk.log(1);
        let put = |log: &RaftLog, r: std::ops::Range<u64>, fill: u8| {
            write(log, r.map(|i| sized(i, fill, 10 << 10)));
        };
        put(&log, 1..60, 1);
        let before = disk.segments();
        block_on(log.clone().purge(log_id(1, 1, 40))).unwrap();
        disk.stream().collect().unwrap();
        let after = disk.segments();
        assert!(after + 3 <= before, "{before} -> {after} segments");
        let free = files(&dir.path().join("stream"), "free_");
        assert!(free >= 1, "freed segments kept for reuse");
        put(&log, 60..90, 2);
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
        check(&mut log.clone());
        assert!(
            disk.stream()
                .stats()
                .freed
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 3
        );
        drop(log);
        disk.restart();
        check(&mut disk.log(1));
    }

    /// A copyset that stops writing does not pin the stream: once the stream is more than
    /// twice what its logs hold, the idle log's entries are moved to its end and the old
    /// segments freed; both logs read back, also after a restart.
    #[test]
    fn an_idle_log_is_moved_not_kept_pinning_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 64 << 10;
        let mut disk = Disk::new(dir.path(), seg);
        let (idle, busy) = (disk.log(1), disk.log(2));
        write(&idle, (1..4).map(|i| sized(i, 9, 1000)));
        for round in 0..40u64 {
            let first = round * 10 + 1;
            write(&busy, (first..first + 10).map(|i| sized(i, 5, 2000)));
            block_on(busy.clone().purge(log_id(1, 1, first + 5))).unwrap();
            disk.stream().collect().unwrap();
        }
        let segs = disk.segments();
        assert!(segs <= 8, "{segs} segments for a few KiB of live entries");
        let moved = disk
            .stream()
            .stats()
            .rewritten
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(moved >= 3, "the idle log's entries were moved: {moved}");
        let check = |idle: &RaftLog, busy: &RaftLog| {
            let got = idle.read(0..u64::MAX).unwrap();
            assert_eq!(got.len(), 3);
            assert!(got.iter().all(|e| data_of(e).iter().all(|b| *b == 9)));
            let got = busy.read(0..u64::MAX).unwrap();
            assert_eq!(
                got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
                (397..401).collect::<Vec<_>>()
            );
        };
        check(&idle, &busy);
        drop((idle, busy));
        disk.restart();
        check(&disk.log(1), &disk.log(2));
    }

    /// A log of the format before the stream (bincode entries, the oldest; protobuf ones) is
    /// moved into the stream entry for entry when its copyset opens, its segments deleted,
    /// and continues there.
    #[test]
    fn a_log_of_the_per_copyset_format_is_moved_into_the_stream() {
        for protobuf in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut disk = Disk::new(dir.path(), 1 << 20);
            let mut old: Vec<Entry<TypeConfig>> = (1..6).map(|i| sized(i, i as u8, 3000)).collect();
            old[0] = blank(1);
            let gdir = dir.path().join("g3");
            crate::legacylog::write_for_test(&gdir, &old, protobuf);
            let log = disk.log(3);
            assert_eq!(log.read(0..u64::MAX).unwrap(), old);
            assert_eq!(files(&gdir, "log_"), 0, "old segments deleted");
            let new: Vec<Entry<TypeConfig>> = (6..9).map(|i| sized(i, 50 + i as u8, 700)).collect();
            write(&log, new.clone());
            drop(log);
            disk.restart();
            let mut log = disk.log(3);
            let all: Vec<_> = old.iter().chain(&new).cloned().collect();
            assert_eq!(block_on(log.try_get_log_entries(0..u64::MAX)).unwrap(), all);
        }
    }

    /// A whole record (its checksum right) that does not decode is refused with a message that
    /// names the file and the record, never taken for the end of the log (which would drop the
    /// acknowledged entries after it): in the stream and in a log of the old format.
    #[test]
    fn a_record_that_does_not_decode_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path(), 1 << 20);
        let log = disk.log(5);
        write(&log, (1..3).map(blank));
        drop(log);
        let path = dir.path().join("stream").join(format!("seg_{:020}", 1));
        drop(disk);
        // A record of group 5, index 3, garbage in place of an entry, its checksum right.
        let bytes = std::fs::read(&path).unwrap();
        let end = {
            let mut at = 0usize;
            while u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) != 0 {
                let len =
                    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) & ((1 << 29) - 1);
                at += crate::logstream::HEADER as usize + len as usize;
            }
            at
        };
        let payload = [0xffu8; 40];
        let mut header = Vec::new();
        header.extend_from_slice(&(40u32 | (1 << 31)).to_le_bytes());
        header.extend_from_slice(&[0; 4]);
        header.extend_from_slice(&5u64.to_le_bytes());
        header.extend_from_slice(&3u64.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&1u64.to_le_bytes());
        h.update(&header[0..4]);
        h.update(&header[8..24]);
        h.update(&payload);
        header[4..8].copy_from_slice(&h.finalize().to_le_bytes());
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&header, end as u64).unwrap();
        f.write_all_at(&payload, end as u64 + 24).unwrap();
        let e = LogStream::open(&dir.path().join("stream"), 1 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let msg = e.to_string();
        assert!(
            msg.contains("seg_00000000000000000001") && msg.contains("group 5 index 3"),
            "{msg}"
        );
        // A log of the old format: the copyset does not open, and says why.
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path(), 1 << 20);
        let gdir = dir.path().join("g1");
        crate::legacylog::write_for_test(&gdir, &[blank(1)], true);
        let seg = crate::legacylog::segment_path(&gdir, 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        let payload = [0xffu8; 40];
        let mut h = crc32fast::Hasher::new();
        h.update(&1u64.to_le_bytes());
        h.update(&payload);
        bytes.clear();
        bytes.extend_from_slice(&(40u32 | crate::legacylog::PROTOBUF).to_le_bytes());
        bytes.extend_from_slice(&h.finalize().to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&payload);
        bytes.resize(1 << 16, 0);
        std::fs::write(&seg, bytes).unwrap();
        let e = RaftLog::open(disk.stream(), 1, &gdir).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let msg = e.to_string();
        assert!(
            msg.contains("log_00000000000000000001") && msg.contains("record 1 does not decode"),
            "{msg}"
        );
        assert_eq!(files(&gdir, "log_"), 1, "the old log is kept");
    }

    #[test]
    fn append_entries_batches_are_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path(), 64 << 20);
        let mut log = disk.log(1);
        write(&log, (1..100).map(|i| sized(i, 7, 100 << 10)));
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
        // Slow AppendEntries halve the batches, down to a floor; quick ones grow them back.
        let budget = log.append_budget();
        for _ in 0..10 {
            budget.shrink();
        }
        assert_eq!(budget.get(), MIN_APPEND_BYTES);
        let got = block_on(log.limited_get_log_entries(1, 100)).unwrap();
        assert_eq!(got.len() as u64, MIN_APPEND_BYTES / (100 << 10));
        for _ in 0..40 {
            budget.grow();
        }
        assert_eq!(budget.get(), MAX_APPEND_BYTES);
        assert_eq!(
            block_on(log.limited_get_log_entries(1, 100)).unwrap().len() as u64,
            n
        );
    }

    /// A write entry whose payload is `data` (a slice of someone's buffer).
    fn of(index: u64, data: bytes::Bytes) -> Entry<TypeConfig> {
        let mut e = blank(index);
        e.payload = openraft::EntryPayload::Normal(crate::raft::ChunkCommand::Write {
            chunk_id: 1,
            sn: 0,
            offset: 0,
            data,
            epoch: 0,
        });
        e
    }

    #[test]
    fn small_payloads_kept_in_memory_do_not_hold_the_buffer_they_arrived_in() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path(), 64 << 20);
        let log = disk.log(1);
        // As a follower gets them: a 4K write and a 1 MiB one, slices of one 2 MiB request.
        let batch = bytes::Bytes::from(vec![7u8; 2 << 20]);
        let small = batch.slice(4096..8192);
        let large = batch.slice(1 << 20..2 << 20);
        write(&log, [of(1, small.clone()), of(2, large.clone())]);
        let got = log.read(1..3).unwrap();
        let within = |b: &bytes::Bytes| {
            let p = b.as_ptr() as usize;
            let base = batch.as_ptr() as usize;
            p >= base && p < base + batch.len()
        };
        assert_eq!(data_of(&got[0]), small);
        assert!(
            !within(&data_of(&got[0])),
            "the 4K payload was copied out of the 2 MiB buffer"
        );
        assert_eq!(data_of(&got[1]), large);
        assert_eq!(
            data_of(&got[1]).as_ptr(),
            large.as_ptr(),
            "the 1 MiB payload is shared"
        );
    }

    #[test]
    fn recent_entries_are_read_from_memory_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path(), 64 << 20);
        let log = disk.log(1);
        write(&log, (1..21).map(|i| filled(i, i as u8)));
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
        write(&log, (15..21).map(|i| filled(i, 100 + i as u8)));
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

    /// Damages the record of `index` of group `g` (its payload) in the stream.
    fn damage(disk: &Disk, g: u64, index: u64) {
        let log = disk.log(g);
        let l = log.inner.state.lock().entries[&index];
        drop(log);
        let path = disk.dir.join("stream").join(format!("seg_{:020}", l.seq));
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"garbage", l.offset + crate::logstream::HEADER + 1)
            .unwrap();
    }

    /// A torn record (a crash during its write): the log ends before it; another copyset's
    /// records before it are all there.
    #[test]
    fn a_torn_tail_is_cut_at_the_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Disk::new(dir.path(), 1 << 20);
        let (a, b) = (disk.log(1), disk.log(2));
        write(&b, (1..4).map(blank));
        write(&a, (1..6).map(blank));
        drop((a, b));
        damage(&disk, 1, 5);
        disk.restart();
        assert_eq!(indexes(&mut disk.log(1)), vec![1, 2, 3, 4]);
        assert_eq!(indexes(&mut disk.log(2)), vec![1, 2, 3]);
    }

    /// Log 1 with entries 1..9 in two segments, entry 4 lost (damaged) and the stream
    /// restarted: the log reads 1..3.
    fn log_with_a_gap(dir: &Path) -> (Disk, RaftLog) {
        let mut disk = Disk::new(dir, 1 << 20);
        let log = disk.log(1);
        write(&log, (1..6).map(blank));
        drop(log);
        disk.restart(); // the next records start a new segment
        let log = disk.log(1);
        write(&log, (6..9).map(blank));
        drop(log);
        damage(&disk, 1, 4);
        disk.restart();
        let mut log = disk.log(1);
        assert_eq!(indexes(&mut log), vec![1, 2, 3]);
        (disk, log)
    }

    /// A record lost in a crash while a later one of the same log (in a later segment) was
    /// written back: the log ends at the gap (neither was acknowledged), and the entries
    /// appended after the restart from there on are the ones it holds, restart after restart.
    #[test]
    fn a_gap_ends_the_log_and_new_entries_take_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let (mut disk, log) = log_with_a_gap(dir.path());
        write(
            &log,
            (4..6).map(|i| openraft::testing::blank_ent::<TypeConfig>(2, 1, i)),
        );
        drop(log);
        disk.restart();
        let mut log = disk.log(1);
        assert_eq!(indexes(&mut log), vec![1, 2, 3, 4, 5]);
        let got = block_on(log.try_get_log_entries(4..6)).unwrap();
        assert!(got.iter().all(|e| e.log_id.leader_id.term == 2));
    }

    /// The cut at a gap is on disk too: after a purge past the cut (a snapshot installed with
    /// no local entry at its index) and another restart, the records past the gap stay gone.
    #[test]
    fn the_cut_at_a_gap_survives_a_purge_and_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut disk, mut log) = log_with_a_gap(dir.path());
        block_on(log.purge(log_id(1, 1, 5))).unwrap();
        drop(log);
        disk.restart();
        let mut log = disk.log(1);
        assert_eq!(indexes(&mut log), Vec::<u64>::new());
        let st = block_on(log.get_log_state()).unwrap();
        assert_eq!(st.last_log_id, Some(log_id(1, 1, 5)));
    }

    /// A log opened twice at once is refused (two writers of one raft log).
    #[test]
    fn a_log_is_opened_once() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path(), 1 << 20);
        let log = disk.log(1);
        let e = RaftLog::open(disk.stream(), 1, &dir.path().join("g1")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        drop(log);
        disk.log(1);
    }
}
