//! The MDS state (namespace, cluster, sessions) behind one lock held only for in-memory
//! decisions, written through to the store in order, and the gRPC services over it
//! (`MdsService` for clients, `HeartbeatService` for chunkservers).
//!
//! A follower MDS (etcd HA) answers every request with NOT_LEADER naming the leader.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use curve_proto::common::Peer;
use curve_proto::heartbeat::heartbeat_service_server::HeartbeatService;
use curve_proto::heartbeat::{
    HeartbeatRequest, HeartbeatResponse, HeartbeatStatus, RegisterRequest, RegisterResponse,
    VolumeEpoch,
};
use curve_proto::mds::mds_service_server::MdsService;
use curve_proto::mds::*;
use parking_lot::{Mutex, RwLock};
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, Timeouts};
use crate::namespace::{
    FileRecord, Geometry, Kind, Namespace, NsError, PoolCopysets, SnapshotRecord,
};
use crate::scheduler::Liveness;
use crate::session::{SessionError, Sessions};
use crate::store::{MetaStore, Op, Writer};
use crate::topology::TopologySpec;

/// How the MDS behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Chunk and segment sizes of new volumes.
    pub geometry: Geometry,
    /// Session lease.
    pub lease: Duration,
    /// Liveness and operator timings.
    pub timeouts: Timeouts,
    /// The topology description.
    pub topology: TopologySpec,
    /// Whether the scheduler balances copysets and leaders (recovery always runs).
    pub balance: bool,
    /// Authentication (on with a cluster keyring): users' signatures, tickets, grants.
    pub auth: Option<Arc<crate::auth::Auth>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            geometry: Geometry::default(),
            lease: Duration::from_secs(20),
            timeouts: Timeouts::default(),
            topology: TopologySpec::default_single_pool(),
            balance: true,
            auth: None,
        }
    }
}

/// Everything the leader MDS knows.
#[derive(Debug)]
pub struct State {
    /// Namespace.
    pub ns: Namespace,
    /// Topology at run time.
    pub cluster: Cluster,
    /// Open volumes.
    pub sessions: Sessions,
    /// Users and their public keys (auth on).
    pub users: crate::auth::Users,
}

/// The leader MDS.
#[derive(Debug)]
pub struct Mds {
    /// The state.
    pub state: Mutex<State>,
    writer: Writer,
    /// Its options.
    pub opts: Options,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Mds {
    /// Loads the state from `store` and starts writing through to it; `on_fatal` runs when a
    /// write fails (the process should stop serving: memory is ahead of the store).
    pub async fn load(
        store: Arc<dyn MetaStore>,
        opts: Options,
        on_fatal: impl Fn(&crate::store::StoreError) + Send + 'static,
    ) -> Result<Arc<Self>, String> {
        let pairs = store.scan(b"").await.map_err(|e| e.to_string())?;
        let now = Instant::now();
        let mut ns = Namespace::load(&pairs, opts.geometry)?;
        let cluster = Cluster::load(&pairs, opts.topology.clone(), opts.timeouts, now)?;
        let sessions = Sessions::load(&pairs, opts.lease, now);
        let users = crate::auth::load_users(&pairs);
        let boot = ns.bootstrap(now_ms());
        let writer = Writer::start(store, on_fatal);
        writer.queue(boot).await?;
        tracing::info!(files = ns.len(), "metadata loaded");
        Ok(Arc::new(Mds {
            state: Mutex::new(State {
                ns,
                cluster,
                sessions,
                users,
            }),
            writer,
            opts,
        }))
    }

    /// Applies `f` to the state and waits until what it changed is durable.
    pub async fn update<T, E>(
        &self,
        f: impl FnOnce(&mut State) -> Result<(T, Vec<Op>), E>,
    ) -> Result<Result<T, E>, String> {
        let (r, wait) = {
            let mut st = self.state.lock();
            match f(&mut st) {
                Ok((t, ops)) => (Ok(t), self.writer.queue(ops)),
                Err(e) => (Err(e), self.writer.queue(Vec::new())),
            }
        };
        wait.await?;
        Ok(r)
    }
}

/// Who answers requests: the leader's state, or who the leader is.
#[derive(Debug, Default)]
pub struct Role {
    leader: RwLock<Option<Arc<Mds>>>,
    leader_addr: RwLock<String>,
}

impl Role {
    /// Becomes the leader with `mds`.
    pub fn lead(&self, mds: Arc<Mds>) {
        *self.leader.write() = Some(mds);
    }

    /// Records the leader's address (followers).
    pub fn follow(&self, addr: String) {
        *self.leader_addr.write() = addr;
    }

    /// The leader's state when this MDS leads.
    pub fn mds(&self) -> Option<Arc<Mds>> {
        self.leader.read().clone()
    }

