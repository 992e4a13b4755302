//! The namespace: directories and volumes by path, the recycle bin, and segments (a volume's
//! logical chunks mapped to chunk ids and copysets, allocated on first write).
//!
//! Everything here is in memory and pure: each change returns the store operations that make
//! it durable, which the caller queues in order ([`crate::store::Writer`]).
//!
//! ```text
//!  f/<file id>                 FileRecord (json)
//!  s/<file id>/<segment>       SegmentRecord (json)
//!  id/file, id/chunk           id watermarks (allocated in blocks)
//! ```

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::store::Op;

/// Root directory id.
pub const ROOT: u64 = 0;
/// The recycle bin directory id (`/RecycleBin`).
pub const RECYCLE_BIN: u64 = 1;
/// Name of the recycle bin under the root.
pub const RECYCLE_BIN_NAME: &str = "RecycleBin";
/// Largest volume: 4 PiB.
pub const MAX_LENGTH: u64 = 4 << 50;

/// What a failed namespace operation answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NsError {
    /// The name is taken.
    #[error("{0} exists")]
    Exists(String),
    /// No such file or directory.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    /// Malformed request.
    #[error("{0}")]
    Invalid(String),
    /// A component is not a directory.
    #[error("{0} is not a directory")]
    NotDirectory(String),
    /// Not a volume.
    #[error("{0} is not a volume")]
    NotAVolume(String),
    /// Directory not empty.
    #[error("{0}: directory not empty")]
    NotEmpty(String),
    /// Extend to a size not larger.
    #[error("{0}: volumes only grow ({1} -> {2})")]
    ShrinkRefused(String, u64, u64),
    /// Owner mismatch.
    #[error("{0}: owner mismatch")]
    AuthFailed(String),
    /// No copysets to allocate chunks from.
    #[error("no copysets to allocate from")]
    NoSpace,
    /// Open by a client (or, for a directory, a volume under it is).
    #[error("{0} is open")]
    Occupied(String),
    /// Something depends on it (a snapshot's clones, a volume's snapshots).
    #[error("{0}")]
    InUse(String),
}

/// File or directory.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Kind {
    /// A volume.
    Volume,
    /// A directory.
    Directory,
}

/// Where a file in the recycle bin came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Origin {
    /// Parent directory id.
    pub parent: u64,
    /// Name.
    pub name: String,
    /// Full path.
    pub path: String,
}

/// A file or directory, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRecord {
    /// Id.
    pub id: u64,
    /// Parent directory.
    pub parent: u64,
    /// Name in the parent.
    pub name: String,
    /// Volume or directory.
    pub kind: Kind,
    /// Bytes (volumes).
    pub length: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// Chunk size.
    pub chunk_size: u64,
    /// Segment size.
    pub segment_size: u64,
    /// Owner.
    pub owner: String,
    /// Creation time.
    pub ctime_ms: u64,
    /// Set while in the recycle bin.
    pub deleted: Option<Origin>,
    /// Bumped by every open.
    pub epoch: u64,
    /// Limits the client applies.
    #[serde(default)]
    pub qos: QosRecord,
    /// Snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
    /// The sequence number of the last snapshot taken (deleted ones included).
    #[serde(default)]
    pub last_seq: u64,
    /// A clone: what it was cloned from, until flattened.
    #[serde(default)]
    pub clone_of: Option<CloneSource>,
    /// Striping: bytes per stripe unit (0: not striped; `curve_proto::layout`).
    #[serde(default)]
    pub stripe_unit: u64,
    /// Striping: chunks a stripe goes round.
    #[serde(default)]
    pub stripe_count: u32,
}

impl FileRecord {
    /// The sequence number of the newest live snapshot (0: none): what writes carry.
    pub fn snap_seq(&self) -> u64 {
        self.snapshots.last().map_or(0, |s| s.seq)
    }

    /// How far the volume's chunk space reaches: its length, striped rounded up to whole
    /// object sets (the last set's chunks hold units past the end too).
    pub fn span(&self) -> u64 {
        curve_proto::layout::Layout {
            chunk_size: self.chunk_size.max(4096),
            stripe_unit: self.stripe_unit,
            stripe_count: u64::from(self.stripe_count),
        }
        .span(self.length)
    }
}

/// A snapshot of a volume, as stored in the volume's record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Its name (`PATH@NAME`).
    pub name: String,
    /// Sequence number: writes carrying this or newer copy what they overwrite for it.
    pub seq: u64,
    /// Creation time.
    pub ctime_ms: u64,
    /// A snapshot of a clone: the clone's source then (it reads from it where the clone was
    /// not filled yet, even after the clone is flattened).
    #[serde(default)]
    pub clone_of: Option<CloneSource>,
}

/// The source of a clone: a snapshot of another volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CloneSource {
    /// The source volume's id.
    pub volume: u64,
    /// The snapshot's sequence number.
    pub seq: u64,
    /// The snapshot's name.
    pub snapshot: String,
}

/// Splits `PATH@SNAPSHOT` (a snapshot) from `PATH`.
pub fn split_snapshot(path: &str) -> (&str, Option<&str>) {
    match path.rsplit_once('@') {
        Some((p, s)) => (p, Some(s)),
        None => (path, None),
    }
}

fn check_name(kind: &str, name: &str) -> Result<(), NsError> {
    if name.is_empty()
        || name.len() > 128
        || name
            .chars()
            .any(|c| c == '/' || c == '@' || c.is_whitespace() || c.is_control())
    {
        return Err(NsError::Invalid(format!(
            "{kind} name {name:?}: 1 to 128 characters, no '/', '@' or spaces"
        )));
    }
    Ok(())
}

