//! A volume of the cluster: opened through the MDS (exclusive, with a lease kept alive and an
//! epoch that fences older writers), its requests split per chunk (and by a maximum request
//! size), each sent to its copyset's leader with Curve's retry rules, and the user request
//! completed when all of its parts have, in whatever order they finish (IO tracking).
//!
//! ```text
//!  read/write(offset, len)
//!    -> QoS admit -> split: [chunk-aligned parts <= max_request]
//!    -> per part: MetaCache segment (GetOrAllocateSegment once) -> chunk id + copyset
//!                 -> leader (MetaCache) -> ChunkService (retry: REDIRECTED / OVERLOAD /
//!                    timeout / transport / COPYSET_NOTEXIST, until done)
//!    -> all parts done -> complete
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use curve_proto::chunk::{
    ChunkRequest, ChunkResponse, ChunkStatus, GetChunkInfoRequest, GetChunkInfoResponse,
};
use curve_proto::mds::{FileInfo, MdsStatus, Segment};
use parking_lot::RwLock;

use crate::budget::{self, ByteBudget};
use crate::chunk::Connections;
use crate::iotracker::{IoTracker, Part, split, split_unordered};
use crate::mds::{MdsClient, MdsError};
use crate::metacache::MetaCache;
use crate::qos::Limiter;
use crate::retry::{Action, Failure, Next, Outcome, RetryPolicy};
use curve_proto::layout::Layout;

/// Unit of a clone's fill state (and of snapshots' copy-on-write) on the chunkservers.
const UNIT: u64 = 4096;

/// What a chunk request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Fill,
    /// GetChunkInfo with an extent range: the answer's `data` holds the ranges with data, as
    /// little-endian (offset, len) u64 pairs.
    Extents,
}

/// How a volume is opened.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// MDS addresses.
    pub mds: Vec<String>,
    /// Owner of the volume.
    pub owner: String,
    /// Who opens (a restarted process with the same identity takes its session over).
    pub client_id: String,
    /// Largest request sent to a chunkserver.
    pub max_request: u32,
    /// The user's key (clusters with auth on): MDS requests are signed with it.
    pub key: Option<Arc<curve_auth::UserKey>>,
    /// Open a clone sessionless and read-only, to fill it from its source (a flatten).
    pub fill: bool,
    /// A clone open for writing copies its source in the background at this many bytes per
    /// second (the seed's CloneManager), then flattens it; 0: never.
    pub fill_rate: u64,
    /// Bytes of reads and writes in flight on this volume; more wait (besides the process's
    /// budget, [`crate::budget::PROCESS`]).
    pub max_inflight_bytes: u64,
}

impl VolumeOptions {
    /// Options for `mds`, owner `owner`, this host as the client.
    pub fn new(mds: Vec<String>, owner: &str) -> Self {
        VolumeOptions {
            mds,
            owner: owner.into(),
            // Unique per process and host: the MDS lets the same id take a session over.
            client_id: format!(
                "{}-{}-{:08x}",
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "localhost".into()),
                std::process::id(),
                rand::random::<u32>()
            ),
            max_request: 1 << 20,
            key: None,
            fill: false,
            fill_rate: 8 << 20,
            max_inflight_bytes: crate::budget::VOLUME_DEFAULT,
        }
    }

    /// Signs with `key`; the owner becomes the key's user.
    pub fn with_key(mut self, key: Option<Arc<curve_auth::UserKey>>) -> Self {
        if let Some(k) = &key {
            self.owner = k.user.clone();
        }
        self.key = key;
        self
    }
}

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The MDS refused or was unreachable.
    #[error("{0}")]
    Mds(#[from] MdsError),
    /// Outside the volume.
    #[error("range {offset}+{len} is outside the volume of {size} bytes")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// Another client opened the volume since: this one may no longer write.
    #[error("the volume was opened by another client (epoch fenced)")]
    Fenced,
    /// A chunkserver refused the request.
    #[error("chunkserver: {0}")]
    Chunk(String),
    /// The volume is closed.
    #[error("the volume is closed")]
    Closed,
    /// A snapshot (or a volume opened to be filled) takes no writes.
    #[error("{0} is read-only")]
    ReadOnly(String),
}

#[derive(Debug)]
struct Inner {
    mds: MdsClient,
    path: String,
    opts: VolumeOptions,
    info: RwLock<FileInfo>,
    session: RwLock<String>,
    epoch: AtomicU64,
    /// The sequence number of the volume's newest snapshot, which writes carry.
    snap_seq: AtomicU64,
    /// The MDS's ticket for the volume's chunks (auth on; renewed by every refresh).
    ticket: RwLock<Vec<u8>>,
    /// A clone's source (`PATH@NAME`, sessionless), opened at its first use.
    source: tokio::sync::OnceCell<Volume>,
    lease: Duration,
    cache: MetaCache,
    conns: Arc<Connections>,
    qos: Limiter,
    /// Bytes in flight on this volume.
    budget: ByteBudget,
    closed: AtomicBool,
    /// Serialises `close` with the refresh loop's reopen: a refresh that was in flight while
    /// the volume closed must not open the session again.
    session_op: tokio::sync::Mutex<()>,
}

