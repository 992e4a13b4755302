//! Raft transport between chunkservers: openraft's messages in protobuf (crate::codec; bincode
//! to a peer that has not said it reads protobuf, an older chunkserver), carried by the
//! `RaftService` gRPC service (proto/raft.proto) and addressed to one copyset.

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;

use curve_proto::raft::raft_service_client::RaftServiceClient;
use curve_proto::raft::{Encoding, RaftRequest, RaftResponse};

use crate::codec::{self, SnapshotReplyError};
use crate::raft::TypeConfig;

/// Creates connections to the peers of one copyset.
#[derive(Debug, Clone)]
pub struct CopysetNetwork {
    /// Logical pool of the copyset.
    pub pool: u32,
    /// Copyset id.
    pub copyset: u32,
    /// The cluster keyring (auth on).
    pub ring: Option<curve_auth::SharedKeyring>,
    /// What one AppendEntries carries, adapted to how long they take.
    pub budget: Arc<crate::raftlog::AppendBudget>,
    /// openraft's timeout of an AppendEntries (its heartbeat interval).
    pub append_timeout: std::time::Duration,
    /// Set: the leader steps down, its AppendEntries are not sent (see
    /// [`crate::copyset::CopysetNode::stepping_down`]).
    pub hold: Arc<std::sync::atomic::AtomicBool>,
}

/// A connection to one peer of a copyset.
#[derive(Debug)]
pub struct PeerConnection {
    pool: u32,
    copyset: u32,
    target: u64,
    addr: String,
    client: Option<RaftServiceClient<tonic::transport::Channel>>,
    ring: Option<curve_auth::SharedKeyring>,
    budget: Arc<crate::raftlog::AppendBudget>,
    append_timeout: std::time::Duration,
    hold: Arc<std::sync::atomic::AtomicBool>,
}

/// An AppendEntries with entries in flight: how long it takes tells the copyset's budget
/// ([`crate::raftlog::AppendBudget`]); dropped unfinished (openraft abandoned it at its
/// timeout), it shrinks it.
struct Timed<'a> {
    budget: &'a crate::raftlog::AppendBudget,
    timeout: std::time::Duration,
    started: std::time::Instant,
    done: bool,
}

impl Timed<'_> {
    fn finished(mut self) {
        self.done = true;
        let took = self.started.elapsed();
        if took > self.timeout / 2 {
            self.budget.shrink();
        } else if took < self.timeout / 4 {
            self.budget.grow();
        }
    }
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.budget.shrink();
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for CopysetNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        PeerConnection {
            pool: self.pool,
            copyset: self.copyset,
            target,
            addr: node.addr.clone(),
            client: None,
            ring: self.ring.clone(),
            budget: self.budget.clone(),
            append_timeout: self.append_timeout,
            hold: self.hold.clone(),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Append,
    Vote,
    Snapshot,
}

fn unreachable<E: std::error::Error>(
    e: &(impl std::error::Error + 'static),
) -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(e))
}