/// Per-volume limits (0: unlimited).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QosRecord {
    /// Operations per second, both directions.
    pub iops_total: u64,
    /// Reads per second.
    pub iops_read: u64,
    /// Writes per second.
    pub iops_write: u64,
    /// Bytes per second, both directions.
    pub bps_total: u64,
    /// Bytes read per second.
    pub bps_read: u64,
    /// Bytes written per second.
    pub bps_write: u64,
    /// Burst window, ms.
    pub burst_ms: u64,
}

/// A segment, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SegmentRecord {
    /// Logical pool id.
    pub pool: u32,
    /// (chunk id, copyset id) per chunk.
    pub chunks: Vec<(u64, u32)>,
}

/// A segment with its offset in the volume.
pub type Located = (u64, SegmentRecord);

/// Sizes of new volumes.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Chunk size (16 MiB by default).
    pub chunk_size: u64,
    /// Segment size (1 GiB by default).
    pub segment_size: u64,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            chunk_size: 16 << 20,
            segment_size: 1 << 30,
        }
    }
}

/// Ids handed out from a durable watermark, `BLOCK` at a time.
#[derive(Debug, Clone, Default)]
pub struct IdGen {
    next: u64,
    watermark: u64,
}

impl IdGen {
    const BLOCK: u64 = 1 << 16;

    fn new(watermark: u64, first: u64) -> Self {
        IdGen {
            next: watermark.max(first),
            watermark,
        }
    }

    /// The next id; pushes the op that raises the stored watermark when a block runs out.
    fn take(&mut self, key: &str, ops: &mut Vec<Op>) -> u64 {
        if self.next >= self.watermark {
            self.watermark = self.next + Self::BLOCK;
            ops.push(Op::Put(
                key.as_bytes().to_vec(),
                self.watermark.to_le_bytes().to_vec(),
            ));
        }
        self.next += 1;
        self.next - 1
    }
}

fn file_key(id: u64) -> Vec<u8> {
    format!("f/{id:016x}").into_bytes()
}

fn segment_key(file: u64, index: u64) -> Vec<u8> {
    format!("s/{file:016x}/{index:08x}").into_bytes()
}

fn put<T: Serialize>(key: Vec<u8>, v: &T) -> Op {
    Op::Put(key, serde_json::to_vec(v).expect("records serialise"))
}

/// Splits and checks an absolute path.
pub fn components(path: &str) -> Result<Vec<&str>, NsError> {
    if !path.starts_with('/') {
        return Err(NsError::Invalid(format!("{path:?}: paths are absolute")));
    }
    if path.len() > 4096 {
        return Err(NsError::Invalid("path longer than 4096 bytes".into()));
    }
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for c in &parts {
        if *c == "." || *c == ".." || c.len() > 255 || c.chars().any(|ch| ch.is_control()) {
            return Err(NsError::Invalid(format!("{path:?}: bad component {c:?}")));
        }
    }
    Ok(parts)
}

/// The in-memory namespace.
#[derive(Debug, Default)]
pub struct Namespace {
    files: HashMap<u64, FileRecord>,
    children: HashMap<u64, BTreeMap<String, u64>>,
    segments: HashMap<(u64, u64), SegmentRecord>,
    /// Chunks allocated per (pool, copyset): allocation evens them out.
    copyset_chunks: HashMap<(u32, u32), u64>,
    file_ids: IdGen,
    chunk_ids: IdGen,
    geometry: Geometry,
}

/// A new segment's allocation input: the copysets of a pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolCopysets<'a> {
    /// Pool id.
    pub pool: u32,
    /// Its copyset ids.
    pub copysets: &'a [u32],
}

impl Namespace {
    /// Rebuilds the namespace from the store's pairs (all keys).
    pub fn load(pairs: &[(Vec<u8>, Vec<u8>)], geometry: Geometry) -> Result<Self, String> {
        let mut ns = Namespace {
            geometry,
            ..Default::default()
        };
        let (mut file_wm, mut chunk_wm) = (0, 0);
        for (k, v) in pairs {
            let key = std::str::from_utf8(k).map_err(|e| e.to_string())?;
            let bad = |e: String| format!("{key}: {e}");
            if key.starts_with("f/") {
                let f: FileRecord = serde_json::from_slice(v).map_err(|e| bad(e.to_string()))?;
                ns.link(f);
            } else if let Some(rest) = key.strip_prefix("s/") {
                let (file, index) = rest.split_once('/').ok_or_else(|| bad("key".into()))?;
                let file = u64::from_str_radix(file, 16).map_err(|e| bad(e.to_string()))?;
                let index = u64::from_str_radix(index, 16).map_err(|e| bad(e.to_string()))?;
                let s: SegmentRecord = serde_json::from_slice(v).map_err(|e| bad(e.to_string()))?;
                for (_, cs) in &s.chunks {
                    *ns.copyset_chunks.entry((s.pool, *cs)).or_default() += 1;
                }
                ns.segments.insert((file, index), s);
            } else if key == "id/file" || key == "id/chunk" {
                let n = u64::from_le_bytes(
                    v.as_slice()
                        .try_into()
                        .map_err(|_| bad("watermark".into()))?,
                );
                if key == "id/file" {
                    file_wm = n;
                } else {
                    chunk_wm = n;
                }
            }
        }
        ns.file_ids = IdGen::new(file_wm, RECYCLE_BIN + 1);
        ns.chunk_ids = IdGen::new(chunk_wm, 1);
        Ok(ns)
    }

