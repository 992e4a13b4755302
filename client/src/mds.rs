//! The MDS client: every call goes to the MDS believed to lead; a NOT_LEADER answer moves
//! to the leader it names, a transport error to the next address, until `deadline`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use curve_proto::mds::mds_service_client::MdsServiceClient;
use curve_proto::mds::*;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// Calls `$method` (`$name` on the wire) with `$req` through [`MdsClient::call`] (leader
/// following, failover), signed afresh for every attempt when the client has a key.
macro_rules! rpc {
    ($self:ident, $method:ident, $name:literal, $req:expr) => {
        rpc!($self, $method, $name, $req, SLOW_ATTEMPT)
    };
    ($self:ident, $method:ident, $name:literal, $req:expr, $attempt:expr) => {{
        let req = $req;
        let key = $self.key.clone();
        $self
            .call_within($attempt, |mut c| {
                let req = curve_auth::user_request(key.as_deref(), $name, req.clone());
                async move { c.$method(req).await }
            })
            .await
    }};
}

/// How long one attempt of an MDS call may take (then the next goes on a new connection, to
/// the next MDS): volume and snapshot operations.
const SLOW_ATTEMPT: Duration = Duration::from_secs(10);
/// The same for the lookups the I/O path waits on (segments, copysets, session refreshes,
/// stat): a connection that was cut off may be seconds from its next TCP retransmission,
/// and a new one is tried at once.
const QUICK_ATTEMPT: Duration = Duration::from_secs(4);

/// Why an MDS call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MdsError {
    /// The MDS answered with a status other than OK.
    #[error("{status:?}: {message}")]
    Status {
        /// The status.
        status: MdsStatus,
        /// Its explanation.
        message: String,
    },
    /// No MDS answered as leader before the deadline.
    #[error("no MDS leader reachable ({0})")]
    Unavailable(String),
}

impl MdsError {
    /// The MDS status, if it answered.
    pub fn status(&self) -> Option<MdsStatus> {
        match self {
            MdsError::Status { status, .. } => Some(*status),
            MdsError::Unavailable(_) => None,
        }
    }
}

/// What every MDS reply carries.
pub trait Reply {
    /// Status code.
    fn status(&self) -> i32;
    /// Leader named in NOT_LEADER.
    fn leader(&self) -> &str;
    /// Explanation.
    fn message(&self) -> &str;
}

macro_rules! reply {
    ($($t:ty),*) => {$(
        impl Reply for $t {
            fn status(&self) -> i32 { self.status }
            fn leader(&self) -> &str { &self.leader }
            fn message(&self) -> &str { &self.message }
        }
    )*};
}
reply!(
    FileResponse,
    UserResponse,
    ListDirResponse,
    OpenFileResponse,
    SessionResponse,
    SegmentResponse,
    GetCopysetsResponse,
    SnapshotResponse,
    SpaceResponse
);

impl Reply for TopologyResponse {
    fn status(&self) -> i32 {
        self.status
    }
    fn leader(&self) -> &str {
        &self.leader
    }
    fn message(&self) -> &str {
        ""
    }
}

#[derive(Debug)]
struct Current {
    index: usize,
    client: Option<MdsServiceClient<Channel>>,
}

/// A client of a set of MDS.
#[derive(Debug)]
pub struct MdsClient {
    addrs: Vec<String>,
    current: Mutex<Current>,
    /// How long a call keeps trying (elections, restarts).
    pub deadline: Duration,
    /// The user's key: every request is signed with it (needed when the cluster has auth on).
    key: Option<Arc<curve_auth::UserKey>>,
}

impl MdsClient {
    /// A client of the MDS at `addrs` (host:port), without a key.
    pub fn new(addrs: Vec<String>) -> Self {
        Self::with_key(addrs, None)
    }

    /// A client of the MDS at `addrs` signing with `key`.
    pub fn with_key(addrs: Vec<String>, key: Option<Arc<curve_auth::UserKey>>) -> Self {
        MdsClient {
            addrs,
            current: Mutex::new(Current {
                index: 0,
                client: None,
            }),
            deadline: Duration::from_secs(30),
            key,
        }
    }

    /// The key it signs with.
    pub fn key(&self) -> Option<&Arc<curve_auth::UserKey>> {
        self.key.as_ref()
    }

    /// The address currently used.
    pub async fn current(&self) -> String {
        let c = self.current.lock().await;
        self.addrs[c.index % self.addrs.len()].clone()
    }

    /// Calls `f` on the leader MDS; returns its reply when OK.
    pub async fn call<R, F, Fut>(&self, f: F) -> Result<R, MdsError>
    where
        R: Reply,
        F: Fn(MdsServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        self.call_within(SLOW_ATTEMPT, f).await
    }

