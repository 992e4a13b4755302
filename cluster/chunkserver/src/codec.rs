//! The protobuf form of a copyset's raft messages and log entries (proto/raft.proto): what the
//! raft log stores and the chunkservers send each other, in a format that stays readable across
//! versions (bincode of openraft's types changes with any field of theirs).
//!
//! Encoding is total; decoding checks every required field and names what is missing or
//! unknown (an entry of a kind this version does not know is an error, never a guess).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bytes::Bytes;
use openraft::error::{InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta,
    SnapshotSegmentId, StoredMembership, Vote,
};
use prost::Message;

use curve_proto::raft as pb;

use crate::raft::{ChunkCommand, TypeConfig};

/// A message that does not decode: what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

impl From<prost::DecodeError> for CodecError {
    fn from(e: prost::DecodeError) -> Self {
        CodecError(format!("not a protobuf message: {e}"))
    }
}

fn missing(what: &str) -> CodecError {
    CodecError(format!("{what} is missing"))
}

fn vote_pb(v: &Vote<u64>) -> pb::Vote {
    pb::Vote {
        term: v.leader_id.term,
        node_id: v.leader_id.node_id,
        committed: v.committed,
    }
}

fn vote_of(v: Option<pb::Vote>) -> Result<Vote<u64>, CodecError> {
    let v = v.ok_or_else(|| missing("vote"))?;
    Ok(if v.committed {
        Vote::new_committed(v.term, v.node_id)
    } else {
        Vote::new(v.term, v.node_id)
    })
}

fn log_id_pb(l: &LogId<u64>) -> pb::LogId {
    pb::LogId {
        term: l.leader_id.term,
        node_id: l.leader_id.node_id,
        index: l.index,
    }
}

fn log_id_of(l: pb::LogId) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(l.term, l.node_id), l.index)
}

fn membership_pb(m: &Membership<u64, BasicNode>) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| pb::NodeIds {
                ids: c.iter().copied().collect(),
            })
            .collect(),
        nodes: m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect(),
    }
}

fn membership_of(m: pb::Membership) -> Result<Membership<u64, BasicNode>, CodecError> {
    let configs: Vec<BTreeSet<u64>> = m
        .configs
        .into_iter()
        .map(|c| c.ids.into_iter().collect())
        .collect();
    if configs.is_empty() {
        return Err(missing("membership's voter set"));
    }
    let nodes: BTreeMap<u64, BasicNode> = m
        .nodes
        .into_iter()
        .map(|(id, addr)| (id, BasicNode { addr }))
        .collect();
    if let Some(id) = configs.iter().flatten().find(|id| !nodes.contains_key(id)) {
        return Err(CodecError(format!(
            "membership's voter {id} has no address"
        )));
    }
    Ok(Membership::new(configs, nodes))
}

fn write_pb(
    volume: u64,
    chunk_id: u64,
    sn: u64,
    offset: u64,
    data: &Bytes,
    epoch: u64,
) -> pb::WriteCommand {
    pb::WriteCommand {
        volume,
        chunk_id,
        sn,
        offset,
        data: data.clone(),
        epoch,
    }
}

