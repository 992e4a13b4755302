//! CopysetNode (one raft group: RaftLog + CopysetStateMachine over a DataStore) and the
//! CopysetNodeManager that creates them and rebuilds them from the data directory on restart.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::{BasicNode, Raft};
use parking_lot::RwLock;

use crate::chunkfilepool::{ChunkFilePool, sync_dir};
use crate::datastore::DataStore;
use crate::logstream::LogStream;
use crate::network::CopysetNetwork;
use crate::raft::TypeConfig;
use crate::raftlog::RaftLog;
use crate::statemachine::CopysetStateMachine;

/// Bytes of raft log after which a copyset takes a snapshot (besides every
/// [`SNAPSHOT_EVERY_ENTRIES`]).
const SNAPSHOT_EVERY_BYTES: u64 = 128 << 20;
/// Entries after which a copyset takes a snapshot. A snapshot syncs the copyset's chunk files,
/// which after small random writes hold dirty pages all over: openraft's 5000 (20 MiB of 4K
/// writes) made one every second or so somewhere in the playground under 4K randwrite QD32,
/// each a 60-130 ms stall of the writes behind it (fio's per-I/O latency log); at 16384 the
/// p99.9 went from 66-70 to 53 ms and nothing took over 80 ms. Each entry costs its log an
/// index slot (~64 bytes) until purged, so not more: ~1 MiB per copyset.
const SNAPSHOT_EVERY_ENTRIES: u64 = 16384;
/// Bytes of log a copyset keeps behind a snapshot for followers that lag (besides openraft's
/// 1000 entries, which with 1 MiB writes were a GiB of log per copyset).
const KEEP_BYTES_BEHIND_SNAPSHOT: u64 = 32 << 20;

/// A copyset's raft log kept bounded in bytes: a snapshot (and so a purge) per
/// [`SNAPSHOT_EVERY_BYTES`] appended as well as per [`SNAPSHOT_EVERY_ENTRIES`], and after each
/// snapshot a purge down to [`KEEP_BYTES_BEHIND_SNAPSHOT`] behind the log's end; the purged
/// segments are then reused instead of new ones written with zeroes.
struct LogUpkeep {
    log: RaftLog,
    /// Weak: the metrics task that drives this must not keep the raft group alive.
    raft: std::sync::Weak<Raft<TypeConfig>>,
    snapshot_at: u64,
    snapshot_seen: Option<openraft::LogId<u64>>,
}

impl LogUpkeep {
    /// Looks at the copyset's latest metrics; triggers what is due.
    fn step(&mut self, m: &openraft::RaftMetrics<u64, BasicNode>) {
        let appended = self.log.appended_bytes();
        if appended >= self.snapshot_at
            && let Some(r) = self.raft.upgrade()
        {
            self.snapshot_at = appended + SNAPSHOT_EVERY_BYTES;
            tokio::spawn(async move {
                let _ = r.trigger().snapshot().await;
            });
        }
        if m.snapshot == self.snapshot_seen {
            return;
        }
        self.snapshot_seen = m.snapshot;
        let upto = m.snapshot.and_then(|s| {
            self.log
                .index_keeping(KEEP_BYTES_BEHIND_SNAPSHOT)
                .map(|i| i.min(s.index))
        });
        if let Some(upto) = upto
            && m.purged.is_none_or(|p| p.index < upto)
            && let Some(r) = self.raft.upgrade()
        {
            tokio::spawn(async move {
                let _ = r.trigger().purge_log(upto).await;
            });
        }
    }
}

/// Sizes and timings of copysets.
#[derive(Debug, Clone)]
pub struct CopysetOptions {
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// I/O alignment (4096 or 512).
    pub page_size: u64,
    /// Segment size of the disk's raft log stream.
    pub segment_size: u64,
    /// Raft heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// Raft election timeout range, ms.
    pub election_ms: (u64, u64),
    /// The cluster keyring (auth on): raft RPCs are signed with it.
    pub ring: Option<curve_auth::SharedKeyring>,
}

impl Default for CopysetOptions {
    fn default() -> Self {
        CopysetOptions {
            chunk_size: 16 << 20,
            page_size: 4096,
            segment_size: 64 << 20,
            heartbeat_ms: 100,
            election_ms: (500, 1000),
            ring: None,
        }
    }
}

