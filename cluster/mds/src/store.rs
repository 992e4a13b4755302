//! The metadata store: a small ordered key-value interface with atomic batches, behind which
//! the MDS keeps its namespace, topology and sessions.
//!
//! ```text
//!  MetaStore ── EmbeddedStore  redb file in the data dir (default; one MDS)
//!            └─ EtcdStore      etcd v3 (several MDS, one leader; writes fenced by its key)
//! ```
//!
//! The MDS holds everything in memory and writes through: a [`Writer`] task receives batches
//! in the order the state changed, commits them in groups (one transaction for all that
//! queued during the last commit), and only then are the requests answered.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

/// One change in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put(Vec<u8>, Vec<u8>),
    /// Remove `key`.
    Delete(Vec<u8>),
}

/// A store failure. For the leader MDS this is fatal: its memory may be ahead of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed.
    #[error("metadata store: {0}")]
    Backend(String),
    /// An etcd write was refused because this MDS is no longer the leader.
    #[error("lost the MDS leadership")]
    LostLeadership,
}

/// Key-value pairs, in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Boxed future of the store.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// An ordered key-value store with atomic batches.
pub trait MetaStore: Send + Sync + 'static {
    /// All pairs whose key starts with `prefix`, in key order.
    fn scan<'a>(&'a self, prefix: &'a [u8]) -> StoreFuture<'a, Pairs>;
    /// Applies `ops` atomically, in order.
    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, ()>;
    /// A name for logs and metrics.
    fn kind(&self) -> &'static str;
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("meta");

/// The default store: a redb database (`<data-dir>/mds.redb`), crash-safe, fsync per commit.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    db: Arc<redb::Database>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl EmbeddedStore {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Database::create(path).map_err(backend)?;
        let tx = db.begin_write().map_err(backend)?;
        tx.open_table(TABLE).map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(EmbeddedStore { db: Arc::new(db) })
    }

    fn scan_sync(&self, prefix: &[u8]) -> Result<Pairs, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(TABLE).map_err(backend)?;
        let mut out = Vec::new();
        for r in t.range(prefix..).map_err(backend)? {
            let (k, v) = r.map_err(backend)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn commit_sync(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        {
            let mut t = tx.open_table(TABLE).map_err(backend)?;
            for op in &ops {
                match op {
                    Op::Put(k, v) => {
                        t.insert(k.as_slice(), v.as_slice()).map_err(backend)?;
                    }
                    Op::Delete(k) => {
                        t.remove(k.as_slice()).map_err(backend)?;
                    }
                }
            }
        }
        tx.commit().map_err(backend)
    }
}

impl MetaStore for EmbeddedStore {
    fn scan<'a>(&'a self, prefix: &'a [u8]) -> StoreFuture<'a, Pairs> {
        let me = self.clone();
        let prefix = prefix.to_vec();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || me.scan_sync(&prefix))
                .await
                .map_err(backend)?
        })
    }

    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, ()> {
        let me = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || me.commit_sync(ops))
                .await
                .map_err(backend)?
        })
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

type Pending = (Vec<Op>, oneshot::Sender<Result<(), String>>);

/// The write-through queue: batches commit in the order they were queued, grouped.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Pending>,
}

/// Operations per commit at most (etcd refuses transactions of more than 128 operations).
pub const MAX_OPS_PER_COMMIT: usize = 128;

impl Writer {
    /// Starts the writer task over `store`. A failed commit is fatal (`on_fatal` runs, and
    /// every later batch fails): the caller's memory is ahead of the store.
    pub fn start(
        store: Arc<dyn MetaStore>,
        on_fatal: impl Fn(&StoreError) + Send + 'static,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Pending>();
        tokio::spawn(async move {
            let mut failed: Option<String> = None;
            while let Some(first) = rx.recv().await {
                let mut group = vec![first];
                while let Ok(p) = rx.try_recv() {
                    group.push(p);
                }
                if let Some(e) = &failed {
                    for (_, done) in group {
                        let _ = done.send(Err(e.clone()));
                    }
                    continue;
                }
                // Whole batches per commit, in order, up to the limit (a bigger batch alone).
                let mut result = Ok(());
                let mut ops = Vec::new();
                for (batch, _) in &group {
                    if !ops.is_empty() && ops.len() + batch.len() > MAX_OPS_PER_COMMIT {
                        result = store.commit(std::mem::take(&mut ops)).await;
                        if result.is_err() {
                            break;
                        }
                    }
                    ops.extend(batch.iter().cloned());
                }
                if result.is_ok() && !ops.is_empty() {
                    result = store.commit(ops).await;
                }
                let r = result.map_err(|e| {
                    on_fatal(&e);
                    e.to_string()
                });
                if let Err(e) = &r {
                    failed = Some(e.clone());
                }
                for (_, done) in group {
                    let _ = done.send(r.clone());
                }
            }
        });
        Writer { tx }
    }

    /// Queues `ops` (call while still holding the state lock, so the store sees changes in the
    /// order the memory did) and returns what resolves when they are durable.
    pub fn queue(&self, ops: Vec<Op>) -> impl Future<Output = Result<(), String>> + use<> {
        // Empty batches go through the queue too: they resolve once everything queued before
        // them is durable, so no answer reveals state that could still be lost.
        let (done, wait) = oneshot::channel();
        let sent = self.tx.send((ops, done)).is_ok();
        async move {
            if !sent {
                return Err("the metadata writer stopped".to_string());
            }
            wait.await
                .unwrap_or_else(|_| Err("the metadata writer stopped".to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn embedded_scan_commit_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mds.redb");
        let s = EmbeddedStore::open(&path).unwrap();
        s.commit(vec![
            Op::Put(b"a/1".to_vec(), b"x".to_vec()),
            Op::Put(b"a/2".to_vec(), b"y".to_vec()),
            Op::Put(b"b/1".to_vec(), b"z".to_vec()),
        ])
        .await
        .unwrap();
        s.commit(vec![Op::Delete(b"a/1".to_vec())]).await.unwrap();
        drop(s);
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            s.scan(b"a/").await.unwrap(),
            vec![(b"a/2".to_vec(), b"y".to_vec())]
        );
        assert_eq!(s.scan(b"").await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn the_writer_keeps_order_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn MetaStore> = Arc::new(EmbeddedStore::open(&dir.path().join("m")).unwrap());
        let w = Writer::start(s.clone(), |_| {});
        let mut waits = Vec::new();
        for i in 0..300u32 {
            waits.push(w.queue(vec![Op::Put(b"k".to_vec(), i.to_le_bytes().to_vec())]));
        }
        for f in waits {
            f.await.unwrap();
        }
        let got = s.scan(b"k").await.unwrap();
        assert_eq!(
            got[0].1,
            299u32.to_le_bytes().to_vec(),
            "the last write wins"
        );
        w.queue(Vec::new()).await.unwrap();
    }
}