    fn leader_addr(&self) -> String {
        self.leader_addr.read().clone()
    }
}

/// The gRPC services of one MDS process.
#[derive(Debug, Clone)]
pub struct Services {
    role: Arc<Role>,
}

impl Services {
    /// Services answering for `role`.
    pub fn new(role: Arc<Role>) -> Self {
        Services { role }
    }
}

fn status_of(e: &NsError) -> MdsStatus {
    match e {
        NsError::Exists(_) => MdsStatus::Exists,
        NsError::NotFound(_) => MdsStatus::NotFound,
        NsError::Invalid(_) => MdsStatus::Invalid,
        NsError::NotDirectory(_) => MdsStatus::NotDirectory,
        NsError::NotAVolume(_) => MdsStatus::NotAVolume,
        NsError::NotEmpty(_) => MdsStatus::NotEmpty,
        NsError::ShrinkRefused(..) => MdsStatus::ShrinkRefused,
        NsError::AuthFailed(_) => MdsStatus::AuthFailed,
        NsError::NoSpace => MdsStatus::NoSpace,
        NsError::Occupied(_) => MdsStatus::Occupied,
        NsError::InUse(_) => MdsStatus::InUse,
    }
}

fn snapshot_info(st: &State, f: &FileRecord, s: &SnapshotRecord) -> SnapshotInfo {
    SnapshotInfo {
        name: s.name.clone(),
        seq: s.seq,
        ctime_ms: s.ctime_ms,
        ready: st.sessions.took_snapshot(f.id, s.seq, Instant::now()),
        clones: st.ns.clones_of(f.id, s.seq),
    }
}

fn info(st: &State, f: &FileRecord) -> FileInfo {
    let ns = &st.ns;
    FileInfo {
        snap_seq: f.snap_seq(),
        snapshots: f
            .snapshots
            .iter()
            .map(|s| snapshot_info(st, f, s))
            .collect(),
        clone_source: f.clone_of.as_ref().map(|c| CloneInfo {
            volume_id: c.volume,
            seq: c.seq,
            snapshot: c.snapshot.clone(),
            path: format!("{}@{}", ns.path_of(c.volume), c.snapshot),
        }),
        snapshot_seq: 0,
        id: f.id,
        parent_id: f.parent,
        name: f.name.clone(),
        path: match &f.deleted {
            Some(o) => o.path.clone(),
            None => ns.path_of(f.id),
        },
        r#type: match f.kind {
            Kind::Volume => FileType::Volume,
            Kind::Directory => FileType::Directory,
        } as i32,
        length: f.length,
        block_size: f.block_size,
        chunk_size: f.chunk_size,
        segment_size: f.segment_size,
        stripe_unit: f.stripe_unit,
        stripe_count: f.stripe_count,
        owner: f.owner.clone(),
        ctime_ms: f.ctime_ms,
        status: if f.deleted.is_some() {
            FileStatus::Deleted
        } else {
            FileStatus::Normal
        } as i32,
        epoch: f.epoch,
        qos: Some(Qos {
            iops_total: f.qos.iops_total,
            iops_read: f.qos.iops_read,
            iops_write: f.qos.iops_write,
            bps_total: f.qos.bps_total,
            bps_read: f.qos.bps_read,
            bps_write: f.qos.bps_write,
            burst_ms: f.qos.burst_ms,
        }),
    }
}

/// Builds a reply of type `$t` with status, leader and message.
macro_rules! reply {
    ($t:ident, $status:expr, $leader:expr, $msg:expr) => {
        $t {
            status: $status as i32,
            leader: $leader,
            message: $msg,
            ..Default::default()
        }
    };
}

/// Runs `$body` with the leader's state `$mds`, or answers NOT_LEADER.
macro_rules! leader_or {
    ($self:ident, $t:ident, $mds:ident => $body:expr) => {{
        match $self.role.mds() {
            None => Ok(Response::new(reply!(
                $t,
                MdsStatus::NotLeader,
                $self.role.leader_addr(),
                "not the leader MDS".to_string()
            ))),
            Some($mds) => {
                let r: Result<$t, String> = $body.await;
                Ok(Response::new(r.unwrap_or_else(|e| {
                    reply!($t, MdsStatus::Internal, String::new(), e)
                })))
            }
        }
    }};
}

fn file_reply(r: Result<FileInfo, NsError>) -> FileResponse {
    match r {
        Ok(i) => FileResponse {
            info: Some(i),
            ..Default::default()
        },
        Err(e) => reply!(FileResponse, status_of(&e), String::new(), e.to_string()),
    }
}

/// The caller of request `$r` (see [`Services::caller`]), or an AUTH_FAILED reply of type `$t`.
macro_rules! caller {
    ($self:ident, $r:ident, $t:ident, $method:expr) => {
        match $self.caller(&$r, $method) {
            Ok(c) => c,
            Err(e) => return Ok(Response::new(refusal!($t, e))),
        }
    };
}

/// An AUTH_FAILED reply of type `$t` for `$e`.
macro_rules! refusal {
    ($t:ident, $e:expr) => {
        reply!($t, MdsStatus::AuthFailed, String::new(), $e.to_string())
    };
}

/// `$e` (a `Result<_, AuthError>`), or an AUTH_FAILED reply of type `$t`.
macro_rules! or_refuse {
    ($e:expr, $t:ident, $method:expr) => {
        match $e {
            Ok(x) => x,
            Err(e) => {
                curve_auth::refused(&e, $method);
                return Ok(Response::new(refusal!($t, e)));
            }
        }
    };
}

impl Services {
    /// Who sent `r`: with auth off, anyone; a follower leaves the check to the leader (it
    /// answers NOT_LEADER).
    fn caller<T: prost::Message>(
        &self,
        r: &Request<T>,
        method: &str,
    ) -> Result<crate::auth::Caller, curve_auth::AuthError> {
        let Some(mds) = self.role.mds() else {
            return Ok(crate::auth::Caller::Anyone);
        };
        let Some(auth) = &mds.opts.auth else {
            return Ok(crate::auth::Caller::Anyone);
        };
        let users = mds.state.lock().users.clone();
        auth.caller(&users, r, method)
            .inspect_err(|e| curve_auth::refused(e, method))
    }
}