/// One copyset on this chunkserver.
/// Bytes of client writes a copyset's leader takes in flight; past them new writes are answered
/// OVERLOAD (the client backs off) until the replicas catch up: a cluster pushed past what its
/// disks and network carry slows its clients down instead of growing queues and logs until
/// replication times out.
pub const MAX_WRITING_BYTES: u64 = 64 << 20;

pub struct CopysetNode {
    /// Logical pool.
    pub pool: u32,
    /// Copyset id.
    pub copyset: u32,
    /// Its raft group.
    pub raft: Arc<Raft<TypeConfig>>,
    sm: CopysetStateMachine,
    /// I/O served for it.
    pub metrics: crate::metrics::IoMetrics,
    /// A leadership transfer is under way: new writes wait (the client retries) so that the
    /// target can catch up with the log.
    pub transferring: std::sync::atomic::AtomicBool,
    /// Bytes of client writes submitted to raft and not answered yet (see
    /// [`MAX_WRITING_BYTES`]).
    pub writing: std::sync::atomic::AtomicU64,
    /// The leader lost its quorum and steps down (see [`check_quorum`]): its AppendEntries
    /// are held back so that the followers' leases run out, and writes and reads here are
    /// redirected at once.
    pub stepping_down: Arc<std::sync::atomic::AtomicBool>,
    /// While leader: when a quorum last acknowledged it (from its metrics, as received).
    quorum_ack: Arc<parking_lot::Mutex<Option<std::time::Instant>>>,
    /// How long after a quorum's acknowledgement the leader may serve reads alone (half the
    /// minimum election timeout: no other leader can be elected sooner).
    lease: std::time::Duration,
}

impl std::fmt::Debug for CopysetNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopysetNode")
            .field("pool", &self.pool)
            .field("copyset", &self.copyset)
            .finish_non_exhaustive()
    }
}

/// A copyset as its raft group sees it now.
#[derive(Debug, Clone, PartialEq)]
pub struct RaftView {
    /// This replica's node id.
    pub id: u64,
    /// The leader, if known.
    pub leader: Option<curve_proto::common::Peer>,
    /// The voters.
    pub peers: Vec<curve_proto::common::Peer>,
    /// Current term.
    pub term: u64,
    /// Last log index.
    pub last_log_index: u64,
    /// Last applied index.
    pub applied: u64,
    /// Configuration epoch: the log index of the membership in effect.
    pub epoch: u64,
}

impl RaftView {
    /// Whether this replica leads.
    pub fn is_leader(&self) -> bool {
        self.leader.as_ref().map(|l| u64::from(l.chunkserver_id)) == Some(self.id)
    }
}

