//! The chunkserver (seed 002): one process per data disk, holding copysets, each a raft group
//! whose state machine is the chunk files of its DataStore.
//!
//! ```text
//!  <data-dir>/chunkfilepool/   preformatted chunk files (ChunkFilePool)
//!  <data-dir>/copysets/<pool>_<copyset>/data/chunk_<id>   chunk files (DataStore)
//!  <data-dir>/copysets/<pool>_<copyset>/raft/raft_meta    vote, purge point (RaftLog)
//!  <data-dir>/copysets/raftlog/seg_<seq>                   every copyset's raft log records
//!                                                          (LogStream, one per disk)
//! ```
//!
//! The DataStore, the ChunkFilePool, the raft log store (RaftLog in a LogStream) and the state machine
//! (CopysetStateMachine, snapshots streamed from the chunk files), both checked by openraft's
//! testing suite; CopysetNode, the services and the daemon.

// openraft's StorageError (224 bytes) is the error type its storage traits require; our
// helpers return it so that `?` flows into those traits.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod chunkfilepool;
pub mod codec;
pub mod copyset;
pub mod daemon;
pub mod datastore;
pub mod disk;
pub mod identity;
pub mod legacylog;
pub mod logstream;
pub mod metrics;
pub mod network;
pub mod pagecache;
pub mod raft;
pub mod raftlog;
pub mod service;
pub mod snapshot;
pub mod statemachine;

#[cfg(test)]
mod suite;
