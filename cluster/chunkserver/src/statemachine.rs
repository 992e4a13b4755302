//! The state machine of a copyset: applies ChunkCommands to its DataStore.
//!
//! Applying is idempotent (a write puts the same bytes at the same place; a delete of a
//! missing chunk is a no-op), which is what makes snapshots of live chunk files safe: a
//! snapshot holds the chunks as they are when it is taken, labelled with the last applied log
//! id; the entries after that id are applied again on a replica that installs it and end in
//! the same state (as braft snapshots of chunk files do in Curve).
//!
//! On restart the applied state starts from the last snapshot's meta (`sm_meta`); raft
//! replays the log from there.
//!
//! ConcurrentApply: within a batch of committed entries that carries at least
//! [`PARALLEL_APPLY_BYTES`], commands on different chunks are applied in parallel (hashed by
//! chunk id onto a few threads); commands on the same chunk are applied in log order. A smaller
//! batch is applied in order where it is: a thread costs more than the page-cache writes of a
//! few 4K entries.
//!
//! Snapshot data is streamed from and to the chunk files ([`crate::snapshot`]): building a
//! snapshot syncs the store and records the meta, nothing more; memory stays flat in the size
//! of the copyset.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use parking_lot::Mutex;

use crate::datastore::{DataStore, DataStoreError};
use crate::raft::{ChunkCommand, ChunkResult, StorageError, TypeConfig};
use crate::snapshot::SnapshotData;

const SM_META: &str = "sm_meta";
/// A snapshot being received from the leader.
const RECEIVED: &str = "snapshot.recv";

/// Threads a batch of chunk commands is spread over (by chunk) when applied.
const APPLY_WORKERS: usize = 4;

/// The data a batch carries before its chunks are applied in parallel.
const PARALLEL_APPLY_BYTES: usize = 1 << 20;

/// The bytes a command writes.
fn data_len(cmd: &ChunkCommand) -> usize {
    match cmd {
        ChunkCommand::Write { data, .. }
        | ChunkCommand::WriteOf { data, .. }
        | ChunkCommand::WriteClone { data, .. }
        | ChunkCommand::Fill { data, .. } => data.len(),
        ChunkCommand::Delete { .. }
        | ChunkCommand::DeleteSnapshots { .. }
        | ChunkCommand::Zero { .. } => 0,
    }
}

fn lane_of(cmd: &ChunkCommand) -> usize {
    let id = match cmd {
        ChunkCommand::Write { chunk_id, .. }
        | ChunkCommand::WriteOf { chunk_id, .. }
        | ChunkCommand::WriteClone { chunk_id, .. }
        | ChunkCommand::Fill { chunk_id, .. }
        | ChunkCommand::DeleteSnapshots { chunk_id, .. }
        | ChunkCommand::Zero { chunk_id, .. }
        | ChunkCommand::Delete { chunk_id } => *chunk_id,
    };
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % APPLY_WORKERS
}

/// Chunk status codes (`curve.chunk.ChunkStatus`) that applying can produce.
pub mod status {
    /// Success.
    pub const SUCCESS: i32 = 0;
    /// Disk failure.
    pub const DISK_FAIL: i32 = 2;
    /// Bad request.
    pub const INVALID_REQUEST: i32 = 4;
    /// No such chunk.
    pub const CHUNK_NOTEXIST: i32 = 7;
    /// Fenced writer.
    pub const EPOCH_TOO_OLD: i32 = 12;
    /// A chunk of another volume.
    pub const AUTH_FAILED: i32 = 13;
}

#[derive(Debug)]
struct Inner {
    store: Arc<DataStore>,
    dir: PathBuf,
    state: Mutex<SmState>,
}

#[derive(Debug, Default)]
struct SmState {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    current: Option<SnapshotMeta<u64, BasicNode>>,
    snapshot_seq: u64,
}

/// The state machine of one copyset. Clones share it (a clone is its snapshot builder).
#[derive(Debug, Clone)]
pub struct CopysetStateMachine {
    inner: Arc<Inner>,
}

fn sm_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