/// An open session of a volume at the MDS, as handed from one process to the next.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionState {
    /// The MDS's session id.
    pub session_id: String,
    /// The epoch writes carry.
    pub epoch: u64,
    /// The lease, ms.
    pub lease_ms: u64,
    /// The ticket (auth on), so that the next process serves before its first refresh.
    #[serde(default)]
    pub ticket: Vec<u8>,
}

/// An open volume. Cheap to clone; closed by [`Volume::close`].
#[derive(Debug, Clone)]
pub struct Volume {
    inner: Arc<Inner>,
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

impl Volume {
    /// Opens `path`.
    pub async fn open(
        path: &str,
        opts: VolumeOptions,
        conns: Arc<Connections>,
    ) -> Result<Self, ClientError> {
        let mds = MdsClient::with_key(opts.mds.clone(), opts.key.clone());
        let (info, session, ticket) = mds
            .open_with(path, &opts.owner, &opts.client_id, opts.fill)
            .await?;
        let state = SessionState {
            session_id: session.session_id,
            epoch: session.epoch,
            lease_ms: session.lease_ms,
            ticket,
        };
        Ok(Self::with_session(mds, path, opts, conns, info, state))
    }

    /// Continues a session another process opened and handed over (a live upgrade of part2):
    /// no new open, so the epoch stays and nothing the other process wrote is fenced. The
    /// session must still be alive (checked with a refresh).
    pub async fn adopt(
        path: &str,
        opts: VolumeOptions,
        conns: Arc<Connections>,
        state: SessionState,
    ) -> Result<Self, ClientError> {
        let mds = MdsClient::with_key(opts.mds.clone(), opts.key.clone());
        // Stat first: a failed adopt must not have renewed a lease nobody keeps then.
        let info = mds.stat(path).await?;
        let r = mds.refresh(path, &state.session_id).await?;
        let state = SessionState {
            ticket: if r.ticket.is_empty() {
                state.ticket
            } else {
                r.ticket
            },
            ..state
        };
        Ok(Self::with_session(mds, path, opts, conns, info, state))
    }

    fn with_session(
        mds: MdsClient,
        path: &str,
        opts: VolumeOptions,
        conns: Arc<Connections>,
        info: FileInfo,
        state: SessionState,
    ) -> Self {
        let lease = Duration::from_millis(state.lease_ms.max(300));
        let v = Volume {
            inner: Arc::new(Inner {
                mds,
                path: path.to_string(),
                info: RwLock::new(info.clone()),
                session: RwLock::new(state.session_id),
                epoch: AtomicU64::new(state.epoch),
                snap_seq: AtomicU64::new(info.snap_seq),
                ticket: RwLock::new(state.ticket),
                source: tokio::sync::OnceCell::new(),
                lease,
                cache: MetaCache::default(),
                conns,
                qos: Limiter::default(),
                budget: ByteBudget::new(opts.max_inflight_bytes),
                closed: AtomicBool::new(false),
                session_op: tokio::sync::Mutex::new(()),
                opts,
            }),
        };
        if let Some(q) = &info.qos {
            v.inner.qos.set(q);
        }
        tokio::spawn(refresh_loop(Arc::downgrade(&v.inner), lease));
        if info.clone_source.is_some() && !v.is_read_only() && v.inner.opts.fill_rate > 0 {
            tokio::spawn(clone_manager(Arc::downgrade(&v.inner)));
        }
        v
    }

    /// A snapshot (`PATH@NAME`) or a volume opened to be filled: no session, no writes.
    pub fn is_read_only(&self) -> bool {
        self.inner.session.read().is_empty()
    }

    /// The snapshot this volume reads (0: the volume itself).
    fn read_snap(&self) -> u64 {
        self.inner.info.read().snapshot_seq
    }

    /// The clone's source while it has one (opened at first use).
    async fn source(&self) -> Result<Option<&Volume>, ClientError> {
        let Some(src) = self.inner.info.read().clone_source.clone() else {
            return Ok(None);
        };
        let inner = &self.inner;
        let v = inner
            .source
            .get_or_try_init(|| {
                let opts = VolumeOptions {
                    fill: false,
                    ..inner.opts.clone()
                };
                Box::pin(Volume::open(&src.path, opts, inner.conns.clone()))
            })
            .await?;
        Ok(Some(v))
    }

    /// The session this volume holds, to hand over to another process.
    pub fn session(&self) -> SessionState {
        SessionState {
            session_id: self.inner.session.read().clone(),
            epoch: self.inner.epoch.load(Ordering::Acquire),
            lease_ms: self.inner.lease.as_millis() as u64,
            ticket: self.inner.ticket.read().clone(),
        }
    }

    /// The volume's path.
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// What the MDS said of the volume at open (or the last refresh).
    pub fn info(&self) -> FileInfo {
        self.inner.info.read().clone()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.read().length
    }

    /// This volume's budget of bytes in flight (what it holds now, its peak).
    pub fn inflight(&self) -> &ByteBudget {
        &self.inner.budget
    }

