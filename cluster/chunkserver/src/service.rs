//! The chunkserver's gRPC services: RaftService (between replicas), ChunkService (client I/O,
//! served by the leader: writes through raft, reads after a read-index check so a deposed
//! leader never serves stale data) and CopysetService (creation, status).

use std::collections::BTreeMap;
use std::sync::Arc;

use curve_proto::chunk::chunk_service_server::ChunkService;
use curve_proto::chunk::{
    ChunkRequest, ChunkResponse, ChunkStatus, GetChunkInfoRequest, GetChunkInfoResponse,
};
use curve_proto::cli::cli_service_client::CliServiceClient;
use curve_proto::cli::cli_service_server::CliService;
use curve_proto::cli::{CliRequest, CliResponse, CliStatus};
use curve_proto::common::Peer;
use curve_proto::copyset::copyset_service_server::CopysetService;
use curve_proto::copyset::{
    CopysetStatus, CreateCopysetRequest, CreateCopysetResponse, GetCopysetStatusRequest,
    GetCopysetStatusResponse,
};
use curve_proto::raft::raft_service_server::RaftService;
use curve_proto::raft::{Encoding, RaftRequest, RaftResponse};
use openraft::BasicNode;
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use tonic::{Request, Response, Status};

use crate::auth::ChunkAuth;
use crate::codec;
use crate::copyset::{CopysetNode, CopysetNodeManager, CreateError};
use crate::datastore::DataStoreError;
use crate::raft::ChunkCommand;

/// The services of one chunkserver, over its copysets.
#[derive(Debug, Clone)]
pub struct ChunkServerServices {
    manager: Arc<CopysetNodeManager>,
    inflight: Arc<std::sync::atomic::AtomicUsize>,
    max_inflight: usize,
    /// Ticket and cluster-key checks (auth on).
    auth: Option<Arc<ChunkAuth>>,
    /// The data disk's free space (a full disk takes no new writes here).
    disk: Option<Arc<crate::disk::DiskWatch>>,
}

/// Counts one chunk request in flight while it lives.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Default limit of chunk requests in flight before OVERLOAD.
pub const DEFAULT_MAX_INFLIGHT: usize = 4096;

impl ChunkServerServices {
    /// Services over `manager`'s copysets.
    pub fn new(manager: Arc<CopysetNodeManager>) -> Self {
        Self::with_limit(manager, DEFAULT_MAX_INFLIGHT)
    }

    /// Services that answer OVERLOAD beyond `max_inflight` chunk requests in flight.
    pub fn with_limit(manager: Arc<CopysetNodeManager>, max_inflight: usize) -> Self {
        ChunkServerServices {
            manager,
            inflight: Arc::default(),
            max_inflight,
            auth: None,
            disk: None,
        }
    }

    /// Watches the data disk: while it is full, writes here are redirected to the copysets'
    /// other replicas (their leadership moves there), then refused with NOSPACE.
    pub fn with_disk(mut self, disk: Arc<crate::disk::DiskWatch>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Turns authentication on: tickets and grants on chunk requests, the cluster key on
    /// raft, copyset and configuration RPCs.
    pub fn with_auth(mut self, auth: Arc<ChunkAuth>) -> Self {
        self.auth = Some(auth);
        self
    }

    fn ring(&self) -> Option<&curve_auth::SharedKeyring> {
        self.auth.as_deref().map(|a| &a.ring)
    }

    /// The volume and epoch a chunk request may use: the ticket's with auth on, else the
    /// request's own fields.
    fn allowed(
        &self,
        req: &ChunkRequest,
        write: bool,
        method: &str,
    ) -> Result<crate::auth::Allowed, ChunkStatus> {
        match &self.auth {
            None => Ok(crate::auth::Allowed {
                volume: 0,
                epoch: req.epoch,
            }),
            Some(a) => a.check(&req.ticket, &req.grant, req.chunk_id, write, method),
        }
    }

    /// The cluster's signature on a copyset or configuration RPC (auth on).
    fn cluster_only<T: prost::Message>(
        &self,
        req: &Request<T>,
        method: &str,
    ) -> Result<(), curve_auth::AuthError> {
        curve_auth::check_peer(self.ring(), req, method)
    }

    /// Records a served chunk request in the chunkserver's and the copyset's metrics.
    fn record(
        &self,
        pool: u32,
        copyset: u32,
        write: bool,
        bytes: u64,
        r: &ChunkResponse,
        started: std::time::Instant,
    ) {
        let ok = r.status == ChunkStatus::Success as i32;
        let took = started.elapsed();
        let pick = |m: &'_ crate::metrics::IoMetrics| {
            if write { &m.write } else { &m.read }.record(bytes, ok, took)
        };
        pick(&crate::metrics::CHUNKSERVER_IO);
        if let Some(node) = self.node(pool, copyset) {
            pick(&node.metrics);
        }
    }

