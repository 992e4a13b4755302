//! The chunkserver process: data directory, identity (registration), copyset rebuild, the
//! gRPC services, and heartbeats to the MDS that carry copyset state and bring back
//! configuration changes to execute.
//!
//! ```text
//!  <data-dir>/chunkserver.pid    flock'ed: one process per data directory (disk)
//!  <data-dir>/chunkserver.dat    id + token from registration (identity)
//!  <data-dir>/chunkfilepool/     ChunkFilePool
//!  <data-dir>/copysets/<pool>_<copyset>/{data,raft,sm}
//! ```

use std::future::Future;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use curve_proto::chunk::chunk_service_server::ChunkServiceServer;
use curve_proto::cli::cli_service_server::CliServiceServer;
use curve_proto::common::{CopysetKey, Peer};
use curve_proto::copyset::copyset_service_server::CopysetServiceServer;
use curve_proto::heartbeat::heartbeat_service_client::HeartbeatServiceClient;
use curve_proto::heartbeat::{
    ConfigChange, ConfigChangeType, CopysetInfo, HeartbeatRequest, HeartbeatStatus, RegisterRequest,
};
use curve_proto::raft::raft_service_server::RaftServiceServer;

use crate::auth::ChunkAuth;
use crate::chunkfilepool::{ChunkFilePool, PoolOptions};
use crate::copyset::{CopysetNode, CopysetNodeManager, CopysetOptions};
use crate::datastore::META_PAGE;
use crate::disk::DiskWatch;
use crate::identity::{self, Identity};
use crate::service::ChunkServerServices;

/// How a chunkserver runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory (one disk).
    pub data_dir: PathBuf,
    /// host:port to serve on (and to advertise).
    pub listen: String,
    /// MDS addresses (host:port), tried in turn.
    pub mds: Vec<String>,
    /// Zone and server names reported at registration.
    pub zone: String,
    /// Server name.
    pub server: String,
    /// Copyset sizes and timings.
    pub copyset: CopysetOptions,
    /// Chunk files kept ready in the pool.
    pub pool_target: usize,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Chunk requests in flight beyond which OVERLOAD is answered.
    pub max_inflight: usize,
    /// host:port of the Prometheus endpoint (`GET /metrics`), if any.
    pub metrics_listen: Option<String>,
    /// Free space kept on the data disk, percent ([`crate::disk`]).
    pub disk_reserve_percent: u8,
}

struct Mds {
    addrs: Vec<String>,
    current: usize,
    client: Option<HeartbeatServiceClient<tonic::transport::Channel>>,
}

impl Mds {
    /// A client of the current MDS; rotates to the next address when one is unreachable.
    async fn client(&mut self) -> Option<&mut HeartbeatServiceClient<tonic::transport::Channel>> {
        if self.client.is_none() {
            let addr = &self.addrs[self.current % self.addrs.len()];
            match curve_auth::tls::connect(addr, Duration::from_secs(3))
                .await
                .map(HeartbeatServiceClient::new)
            {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    tracing::warn!(mds = %addr, error = %e, "MDS unreachable");
                    self.failover();
                    return None;
                }
            }
        }
        self.client.as_mut()
    }

    fn failover(&mut self) {
        self.client = None;
        self.current += 1;
    }

    /// Follows a "not leader" answer naming the leader.
    fn redirect(&mut self, leader: &str) {
        self.client = None;
        match self.addrs.iter().position(|a| a == leader) {
            Some(i) => self.current = i,
            None => self.current += 1,
        }
    }
}

fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Chunk data and raft logs are readable by this user only, whatever the directory was.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let path = dir.join("chunkserver.pid");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another chunkserver is running on {}", dir.display());
    }
    f.set_len(0)?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