fn command_pb(c: &ChunkCommand) -> pb::ChunkCommand {
    use pb::chunk_command::Command as C;
    let command = match c {
        ChunkCommand::Write {
            chunk_id,
            sn,
            offset,
            data,
            epoch,
        } => C::Write(write_pb(0, *chunk_id, *sn, *offset, data, *epoch)),
        ChunkCommand::Delete { chunk_id } => C::Delete(pb::DeleteCommand {
            chunk_id: *chunk_id,
        }),
        ChunkCommand::WriteOf {
            volume,
            chunk_id,
            sn,
            offset,
            data,
            epoch,
        } => C::WriteOf(write_pb(*volume, *chunk_id, *sn, *offset, data, *epoch)),
        ChunkCommand::WriteClone {
            volume,
            chunk_id,
            sn,
            offset,
            data,
            epoch,
        } => C::WriteClone(write_pb(*volume, *chunk_id, *sn, *offset, data, *epoch)),
        ChunkCommand::Fill {
            volume,
            chunk_id,
            sn,
            offset,
            data,
        } => C::Fill(write_pb(*volume, *chunk_id, *sn, *offset, data, 0)),
        ChunkCommand::DeleteSnapshots { chunk_id, live } => {
            C::DeleteSnapshots(pb::DeleteSnapshotsCommand {
                chunk_id: *chunk_id,
                live: live.clone(),
            })
        }
        ChunkCommand::Zero {
            volume,
            chunk_id,
            sn,
            offset,
            len,
            epoch,
            keep_allocated,
        } => C::Zero(pb::ZeroCommand {
            volume: *volume,
            chunk_id: *chunk_id,
            sn: *sn,
            offset: *offset,
            length: *len,
            epoch: *epoch,
            keep_allocated: *keep_allocated,
        }),
    };
    pb::ChunkCommand {
        command: Some(command),
    }
}

fn command_of(c: pb::ChunkCommand) -> Result<ChunkCommand, CodecError> {
    use pb::chunk_command::Command as C;
    Ok(
        match c
            .command
            .ok_or_else(|| CodecError("a command of an unknown kind".into()))?
        {
            C::Write(w) => ChunkCommand::Write {
                chunk_id: w.chunk_id,
                sn: w.sn,
                offset: w.offset,
                data: w.data,
                epoch: w.epoch,
            },
            C::Delete(d) => ChunkCommand::Delete {
                chunk_id: d.chunk_id,
            },
            C::WriteOf(w) => ChunkCommand::WriteOf {
                volume: w.volume,
                chunk_id: w.chunk_id,
                sn: w.sn,
                offset: w.offset,
                data: w.data,
                epoch: w.epoch,
            },
            C::WriteClone(w) => ChunkCommand::WriteClone {
                volume: w.volume,
                chunk_id: w.chunk_id,
                sn: w.sn,
                offset: w.offset,
                data: w.data,
                epoch: w.epoch,
            },
            C::Fill(w) => ChunkCommand::Fill {
                volume: w.volume,
                chunk_id: w.chunk_id,
                sn: w.sn,
                offset: w.offset,
                data: w.data,
            },
            C::DeleteSnapshots(d) => ChunkCommand::DeleteSnapshots {
                chunk_id: d.chunk_id,
                live: d.live,
            },
            C::Zero(z) => ChunkCommand::Zero {
                volume: z.volume,
                chunk_id: z.chunk_id,
                sn: z.sn,
                offset: z.offset,
                len: z.length,
                epoch: z.epoch,
                keep_allocated: z.keep_allocated,
            },
        },
    )
}

fn entry_pb(e: &Entry<TypeConfig>) -> pb::Entry {
    use pb::entry::Payload as P;
    pb::Entry {
        log_id: Some(log_id_pb(&e.log_id)),
        payload: Some(match &e.payload {
            EntryPayload::Blank => P::Blank(pb::Blank {}),
            EntryPayload::Normal(c) => P::Command(command_pb(c)),
            EntryPayload::Membership(m) => P::Membership(membership_pb(m)),
        }),
    }
}

fn entry_of(e: pb::Entry) -> Result<Entry<TypeConfig>, CodecError> {
    use pb::entry::Payload as P;
    let log_id = log_id_of(e.log_id.ok_or_else(|| missing("entry's log id"))?);
    let payload = match e
        .payload
        .ok_or_else(|| CodecError(format!("entry {} is of an unknown kind", log_id.index)))?
    {
        P::Blank(_) => EntryPayload::Blank,
        P::Command(c) => EntryPayload::Normal(command_of(c)?),
        P::Membership(m) => EntryPayload::Membership(membership_of(m)?),
    };
    Ok(Entry { log_id, payload })
}