    /// Admits a chunk request, or None when too many are in flight (the client backs off).
    fn admit(&self) -> Option<InFlight> {
        let n = self
            .inflight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let guard = InFlight(self.inflight.clone());
        (n < self.max_inflight).then_some(guard)
    }

    fn node(&self, pool: u32, copyset: u32) -> Option<Arc<CopysetNode>> {
        self.manager.get(pool, copyset)
    }
}

fn reply(status: ChunkStatus) -> ChunkResponse {
    ChunkResponse {
        status: status as i32,
        ..Default::default()
    }
}

fn redirect(f: &ForwardToLeader<u64, BasicNode>) -> ChunkResponse {
    ChunkResponse {
        status: ChunkStatus::Redirected as i32,
        redirect: f.leader_id.map(|id| Peer {
            chunkserver_id: id as u32,
            address: f
                .leader_node
                .as_ref()
                .map(|n| n.addr.clone())
                .unwrap_or_default(),
        }),
        ..Default::default()
    }
}

impl ChunkServerServices {
    /// Checks alignment and bounds before anything reaches raft.
    fn check(&self, offset: u64, size: u64) -> bool {
        let o = self.manager.options();
        size > 0
            && offset.is_multiple_of(o.page_size)
            && size.is_multiple_of(o.page_size)
            && offset
                .checked_add(size)
                .is_some_and(|end| end <= o.chunk_size)
    }

    async fn write(&self, req: ChunkRequest, cmd: ChunkCommand) -> ChunkResponse {
        let Some(node) = self.node(req.logical_pool_id, req.copyset_id) else {
            return reply(ChunkStatus::CopysetNotexist);
        };
        // What frees space (deletes, discards) still goes through: its log entries are small,
        // and the reserve is kept for them.
        let frees = matches!(
            cmd,
            ChunkCommand::Delete { .. }
                | ChunkCommand::DeleteSnapshots { .. }
                | ChunkCommand::Zero {
                    keep_allocated: false,
                    ..
                }
        );
        if let Some(full_for) = self
            .disk
            .as_ref()
            .and_then(|d| d.full_for())
            .filter(|_| !frees)
        {
            // Our disk is full: the leadership moves to a follower (the disk watcher does it);
            // the client asks the others meanwhile. If none takes it, the cluster is full.
            return if full_for < crate::disk::REDIRECT_WHILE_FULL {
                reply(ChunkStatus::Redirected)
            } else {
                reply(ChunkStatus::Nospace)
            };
        }
        // Past what the copyset has in flight: OVERLOAD, the client backs off (one write is
        // always taken, whatever its size).
        let bytes = match &cmd {
            ChunkCommand::Write { data, .. }
            | ChunkCommand::WriteOf { data, .. }
            | ChunkCommand::WriteClone { data, .. }
            | ChunkCommand::Fill { data, .. } => data.len() as u64,
            _ => 0,
        };
        use std::sync::atomic::Ordering;
        let before = node.writing.fetch_add(bytes, Ordering::AcqRel);
        struct Writing<'a>(&'a std::sync::atomic::AtomicU64, u64);
        impl Drop for Writing<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(self.1, Ordering::AcqRel);
            }
        }
        let _writing = Writing(&node.writing, bytes);
        if before > 0 && before + bytes > crate::copyset::MAX_WRITING_BYTES {
            return reply(ChunkStatus::Overload);
        }
        if node.stepping_down() {
            return reply(ChunkStatus::Redirected);
        }
        // During a leadership transfer new writes wait a little, then retry on the leader.
        for _ in 0..400 {
            if !node.transferring.load(std::sync::atomic::Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        match node.raft.client_write(cmd).await {
            Ok(r) => ChunkResponse {
                status: r.data.status,
                applied_index: r.log_id.index,
                ..Default::default()
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => redirect(&f),
            Err(RaftError::Fatal(e)) => {
                // This replica's raft stopped (a storage error: a full or failed disk). It
                // leads nothing now, whatever it last knew: the client asks the others.
                tracing::warn!(error = %e, "write on a stopped raft");
                reply(ChunkStatus::Redirected)
            }
            Err(e) => {
                tracing::warn!(error = %e, "write failed");
                reply(ChunkStatus::FailureUnknown)
            }
        }
    }

    /// Waits until this replica is the leader and has applied everything committed before
    /// the call (read index): only then may it answer reads.
    async fn linearizable(&self, node: &CopysetNode) -> Result<(), ChunkResponse> {
        // Lease read: a leader a quorum acknowledged within the lease is still the leader,
        // and every write it acknowledged is applied (writes answer after apply).
        if node.lease_valid() {
            return Ok(());
        }
        if node.stepping_down() {
            return Err(reply(ChunkStatus::Redirected));
        }
        match node.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(redirect(&f)),
            Err(RaftError::Fatal(e)) => {
                tracing::warn!(error = %e, "read on a stopped raft");
                Err(reply(ChunkStatus::Redirected))
            }
            Err(e) => {
                tracing::warn!(error = %e, "read index failed");
                Err(reply(ChunkStatus::FailureUnknown))
            }
        }
    }
}

