//! Chunkserver benchmark: three chunkservers (in this process, on loopback gRPC, data on the
//! disk under the given directory), one copyset, 4K writes through its leader:
//! QD1 mean latency and QD32 IOPS, the raft log's fsync batching, and next to them the floor
//! of the same run: one 4K write + fdatasync on the same disk.
//!
//!   cargo run --release -p curve-chunkserver --example chunk_bench -- [DIR] [SECONDS]

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use curve_chunkserver::chunkfilepool::{ChunkFilePool, PoolOptions};
use curve_chunkserver::copyset::{CopysetNodeManager, CopysetOptions};
use curve_chunkserver::datastore::META_PAGE;
use curve_chunkserver::raftlog::fsync_stats;
use curve_chunkserver::service::ChunkServerServices;
use curve_proto::chunk::chunk_service_client::ChunkServiceClient;
use curve_proto::chunk::chunk_service_server::ChunkServiceServer;
use curve_proto::chunk::{ChunkRequest, ChunkStatus};
use curve_proto::copyset::copyset_service_server::CopysetServiceServer;
use curve_proto::raft::raft_service_server::RaftServiceServer;
use openraft::BasicNode;

const CHUNK: u64 = 16 << 20;

async fn start(id: u64, dir: &std::path::Path) -> (String, Arc<CopysetNodeManager>) {
    let pool = ChunkFilePool::open(
        &dir.join("pool"),
        PoolOptions {
            file_size: CHUNK + META_PAGE,
            target: 8,
        },
    )
    .unwrap();
    let manager = Arc::new(
        CopysetNodeManager::new(
            id,
            &dir.join("copysets"),
            pool,
            CopysetOptions {
                chunk_size: CHUNK,
                ..CopysetOptions::default()
            },
        )
        .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let svc = ChunkServerServices::new(manager.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftServiceServer::new(svc.clone()))
            .add_service(ChunkServiceServer::new(svc.clone()))
            .add_service(CopysetServiceServer::new(svc))
            .serve_with_incoming(curve_chunkserver::service::incoming(listener)),
    );
    (addr, manager)
}

fn request(i: u64) -> ChunkRequest {
    ChunkRequest {
        logical_pool_id: 1,
        copyset_id: 1,
        chunk_id: i % 8,
        offset: (i.wrapping_mul(7919) % (CHUNK / 4096)) * 4096,
        size: 4096,
        data: vec![i as u8; 4096].into(),
        ..Default::default()
    }
}

/// Writes, following redirects and retrying transient failures as the client library does.
async fn write(c: &mut ChunkServiceClient<tonic::transport::Channel>, req: ChunkRequest) {
    for _ in 0..1000 {
        let r = c.write_chunk(req.clone()).await.unwrap().into_inner();
        if r.status == ChunkStatus::Success as i32 {
            return;
        }
        if let Some(l) = r.redirect.filter(|l| !l.address.is_empty()) {
            *c = ChunkServiceClient::connect(format!("http://{}", l.address))
                .await
                .unwrap();
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    panic!("a write could not complete");
}

fn fdatasync_floor(dir: &std::path::Path, secs: f64) -> f64 {
    let path = dir.join("fsync-floor");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&vec![0u8; 16 << 20]).unwrap();
    f.sync_all().unwrap();
    let buf = vec![1u8; 4096];
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (mut n, t) = (0u64, Instant::now());
    while Instant::now() < deadline {
        f.write_all_at(&buf, (n % 4096) * 4096).unwrap();
        f.sync_data().unwrap();
        n += 1;
    }
    let _ = std::fs::remove_file(&path);
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::current_dir().unwrap());
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        nodes.push(start(id, &tmp.path().join(format!("cs{id}"))).await);
    }
    let peers: std::collections::BTreeMap<u64, BasicNode> = nodes
        .iter()
        .enumerate()
        .map(|(i, (a, _))| (i as u64 + 1, BasicNode::new(a)))
        .collect();
    for (_, m) in &nodes {
        m.create(1, 1, peers.clone()).await.unwrap();
    }
    let leader = loop {
        if let Some(l) = nodes[0]
            .1
            .get(1, 1)
            .unwrap()
            .raft
            .metrics()
            .borrow()
            .current_leader
        {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let addr = nodes[(leader - 1) as usize].0.clone();
    let client = ChunkServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    // Warm up: create the chunks.
    for i in 0..64 {
        write(&mut client.clone(), request(i)).await;
    }

    // QD1.
    let mut c = client.clone();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (mut n, t) = (0u64, Instant::now());
    while Instant::now() < deadline {
        write(&mut c, request(n)).await;
        n += 1;
    }
    let qd1_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    // QD32.
    let done = Arc::new(AtomicU64::new(0));
    let (f0, a0, e0) = fsync_stats();
    let t = Instant::now();
    let deadline = t + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..32u64)
        .map(|k| {
            let mut c = client.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut i = k * 1_000_000;
                while Instant::now() < deadline {
                    write(&mut c, request(i)).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = t.elapsed().as_secs_f64();
    let iops = done.load(Ordering::Relaxed) as f64 / elapsed;
    let (f1, a1, e1) = fsync_stats();
    let fsyncs = (f1 - f0) as f64 / elapsed;
    let per = (a1 - a0) as f64 / (f1 - f0).max(1) as f64;
    let entries = (e1 - e0) as f64 / (a1 - a0).max(1) as f64;
    let floor = fdatasync_floor(tmp.path(), secs.min(3.0));
    println!("| measure | value |");
    println!("|---|---|");
    println!("| 4K write QD1 mean latency (3 replicas, through the leader) | {qd1_us:.0} us |");
    println!("| 4K write QD32 | {:.1}k IOPS |", iops / 1e3);
    println!(
        "| raft log fsyncs during QD32 (3 logs) | {fsyncs:.0}/s, {per:.1} appends per fsync, {entries:.1} entries per append |"
    );
    println!("| floor: 4K write + fdatasync on the same disk | {floor:.0} us |");
    for (_, m) in &nodes {
        m.shutdown().await;
    }
}