/// A log entry, as the raft log stores it.
pub fn encode_entry(e: &Entry<TypeConfig>) -> Vec<u8> {
    entry_pb(e).encode_to_vec()
}

/// A log entry ready to be encoded where its record goes (its length known first, for the
/// record's header; payloads shared, not copied, until then).
#[derive(Debug)]
pub struct EntryRecord(pb::Entry);

impl EntryRecord {
    /// The entry's message.
    pub fn new(e: &Entry<TypeConfig>) -> Self {
        EntryRecord(entry_pb(e))
    }

    /// Bytes [`encode_into`](Self::encode_into) appends.
    pub fn len(&self) -> usize {
        self.0.encoded_len()
    }

    /// Whether it encodes to nothing (never: an entry has a log id).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the encoded entry to `buf`.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        self.0.encode_raw(buf);
    }
}

/// A log entry from its record (its payloads share `buf`).
pub fn decode_entry(buf: Bytes) -> Result<Entry<TypeConfig>, CodecError> {
    entry_of(pb::Entry::decode(buf)?)
}

/// An AppendEntries request.
pub fn encode_append(r: &AppendEntriesRequest<TypeConfig>) -> Vec<u8> {
    pb::AppendEntries {
        vote: Some(vote_pb(&r.vote)),
        prev_log_id: r.prev_log_id.as_ref().map(log_id_pb),
        entries: r.entries.iter().map(entry_pb).collect(),
        leader_commit: r.leader_commit.as_ref().map(log_id_pb),
    }
    .encode_to_vec()
}

/// An AppendEntries request from its message (entries' payloads share `buf`).
pub fn decode_append(buf: Bytes) -> Result<AppendEntriesRequest<TypeConfig>, CodecError> {
    let m = pb::AppendEntries::decode(buf)?;
    Ok(AppendEntriesRequest {
        vote: vote_of(m.vote)?,
        prev_log_id: m.prev_log_id.map(log_id_of),
        entries: m
            .entries
            .into_iter()
            .map(entry_of)
            .collect::<Result<_, _>>()?,
        leader_commit: m.leader_commit.map(log_id_of),
    })
}

/// The receiver's answer to AppendEntries (a fatal error as its message).
pub fn encode_append_reply(r: &Result<AppendEntriesResponse<u64>, RaftError<u64>>) -> Vec<u8> {
    use pb::append_entries_reply::Reply;
    let reply = match r {
        Ok(AppendEntriesResponse::Success) => Reply::Success(pb::Blank {}),
        Ok(AppendEntriesResponse::PartialSuccess(m)) => Reply::PartialSuccess(pb::PartialSuccess {
            matching: m.as_ref().map(log_id_pb),
        }),
        Ok(AppendEntriesResponse::Conflict) => Reply::Conflict(pb::Blank {}),
        Ok(AppendEntriesResponse::HigherVote(v)) => Reply::HigherVote(vote_pb(v)),
        Err(e) => Reply::Fatal(e.to_string()),
    };
    pb::AppendEntriesReply { reply: Some(reply) }.encode_to_vec()
}

/// What a peer's raft cannot answer (stopped, a storage error): its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFatal(pub String);

impl fmt::Display for RemoteFatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the peer's raft failed: {}", self.0)
    }
}

impl std::error::Error for RemoteFatal {}

/// A reply to AppendEntries: the answer, or the peer's fatal error.
pub fn decode_append_reply(
    buf: Bytes,
) -> Result<Result<AppendEntriesResponse<u64>, RemoteFatal>, CodecError> {
    use pb::append_entries_reply::Reply;
    let m = pb::AppendEntriesReply::decode(buf)?;
    Ok(
        match m
            .reply
            .ok_or_else(|| CodecError("an AppendEntries reply of an unknown kind".into()))?
        {
            Reply::Success(_) => Ok(AppendEntriesResponse::Success),
            Reply::PartialSuccess(p) => Ok(AppendEntriesResponse::PartialSuccess(
                p.matching.map(log_id_of),
            )),
            Reply::Conflict(_) => Ok(AppendEntriesResponse::Conflict),
            Reply::HigherVote(v) => Ok(AppendEntriesResponse::HigherVote(vote_of(Some(v))?)),
            Reply::Fatal(s) => Err(RemoteFatal(s)),
        },
    )
}