    /// Holds `bytes` of the volume's budget, then of the process's (always in that order).
    async fn hold(&self, bytes: u64) -> (budget::Held<'_>, budget::Held<'static>) {
        let own = self.inner.budget.take(bytes).await;
        (own, budget::PROCESS.take(bytes).await)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(ClientError::OutOfRange { offset, len, size }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`; never-written ranges read as zeros.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.check(offset, buf.len() as u64)?;
        self.inner.qos.admit(false, buf.len() as u64).await;
        let _held = self.hold(buf.len() as u64).await;
        let (layout, max) = self.geometry();
        let mut tracker = IoTracker::new(offset, buf.len() as u64, &layout, max);
        let parts = tracker.parts().to_vec();
        let results =
            futures::future::join_all(parts.iter().map(|p| self.read_part_full(*p))).await;
        for (p, r) in parts.iter().zip(results) {
            tracker.record(r.map(|data| {
                let dst = &mut buf[p.buf_offset..p.buf_offset + p.len as usize];
                match data {
                    Some(d) => dst.copy_from_slice(&d),
                    None => dst.fill(0),
                }
            }));
        }
        tracker.result()
    }

    /// Writes `buf` at `offset`; durable (on a raft quorum) when it returns.
    pub async fn write(&self, offset: u64, buf: &[u8]) -> Result<(), ClientError> {
        self.write_bytes(offset, Bytes::copy_from_slice(buf)).await
    }

    /// [`Volume::write`] of a buffer the caller hands over: its parts and every retry of them
    /// share it (no copy on the way to the chunkservers' sockets).
    pub async fn write_bytes(&self, offset: u64, buf: Bytes) -> Result<(), ClientError> {
        self.check(offset, buf.len() as u64)?;
        if self.is_read_only() {
            return Err(ClientError::ReadOnly(self.inner.path.clone()));
        }
        self.inner.qos.admit(true, buf.len() as u64).await;
        let _held = self.hold(buf.len() as u64).await;
        let (layout, max) = self.geometry();
        let mut tracker = IoTracker::new(offset, buf.len() as u64, &layout, max);
        let results = futures::future::join_all(tracker.parts().iter().map(|p| {
            let data = buf.slice(p.buf_offset..p.buf_offset + p.len as usize);
            self.write_part(*p, data)
        }))
        .await;
        for r in results {
            tracker.record(r);
        }
        tracker.result()
    }

    /// Makes the range read as zeros. Unallocated segments already do; in allocated ones the
    /// replicas punch holes in the chunk files (no data sent or written, space given back).
    /// A clone's ranges get zeros written (a hole there would read the clone's source).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.zero(offset, len, false).await
    }

    /// As [`Volume::write_zeroes`], the range staying allocated on the replicas (unwritten
    /// extents: zeros without writing them, and no later ENOSPC): NBD's NO_HOLE.
    pub async fn write_zeroes_allocated(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.zero(offset, len, true).await
    }

    async fn zero(&self, offset: u64, len: u64, keep_allocated: bool) -> Result<(), ClientError> {
        self.check(offset, len)?;
        if self.is_read_only() {
            return Err(ClientError::ReadOnly(self.inner.path.clone()));
        }
        if self.is_clone() {
            return self.write_zero_data(offset, len).await;
        }
        let (layout, _) = self.geometry();
        let seg = self.inner.info.read().segment_size;
        // Where the range is in chunk space (order does not matter here), a chunk per part,
        // 32 parts at a time: a whole volume is a few hundred requests, striped or not.
        let parts = split_unordered(offset, len, &layout, layout.chunk_size);
        let mut last = None;
        for group in parts.chunks(32) {
            let mut jobs = Vec::new();
            for p in group {
                let Some(s) = self.segment_once(p.offset / seg, &mut last).await? else {
                    continue;
                };
                let req = ChunkRequest {
                    zero: true,
                    keep_allocated,
                    sn: self.inner.snap_seq.load(Ordering::Acquire),
                    ..self.locate(&s, *p)
                };
                jobs.push(self.send(Op::Write, p.offset / seg, req));
            }
            for r in futures::future::join_all(jobs).await {
                r?;
            }
        }
        Ok(())
    }

    /// Discards the range: it reads as zeros after, its space given back on every replica (as
    /// [`Volume::write_zeroes`]). On a clone, where that would mean writing zeros, nothing is
    /// done (discard is advisory).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.check(offset, len)?;
        if self.is_read_only() {
            return Err(ClientError::ReadOnly(self.inner.path.clone()));
        }
        if self.is_clone() {
            return Ok(());
        }
        self.write_zeroes(offset, len).await
    }

    /// Whether the volume is a clone not flattened yet (its unwritten ranges read its source).
    pub fn is_clone(&self) -> bool {
        self.inner.info.read().clone_source.is_some()
    }

    /// The allocation of `[offset, offset+len)`: runs of (length, hole) in order, a hole being
    /// a range that reads as zeros without holding data (never written, discarded or zeroed).
    /// A clone's or a snapshot's ranges all count as data.
    pub async fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ClientError> {
        self.check(offset, len)?;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, hole: bool| match out.last_mut() {
            Some(last) if last.1 == hole => last.0 += n,
            _ if n > 0 => out.push((n, hole)),
            _ => {}
        };
        // A snapshot's data may be in COW files where the volume now has holes: all data.
        if self.is_clone() || self.read_snap() != 0 || len == 0 {
            push(len, false);
            return Ok(out);
        }
        let (layout, _) = self.geometry();
        let (seg, cs) = (self.inner.info.read().segment_size, layout.chunk_size);
        let mut last = None;
        // Each chunk's data extents asked once (striped, a chunk holds every stripe_count-th
        // unit), kept for the chunks of the object set at hand. `None`: not allocated.
        let mut known: HashMap<u64, Option<Vec<(u64, u64)>>> = HashMap::new();
        for p in split(offset, len, &layout, cs) {
            let k = p.offset / cs;
            if !known.contains_key(&k) {
                if known.len() > layout.stripe_count as usize {
                    known.clear();
                }
                let got = match self.segment_once(p.offset / seg, &mut last).await? {
                    None => None,
                    Some(s) => {
                        let whole = Part {
                            offset: k * cs,
                            len: cs,
                            buf_offset: 0,
                        };
                        let answer = self
                            .send(Op::Extents, p.offset / seg, self.locate(&s, whole))
                            .await?;
                        let data = answer.map(|r| r.data).unwrap_or_default();
                        Some(
                            data.chunks_exact(16)
                                .map(|pair| {
                                    let n = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8"));
                                    (n(&pair[..8]), n(&pair[8..]))
                                })
                                .collect(),
                        )
                    }
                };
                known.insert(k, got);
            }
            let (lo, hi) = (p.offset % cs, p.offset % cs + p.len);
            let Some(extents) = &known[&k] else {
                push(p.len, true);
                continue;
            };
            let mut at = lo;
            for &(o, l) in extents {
                let (a, b) = (o.max(lo), (o + l).min(hi));
                if a < b {
                    push(a - at, true);
                    push(b - a, false);
                    at = b;
                }
            }
            push(hi - at, true);
        }
        Ok(out)
    }

    /// Zeros written as data (a clone's ranges, whose holes would read the source).
    async fn write_zero_data(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        let clone = self.is_clone();
        let (layout, max) = self.geometry();
        let seg = self.inner.info.read().segment_size;
        let zeros = Bytes::from(vec![0u8; max as usize]);
        // Sixteen parts at a time: zeroing a whole device must not build it all in memory.
        let mut last = None;
        let parts = split_unordered(offset, len, &layout, max);
        for group in parts.chunks(16) {
            let mut jobs = Vec::new();
            for p in group {
                // A clone's unwritten segment reads its source: zeros must be written there.
                if !clone
                    && self
                        .segment_once(p.offset / seg, &mut last)
                        .await?
                        .is_none()
                {
                    continue;
                }
                jobs.push(self.write_part(*p, zeros.slice(..p.len as usize)));
            }
            futures::future::join_all(jobs)
                .await
                .into_iter()
                .collect::<Result<(), _>>()?;
        }
        Ok(())
    }

    /// The volume's layout, and the largest request a chunkserver takes.
    fn geometry(&self) -> (Layout, u64) {
        (
            Layout::of(&self.inner.info.read()),
            u64::from(self.inner.opts.max_request),
        )
    }

    /// [`Volume::segment`] (not allocating) for parts in offset order: the MDS is asked once
    /// per segment, even one that is not allocated (which the cache does not keep).
    async fn segment_once(
        &self,
        index: u64,
        last: &mut Option<(u64, Option<Arc<Segment>>)>,
    ) -> Result<Option<Arc<Segment>>, ClientError> {
        if let Some((i, s)) = last.as_ref()
            && *i == index
        {
            return Ok(s.clone());
        }
        let s = self.segment(index, false).await?;
        *last = Some((index, s.clone()));
        Ok(s)
    }

    /// The segment with `index`, from the cache or the MDS (allocated when `allocate`).
    async fn segment(
        &self,
        index: u64,
        allocate: bool,
    ) -> Result<Option<Arc<Segment>>, ClientError> {
        if let Some(s) = self.inner.cache.segment(index) {
            return Ok(Some(s));
        }
        // The writer of a volume that is not a clone allocates its segments itself (a clone's
        // are also allocated by a flatten): one it learnt is not allocated stays so.
        let sole_allocator = !self.is_read_only() && !self.is_clone();
        if !allocate && sole_allocator && self.inner.cache.is_absent(index) {
            return Ok(None);
        }
        let (seg, owner) = (
            self.inner.info.read().segment_size,
            self.inner.opts.owner.clone(),
        );
        let generation = self.inner.cache.generation();
        let got = self
            .inner
            .mds
            .segment(&self.inner.path, &owner, index * seg, allocate)
            .await?;
        let Some(s) = got else {
            if sole_allocator {
                self.inner.cache.put_absent(index, generation);
            }
            return Ok(None);
        };
        let pool = s.logical_pool_id;
        let missing: Vec<u32> = s
            .chunks
            .iter()
            .map(|c| c.copyset_id)
            .filter(|c| self.inner.cache.route(pool, *c).is_none())
            .collect();
        if !missing.is_empty() {
            let locs = self.inner.mds.copysets(pool, &missing).await?;
            self.inner.cache.put_copysets(&locs);
        }
        Ok(Some(self.inner.cache.put_segment(index, s)))
    }

    /// The request for a part: pool, copyset, chunk id, offset in the chunk, size, grant.
    fn locate(&self, s: &Segment, p: Part) -> ChunkRequest {
        let i = self.inner.info.read();
        let in_seg = p.offset % i.segment_size;
        let c = &s.chunks[(in_seg / i.chunk_size) as usize];
        ChunkRequest {
            logical_pool_id: s.logical_pool_id,
            copyset_id: c.copyset_id,
            chunk_id: c.chunk_id,
            offset: in_seg % i.chunk_size,
            size: p.len as u32,
            file_id: i.id,
            grant: c.grant.clone(),
            ..Default::default()
        }
    }

    /// A part as the volume (or snapshot) holds it: its chunk, and where a clone's chunk is
    /// missing or has units not filled yet, its source's. `None`: never written anywhere
    /// (zeros).
    fn read_part_full(
        &self,
        p: Part,
    ) -> futures::future::BoxFuture<'_, Result<Option<Vec<u8>>, ClientError>> {
        Box::pin(async move {
            let seg = self.inner.info.read().segment_size;
            let answer = match self.segment(p.offset / seg, false).await? {
                None => None,
                Some(s) => {
                    let req = ChunkRequest {
                        sn: self.read_snap(),
                        ..self.locate(&s, p)
                    };
                    self.send(Op::Read, p.offset / seg, req).await?
                }
            };
            let Some(source) = self.source().await? else {
                return Ok(answer.map(|r| Vec::from(r.data)));
            };
            let Some(r) = answer else {
                return source.read_part_full(p).await;
            };
            let mut data = Vec::from(r.data);
            if r.unfilled.is_empty() {
                return Ok(Some(data));
            }
            // Runs of unfilled units (bit i: the i-th unit from the one holding the offset).
            let base = p.offset / UNIT;
            let end = p.offset + p.len;
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for i in 0..(end.div_ceil(UNIT) - base) {
                if r.unfilled
                    .get((i / 8) as usize)
                    .is_some_and(|b| b & (1 << (i % 8)) != 0)
                {
                    let lo = ((base + i) * UNIT).max(p.offset);
                    let hi = ((base + i + 1) * UNIT).min(end);
                    match runs.last_mut() {
                        Some(run) if run.1 == lo => run.1 = hi,
                        _ => runs.push((lo, hi)),
                    }
                }
            }
            for (lo, hi) in runs {
                let part = Part {
                    offset: lo,
                    len: hi - lo,
                    buf_offset: 0,
                };
                let dst = &mut data[(lo - p.offset) as usize..(hi - p.offset) as usize];
                match source.read_part_full(part).await? {
                    Some(d) => dst.copy_from_slice(&d),
                    None => dst.fill(0),
                }
            }
            Ok(Some(data))
        })
    }

    async fn write_part(&self, mut p: Part, mut data: Bytes) -> Result<(), ClientError> {
        let clone = self.inner.info.read().clone_source.is_some();
        if clone && (!p.offset.is_multiple_of(UNIT) || !p.len.is_multiple_of(UNIT)) {
            // A clone's chunk takes whole units (a unit not filled yet is the source's): read
            // the units around the write, put the write in, write them whole.
            let lo = p.offset / UNIT * UNIT;
            let hi = (p.offset + p.len).div_ceil(UNIT) * UNIT;
            let around = Part {
                offset: lo,
                len: hi - lo,
                buf_offset: 0,
            };
            let mut full = self
                .read_part_full(around)
                .await?
                .unwrap_or_else(|| vec![0u8; (hi - lo) as usize]);
            let at = (p.offset - lo) as usize;
            full[at..at + data.len()].copy_from_slice(&data);
            (p, data) = (around, full.into());
        }
        let seg = self.inner.info.read().segment_size;
        let s = self
            .segment(p.offset / seg, true)
            .await?
            .expect("allocated on write");
        let req = ChunkRequest {
            data,
            sn: self.inner.snap_seq.load(Ordering::Acquire),
            clone,
            ..self.locate(&s, p)
        };
        self.send(Op::Write, p.offset / seg, req).await.map(|_| ())
    }

    /// Fills a clone's part with `data` (its source's): only units not written or filled
    /// take it.
    async fn fill_part(&self, p: Part, data: Vec<u8>) -> Result<(), ClientError> {
        let seg = self.inner.info.read().segment_size;
        let s = self
            .segment(p.offset / seg, true)
            .await?
            .expect("allocated on fill");
        let req = ChunkRequest {
            data: data.into(),
            sn: self.inner.snap_seq.load(Ordering::Acquire),
            clone: true,
            ..self.locate(&s, p)
        };
        self.send(Op::Fill, p.offset / seg, req).await.map(|_| ())
    }

    /// Copies what the clone's source holds into the clone's units not written yet, at most
    /// `rate` bytes per second (0: as fast as it goes), calling `progress(done, total)` (bytes
    /// of the volume) as it goes; then tells the MDS the clone is flat. A volume that is not
    /// a clone is flat already.
    pub async fn fill_from_source(
        &self,
        rate: u64,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(), ClientError> {
        // Whole object sets of chunk space, in address order (a clone's layout is its
        // source's, so a chunk-space range is the same in both).
        let (layout, max) = self.geometry();
        let total = layout.span(self.size());
        if self.source().await?.is_none() {
            progress(total, total);
            return Ok(());
        }
        let (chunked, chunk) = (Layout::linear(layout.chunk_size), layout.chunk_size);
        let started = std::time::Instant::now();
        let mut copied = 0u64;
        let mut at = 0u64;
        while at < total {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(ClientError::Closed);
            }
            let Some(source) = self.source().await? else {
                break; // flattened meanwhile
            };
            let n = chunk.min(total - at);
            let parts = split(at, n, &chunked, max);
            let jobs = parts.iter().map(|p| async move {
                match source.read_part_full(*p).await? {
                    Some(d) => self.fill_part(*p, d).await.map(|_| p.len),
                    None => Ok(0),
                }
            });
            for r in futures::future::join_all(jobs).await {
                copied += r?;
            }
            at += n;
            progress(at, total);
            if rate > 0 {
                let due = Duration::from_secs_f64(copied as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let owner = self.inner.opts.owner.clone();
        let i = match self.inner.mds.flatten(&self.inner.path, &owner).await {
            Ok(i) => i,
            // Another filler (the clone's writer fills in the background) finished first.
            Err(e) if e.status() == Some(MdsStatus::Invalid) => {
                let i = self.inner.mds.stat(&self.inner.path).await?;
                if i.clone_source.is_some() {
                    return Err(e.into());
                }
                i
            }
            Err(e) => return Err(e.into()),
        };
        self.inner.info.write().clone_source = i.clone_source;
        Ok(())
    }

    /// Sends one chunk request to its copyset's leader until it is done, as the retry policy
    /// ([`crate::retry`]) says. Reads of a chunk that does not exist answer `None`.
    async fn send(
        &self,
        op: Op,
        segment: u64,
        mut req: ChunkRequest,
    ) -> Result<Option<ChunkResponse>, ClientError> {
        let write = matches!(op, Op::Write | Op::Fill);
        let (pool, copyset) = (req.logical_pool_id, req.copyset_id);
        let inner = &self.inner;
        let mut policy = RetryPolicy::default();
        loop {
            if inner.closed.load(Ordering::Acquire) {
                return Err(ClientError::Closed);
            }
            req.epoch = inner.epoch.load(Ordering::Acquire);
            req.ticket.clone_from(&inner.ticket.read());
            let route = match inner.cache.route(pool, copyset) {
                Some(r) => r,
                None => {
                    let locs = inner.mds.copysets(pool, &[copyset]).await?;
                    inner.cache.put_copysets(&locs);
                    inner.cache.route(pool, copyset).unwrap_or_default()
                }
            };
            let leader = route
                .leader
                .clone()
                .or_else(|| route.peers.first().map(|p| p.address.clone()));
            let (outcome, answer) = match &leader {
                None => (Outcome::NoAddress, None),
                Some(leader) => {
                    let (mut c, answered) = inner.conns.chunk(leader);
                    let call = async {
                        match op {
                            Op::Write => c.write_chunk(req.clone()).await,
                            Op::Read => c.read_chunk(req.clone()).await,
                            Op::Fill => c.recover_chunk(req.clone()).await,
                            Op::Extents => c
                                .get_chunk_info(GetChunkInfoRequest {
                                    logical_pool_id: req.logical_pool_id,
                                    copyset_id: req.copyset_id,
                                    chunk_id: req.chunk_id,
                                    ticket: req.ticket.clone(),
                                    grant: req.grant.clone(),
                                    extent_offset: req.offset,
                                    extent_length: u64::from(req.size),
                                })
                                .await
                                .map(|r| r.map(extents_answer)),
                        }
                    };
                    let sent = std::time::Instant::now();
                    match tokio::time::timeout(policy.timeout(), call).await {
                        Ok(Ok(r)) => {
                            answered.now();
                            let r = r.into_inner();
                            let status = ChunkStatus::try_from(r.status)
                                .unwrap_or(ChunkStatus::FailureUnknown);
                            // A redirect to the node asked tells nothing.
                            let redirect = r
                                .redirect
                                .as_ref()
                                .map(|l| l.address.clone())
                                .filter(|a| a != leader);
                            (Outcome::Answered { status, redirect }, Some(r))
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%leader, error = %e, "chunk request failed; finding the leader");
                            (Outcome::Transport, None)
                        }
                        Err(_) => {
                            tracing::debug!(%leader, timeout = ?policy.timeout(), "chunk request timed out");
                            inner.conns.reset_if_silent(leader, sent);
                            (Outcome::TimedOut, None)
                        }
                    }
                }
            };
            // Our own reopen (a lapsed session) raises the chunkservers' epoch floor before its
            // answer reaches us: an EPOCH_TOO_OLD while it runs waits for it, and is then ours
            // to resend rather than a fence by another client.
            if matches!(
                outcome,
                Outcome::Answered {
                    status: ChunkStatus::EpochTooOld,
                    ..
                }
            ) && inner.epoch.load(Ordering::Acquire) == req.epoch
            {
                drop(inner.session_op.lock().await);
            }
            let epoch_now = inner.epoch.load(Ordering::Acquire);
            match policy.next(&outcome, write, req.epoch, epoch_now, jitter) {
                Action::Done => return Ok(answer),
                Action::Missing => return Ok(None),
                Action::Fail(f) => {
                    return Err(match f {
                        Failure::Fenced => ClientError::Fenced,
                        Failure::NoSpace => {
                            ClientError::Chunk("no space left on the chunkservers".into())
                        }
                        Failure::Unauthorized => ClientError::Chunk(format!(
                            "copyset {pool}.{copyset}: the chunkserver refused our ticket \
                             (authentication: is the cluster's key the one the MDS uses?)"
                        )),
                        Failure::Invalid => ClientError::Chunk(format!(
                            "invalid request {:?}",
                            (req.chunk_id, req.offset, req.size)
                        )),
                        Failure::Status(s) => {
                            ClientError::Chunk(format!("copyset {pool}.{copyset}: status {s}"))
                        }
                    });
                }
                Action::Retry { wait, next } => {
                    if let Outcome::Answered { status, .. } = &outcome
                        && !matches!(status, ChunkStatus::Redirected | ChunkStatus::Overload)
                        && policy.worth_a_warning()
                    {
                        tracing::warn!(
                            ?status,
                            pool,
                            copyset,
                            "chunk request still failing; retrying"
                        );
                    }
                    tracing::debug!(
                        pool,
                        copyset,
                        ?outcome,
                        ?next,
                        ?wait,
                        "chunk request: retrying"
                    );
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let failed = leader.as_deref().unwrap_or_default();
                    match next {
                        Next::Resend => {}
                        Next::RenewCredentials => {
                            self.renew_ticket().await;
                            self.renew_grant(segment, write, &mut req).await;
                        }
                        Next::Leader(l) => inner.cache.set_leader(pool, copyset, &l),
                        Next::FindLeader => {
                            let unreachable =
                                matches!(outcome, Outcome::Transport | Outcome::TimedOut);
                            self.find_leader(pool, copyset, &route, failed, unreachable)
                                .await
                        }
                        Next::RefreshRoute => self.refresh_route(pool, copyset).await,
                        Next::RefreshRouteAndFindLeader => {
                            self.refresh_route(pool, copyset).await;
                            self.find_leader(pool, copyset, &route, failed, false).await;
                        }
                    }
                }
            }
        }
    }

    async fn find_leader(
        &self,
        pool: u32,
        copyset: u32,
        route: &crate::metacache::CopysetRoute,
        failed: &str,
        unreachable: bool,
    ) {
        let inner = &self.inner;
        // The others may still name a peer we could not reach (a leader just killed, stopped
        // or cut off: they elect another within an election timeout). Ask again shortly rather
        // than send it a request that waits for a timeout; after a second, believe them. A
        // peer that answered (with a failure) is believed at once.
        let patience = if unreachable {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        };
        let deadline = tokio::time::Instant::now() + patience;
        let mut named = None;
        loop {
            match inner
                .conns
                .find_leader(pool, copyset, &route.peers, Some(failed))
                .await
            {
                Some(l) if l != failed || tokio::time::Instant::now() >= deadline => {
                    named = Some(l);
                    break;
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                None => break,
            }
        }
        if let Some(l) = named {
            inner.cache.set_leader(pool, copyset, &l);
            return;
        }
        self.refresh_route(pool, copyset).await;
        // Still nobody: try the next peer.
        if let Some(r) = inner.cache.route(pool, copyset)
            && !r.peers.is_empty()
        {
            let i = r
                .peers
                .iter()
                .position(|p| p.address == failed)
                .map_or(0, |i| i + 1);
            let next = r.peers[i % r.peers.len()].address.clone();
            inner.cache.set_leader(pool, copyset, &next);
        }
    }

    /// The chunk's grant as the MDS gives it now (the segment fetched again).
    async fn renew_grant(&self, segment: u64, write: bool, req: &mut ChunkRequest) {
        self.inner.cache.drop_segment(segment);
        match self.segment(segment, write).await {
            Ok(Some(s)) => {
                if let Some(c) = s.chunks.iter().find(|c| c.chunk_id == req.chunk_id) {
                    req.grant.clone_from(&c.grant);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(path = %self.inner.path, error = %e, "grant renewal failed"),
        }
    }

    /// A fresh ticket from the MDS (a refresh of the session), after TICKET_EXPIRED.
    async fn renew_ticket(&self) {
        let session = self.inner.session.read().clone();
        let (snap, fill) = (
            self.inner.snap_seq.load(Ordering::Acquire),
            self.inner.opts.fill,
        );
        match self
            .inner
            .mds
            .refresh_with(&self.inner.path, &session, snap, fill)
            .await
        {
            Ok(r) if !r.ticket.is_empty() => *self.inner.ticket.write() = r.ticket,
            Ok(_) => {}
            Err(e) => tracing::warn!(path = %self.inner.path, error = %e, "ticket renewal failed"),
        }
    }

    async fn refresh_route(&self, pool: u32, copyset: u32) {
        if let Ok(locs) = self.inner.mds.copysets(pool, &[copyset]).await {
            self.inner.cache.put_copysets(&locs);
        }
    }

    /// The volume as the MDS has it now.
    pub async fn stat(&self) -> Result<FileInfo, ClientError> {
        let i = self.inner.mds.stat(&self.inner.path).await?;
        *self.inner.info.write() = i.clone();
        Ok(i)
    }

    /// Closes the session. In-flight requests fail with [`ClientError::Closed`].
    pub async fn close(&self) -> Result<(), ClientError> {
        let _op = self.inner.session_op.lock().await;
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let session = self.inner.session.read().clone();
        if session.is_empty() {
            return Ok(()); // sessionless (read-only)
        }
        self.inner.mds.close(&self.inner.path, &session).await?;
        Ok(())
    }
}

/// A GetChunkInfo answer as the chunk answers `send` handles: its data extents packed into
/// `data`.
fn extents_answer(r: GetChunkInfoResponse) -> ChunkResponse {
    ChunkResponse {
        status: r.status,
        redirect: r.redirect,
        data: r
            .data_extents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        ..Default::default()
    }
}

/// Keeps the session alive (every third of the lease, at least every second), picks up size,
/// QoS, snapshot and clone changes, and reopens (taking the session over, new epoch) when the
/// lease was lost. A new snapshot's number is taken at once and said back in a refresh right
/// away: the snapshot's create waits for that.
async fn refresh_loop(inner: std::sync::Weak<Inner>, lease: Duration) {
    loop {
        tokio::time::sleep((lease / 3).min(Duration::from_secs(1))).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let session = inner.session.read().clone();
        let snap = inner.snap_seq.load(Ordering::Acquire);
        match inner
            .mds
            .refresh_with(&inner.path, &session, snap, inner.opts.fill)
            .await
        {
            Ok(r) => {
                if !r.ticket.is_empty() {
                    *inner.ticket.write() = r.ticket;
                }
                if let Some(i) = r.info {
                    if let Some(q) = &i.qos {
                        inner.qos.set(q);
                    }
                    {
                        let mut info = inner.info.write();
                        info.length = i.length;
                        info.snapshots = i.snapshots.clone();
                        if info.snapshot_seq == 0 {
                            info.clone_source = i.clone_source.clone();
                            info.snap_seq = i.snap_seq;
                        }
                    }
                    if !session.is_empty() && i.snap_seq != snap {
                        inner.snap_seq.store(i.snap_seq, Ordering::Release);
                        if let Err(e) = inner
                            .mds
                            .refresh_with(&inner.path, &session, i.snap_seq, false)
                            .await
                        {
                            tracing::warn!(path = %inner.path, error = %e, "saying the snapshot was taken");
                        }
                    }
                }
            }
            Err(e) if e.status() == Some(MdsStatus::SessionExpired) && !session.is_empty() => {
                let _op = inner.session_op.lock().await;
                if inner.closed.load(Ordering::Acquire) {
                    return; // closed while the refresh was in flight: stay closed
                }
                match inner
                    .mds
                    .open(&inner.path, &inner.opts.owner, &inner.opts.client_id)
                    .await
                {
                    Ok((i, s, ticket)) => {
                        tracing::warn!(path = %inner.path, epoch = s.epoch, "session lost and reopened");
                        inner.snap_seq.store(i.snap_seq, Ordering::Release);
                        *inner.session.write() = s.session_id;
                        *inner.ticket.write() = ticket;
                        // Another writer may have held it meanwhile.
                        inner.cache.clear_absent();
                        inner.epoch.store(s.epoch, Ordering::Release);
                    }
                    Err(e) if e.status() == Some(MdsStatus::Occupied) => {
                        // Another client holds it now: it is theirs. Taking it back when their
                        // lease lapses would fence a writer that did nothing wrong.
                        tracing::error!(path = %inner.path, error = %e, "session lost to another client; the volume is closed here");
                        inner.closed.store(true, Ordering::Release);
                        return;
                    }
                    Err(e) => {
                        tracing::error!(path = %inner.path, error = %e, "session lost; reopen failed")
                    }
                }
            }
            Err(e) => tracing::warn!(path = %inner.path, error = %e, "session refresh failed"),
        }
    }
}

/// The seed's CloneManager: a clone open for writing copies its source in the background, at
/// the volume's fill rate, and ends flat.
async fn clone_manager(inner: std::sync::Weak<Inner>) {
    // Let the volume's first I/O go first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let v = Volume { inner: strong };
    let rate = v.inner.opts.fill_rate;
    drop(inner);
    match v.fill_from_source(rate, &|_, _| {}).await {
        Ok(()) => tracing::info!(path = %v.inner.path, "clone filled from its source: flat"),
        Err(ClientError::Closed) => {}
        Err(e) => tracing::warn!(path = %v.inner.path, error = %e, "background clone fill stopped"),
    }
}