    /// Creates the root and the recycle bin when missing.
    pub fn bootstrap(&mut self, now_ms: u64) -> Vec<Op> {
        let mut ops = Vec::new();
        for (id, parent, name) in [(ROOT, ROOT, ""), (RECYCLE_BIN, ROOT, RECYCLE_BIN_NAME)] {
            if !self.files.contains_key(&id) {
                let f = FileRecord {
                    id,
                    parent,
                    name: name.into(),
                    kind: Kind::Directory,
                    length: 0,
                    block_size: 4096,
                    chunk_size: 0,
                    segment_size: 0,
                    owner: "root".into(),
                    ctime_ms: now_ms,
                    deleted: None,
                    epoch: 0,
                    qos: QosRecord::default(),
                    snapshots: Vec::new(),
                    last_seq: 0,
                    clone_of: None,
                    stripe_unit: 0,
                    stripe_count: 0,
                };
                ops.push(put(file_key(id), &f));
                self.link(f);
            }
        }
        ops
    }

    fn link(&mut self, f: FileRecord) {
        if f.id != ROOT {
            self.children
                .entry(f.parent)
                .or_default()
                .insert(f.name.clone(), f.id);
        }
        self.files.insert(f.id, f);
    }

    fn unlink(&mut self, id: u64) -> Option<FileRecord> {
        let f = self.files.remove(&id)?;
        if let Some(c) = self.children.get_mut(&f.parent) {
            c.remove(&f.name);
        }
        Some(f)
    }

    /// The id at `path`.
    pub fn lookup(&self, path: &str) -> Result<u64, NsError> {
        let mut id = ROOT;
        for c in components(path)? {
            let dir = &self.files[&id];
            if dir.kind != Kind::Directory {
                return Err(NsError::NotDirectory(self.path_of(id)));
            }
            id = *self
                .children
                .get(&id)
                .and_then(|ch| ch.get(c))
                .ok_or_else(|| NsError::NotFound(path.to_string()))?;
        }
        Ok(id)
    }

    /// The record with `id`.
    pub fn get(&self, id: u64) -> Option<&FileRecord> {
        self.files.get(&id)
    }