#[tonic::async_trait]
impl ChunkService for ChunkServerServices {
    async fn write_chunk(
        &self,
        request: Request<ChunkRequest>,
    ) -> Result<Response<ChunkResponse>, Status> {
        let Some(_admitted) = self.admit() else {
            return Ok(Response::new(reply(ChunkStatus::Overload)));
        };
        let mut req = request.into_inner();
        let allowed = match self.allowed(&req, true, "WriteChunk") {
            Ok(a) => a,
            Err(s) => return Ok(Response::new(reply(s))),
        };
        let sent = if req.zero { 0 } else { req.size as usize };
        if req.data.len() != sent
            || !self.check(req.offset, u64::from(req.size))
            || (req.zero && req.clone)
        {
            return Ok(Response::new(reply(ChunkStatus::InvalidRequest)));
        }
        let started = std::time::Instant::now();
        let (pool, copyset, bytes) = (req.logical_pool_id, req.copyset_id, u64::from(req.size));
        let data = std::mem::take(&mut req.data);
        if req.zero {
            // Zeroing a chunk that does not exist changes nothing: answered as a read would be
            // (once this leader has applied all it acknowledged), with nothing through raft.
            let Some(node) = self.node(req.logical_pool_id, req.copyset_id) else {
                return Ok(Response::new(reply(ChunkStatus::CopysetNotexist)));
            };
            if let Err(r) = self.linearizable(&node).await {
                return Ok(Response::new(r));
            }
            if node.store().chunk_meta(req.chunk_id).is_none() {
                return Ok(Response::new(reply(ChunkStatus::Success)));
            }
        }
        let cmd = if req.zero {
            ChunkCommand::Zero {
                volume: allowed.volume,
                chunk_id: req.chunk_id,
                sn: req.sn,
                offset: req.offset,
                len: u64::from(req.size),
                epoch: allowed.epoch,
                keep_allocated: req.keep_allocated,
            }
        } else if req.clone {
            ChunkCommand::WriteClone {
                volume: allowed.volume,
                chunk_id: req.chunk_id,
                sn: req.sn,
                offset: req.offset,
                data,
                epoch: allowed.epoch,
            }
        } else if allowed.volume == 0 {
            ChunkCommand::Write {
                chunk_id: req.chunk_id,
                sn: req.sn,
                offset: req.offset,
                data,
                epoch: allowed.epoch,
            }
        } else {
            ChunkCommand::WriteOf {
                volume: allowed.volume,
                chunk_id: req.chunk_id,
                sn: req.sn,
                offset: req.offset,
                data,
                epoch: allowed.epoch,
            }
        };
        let r = self.write(req, cmd).await;
        self.record(pool, copyset, true, bytes, &r, started);
        Ok(Response::new(r))
    }

