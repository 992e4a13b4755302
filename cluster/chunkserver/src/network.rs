//! Raft transport between chunkservers: openraft's messages, serialised with bincode, carried
//! by the `RaftService` gRPC service (proto/raft.proto) and addressed to one copyset.

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

use curve_proto::raft::RaftRequest;
use curve_proto::raft::raft_service_client::RaftServiceClient;

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
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Append,
    Vote,
    Snapshot,
}

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: Kind,
        req: &Req,
    ) -> Result<Resp, RPCError<u64, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if self.client.is_none() {
            // A lazy channel connects (and reconnects) in the background and survives RPCs
            // that openraft abandons at their timeout, so a slow first handshake cannot make
            // every later RPC start over.
            let endpoint = curve_auth::tls::endpoint(&self.addr)
                .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?
                .tcp_nodelay(true);
            self.client = Some(RaftServiceClient::new(endpoint.connect_lazy()));
        }
        let client = self.client.as_mut().expect("connected above");
        let payload =
            bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
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
        });
        if let Some(v) = cred.and_then(|c| c.parse().ok()) {
            request.metadata_mut().insert(curve_auth::PEER_HEADER, v);
        }
        let sent = match kind {
            Kind::Append => client.append_entries(request).await,
            Kind::Vote => client.vote(request).await,
            Kind::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match sent {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(RPCError::Unreachable(Unreachable::new(&status))),
        };
        if !reply.error.is_empty() {
            // The peer has no such copyset (yet: it is being created, or added): back off
            // like for an unreachable peer instead of retrying in a tight loop.
            return Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other(reply.error),
            )));
        }
        let answer: Result<Resp, E> = bincode::deserialize(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Kind::Append, &req).await
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(Kind::Snapshot, &req).await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Kind::Vote, &req).await
    }

    /// Short backoffs after an unreachable peer (default: 500 ms, as long as an election
    /// timeout, so a transient connection error would cost the followers their leader).
    fn backoff(&self) -> openraft::network::Backoff {
        let steps = [20u64, 50, 100].into_iter().chain(std::iter::repeat(200));
        openraft::network::Backoff::new(steps.map(std::time::Duration::from_millis))
    }
}
