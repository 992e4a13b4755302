//! Requests to chunkservers: one connection per chunkserver address, shared by every volume
//! and queue, and the leader discovery a failed request falls back on (GetLeader on the
//! copyset's other peers).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use curve_proto::chunk::chunk_service_client::ChunkServiceClient;
use curve_proto::cli::CliRequest;
use curve_proto::cli::cli_service_client::CliServiceClient;
use curve_proto::common::Peer;
use parking_lot::Mutex;
use tonic::transport::Channel;

/// Connections to chunkservers.
#[derive(Debug, Default)]
pub struct Connections {
    channels: Mutex<HashMap<String, Conn>>,
}

/// One chunkserver's connection and when it last answered anything.
#[derive(Debug, Clone)]
struct Conn {
    channel: Channel,
    answered: Arc<Answered>,
}

/// When a connection last answered, as ms after it was made (0: never). Written by every
/// answer without a lock.
#[derive(Debug)]
pub struct Answered {
    made: Instant,
    at_ms: AtomicU64,
}

impl Answered {
    /// Notes an answer now.
    pub fn now(&self) {
        let ms = self.made.elapsed().as_millis() as u64 + 1;
        self.at_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Whether anything was answered at or after `since`.
    fn since(&self, since: Instant) -> bool {
        match self.at_ms.load(Ordering::Relaxed) {
            0 => false,
            ms => self.made + Duration::from_millis(ms) >= since,
        }
    }
}

impl Connections {
    fn conn(&self, addr: &str) -> Conn {
        let mut m = self.channels.lock();
        if let Some(c) = m.get(addr) {
            return c.clone();
        }
        let channel = curve_auth::tls::endpoint(addr)
            .expect("host:port makes a URI")
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let c = Conn {
            channel,
            answered: Arc::new(Answered {
                made: Instant::now(),
                at_ms: AtomicU64::new(0),
            }),
        };
        m.insert(addr.to_string(), c.clone());
        c
    }

    /// A channel to `addr` (lazily connected, reconnecting on its own).
    pub fn channel(&self, addr: &str) -> Channel {
        self.conn(addr).channel
    }

    /// Forgets the connection to `addr` if nothing came back on it since `since` (the start of
    /// a request that timed out): the next request opens a new one. The silent one may be deep
    /// in TCP's retransmission backoff (a link that was down: the next retransmission seconds
    /// away), while a new connection is tried at once; requests still on it finish there. A
    /// connection that answers other requests is only slow (a loaded server), and is kept.
    pub fn reset_if_silent(&self, addr: &str, since: Instant) {
        let mut m = self.channels.lock();
        if m.get(addr).is_some_and(|c| !c.answered.since(since)) {
            m.remove(addr);
        }
    }

    /// A ChunkService client of `addr`, and where to note its answers.
    pub fn chunk(&self, addr: &str) -> (ChunkServiceClient<Channel>, Arc<Answered>) {
        let c = self.conn(addr);
        (
            ChunkServiceClient::new(c.channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            c.answered,
        )
    }

    /// Asks the peers other than `failed` who leads the copyset.
    pub async fn find_leader(
        &self,
        pool: u32,
        copyset: u32,
        peers: &[Peer],
        failed: Option<&str>,
    ) -> Option<String> {
        for p in peers.iter().filter(|p| Some(p.address.as_str()) != failed) {
            let conn = self.conn(&p.address);
            let mut c = CliServiceClient::new(conn.channel);
            let asked = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_millis(500),
                c.get_leader(CliRequest {
                    logical_pool_id: pool,
                    copyset_id: copyset,
                    ..Default::default()
                }),
            )
            .await;
            match r {
                Ok(Ok(r)) => {
                    conn.answered.now();
                    if let Some(l) = r.into_inner().leader.filter(|l| !l.address.is_empty()) {
                        return Some(l.address);
                    }
                }
                Err(_) => self.reset_if_silent(&p.address, asked),
                Ok(Err(_)) => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_is_replaced_only_when_it_stayed_silent() {
        let conns = Connections::default();
        let (_, answered) = conns.chunk("127.0.0.1:1");
        let before = Instant::now();
        answered.now();
        // It answered since `before`: kept (the same connection comes back).
        conns.reset_if_silent("127.0.0.1:1", before);
        assert!(Arc::ptr_eq(&answered, &conns.chunk("127.0.0.1:1").1));
        std::thread::sleep(Duration::from_millis(5));
        // Nothing since a later request began: replaced.
        conns.reset_if_silent("127.0.0.1:1", Instant::now());
        assert!(!Arc::ptr_eq(&answered, &conns.chunk("127.0.0.1:1").1));
    }
}
