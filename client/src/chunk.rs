//! Requests to chunkservers: one connection per chunkserver address, shared by every volume
//! and queue, and the leader discovery a failed request falls back on (GetLeader on the
//! copyset's other peers).

use std::collections::HashMap;
use std::time::Duration;

use curve_proto::chunk::chunk_service_client::ChunkServiceClient;
use curve_proto::cli::CliRequest;
use curve_proto::cli::cli_service_client::CliServiceClient;
use curve_proto::common::Peer;
use parking_lot::Mutex;
use tonic::transport::Channel;

/// Connections to chunkservers.
#[derive(Debug, Default)]
pub struct Connections {
    channels: Mutex<HashMap<String, Channel>>,
    /// When each address last answered anything.
    answered: Mutex<HashMap<String, std::time::Instant>>,
}

impl Connections {
    /// A channel to `addr` (lazily connected, reconnecting on its own).
    pub fn channel(&self, addr: &str) -> Channel {
        let mut m = self.channels.lock();
        if let Some(c) = m.get(addr) {
            return c.clone();
        }
        let ch = curve_auth::tls::endpoint(addr)
            .expect("host:port makes a URI")
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        m.insert(addr.to_string(), ch.clone());
        ch
    }

    /// Notes that `addr` answered.
    pub fn answered(&self, addr: &str) {
        let now = std::time::Instant::now();
        let mut m = self.answered.lock();
        match m.get_mut(addr) {
            Some(t) => *t = now,
            None => {
                m.insert(addr.to_string(), now);
            }
        }
    }

    /// Forgets the connection to `addr` if nothing came back on it since `since` (the start of
    /// a request that timed out): the next request opens a new one. The silent one may be deep
    /// in TCP's retransmission backoff (a link that was down: the next retransmission seconds
    /// away), while a new connection is tried at once; requests still on it finish there. A
    /// connection that answers other requests is only slow (a loaded server), and is kept.
    pub fn reset_if_silent(&self, addr: &str, since: std::time::Instant) {
        if self.answered.lock().get(addr).is_some_and(|t| *t >= since) {
            return;
        }
        self.channels.lock().remove(addr);
    }

    /// A ChunkService client of `addr`.
    pub fn chunk(&self, addr: &str) -> ChunkServiceClient<Channel> {
        ChunkServiceClient::new(self.channel(addr))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
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
            let mut c = CliServiceClient::new(self.channel(&p.address));
            let asked = std::time::Instant::now();
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
                    self.answered(&p.address);
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
