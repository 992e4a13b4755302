//! The cluster at run time: registered chunkservers and their liveness, copysets with the
//! leader and peers their leaders report, pool creation, and the scheduler's operators in
//! flight (sent in the leader's heartbeat replies until the reports show them done).
//!
//! ```text
//!  cs/<id>             ChunkserverRecord (json)
//!  cp/<pool>/<id>      CopysetRecord (json)
//!  pool/<id>           "planned" | "created"
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use curve_proto::common::{CopysetKey, Peer};
use curve_proto::heartbeat::{
    ConfigChange, ConfigChangeType, CopysetInfo, CopysetRemoval, HeartbeatRequest, HeartbeatStatus,
    RegisterRequest,
};

use crate::scheduler::{self, Change, CopysetView, CsView, Decision, Liveness, Reason};
use crate::store::Op;
use crate::topology::{
    ChunkserverRecord, CopysetRecord, TopologySpec, copyset_count, place_copysets,
};

/// Liveness and operator timings.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// No heartbeat for this long: unstable.
    pub unstable: Duration,
    /// No heartbeat for this long: offline (its replicas are rebuilt elsewhere).
    pub offline: Duration,
    /// An operator not done in this long is dropped (and decided again if still needed).
    pub operator: Duration,
    /// An operator not done is sent again after this long.
    pub resend: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            unstable: Duration::from_secs(10),
            offline: Duration::from_secs(300),
            operator: Duration::from_secs(120),
            resend: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
struct ChunkserverRt {
    rec: ChunkserverRecord,
    last_seen: Instant,
    disk: Disk,
}

/// A chunkserver's data disk, as its heartbeats report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Disk {
    /// Bytes of its file system.
    pub capacity: u64,
    /// Bytes used.
    pub used: u64,
    /// Below the chunkserver's reserve: it leads nothing and takes no writes.
    pub full: bool,
}

#[derive(Debug)]
struct CopysetRt {
    rec: CopysetRecord,
    leader: Option<u32>,
    /// When its leader last reported.
    reported: Option<Instant>,
    /// Client requests its leader reported served, and when that count last grew.
    io_ops: u64,
    last_io: Option<Instant>,
}

/// A change in flight.
#[derive(Debug, Clone)]
pub struct Operator {
    /// What was decided.
    pub decision: Decision,
    created: Instant,
    sent: Option<Instant>,
    /// An added peer must exist (empty) on its chunkserver before the leader adds it.
    pub prepared: bool,
}

/// What a heartbeat changed.
#[derive(Debug, Default)]
pub struct HeartbeatOutcome {
    /// Changes for the reporting chunkserver to execute.
    pub changes: Vec<ConfigChange>,
    /// Replicas of the reporting chunkserver to delete: no longer peers of their copysets.
    pub removals: Vec<CopysetRemoval>,
    /// Store operations for what changed.
    pub ops: Vec<Op>,
}

/// The runtime topology.
#[derive(Debug)]
pub struct Cluster {
    spec: TopologySpec,
    chunkservers: BTreeMap<u32, ChunkserverRt>,
    copysets: BTreeMap<(u32, u32), CopysetRt>,
    pools: HashMap<u32, String>,
    operators: HashMap<(u32, u32), Operator>,
    /// Timings.
    pub timeouts: Timeouts,
    /// When the last balance change was decided: balancing waits for a settled view.
    last_balance: Option<Instant>,
    /// When this MDS loaded the cluster (took the lead): replicas are deleted only after an
    /// operator's timeout, when no change a previous leader decided can still be running.
    loaded: Instant,
}

/// A chunkserver whose data disk is this full (percent used) takes no new copyset.
const CROWDED_PERCENT: u128 = 85;

/// Balance changes are at least this far apart, so that every leader has reported the
/// outcome of the last one before the next is decided (no oscillation on stale views).
const BALANCE_COOLDOWN: Duration = Duration::from_secs(10);
/// A copyset's leader is moved for balance only after its clients were this long without a
/// request: a transfer under I/O redirects every client of the copyset mid-stream.
pub const LEADER_BALANCE_QUIET: Duration = Duration::from_secs(10);

fn cs_key(id: u32) -> Vec<u8> {
    format!("cs/{id:08x}").into_bytes()
}
fn cp_key(pool: u32, id: u32) -> Vec<u8> {
    format!("cp/{pool:08x}/{id:08x}").into_bytes()
}
fn pool_key(pool: u32) -> Vec<u8> {
    format!("pool/{pool:08x}").into_bytes()
}
fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