    /// [`MdsClient::call`], each attempt given up after `attempt`.
    pub async fn call_within<R, F, Fut>(&self, attempt: Duration, f: F) -> Result<R, MdsError>
    where
        R: Reply,
        F: Fn(MdsServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        self.call_noting(attempt, f, &mut false).await
    }

    /// As [`call_within`](Self::call_within); `unanswered` is set when an attempt timed out
    /// and the call was tried again: the MDS may have done what that attempt asked (a refused
    /// connection sets nothing: that request never reached an MDS).
    async fn call_noting<R, F, Fut>(
        &self,
        attempt: Duration,
        f: F,
        unanswered: &mut bool,
    ) -> Result<R, MdsError>
    where
        R: Reply,
        F: Fn(MdsServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        if self.addrs.is_empty() {
            return Err(MdsError::Unavailable("no MDS address".into()));
        }
        let start = Instant::now();
        let mut last = String::new();
        let mut backoff = Duration::from_millis(50);
        while start.elapsed() < self.deadline {
            let client = {
                let mut c = self.current.lock().await;
                if c.client.is_none() {
                    let addr = &self.addrs[c.index % self.addrs.len()];
                    let ep = curve_auth::tls::endpoint(addr)
                        .map_err(|e| MdsError::Unavailable(e.to_string()))?
                        .connect_timeout(Duration::from_secs(1));
                    c.client = Some(MdsServiceClient::new(ep.connect_lazy()));
                }
                c.client.clone().expect("set above")
            };
            let answer = tokio::time::timeout(attempt, f(client))
                .await
                .unwrap_or_else(|_| {
                    Err(tonic::Status::deadline_exceeded(format!(
                        "no answer in {attempt:?}"
                    )))
                });
            match answer {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.status() == MdsStatus::NotLeader as i32 {
                        last = format!("not leader; leader {:?}", r.leader());
                        self.switch(Some(r.leader())).await;
                    } else if r.status() == MdsStatus::Ok as i32 {
                        return Ok(r);
                    } else {
                        return Err(MdsError::Status {
                            status: MdsStatus::try_from(r.status()).unwrap_or(MdsStatus::Internal),
                            message: r.message().to_string(),
                        });
                    }
                }
                Err(s) => {
                    tracing::debug!(error = %s, "MDS call failed; trying the next");
                    *unanswered |= s.code() == tonic::Code::DeadlineExceeded;
                    last = s.to_string();
                    self.switch(None).await;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
        Err(MdsError::Unavailable(last))
    }

    async fn switch(&self, leader: Option<&str>) {
        let mut c = self.current.lock().await;
        c.client = None;
        match leader.and_then(|l| self.addrs.iter().position(|a| a == l)) {
            Some(i) if i != c.index % self.addrs.len() => c.index = i,
            _ => c.index += 1,
        }
    }

    /// Creates a volume (`length` bytes) or, with `FileType::Directory`, a directory.
    pub async fn create(
        &self,
        path: &str,
        kind: FileType,
        length: u64,
        block_size: u32,
        owner: &str,
    ) -> Result<FileInfo, MdsError> {
        let req = CreateFileRequest {
            path: path.into(),
            r#type: kind as i32,
            length,
            block_size,
            owner: owner.into(),
            ..Default::default()
        };
        Ok(rpc!(self, create_file, "CreateFile", req)?
            .info
            .unwrap_or_default())
    }

    /// Creates a volume striped in units of `stripe_unit` bytes round `stripe_count` chunks
    /// (`curve_proto::layout`; both 0: not striped).
    pub async fn create_striped(
        &self,
        path: &str,
        length: u64,
        block_size: u32,
        (stripe_unit, stripe_count): (u64, u32),
        owner: &str,
    ) -> Result<FileInfo, MdsError> {
        let req = CreateFileRequest {
            path: path.into(),
            r#type: FileType::Volume as i32,
            length,
            block_size,
            owner: owner.into(),
            stripe_unit,
            stripe_count,
        };
        Ok(rpc!(self, create_file, "CreateFile", req)?
            .info
            .unwrap_or_default())
    }

    /// Stats a path.
    pub async fn stat(&self, path: &str) -> Result<FileInfo, MdsError> {
        let req = PathRequest {
            path: path.into(),
            owner: String::new(),
        };
        Ok(rpc!(self, stat_file, "StatFile", req, QUICK_ATTEMPT)?
            .info
            .unwrap_or_default())
    }

    /// Lists a directory.
    pub async fn list(&self, path: &str) -> Result<Vec<FileInfo>, MdsError> {
        let req = PathRequest {
            path: path.into(),
            owner: String::new(),
        };
        Ok(rpc!(self, list_dir, "ListDir", req)?.files)
    }

    /// Grows a volume.
    pub async fn extend(&self, path: &str, length: u64, owner: &str) -> Result<FileInfo, MdsError> {
        let req = ExtendFileRequest {
            path: path.into(),
            new_length: length,
            owner: owner.into(),
        };
        Ok(rpc!(self, extend_file, "ExtendFile", req)?
            .info
            .unwrap_or_default())
    }

    /// Renames or moves.
    pub async fn rename(&self, from: &str, to: &str, owner: &str) -> Result<FileInfo, MdsError> {
        let req = RenameFileRequest {
            from: from.into(),
            to: to.into(),
            owner: owner.into(),
        };
        Ok(rpc!(self, rename_file, "RenameFile", req)?
            .info
            .unwrap_or_default())
    }

    /// Moves to the recycle bin (`force`: purges at once).
    pub async fn delete(&self, path: &str, owner: &str, force: bool) -> Result<FileInfo, MdsError> {
        let req = DeleteFileRequest {
            path: path.into(),
            owner: owner.into(),
            force,
        };
        Ok(rpc!(self, delete_file, "DeleteFile", req)?
            .info
            .unwrap_or_default())
    }

    /// Brings a file back from the recycle bin.
    pub async fn recover(&self, path: &str, owner: &str) -> Result<FileInfo, MdsError> {
        let req = RecycleRequest {
            path: path.into(),
            owner: owner.into(),
        };
        Ok(rpc!(self, recover_file, "RecoverFile", req)?
            .info
            .unwrap_or_default())
    }

    /// Sets a volume's QoS limits.
    pub async fn set_qos(&self, path: &str, owner: &str, qos: Qos) -> Result<FileInfo, MdsError> {
        let req = SetQosRequest {
            path: path.into(),
            owner: owner.into(),
            qos: Some(qos),
        };
        Ok(rpc!(self, set_qos, "SetQos", req)?.info.unwrap_or_default())
    }

    /// Opens a volume (exclusive): its info, the session and (auth on) the ticket.
    pub async fn open(
        &self,
        path: &str,
        owner: &str,
        client: &str,
    ) -> Result<(FileInfo, Session, Vec<u8>), MdsError> {
        self.open_with(path, owner, client, false).await
    }

    /// As [`MdsClient::open`]; `fill`: a sessionless, read-only open of a clone whose ticket
    /// may fill its chunks (a flatten). `PATH@NAME` opens a snapshot (read-only, sessionless:
    /// the session id is empty).
    pub async fn open_with(
        &self,
        path: &str,
        owner: &str,
        client: &str,
        fill: bool,
    ) -> Result<(FileInfo, Session, Vec<u8>), MdsError> {
        let req = OpenFileRequest {
            path: path.into(),
            owner: owner.into(),
            client: client.into(),
            fill,
            layout_version: curve_proto::layout::VERSION,
        };
        let r = rpc!(self, open_file, "OpenFile", req)?;
        Ok((
            r.info.unwrap_or_default(),
            r.session.unwrap_or_default(),
            r.ticket,
        ))
    }

    /// Refreshes a session's lease.
    pub async fn refresh(&self, path: &str, session: &str) -> Result<SessionResponse, MdsError> {
        self.refresh_with(path, session, 0, false).await
    }

    /// As [`MdsClient::refresh`], saying that the client's writes carry snapshot sequence
    /// number `snap_seq`; a sessionless open (empty `session`) renews its ticket (`fill`: a
    /// flatten's).
    pub async fn refresh_with(
        &self,
        path: &str,
        session: &str,
        snap_seq: u64,
        fill: bool,
    ) -> Result<SessionResponse, MdsError> {
        let req = SessionRequest {
            path: path.into(),
            session_id: session.into(),
            snap_seq,
            fill,
        };
        rpc!(self, refresh_session, "RefreshSession", req, QUICK_ATTEMPT)
    }

    /// Takes snapshot `name` of the volume at `path`; answers once the volume's writer (if
    /// any) took it.
    pub async fn create_snapshot(
        &self,
        path: &str,
        name: &str,
        owner: &str,
    ) -> Result<SnapshotInfo, MdsError> {
        let req = SnapshotRequest {
            path: path.into(),
            name: name.into(),
            owner: owner.into(),
        };
        Ok(rpc!(self, create_snapshot, "CreateSnapshot", req)?
            .snapshots
            .pop()
            .unwrap_or_default())
    }

    /// The snapshots of the volume at `path`, oldest first.
    pub async fn list_snapshots(&self, path: &str) -> Result<Vec<SnapshotInfo>, MdsError> {
        let req = SnapshotRequest {
            path: path.into(),
            ..Default::default()
        };
        Ok(rpc!(self, list_snapshots, "ListSnapshots", req)?.snapshots)
    }

    /// Deletes the snapshot `PATH@NAME`.
    pub async fn delete_snapshot(&self, path: &str, owner: &str) -> Result<(), MdsError> {
        let req = SnapshotRequest {
            path: path.into(),
            owner: owner.into(),
            ..Default::default()
        };
        let key = self.key.clone();
        let mut unanswered = false;
        let r = self
            .call_noting(
                SLOW_ATTEMPT,
                |mut c| {
                    let req =
                        curve_auth::user_request(key.as_deref(), "DeleteSnapshot", req.clone());
                    async move { c.delete_snapshot(req).await }
                },
                &mut unanswered,
            )
            .await;
        match r {
            // An attempt that timed out (dropping a loaded cluster's chunk data takes a while)
            // deleted it, and its retry found nothing: the deletion asked for is done.
            Err(MdsError::Status {
                status: MdsStatus::NotFound,
                ..
            }) if unanswered => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Creates volume `path` as a clone of the snapshot `source` (`PATH@NAME`).
    pub async fn clone_volume(
        &self,
        source: &str,
        path: &str,
        owner: &str,
    ) -> Result<FileInfo, MdsError> {
        let req = CloneRequest {
            source: source.into(),
            path: path.into(),
            owner: owner.into(),
        };
        Ok(rpc!(self, clone_volume, "CloneVolume", req)?
            .info
            .unwrap_or_default())
    }

    /// What the volume at `path` and each of its snapshots hold on the chunkservers.
    pub async fn space(&self, path: &str) -> Result<SpaceResponse, MdsError> {
        let req = PathRequest {
            path: path.into(),
            owner: String::new(),
        };
        rpc!(self, volume_space, "VolumeSpace", req)
    }

    /// Ends a filled clone's tie to its source.
    pub async fn flatten(&self, path: &str, owner: &str) -> Result<FileInfo, MdsError> {
        let req = PathRequest {
            path: path.into(),
            owner: owner.into(),
        };
        Ok(rpc!(self, flatten_volume, "FlattenVolume", req)?
            .info
            .unwrap_or_default())
    }

    /// Closes a session.
    pub async fn close(&self, path: &str, session: &str) -> Result<(), MdsError> {
        let req = SessionRequest {
            path: path.into(),
            session_id: session.into(),
            ..Default::default()
        };
        rpc!(self, close_file, "CloseFile", req).map(|_| ())
    }

    /// The segment containing `offset` (allocated when `allocate`); `Ok(None)` when it is not
    /// allocated (its chunks read as zeros).
    pub async fn segment(
        &self,
        path: &str,
        owner: &str,
        offset: u64,
        allocate: bool,
    ) -> Result<Option<Segment>, MdsError> {
        let req = SegmentRequest {
            path: path.into(),
            offset,
            allocate,
            owner: owner.into(),
        };
        match rpc!(
            self,
            get_or_allocate_segment,
            "GetOrAllocateSegment",
            req,
            QUICK_ATTEMPT
        ) {
            Ok(r) => Ok(r.segment),
            Err(e) if !allocate && e.status() == Some(MdsStatus::Unallocated) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Peers and leaders of copysets of a pool (all when `ids` is empty).
    pub async fn copysets(&self, pool: u32, ids: &[u32]) -> Result<Vec<CopysetLocation>, MdsError> {
        let req = GetCopysetsRequest {
            logical_pool_id: pool,
            copyset_ids: ids.to_vec(),
        };
        Ok(rpc!(self, get_copysets, "GetCopysets", req, QUICK_ATTEMPT)?.copysets)
    }

    /// Chunkservers, copysets and operators in flight.
    pub async fn topology(&self) -> Result<TopologyResponse, MdsError> {
        let key = self.key.clone();
        self.call(|mut c| {
            let req = curve_auth::user_request(key.as_deref(), "GetTopology", TopologyRequest {});
            async move { c.get_topology(req).await }
        })
        .await
    }

    /// Registers user `name` with its public key (admin only); the users after.
    pub async fn create_user(
        &self,
        name: &str,
        public: [u8; 32],
    ) -> Result<Vec<UserInfo>, MdsError> {
        let req = UserRequest {
            name: name.into(),
            public_key: public.to_vec(),
        };
        Ok(rpc!(self, create_user, "CreateUser", req)?.users)
    }

    /// The users (admin only).
    pub async fn list_users(&self) -> Result<Vec<UserInfo>, MdsError> {
        Ok(rpc!(self, list_users, "ListUsers", UserRequest::default())?.users)
    }

    /// Removes user `name` (admin only); the users after.
    pub async fn delete_user(&self, name: &str) -> Result<Vec<UserInfo>, MdsError> {
        let req = UserRequest {
            name: name.into(),
            public_key: Vec::new(),
        };
        Ok(rpc!(self, delete_user, "DeleteUser", req)?.users)
    }
}
