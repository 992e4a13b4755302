//! The chunkserver (seed 002): one process per data disk, holding copysets, each a raft group
//! whose state machine is the chunk files of its DataStore.
//!
//! ```text
//!  <data-dir>/chunkfilepool/   preformatted chunk files (ChunkFilePool)
//!  <data-dir>/copysets/<pool>_<copyset>/data/chunk_<id>   chunk files (DataStore)
//! ```
//!
//! Built so far: the DataStore and the ChunkFilePool. Raft (CopysetNode), the services and the
//! daemon come next.

pub mod chunkfilepool;
pub mod datastore;