fn network<E: std::error::Error>(
    e: &(impl std::error::Error + 'static),
) -> RPCError<u64, BasicNode, E> {
    RPCError::Network(NetworkError::new(e))
}

/// Addresses of the peers that said they read protobuf (all copysets of the process share
/// what their replies taught); the others get bincode.
static PROTOBUF_PEERS: std::sync::LazyLock<parking_lot::Mutex<std::collections::HashSet<String>>> =
    std::sync::LazyLock::new(Default::default);

/// Whether the peer at `addr` said it reads protobuf (and so gets it).
pub fn sends_protobuf_to(addr: &str) -> bool {
    PROTOBUF_PEERS.lock().contains(addr)
}

impl PeerConnection {
    /// The peer reads protobuf (a reply said so).
    fn protobuf(&self) -> bool {
        PROTOBUF_PEERS.lock().contains(&self.addr)
    }

    /// Sends one encoded message and returns the peer's reply, learning from it whether the
    /// peer reads protobuf.
    async fn send<E: std::error::Error>(
        &mut self,
        kind: Kind,
        payload: Vec<u8>,
        encoding: Encoding,
    ) -> Result<RaftResponse, RPCError<u64, BasicNode, E>> {
        if self.client.is_none() {
            // A lazy channel connects (and reconnects) in the background and survives RPCs
            // that openraft abandons at their timeout, so a slow first handshake cannot make
            // every later RPC start over.
            let endpoint = curve_auth::tls::endpoint(&self.addr)
                .map_err(|e| unreachable(&e))?
                .tcp_nodelay(true);
            self.client = Some(RaftServiceClient::new(endpoint.connect_lazy()));
        }
        let client = self.client.as_mut().expect("connected above");
        let rpc = match kind {
            Kind::Append => "AppendEntries",
            Kind::Vote => "Vote",
            Kind::Snapshot => "InstallSnapshot",
        };
        let cred = self.ring.as_ref().map(|r| {
            let method = crate::service::raft_method(rpc, self.pool, self.copyset);
            curve_auth::peer_credential(&r.get(), &method, &payload)
        });
        let mut request = tonic::Request::new(RaftRequest {
            logical_pool_id: self.pool,
            copyset_id: self.copyset,
            payload: payload.into(),
            encoding: encoding as i32,
        });
        if let Some(v) = cred.and_then(|c| c.parse().ok()) {
            request.metadata_mut().insert(curve_auth::PEER_HEADER, v);
        }
        let sent = match kind {
            Kind::Append => client.append_entries(request).await,
            Kind::Vote => client.vote(request).await,
            Kind::Snapshot => client.install_snapshot(request).await,
        };
        let reply = sent.map_err(|status| unreachable(&status))?.into_inner();
        if !reply.error.is_empty() {
            // The peer has no such copyset (yet: it is being created, or added): back off
            // like for an unreachable peer instead of retrying in a tight loop.
            return Err(unreachable(&std::io::Error::other(reply.error)));
        }
        let reads_protobuf = reply.accepts == Encoding::Protobuf as i32;
        if reads_protobuf != self.protobuf() {
            let mut peers = PROTOBUF_PEERS.lock();
            if reads_protobuf {
                peers.insert(self.addr.clone());
            } else {
                peers.remove(&self.addr);
            }
        }
        if reply.encoding != encoding as i32 {
            return Err(network(&std::io::Error::other(format!(
                "{rpc} reply in encoding {}, not the request's",
                reply.encoding
            ))));
        }
        Ok(reply)
    }

    /// A request in openraft's own types through bincode: what a chunkserver that does not
    /// read protobuf gets.
    async fn call_bincode<Req, Resp, E>(
        &mut self,
        kind: Kind,
        req: &Req,
    ) -> Result<Resp, RPCError<u64, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = bincode::serialize(req).map_err(|e| network(&e))?;
        let reply = self.send(kind, payload, Encoding::Bincode).await?;
        let answer: Result<Resp, E> =
            bincode::deserialize(&reply.payload).map_err(|e| network(&e))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        if self.hold.load(std::sync::atomic::Ordering::Acquire) {
            return Err(unreachable(&std::io::Error::other(
                "held back: this leader is stepping down (no quorum reached it)",
            )));
        }
        if !self.protobuf() {
            return self.call_bincode(Kind::Append, &req).await;
        }
        let budget = self.budget.clone();
        let timed = (!req.entries.is_empty()).then(|| Timed {
            budget: &budget,
            timeout: self.append_timeout,
            started: std::time::Instant::now(),
            done: false,
        });
        let reply = self
            .send(Kind::Append, codec::encode_append(&req), Encoding::Protobuf)
            .await;
        if let Some(t) = timed {
            t.finished();
        }
        let answer = codec::decode_append_reply(reply?.payload).map_err(|e| network(&e))?;
        answer.map_err(|e| unreachable(&e))
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        if !self.protobuf() {
            return self.call_bincode(Kind::Snapshot, &req).await;
        }
        let reply = self
            .send(
                Kind::Snapshot,
                codec::encode_snapshot(&req),
                Encoding::Protobuf,
            )
            .await?;
        match codec::decode_snapshot_reply(reply.payload).map_err(|e| network(&e))? {
            Ok(r) => Ok(r),
            Err(SnapshotReplyError::Mismatch(m)) => Err(RPCError::RemoteError(RemoteError::new(
                self.target,
                RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m)),
            ))),
            Err(SnapshotReplyError::Fatal(e)) => Err(unreachable(&e)),
        }
    }

    async fn vote(
        &mut self,
        req: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        if !self.protobuf() {
            return self.call_bincode(Kind::Vote, &req).await;
        }
        let reply = self
            .send(Kind::Vote, codec::encode_vote(&req), Encoding::Protobuf)
            .await?;
        let answer = codec::decode_vote_reply(reply.payload).map_err(|e| network(&e))?;
        answer.map_err(|e| unreachable(&e))
    }

    /// Short backoffs after an unreachable peer (default: 500 ms, as long as an election
    /// timeout, so a transient connection error would cost the followers their leader).
    fn backoff(&self) -> openraft::network::Backoff {
        let steps = [20u64, 50, 100].into_iter().chain(std::iter::repeat(200));
        openraft::network::Backoff::new(steps.map(std::time::Duration::from_millis))
    }
}
