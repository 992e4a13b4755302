//! Raft types of a copyset: the commands its log carries and what applying them answers.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// A command of a copyset's raft log, applied to its DataStore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkCommand {
    /// Write `data` at `offset` of a chunk (creating it).
    Write {
        /// Chunk id.
        chunk_id: u64,
        /// Sequence number.
        sn: u64,
        /// Offset in the chunk.
        offset: u64,
        /// Data.
        data: Vec<u8>,
        /// Epoch of the writer.
        epoch: u64,
    },
    /// Delete a chunk.
    Delete {
        /// Chunk id.
        chunk_id: u64,
    },
}

/// Result of applying a command: a chunk status code (`curve.chunk.ChunkStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChunkResult {
    /// Status code.
    pub status: i32,
}

openraft::declare_raft_types!(
    /// Raft type configuration of a copyset.
    pub TypeConfig:
        D = ChunkCommand,
        R = ChunkResult,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// A storage error of a copyset's raft.
pub type StorageError = openraft::StorageError<u64>;