/// Copysets to create on one chunkserver: its address, and (copyset id, peers) for each.
pub type Creation = (String, Vec<(u32, Vec<Peer>)>);

/// A heartbeat refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub HeartbeatStatus, pub String);

/// What [`Cluster::health`] counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// Chunkservers heartbeating.
    pub online: usize,
    /// Chunkservers late.
    pub unstable: usize,
    /// Chunkservers gone.
    pub offline: usize,
    /// Copysets with a leader and every peer online.
    pub copysets_healthy: usize,
    /// The others.
    pub copysets_degraded: usize,
}

impl Cluster {
    /// The cluster from the store's pairs; every chunkserver counts as just seen.
    pub fn load(
        pairs: &[(Vec<u8>, Vec<u8>)],
        spec: TopologySpec,
        timeouts: Timeouts,
        now: Instant,
    ) -> Result<Self, String> {
        let mut c = Cluster {
            spec,
            chunkservers: BTreeMap::new(),
            copysets: BTreeMap::new(),
            pools: HashMap::new(),
            operators: HashMap::new(),
            timeouts,
            last_balance: None,
            loaded: now,
        };
        for (k, v) in pairs {
            let key = String::from_utf8_lossy(k);
            let bad = |e: serde_json::Error| format!("{key}: {e}");
            if key.starts_with("cs/") {
                let rec: ChunkserverRecord = serde_json::from_slice(v).map_err(bad)?;
                c.chunkservers.insert(
                    rec.id,
                    ChunkserverRt {
                        rec,
                        last_seen: now,
                        disk: Disk::default(),
                    },
                );
            } else if key.starts_with("cp/") {
                let rec: CopysetRecord = serde_json::from_slice(v).map_err(bad)?;
                c.copysets.insert(
                    (rec.pool, rec.id),
                    CopysetRt {
                        io_ops: 0,
                        last_io: None,
                        rec,
                        leader: None,
                        reported: None,
                    },
                );
            } else if let Some(p) = key.strip_prefix("pool/") {
                let id = u32::from_str_radix(p, 16).map_err(|e| format!("{key}: {e}"))?;
                c.pools.insert(id, String::from_utf8_lossy(v).into_owned());
            }
        }
        Ok(c)
    }