impl CopysetNode {
    /// Leader, voters and progress, from the raft metrics.
    pub fn view(&self) -> RaftView {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let peer = |id: &u64| curve_proto::common::Peer {
            chunkserver_id: *id as u32,
            address: membership
                .get_node(id)
                .map(|n| n.addr.clone())
                .unwrap_or_default(),
        };
        RaftView {
            id: m.id,
            leader: m.current_leader.as_ref().map(peer),
            peers: membership.voter_ids().map(|id| peer(&id)).collect(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            epoch: m.membership_config.log_id().map(|l| l.index).unwrap_or(0),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn open(
        dir: &Path,
        node_id: u64,
        stream: &LogStream,
        pool: u32,
        copyset: u32,
        chunk_pool: Arc<ChunkFilePool>,
        opts: &CopysetOptions,
    ) -> Result<Self, String> {
        let store = DataStore::open(
            &dir.join("data"),
            opts.chunk_size,
            opts.page_size,
            chunk_pool,
        )
        .map_err(|e| e.to_string())?;
        let log = RaftLog::open(
            stream,
            crate::raftlog::group_id(pool, copyset),
            &dir.join("raft"),
        )
        .map_err(|e| format!("copyset {pool}_{copyset}: {e}"))?;
        let upkeep_log = log.clone();
        let sm = CopysetStateMachine::open(Arc::new(store), &dir.join("sm"))
            .map_err(|e| e.to_string())?;
        let config = openraft::Config {
            cluster_name: format!("copyset-{pool}-{copyset}"),
            heartbeat_interval: opts.heartbeat_ms,
            election_timeout_min: opts.election_ms.0,
            election_timeout_max: opts.election_ms.1,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY_ENTRIES),
            ..Default::default()
        }
        .validate()
        .map_err(|e| e.to_string())?;
        let stepping_down: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let raft = Raft::new(
            node_id,
            Arc::new(config),
            CopysetNetwork {
                pool,
                copyset,
                ring: opts.ring.clone(),
                budget: log.append_budget(),
                append_timeout: std::time::Duration::from_millis(opts.heartbeat_ms),
                hold: stepping_down.clone(),
            },
            log,
            sm.clone(),
        )
        .await
        .map(Arc::new)
        .map_err(|e| e.to_string())?;
        // Track the leader's quorum acknowledgements for lease reads. The time is taken when
        // the metrics arrive, minus the age they report: never earlier than the real one.
        let quorum_ack: Arc<parking_lot::Mutex<Option<std::time::Instant>>> = Arc::default();
        {
            let mut rx = raft.metrics();
            let ack = quorum_ack.clone();
            let mut upkeep = LogUpkeep {
                log: upkeep_log,
                raft: Arc::downgrade(&raft),
                snapshot_at: SNAPSHOT_EVERY_BYTES,
                snapshot_seen: None,
            };
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let m = rx.borrow_and_update().clone();
                    let now = std::time::Instant::now();
                    upkeep.step(&m);
                    // Only once this term's first entry is applied: before that the state
                    // machine may lack writes the previous leader acknowledged.
                    let settled = m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term);
                    *ack.lock() = match (m.current_leader == Some(m.id), m.millis_since_quorum_ack)
                    {
                        (true, Some(ms)) if settled => {
                            now.checked_sub(std::time::Duration::from_millis(ms))
                        }
                        _ => None,
                    };
                }
            });
        }
        tokio::spawn(check_quorum(
            Arc::downgrade(&raft),
            quorum_ack.clone(),
            stepping_down.clone(),
            opts.clone(),
            (pool, copyset),
        ));
        Ok(CopysetNode {
            pool,
            copyset,
            raft,
            sm,
            metrics: crate::metrics::IoMetrics::copyset(pool, copyset),
            transferring: Default::default(),
            writing: Default::default(),
            stepping_down,
            quorum_ack,
            lease: std::time::Duration::from_millis(opts.election_ms.0 / 2),
        })
    }

    /// Whether this replica leads under a valid lease: a quorum acknowledged it recently
    /// enough that no other leader can exist, so it may answer reads without a round trip.
    pub fn lease_valid(&self) -> bool {
        if self.transferring.load(std::sync::atomic::Ordering::Acquire) || self.stepping_down() {
            return false;
        }
        self.quorum_ack
            .lock()
            .is_some_and(|t| t.elapsed() < self.lease)
    }

    /// Whether this replica is giving up a leadership it cannot use (no quorum reached it).
    pub fn stepping_down(&self) -> bool {
        self.stepping_down
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The chunks of this copyset on this replica.
    pub fn store(&self) -> &Arc<DataStore> {
        self.sm.store()
    }
}