/// A Vote request.
pub fn encode_vote(r: &VoteRequest<u64>) -> Vec<u8> {
    pb::VoteRequest {
        vote: Some(vote_pb(&r.vote)),
        last_log_id: r.last_log_id.as_ref().map(log_id_pb),
    }
    .encode_to_vec()
}

/// A Vote request from its message.
pub fn decode_vote(buf: Bytes) -> Result<VoteRequest<u64>, CodecError> {
    let m = pb::VoteRequest::decode(buf)?;
    Ok(VoteRequest {
        vote: vote_of(m.vote)?,
        last_log_id: m.last_log_id.map(log_id_of),
    })
}

/// The receiver's answer to Vote.
pub fn encode_vote_reply(r: &Result<VoteResponse<u64>, RaftError<u64>>) -> Vec<u8> {
    match r {
        Ok(v) => pb::VoteReply {
            vote: Some(vote_pb(&v.vote)),
            vote_granted: v.vote_granted,
            last_log_id: v.last_log_id.as_ref().map(log_id_pb),
            fatal: String::new(),
        },
        Err(e) => pb::VoteReply {
            fatal: e.to_string(),
            ..Default::default()
        },
    }
    .encode_to_vec()
}

/// A reply to Vote: the answer, or the peer's fatal error.
pub fn decode_vote_reply(buf: Bytes) -> Result<Result<VoteResponse<u64>, RemoteFatal>, CodecError> {
    let m = pb::VoteReply::decode(buf)?;
    if !m.fatal.is_empty() {
        return Ok(Err(RemoteFatal(m.fatal)));
    }
    Ok(Ok(VoteResponse {
        vote: vote_of(m.vote)?,
        vote_granted: m.vote_granted,
        last_log_id: m.last_log_id.map(log_id_of),
    }))
}

fn snapshot_meta_pb(m: &SnapshotMeta<u64, BasicNode>) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: m.last_log_id.as_ref().map(log_id_pb),
        last_membership_log_id: m.last_membership.log_id().as_ref().map(log_id_pb),
        last_membership: Some(membership_pb(m.last_membership.membership())),
        snapshot_id: m.snapshot_id.clone(),
    }
}

fn snapshot_meta_of(m: pb::SnapshotMeta) -> Result<SnapshotMeta<u64, BasicNode>, CodecError> {
    let membership = m
        .last_membership
        .ok_or_else(|| missing("snapshot's membership"))?;
    Ok(SnapshotMeta {
        last_log_id: m.last_log_id.map(log_id_of),
        last_membership: StoredMembership::new(
            m.last_membership_log_id.map(log_id_of),
            // A snapshot of a copyset that never had a membership has none.
            if membership.configs.is_empty() {
                Membership::default()
            } else {
                membership_of(membership)?
            },
        ),
        snapshot_id: m.snapshot_id,
    })
}

/// An InstallSnapshot request (one piece of a snapshot).
pub fn encode_snapshot(r: &InstallSnapshotRequest<TypeConfig>) -> Vec<u8> {
    pb::InstallSnapshot {
        vote: Some(vote_pb(&r.vote)),
        meta: Some(snapshot_meta_pb(&r.meta)),
        offset: r.offset,
        data: Bytes::copy_from_slice(&r.data),
        done: r.done,
    }
    .encode_to_vec()
}

/// An InstallSnapshot request from its message.
pub fn decode_snapshot(buf: Bytes) -> Result<InstallSnapshotRequest<TypeConfig>, CodecError> {
    let m = pb::InstallSnapshot::decode(buf)?;
    Ok(InstallSnapshotRequest {
        vote: vote_of(m.vote)?,
        meta: snapshot_meta_of(m.meta.ok_or_else(|| missing("snapshot's meta"))?)?,
        offset: m.offset,
        data: m.data.into(),
        done: m.done,
    })
}

