//! The MDS process: the store (embedded, or etcd with an election), the gRPC services, and
//! the background work of the leader: creating placed copysets on their chunkservers, the
//! scheduler (preparing added peers), and deleting the chunks of purged volumes.
//!
//! ```text
//!  <data-dir>/mds.pid     flock'ed: one MDS per data directory
//!  <data-dir>/mds.redb    the embedded store (without --etcd)
//! ```

use std::future::Future;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use curve_proto::chunk::ChunkRequest;
use curve_proto::chunk::chunk_service_client::ChunkServiceClient;
use curve_proto::common::Peer;
use curve_proto::copyset::copyset_service_client::CopysetServiceClient;
use curve_proto::copyset::{CopysetSpec, CopysetStatus, CreateCopysetRequest};
use curve_proto::heartbeat::heartbeat_service_server::HeartbeatServiceServer;
use curve_proto::mds::mds_service_server::MdsServiceServer;

use crate::mds::{Mds, Options, Role, Services};
use crate::scheduler::Change;
use crate::store::{EmbeddedStore, MetaStore};

/// How an MDS runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// host:port to serve on (and to advertise to the other MDS).
    pub listen: String,
    /// Data directory (the embedded store and the pid lock).
    pub data_dir: PathBuf,
    /// etcd endpoints: empty for the embedded store.
    pub etcd: Vec<String>,
    /// Key prefix in etcd (several clusters may share one etcd).
    pub etcd_prefix: String,
    /// Election lease TTL (etcd).
    pub election_ttl: Duration,
    /// Scheduler period.
    pub schedule_every: Duration,
    /// The MDS behaviour.
    pub opts: Options,
    /// host:port of the Prometheus endpoint (`GET /metrics`), if any.
    pub metrics_listen: Option<String>,
}

fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // The metadata store is readable by this user only, whatever the directory was.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("mds.pid"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another MDS is running on {}", dir.display());
    }
    f.set_len(0)?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// Accepted connections with TCP_NODELAY: replies are small and latency-bound (without it,
/// Nagle and delayed ACKs hold a reply for 40 ms).
fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

fn fatal(e: &crate::store::StoreError) {
    tracing::error!(error = %e, "metadata write failed: stopping so that a fresh MDS takes over");
    std::process::exit(3);
}

/// Runs the MDS until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let role = Arc::new(Role::default());
    let metrics = curve_metrics::Metrics::new();
    let grpc_metrics = crate::metrics::register(&metrics, role.clone());
    if let Some(addr) = &cfg.metrics_listen {
        curve_metrics::serve(addr, metrics.clone()).await?;
    }
    let services = Services::new(role.clone());
    let server = curve_auth::tls::server()?
        .layer(grpc_metrics)
        .add_service(MdsServiceServer::new(services.clone()))
        .add_service(HeartbeatServiceServer::new(services))
        .serve_with_incoming_shutdown(incoming(listener), shutdown);
    let leading = become_leader(cfg.clone(), role.clone());
    tokio::select! {
        r = server => r?,
        r = leading => {
            r?;
            unreachable!("leading ends only by exiting")
        }
    }
    tracing::info!("MDS stopped");
    Ok(())
}