/// CheckQuorum, as etcd's raft has it and openraft 0.9 has not: a leader that no quorum has
/// acknowledged for three minimum election timeouts steps down. Without it a leader whose
/// links are slow — every AppendEntries answered after openraft's timeout (its heartbeat
/// interval), yet delivered, so the followers keep it — holds the copyset without committing
/// anything for as long as the links stay slow. Stepping down, it sends nothing for up to twice
/// that time (replication is held back in the network, writes and reads are redirected): the
/// followers' leases run out and one that reaches the other leads; or, if none can, it goes on.
async fn check_quorum(
    raft: std::sync::Weak<Raft<TypeConfig>>,
    quorum_ack: Arc<parking_lot::Mutex<Option<std::time::Instant>>>,
    stepping_down: Arc<std::sync::atomic::AtomicBool>,
    opts: CopysetOptions,
    (pool, copyset): (u32, u32),
) {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let stale = Duration::from_millis(3 * opts.election_ms.0);
    let period = Duration::from_millis(2 * opts.heartbeat_ms);
    let mut leader_since: Option<(u64, Instant)> = None;
    loop {
        tokio::time::sleep(period).await;
        let Some(r) = raft.upgrade() else { return };
        let m = r.metrics().borrow().clone();
        let others = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != m.id)
            .count();
        if m.current_leader != Some(m.id) || others == 0 {
            leader_since = None;
            continue;
        }
        let since = match leader_since {
            Some((term, at)) if term == m.current_term => at,
            _ => {
                let at = Instant::now();
                leader_since = Some((m.current_term, at));
                at
            }
        };
        let acked = quorum_ack.lock().map_or(since, |a| a.max(since));
        if acked.elapsed() < stale {
            continue;
        }
        tracing::warn!(
            pool,
            copyset,
            term = m.current_term,
            since_ms = acked.elapsed().as_millis() as u64,
            "no quorum acknowledged this leader: stepping down for a replica that reaches the others"
        );
        stepping_down.store(true, Ordering::Release);
        let deadline = Instant::now() + 2 * stale;
        while Instant::now() < deadline && r.metrics().borrow().current_leader == Some(m.id) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stepping_down.store(false, Ordering::Release);
        leader_since = None;
        drop(r);
    }
}

/// Why a copyset could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// It exists already.
    #[error("copyset {0}_{1} exists")]
    Exists(u32, u32),
    /// Opening or initialising it failed.
    #[error("cannot create copyset: {0}")]
    Failed(String),
}

/// Every copyset of this chunkserver.
#[derive(Debug)]
pub struct CopysetNodeManager {
    node_id: u64,
    dir: PathBuf,
    chunk_pool: Arc<ChunkFilePool>,
    stream: LogStream,
    opts: CopysetOptions,
    nodes: RwLock<HashMap<(u32, u32), Arc<CopysetNode>>>,
    creating: tokio::sync::Mutex<()>,
}

/// Prefix of a copyset directory being deleted.
const TRASH: &str = "trash_";

fn copyset_dir(dir: &Path, pool: u32, copyset: u32) -> PathBuf {
    dir.join(format!("{pool}_{copyset}"))
}

impl CopysetNodeManager {
    /// A manager for copysets under `dir` (`<data-dir>/copysets`), as raft node `node_id`;
    /// opens their raft log stream (`<dir>/raftlog`), replaying it.
    pub fn new(
        node_id: u64,
        dir: &Path,
        chunk_pool: Arc<ChunkFilePool>,
        opts: CopysetOptions,
    ) -> std::io::Result<Self> {
        let stream = LogStream::open(&dir.join("raftlog"), opts.segment_size)?;
        Ok(CopysetNodeManager {
            node_id,
            dir: dir.to_owned(),
            chunk_pool,
            stream,
            opts,
            nodes: RwLock::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
        })
    }

    /// The raft log stream of these copysets.
    pub fn log_stream(&self) -> &LogStream {
        &self.stream
    }

