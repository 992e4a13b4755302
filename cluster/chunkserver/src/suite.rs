//! openraft's storage test suite against RaftLog + CopysetStateMachine on real files.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};

use crate::chunkfilepool::{ChunkFilePool, PoolOptions};
use crate::datastore::{DataStore, META_PAGE};
use crate::logstream::LogStream;
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
        // Small segments, so that the suite's logs span several of them; and in the stream
        // another copyset's (closed) log, whose entries the collector moves along.
        let stream = LogStream::open(&dir.path().join("raftlog"), 4096).expect("log stream");
        let other = RaftLog::open(&stream, 99, &dir.path().join("other")).expect("raft log");
        let entries = (0..3).map(|i| openraft::testing::blank_ent::<TypeConfig>(1, 1, i));
        other.append_for_test(entries);
        drop(other);
        let log = RaftLog::open(&stream, 1, &dir.path().join("raft")).expect("raft log");
        let sm = CopysetStateMachine::open(store, &dir.path().join("sm")).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}