    async fn read_chunk(
        &self,
        request: Request<ChunkRequest>,
    ) -> Result<Response<ChunkResponse>, Status> {
        let Some(_admitted) = self.admit() else {
            return Ok(Response::new(reply(ChunkStatus::Overload)));
        };
        let req = request.into_inner();
        let allowed = match self.allowed(&req, false, "ReadChunk") {
            Ok(a) => a,
            Err(s) => return Ok(Response::new(reply(s))),
        };
        if !self.check(req.offset, u64::from(req.size)) {
            return Ok(Response::new(reply(ChunkStatus::InvalidRequest)));
        }
        let Some(node) = self.node(req.logical_pool_id, req.copyset_id) else {
            return Ok(Response::new(reply(ChunkStatus::CopysetNotexist)));
        };
        if let Err(r) = self.linearizable(&node).await {
            return Ok(Response::new(r));
        }
        let started = std::time::Instant::now();
        let mut data = vec![0u8; req.size as usize];
        let r =
            match node
                .store()
                .read_at(allowed.volume, req.chunk_id, req.sn, req.offset, &mut data)
            {
                Ok(unfilled) => ChunkResponse {
                    status: ChunkStatus::Success as i32,
                    data: data.into(),
                    unfilled: unfilled.map(|u| u.bytes().to_vec()).unwrap_or_default(),
                    ..Default::default()
                },
                Err(DataStoreError::NotExist(_)) => reply(ChunkStatus::ChunkNotexist),
                Err(DataStoreError::Invalid(_)) => reply(ChunkStatus::InvalidRequest),
                Err(e @ DataStoreError::WrongVolume { .. }) => {
                    curve_auth::refused(
                        &curve_auth::AuthError::WrongVolume(e.to_string()),
                        "ReadChunk",
                    );
                    reply(ChunkStatus::AuthFailed)
                }
                Err(e) => {
                    tracing::error!(error = %e, "read failed");
                    reply(ChunkStatus::DiskFail)
                }
            };
        self.record(
            req.logical_pool_id,
            req.copyset_id,
            false,
            u64::from(req.size),
            &r,
            started,
        );
        Ok(Response::new(r))
    }

    async fn delete_chunk(
        &self,
        request: Request<ChunkRequest>,
    ) -> Result<Response<ChunkResponse>, Status> {
        // Only the MDS deletes chunks (a purged volume's), signing with the cluster key.
        if self.cluster_only(&request, "DeleteChunk").is_err() {
            return Ok(Response::new(reply(ChunkStatus::AuthFailed)));
        }
        let req = request.into_inner();
        let cmd = ChunkCommand::Delete {
            chunk_id: req.chunk_id,
        };
        Ok(Response::new(self.write(req, cmd).await))
    }

    async fn get_chunk_info(
        &self,
        request: Request<GetChunkInfoRequest>,
    ) -> Result<Response<GetChunkInfoResponse>, Status> {
        let req = request.into_inner();
        if let Some(a) = &self.auth
            && let Err(s) = a.check(&req.ticket, &req.grant, req.chunk_id, false, "GetChunkInfo")
        {
            return Ok(Response::new(GetChunkInfoResponse {
                status: s as i32,
                ..Default::default()
            }));
        }
        let Some(node) = self.node(req.logical_pool_id, req.copyset_id) else {
            return Ok(Response::new(GetChunkInfoResponse {
                status: ChunkStatus::CopysetNotexist as i32,
                ..Default::default()
            }));
        };
        if let Err(r) = self.linearizable(&node).await {
            return Ok(Response::new(GetChunkInfoResponse {
                status: r.status,
                redirect: r.redirect,
                ..Default::default()
            }));
        }
        let data_extents = if req.extent_length == 0 {
            Vec::new()
        } else {
            if !self.check(req.extent_offset, req.extent_length) {
                return Ok(Response::new(GetChunkInfoResponse {
                    status: ChunkStatus::InvalidRequest as i32,
                    ..Default::default()
                }));
            }
            match node
                .store()
                .data_ranges(req.chunk_id, req.extent_offset, req.extent_length)
            {
                Ok(r) => r
                    .unwrap_or_default()
                    .into_iter()
                    .flat_map(|(o, l)| [o, l])
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %e, chunk = req.chunk_id, "extents");
                    return Ok(Response::new(GetChunkInfoResponse {
                        status: ChunkStatus::DiskFail as i32,
                        ..Default::default()
                    }));
                }
            }
        };
        Ok(Response::new(GetChunkInfoResponse {
            status: ChunkStatus::Success as i32,
            data_extents,
            chunk_sn: node
                .store()
                .chunk_meta(req.chunk_id)
                .map(|m| {
                    let mut v = vec![m.sn];
                    v.extend(node.store().cow_tags(req.chunk_id));
                    v
                })
                .unwrap_or_default(),
            ..Default::default()
        }))
    }

    async fn read_chunk_snapshot(
        &self,
        request: Request<ChunkRequest>,
    ) -> Result<Response<ChunkResponse>, Status> {
        self.read_chunk(request).await
    }

    async fn delete_chunk_snapshot_or_correct_sn(
        &self,
        request: Request<ChunkRequest>,
    ) -> Result<Response<ChunkResponse>, Status> {
        // Only the MDS deletes snapshots, signing with the cluster key.
        if self
            .cluster_only(&request, "DeleteChunkSnapshotOrCorrectSn")
            .is_err()
        {
            return Ok(Response::new(reply(ChunkStatus::AuthFailed)));
        }
        let req = request.into_inner();
        let cmd = ChunkCommand::DeleteSnapshots {
            chunk_id: req.chunk_id,
            live: req.live_sns.clone(),
        };
        Ok(Response::new(self.write(req, cmd).await))
    }

    async fn create_clone_chunk(
        &self,
        _: Request<ChunkRequest>,
    ) -> Result<Response<ChunkResponse>, Status> {
        // A clone chunk is created by its first write (`clone` set) or fill (RecoverChunk).
        Ok(Response::new(reply(ChunkStatus::InvalidRequest)))
    }

    async fn recover_chunk(
        &self,
        request: Request<ChunkRequest>,
    ) -> Result<Response<ChunkResponse>, Status> {
        let Some(_admitted) = self.admit() else {
            return Ok(Response::new(reply(ChunkStatus::Overload)));
        };
        let mut req = request.into_inner();
        let allowed = match &self.auth {
            None => crate::auth::Allowed {
                volume: 0,
                epoch: req.epoch,
            },
            Some(a) => {
                match a.check_as(
                    &req.ticket,
                    &req.grant,
                    req.chunk_id,
                    false,
                    true,
                    "RecoverChunk",
                ) {
                    Ok(a) => a,
                    Err(s) => return Ok(Response::new(reply(s))),
                }
            }
        };
        if req.data.len() != req.size as usize || !self.check(req.offset, u64::from(req.size)) {
            return Ok(Response::new(reply(ChunkStatus::InvalidRequest)));
        }
        let started = std::time::Instant::now();
        let (pool, copyset, bytes) = (req.logical_pool_id, req.copyset_id, u64::from(req.size));
        let cmd = ChunkCommand::Fill {
            volume: allowed.volume,
            chunk_id: req.chunk_id,
            sn: req.sn,
            offset: req.offset,
            data: std::mem::take(&mut req.data),
        };
        let r = self.write(req, cmd).await;
        self.record(pool, copyset, true, bytes, &r, started);
        Ok(Response::new(r))
    }
}

