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

    /// Forgets the connection to `addr`: the next request opens a new one. After a timeout,
    /// the old one may be deep in TCP's retransmission backoff (a link that was down: the
    /// next retransmission seconds away), while a new connection is tried at once; requests
    /// still on the old one finish there.
    pub fn reset(&self, addr: &str) {
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
                    if let Some(l) = r.into_inner().leader.filter(|l| !l.address.is_empty()) {
                        return Some(l.address);
                    }
                }
                Err(_) => self.reset(&p.address),
                Ok(Err(_)) => {}
            }
        }
        None
    }
}
