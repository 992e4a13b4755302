//! etcd as the metadata store of several MDS, and the election that picks their one leader.
//!
//! The leader campaigns through etcd's election API with a lease it keeps alive; its writes
//! are transactions guarded by its leader key (`CREATE revision == rev` of the key it won
//! with), so a deposed leader can never overwrite its successor's metadata. When the lease
//! cannot be kept alive, the process exits and its supervisor starts it again as a follower.

use std::sync::Arc;
use std::time::Duration;

use curve_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use curve_proto::etcd::etcdserverpb::kv_client::KvClient;
use curve_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use curve_proto::etcd::etcdserverpb::request_op::Request;
use curve_proto::etcd::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};
use curve_proto::etcd::v3electionpb::election_client::ElectionClient;
use curve_proto::etcd::v3electionpb::{CampaignRequest, LeaderKey, LeaderRequest};
use parking_lot::Mutex;
use tonic::transport::Channel;

use crate::store::{MetaStore, Op, StoreError, StoreFuture};

/// A channel balanced over the etcd endpoints (host:port, http).
pub fn connect(endpoints: &[String]) -> Result<Channel, StoreError> {
    let eps = endpoints
        .iter()
        .map(|e| {
            let url = if e.contains("://") {
                e.clone()
            } else {
                format!("http://{e}")
            };
            tonic::transport::Endpoint::from_shared(url)
                .map(|ep| {
                    ep.connect_timeout(Duration::from_secs(2))
                        .timeout(Duration::from_secs(5))
                })
                .map_err(|e| StoreError::Backend(format!("bad etcd endpoint: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if eps.is_empty() {
        return Err(StoreError::Backend("no etcd endpoint".into()));
    }
    Ok(Channel::balance_list(eps.into_iter()))
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
#[derive(Debug, Clone)]
pub struct EtcdStore {
    kv: KvClient<Channel>,
    prefix: Vec<u8>,
    /// The leader key this MDS won with: every write is guarded by it.
    fence: Arc<Mutex<Option<LeaderKey>>>,
}

impl EtcdStore {
    /// A store over `channel`, keys under `prefix`.
    pub fn new(channel: Channel, prefix: &str) -> Self {
        EtcdStore {
            kv: KvClient::new(channel),
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
                    .range(RangeRequest {
                        key: from.clone(),
                        range_end: end.clone(),
                        limit: 1000,
                        ..Default::default()
                    })
                    .await
                    .map_err(backend)?
                    .into_inner();
                for kv in &r.kvs {
                    out.push((kv.key[self.prefix.len()..].to_vec(), kv.value.clone()));
                }
                match (r.more, r.kvs.last()) {
                    (true, Some(last)) => {
                        from = last.key.clone();
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
        {
            let success = ops
                .into_iter()
                .map(|op| RequestOp {
                    request: Some(match op {
                        Op::Put(k, v) => Request::RequestPut(PutRequest {
                            key: self.key(&k),
                            value: v,
                            lease: 0,
                        }),
                        Op::Delete(k) => Request::RequestDeleteRange(DeleteRangeRequest {
                            key: self.key(&k),
                            range_end: Vec::new(),
                        }),
                    }),
                })
                .collect();
            let compare = self
                .fence
                .lock()
                .as_ref()
                .map(|l| Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Create as i32,
                    key: l.key.clone(),
                    target_union: Some(TargetUnion::CreateRevision(l.rev)),
                })
                .into_iter()
                .collect();
            let r = self
                .kv
                .clone()
                .txn(TxnRequest {
                    compare,
                    success,
                    failure: Vec::new(),
                })
                .await
                .map_err(backend)?
                .into_inner();
            if r.succeeded {
                Ok(())
            } else {
                Err(StoreError::LostLeadership)
            }
        }
    }
}

/// Leader election among MDS processes.
#[derive(Debug, Clone)]
pub struct Election {
    channel: Channel,
    name: Vec<u8>,
}

impl Election {
    /// An election called `name` on etcd.
    pub fn new(channel: Channel, name: &str) -> Self {
        Election {
            channel,
            name: name.as_bytes().to_vec(),
        }
    }

    /// Grants a lease of `ttl` and keeps it alive in the background; `on_lost` runs when it
    /// can no longer be renewed (etcd unreachable for longer than the TTL, or revoked).
    pub async fn lease(
        &self,
        ttl: Duration,
        on_lost: impl FnOnce() + Send + 'static,
    ) -> Result<i64, StoreError> {
        let mut lease = LeaseClient::new(self.channel.clone());
        let ttl_s = ttl.as_secs().max(1) as i64;
        let id = lease
            .lease_grant(LeaseGrantRequest { ttl: ttl_s, id: 0 })
            .await
            .map_err(backend)?
            .into_inner()
            .id;
        let every = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100));
        let ttl = Duration::from_secs(ttl_s as u64);
        tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                // etcd answers the stream's headers only after its first request: queue it
                // before the call.
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let _ = tx.send(LeaseKeepAliveRequest { id }).await;
                let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
                match tokio::time::timeout(ttl, lease.lease_keep_alive(stream)).await {
                    Ok(Ok(resp)) => {
                        let mut resp = resp.into_inner();
                        loop {
                            match tokio::time::timeout(every, resp.message()).await {
                                Ok(Ok(Some(r))) if r.ttl > 0 => {
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
                            if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                                break;
                            }
                        }
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "lease keep-alive failed"),
                    Err(_) => tracing::warn!("lease keep-alive timed out"),
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
        let mut e = ElectionClient::new(self.channel.clone());
        loop {
            // A campaign blocks in etcd until elected; the channel's request timeout ends
            // each attempt, so retry.
            let r = tonic::Request::new(CampaignRequest {
                name: self.name.clone(),
                lease,
                value: value.as_bytes().to_vec(),
            });
            match e.campaign(r).await {
                Ok(r) => {
                    return r
                        .into_inner()
                        .leader
                        .ok_or_else(|| backend("campaign won without a leader key"));
                }
                Err(s)
                    if s.code() == tonic::Code::Cancelled
                        || s.code() == tonic::Code::DeadlineExceeded
                        || s.code() == tonic::Code::Unavailable =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => return Err(backend(s)),
            }
        }
    }

    /// The current leader's value (its address), if any.
    pub async fn leader(&self) -> Option<String> {
        let mut e = ElectionClient::new(self.channel.clone());
        let r = e
            .leader(LeaderRequest {
                name: self.name.clone(),
            })
            .await
            .ok()?
            .into_inner();
        r.kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
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