/// A raft reply in `encoding` (the request's), saying that this chunkserver reads protobuf.
fn raft_reply(payload: Vec<u8>, encoding: Encoding) -> Result<Response<RaftResponse>, Status> {
    Ok(Response::new(RaftResponse {
        payload: payload.into(),
        error: String::new(),
        encoding: encoding as i32,
        accepts: Encoding::Protobuf as i32,
    }))
}

fn bincode_reply<T: serde::Serialize>(r: &T) -> Result<Response<RaftResponse>, Status> {
    let payload = bincode::serialize(r).map_err(|e| Status::internal(e.to_string()))?;
    raft_reply(payload, Encoding::Bincode)
}

/// A raft request's encoding (an unknown one refused).
fn encoding_of(req: &RaftRequest) -> Result<Encoding, Status> {
    Encoding::try_from(req.encoding)
        .map_err(|_| Status::invalid_argument(format!("unknown raft encoding {}", req.encoding)))
}

fn bad_message(e: crate::codec::CodecError) -> Status {
    Status::invalid_argument(e.to_string())
}

impl ChunkServerServices {
    fn raft_target(&self, req: &RaftRequest) -> Result<Arc<CopysetNode>, Response<RaftResponse>> {
        self.node(req.logical_pool_id, req.copyset_id)
            .ok_or_else(|| {
                Response::new(RaftResponse {
                    payload: Default::default(),
                    encoding: req.encoding,
                    accepts: Encoding::Protobuf as i32,
                    error: format!(
                        "copyset {}_{} does not exist here",
                        req.logical_pool_id, req.copyset_id
                    ),
                })
            })
    }
}