/// The receiver's answer to InstallSnapshot.
pub fn encode_snapshot_reply(
    r: &Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>,
) -> Vec<u8> {
    match r {
        Ok(v) => pb::InstallSnapshotReply {
            vote: Some(vote_pb(&v.vote)),
            ..Default::default()
        },
        Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => {
            pb::InstallSnapshotReply {
                mismatch: Some(pb::SnapshotMismatch {
                    expect_id: m.expect.id.clone(),
                    expect_offset: m.expect.offset,
                    got_id: m.got.id.clone(),
                    got_offset: m.got.offset,
                }),
                ..Default::default()
            }
        }
        Err(e) => pb::InstallSnapshotReply {
            fatal: e.to_string(),
            ..Default::default()
        },
    }
    .encode_to_vec()
}

/// A reply to InstallSnapshot: the answer, the peer's mismatch, or its fatal error.
pub fn decode_snapshot_reply(
    buf: Bytes,
) -> Result<Result<InstallSnapshotResponse<u64>, SnapshotReplyError>, CodecError> {
    let m = pb::InstallSnapshotReply::decode(buf)?;
    if let Some(x) = m.mismatch {
        return Ok(Err(SnapshotReplyError::Mismatch(SnapshotMismatch {
            expect: SnapshotSegmentId {
                id: x.expect_id,
                offset: x.expect_offset,
            },
            got: SnapshotSegmentId {
                id: x.got_id,
                offset: x.got_offset,
            },
        })));
    }
    if !m.fatal.is_empty() {
        return Ok(Err(SnapshotReplyError::Fatal(RemoteFatal(m.fatal))));
    }
    Ok(Ok(InstallSnapshotResponse {
        vote: vote_of(m.vote)?,
    }))
}

/// Why a peer did not take a piece of a snapshot.
#[derive(Debug)]
pub enum SnapshotReplyError {
    /// It expected another piece.
    Mismatch(SnapshotMismatch),
    /// Its raft failed.
    Fatal(RemoteFatal),
}

