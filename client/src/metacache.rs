//! MetaCache: what the client knows of where a volume's data lives: segment -> chunk ids and
//! copysets (from the MDS, once per segment), copyset -> peers and leader (from the MDS, then
//! corrected by REDIRECTED answers and GetLeader). Never refreshed per request.

use std::collections::HashMap;
use std::sync::Arc;

use curve_proto::common::Peer;
use curve_proto::mds::{CopysetLocation, Segment};
use parking_lot::RwLock;

/// Where a copyset lives.
#[derive(Debug, Clone, Default)]
pub struct CopysetRoute {
    /// Its peers.
    pub peers: Vec<Peer>,
    /// The leader believed current (an address among the peers, or a redirect's).
    pub leader: Option<String>,
}

/// The cache of one volume.
#[derive(Debug, Default)]
pub struct MetaCache {
    segments: RwLock<HashMap<u64, Arc<Segment>>>,
    /// Segments the MDS said are not allocated, kept only by a session's writer: the only
    /// client that allocates them (cleared when the session is taken over).
    absent: RwLock<std::collections::HashSet<u64>>,
    /// Bumped by every change of `segments`: an "absent" answer asked for before one is stale.
    generation: std::sync::atomic::AtomicU64,
    copysets: RwLock<HashMap<(u32, u32), CopysetRoute>>,
}

impl MetaCache {
    /// The cached segment with index `index`.
    pub fn segment(&self, index: u64) -> Option<Arc<Segment>> {
        self.segments.read().get(&index).cloned()
    }

    /// Forgets a segment (its grants are refetched with it).
    pub fn drop_segment(&self, index: u64) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.segments.write().remove(&index);
        self.absent.write().remove(&index);
    }

    /// Caches a segment.
    pub fn put_segment(&self, index: u64, s: Segment) -> Arc<Segment> {
        let s = Arc::new(s);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.absent.write().remove(&index);
        self.segments.write().insert(index, s.clone());
        s
    }

    /// Whether the segment is known not to be allocated.
    pub fn is_absent(&self, index: u64) -> bool {
        self.absent.read().contains(&index)
    }

    /// The current generation of the segment map (taken before asking the MDS).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records that the segment is not allocated, as the MDS answered a question asked at
    /// `generation`: ignored if a segment was cached or dropped since (the answer may be
    /// older than an allocation).
    pub fn put_absent(&self, index: u64, generation: u64) {
        let mut absent = self.absent.write();
        if self.generation() == generation && !self.segments.read().contains_key(&index) {
            absent.insert(index);
        }
    }

    /// Forgets every segment known not to be allocated (another writer may have allocated
    /// them).
    pub fn clear_absent(&self) {
        self.absent.write().clear();
    }

    /// The route of a copyset.
    pub fn route(&self, pool: u32, copyset: u32) -> Option<CopysetRoute> {
        self.copysets.read().get(&(pool, copyset)).cloned()
    }

    /// Caches copyset locations from the MDS.
    pub fn put_copysets(&self, list: &[CopysetLocation]) {
        let mut m = self.copysets.write();
        for c in list {
            let route = m.entry((c.logical_pool_id, c.copyset_id)).or_default();
            route.peers = c.peers.clone();
            if let Some(l) = c.leader.as_ref().filter(|l| !l.address.is_empty()) {
                route.leader = Some(l.address.clone());
            } else if route.leader.is_none() {
                route.leader = c.peers.first().map(|p| p.address.clone());
            }
        }
    }

    /// Records the leader of a copyset (a redirect or a GetLeader answer).
    pub fn set_leader(&self, pool: u32, copyset: u32, leader: &str) {
        let mut m = self.copysets.write();
        let r = m.entry((pool, copyset)).or_default();
        r.leader = Some(leader.to_string());
        if !r.peers.iter().any(|p| p.address == leader) {
            r.peers.push(Peer {
                chunkserver_id: 0,
                address: leader.to_string(),
            });
        }
    }
}