/// A sessionless, read-only open of `path`: `PATH@NAME` (a snapshot, once the volume's writer
/// took it), or a clone opened to be filled (`fill`). Answers the volume's info (with the
/// snapshot's number) and a read-only ticket.
fn read_only_open(
    st: &State,
    mds: &Mds,
    path: &str,
    owner: &str,
    (fill, layout_version): (bool, u32),
) -> Result<(FileInfo, Vec<u8>), NsError> {
    let (id, snap) = st.ns.resolve(path)?;
    let f = st.ns.get(id).expect("resolved");
    if f.kind != Kind::Volume || f.deleted.is_some() {
        return Err(NsError::NotAVolume(path.into()));
    }
    if let Some(why) = curve_proto::layout::refuse_open(f.stripe_count, layout_version) {
        return Err(NsError::Invalid(format!("{path}: {why}")));
    }
    if owner != "root" && f.owner != owner {
        return Err(NsError::AuthFailed(path.into()));
    }
    if let Some(s) = &snap
        && !st.sessions.took_snapshot(id, s.seq, Instant::now())
    {
        return Err(NsError::Invalid(format!(
            "snapshot {path} is still being taken"
        )));
    }
    if fill && (snap.is_some() || f.clone_of.is_none()) {
        return Err(NsError::Invalid(format!("{path} is not a clone to fill")));
    }
    let ticket = mds
        .opts
        .auth
        .as_ref()
        .map(|a| a.ticket_for(id, f.epoch, true, fill))
        .unwrap_or_default();
    let mut i = info(st, f);
    if let Some(s) = snap {
        // A snapshot of a clone reads from the clone's source of then.
        i.clone_source = s.clone_of.as_ref().map(|c| CloneInfo {
            volume_id: c.volume,
            seq: c.seq,
            snapshot: c.snapshot.clone(),
            path: format!("{}@{}", st.ns.path_of(c.volume), c.snapshot),
        });
        i.snapshot_seq = s.seq;
    }
    Ok((i, ticket))
}

fn snapshot_reply(r: Result<Vec<SnapshotInfo>, NsError>) -> SnapshotResponse {
    match r {
        Ok(snapshots) => SnapshotResponse {
            snapshots,
            ..Default::default()
        },
        Err(e) => reply!(
            SnapshotResponse,
            status_of(&e),
            String::new(),
            e.to_string()
        ),
    }
}

/// (pool, copyset, chunk, peers) of every chunk of `segments`.
fn chunk_work(
    st: &State,
    segments: &[crate::namespace::SegmentRecord],
) -> Vec<(u32, u32, u64, Vec<Peer>)> {
    let mut work = Vec::new();
    for s in segments {
        for (chunk, cs) in &s.chunks {
            let peers: Vec<Peer> = st
                .cluster
                .copysets(s.pool, &[*cs])
                .first()
                .map(|(r, _)| r.peers.iter().map(|p| st.cluster.peer(*p)).collect())
                .unwrap_or_default();
            work.push((s.pool, *cs, *chunk, peers));
        }
    }
    work
}

/// Deletes the chunks of purged segments on their copysets (best effort, in the background).
fn clean(mds: &Arc<Mds>, freed: Vec<crate::namespace::SegmentRecord>) {
    if freed.is_empty() {
        return;
    }
    let work = chunk_work(&mds.state.lock(), &freed);
    let ring = mds.opts.auth.as_ref().map(|a| a.ring.clone());
    tokio::spawn(async move {
        crate::daemon::chunk_op(work, ring, None).await;
    });
}

impl Services {
    /// A namespace change answered with the file it leaves, once durable.
    async fn file_change<F>(&self, change: F) -> Result<Response<FileResponse>, Status>
    where
        F: FnOnce(&mut Namespace) -> Result<(FileRecord, Vec<Op>), NsError> + Send,
    {
        leader_or!(self, FileResponse, mds => async move {
            let out = mds
                .update(|st| {
                    let (f, ops) = change(&mut st.ns)?;
                    Ok((info(st, &f), ops))
                })
                .await?;
            Ok(file_reply(out))
        })
    }
}