fn decode_bincode<T: serde::de::DeserializeOwned>(req: &RaftRequest) -> Result<T, Status> {
    bincode::deserialize(&req.payload).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The method name a raft RPC is signed for: the RPC and the copyset.
pub fn raft_method(rpc: &str, pool: u32, copyset: u32) -> String {
    format!("{rpc}/{pool}/{copyset}")
}

impl ChunkServerServices {
    /// The cluster's signature on a raft RPC (over its payload, not a copy of it).
    fn raft_peer(&self, request: &Request<RaftRequest>, rpc: &str) -> Result<(), Status> {
        let r = request.get_ref();
        curve_auth::check_peer_over(
            self.ring(),
            request,
            &raft_method(rpc, r.logical_pool_id, r.copyset_id),
            &r.payload,
        )
        .map_err(|e| Status::unauthenticated(e.to_string()))
    }
}

#[tonic::async_trait]
impl RaftService for ChunkServerServices {
    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftResponse>, Status> {
        self.raft_peer(&request, "AppendEntries")?;
        let req = request.into_inner();
        let node = match self.raft_target(&req) {
            Ok(n) => n,
            Err(r) => return Ok(r),
        };
        match encoding_of(&req)? {
            Encoding::Bincode => {
                bincode_reply(&node.raft.append_entries(decode_bincode(&req)?).await)
            }
            Encoding::Protobuf => {
                let r = codec::decode_append(req.payload).map_err(bad_message)?;
                let answer = node.raft.append_entries(r).await;
                raft_reply(codec::encode_append_reply(&answer), Encoding::Protobuf)
            }
        }
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftResponse>, Status> {
        self.raft_peer(&request, "Vote")?;
        let req = request.into_inner();
        let node = match self.raft_target(&req) {
            Ok(n) => n,
            Err(r) => return Ok(r),
        };
        match encoding_of(&req)? {
            Encoding::Bincode => bincode_reply(&node.raft.vote(decode_bincode(&req)?).await),
            Encoding::Protobuf => {
                let r = codec::decode_vote(req.payload).map_err(bad_message)?;
                let answer = node.raft.vote(r).await;
                raft_reply(codec::encode_vote_reply(&answer), Encoding::Protobuf)
            }
        }
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftResponse>, Status> {
        self.raft_peer(&request, "InstallSnapshot")?;
        let req = request.into_inner();
        let node = match self.raft_target(&req) {
            Ok(n) => n,
            Err(r) => return Ok(r),
        };
        match encoding_of(&req)? {
            Encoding::Bincode => {
                bincode_reply(&node.raft.install_snapshot(decode_bincode(&req)?).await)
            }
            Encoding::Protobuf => {
                let r = codec::decode_snapshot(req.payload).map_err(bad_message)?;
                let answer = node.raft.install_snapshot(r).await;
                raft_reply(codec::encode_snapshot_reply(&answer), Encoding::Protobuf)
            }
        }
    }
}

#[tonic::async_trait]
impl CopysetService for ChunkServerServices {
    async fn create_copyset_node(
        &self,
        request: Request<CreateCopysetRequest>,
    ) -> Result<Response<CreateCopysetResponse>, Status> {
        if let Err(e) = self.cluster_only(&request, "CreateCopysetNode") {
            return Ok(Response::new(CreateCopysetResponse {
                status: CopysetStatus::CopysetFailed as i32,
                message: e.to_string(),
            }));
        }
        for spec in request.into_inner().copysets {
            let peers: BTreeMap<u64, BasicNode> = spec
                .peers
                .iter()
                .map(|p| (u64::from(p.chunkserver_id), BasicNode::new(&p.address)))
                .collect();
            let (status, message) = match self
                .manager
                .create(spec.logical_pool_id, spec.copyset_id, peers)
                .await
            {
                Ok(()) => continue,
                Err(e @ CreateError::Exists(..)) => (CopysetStatus::CopysetExist, e.to_string()),
                Err(e) => (CopysetStatus::CopysetFailed, e.to_string()),
            };
            return Ok(Response::new(CreateCopysetResponse {
                status: status as i32,
                message,
            }));
        }
        Ok(Response::new(CreateCopysetResponse {
            status: CopysetStatus::CopysetOk as i32,
            message: String::new(),
        }))
    }

    async fn get_copyset_status(
        &self,
        request: Request<GetCopysetStatusRequest>,
    ) -> Result<Response<GetCopysetStatusResponse>, Status> {
        let req = request.into_inner();
        let Some(node) = self.node(req.logical_pool_id, req.copyset_id) else {
            return Ok(Response::new(GetCopysetStatusResponse {
                status: CopysetStatus::CopysetNotexist as i32,
                ..Default::default()
            }));
        };
        let v = node.view();
        Ok(Response::new(GetCopysetStatusResponse {
            status: CopysetStatus::CopysetOk as i32,
            leader: v.leader,
            peers: v.peers,
            term: v.term,
            committed_index: v.last_log_index,
            applied_index: v.applied,
            epoch: v.epoch,
        }))
    }
}

fn cli(status: CliStatus, message: impl Into<String>) -> CliResponse {
    CliResponse {
        status: status as i32,
        message: message.into(),
        ..Default::default()
    }
}

impl ChunkServerServices {
    /// The copyset and its current voters, if this replica leads it.
    fn led(
        &self,
        req: &CliRequest,
    ) -> Result<(Arc<CopysetNode>, std::collections::BTreeSet<u64>), CliResponse> {
        let Some(node) = self.node(req.logical_pool_id, req.copyset_id) else {
            return Err(cli(CliStatus::CliCopysetNotexist, "no such copyset here"));
        };
        let v = node.view();
        if !v.is_leader() {
            let mut r = cli(CliStatus::CliNotLeader, "not the leader");
            r.leader = v.leader;
            return Err(r);
        }
        let voters = v
            .peers
            .iter()
            .map(|p| u64::from(p.chunkserver_id))
            .collect();
        Ok((node, voters))
    }

    /// As [`Self::led`], for requests that must name a peer.
    fn led_with_peer(
        &self,
        req: CliRequest,
    ) -> Result<(Arc<CopysetNode>, std::collections::BTreeSet<u64>, Peer), CliResponse> {
        let (node, voters) = self.led(&req)?;
        let peer = req
            .peer
            .ok_or_else(|| cli(CliStatus::CliInvalid, "no peer given"))?;
        Ok((node, voters, peer))
    }

    async fn set_voters(
        &self,
        node: &CopysetNode,
        add: &[Peer],
        voters: std::collections::BTreeSet<u64>,
    ) -> CliResponse {
        for p in add {
            if let Err(e) = node
                .raft
                .add_learner(
                    u64::from(p.chunkserver_id),
                    BasicNode::new(&p.address),
                    true,
                )
                .await
            {
                return cli(
                    CliStatus::CliFailed,
                    format!("cannot add {}: {e}", p.address),
                );
            }
        }
        match node.raft.change_membership(voters, false).await {
            Ok(_) => cli(CliStatus::CliOk, ""),
            Err(e) => cli(CliStatus::CliFailed, e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl CliService for ChunkServerServices {
    async fn get_leader(
        &self,
        request: Request<CliRequest>,
    ) -> Result<Response<CliResponse>, Status> {
        let req = request.into_inner();
        let Some(node) = self.node(req.logical_pool_id, req.copyset_id) else {
            return Ok(Response::new(cli(
                CliStatus::CliCopysetNotexist,
                "no such copyset here",
            )));
        };
        let v = node.view();
        Ok(Response::new(CliResponse {
            status: CliStatus::CliOk as i32,
            leader: v.leader,
            peers: v.peers,
            ..Default::default()
        }))
    }

    async fn add_peer(
        &self,
        request: Request<CliRequest>,
    ) -> Result<Response<CliResponse>, Status> {
        if let Err(e) = self.cluster_only(&request, "AddPeer") {
            return Ok(Response::new(cli(CliStatus::CliInvalid, e.to_string())));
        }
        let req = request.into_inner();
        let (node, mut voters, peer) = match self.led_with_peer(req) {
            Ok(x) => x,
            Err(r) => return Ok(Response::new(r)),
        };
        voters.insert(u64::from(peer.chunkserver_id));
        Ok(Response::new(self.set_voters(&node, &[peer], voters).await))
    }

    async fn remove_peer(
        &self,
        request: Request<CliRequest>,
    ) -> Result<Response<CliResponse>, Status> {
        if let Err(e) = self.cluster_only(&request, "RemovePeer") {
            return Ok(Response::new(cli(CliStatus::CliInvalid, e.to_string())));
        }
        let req = request.into_inner();
        let (node, mut voters, peer) = match self.led_with_peer(req) {
            Ok(x) => x,
            Err(r) => return Ok(Response::new(r)),
        };
        if !voters.remove(&u64::from(peer.chunkserver_id)) || voters.is_empty() {
            return Ok(Response::new(cli(
                CliStatus::CliInvalid,
                "not a removable peer",
            )));
        }
        Ok(Response::new(self.set_voters(&node, &[], voters).await))
    }

    async fn change_peers(
        &self,
        request: Request<CliRequest>,
    ) -> Result<Response<CliResponse>, Status> {
        if let Err(e) = self.cluster_only(&request, "ChangePeers") {
            return Ok(Response::new(cli(CliStatus::CliInvalid, e.to_string())));
        }
        let req = request.into_inner();
        let (node, voters) = match self.led(&req) {
            Ok(x) => x,
            Err(r) => return Ok(Response::new(r)),
        };
        if req.new_peers.is_empty() {
            return Ok(Response::new(cli(CliStatus::CliInvalid, "no peers given")));
        }
        let new: Vec<Peer> = req
            .new_peers
            .iter()
            .filter(|p| !voters.contains(&u64::from(p.chunkserver_id)))
            .cloned()
            .collect();
        let target = req
            .new_peers
            .iter()
            .map(|p| u64::from(p.chunkserver_id))
            .collect();
        Ok(Response::new(self.set_voters(&node, &new, target).await))
    }

    /// Sent to the leader naming the new leader. openraft has no leader transfer, so the
    /// leader stops its heartbeats (the followers' leader leases then run out) and asks the
    /// target to start elections until it wins; its up-to-date log makes it electable. The
    /// leader resumes heartbeats when it has lost leadership or after the deadline.
    async fn transfer_leader(
        &self,
        request: Request<CliRequest>,
    ) -> Result<Response<CliResponse>, Status> {
        if let Err(e) = self.cluster_only(&request, "TransferLeader") {
            return Ok(Response::new(cli(CliStatus::CliInvalid, e.to_string())));
        }
        let req = request.into_inner();
        let Some(node) = self.node(req.logical_pool_id, req.copyset_id) else {
            return Ok(Response::new(cli(
                CliStatus::CliCopysetNotexist,
                "no such copyset here",
            )));
        };
        let Some(peer) = req.peer.clone() else {
            return Ok(Response::new(cli(CliStatus::CliInvalid, "no peer given")));
        };
        let target = u64::from(peer.chunkserver_id);
        let m = node.raft.metrics().borrow().clone();
        if target == m.id && self.disk.as_ref().is_some_and(|d| d.is_full()) {
            return Ok(Response::new(cli(
                CliStatus::CliFailed,
                "the target's disk is full: it takes no leadership",
            )));
        }
        if target == m.id {
            // We are the target, and caught up (the leader checked): one election, then wait
            // for it; another only after an election timeout, never a stream of them (each
            // would raise the term and depose whoever leads).
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
            let mut next = tokio::time::Instant::now();
            while tokio::time::Instant::now() < deadline {
                if node.raft.metrics().borrow().current_leader == Some(target) {
                    return Ok(Response::new(cli(CliStatus::CliOk, "")));
                }
                if tokio::time::Instant::now() >= next {
                    let _ = node.raft.trigger().elect().await;
                    next = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            return Ok(Response::new(cli(
                CliStatus::CliFailed,
                "not elected in time",
            )));
        }
        if m.current_leader != Some(m.id) {
            return Ok(Response::new(cli(
                CliStatus::CliNotLeader,
                "not the leader",
            )));
        }
        if !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == target)
        {
            return Ok(Response::new(cli(
                CliStatus::CliInvalid,
                "the target is not a voter",
            )));
        }
        use std::sync::atomic::Ordering;
        if node.transferring.swap(true, Ordering::AcqRel) {
            return Ok(Response::new(cli(
                CliStatus::CliFailed,
                "a transfer is already under way",
            )));
        }
        // Hold new writes, then wait until the target has the whole log: only then can it win
        // the election at once (the others vote for a log as long as theirs).
        let caught_up = async {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
            while tokio::time::Instant::now() < deadline {
                let m = node.raft.metrics().borrow().clone();
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&target).cloned().flatten())
                    .map(|l| l.index);
                if matched.is_some() && matched == m.last_log_index {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            false
        };
        let r = if !caught_up.await {
            cli(CliStatus::CliFailed, "the target did not catch up in time")
        } else {
            node.raft.runtime_config().heartbeat(false);
            let forwarded = async {
                let mut c = CliServiceClient::new(
                    curve_auth::tls::connect(&peer.address, std::time::Duration::from_secs(3))
                        .await?,
                );
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    c.transfer_leader(curve_auth::peer_request(self.ring(), "TransferLeader", req))
                        .await?
                        .into_inner(),
                )
            };
            let r = match forwarded.await {
                Ok(r) => r,
                Err(e) => cli(
                    CliStatus::CliFailed,
                    format!("cannot reach {}: {e}", peer.address),
                ),
            };
            node.raft.runtime_config().heartbeat(true);
            r
        };
        node.transferring.store(false, Ordering::Release);
        Ok(Response::new(r))
    }

    async fn reset_peer(&self, _: Request<CliRequest>) -> Result<Response<CliResponse>, Status> {
        Ok(Response::new(cli(
            CliStatus::CliInvalid,
            "ResetPeer (forcing a configuration without quorum) is not supported: raft membership \
             changes need a quorum; restore the replicas instead",
        )))
    }
}

/// Accepted connections of `listener` with TCP_NODELAY set: every RPC here is a small
/// request waiting for a small answer, which Nagle's algorithm would hold back.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}
