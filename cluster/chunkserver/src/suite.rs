//! openraft's storage test suite against RaftLog + CopysetStateMachine on real files.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};

use crate::chunkfilepool::{ChunkFilePool, PoolOptions};
use crate::datastore::{DataStore, META_PAGE};
use crate::raft::{StorageError, TypeConfig};
use crate::raftlog::RaftLog;
use crate::statemachine::CopysetStateMachine;

struct Builder;

impl StoreBuilder<TypeConfig, RaftLog, CopysetStateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, RaftLog, CopysetStateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let pool = ChunkFilePool::open(
            &dir.path().join("pool"),
            PoolOptions {
                file_size: (64 << 10) + META_PAGE,
                target: 0,
            },
        )
        .expect("pool");
        let store = Arc::new(
            DataStore::open(&dir.path().join("data"), 64 << 10, 4096, pool).expect("datastore"),
        );
        // Small segments, so that the suite's logs span several of them.
        let log = RaftLog::open(&dir.path().join("raft"), 4096).expect("raft log");
        let sm = CopysetStateMachine::open(store, &dir.path().join("sm")).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}
