//! etcd as the metadata store of several MDS, and the election that picks their one leader,
//! through the `etcd-client` crate.
//!
//! The leader campaigns through etcd's election API with a lease it keeps alive; its writes
//! are transactions guarded by its leader key (`CREATE revision == rev` of the key it won
//! with), so a deposed leader can never overwrite its successor's metadata. When the lease
//! cannot be kept alive, the process exits and its supervisor starts it again as a follower.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use parking_lot::Mutex;

use crate::store::{MetaStore, Op, StoreError, StoreFuture};

/// The key an MDS won the election with: its writes are guarded by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    /// The key etcd created for the campaign.
    pub key: Vec<u8>,
    /// Its create revision.
    pub rev: i64,
}

/// A client of the etcd endpoints (host:port, or http://host:port), balanced over them. It
/// connects lazily: an etcd that is not up yet is retried by the calls.
pub async fn connect(endpoints: &[String]) -> Result<Client, StoreError> {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| {
            if e.contains("://") {
                e.clone()
            } else {
                format!("http://{e}")
            }
        })
        .collect();
    if eps.is_empty() {
        return Err(StoreError::Backend("no etcd endpoint".into()));
    }
    // A member cut off from the others must not hold our requests (or the lease keep-alive
    // stream) until the request timeout: it answers "no leader" at once (require_leader). A
    // connection to a member that went silent is found dead by HTTP/2 pings (every 6 s: etcd
    // closes connections that ping more often than its --grpc-keepalive-min-time, 5 s).
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(6), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    Client::connect(eps, Some(opts)).await.map_err(backend)
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// The metadata store on etcd, under a key prefix.
#[derive(Clone)]
pub struct EtcdStore {
    kv: etcd_client::KvClient,
    prefix: Vec<u8>,
    /// The leader key this MDS won with: every write is guarded by it.
    fence: Arc<Mutex<Option<LeaderKey>>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// A store through `client`, keys under `prefix`.
    pub fn new(client: &Client, prefix: &str) -> Self {
        EtcdStore {
            kv: client.kv_client(),
            prefix: prefix.as_bytes().to_vec(),
            fence: Arc::default(),
        }
    }

    /// Guards every later write with `leader` (the key won in the election).
    pub fn fence_with(&self, leader: LeaderKey) {
        *self.fence.lock() = Some(leader);
    }

    fn key(&self, k: &[u8]) -> Vec<u8> {
        let mut full = self.prefix.clone();
        full.extend_from_slice(k);
        full
    }
}

impl MetaStore for EtcdStore {
    fn scan<'a>(&'a self, prefix: &'a [u8]) -> StoreFuture<'a, crate::store::Pairs> {
        Box::pin(async move {
            let mut kv = self.kv.clone();
            let start = self.key(prefix);
            let end = prefix_end(&start);
            let mut out = Vec::new();
            let mut from = start;
            loop {
                let r = kv
                    .get(
                        from.clone(),
                        Some(GetOptions::new().with_range(end.clone()).with_limit(1000)),
                    )
                    .await
                    .map_err(backend)?;
                for kv in r.kvs() {
                    out.push((kv.key()[self.prefix.len()..].to_vec(), kv.value().to_vec()));
                }
                match (r.more(), r.kvs().last()) {
                    (true, Some(last)) => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => break,
                }
            }
            Ok(out)
        })
    }

    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            // etcd refuses transactions of more than 128 operations: a bigger batch (a purge
            // of a large volume, a big pool) goes as several guarded transactions, in order.
            let mut ops = ops;
            while ops.len() > crate::store::MAX_OPS_PER_COMMIT {
                let rest = ops.split_off(crate::store::MAX_OPS_PER_COMMIT);
                self.commit_one(std::mem::replace(&mut ops, rest)).await?;
            }
            self.commit_one(ops).await
        })
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }
}

impl EtcdStore {
    async fn commit_one(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put(k, v) => TxnOp::put(self.key(&k), v, None),
                Op::Delete(k) => TxnOp::delete(self.key(&k), None),
            })
            .collect();
        let fence: Vec<Compare> = self
            .fence
            .lock()
            .as_ref()
            .map(|l| Compare::create_revision(l.key.clone(), CompareOp::Equal, l.rev))
            .into_iter()
            .collect();
        let r = self
            .kv
            .clone()
            .txn(Txn::new().when(fence).and_then(ops))
            .await
            .map_err(backend)?;
        if r.succeeded() {
            Ok(())
        } else {
            Err(StoreError::LostLeadership)
        }
    }
}

