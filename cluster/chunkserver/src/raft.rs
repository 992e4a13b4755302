//! Raft types of a copyset: the commands its log carries and what applying them answers.

use bytes::Bytes;
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
        /// Data: shared, not copied, from the request to the log and the state machine;
        /// encoded as one byte string (`Bytes` serialises as `serde_bytes` does), not element
        /// by element — the same bincode bytes either way, so logs written before read back
        /// unchanged.
        data: Bytes,
        /// Epoch of the writer.
        epoch: u64,
    },
    /// Delete a chunk.
    Delete {
        /// Chunk id.
        chunk_id: u64,
    },
    /// A write of a known volume (auth on: the ticket's): as `Write`, and the chunk records the
    /// volume (a chunk of another volume refuses it). A new variant at the end, so that logs
    /// written before decode unchanged.
    WriteOf {
        /// The volume.
        volume: u64,
        /// Chunk id.
        chunk_id: u64,
        /// Sequence number.
        sn: u64,
        /// Offset in the chunk.
        offset: u64,
        /// Data.
        data: Bytes,
        /// Epoch of the writer (the ticket's).
        epoch: u64,
    },
    /// A write to a chunk of a clone: as `WriteOf`, and a chunk it creates is a clone chunk
    /// (units not written read from the clone's source until filled).
    WriteClone {
        /// The volume (0: auth off).
        volume: u64,
        /// Chunk id.
        chunk_id: u64,
        /// Sequence number of the newest snapshot the writer knows.
        sn: u64,
        /// Offset in the chunk.
        offset: u64,
        /// Data.
        data: Bytes,
        /// Epoch of the writer.
        epoch: u64,
    },
    /// A fill of a clone chunk with its source's data: only units still unfilled take it.
    Fill {
        /// The volume (0: auth off).
        volume: u64,
        /// Chunk id.
        chunk_id: u64,
        /// Sequence number of the newest snapshot (recorded when the fill creates the chunk).
        sn: u64,
        /// Offset in the chunk.
        offset: u64,
        /// Data.
        data: Bytes,
    },
    /// Drops the COW files of a chunk that no snapshot in `live` reads.
    DeleteSnapshots {
        /// Chunk id.
        chunk_id: u64,
        /// Sequence numbers of the volume's live snapshots.
        live: Vec<u64>,
    },
    /// Makes `len` bytes at `offset` of a chunk read as zeros by punching a hole (TRIM,
    /// WRITE_ZEROES): fencing, volume and snapshots as a write; nothing written.
    Zero {
        /// The volume (0: auth off).
        volume: u64,
        /// Chunk id.
        chunk_id: u64,
        /// Sequence number of the newest snapshot the writer knows.
        sn: u64,
        /// Offset in the chunk.
        offset: u64,
        /// Length.
        len: u64,
        /// Epoch of the writer.
        epoch: u64,
        /// The range stays allocated (unwritten extents) instead of a hole.
        keep_allocated: bool,
    },
}

impl ChunkCommand {
    /// The payload of a command that carries one.
    pub fn data_mut(&mut self) -> Option<&mut Bytes> {
        match self {
            ChunkCommand::Write { data, .. }
            | ChunkCommand::WriteOf { data, .. }
            | ChunkCommand::WriteClone { data, .. }
            | ChunkCommand::Fill { data, .. } => Some(data),
            ChunkCommand::Delete { .. }
            | ChunkCommand::DeleteSnapshots { .. }
            | ChunkCommand::Zero { .. } => None,
        }
    }
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
        SnapshotData = crate::snapshot::SnapshotData,
);

/// A storage error of a copyset's raft.
pub type StorageError = openraft::StorageError<u64>;

#[cfg(test)]
mod encoding_tests {
    use super::*;

    /// The command as it was encoded before `serde_bytes` (a Vec<u8> element by element).
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    enum OldCommand {
        Write {
            chunk_id: u64,
            sn: u64,
            offset: u64,
            data: Vec<u8>,
            epoch: u64,
        },
        Delete {
            chunk_id: u64,
        },
    }

    /// Raft logs and snapshots written before read back the same, and the other way round.
    #[test]
    fn byte_strings_encode_as_before() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let old = OldCommand::Write {
            chunk_id: 9,
            sn: 1,
            offset: 4096,
            data: data.clone(),
            epoch: 3,
        };
        let new = ChunkCommand::Write {
            chunk_id: 9,
            sn: 1,
            offset: 4096,
            data: data.into(),
            epoch: 3,
        };
        let old_bytes = bincode::serialize(&old).unwrap();
        assert_eq!(bincode::serialize(&new).unwrap(), old_bytes);
        let back: ChunkCommand = bincode::deserialize(&old_bytes).unwrap();
        assert_eq!(back, new);
        let del = bincode::serialize(&OldCommand::Delete { chunk_id: 4 }).unwrap();
        assert_eq!(
            bincode::deserialize::<ChunkCommand>(&del).unwrap(),
            ChunkCommand::Delete { chunk_id: 4 }
        );
    }
}