#[tonic::async_trait]
impl MdsService for Services {
    async fn create_file(
        &self,
        r: Request<CreateFileRequest>,
    ) -> Result<Response<FileResponse>, Status> {
        let caller = caller!(self, r, FileResponse, "CreateFile");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), FileResponse, "CreateFile");
        let kind = match FileType::try_from(r.r#type) {
            Ok(FileType::Directory) => Kind::Directory,
            Ok(FileType::Volume) => Kind::Volume,
            Err(_) => {
                return Ok(Response::new(reply!(
                    FileResponse,
                    MdsStatus::Invalid,
                    String::new(),
                    "unknown file type".into()
                )));
            }
        };
        self.file_change(move |ns| {
            ns.create_striped(
                &r.path,
                kind,
                r.length,
                r.block_size,
                (r.stripe_unit, r.stripe_count),
                &owner,
                now_ms(),
            )
        })
        .await
    }

    async fn stat_file(&self, r: Request<PathRequest>) -> Result<Response<FileResponse>, Status> {
        caller!(self, r, FileResponse, "StatFile");
        let r = r.into_inner();
        leader_or!(self, FileResponse, mds => async move {
            let st = mds.state.lock();
            let out = st.ns.resolve(&r.path).map(|(id, snap)| FileInfo {
                snapshot_seq: snap.map_or(0, |s| s.seq),
                ..info(&st, st.ns.get(id).expect("looked up"))
            });
            Ok(file_reply(out))
        })
    }

    async fn list_dir(&self, r: Request<PathRequest>) -> Result<Response<ListDirResponse>, Status> {
        caller!(self, r, ListDirResponse, "ListDir");
        let r = r.into_inner();
        leader_or!(self, ListDirResponse, mds => async move {
            let st = mds.state.lock();
            Ok(match st.ns.list(&r.path) {
                Ok(files) => ListDirResponse {
                    files: files.into_iter().map(|f| info(&st, f)).collect(),
                    ..Default::default()
                },
                Err(e) => reply!(ListDirResponse, status_of(&e), String::new(), e.to_string()),
            })
        })
    }

    async fn extend_file(
        &self,
        r: Request<ExtendFileRequest>,
    ) -> Result<Response<FileResponse>, Status> {
        let caller = caller!(self, r, FileResponse, "ExtendFile");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), FileResponse, "ExtendFile");
        self.file_change(move |ns| ns.extend(&r.path, r.new_length, &owner))
            .await
    }

    async fn rename_file(
        &self,
        r: Request<RenameFileRequest>,
    ) -> Result<Response<FileResponse>, Status> {
        let caller = caller!(self, r, FileResponse, "RenameFile");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), FileResponse, "RenameFile");
        leader_or!(self, FileResponse, mds => async move {
            let now = Instant::now();
            let out = mds
                .update(|st| {
                    // Clients address open volumes by path: an open volume, or a directory
                    // with one under it, does not move.
                    let prefix = format!("{}/", r.from.trim_end_matches('/'));
                    for f in st.sessions.open_files(now) {
                        let p = st.ns.path_of(f);
                        if p == r.from || p.starts_with(&prefix) {
                            return Err(NsError::Occupied(p));
                        }
                    }
                    let (f, ops) = st.ns.rename(&r.from, &r.to, &owner)?;
                    Ok((info(st, &f), ops))
                })
                .await?;
            Ok(file_reply(out))
        })
    }

    async fn delete_file(
        &self,
        r: Request<DeleteFileRequest>,
    ) -> Result<Response<FileResponse>, Status> {
        let caller = caller!(self, r, FileResponse, "DeleteFile");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), FileResponse, "DeleteFile");
        leader_or!(self, FileResponse, mds => async move {
            let now = Instant::now();
            let out = mds
                .update(|st| {
                    if let Ok(id) = st.ns.lookup(&r.path) {
                        // Whose it is first: others learn nothing, not even that it is open.
                        let f = st.ns.get(id).expect("looked up");
                        if owner != "root" && f.owner != owner {
                            return Err(NsError::AuthFailed(r.path.clone()));
                        }
                        if st.sessions.is_open(id, now) {
                            return Ok((Err(MdsStatus::Occupied), Vec::new()));
                        }
                    }
                    let (f, mut ops, freed) = st.ns.delete(&r.path, &owner, r.force)?;
                    if r.force {
                        ops.extend(st.sessions.forget(f.id));
                    }
                    Ok((Ok((info(st, &f), freed)), ops))
                })
                .await?;
            Ok(match out {
                Ok(Ok((i, freed))) => {
                    clean(&mds, freed);
                    file_reply(Ok(i))
                }
                Ok(Err(s)) => reply!(FileResponse, s, String::new(), format!("{} is open", r.path)),
                Err(e) => file_reply(Err(e)),
            })
        })
    }

    async fn recover_file(
        &self,
        r: Request<RecycleRequest>,
    ) -> Result<Response<FileResponse>, Status> {
        let caller = caller!(self, r, FileResponse, "RecoverFile");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), FileResponse, "RecoverFile");
        self.file_change(move |ns| ns.recover(&r.path, &owner))
            .await
    }

    async fn purge_file(
        &self,
        r: Request<RecycleRequest>,
    ) -> Result<Response<FileResponse>, Status> {
        let caller = caller!(self, r, FileResponse, "PurgeFile");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), FileResponse, "PurgeFile");
        leader_or!(self, FileResponse, mds => async move {
            let out = mds
                .update(|st| {
                    let (f, mut ops, freed) = st.ns.purge(&r.path, &owner)?;
                    ops.extend(st.sessions.forget(f.id));
                    Ok(((info(st, &f), freed), ops))
                })
                .await?;
            Ok(match out {
                Ok((i, freed)) => {
                    clean(&mds, freed);
                    file_reply(Ok(i))
                }
                Err(e) => file_reply(Err(e)),
            })
        })
    }

    async fn open_file(
        &self,
        r: Request<OpenFileRequest>,
    ) -> Result<Response<OpenFileResponse>, Status> {
        let caller = caller!(self, r, OpenFileResponse, "OpenFile");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), OpenFileResponse, "OpenFile");
        if r.fill || r.path.contains('@') {
            return leader_or!(self, OpenFileResponse, mds => async move {
                let st = mds.state.lock();
                Ok(match read_only_open(&st, &mds, &r.path, &owner, (r.fill, r.layout_version)) {
                    Ok((i, ticket)) => OpenFileResponse {
                        session: Some(curve_proto::mds::Session {
                            session_id: String::new(),
                            lease_ms: st.sessions.lease().as_millis() as u64,
                            epoch: i.epoch,
                        }),
                        ticket,
                        info: Some(i),
                        ..Default::default()
                    },
                    Err(e) => reply!(OpenFileResponse, status_of(&e), String::new(), e.to_string()),
                })
            });
        }
        leader_or!(self, OpenFileResponse, mds => async move {
            let now = Instant::now();
            let lease = mds.opts.lease;
            let out = mds
                .update(|st| {
                    let id = st.ns.lookup(&r.path)?;
                    let f = st.ns.get(id).expect("looked up");
                    if f.kind != Kind::Volume || f.deleted.is_some() {
                        return Err(NsError::NotAVolume(r.path.clone()));
                    }
                    if owner != "root" && f.owner != owner {
                        return Err(NsError::AuthFailed(r.path.clone()));
                    }
                    if let Some(why) =
                        curve_proto::layout::refuse_open(f.stripe_count, r.layout_version)
                    {
                        return Err(NsError::Invalid(format!("{}: {why}", r.path)));
                    }
                    let (session, mut ops) = match st.sessions.open(id, &r.client, now) {
                        Ok(x) => x,
                        Err(SessionError::Occupied(by)) => return Ok((Err(by), Vec::new())),
                        Err(SessionError::Expired) => unreachable!("open does not expire"),
                    };
                    let (f, more) = st.ns.bump_epoch(id);
                    ops.extend(more);
                    // Its writes carry the newest snapshot's number from the first.
                    let _ = st.sessions.refresh_at(id, &session, now, f.snap_seq());
                    Ok((Ok((info(st, &f), session)), ops))
                })
                .await?;
            Ok(match out {
                Ok(Ok((i, session_id))) => OpenFileResponse {
                    session: Some(curve_proto::mds::Session {
                        session_id,
                        lease_ms: lease.as_millis() as u64,
                        epoch: i.epoch,
                    }),
                    ticket: mds.opts.auth.as_ref().map(|a| a.ticket(i.id, i.epoch)).unwrap_or_default(),
                    info: Some(i),
                    ..Default::default()
                },
                Ok(Err(by)) => reply!(OpenFileResponse, MdsStatus::Occupied, String::new(), format!("{} is open by {by:?}", r.path)),
                Err(e) => reply!(OpenFileResponse, status_of(&e), String::new(), e.to_string()),
            })
        })
    }

    async fn refresh_session(
        &self,
        r: Request<SessionRequest>,
    ) -> Result<Response<SessionResponse>, Status> {
        let caller = caller!(self, r, SessionResponse, "RefreshSession");
        let r = r.into_inner();
        leader_or!(self, SessionResponse, mds => async move {
            let mut st = mds.state.lock();
            let lease = st.sessions.lease();
            if let Ok((id, _)) = st.ns.resolve(&r.path)
                && let Err(e) = caller.owner(&st.ns.get(id).expect("looked up").owner)
            {
                curve_auth::refused(&e, "RefreshSession");
                return Ok(refusal!(SessionResponse, e));
            }
            if r.session_id.is_empty() {
                // A sessionless (read-only) open renewing its ticket: the caller was checked
                // against the volume's owner just above (and its layout at the open).
                let layout = curve_proto::layout::VERSION;
                return Ok(match read_only_open(&st, &mds, &r.path, "root", (r.fill, layout)) {
                    Ok((i, ticket)) => SessionResponse {
                        info: Some(i),
                        lease_ms: lease.as_millis() as u64,
                        ticket,
                        ..Default::default()
                    },
                    Err(e) => reply!(SessionResponse, status_of(&e), String::new(), e.to_string()),
                });
            }
            Ok(match st.ns.lookup(&r.path) {
                Err(e) => reply!(SessionResponse, status_of(&e), String::new(), e.to_string()),
                Ok(id) => match st.sessions.refresh_at(id, &r.session_id, Instant::now(), r.snap_seq) {
                    Ok(()) => {
                        let f = st.ns.get(id).expect("looked up");
                        SessionResponse {
                            info: Some(info(&st, f)),
                            lease_ms: lease.as_millis() as u64,
                            ticket: mds.opts.auth.as_ref().map(|a| a.ticket(f.id, f.epoch)).unwrap_or_default(),
                            ..Default::default()
                        }
                    }
                    Err(_) => reply!(SessionResponse, MdsStatus::SessionExpired, String::new(), "session expired: reopen".into()),
                },
            })
        })
    }

    async fn close_file(
        &self,
        r: Request<SessionRequest>,
    ) -> Result<Response<SessionResponse>, Status> {
        let caller = caller!(self, r, SessionResponse, "CloseFile");
        let r = r.into_inner();
        leader_or!(self, SessionResponse, mds => async move {
            let out = mds
                .update(|st| {
                    let id = st.ns.lookup(&r.path)?;
                    if caller.owner(&st.ns.get(id).expect("looked up").owner).is_err() {
                        return Err(NsError::AuthFailed(r.path.clone()));
                    }
                    Ok(match st.sessions.close(id, &r.session_id) {
                        Ok(ops) => (true, ops),
                        Err(_) => (false, Vec::new()),
                    })
                })
                .await?;
            Ok(match out {
                Ok(true) => SessionResponse::default(),
                Ok(false) => reply!(SessionResponse, MdsStatus::SessionExpired, String::new(), "no such session".into()),
                Err(e) => reply!(SessionResponse, status_of(&e), String::new(), e.to_string()),
            })
        })
    }

    async fn get_or_allocate_segment(
        &self,
        r: Request<SegmentRequest>,
    ) -> Result<Response<SegmentResponse>, Status> {
        let caller = caller!(self, r, SegmentResponse, "GetOrAllocateSegment");
        let r = r.into_inner();
        let owner = or_refuse!(
            caller.owner(&r.owner),
            SegmentResponse,
            "GetOrAllocateSegment"
        );
        leader_or!(self, SegmentResponse, mds => async move {
            let out = mds
                .update(|st| {
                    let (id, snap) = st.ns.resolve(&r.path)?;
                    let f = st.ns.get(id).expect("looked up");
                    if owner != "root" && f.owner != owner {
                        return Err(NsError::AuthFailed(r.path.clone()));
                    }
                    if snap.is_some() && r.allocate {
                        return Err(NsError::Invalid(format!("{} is a snapshot: read-only", r.path)));
                    }
                    let pool = st.cluster.pool_copysets();
                    let alloc = match (&pool, r.allocate) {
                        (Some((p, ids)), true) => Some(PoolCopysets { pool: *p, copysets: ids }),
                        (None, true) => return Err(NsError::NoSpace),
                        (_, false) => None,
                    };
                    st.ns
                        .segment(id, r.offset, alloc)
                        .map(|(s, ops)| (s.map(|s| (id, s)), ops))
                })
                .await?;
            let ring = mds.opts.auth.as_ref().map(|a| a.ring.get());
            Ok(match out {
                Ok(Some((volume, (offset, s)))) => SegmentResponse {
                    segment: Some(Segment {
                        offset,
                        logical_pool_id: s.pool,
                        chunks: s
                            .chunks
                            .iter()
                            .map(|(c, cs)| ChunkLocation {
                                chunk_id: *c,
                                copyset_id: *cs,
                                grant: ring.as_ref().map(|r| curve_auth::grant(r, volume, *c)).unwrap_or_default(),
                            })
                            .collect(),
                    }),
                    ..Default::default()
                },
                Ok(None) => reply!(SegmentResponse, MdsStatus::Unallocated, String::new(), "segment not allocated".into()),
                Err(e) => reply!(SegmentResponse, status_of(&e), String::new(), e.to_string()),
            })
        })
    }

    async fn set_qos(&self, r: Request<SetQosRequest>) -> Result<Response<FileResponse>, Status> {
        let caller = caller!(self, r, FileResponse, "SetQos");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), FileResponse, "SetQos");
        let q = r.qos.unwrap_or_default();
        let qos = crate::namespace::QosRecord {
            iops_total: q.iops_total,
            iops_read: q.iops_read,
            iops_write: q.iops_write,
            bps_total: q.bps_total,
            bps_read: q.bps_read,
            bps_write: q.bps_write,
            burst_ms: q.burst_ms,
        };
        self.file_change(move |ns| ns.set_qos(&r.path, qos, &owner))
            .await
    }

    async fn get_copysets(
        &self,
        r: Request<GetCopysetsRequest>,
    ) -> Result<Response<GetCopysetsResponse>, Status> {
        caller!(self, r, GetCopysetsResponse, "GetCopysets");
        let r = r.into_inner();
        leader_or!(self, GetCopysetsResponse, mds => async move {
            let st = mds.state.lock();
            Ok(GetCopysetsResponse {
                copysets: st
                    .cluster
                    .copysets(r.logical_pool_id, &r.copyset_ids)
                    .into_iter()
                    .map(|(c, leader)| location(&st.cluster, &c, leader))
                    .collect(),
                ..Default::default()
            })
        })
    }

    async fn get_topology(
        &self,
        r: Request<TopologyRequest>,
    ) -> Result<Response<TopologyResponse>, Status> {
        if let Err(e) = self.caller(&r, "GetTopology") {
            return Ok(Response::new(TopologyResponse {
                status: MdsStatus::AuthFailed as i32,
                ..Default::default()
            }))
            .inspect(|_| tracing::debug!(error = %e, "topology refused"));
        }
        let role = self.role.clone();
        match role.mds() {
            None => Ok(Response::new(TopologyResponse {
                status: MdsStatus::NotLeader as i32,
                leader: role.leader_addr(),
                ..Default::default()
            })),
            Some(mds) => {
                let st = mds.state.lock();
                let now = Instant::now();
                let pool = st.cluster.pool_copysets().map(|p| p.0).unwrap_or(1);
                Ok(Response::new(TopologyResponse {
                    chunkservers: st
                        .cluster
                        .chunkservers(now)
                        .into_iter()
                        .map(|(c, state, held, led, disk)| ChunkserverInfo {
                            id: c.id,
                            address: c.address,
                            zone: c.zone,
                            server: c.server,
                            state: match state {
                                Liveness::Online => OnlineState::Online,
                                Liveness::Unstable => OnlineState::Unstable,
                                Liveness::Offline => OnlineState::Offline,
                            } as i32,
                            copysets: held,
                            leaders: led,
                            disk_capacity: disk.capacity,
                            disk_used: disk.used,
                            disk_full: disk.full,
                        })
                        .collect(),
                    copysets: st
                        .cluster
                        .copysets(pool, &[])
                        .into_iter()
                        .map(|(c, leader)| location(&st.cluster, &c, leader))
                        .collect(),
                    operators: st.cluster.operators() as u32,
                    ..Default::default()
                }))
            }
        }
    }

    async fn create_snapshot(
        &self,
        r: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
        let caller = caller!(self, r, SnapshotResponse, "CreateSnapshot");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), SnapshotResponse, "CreateSnapshot");
        leader_or!(self, SnapshotResponse, mds => async move {
            let out = mds
                .update(|st| {
                    let (f, s, ops) = st.ns.snapshot_create(&r.path, &r.name, &owner, now_ms())?;
                    Ok(((f.id, s), ops))
                })
                .await?;
            let (id, s) = match out {
                Ok(x) => x,
                Err(e) => return Ok(snapshot_reply(Err(e))),
            };
            // Durable now; it is the volume's snapshot once its writer (if any) writes with
            // the new number, which the writer's next refresh says (at most a second).
            let deadline = Instant::now() + mds.opts.lease + Duration::from_secs(2);
            loop {
                {
                    let st = mds.state.lock();
                    if st.sessions.took_snapshot(id, s.seq, Instant::now()) {
                        let Some(f) = st.ns.get(id) else {
                            return Ok(snapshot_reply(Err(NsError::NotFound(r.path.clone()))));
                        };
                        return Ok(snapshot_reply(Ok(vec![snapshot_info(&st, f, &s)])));
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "snapshot {}@{} is recorded but the volume's writer has not taken it",
                        r.path, r.name
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    async fn list_snapshots(
        &self,
        r: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
        caller!(self, r, SnapshotResponse, "ListSnapshots");
        let r = r.into_inner();
        leader_or!(self, SnapshotResponse, mds => async move {
            let st = mds.state.lock();
            let out = st.ns.lookup(&r.path).and_then(|id| {
                let f = st.ns.get(id).expect("looked up");
                if f.kind != Kind::Volume {
                    return Err(NsError::NotAVolume(r.path.clone()));
                }
                Ok(f.snapshots.iter().map(|s| snapshot_info(&st, f, s)).collect())
            });
            Ok(snapshot_reply(out))
        })
    }

    async fn delete_snapshot(
        &self,
        r: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
        let caller = caller!(self, r, SnapshotResponse, "DeleteSnapshot");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), SnapshotResponse, "DeleteSnapshot");
        let (path, name) = match crate::namespace::split_snapshot(&r.path) {
            (p, Some(n)) => (p.to_string(), n.to_string()),
            _ => {
                return Ok(Response::new(snapshot_reply(Err(NsError::Invalid(
                    format!("{}: name the snapshot as PATH@NAME", r.path),
                )))));
            }
        };
        leader_or!(self, SnapshotResponse, mds => async move {
            let out = mds
                .update(|st| {
                    let (f, segments, ops) = st.ns.snapshot_delete(&path, &name, &owner)?;
                    let live: Vec<u64> = f.snapshots.iter().map(|s| s.seq).collect();
                    Ok(((live, chunk_work(st, &segments)), ops))
                })
                .await?;
            let (live, work) = match out {
                Ok(x) => x,
                Err(e) => return Ok(snapshot_reply(Err(e))),
            };
            // Every chunk drops what no live snapshot reads, on every replica (raft).
            let ring = mds.opts.auth.as_ref().map(|a| a.ring.clone());
            // On a task of its own: a caller that stops waiting (its attempt timed out on a
            // loaded cluster, and its retry finds the snapshot gone) does not stop the drops.
            let (p, n) = (path.clone(), name.clone());
            let failed = tokio::spawn(async move {
                let failed = crate::daemon::chunk_op(work, ring, Some(live)).await;
                if failed > 0 {
                    tracing::warn!(
                        snapshot = %format!("{p}@{n}"),
                        failed,
                        "snapshot deleted; chunks that could not drop its data yet keep it until \
                         the volume's next snapshot deletion"
                    );
                }
                failed
            })
            .await
            .unwrap_or(usize::MAX);
            if failed > 0 {
                return Err(format!(
                    "snapshot {path}@{name} is deleted, but {failed} chunks could not drop its \
                     data yet (the next snapshot deletion of the volume does)"
                ));
            }
            Ok(snapshot_reply(Ok(Vec::new())))
        })
    }

    async fn clone_volume(
        &self,
        r: Request<CloneRequest>,
    ) -> Result<Response<FileResponse>, Status> {
        let caller = caller!(self, r, FileResponse, "CloneVolume");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), FileResponse, "CloneVolume");
        leader_or!(self, FileResponse, mds => async move {
            let now = Instant::now();
            let out = mds
                .update(|st| {
                    if let Ok((id, Some(s))) = st.ns.resolve(&r.source)
                        && !st.sessions.took_snapshot(id, s.seq, now)
                    {
                        return Err(NsError::Invalid(format!(
                            "snapshot {} is still being taken",
                            r.source
                        )));
                    }
                    let (f, ops) = st.ns.clone_volume(&r.source, &r.path, &owner, now_ms())?;
                    Ok((info(st, &f), ops))
                })
                .await?;
            Ok(file_reply(out))
        })
    }

    async fn flatten_volume(
        &self,
        r: Request<PathRequest>,
    ) -> Result<Response<FileResponse>, Status> {
        let caller = caller!(self, r, FileResponse, "FlattenVolume");
        let r = r.into_inner();
        let owner = or_refuse!(caller.owner(&r.owner), FileResponse, "FlattenVolume");
        self.file_change(move |ns| ns.flatten(&r.path, &owner))
            .await
    }

    async fn volume_space(
        &self,
        r: Request<PathRequest>,
    ) -> Result<Response<SpaceResponse>, Status> {
        caller!(self, r, SpaceResponse, "VolumeSpace");
        let r = r.into_inner();
        leader_or!(self, SpaceResponse, mds => async move {
            let found = {
                let st = mds.state.lock();
                st.ns.lookup(&r.path).and_then(|id| {
                    let f = st.ns.get(id).expect("looked up").clone();
                    if f.kind != Kind::Volume {
                        return Err(NsError::NotAVolume(r.path.clone()));
                    }
                    Ok((f, chunk_work(&st, &st.ns.segments_of(id))))
                })
            };
            let (f, work) = match found {
                Ok(x) => x,
                Err(e) => return Ok(reply!(SpaceResponse, status_of(&e), String::new(), e.to_string())),
            };
            let auth = mds.opts.auth.clone();
            let infos = crate::daemon::chunk_infos(&work, |chunk| match &auth {
                None => (Vec::new(), Vec::new()),
                Some(a) => (
                    a.ticket_for(f.id, f.epoch, true, false),
                    curve_auth::grant(&a.ring.get(), f.id, chunk),
                ),
            })
            .await;
            let mut out = SpaceResponse {
                snapshots: f
                    .snapshots
                    .iter()
                    .map(|s| SnapshotSpace { name: s.name.clone(), seq: s.seq, bytes: 0 })
                    .collect(),
                ..Default::default()
            };
            for sns in infos {
                let Some((_, tags)) = sns.split_first() else { continue };
                out.volume_bytes += f.chunk_size;
                for tag in tags {
                    // The newest live snapshot the COW file serves.
                    if let Some(s) = out.snapshots.iter_mut().rev().find(|s| s.seq <= *tag) {
                        s.bytes += f.chunk_size;
                    }
                }
            }
            Ok(out)
        })
    }

    async fn create_user(&self, r: Request<UserRequest>) -> Result<Response<UserResponse>, Status> {
        self.users_change(r, "CreateUser", |users, r| {
            if !curve_auth::valid_user_name(&r.name) || r.name == "root" {
                return Err(format!(
                    "bad user name {:?} (1-64 of A-Z a-z 0-9 _ -; not root)",
                    r.name
                ));
            }
            let key: [u8; 32] = r
                .public_key
                .as_slice()
                .try_into()
                .map_err(|_| "the public key is 32 bytes".to_string())?;
            if users.contains_key(&r.name) {
                return Err(format!("user {} exists", r.name));
            }
            users.insert(r.name.clone(), key);
            Ok(vec![Op::Put(crate::auth::user_key(&r.name), key.to_vec())])
        })
        .await
    }

    async fn list_users(&self, r: Request<UserRequest>) -> Result<Response<UserResponse>, Status> {
        self.users_change(r, "ListUsers", |_, _| Ok(Vec::new()))
            .await
    }

    async fn delete_user(&self, r: Request<UserRequest>) -> Result<Response<UserResponse>, Status> {
        self.users_change(r, "DeleteUser", |users, r| {
            users
                .remove(&r.name)
                .map(|_| vec![Op::Delete(crate::auth::user_key(&r.name))])
                .ok_or_else(|| format!("no user {}", r.name))
        })
        .await
    }
}