    /// The full path of `id`.
    pub fn path_of(&self, mut id: u64) -> String {
        let mut parts = Vec::new();
        while id != ROOT {
            let Some(f) = self.files.get(&id) else {
                break;
            };
            parts.push(f.name.as_str());
            id = f.parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    fn parent_dir(&self, path: &str) -> Result<(u64, String), NsError> {
        let parts = components(path)?;
        let Some((name, dirs)) = parts.split_last() else {
            return Err(NsError::Invalid("the root has no name".into()));
        };
        if name.contains('@') {
            return Err(NsError::Invalid(format!(
                "{path}: '@' names a snapshot (PATH@SNAPSHOT), not a file"
            )));
        }
        let parent = self.lookup(&format!("/{}", dirs.join("/")))?;
        if self.files[&parent].kind != Kind::Directory {
            return Err(NsError::NotDirectory(self.path_of(parent)));
        }
        if self.in_recycle_bin(parent) {
            return Err(NsError::Invalid(format!(
                "{path}: the recycle bin is managed by delete/recover/purge"
            )));
        }
        Ok((parent, name.to_string()))
    }

    fn in_recycle_bin(&self, id: u64) -> bool {
        id == RECYCLE_BIN || self.files.get(&id).is_some_and(|f| f.parent == RECYCLE_BIN)
    }

    fn check_owner(f: &FileRecord, owner: &str, path: &str) -> Result<(), NsError> {
        if owner == "root" || f.owner == owner {
            Ok(())
        } else {
            Err(NsError::AuthFailed(path.into()))
        }
    }

    fn check_length(length: u64, block_size: u32) -> Result<(), NsError> {
        if length == 0 || !length.is_multiple_of(u64::from(block_size)) || length > MAX_LENGTH {
            return Err(NsError::Invalid(format!(
                "size {length}: a non-zero multiple of the block size ({block_size}), at most 4 PiB"
            )));
        }
        Ok(())
    }

    /// Creates a volume or a directory.
    pub fn create(
        &mut self,
        path: &str,
        kind: Kind,
        length: u64,
        block_size: u32,
        owner: &str,
        now_ms: u64,
    ) -> Result<(FileRecord, Vec<Op>), NsError> {
        self.create_striped(path, kind, length, block_size, (0, 0), owner, now_ms)
    }

    /// [`Namespace::create`] of a volume striped `(stripe unit, stripe count)` ((0, 0): not).
    #[allow(clippy::too_many_arguments)]
    pub fn create_striped(
        &mut self,
        path: &str,
        kind: Kind,
        length: u64,
        block_size: u32,
        (stripe_unit, stripe_count): (u64, u32),
        owner: &str,
        now_ms: u64,
    ) -> Result<(FileRecord, Vec<Op>), NsError> {
        if kind == Kind::Volume {
            curve_proto::layout::check(
                self.geometry.chunk_size,
                stripe_unit,
                u64::from(stripe_count),
            )
            .map_err(NsError::Invalid)?;
        }
        if owner.is_empty() {
            return Err(NsError::Invalid("an owner is required".into()));
        }
        let block_size = match block_size {
            0 => 4096,
            512 | 4096 => block_size,
            b => return Err(NsError::Invalid(format!("block size {b}: 512 or 4096"))),
        };
        let (parent, name) = self.parent_dir(path)?;
        if self
            .children
            .get(&parent)
            .is_some_and(|c| c.contains_key(&name))
        {
            return Err(NsError::Exists(path.into()));
        }

        let length = match kind {
            Kind::Volume => {
                Self::check_length(length, block_size)?;
                length
            }
            Kind::Directory => 0,
        };
        let mut ops = Vec::new();
        let id = self.file_ids.take("id/file", &mut ops);
        let f = FileRecord {
            id,
            parent,
            name,
            kind,
            length,
            block_size,
            chunk_size: self.geometry.chunk_size,
            segment_size: self.geometry.segment_size,
            owner: owner.into(),
            ctime_ms: now_ms,
            deleted: None,
            epoch: 0,
            qos: QosRecord::default(),
            snapshots: Vec::new(),
            last_seq: 0,
            clone_of: None,
            stripe_unit: if kind == Kind::Volume { stripe_unit } else { 0 },
            stripe_count: if kind == Kind::Volume {
                stripe_count
            } else {
                0
            },
        };
        ops.push(put(file_key(id), &f));
        self.link(f.clone());
        Ok((f, ops))
    }

    /// The volume at `path` and, for `PATH@NAME`, its snapshot `NAME`.
    pub fn resolve(&self, path: &str) -> Result<(u64, Option<SnapshotRecord>), NsError> {
        let (volume, snap) = split_snapshot(path);
        let id = self.lookup(volume)?;
        let Some(name) = snap else {
            return Ok((id, None));
        };
        let f = &self.files[&id];
        if f.kind != Kind::Volume {
            return Err(NsError::NotAVolume(volume.into()));
        }
        f.snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .map(|s| (id, Some(s)))
            .ok_or_else(|| NsError::NotFound(format!("snapshot {path}")))
    }

    fn volume_mut(&mut self, path: &str, owner: &str) -> Result<&mut FileRecord, NsError> {
        let id = self.lookup(path)?;
        let f = &self.files[&id];
        if f.kind != Kind::Volume || f.deleted.is_some() || self.in_recycle_bin(id) {
            return Err(NsError::NotAVolume(path.into()));
        }
        Self::check_owner(f, owner, path)?;
        Ok(self.files.get_mut(&id).expect("looked up"))
    }

    /// Records snapshot `name` of the volume at `path`, with the next sequence number.
    pub fn snapshot_create(
        &mut self,
        path: &str,
        name: &str,
        owner: &str,
        now_ms: u64,
    ) -> Result<(FileRecord, SnapshotRecord, Vec<Op>), NsError> {
        check_name("snapshot", name)?;
        let f = self.volume_mut(path, owner)?;
        if f.snapshots.iter().any(|s| s.name == name) {
            return Err(NsError::Exists(format!("snapshot {path}@{name}")));
        }
        f.last_seq += 1;
        let s = SnapshotRecord {
            name: name.into(),
            seq: f.last_seq,
            ctime_ms: now_ms,
            clone_of: f.clone_of.clone(),
        };
        f.snapshots.push(s.clone());
        let f = f.clone();
        Ok((f.clone(), s, vec![put(file_key(f.id), &f)]))
    }

    /// What reads from snapshot `seq` of volume `id`: clones (paths), and snapshots of
    /// clones taken before they were flattened (`PATH@NAME`).
    pub fn clones_of(&self, id: u64, seq: u64) -> Vec<String> {
        let of =
            |c: &Option<CloneSource>| c.as_ref().is_some_and(|c| c.volume == id && c.seq == seq);
        let mut v: Vec<String> = Vec::new();
        for f in self.files.values() {
            if of(&f.clone_of) {
                v.push(self.display_path(f.id));
            }
            for s in f.snapshots.iter().filter(|s| of(&s.clone_of)) {
                v.push(format!("{}@{}", self.display_path(f.id), s.name));
            }
        }
        v.sort();
        v
    }

    /// Deletes snapshot `name` of the volume at `path` (refused while clones read from it).
    /// Returns the volume as it is now and its segments, whose chunks drop what only deleted
    /// snapshots read.
    pub fn snapshot_delete(
        &mut self,
        path: &str,
        name: &str,
        owner: &str,
    ) -> Result<(FileRecord, Vec<SegmentRecord>, Vec<Op>), NsError> {
        let id = self.volume_mut(path, owner)?.id;
        let f = &self.files[&id];
        let Some(i) = f.snapshots.iter().position(|s| s.name == name) else {
            return Err(NsError::NotFound(format!("snapshot {path}@{name}")));
        };
        let clones = self.clones_of(id, f.snapshots[i].seq);
        if !clones.is_empty() {
            return Err(NsError::InUse(format!(
                "snapshot {path}@{name} has clones: {} (flatten or delete them first)",
                clones.join(", ")
            )));
        }
        let f = self.files.get_mut(&id).expect("looked up");
        f.snapshots.remove(i);
        let f = f.clone();
        Ok((f.clone(), self.segments_of(id), vec![put(file_key(id), &f)]))
    }

    /// Where a file is, for messages (its original path while in the recycle bin).
    fn display_path(&self, id: u64) -> String {
        match self.files.get(&id).and_then(|f| f.deleted.as_ref()) {
            Some(o) => format!("{} (in the recycle bin)", o.path),
            None => self.path_of(id),
        }
    }

    /// The segments of volume `id`.
    pub fn segments_of(&self, id: u64) -> Vec<SegmentRecord> {
        let mut v: Vec<(u64, &SegmentRecord)> = self
            .segments
            .iter()
            .filter(|((f, _), _)| *f == id)
            .map(|((_, i), s)| (*i, s))
            .collect();
        v.sort_by_key(|(i, _)| *i);
        v.into_iter().map(|(_, s)| s.clone()).collect()
    }

    /// Creates volume `path` as a clone of snapshot `source` (`PATH@NAME`): same size, its
    /// chunks created as they are written or filled.
    pub fn clone_volume(
        &mut self,
        source: &str,
        path: &str,
        owner: &str,
        now_ms: u64,
    ) -> Result<(FileRecord, Vec<Op>), NsError> {
        let (src, snap) = self.resolve(source)?;
        let Some(snap) = snap else {
            return Err(NsError::Invalid(format!(
                "{source}: clone a snapshot (PATH@SNAPSHOT)"
            )));
        };
        let s = self.files[&src].clone();
        Self::check_owner(&s, owner, source)?;
        if s.block_size != 4096 {
            return Err(NsError::Invalid(format!(
                "{source}: clones need 4096-byte blocks, not {}",
                s.block_size
            )));
        }
        if (s.chunk_size, s.segment_size) != (self.geometry.chunk_size, self.geometry.segment_size)
        {
            return Err(NsError::Invalid(format!(
                "{source}: chunks and segments of another size than new volumes'"
            )));
        }
        // The source's layout: a chunk-space range is then the same in both.
        let (mut f, mut ops) = self.create_striped(
            path,
            Kind::Volume,
            s.length,
            s.block_size,
            (s.stripe_unit, s.stripe_count),
            owner,
            now_ms,
        )?;
        f.clone_of = Some(CloneSource {
            volume: src,
            seq: snap.seq,
            snapshot: snap.name,
        });
        f.qos = s.qos;
        ops.push(put(file_key(f.id), &f));
        self.files.insert(f.id, f.clone());
        Ok((f, ops))
    }

    /// Ends a clone's tie to its source (every unit filled by the caller).
    pub fn flatten(&mut self, path: &str, owner: &str) -> Result<(FileRecord, Vec<Op>), NsError> {
        let f = self.volume_mut(path, owner)?;
        if f.clone_of.is_none() {
            return Err(NsError::Invalid(format!("{path} is not a clone")));
        }
        f.clone_of = None;
        let f = f.clone();
        Ok((f.clone(), vec![put(file_key(f.id), &f)]))
    }

    /// The entries of a directory.
    pub fn list(&self, path: &str) -> Result<Vec<&FileRecord>, NsError> {
        let id = self.lookup(path)?;
        if self.files[&id].kind != Kind::Directory {
            return Err(NsError::NotDirectory(path.into()));
        }
        Ok(self
            .children
            .get(&id)
            .map(|c| c.values().map(|i| &self.files[i]).collect())
            .unwrap_or_default())
    }

    /// Grows a volume.
    pub fn extend(
        &mut self,
        path: &str,
        new_length: u64,
        owner: &str,
    ) -> Result<(FileRecord, Vec<Op>), NsError> {
        let id = self.lookup(path)?;
        let f = &self.files[&id];
        if f.kind != Kind::Volume {
            return Err(NsError::NotAVolume(path.into()));
        }
        Self::check_owner(f, owner, path)?;
        if new_length <= f.length {
            return Err(NsError::ShrinkRefused(path.into(), f.length, new_length));
        }
        Self::check_length(new_length, f.block_size)?;
        let f = self.files.get_mut(&id).expect("looked up");
        f.length = new_length;
        let f = f.clone();
        Ok((f.clone(), vec![put(file_key(id), &f)]))
    }

    /// Sets the limits of a volume.
    pub fn set_qos(
        &mut self,
        path: &str,
        qos: QosRecord,
        owner: &str,
    ) -> Result<(FileRecord, Vec<Op>), NsError> {
        let id = self.lookup(path)?;
        let f = &self.files[&id];
        if f.kind != Kind::Volume {
            return Err(NsError::NotAVolume(path.into()));
        }
        Self::check_owner(f, owner, path)?;
        let f = self.files.get_mut(&id).expect("looked up");
        f.qos = qos;
        let f = f.clone();
        Ok((f.clone(), vec![put(file_key(id), &f)]))
    }

    /// Renames (moves) a file or directory.
    pub fn rename(
        &mut self,
        from: &str,
        to: &str,
        owner: &str,
    ) -> Result<(FileRecord, Vec<Op>), NsError> {
        let id = self.lookup(from)?;
        if id == ROOT || self.in_recycle_bin(id) {
            return Err(NsError::Invalid(format!("{from} cannot be renamed")));
        }
        Self::check_owner(&self.files[&id], owner, from)?;
        let (parent, name) = self.parent_dir(to)?;
        if self
            .children
            .get(&parent)
            .is_some_and(|c| c.contains_key(&name))
        {
            return Err(NsError::Exists(to.into()));
        }
        // A directory cannot move under itself.
        let mut up = parent;
        while up != ROOT {
            if up == id {
                return Err(NsError::Invalid(format!("{to} is inside {from}")));
            }
            up = self.files[&up].parent;
        }
        let mut f = self.unlink(id).expect("looked up");
        f.parent = parent;
        f.name = name;
        let ops = vec![put(file_key(id), &f)];
        self.link(f.clone());
        Ok((f, ops))
    }

    /// Moves a file to the recycle bin (`force`: purges it at once). Returns the segments
    /// freed when purged.
    pub fn delete(
        &mut self,
        path: &str,
        owner: &str,
        force: bool,
    ) -> Result<(FileRecord, Vec<Op>, Vec<SegmentRecord>), NsError> {
        let id = self.lookup(path)?;
        if id == ROOT || self.in_recycle_bin(id) {
            return Err(NsError::Invalid(format!(
                "{path} cannot be deleted (purge files in the recycle bin)"
            )));
        }
        let f = &self.files[&id];
        Self::check_owner(f, owner, path)?;
        if !f.snapshots.is_empty() {
            let names: Vec<&str> = f.snapshots.iter().map(|s| s.name.as_str()).collect();
            return Err(NsError::InUse(format!(
                "{path} has snapshots ({}): delete them first",
                names.join(", ")
            )));
        }
        if f.kind == Kind::Directory {
            if self.children.get(&id).is_some_and(|c| !c.is_empty()) {
                return Err(NsError::NotEmpty(path.into()));
            }
            let f = self.unlink(id).expect("looked up");
            return Ok((f, vec![Op::Delete(file_key(id))], Vec::new()));
        }
        if force {
            return Ok(self.remove_volume(id));
        }
        let mut f = self.unlink(id).expect("looked up");
        f.deleted = Some(Origin {
            parent: f.parent,
            name: f.name.clone(),
            path: path.to_string(),
        });
        f.parent = RECYCLE_BIN;
        f.name = format!("{}-{}", f.name, f.id);
        let ops = vec![put(file_key(id), &f)];
        self.link(f.clone());
        Ok((f, ops, Vec::new()))
    }

    fn remove_volume(&mut self, id: u64) -> (FileRecord, Vec<Op>, Vec<SegmentRecord>) {
        let f = self.unlink(id).expect("exists");
        let mut ops = vec![Op::Delete(file_key(id))];
        let indexes: Vec<u64> = self
            .segments
            .keys()
            .filter(|(file, _)| *file == id)
            .map(|(_, i)| *i)
            .collect();
        let mut freed = Vec::new();
        for i in indexes {
            let s = self.segments.remove(&(id, i)).expect("listed");
            for (_, cs) in &s.chunks {
                if let Some(n) = self.copyset_chunks.get_mut(&(s.pool, *cs)) {
                    *n = n.saturating_sub(1);
                }
            }
            ops.push(Op::Delete(segment_key(id, i)));
            freed.push(s);
        }
        (f, ops, freed)
    }

    /// A file of the recycle bin by its path there or its original path.
    fn in_bin(&self, path: &str) -> Result<u64, NsError> {
        if let Ok(id) = self.lookup(path)
            && self.files[&id].parent == RECYCLE_BIN
        {
            return Ok(id);
        }
        self.children
            .get(&RECYCLE_BIN)
            .into_iter()
            .flat_map(|c| c.values())
            .copied()
            .filter(|i| {
                self.files[i]
                    .deleted
                    .as_ref()
                    .is_some_and(|o| o.path == path)
            })
            .max() // the latest deletion of that path
            .ok_or_else(|| NsError::NotFound(format!("{path} in the recycle bin")))
    }

    /// Brings a file back from the recycle bin to where it was.
    pub fn recover(&mut self, path: &str, owner: &str) -> Result<(FileRecord, Vec<Op>), NsError> {
        let id = self.in_bin(path)?;
        let f = &self.files[&id];
        Self::check_owner(f, owner, path)?;
        let origin = f.deleted.clone().expect("in the bin");
        let parent = self.lookup(&self.path_of(origin.parent)).ok();
        if parent != Some(origin.parent) || !self.files.contains_key(&origin.parent) {
            return Err(NsError::NotFound(format!("the directory {path} was in",)));
        }
        if self
            .children
            .get(&origin.parent)
            .is_some_and(|c| c.contains_key(&origin.name))
        {
            return Err(NsError::Exists(origin.path));
        }
        let mut f = self.unlink(id).expect("in the bin");
        f.parent = origin.parent;
        f.name = origin.name;
        f.deleted = None;
        let ops = vec![put(file_key(id), &f)];
        self.link(f.clone());
        Ok((f, ops))
    }

    /// Removes a file from the recycle bin for good; returns the freed segments.
    pub fn purge(
        &mut self,
        path: &str,
        owner: &str,
    ) -> Result<(FileRecord, Vec<Op>, Vec<SegmentRecord>), NsError> {
        let id = self.in_bin(path)?;
        Self::check_owner(&self.files[&id], owner, path)?;
        Ok(self.remove_volume(id))
    }

    /// Bumps the epoch of a volume (an open); returns the new record.
    pub fn bump_epoch(&mut self, id: u64) -> (FileRecord, Vec<Op>) {
        let f = self.files.get_mut(&id).expect("open of a known file");
        f.epoch += 1;
        let f = f.clone();
        (f.clone(), vec![put(file_key(id), &f)])
    }

    /// The segment of `id` containing `offset`; allocates it when `allocate` and it is
    /// missing (Ok(None) when missing and not allocating: reads of zeros).
    pub fn segment(
        &mut self,
        id: u64,
        offset: u64,
        allocate: Option<PoolCopysets<'_>>,
    ) -> Result<(Option<Located>, Vec<Op>), NsError> {
        let f = &self.files[&id];
        if f.kind != Kind::Volume {
            return Err(NsError::NotAVolume(self.path_of(id)));
        }
        if offset >= f.span() {
            return Err(NsError::Invalid(format!(
                "offset {offset} beyond the volume ({} bytes)",
                f.length
            )));
        }
        let index = offset / f.segment_size;
        let start = index * f.segment_size;
        if let Some(s) = self.segments.get(&(id, index)) {
            return Ok((Some((start, s.clone())), Vec::new()));
        }
        let Some(pc) = allocate else {
            return Ok((None, Vec::new()));
        };
        if pc.copysets.is_empty() {
            return Err(NsError::NoSpace);
        }
        let n = (f.segment_size / f.chunk_size) as usize;
        let load: Vec<(u32, u64)> = pc
            .copysets
            .iter()
            .map(|c| {
                (
                    *c,
                    self.copyset_chunks
                        .get(&(pc.pool, *c))
                        .copied()
                        .unwrap_or(0),
                )
            })
            .collect();
        let chosen = crate::segment::choose_copysets(&load, n);
        let mut ops = Vec::new();
        let chunks: Vec<(u64, u32)> = chosen
            .into_iter()
            .map(|cs| {
                *self.copyset_chunks.entry((pc.pool, cs)).or_default() += 1;
                (self.chunk_ids.take("id/chunk", &mut ops), cs)
            })
            .collect();
        let s = SegmentRecord {
            pool: pc.pool,
            chunks,
        };
        ops.push(put(segment_key(id, index), &s));
        self.segments.insert((id, index), s.clone());
        Ok((Some((start, s)), ops))
    }

    /// Number of files (volumes and directories, bin included).
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether only the root and the bin exist.
    pub fn is_empty(&self) -> bool {
        self.files.len() <= 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        let mut ns = Namespace::load(
            &[],
            Geometry {
                chunk_size: 1 << 20,
                segment_size: 4 << 20,
            },
        )
        .unwrap();
        ns.bootstrap(0);
        ns
    }

    const V: Kind = Kind::Volume;
    const D: Kind = Kind::Directory;

    #[test]
    fn create_stat_list_rename_and_bad_input() {
        let mut n = ns();
        n.create("/d", D, 0, 0, "u", 1).unwrap();
        let (f, _) = n.create("/d/v", V, 8 << 20, 0, "u", 1).unwrap();
        assert_eq!(f.block_size, 4096);
        assert_eq!(n.lookup("/d/v").unwrap(), f.id);
        assert_eq!(n.path_of(f.id), "/d/v");
        assert_eq!(n.list("/d").unwrap().len(), 1);
        assert_eq!(n.list("/").unwrap().len(), 2, "d and the recycle bin");
        assert!(matches!(
            n.create("/d/v", V, 4096, 0, "u", 1),
            Err(NsError::Exists(_))
        ));
        assert!(matches!(
            n.create("/x/v", V, 4096, 0, "u", 1),
            Err(NsError::NotFound(_))
        ));
        assert!(matches!(
            n.create("/d/v/w", V, 4096, 0, "u", 1),
            Err(NsError::NotDirectory(_))
        ));
        assert!(matches!(
            n.create("/d/w", V, 0, 0, "u", 1),
            Err(NsError::Invalid(_))
        ));
        assert!(matches!(
            n.create("/d/w", V, 1000, 0, "u", 1),
            Err(NsError::Invalid(_))
        ));
        assert!(n.create("/d/w", V, 1024, 512, "u", 1).is_ok());
        assert!(matches!(
            n.create("/d/y", V, 4096, 1024, "u", 1),
            Err(NsError::Invalid(_))
        ));
        assert!(matches!(
            n.create("relative", V, 4096, 0, "u", 1),
            Err(NsError::Invalid(_))
        ));
        assert!(matches!(
            n.create("/d/../v", V, 4096, 0, "u", 1),
            Err(NsError::Invalid(_))
        ));
        assert!(matches!(
            n.create("/d/z", V, 4096, 0, "", 1),
            Err(NsError::Invalid(_))
        ));
        assert!(matches!(
            n.create("/RecycleBin/z", V, 4096, 0, "u", 1),
            Err(NsError::Invalid(_))
        ));
        // Extend grows only, by the owner.
        assert!(matches!(
            n.extend("/d/v", 4 << 20, "u"),
            Err(NsError::ShrinkRefused(..))
        ));
        assert!(matches!(
            n.extend("/d/v", 8 << 20, "u"),
            Err(NsError::ShrinkRefused(..))
        ));
        assert!(matches!(
            n.extend("/d/v", 16 << 20, "other"),
            Err(NsError::AuthFailed(_))
        ));
        assert_eq!(n.extend("/d/v", 16 << 20, "u").unwrap().0.length, 16 << 20);
        assert!(matches!(
            n.extend("/d", 16 << 20, "u"),
            Err(NsError::NotAVolume(_))
        ));
        // Rename, not into itself.
        n.rename("/d/v", "/v2", "u").unwrap();
        assert_eq!(n.lookup("/v2").unwrap(), f.id);
        assert!(matches!(
            n.rename("/d", "/d/e", "u"),
            Err(NsError::Invalid(_))
        ));
        assert!(matches!(
            n.rename("/v2", "/d/w", "u"),
            Err(NsError::Exists(_))
        ));
    }

    #[test]
    fn recycle_bin_recover_and_purge() {
        let mut n = ns();
        let (f, _) = n.create("/v", V, 8 << 20, 0, "u", 1).unwrap();
        n.delete("/v", "u", false).unwrap();
        assert!(n.lookup("/v").is_err());
        assert_eq!(n.lookup(&format!("/RecycleBin/v-{}", f.id)).unwrap(), f.id);
        // The name is free again while the old one waits in the bin.
        n.create("/v", V, 4096, 0, "u", 1).unwrap();
        assert!(matches!(n.recover("/v", "u"), Err(NsError::Exists(_))));
        n.delete("/v", "u", true).unwrap();
        let (back, _) = n.recover("/v", "u").unwrap();
        assert_eq!(back.id, f.id);
        assert_eq!(n.lookup("/v").unwrap(), f.id);
        n.delete("/v", "u", false).unwrap();
        n.purge(&format!("/RecycleBin/v-{}", f.id), "u").unwrap();
        assert!(matches!(n.recover("/v", "u"), Err(NsError::NotFound(_))));
        n.create("/d", D, 0, 0, "u", 1).unwrap();
        n.create("/d/x", V, 4096, 0, "u", 1).unwrap();
        assert!(matches!(
            n.delete("/d", "u", false),
            Err(NsError::NotEmpty(_))
        ));
        assert!(matches!(
            n.delete("/", "u", false),
            Err(NsError::Invalid(_))
        ));
    }

    #[test]
    fn snapshots_clones_and_what_depends_on_them() {
        let mut ns = ns();
        ns.create("/v", Kind::Volume, 8 << 20, 4096, "alice", 0)
            .unwrap();
        let (_, s1, _) = ns.snapshot_create("/v", "s1", "alice", 1).unwrap();
        let (f, s2, _) = ns.snapshot_create("/v", "s2", "alice", 2).unwrap();
        assert_eq!((s1.seq, s2.seq, f.snap_seq()), (1, 2, 2));
        fn e<T>(r: Result<T, NsError>) -> NsError {
            r.err().expect("an error")
        }
        assert!(matches!(
            e(ns.snapshot_create("/v", "s1", "alice", 3)),
            NsError::Exists(_)
        ));
        assert!(matches!(
            e(ns.snapshot_create("/v", "a/b", "alice", 3)),
            NsError::Invalid(_)
        ));
        assert!(matches!(
            e(ns.snapshot_create("/v", "x", "bob", 3)),
            NsError::AuthFailed(_)
        ));
        assert!(matches!(
            e(ns.snapshot_create("/nope", "x", "alice", 3)),
            NsError::NotFound(_)
        ));
        assert_eq!(ns.resolve("/v@s2").unwrap().1.unwrap().seq, 2);
        assert!(matches!(e(ns.resolve("/v@s9")), NsError::NotFound(_)));
        // A clone (and a snapshot of it) hold the snapshot; a volume with snapshots stays.
        let (c, _) = ns.clone_volume("/v@s1", "/c", "alice", 4).unwrap();
        assert_eq!(c.clone_of.as_ref().unwrap().seq, 1);
        assert_eq!(c.length, 8 << 20);
        assert!(matches!(
            e(ns.clone_volume("/v@s1", "/c", "alice", 4)),
            NsError::Exists(_)
        ));
        assert!(matches!(
            e(ns.clone_volume("/v", "/d", "alice", 4)),
            NsError::Invalid(_)
        ));
        assert!(matches!(
            e(ns.clone_volume("/v@s1", "/d", "bob", 4)),
            NsError::AuthFailed(_)
        ));
        ns.snapshot_create("/c", "t", "alice", 5).unwrap();
        assert_eq!(
            ns.clones_of(2, 1),
            vec!["/c".to_string(), "/c@t".to_string()]
        );
        match e(ns.snapshot_delete("/v", "s1", "alice")) {
            NsError::InUse(m) => assert!(m.contains("/c, /c@t"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            e(ns.delete("/v", "alice", true)),
            NsError::InUse(_)
        ));
        assert!(matches!(e(ns.flatten("/v", "alice")), NsError::Invalid(_)));
        ns.flatten("/c", "alice").unwrap();
        ns.snapshot_delete("/c", "t", "alice").unwrap();
        let (f, _, _) = ns.snapshot_delete("/v", "s1", "alice").unwrap();
        assert_eq!(f.snap_seq(), 2);
        let (f, _, _) = ns.snapshot_delete("/v", "s2", "alice").unwrap();
        assert_eq!((f.snap_seq(), f.last_seq), (0, 2), "numbers are not reused");
        ns.delete("/v", "alice", true).unwrap();
    }

    #[test]
    fn segments_allocate_once_spread_and_reload() {
        let mut n = ns();
        let (f, mut ops) = n.create("/v", V, 16 << 20, 0, "u", 1).unwrap();
        let pc = PoolCopysets {
            pool: 1,
            copysets: &[1, 2, 3],
        };
        assert!(
            n.segment(f.id, 5 << 20, None).unwrap().0.is_none(),
            "unallocated"
        );
        let (s, o) = n.segment(f.id, 5 << 20, Some(pc)).unwrap();
        ops.extend(o);
        let (start, s) = s.unwrap();
        assert_eq!(start, 4 << 20);
        assert_eq!(s.chunks.len(), 4);
        let cs: std::collections::BTreeSet<u32> = s.chunks.iter().map(|c| c.1).collect();
        assert_eq!(cs.len(), 3, "spread over the copysets: {s:?}");
        // Allocated once: the same answer again, with no new ops.
        let (again, o) = n.segment(f.id, 7 << 20, Some(pc)).unwrap();
        assert!(o.is_empty());
        assert_eq!(again.unwrap().1, s);
        let (s2, o) = n.segment(f.id, 0, Some(pc)).unwrap();
        ops.extend(o);
        let ids: std::collections::BTreeSet<u64> = s
            .chunks
            .iter()
            .chain(&s2.unwrap().1.chunks)
            .map(|c| c.0)
            .collect();
        assert_eq!(ids.len(), 8, "unique chunk ids");
        assert!(matches!(
            n.segment(f.id, 16 << 20, Some(pc)),
            Err(NsError::Invalid(_))
        ));
        // Reload from the ops as a store would hold them.
        let mut kv: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for op in n.bootstrap(0).into_iter().chain(ops) {
            if let Op::Put(k, v) = op {
                kv.insert(k, v);
            }
        }
        let pairs: Vec<_> = kv.into_iter().collect();
        let mut m = Namespace::load(&pairs, n.geometry).unwrap();
        assert_eq!(m.segment(f.id, 5 << 20, None).unwrap().0.unwrap().1, s);
        let (s3, _) = m.segment(f.id, 9 << 20, Some(pc)).unwrap();
        assert!(
            s3.unwrap().1.chunks.iter().all(|c| !ids.contains(&c.0)),
            "ids never reused"
        );
    }
}