async fn register(cfg: &Config, mds: &mut Mds) -> anyhow::Result<Identity> {
    let (capacity, _) = crate::disk::usage(&cfg.data_dir);
    loop {
        if let Some(c) = mds.client().await {
            let req = RegisterRequest {
                address: cfg.listen.clone(),
                data_dir: cfg.data_dir.display().to_string(),
                zone: cfg.zone.clone(),
                server: cfg.server.clone(),
                disk_capacity: capacity,
            };
            let req = curve_auth::peer_request(cfg.copyset.ring.as_ref(), "Register", req);
            match c.register(req).await.map(|r| r.into_inner()) {
                Ok(r) if r.status == HeartbeatStatus::HbOk as i32 => {
                    return Ok(Identity {
                        id: r.chunkserver_id,
                        token: r.token,
                    });
                }
                Ok(r) if r.status == HeartbeatStatus::HbNotLeader as i32 => mds.redirect(&r.leader),
                Ok(r) => bail!(
                    "the MDS refused the registration (status {}): {}",
                    r.status,
                    r.leader
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "registration failed; retrying");
                    mds.failover();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn copyset_info(node: &CopysetNode) -> CopysetInfo {
    let v = node.view();
    CopysetInfo {
        key: Some(CopysetKey {
            logical_pool_id: node.pool,
            copyset_id: node.copyset,
        }),
        leader: v.leader,
        peers: v.peers,
        epoch: v.epoch,
        term: v.term,
        in_progress: None,
        io_ops: node.metrics.read.ops() + node.metrics.write.ops(),
    }
}

/// Executes one configuration change on a copyset this chunkserver leads, through the same
/// CliService operations an operator would call.
pub async fn execute(
    svc: &ChunkServerServices,
    ring: Option<&curve_auth::SharedKeyring>,
    node: &CopysetNode,
    change: &ConfigChange,
) -> Result<(), String> {
    use curve_proto::cli::CliRequest;
    use curve_proto::cli::cli_service_server::CliService;
    let peer = change.peer.clone().ok_or("change without a peer")?;
    // Signed like a request from another daemon: the MDS decided it (auth on).
    let req = |method: &str, peer: Peer, new_peers: Vec<Peer>| {
        curve_auth::peer_request(
            ring,
            method,
            CliRequest {
                logical_pool_id: node.pool,
                copyset_id: node.copyset,
                peer: Some(peer),
                new_peers,
            },
        )
    };
    let answer = match ConfigChangeType::try_from(change.r#type).map_err(|e| e.to_string())? {
        ConfigChangeType::AddPeer => svc.add_peer(req("AddPeer", peer, Vec::new())).await,
        ConfigChangeType::RemovePeer => svc.remove_peer(req("RemovePeer", peer, Vec::new())).await,
        ConfigChangeType::ChangePeer => {
            let old = change.old_peer.as_ref().map(|p| p.chunkserver_id);
            let mut peers: Vec<Peer> = node
                .view()
                .peers
                .into_iter()
                .filter(|p| Some(p.chunkserver_id) != old)
                .collect();
            peers.push(peer.clone());
            svc.change_peers(req("ChangePeers", peer, peers)).await
        }
        ConfigChangeType::TransferLeader => {
            svc.transfer_leader(req("TransferLeader", peer, Vec::new()))
                .await
        }
        ConfigChangeType::None => return Ok(()),
    };
    let r = answer.map_err(|e| e.to_string())?.into_inner();
    if r.status == 0 {
        Ok(())
    } else {
        Err(r.message)
    }
}

async fn heartbeat_loop(
    cfg: Config,
    identity: Identity,
    manager: Arc<CopysetNodeManager>,
    mut mds: Mds,
    svc: ChunkServerServices,
    auth: Option<Arc<ChunkAuth>>,
    disk: Arc<DiskWatch>,
) {
    let ring = cfg.copyset.ring.clone();
    let mut tick = tokio::time::interval(cfg.heartbeat);
    loop {
        tick.tick().await;
        let disk_state = disk.state();
        let req = HeartbeatRequest {
            chunkserver_id: identity.id,
            token: identity.token.clone(),
            address: cfg.listen.clone(),
            disk_capacity: disk_state.capacity,
            disk_used: disk_state.used,
            disk_full: disk_state.full,
            copysets: manager.list().iter().map(|n| copyset_info(n)).collect(),
        };
        let Some(c) = mds.client().await else {
            continue;
        };
        let reply = match c
            .heartbeat(curve_auth::peer_request(ring.as_ref(), "Heartbeat", req))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                mds.failover();
                continue;
            }
        };
        if reply.status == HeartbeatStatus::HbNotLeader as i32 {
            mds.redirect(&reply.leader);
            continue;
        }
        if reply.status != HeartbeatStatus::HbOk as i32 {
            tracing::warn!(status = reply.status, message = %reply.leader, "heartbeat refused");
            continue;
        }
        if let Some(a) = &auth {
            let epochs: Vec<(u64, u64)> =
                reply.epochs.iter().map(|e| (e.volume, e.epoch)).collect();
            a.raise(&epochs);
        }
        for removal in reply.removals {
            let Some(key) = removal.key else {
                continue;
            };
            let manager = manager.clone();
            tokio::spawn(async move {
                let (pool, copyset) = (key.logical_pool_id, key.copyset_id);
                if let Err(e) = manager.remove(pool, copyset, removal.epoch).await {
                    tracing::warn!(pool, copyset, error = %e, "copyset replica not deleted");
                }
            });
        }
        for change in reply.changes {
            let Some(key) = change.key else {
                continue;
            };
            let Some(node) = manager.get(key.logical_pool_id, key.copyset_id) else {
                continue;
            };
            let svc = svc.clone();
            let ring = ring.clone();
            tokio::spawn(async move {
                match execute(&svc, ring.as_ref(), &node, &change).await {
                    Ok(()) => tracing::info!(?change, "configuration change done"),
                    Err(e) => tracing::warn!(?change, error = %e, "configuration change failed"),
                }
            });
        }
    }
}

/// The follower best placed to lead `node` now: the voters other than us, most caught up
/// first.
fn followers_by_progress(node: &CopysetNode) -> Vec<Peer> {
    let m = node.raft.metrics().borrow().clone();
    let matched = |id: u32| {
        m.replication
            .as_ref()
            .and_then(|r| r.get(&u64::from(id)).cloned().flatten())
            .map_or(0, |l| l.index)
    };
    let mut peers: Vec<Peer> = node
        .view()
        .peers
        .into_iter()
        .filter(|p| u64::from(p.chunkserver_id) != m.id)
        .collect();
    peers.sort_by_key(|p| std::cmp::Reverse(matched(p.chunkserver_id)));
    peers
}

/// Watches the data disk ([`crate::disk`]): when it fills past the reserve, this chunkserver
/// stops campaigning and hands the leadership of every copyset it leads to a follower (the
/// most caught up that takes it); when space is back, it campaigns again.
async fn disk_loop(
    disk: Arc<DiskWatch>,
    manager: Arc<CopysetNodeManager>,
    svc: ChunkServerServices,
    ring: Option<curve_auth::SharedKeyring>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_try = std::collections::HashMap::<(u32, u32), tokio::time::Instant>::new();
    loop {
        tick.tick().await;
        let (state, changed) = disk.check();
        let nodes = manager.list();
        if changed {
            if state.full {
                tracing::error!(
                    free = state.capacity - state.used,
                    capacity = state.capacity,
                    reserve_percent = disk.reserve_percent(),
                    "data disk full: leaderships move to followers, no new writes here"
                );
            } else {
                tracing::info!(
                    free = state.capacity - state.used,
                    "data disk has space again: taking writes and leaderships"
                );
                last_try.clear();
            }
        }
        // Every tick: copysets opened or created since, and a disk found full at start.
        for n in &nodes {
            n.raft.runtime_config().elect(!state.full);
        }
        if !state.full {
            continue;
        }
        for node in nodes {
            let me = node.raft.metrics().borrow().id;
            if node.raft.metrics().borrow().current_leader != Some(me) {
                continue;
            }
            let key = (node.pool, node.copyset);
            let now = tokio::time::Instant::now();
            if last_try
                .get(&key)
                .is_some_and(|t| now < *t + Duration::from_secs(2))
            {
                continue;
            }
            last_try.insert(key, now);
            let (svc, ring) = (svc.clone(), ring.clone());
            tokio::spawn(async move {
                for peer in followers_by_progress(&node) {
                    let change = ConfigChange {
                        key: None,
                        r#type: ConfigChangeType::TransferLeader as i32,
                        peer: Some(peer.clone()),
                        old_peer: None,
                        epoch: 0,
                    };
                    match execute(&svc, ring.as_ref(), &node, &change).await {
                        Ok(()) => {
                            tracing::info!(
                                pool = node.pool,
                                copyset = node.copyset,
                                to = peer.chunkserver_id,
                                "leadership handed over: the data disk is full"
                            );
                            return;
                        }
                        Err(e) => tracing::warn!(
                            pool = node.pool,
                            copyset = node.copyset,
                            to = peer.chunkserver_id,
                            error = %e,
                            "cannot hand the leadership over"
                        ),
                    }
                }
            });
        }
    }
}

/// Runs the chunkserver until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if cfg.mds.is_empty() {
        bail!("no MDS address given");
    }
    let _lock = lock_data_dir(&cfg.data_dir)?;
    // Listen before registering: the address the MDS records must already answer.
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    if let Some(addr) = &cfg.metrics_listen {
        curve_metrics::serve(addr, crate::metrics::METRICS.clone()).await?;
    }
    let mut mds = Mds {
        addrs: cfg.mds.clone(),
        current: 0,
        client: None,
    };
    let identity = match identity::load(&cfg.data_dir).map_err(anyhow::Error::msg)? {
        Some(id) => id,
        None => {
            let id = register(&cfg, &mut mds).await?;
            identity::save(&cfg.data_dir, &id)?;
            tracing::info!(id = id.id, "registered with the MDS");
            id
        }
    };
    let pool = ChunkFilePool::open(
        &cfg.data_dir.join("chunkfilepool"),
        PoolOptions {
            file_size: cfg.copyset.chunk_size + META_PAGE,
            target: cfg.pool_target,
        },
    )?;
    let manager = Arc::new(CopysetNodeManager::new(
        u64::from(identity.id),
        &cfg.data_dir.join("copysets"),
        pool,
        cfg.copyset.clone(),
    )?);
    let rebuilt = manager.rebuild().await.map_err(anyhow::Error::msg)?;
    tracing::info!(id = identity.id, listen = %cfg.listen, copysets = rebuilt, "chunkserver started");
    let auth = cfg
        .copyset
        .ring
        .clone()
        .map(|r| Arc::new(ChunkAuth::new(r)));
    let disk = Arc::new(DiskWatch::new(&cfg.data_dir, cfg.disk_reserve_percent));
    disk.check();
    let mut svc =
        ChunkServerServices::with_limit(manager.clone(), cfg.max_inflight).with_disk(disk.clone());
    if let Some(a) = &auth {
        svc = svc.with_auth(a.clone());
    } else {
        tracing::warn!(
            "authentication is off: any client may read and write any chunk (give --cluster-key-file)"
        );
    }
    let hb = tokio::spawn(heartbeat_loop(
        cfg.clone(),
        identity,
        manager.clone(),
        mds,
        svc.clone(),
        auth,
        disk.clone(),
    ));
    let watch = tokio::spawn(disk_loop(
        disk,
        manager.clone(),
        svc.clone(),
        cfg.copyset.ring.clone(),
    ));
    curve_auth::tls::server()?
        .layer(crate::metrics::grpc_layer())
        .add_service(RaftServiceServer::new(svc.clone()))
        .add_service(ChunkServiceServer::new(svc.clone()))
        .add_service(CliServiceServer::new(svc.clone()))
        .add_service(CopysetServiceServer::new(svc))
        .serve_with_incoming_shutdown(crate::service::incoming(listener), shutdown)
        .await?;
    hb.abort();
    watch.abort();
    manager.shutdown().await;
    tracing::info!("chunkserver stopped");
    Ok(())
}