impl Services {
    /// A change of the users (admin only), answered with the users after it.
    async fn users_change(
        &self,
        r: Request<UserRequest>,
        method: &'static str,
        change: impl FnOnce(&mut crate::auth::Users, &UserRequest) -> Result<Vec<Op>, String>
        + Send
        + 'static,
    ) -> Result<Response<UserResponse>, Status> {
        let caller = caller!(self, r, UserResponse, method);
        or_refuse!(caller.admin(), UserResponse, method);
        let r = r.into_inner();
        leader_or!(self, UserResponse, mds => async move {
            let Some(auth) = mds.opts.auth.clone() else {
                return Ok(reply!(UserResponse, MdsStatus::Invalid, String::new(), "authentication is off on this cluster (no --cluster-key-file)".into()));
            };
            let out = mds
                .update(|st| change(&mut st.users, &r).map(|ops| (users_of(&auth, &st.users), ops)))
                .await?;
            Ok(match out {
                Ok(users) => UserResponse { users, ..Default::default() },
                Err(e) => reply!(UserResponse, MdsStatus::Invalid, String::new(), e),
            })
        })
    }
}

fn users_of(auth: &crate::auth::Auth, users: &crate::auth::Users) -> Vec<UserInfo> {
    std::iter::once(UserInfo {
        name: auth.admin.0.clone(),
        public_key_hex: curve_auth::hex(&auth.admin.1),
        admin: true,
    })
    .chain(users.iter().map(|(n, k)| UserInfo {
        name: n.clone(),
        public_key_hex: curve_auth::hex(k),
        admin: false,
    }))
    .collect()
}