/// Waits to lead (at once with the embedded store), loads the state, and runs the leader's
/// background work for as long as the process lives.
async fn become_leader(cfg: Config, role: Arc<Role>) -> anyhow::Result<()> {
    let store: Arc<dyn MetaStore> = if cfg.etcd.is_empty() {
        Arc::new(EmbeddedStore::open(&cfg.data_dir.join("mds.redb"))?)
    } else {
        let client = loop {
            match crate::etcd::connect(&cfg.etcd).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach etcd; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let store = crate::etcd::EtcdStore::new(&client, &cfg.etcd_prefix);
        let election =
            crate::etcd::Election::new(&client, &format!("{}election", cfg.etcd_prefix), &cfg.etcd);
        // Track the leader for NOT_LEADER answers while campaigning.
        let watcher = {
            let (election, role) = (election.clone(), role.clone());
            tokio::spawn(async move {
                loop {
                    if let Some(l) = election.leader().await {
                        role.follow(l);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        // A lease that lapses while this MDS leads ends the process (its supervisor restarts
        // it; writes are fenced anyway). One that lapses while it only campaigns (etcd out of
        // reach a while: a partition, a member down) is replaced, and the campaign starts over.
        const CAMPAIGNING: u8 = 0;
        const ELECTED: u8 = 1;
        const LAPSED: u8 = 2;
        let key = loop {
            let state = Arc::new(std::sync::atomic::AtomicU8::new(CAMPAIGNING));
            let lapsed = Arc::new(tokio::sync::Notify::new());
            let lease = loop {
                let (state, lapsed) = (state.clone(), lapsed.clone());
                match election
                    .lease(cfg.election_ttl, move || {
                        if state.swap(LAPSED, std::sync::atomic::Ordering::SeqCst) == ELECTED {
                            tracing::error!("lost the MDS lease: exiting");
                            std::process::exit(3);
                        }
                        lapsed.notify_one();
                    })
                    .await
                {
                    Ok(l) => break l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach etcd; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            tracing::info!(lease, "campaigning for the MDS leadership");
            tokio::select! {
                key = election.campaign(lease, &cfg.listen) => {
                    let key = key?;
                    if state
                        .compare_exchange(
                            CAMPAIGNING,
                            ELECTED,
                            std::sync::atomic::Ordering::SeqCst,
                            std::sync::atomic::Ordering::SeqCst,
                        )
                        .is_ok()
                    {
                        break key;
                    }
                }
                _ = lapsed.notified() => {}
            }
            tracing::warn!(
                lease,
                "the campaign's lease lapsed before it won: campaigning again with a new one"
            );
        };
        watcher.abort();
        store.fence_with(key);
        tracing::info!("elected MDS leader");
        Arc::new(store)
    };
    let mds = Mds::load(store.clone(), cfg.opts.clone(), fatal)
        .await
        .map_err(anyhow::Error::msg)?;
    role.follow(cfg.listen.clone());
    role.lead(mds.clone());
    tracing::info!(store = store.kind(), listen = %cfg.listen, "MDS serving");
    let mut tick = tokio::time::interval(cfg.schedule_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        create_pools(&mds).await;
        schedule(&mds).await;
    }
}

/// Places the copysets of pools whose chunkservers are all there, and creates them on the
/// chunkservers (again after a restart, until every one accepted).
async fn create_pools(mds: &Arc<Mds>) {
    let planned = mds
        .update(|st| {
            let ops = st.cluster.plan_pools(Instant::now());
            Ok::<_, std::convert::Infallible>((st.cluster.pending_creation(), ops))
        })
        .await;
    let Ok(Ok(pending)) = planned else {
        return;
    };
    let ring = mds.opts.auth.as_ref().map(|a| a.ring.clone());
    for (pool, per_cs) in pending {
        let ring = &ring;
        // On every chunkserver at once: a replica created long before its peers would campaign
        // against peers that do not have the copyset yet.
        let results =
            futures::future::join_all(per_cs.into_iter().map(|(addr, list)| async move {
                let specs = list
                    .into_iter()
                    .map(|(id, peers)| CopysetSpec {
                        logical_pool_id: pool,
                        copyset_id: id,
                        peers,
                    })
                    .collect();
                (create_on(ring.as_ref(), &addr, specs).await, addr)
            }))
            .await;
        let mut all = true;
        for (r, addr) in results {
            if let Err(e) = r {
                tracing::warn!(chunkserver = %addr, error = %e, "copyset creation failed; will retry");
                all = false;
            }
        }
        if all {
            let done = mds
                .update(|st| Ok::<_, std::convert::Infallible>(((), st.cluster.created(pool))))
                .await;
            if done.is_ok() {
                tracing::info!(pool, "copysets created on their chunkservers");
            }
        }
    }
}

async fn create_on(
    ring: Option<&curve_auth::SharedKeyring>,
    addr: &str,
    copysets: Vec<CopysetSpec>,
) -> Result<(), String> {
    let mut c = CopysetServiceClient::new(
        curve_auth::tls::connect(addr, Duration::from_secs(3))
            .await
            .map_err(|e| e.to_string())?,
    );
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.create_copyset_node(curve_auth::peer_request(
            ring,
            "CreateCopysetNode",
            CreateCopysetRequest { copysets },
        )),
    )
    .await
    .map_err(|_| "copyset creation timed out".to_string())?
    .map_err(|e| e.to_string())?
    .into_inner();
    if r.status == CopysetStatus::CopysetOk as i32 || r.status == CopysetStatus::CopysetExist as i32
    {
        Ok(())
    } else {
        Err(r.message)
    }
}

/// One scheduler round: decide, then create the empty replicas that AddPeer needs.
async fn schedule(mds: &Arc<Mds>) {
    let prepare: Vec<(u32, u32, Peer)> = {
        let mut st = mds.state.lock();
        let decisions = st.cluster.schedule(Instant::now(), mds.opts.balance);
        decisions
            .iter()
            .filter_map(|d| match d.change {
                Change::AddPeer(t) => Some((d.pool, d.copyset, st.cluster.peer(t))),
                _ => None,
            })
            .collect()
    };
    for (pool, copyset, target) in prepare {
        let spec = CopysetSpec {
            logical_pool_id: pool,
            copyset_id: copyset,
            peers: Vec::new(), // empty: a new replica that waits for its leader
        };
        let ring = mds.opts.auth.as_ref().map(|a| a.ring.clone());
        let r = create_on(ring.as_ref(), &target.address, vec![spec]).await;
        let mut st = mds.state.lock();
        match r {
            Ok(()) => st.cluster.prepared(pool, copyset),
            Err(e) => {
                tracing::warn!(pool, copyset, target = %target.address, error = %e, "cannot prepare the new peer");
                st.cluster.drop_operator(pool, copyset);
            }
        }
    }
}

/// Chunk operations the MDS has in flight at once (deletions, snapshot deletions, space).
const CHUNK_OPS_IN_FLIGHT: usize = 16;

/// How long one chunk operation of the MDS (a chunk's or a snapshot's data dropped) waits
/// for a chunkserver's answer.
const CHUNK_OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends a cluster-signed chunk operation to the leader of each chunk's copyset, a few at a
/// time: with `live` None a DeleteChunk, else a DeleteChunkSnapshotOrCorrectSn keeping the
/// snapshots `live`. Returns how many chunks it could not reach.
pub async fn chunk_op(
    work: Vec<(u32, u32, u64, Vec<Peer>)>,
    ring: Option<curve_auth::SharedKeyring>,
    live: Option<Vec<u64>>,
) -> usize {
    use futures::StreamExt;
    futures::stream::iter(work)
        .map(|w| one_chunk_op(w, ring.as_ref(), live.as_deref()))
        .buffer_unordered(CHUNK_OPS_IN_FLIGHT)
        .filter(|done| std::future::ready(!*done))
        .count()
        .await
}

async fn one_chunk_op(
    (pool, copyset, chunk, peers): (u32, u32, u64, Vec<Peer>),
    ring: Option<&curve_auth::SharedKeyring>,
    live: Option<&[u64]>,
) -> bool {
    let mut target = peers.first().map(|p| p.address.clone());
    for _ in 0..(peers.len() * 2).max(1) {
        let Some(addr) = target.take() else {
            break;
        };
        let Ok(mut c) = curve_auth::tls::connect(&addr, Duration::from_secs(2))
            .await
            .map(ChunkServiceClient::new)
        else {
            target = next_peer(&peers, &addr);
            continue;
        };
        let req = ChunkRequest {
            logical_pool_id: pool,
            copyset_id: copyset,
            chunk_id: chunk,
            live_sns: live.map(<[u64]>::to_vec).unwrap_or_default(),
            ..Default::default()
        };
        let call = async {
            match live {
                None => {
                    c.delete_chunk(curve_auth::peer_request(ring, "DeleteChunk", req))
                        .await
                }
                Some(_) => {
                    c.delete_chunk_snapshot_or_correct_sn(curve_auth::peer_request(
                        ring,
                        "DeleteChunkSnapshotOrCorrectSn",
                        req,
                    ))
                    .await
                }
            }
        };
        // A chunkserver that accepted the connection but does not answer (stopped, hung) is
        // given up on like one that refused it: the next peer is asked.
        let r = tokio::time::timeout(CHUNK_OP_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer")))
            .map(|r| r.into_inner());
        match r {
            Ok(r)
                if r.status == 0
                    || r.status == curve_proto::chunk::ChunkStatus::ChunkNotexist as i32 =>
            {
                return true;
            }
            Ok(r) => {
                target = r
                    .redirect
                    .map(|l| l.address)
                    .filter(|a| !a.is_empty())
                    .or_else(|| next_peer(&peers, &addr));
            }
            Err(_) => target = next_peer(&peers, &addr),
        }
    }
    false
}

/// GetChunkInfo of each chunk at its copyset's leader, a few at a time (`credentials(chunk)`:
/// ticket and grant, auth on): the sequence numbers each answers (empty: the chunk does not
/// exist or could not be reached).
pub async fn chunk_infos(
    work: &[(u32, u32, u64, Vec<Peer>)],
    credentials: impl Fn(u64) -> (Vec<u8>, Vec<u8>),
) -> Vec<Vec<u64>> {
    use futures::StreamExt;
    futures::stream::iter(work.iter().cloned())
        .map(|w| {
            let (ticket, grant) = credentials(w.2);
            one_chunk_info(w, ticket, grant)
        })
        .buffered(CHUNK_OPS_IN_FLIGHT)
        .collect()
        .await
}

async fn one_chunk_info(
    (pool, copyset, chunk, peers): (u32, u32, u64, Vec<Peer>),
    ticket: Vec<u8>,
    grant: Vec<u8>,
) -> Vec<u64> {
    let mut target = peers.first().map(|p| p.address.clone());
    for _ in 0..(peers.len() * 2).max(1) {
        let Some(addr) = target.take() else {
            break;
        };
        let Ok(mut c) = curve_auth::tls::connect(&addr, Duration::from_secs(2))
            .await
            .map(ChunkServiceClient::new)
        else {
            target = next_peer(&peers, &addr);
            continue;
        };
        let req = curve_proto::chunk::GetChunkInfoRequest {
            logical_pool_id: pool,
            copyset_id: copyset,
            chunk_id: chunk,
            ticket: ticket.clone(),
            grant: grant.clone(),
            ..Default::default()
        };
        match c.get_chunk_info(req).await.map(|r| r.into_inner()) {
            Ok(r) if r.status == 0 => return r.chunk_sn,
            Ok(r) => {
                target = r
                    .redirect
                    .map(|l| l.address)
                    .filter(|a| !a.is_empty())
                    .or_else(|| next_peer(&peers, &addr));
            }
            Err(_) => target = next_peer(&peers, &addr),
        }
    }
    Vec::new()
}

fn next_peer(peers: &[Peer], addr: &str) -> Option<String> {
    let i = peers.iter().position(|p| p.address == addr)?;
    peers.get((i + 1) % peers.len()).map(|p| p.address.clone())
}