impl CopysetStateMachine {
    /// The state machine over `store`, keeping its meta in `dir`.
    pub fn open(store: Arc<DataStore>, dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut state = SmState::default();
        if let Ok(bytes) = std::fs::read(dir.join(SM_META)) {
            let meta: SnapshotMeta<u64, BasicNode> = bincode::deserialize(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            state.last_applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
            state.current = Some(meta);
        }
        Ok(CopysetStateMachine {
            inner: Arc::new(Inner {
                store,
                dir: dir.to_owned(),
                state: Mutex::new(state),
            }),
        })
    }

    /// The DataStore it applies to.
    pub fn store(&self) -> &Arc<DataStore> {
        &self.inner.store
    }

    fn apply_one(&self, cmd: &ChunkCommand) -> ChunkResult {
        let r = match cmd {
            ChunkCommand::Write {
                chunk_id,
                sn,
                offset,
                data,
                epoch,
            } => self
                .inner
                .store
                .write_chunk(*chunk_id, *sn, *offset, data, *epoch),
            ChunkCommand::WriteOf {
                volume,
                chunk_id,
                sn,
                offset,
                data,
                epoch,
            } => self
                .inner
                .store
                .write_chunk_of(*volume, *chunk_id, *sn, *offset, data, *epoch),
            ChunkCommand::WriteClone {
                volume,
                chunk_id,
                sn,
                offset,
                data,
                epoch,
            } => self.inner.store.write(&crate::datastore::WriteOp {
                volume: *volume,
                id: *chunk_id,
                sn: *sn,
                offset: *offset,
                data,
                epoch: *epoch,
                clone: true,
            }),
            ChunkCommand::Fill {
                volume,
                chunk_id,
                sn,
                offset,
                data,
            } => self
                .inner
                .store
                .fill(*volume, *chunk_id, *sn, *offset, data),
            ChunkCommand::DeleteSnapshots { chunk_id, live } => {
                self.inner.store.delete_snapshots(*chunk_id, live)
            }
            ChunkCommand::Zero {
                volume,
                chunk_id,
                sn,
                offset,
                len,
                epoch,
                keep_allocated,
            } => self.inner.store.zero(
                &crate::datastore::ZeroOp {
                    volume: *volume,
                    id: *chunk_id,
                    sn: *sn,
                    offset: *offset,
                    len: *len,
                    epoch: *epoch,
                },
                *keep_allocated,
            ),
            ChunkCommand::Delete { chunk_id } => match self.inner.store.delete_chunk(*chunk_id) {
                Err(DataStoreError::NotExist(_)) => Ok(()),
                r => r,
            },
        };
        let status = match r {
            Ok(()) => status::SUCCESS,
            Err(DataStoreError::Invalid(_)) => status::INVALID_REQUEST,
            Err(DataStoreError::NotExist(_)) => status::CHUNK_NOTEXIST,
            Err(DataStoreError::EpochTooOld { .. }) => status::EPOCH_TOO_OLD,
            Err(DataStoreError::WrongVolume { .. }) => status::AUTH_FAILED,
            Err(e) => {
                tracing::error!(error = %e, "apply failed");
                status::DISK_FAIL
            }
        };
        ChunkResult { status }
    }

    fn image(&self, meta: &SnapshotMeta<u64, BasicNode>) -> Result<SnapshotData, StorageError> {
        SnapshotData::image(&self.inner.store, meta)
            .map_err(|e| StorageIOError::read_state_machine(&e).into())
    }

    fn save_meta(&self, meta: &SnapshotMeta<u64, BasicNode>) -> Result<(), StorageError> {
        self.inner.store.sync().map_err(sm_err)?;
        let path = self.inner.dir.join(SM_META);
        let tmp = self.inner.dir.join("sm_meta.tmp");
        std::fs::write(&tmp, bincode::serialize(meta).map_err(sm_err)?).map_err(sm_err)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(sm_err)?;
        std::fs::rename(&tmp, &path).map_err(sm_err)?;
        crate::chunkfilepool::sync_dir(&path).map_err(sm_err)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for CopysetStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let meta = {
            let mut st = self.inner.state.lock();
            st.snapshot_seq += 1;
            let id = match st.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, st.snapshot_seq),
                None => format!("--{}", st.snapshot_seq),
            };
            SnapshotMeta {
                last_log_id: st.last_applied,
                last_membership: st.membership.clone(),
                snapshot_id: id,
            }
        };
        // Nothing is copied: the image reads the chunk files when it is read. The fsyncs of
        // the store run off the runtime's threads.
        let this = self.clone();
        let m = meta.clone();
        tokio::task::spawn_blocking(move || this.save_meta(&m))
            .await
            .map_err(sm_err)??;
        let data = self.image(&meta)?;
        self.inner.state.lock().current = Some(meta.clone());
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for CopysetStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError> {
        let st = self.inner.state.lock();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ChunkResult>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let mut out = vec![ChunkResult::default(); entries.len()];
        // ConcurrentApply: the chunk commands of the batch, grouped by a hash of their chunk,
        // run on up to APPLY_WORKERS threads; commands on one chunk keep their log order.
        let mut lanes: Vec<Vec<(usize, &ChunkCommand)>> = vec![Vec::new(); APPLY_WORKERS];
        let mut bytes = 0;
        for (i, e) in entries.iter().enumerate() {
            if let EntryPayload::Normal(cmd) = &e.payload {
                lanes[lane_of(cmd)].push((i, cmd));
                bytes += data_len(cmd);
            }
        }
        let busy = lanes.iter().filter(|l| !l.is_empty()).count();
        if busy <= 1 || bytes < PARALLEL_APPLY_BYTES {
            for (i, e) in entries.iter().enumerate() {
                if let EntryPayload::Normal(cmd) = &e.payload {
                    out[i] = self.apply_one(cmd);
                }
            }
        } else {
            let this: &CopysetStateMachine = self;
            let results: Vec<Vec<(usize, ChunkResult)>> = std::thread::scope(|s| {
                let handles: Vec<_> = lanes
                    .iter()
                    .filter(|l| !l.is_empty())
                    .map(|lane| {
                        s.spawn(move || lane.iter().map(|(i, c)| (*i, this.apply_one(c))).collect())
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("apply worker"))
                    .collect()
            });
            for (i, r) in results.into_iter().flatten() {
                out[i] = r;
            }
        }
        let mut st = self.inner.state.lock();
        for e in &entries {
            if let EntryPayload::Membership(m) = &e.payload {
                st.membership = StoredMembership::new(Some(e.log_id), m.clone());
            }
        }
        if let Some(last) = entries.last() {
            st.last_applied = Some(last.log_id);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        let path = self.inner.dir.join(RECEIVED);
        SnapshotData::receiving(&path)
            .map(Box::new)
            .map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        mut snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        // Chunk by chunk off the runtime's threads: a whole copyset is written here.
        let this = self.clone();
        let m = meta.clone();
        tokio::task::spawn_blocking(move || {
            let carried = snapshot.install(&this.inner.store).map_err(|e| {
                StorageError::from(StorageIOError::read_snapshot(Some(m.signature()), &e))
            })?;
            drop(snapshot);
            let _ = std::fs::remove_file(this.inner.dir.join(RECEIVED));
            if carried.last_log_id != m.last_log_id {
                tracing::warn!(?carried, meta = ?m, "the snapshot image carries another meta");
            }
            this.save_meta(&m)
        })
        .await
        .map_err(sm_err)??;
        let mut st = self.inner.state.lock();
        st.last_applied = meta.last_log_id;
        st.membership = meta.last_membership.clone();
        st.current = Some(meta.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(meta) = self.inner.state.lock().current.clone() else {
            return Ok(None);
        };
        let data = self.image(&meta)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;
    use openraft::testing::log_id;

    use super::*;
    use crate::chunkfilepool::{ChunkFilePool, PoolOptions};
    use crate::datastore::META_PAGE;

    /// Both ways of applying a batch: in order where it is (4K writes, under
    /// PARALLEL_APPLY_BYTES) and chunk by chunk on threads (whole 64K chunks: 1.5 MiB).
    #[test]
    fn concurrent_apply_keeps_per_chunk_order() {
        apply_keeps_per_chunk_order(4096);
        apply_keeps_per_chunk_order(64 << 10);
    }

    fn apply_keeps_per_chunk_order(len: usize) {
        let dir = tempfile::tempdir().unwrap();
        let pool = ChunkFilePool::open(
            &dir.path().join("pool"),
            PoolOptions {
                file_size: (64 << 10) + META_PAGE,
                target: 0,
            },
        )
        .unwrap();
        let store = Arc::new(DataStore::open(&dir.path().join("d"), 64 << 10, 4096, pool).unwrap());
        let mut sm = CopysetStateMachine::open(store.clone(), &dir.path().join("sm")).unwrap();
        let write = |chunk_id, v: u8, epoch| ChunkCommand::Write {
            chunk_id,
            sn: 1,
            offset: 0,
            data: vec![v; len].into(),
            epoch,
        };
        // Eight chunks, each written three times in order, one deleted, one fenced write.
        let mut cmds = Vec::new();
        for round in 1..=3u8 {
            for chunk in 0..8u64 {
                cmds.push(write(chunk, round * 10 + chunk as u8, u64::from(round)));
            }
        }
        cmds.push(ChunkCommand::Delete { chunk_id: 5 });
        cmds.push(write(6, 99, 1)); // epoch 1 < 3: fenced
        let entries: Vec<Entry<TypeConfig>> = cmds
            .into_iter()
            .enumerate()
            .map(|(i, c)| Entry {
                log_id: log_id(1, 1, i as u64 + 1),
                payload: EntryPayload::Normal(c),
            })
            .collect();
        let n = entries.len();
        let results = block_on(sm.apply(entries)).unwrap();
        assert_eq!(results.len(), n);
        assert_eq!(results[n - 1].status, status::EPOCH_TOO_OLD);
        assert!(results[..n - 1].iter().all(|r| r.status == status::SUCCESS));
        for chunk in 0..8u64 {
            let mut b = vec![0u8; len];
            if chunk == 5 {
                assert!(store.read_chunk(chunk, 0, &mut b).is_err());
                continue;
            }
            store.read_chunk(chunk, 0, &mut b).unwrap();
            assert_eq!(
                b,
                vec![30 + chunk as u8; len],
                "chunk {chunk}: the last write wins"
            );
        }
        let (applied, _) = block_on(sm.applied_state()).unwrap();
        assert_eq!(applied, Some(log_id(1, 1, n as u64)));
    }

    fn rss_mib() -> f64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb / 1024.0
    }

    /// Benchmark (not run by the suite; figures in docs/benchmarks.md): the memory a snapshot
    /// costs a copyset of 256 MiB (256 chunks of 1 MiB). Building one (log compaction) and
    /// streaming one to a follower, against what the in-memory image of before cost (every
    /// chunk read into memory), measured in the same run. Prints; asserts nothing about speed.
    #[test]
    #[ignore = "benchmark: run with --ignored --nocapture"]
    fn bench_snapshot_memory() {
        use std::io::Read;
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let pool = ChunkFilePool::open(
            &dir.path().join("pool"),
            PoolOptions {
                file_size: MIB + META_PAGE,
                target: 0,
            },
        )
        .unwrap();
        let store = Arc::new(DataStore::open(&dir.path().join("d"), MIB, 4096, pool).unwrap());
        let chunks = 256u64;
        let data = vec![0x5au8; MIB as usize];
        for id in 0..chunks {
            store.write_chunk(id, 1, 0, &data, 1).unwrap();
        }
        drop(data);
        let mut sm = CopysetStateMachine::open(store.clone(), &dir.path().join("sm")).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let base = rss_mib();
        let mut builder = rt.block_on(sm.get_snapshot_builder());
        let t = std::time::Instant::now();
        let snap = rt.block_on(builder.build_snapshot()).unwrap();
        let build = (rss_mib() - base, t.elapsed());
        // Streaming it to a follower: read in 1 MiB pieces, as openraft sends it.
        let mut image = snap.snapshot;
        let mut buf = vec![0u8; MIB as usize];
        let mut sent = 0u64;
        let mut peak = 0f64;
        let t = std::time::Instant::now();
        loop {
            let n = image.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            sent += n as u64;
            peak = peak.max(rss_mib() - base);
        }
        let stream = (peak, t.elapsed());
        // What the in-memory image cost: every chunk in memory, then serialised.
        let t = std::time::Instant::now();
        let mut all = Vec::new();
        for id in store.chunk_ids() {
            let mut d = vec![0u8; MIB as usize];
            store.read_chunk(id, 0, &mut d).unwrap();
            all.push(d);
        }
        let encoded = bincode::serialize(&all).unwrap();
        let old = (rss_mib() - base, t.elapsed());
        assert_eq!(encoded.len() as u64 / MIB, chunks);
        assert!(sent >= chunks * MIB);
        println!(
            "copyset of {chunks} MiB: build_snapshot +{:.1} MiB RSS in {:?}; streaming it +{:.1} MiB peak in {:?}; \
             the in-memory image of before: +{:.1} MiB in {:?}",
            build.0, build.1, stream.0, stream.1, old.0, old.1
        );
    }
}