fn location(
    cluster: &Cluster,
    c: &crate::topology::CopysetRecord,
    leader: Option<u32>,
) -> CopysetLocation {
    CopysetLocation {
        logical_pool_id: c.pool,
        copyset_id: c.id,
        peers: c.peers.iter().map(|p| cluster.peer(*p)).collect(),
        leader: leader.map(|l| cluster.peer(l)),
        epoch: c.epoch,
    }
}

#[tonic::async_trait]
impl HeartbeatService for Services {
    async fn register(
        &self,
        r: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        if let Err(e) = self.caller(&r, "Register").and_then(|c| c.cluster()) {
            return Ok(Response::new(RegisterResponse {
                status: HeartbeatStatus::HbInvalid as i32,
                leader: e.to_string(),
                ..Default::default()
            }));
        }
        let r = r.into_inner();
        let Some(mds) = self.role.mds() else {
            return Ok(Response::new(RegisterResponse {
                status: HeartbeatStatus::HbNotLeader as i32,
                leader: self.role.leader_addr(),
                ..Default::default()
            }));
        };
        let out = match mds.update(|st| st.cluster.register(&r)).await {
            Ok(out) => out,
            Err(e) => {
                return Ok(Response::new(RegisterResponse {
                    status: HeartbeatStatus::HbInternal as i32,
                    leader: e,
                    ..Default::default()
                }));
            }
        };
        Ok(Response::new(match out {
            Ok(rec) => {
                tracing::info!(id = rec.id, address = %rec.address, zone = %rec.zone, "chunkserver registered");
                RegisterResponse {
                    status: HeartbeatStatus::HbOk as i32,
                    chunkserver_id: rec.id,
                    token: rec.token,
                    ..Default::default()
                }
            }
            Err(e) => {
                tracing::warn!(address = %r.address, reason = %e.1, "registration refused");
                RegisterResponse {
                    status: e.0 as i32,
                    leader: e.1,
                    ..Default::default()
                }
            }
        }))
    }