    /// Reopens every copyset found in the data directory (after a restart): each finds its
    /// raft state, log and chunks on disk.
    pub async fn rebuild(&self) -> Result<usize, String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        let mut n = 0;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| e.to_string())? {
            let entry = entry.map_err(|e| e.to_string())?;
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.starts_with(TRASH)) {
                // A deletion a crash interrupted.
                std::fs::remove_dir_all(entry.path()).map_err(|e| e.to_string())?;
                continue;
            }
            let Some((pool, copyset)) = name
                .to_str()
                .and_then(|n| n.split_once('_'))
                .and_then(|(p, c)| Some((p.parse().ok()?, c.parse().ok()?)))
            else {
                continue;
            };
            let node = CopysetNode::open(
                &entry.path(),
                self.node_id,
                &self.stream,
                pool,
                copyset,
                self.chunk_pool.clone(),
                &self.opts,
            )
            .await?;
            self.nodes.write().insert((pool, copyset), Arc::new(node));
            n += 1;
        }
        // Log entries of replicas deleted before a crash let their truncation be written.
        for group in self.stream.closed_groups() {
            tracing::info!(
                group,
                "raft log entries of a deleted copyset replica dropped"
            );
            self.stream
                .drop_group(group)
                .map_err(|e| format!("raft log group {group}: {e}"))?;
        }
        Ok(n)
    }

    /// Deletes this replica of copyset `pool`_`copyset`, which the MDS took out of the copyset
    /// (its configuration at `epoch` no longer names this chunkserver): the raft node stops,
    /// the directory is renamed to the trash (atomic: a crash leaves no half replica), the
    /// replica's log entries are forgotten, and the files are deleted, which gives their space
    /// back. Refused while this replica leads, or counts itself a voter at `epoch` or later.
    /// Returns whether there was a replica.
    pub async fn remove(&self, pool: u32, copyset: u32, epoch: u64) -> Result<bool, String> {
        let _one_at_a_time = self.creating.lock().await;
        let Some(node) = self.get(pool, copyset) else {
            return Ok(false);
        };
        let v = node.view();
        let voter = v
            .peers
            .iter()
            .any(|p| u64::from(p.chunkserver_id) == self.node_id);
        if v.is_leader() || (voter && v.epoch >= epoch) {
            return Err(format!(
                "copyset {pool}_{copyset} still counts this chunkserver a peer at epoch {} \
                 (asked to delete it at {epoch})",
                v.epoch
            ));
        }
        self.nodes.write().remove(&(pool, copyset));
        let _ = node.raft.shutdown().await;
        drop(node);
        let dir = copyset_dir(&self.dir, pool, copyset);
        let trash = self.dir.join(format!("{TRASH}{pool}_{copyset}"));
        let stream = self.stream.clone();
        let group = crate::raftlog::group_id(pool, copyset);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if trash.exists() {
                std::fs::remove_dir_all(&trash)?;
            }
            std::fs::rename(&dir, &trash)?;
            sync_dir(trash.parent().expect("in the copysets dir"))?;
            stream.drop_group(group)?;
            std::fs::remove_dir_all(&trash)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("deleting copyset {pool}_{copyset}: {e}"))?;
        tracing::info!(pool, copyset, epoch, "copyset replica deleted");
        Ok(true)
    }

    /// Creates a copyset replica with the given peers (chunkserver id -> address).
    pub async fn create(
        &self,
        pool: u32,
        copyset: u32,
        peers: BTreeMap<u64, BasicNode>,
    ) -> Result<(), CreateError> {
        let _one_at_a_time = self.creating.lock().await;
        if self.nodes.read().contains_key(&(pool, copyset)) {
            return Err(CreateError::Exists(pool, copyset));
        }
        let dir = copyset_dir(&self.dir, pool, copyset);
        let node = CopysetNode::open(
            &dir,
            self.node_id,
            &self.stream,
            pool,
            copyset,
            self.chunk_pool.clone(),
            &self.opts,
        )
        .await
        .map_err(CreateError::Failed)?;
        // Every replica of a new copyset initialises with the same membership: openraft
        // accepts that, and whichever wins the first election leads. A replica created with no
        // peers is a new member of an existing copyset: it waits, empty, for AddPeer (and
        // receives the log or a snapshot from the leader).
        if !peers.is_empty()
            && let Err(e) = node.raft.initialize(peers).await
        {
            tracing::debug!(pool, copyset, error = %e, "initialize (already initialised?)");
        }
        self.nodes.write().insert((pool, copyset), Arc::new(node));
        tracing::info!(pool, copyset, "copyset created");
        Ok(())
    }

    /// A copyset by key.
    pub fn get(&self, pool: u32, copyset: u32) -> Option<Arc<CopysetNode>> {
        self.nodes.read().get(&(pool, copyset)).cloned()
    }

    /// Every copyset.
    pub fn list(&self) -> Vec<Arc<CopysetNode>> {
        self.nodes.read().values().cloned().collect()
    }

    /// Page size requests must be aligned to, and chunk size.
    pub fn options(&self) -> &CopysetOptions {
        &self.opts
    }

    /// Stops every raft group.
    pub async fn shutdown(&self) {
        let nodes: Vec<_> = self.nodes.write().drain().map(|(_, n)| n).collect();
        for n in nodes {
            let _ = n.raft.shutdown().await;
        }
    }
}