/// The fuzz target's body (`fuzz/`): arbitrary bytes never panic a decoder, and what decodes
/// encodes back to a message that decodes to the same.
pub fn fuzz_raft_messages(data: &[u8]) {
    let buf = Bytes::copy_from_slice(data);
    if let Ok(e) = decode_entry(buf.clone()) {
        assert_eq!(decode_entry(encode_entry(&e).into()).unwrap(), e);
    }
    if let Ok(r) = decode_append(buf.clone()) {
        let back = decode_append(encode_append(&r).into()).unwrap();
        assert_eq!(
            (
                back.vote,
                back.prev_log_id,
                back.leader_commit,
                back.entries
            ),
            (r.vote, r.prev_log_id, r.leader_commit, r.entries)
        );
    }
    if let Ok(r) = decode_vote(buf.clone()) {
        assert_eq!(decode_vote(encode_vote(&r).into()).unwrap(), r);
    }
    if let Ok(r) = decode_snapshot(buf.clone()) {
        assert_eq!(decode_snapshot(encode_snapshot(&r).into()).unwrap(), r);
    }
    let _ = decode_append_reply(buf.clone());
    let _ = decode_vote_reply(buf.clone());
    let _ = decode_snapshot_reply(buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::error::Fatal;

    fn node(id: u64) -> (u64, BasicNode) {
        (id, BasicNode::new(format!("127.0.0.1:{}", 8200 + id)))
    }

    fn entries() -> Vec<Entry<TypeConfig>> {
        let id = |t, n, i| LogId::new(CommittedLeaderId::new(t, n), i);
        let data = Bytes::from((0..4096u32).map(|i| i as u8).collect::<Vec<_>>());
        let members: BTreeMap<u64, BasicNode> = [node(1), node(2), node(3)].into();
        let joint = Membership::new(
            vec![[1, 2, 3].into(), [2, 3, 4].into()],
            [node(1), node(2), node(3), node(4), node(5)]
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
        );
        let cmds = [
            ChunkCommand::Write {
                chunk_id: 7,
                sn: 1,
                offset: 8192,
                data: data.clone(),
                epoch: 3,
            },
            ChunkCommand::Delete { chunk_id: 9 },
            ChunkCommand::WriteOf {
                volume: 5,
                chunk_id: 7,
                sn: 2,
                offset: 0,
                data: data.slice(..512),
                epoch: 4,
            },
            ChunkCommand::WriteClone {
                volume: 5,
                chunk_id: 8,
                sn: 2,
                offset: 4096,
                data: Bytes::new(),
                epoch: 1,
            },
            ChunkCommand::Fill {
                volume: 6,
                chunk_id: 8,
                sn: 3,
                offset: 0,
                data: data.clone(),
            },
            ChunkCommand::DeleteSnapshots {
                chunk_id: 8,
                live: vec![1, 4, 9],
            },
            ChunkCommand::Zero {
                volume: 5,
                chunk_id: 7,
                sn: 2,
                offset: 4096,
                len: 1 << 20,
                epoch: 4,
                keep_allocated: true,
            },
        ];
        let mut out = vec![
            Entry {
                log_id: id(0, 0, 0),
                payload: EntryPayload::Membership(Membership::from(members)),
            },
            Entry {
                log_id: id(1, 2, 1),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: id(1, 2, 2),
                payload: EntryPayload::Membership(joint),
            },
        ];
        for (i, c) in cmds.into_iter().enumerate() {
            out.push(Entry {
                log_id: id(2, 3, 3 + i as u64),
                payload: EntryPayload::Normal(c),
            });
        }
        out
    }

    #[test]
    fn entries_roundtrip() {
        for e in entries() {
            let back = decode_entry(encode_entry(&e).into()).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn rpcs_roundtrip() {
        let append = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(4, 2),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 10)),
            entries: entries(),
            leader_commit: None,
        };
        let back = decode_append(encode_append(&append).into()).unwrap();
        assert_eq!(back.vote, append.vote);
        assert_eq!(back.prev_log_id, append.prev_log_id);
        assert_eq!(back.entries, append.entries);
        assert_eq!(back.leader_commit, None);
        for r in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::PartialSuccess(append.prev_log_id),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(9, 3)),
        ] {
            let b = decode_append_reply(encode_append_reply(&Ok(r.clone_for_test())).into());
            assert_eq!(b.unwrap().unwrap(), r);
        }
        let fatal = encode_append_reply(&Err(RaftError::Fatal(Fatal::Stopped)));
        assert_eq!(
            decode_append_reply(fatal.into()).unwrap().unwrap_err().0,
            "raft stopped"
        );

        let vote = VoteRequest::new(
            Vote::new(5, 1),
            Some(LogId::new(CommittedLeaderId::new(4, 2), 9)),
        );
        assert_eq!(decode_vote(encode_vote(&vote).into()).unwrap(), vote);
        let answer = VoteResponse {
            vote: Vote::new(5, 1),
            vote_granted: true,
            last_log_id: None,
        };
        let b = decode_vote_reply(encode_vote_reply(&Ok(answer.clone())).into());
        assert_eq!(b.unwrap().unwrap(), answer);

        let members: BTreeMap<u64, BasicNode> = [node(1), node(2), node(3)].into();
        let snap = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(5, 1),
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(5, 1), 77)),
                last_membership: StoredMembership::new(
                    Some(LogId::new(CommittedLeaderId::new(1, 1), 1)),
                    Membership::from(members),
                ),
                snapshot_id: "5-1-77-x".into(),
            },
            offset: 3 << 20,
            data: vec![7u8; 1000],
            done: true,
        };
        let back = decode_snapshot(encode_snapshot(&snap).into()).unwrap();
        assert_eq!(back, snap);
        let mismatch = SnapshotMismatch {
            expect: SnapshotSegmentId {
                id: "a".into(),
                offset: 0,
            },
            got: SnapshotSegmentId {
                id: "b".into(),
                offset: 9,
            },
        };
        let r = encode_snapshot_reply(&Err(RaftError::APIError(
            InstallSnapshotError::SnapshotMismatch(mismatch.clone()),
        )));
        match decode_snapshot_reply(r.into()).unwrap() {
            Err(SnapshotReplyError::Mismatch(m)) => assert_eq!(m, mismatch),
            other => panic!("{other:?}"),
        }
        let ok = InstallSnapshotResponse {
            vote: Vote::new(6, 2),
        };
        let r = encode_snapshot_reply(&Ok(ok));
        assert_eq!(
            decode_snapshot_reply(r.into()).unwrap().unwrap(),
            InstallSnapshotResponse {
                vote: Vote::new(6, 2),
            }
        );
    }

    /// Garbage, a message of another kind and an entry of a kind this version does not know
    /// are errors that say so, never a decoded entry.
    #[test]
    fn bad_input_is_refused_clearly() {
        let e = decode_entry(Bytes::from_static(&[0xff, 0xff, 0xff])).unwrap_err();
        assert!(e.to_string().contains("not a protobuf"), "{e}");
        let no_id = pb::Entry {
            log_id: None,
            payload: Some(pb::entry::Payload::Blank(pb::Blank {})),
        };
        let e = decode_entry(no_id.encode_to_vec().into()).unwrap_err();
        assert!(e.to_string().contains("log id is missing"), "{e}");
        // A payload in a field number this version does not know (a newer kind of entry).
        let mut future = pb::Entry {
            log_id: Some(pb::LogId {
                term: 1,
                node_id: 1,
                index: 5,
            }),
            payload: None,
        }
        .encode_to_vec();
        future.extend_from_slice(&[0x2a, 0x01, 0x00]); // field 5, length 1
        let e = decode_entry(future.into()).unwrap_err();
        assert!(
            e.to_string().contains("entry 5 is of an unknown kind"),
            "{e}"
        );
        let e = decode_append(pb::VoteRequest::default().encode_to_vec().into()).unwrap_err();
        assert!(e.to_string().contains("vote is missing"), "{e}");
    }

    /// The fuzz body on random bytes and on valid messages with random bytes flipped.
    #[test]
    fn fuzz_body_on_random_input() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let valid: Vec<Vec<u8>> = entries()
            .iter()
            .map(encode_entry)
            .chain([encode_append(&AppendEntriesRequest::<TypeConfig> {
                vote: Vote::new(2, 1),
                prev_log_id: None,
                entries: entries(),
                leader_commit: None,
            })])
            .collect();
        for i in 0..3000 {
            let mut d: Vec<u8> = if i % 2 == 0 {
                (0..rng.random_range(0..200))
                    .map(|_| rng.random())
                    .collect()
            } else {
                valid[i % valid.len()].clone()
            };
            if !d.is_empty() {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..d.len());
                    d[at] = rng.random();
                }
            }
            fuzz_raft_messages(&d);
        }
    }

    trait CloneForTest {
        fn clone_for_test(&self) -> Self;
    }

    impl CloneForTest for AppendEntriesResponse<u64> {
        fn clone_for_test(&self) -> Self {
            match self {
                AppendEntriesResponse::Success => AppendEntriesResponse::Success,
                AppendEntriesResponse::PartialSuccess(m) => {
                    AppendEntriesResponse::PartialSuccess(*m)
                }
                AppendEntriesResponse::Conflict => AppendEntriesResponse::Conflict,
                AppendEntriesResponse::HigherVote(v) => AppendEntriesResponse::HigherVote(*v),
            }
        }
    }
}