    async fn heartbeat(
        &self,
        r: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        if let Err(e) = self.caller(&r, "Heartbeat").and_then(|c| c.cluster()) {
            return Ok(Response::new(HeartbeatResponse {
                status: HeartbeatStatus::HbInvalid as i32,
                leader: e.to_string(),
                ..Default::default()
            }));
        }
        let r = r.into_inner();
        let Some(mds) = self.role.mds() else {
            return Ok(Response::new(HeartbeatResponse {
                status: HeartbeatStatus::HbNotLeader as i32,
                leader: self.role.leader_addr(),
                ..Default::default()
            }));
        };
        let done = mds
            .update(|st| {
                st.cluster
                    .heartbeat(&r, Instant::now())
                    .map(|o| ((o.changes, o.removals), o.ops))
            })
            .await;
        let Ok(out) = done else {
            return Ok(Response::new(HeartbeatResponse {
                status: HeartbeatStatus::HbInternal as i32,
                ..Default::default()
            }));
        };
        Ok(Response::new(match out {
            Ok((changes, removals)) => HeartbeatResponse {
                status: HeartbeatStatus::HbOk as i32,
                changes,
                removals,
                epochs: if mds.opts.auth.is_some() {
                    let st = mds.state.lock();
                    st.sessions
                        .open_files(Instant::now())
                        .into_iter()
                        .filter_map(|id| {
                            st.ns.get(id).map(|f| VolumeEpoch {
                                volume: id,
                                epoch: f.epoch,
                            })
                        })
                        .collect()
                } else {
                    Vec::new()
                },
                ..Default::default()
            },
            Err(e) => HeartbeatResponse {
                status: e.0 as i32,
                leader: e.1,
                ..Default::default()
            },
        }))
    }
}
