//! The RPC definitions of Curve-rs, generated at build time from `proto/*.proto` (no system
//! `protoc` needed: protox compiles them). The MDS reaches etcd through the `etcd-client` crate.
//!
//! ```text
//!  common     Peer, CopysetKey
//!  chunk      ChunkService: Read/Write/DeleteChunk, GetChunkInfo (+ reserved snapshot/clone RPCs)
//!  cli        CliService: GetLeader, AddPeer, RemovePeer, ChangePeers, TransferLeader, ResetPeer
//!  copyset    CopysetService: CreateCopysetNode, GetCopysetStatus
//!  heartbeat  HeartbeatService (MDS): Register, Heartbeat (replies carry ConfigChanges)
//!  raft       RaftService: AppendEntries, Vote, InstallSnapshot between chunkservers
//!  mds        MdsService: namespace, OpenFile/RefreshSession/CloseFile, GetOrAllocateSegment,
//!             GetCopysets, GetTopology
//!  layout     what FileInfo's chunk and stripe fields mean: volume offset -> chunk space
//! ```

#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]

pub mod layout;

/// Shared types.
pub mod common {
    tonic::include_proto!("curve.common");
}
/// Chunk I/O.
pub mod chunk {
    tonic::include_proto!("curve.chunk");
}
/// Raft configuration changes.
pub mod cli {
    tonic::include_proto!("curve.cli");
}
/// Copyset management.
pub mod copyset {
    tonic::include_proto!("curve.copyset");
}
/// Chunkserver registration and heartbeats.
pub mod heartbeat {
    tonic::include_proto!("curve.heartbeat");
}
/// Raft transport.
pub mod raft {
    tonic::include_proto!("curve.raft");
}
/// Client <-> MDS: namespace, sessions, segments, topology.
pub mod mds {
    tonic::include_proto!("curve.mds");
}
#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn messages_roundtrip_and_status_codes_are_stable() {
        let req = super::chunk::ChunkRequest {
            logical_pool_id: 1,
            copyset_id: 2,
            chunk_id: 3,
            offset: 4096,
            size: 4,
            data: bytes::Bytes::from_static(b"abcd"),
            epoch: 7,
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        assert_eq!(super::chunk::ChunkRequest::decode(&bytes[..]).unwrap(), req);
        assert_eq!(super::chunk::ChunkStatus::Redirected as i32, 1);
        assert_eq!(super::chunk::ChunkStatus::Overload as i32, 9);
        assert_eq!(super::chunk::ChunkStatus::EpochTooOld as i32, 12);
        assert!(super::chunk::ChunkRequest::decode(&[0xff, 0xff][..]).is_err());
    }

    /// Payloads decode as slices of the received buffer (no copy), as tonic hands them over.
    #[test]
    fn payloads_decode_without_a_copy() {
        let req = super::chunk::ChunkRequest {
            data: vec![9u8; 1 << 20].into(),
            ..Default::default()
        };
        let wire = bytes::Bytes::from(req.encode_to_vec());
        let back = super::chunk::ChunkRequest::decode(wire.clone()).unwrap();
        let at = back.data.as_ptr() as usize - wire.as_ptr() as usize;
        assert!(
            at + back.data.len() <= wire.len(),
            "the data is in the buffer"
        );
        assert_eq!(back, req);
    }
}