    /// Registers a chunkserver (again, for the same address and data directory).
    pub fn register(
        &mut self,
        r: &RegisterRequest,
    ) -> Result<(ChunkserverRecord, Vec<Op>), Refused> {
        let invalid = |m: String| Refused(HeartbeatStatus::HbInvalid, m);
        if r.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(format!("address {:?}: host:port", r.address)));
        }
        let pool = self.spec.pool_of(&r.server, &r.zone).map_err(invalid)? as u32 + 1;
        if let Some(cs) = self
            .chunkservers
            .values()
            .find(|c| c.rec.address == r.address)
        {
            if cs.rec.data_dir == r.data_dir {
                return Ok((cs.rec.clone(), Vec::new()));
            }
            return Err(invalid(format!(
                "{} is registered for another data directory",
                r.address
            )));
        }
        let id = self.chunkservers.keys().next_back().map_or(1, |m| m + 1);
        let rec = ChunkserverRecord {
            id,
            token: format!("{:032x}", rand::random::<u128>()),
            address: r.address.clone(),
            zone: r.zone.clone(),
            server: r.server.clone(),
            data_dir: r.data_dir.clone(),
            pool,
        };
        self.chunkservers.insert(
            id,
            ChunkserverRt {
                rec: rec.clone(),
                last_seen: Instant::now(),
                disk: Disk {
                    capacity: r.disk_capacity,
                    ..Disk::default()
                },
            },
        );
        Ok((rec.clone(), vec![Op::Put(cs_key(id), json(&rec))]))
    }

    /// Takes a heartbeat: liveness, copyset reports (from their leaders), operator progress,
    /// and the changes to send back.
    pub fn heartbeat(
        &mut self,
        r: &HeartbeatRequest,
        now: Instant,
    ) -> Result<HeartbeatOutcome, Refused> {
        let Some(cs) = self
            .chunkservers
            .get_mut(&r.chunkserver_id)
            .filter(|c| c.rec.token == r.token)
        else {
            return Err(Refused(
                HeartbeatStatus::HbUnauthorized,
                format!("unknown chunkserver {} or bad token", r.chunkserver_id),
            ));
        };
        cs.last_seen = now;
        let was_full = cs.disk.full;
        cs.disk = Disk {
            capacity: r.disk_capacity,
            used: r.disk_used,
            full: r.disk_full,
        };
        if r.disk_full != was_full {
            tracing::warn!(
                chunkserver = r.chunkserver_id,
                full = r.disk_full,
                used = r.disk_used,
                capacity = r.disk_capacity,
                "a chunkserver's data disk is {}",
                if r.disk_full {
                    "full"
                } else {
                    "no longer full"
                }
            );
        }
        let me = r.chunkserver_id;
        let mut out = HeartbeatOutcome::default();
        for info in &r.copysets {
            let Some(key) = &info.key else {
                continue;
            };
            if let Some(epoch) = self.removable(me, info, now) {
                tracing::info!(
                    chunkserver = me,
                    pool = key.logical_pool_id,
                    copyset = key.copyset_id,
                    epoch,
                    "a replica no longer in its copyset is deleted"
                );
                out.removals.push(CopysetRemoval {
                    key: Some(*key),
                    epoch,
                });
                continue;
            }
            let Some(leader) = &info.leader else {
                continue;
            };
            if leader.chunkserver_id != me {
                continue; // only leaders speak for a copyset
            }
            let Some(c) = self
                .copysets
                .get_mut(&(key.logical_pool_id, key.copyset_id))
            else {
                continue;
            };
            if info.epoch < c.rec.epoch {
                continue; // a stale leader
            }
            if c.leader != Some(me) || info.io_ops != c.io_ops {
                // A new leader counts from its own start: only growth under one leader is I/O.
                if c.leader == Some(me) {
                    c.last_io = Some(now);
                }
                c.io_ops = info.io_ops;
            }
            c.leader = Some(me);
            c.reported = Some(now);
            let mut peers: Vec<u32> = info.peers.iter().map(|p| p.chunkserver_id).collect();
            peers.sort_unstable();
            if peers != c.rec.peers || info.epoch != c.rec.epoch {
                c.rec.peers = peers;
                c.rec.epoch = info.epoch;
                out.ops
                    .push(Op::Put(cp_key(c.rec.pool, c.rec.id), json(&c.rec)));
            }
        }
        self.settle(now);
        // Changes for copysets this chunkserver leads.
        for op in self.operators.values_mut() {
            let d = op.decision;
            let led = self
                .copysets
                .get(&(d.pool, d.copyset))
                .is_some_and(|c| c.leader == Some(me));
            if !led || !op.prepared || op.sent.is_some_and(|s| now < s + self.timeouts.resend) {
                continue;
            }
            op.sent = Some(now);
            let peer_of = |id: u32| Peer {
                chunkserver_id: id,
                address: self
                    .chunkservers
                    .get(&id)
                    .map(|c| c.rec.address.clone())
                    .unwrap_or_default(),
            };
            let (t, p) = match d.change {
                Change::AddPeer(p) => (ConfigChangeType::AddPeer, p),
                Change::RemovePeer(p) => (ConfigChangeType::RemovePeer, p),
                Change::TransferLeader(p) => (ConfigChangeType::TransferLeader, p),
            };
            out.changes.push(ConfigChange {
                key: Some(CopysetKey {
                    logical_pool_id: d.pool,
                    copyset_id: d.copyset,
                }),
                r#type: t as i32,
                peer: Some(peer_of(p)),
                old_peer: None,
                epoch: d.epoch,
            });
        }
        Ok(out)
    }

    /// The epoch of copyset `info.key`'s configuration without chunkserver `me`, when `me`'s
    /// replica (as it reports) is behind that configuration and may be deleted: the copyset
    /// has its replicas and a leader that reported lately, no change is in flight on it, and
    /// this MDS has led for longer than an operator may run (an AddPeer of a previous
    /// leader's, whose new replica is not in the configuration yet, has ended).
    fn removable(&self, me: u32, info: &CopysetInfo, now: Instant) -> Option<u64> {
        let key = info.key.as_ref()?;
        let key = (key.logical_pool_id, key.copyset_id);
        let c = self.copysets.get(&key)?;
        let replicas = self
            .spec
            .pool
            .get((c.rec.pool as usize).checked_sub(1)?)?
            .replicas;
        let names_me = info.peers.iter().any(|p| p.chunkserver_id == me);
        let behind = info.epoch < c.rec.epoch || (info.epoch == c.rec.epoch && !names_me);
        let settled = !self.operators.contains_key(&key)
            && c.rec.peers.len() >= replicas
            && c.leader
                .is_some_and(|l| l != me && c.rec.peers.contains(&l))
            && c.reported.is_some_and(|t| now < t + self.timeouts.unstable)
            && now >= self.loaded + self.timeouts.operator;
        (!c.rec.peers.contains(&me) && behind && settled).then_some(c.rec.epoch)
    }

    /// Drops operators that are done (as reported) or timed out.
    fn settle(&mut self, now: Instant) {
        let copysets = &self.copysets;
        let timeout = self.timeouts.operator;
        self.operators.retain(|key, op| {
            let Some(c) = copysets.get(key) else {
                return false;
            };
            let done = match op.decision.change {
                Change::AddPeer(p) => c.rec.peers.contains(&p),
                Change::RemovePeer(p) => !c.rec.peers.contains(&p),
                Change::TransferLeader(p) => c.leader == Some(p),
            };
            if done {
                tracing::info!(decision = ?op.decision, "operator done");
            } else if now >= op.created + timeout {
                tracing::warn!(decision = ?op.decision, "operator timed out");
            }
            !done && now < op.created + timeout
        });
    }

    /// The liveness of a chunkserver.
    pub fn liveness(&self, id: u32, now: Instant) -> Liveness {
        match self.chunkservers.get(&id) {
            Some(c) if now < c.last_seen + self.timeouts.unstable => Liveness::Online,
            Some(c) if now < c.last_seen + self.timeouts.offline => Liveness::Unstable,
            _ => Liveness::Offline,
        }
    }

    /// Runs the scheduler; new operators are recorded (AddPeer ones wait to be prepared).
    pub fn schedule(&mut self, now: Instant, balance: bool) -> Vec<Decision> {
        self.settle(now);
        let css: Vec<CsView> = self
            .chunkservers
            .values()
            .map(|c| CsView {
                id: c.rec.id,
                zone: c.rec.zone.clone(),
                pool: c.rec.pool,
                state: self.liveness(c.rec.id, now),
                full: c.disk.full,
                crowded: c.disk.capacity > 0
                    && c.disk.used as u128 * 100 >= c.disk.capacity as u128 * CROWDED_PERCENT,
            })
            .collect();
        // Balance only on a settled, fresh view: no change in flight, the last balance change
        // long enough ago, every copyset's leader heard from lately.
        let fresh = self.timeouts.unstable;
        let balance = balance
            && self.operators.is_empty()
            && self
                .last_balance
                .is_none_or(|t| now >= t + BALANCE_COOLDOWN)
            && self
                .copysets
                .values()
                .all(|c| c.reported.is_some_and(|r| now < r + fresh));
        let mut decisions = Vec::new();
        for (i, p) in self.spec.pool.iter().enumerate() {
            let pool = i as u32 + 1;
            let sets: Vec<CopysetView> = self
                .copysets
                .values()
                .filter(|c| c.rec.pool == pool)
                .map(|c| CopysetView {
                    pool,
                    id: c.rec.id,
                    peers: c.rec.peers.clone(),
                    leader: c.leader,
                    epoch: c.rec.epoch,
                    quiet: c.last_io.is_none_or(|t| now >= t + LEADER_BALANCE_QUIET),
                })
                .collect();
            let busy: HashSet<(u32, u32)> = self.operators.keys().copied().collect();
            let balancing = self
                .operators
                .values()
                .filter(|o| o.decision.reason != Reason::Recovery)
                .count();
            let opts = scheduler::Options {
                replicas: p.replicas,
                max_balance_ops: 4,
                balance,
            };
            let pool_cs: Vec<CsView> = css.iter().filter(|c| c.pool == pool).cloned().collect();
            decisions.extend(scheduler::schedule(
                &pool_cs, &sets, &busy, balancing, &opts,
            ));
        }
        if decisions.iter().any(|d| d.reason != Reason::Recovery) {
            self.last_balance = Some(now);
        }
        for d in &decisions {
            tracing::info!(decision = ?d, "scheduled");
            self.operators.insert(
                (d.pool, d.copyset),
                Operator {
                    decision: *d,
                    created: now,
                    sent: None,
                    prepared: !matches!(d.change, Change::AddPeer(_)),
                },
            );
        }
        decisions
    }

    /// Marks an AddPeer operator's target ready (its empty replica exists).
    pub fn prepared(&mut self, pool: u32, copyset: u32) {
        if let Some(op) = self.operators.get_mut(&(pool, copyset)) {
            op.prepared = true;
        }
    }

    /// Forgets an operator (its preparation failed).
    pub fn drop_operator(&mut self, pool: u32, copyset: u32) {
        self.operators.remove(&(pool, copyset));
    }

    /// Pools whose copysets should be placed now: returns their new records and the ops to
    /// persist them (state "planned").
    pub fn plan_pools(&mut self, now: Instant) -> Vec<Op> {
        let mut ops = Vec::new();
        for (i, p) in self.spec.pool.iter().enumerate() {
            let pool = i as u32 + 1;
            if self.pools.contains_key(&pool) {
                continue;
            }
            let online: Vec<(u32, String)> = self
                .chunkservers
                .values()
                .filter(|c| c.rec.pool == pool && now < c.last_seen + self.timeouts.unstable)
                .map(|c| (c.rec.id, c.rec.zone.clone()))
                .collect();
            let ready = match self.spec.expected(i) {
                Some(n) => online.len() >= n,
                None => online.iter().map(|(_, z)| z).collect::<HashSet<_>>().len() >= p.replicas,
            };
            if !ready {
                continue;
            }
            let count = copyset_count(online.len(), p.copysets_per_chunkserver, p.replicas);
            let placed = match place_copysets(&online, count, p.replicas) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(pool = %p.name, error = %e, "cannot place copysets yet");
                    continue;
                }
            };
            for (n, peers) in placed.into_iter().enumerate() {
                let rec = CopysetRecord {
                    pool,
                    id: n as u32 + 1,
                    peers,
                    epoch: 0,
                };
                ops.push(Op::Put(cp_key(pool, rec.id), json(&rec)));
                self.copysets.insert(
                    (pool, rec.id),
                    CopysetRt {
                        io_ops: 0,
                        last_io: None,
                        rec,
                        leader: None,
                        reported: None,
                    },
                );
            }
            self.pools.insert(pool, "planned".into());
            ops.push(Op::Put(pool_key(pool), b"planned".to_vec()));
            tracing::info!(pool = %p.name, copysets = count, "copysets placed");
        }
        ops
    }

    /// Pools planned but not yet created on their chunkservers: per chunkserver address, the
    /// copysets (with peers) to create there.
    pub fn pending_creation(&self) -> Vec<(u32, Vec<Creation>)> {
        let mut out = Vec::new();
        for (pool, state) in &self.pools {
            if state != "planned" {
                continue;
            }
            let mut per_cs: BTreeMap<u32, Vec<(u32, Vec<Peer>)>> = BTreeMap::new();
            for c in self.copysets.values().filter(|c| c.rec.pool == *pool) {
                let peers: Vec<Peer> = c.rec.peers.iter().map(|p| self.peer(*p)).collect();
                for p in &c.rec.peers {
                    per_cs
                        .entry(*p)
                        .or_default()
                        .push((c.rec.id, peers.clone()));
                }
            }
            out.push((
                *pool,
                per_cs
                    .into_iter()
                    .map(|(cs, list)| (self.peer(cs).address, list))
                    .collect(),
            ));
        }
        out
    }

    /// Records that a pool's copysets exist on their chunkservers.
    pub fn created(&mut self, pool: u32) -> Vec<Op> {
        self.pools.insert(pool, "created".into());
        vec![Op::Put(pool_key(pool), b"created".to_vec())]
    }

    /// A chunkserver as a peer.
    pub fn peer(&self, id: u32) -> Peer {
        Peer {
            chunkserver_id: id,
            address: self
                .chunkservers
                .get(&id)
                .map(|c| c.rec.address.clone())
                .unwrap_or_default(),
        }
    }

    /// Copyset ids of a pool (for segment allocation); empty until the pool is created.
    pub fn pool_copysets(&self) -> Option<(u32, Vec<u32>)> {
        let (pool, _) = self
            .pools
            .iter()
            .filter(|(_, s)| *s == "created")
            .min_by_key(|(p, _)| **p)?;
        Some((
            *pool,
            self.copysets
                .values()
                .filter(|c| c.rec.pool == *pool)
                .map(|c| c.rec.id)
                .collect(),
        ))
    }

    /// Copysets of a pool with peers, leader and epoch (all when `ids` is empty).
    pub fn copysets(&self, pool: u32, ids: &[u32]) -> Vec<(CopysetRecord, Option<u32>)> {
        self.copysets
            .values()
            .filter(|c| c.rec.pool == pool && (ids.is_empty() || ids.contains(&c.rec.id)))
            .map(|c| (c.rec.clone(), c.leader))
            .collect()
    }

    /// All chunkservers with liveness, copysets held and led, disk.
    pub fn chunkservers(&self, now: Instant) -> Vec<(ChunkserverRecord, Liveness, u32, u32, Disk)> {
        self.chunkservers
            .values()
            .map(|c| {
                let id = c.rec.id;
                let held = self
                    .copysets
                    .values()
                    .filter(|s| s.rec.peers.contains(&id))
                    .count();
                let led = self
                    .copysets
                    .values()
                    .filter(|s| s.leader == Some(id))
                    .count();
                (
                    c.rec.clone(),
                    self.liveness(id, now),
                    held as u32,
                    led as u32,
                    c.disk,
                )
            })
            .collect()
    }

    /// Chunkservers by liveness (online, unstable, offline) and copysets healthy (a known
    /// leader, three or more peers, every peer online) or degraded.
    pub fn health(&self, now: Instant) -> Health {
        let mut h = Health::default();
        for id in self.chunkservers.keys() {
            match self.liveness(*id, now) {
                Liveness::Online => h.online += 1,
                Liveness::Unstable => h.unstable += 1,
                Liveness::Offline => h.offline += 1,
            }
        }
        for c in self.copysets.values() {
            let healthy = c.leader.is_some()
                && c.rec.peers.len() >= 3
                && c.rec
                    .peers
                    .iter()
                    .all(|p| self.liveness(*p, now) == Liveness::Online);
            if healthy {
                h.copysets_healthy += 1;
            } else {
                h.copysets_degraded += 1;
            }
        }
        h
    }

    /// Operators in flight.
    pub fn operators(&self) -> usize {
        self.operators.len()
    }

    /// An operator's decision, if in flight.
    pub fn operator(&self, pool: u32, copyset: u32) -> Option<&Operator> {
        self.operators.get(&(pool, copyset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve_proto::heartbeat::CopysetInfo;

    fn reg(c: &mut Cluster, port: u16, zone: &str) -> ChunkserverRecord {
        c.register(&RegisterRequest {
            address: format!("127.0.0.1:{port}"),
            data_dir: format!("/d{port}"),
            zone: zone.into(),
            server: format!("s{port}"),
            disk_capacity: 1,
        })
        .unwrap()
        .0
    }

    fn hb(
        c: &mut Cluster,
        cs: &ChunkserverRecord,
        now: Instant,
        sets: Vec<CopysetInfo>,
    ) -> HeartbeatOutcome {
        c.heartbeat(
            &HeartbeatRequest {
                chunkserver_id: cs.id,
                token: cs.token.clone(),
                copysets: sets,
                ..Default::default()
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn register_plan_heartbeat_and_recover() {
        let t0 = Instant::now();
        let mut spec = TopologySpec::default_single_pool();
        spec.pool[0].copysets_per_chunkserver = 1;
        let mut c = Cluster::load(&[], spec, Timeouts::default(), t0).unwrap();
        let a = reg(&mut c, 1001, "z1");
        assert_eq!(reg(&mut c, 1001, "z1"), a, "the same chunkserver again");
        let b = reg(&mut c, 1002, "z2");
        assert!(c.plan_pools(t0).is_empty(), "two zones are not enough");
        let d = reg(&mut c, 1003, "z3");
        let e = reg(&mut c, 1004, "z3");
        let ops = c.plan_pools(Instant::now());
        assert_eq!(ops.len(), 3, "2 copysets (4 cs x 1 / 3) + the pool state");
        let pending = c.pending_creation();
        assert_eq!(pending.len(), 1);
        c.created(1);
        assert_eq!(c.pool_copysets().unwrap().1, vec![1, 2]);
        // Forged tokens are refused.
        let forged = c.heartbeat(
            &HeartbeatRequest {
                chunkserver_id: a.id,
                token: "forged".into(),
                ..Default::default()
            },
            t0,
        );
        assert_eq!(forged.unwrap_err().0, HeartbeatStatus::HbUnauthorized);
        // The leader of copyset 1 reports; then one of its peers goes offline.
        let peers = c.copysets(1, &[1])[0].0.peers.clone();
        let leader = [&a, &b, &d, &e]
            .into_iter()
            .find(|x| x.id == peers[0])
            .unwrap()
            .clone();
        let info = |peers: &[u32], epoch| CopysetInfo {
            key: Some(CopysetKey {
                logical_pool_id: 1,
                copyset_id: 1,
            }),
            leader: Some(Peer {
                chunkserver_id: leader.id,
                address: leader.address.clone(),
            }),
            peers: peers
                .iter()
                .map(|p| Peer {
                    chunkserver_id: *p,
                    address: String::new(),
                })
                .collect(),
            epoch,
            ..Default::default()
        };
        let late = t0 + Duration::from_secs(400);
        for x in [&a, &b, &d, &e] {
            if x.id != peers[2] {
                hb(&mut c, x, late, Vec::new());
            }
        }
        let out = hb(&mut c, &leader, late, vec![info(&peers, 1)]);
        assert_eq!(out.ops.len(), 1, "epoch 0 -> 1 persisted");
        assert_eq!(c.liveness(peers[2], late), Liveness::Offline);
        let decided = c.schedule(late, false);
        let add = decided.iter().find(|d| d.copyset == 1).unwrap();
        let Change::AddPeer(t) = add.change else {
            panic!("{add:?}")
        };
        assert!(!peers.contains(&t));
        // Not sent before it is prepared; then sent once, not again before the resend time.
        assert!(
            hb(&mut c, &leader, late, vec![info(&peers, 1)])
                .changes
                .is_empty()
        );
        // The new peer's empty replica, not in the configuration yet, is not deleted while
        // the change is in flight.
        let target = [&a, &b, &d, &e]
            .into_iter()
            .find(|x| x.id == t)
            .unwrap()
            .clone();
        let empty = CopysetInfo {
            leader: None,
            ..info(&[], 0)
        };
        assert!(hb(&mut c, &target, late, vec![empty]).removals.is_empty());
        c.prepared(1, 1);
        let out = hb(&mut c, &leader, late, vec![info(&peers, 1)]);
        assert_eq!(out.changes.len(), 1);
        assert_eq!(out.changes[0].peer.as_ref().unwrap().chunkserver_id, t);
        assert!(
            hb(&mut c, &leader, late, vec![info(&peers, 1)])
                .changes
                .is_empty()
        );
        // Reported done: the operator goes, and the removal of the dead peer follows.
        let mut four = peers.clone();
        four.push(t);
        hb(&mut c, &leader, late, vec![info(&four, 2)]);
        assert!(c.operator(1, 1).is_none());
        let next = c.schedule(late, false);
        assert!(
            next.iter()
                .any(|d| d.copyset == 1 && d.change == Change::RemovePeer(peers[2]))
        );
        // A stale report (older epoch) changes nothing.
        let out = hb(&mut c, &leader, late, vec![info(&peers, 1)]);
        assert!(out.ops.is_empty());
        // The dead peer removed (epoch 3), it comes back reporting its old replica: it is
        // told to delete it. The peers are not, nor anyone while this MDS has led for less
        // than an operator's timeout.
        c.schedule(late, false);
        let three: Vec<u32> = four.iter().copied().filter(|p| *p != peers[2]).collect();
        hb(&mut c, &leader, late, vec![info(&three, 3)]);
        assert!(c.operator(1, 1).is_none());
        let back = [&a, &b, &d, &e]
            .into_iter()
            .find(|x| x.id == peers[2])
            .unwrap()
            .clone();
        let early = t0 + Duration::from_secs(1);
        assert!(
            hb(&mut c, &back, early, vec![info(&peers, 1)])
                .removals
                .is_empty()
        );
        let out = hb(&mut c, &back, late, vec![info(&peers, 1)]);
        assert_eq!(out.removals.len(), 1);
        assert_eq!(out.removals[0].epoch, 3);
        assert!(
            hb(&mut c, &target, late, vec![info(&three, 3)])
                .removals
                .is_empty()
        );
    }
}