/// Leader election among MDS processes.
#[derive(Clone)]
pub struct Election {
    client: Client,
    name: Vec<u8>,
    /// The etcd endpoints: a lease keep-alive that failed goes on over a new connection.
    endpoints: Vec<String>,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("name", &String::from_utf8_lossy(&self.name))
            .finish_non_exhaustive()
    }
}

fn retryable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded | tonic::Code::Unavailable
        ),
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

impl Election {
    /// An election called `name` on etcd.
    pub fn new(client: &Client, name: &str, endpoints: &[String]) -> Self {
        Election {
            client: client.clone(),
            name: name.as_bytes().to_vec(),
            endpoints: endpoints.to_vec(),
        }
    }

    /// Grants a lease of `ttl` and keeps it alive in the background; `on_lost` runs when it
    /// can no longer be renewed (etcd unreachable for longer than the TTL, or revoked).
    pub async fn lease(
        &self,
        ttl: Duration,
        on_lost: impl FnOnce() + Send + 'static,
    ) -> Result<i64, StoreError> {
        let mut lease = self.client.lease_client();
        let ttl_s = ttl.as_secs().max(1) as i64;
        let id = lease.grant(ttl_s, None).await.map_err(backend)?.id();
        let every = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100));
        let ttl = Duration::from_secs(ttl_s as u64);
        let endpoints = self.endpoints.clone();
        tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                match tokio::time::timeout(ttl, lease.keep_alive(id)).await {
                    Ok(Ok((mut keeper, mut stream))) => loop {
                        if keeper.keep_alive().await.is_err() {
                            break;
                        }
                        match tokio::time::timeout(every, stream.message()).await {
                            Ok(Ok(Some(r))) if r.ttl() > 0 => {
                                last_ok = tokio::time::Instant::now();
                            }
                            Ok(Ok(Some(_))) => {
                                tracing::error!(lease = id, "the MDS lease expired");
                                on_lost();
                                return;
                            }
                            _ => break,
                        }
                        tokio::time::sleep(every).await;
                    },
                    Ok(Err(e)) => tracing::warn!(error = %e, "lease keep-alive failed"),
                    Err(_) => tracing::warn!("lease keep-alive timed out"),
                }
                // The connection it went on may lead to a member that is cut off (silent until
                // an HTTP/2 ping fails, seconds from now): go on over a new one, which reaches
                // the members that answer.
                if let Ok(c) = connect(&endpoints).await {
                    lease = c.lease_client();
                }
                // Give up before etcd does (half a second early, at least half the TTL): a new
                // leader may be elected as soon as the lease expires there. Writes are fenced
                // anyway; this stops stale answers.
                if last_ok.elapsed() >= ttl.saturating_sub(Duration::from_millis(500)).max(ttl / 2)
                {
                    tracing::error!(lease = id, "the MDS lease could not be renewed in time");
                    on_lost();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(id)
    }

    /// Campaigns with `value` (this MDS's address) under `lease`: returns when elected.
    pub async fn campaign(&self, lease: i64, value: &str) -> Result<LeaderKey, StoreError> {
        let mut e = self.client.election_client();
        loop {
            // A campaign blocks in etcd until elected; the client's request timeout ends each
            // attempt, so retry.
            match e.campaign(self.name.clone(), value, lease).await {
                Ok(r) => {
                    let l = r
                        .leader()
                        .ok_or_else(|| backend("campaign won without a leader key"))?;
                    return Ok(LeaderKey {
                        key: l.key().to_vec(),
                        rev: l.rev(),
                    });
                }
                // A campaign outlives connections (a member restarted, partitioned or closing
                // ours): only a refusal ends it; anything else is tried again.
                Err(etcd_client::Error::GRpcStatus(s))
                    if matches!(
                        s.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                    ) =>
                {
                    return Err(backend(etcd_client::Error::GRpcStatus(s)));
                }
                Err(err) => {
                    if !retryable(&err) {
                        tracing::warn!(error = %err, "campaign interrupted; campaigning again");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The current leader's value (its address), if any.
    pub async fn leader(&self) -> Option<String> {
        let mut e = self.client.election_client();
        let r = e.leader(self.name.clone()).await.ok()?;
        r.kv()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/curve/"), b"/curve0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
