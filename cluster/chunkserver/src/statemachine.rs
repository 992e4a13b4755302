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
//! Snapshot data is built in memory (meta + every chunk) for now: fine for tests and small
//! copysets; streaming chunk files is the next step for production chunk sizes.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::datastore::{DataStore, DataStoreError};
use crate::raft::{ChunkCommand, ChunkResult, StorageError, TypeConfig};

const SM_META: &str = "sm_meta";

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
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SnapshotImage {
    meta: Option<SnapshotMeta<u64, BasicNode>>,
    /// (chunk id, sn, epoch, data)
    chunks: Vec<(u64, u64, u64, Vec<u8>)>,
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
            Err(e) => {
                tracing::error!(error = %e, "apply failed");
                status::DISK_FAIL
            }
        };
        ChunkResult { status }
    }

    fn image(&self, meta: &SnapshotMeta<u64, BasicNode>) -> Result<Vec<u8>, StorageError> {
        let store = &self.inner.store;
        let mut image = SnapshotImage {
            meta: Some(meta.clone()),
            chunks: Vec::new(),
        };
        for id in store.chunk_ids() {
            let Some(m) = store.chunk_meta(id) else {
                continue;
            };
            let mut data = vec![0u8; store.chunk_size() as usize];
            match store.read_chunk(id, 0, &mut data) {
                Ok(()) => image.chunks.push((id, m.sn, m.epoch, data)),
                Err(DataStoreError::NotExist(_)) => {}
                Err(e) => return Err(StorageIOError::read_state_machine(&e).into()),
            }
        }
        bincode::serialize(&image).map_err(|e| StorageIOError::read_state_machine(&e).into())
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
        let data = self.image(&meta)?;
        self.save_meta(&meta)?;
        self.inner.state.lock().current = Some(meta.clone());
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
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
        let mut out = Vec::new();
        for entry in entries {
            let r = match &entry.payload {
                EntryPayload::Blank => ChunkResult::default(),
                EntryPayload::Normal(cmd) => self.apply_one(cmd),
                EntryPayload::Membership(m) => {
                    self.inner.state.lock().membership =
                        StoredMembership::new(Some(entry.log_id), m.clone());
                    ChunkResult::default()
                }
            };
            self.inner.state.lock().last_applied = Some(entry.log_id);
            out.push(r);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let image: SnapshotImage = bincode::deserialize(snapshot.get_ref()).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        let store = &self.inner.store;
        let keep: std::collections::HashSet<u64> = image.chunks.iter().map(|c| c.0).collect();
        for id in store.chunk_ids() {
            if !keep.contains(&id) {
                store.delete_chunk(id).map_err(sm_err)?;
            }
        }
        for (id, sn, epoch, data) in &image.chunks {
            if store.chunk_meta(*id).is_some_and(|m| m.epoch > *epoch) {
                // Newer than the snapshot here: the log replays the difference.
                continue;
            }
            store
                .write_chunk(*id, *sn, 0, data, *epoch)
                .map_err(sm_err)?;
        }
        self.save_meta(meta)?;
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
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
