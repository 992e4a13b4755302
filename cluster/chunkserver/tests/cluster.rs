//! Three chunkservers in one process, over real loopback sockets: a copyset replicated by
//! raft, client I/O through its leader, redirects from followers, bad input statuses.

use std::sync::Arc;
use std::time::Duration;

use curve_chunkserver::chunkfilepool::{ChunkFilePool, PoolOptions};
use curve_chunkserver::copyset::{CopysetNodeManager, CopysetOptions};
use curve_chunkserver::datastore::META_PAGE;
use curve_chunkserver::service::ChunkServerServices;
use curve_proto::chunk::chunk_service_client::ChunkServiceClient;
use curve_proto::chunk::chunk_service_server::ChunkServiceServer;
use curve_proto::chunk::{ChunkRequest, ChunkStatus};
use curve_proto::cli::cli_service_client::CliServiceClient;
use curve_proto::cli::cli_service_server::CliServiceServer;
use curve_proto::cli::{CliRequest, CliStatus};
use curve_proto::common::Peer;
use curve_proto::copyset::copyset_service_client::CopysetServiceClient;
use curve_proto::copyset::copyset_service_server::CopysetServiceServer;
use curve_proto::copyset::{CopysetSpec, CreateCopysetRequest, GetCopysetStatusRequest};
use curve_proto::raft::raft_service_server::RaftServiceServer;
use tonic::transport::Channel;

const CHUNK: u64 = 64 << 10;

struct Node {
    id: u32,
    addr: String,
    manager: Arc<CopysetNodeManager>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

async fn start(id: u32) -> Node {
    start_with(id, curve_chunkserver::service::DEFAULT_MAX_INFLIGHT).await
}

async fn start_with(id: u32, max_inflight: usize) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let pool = ChunkFilePool::open(
        &dir.path().join("pool"),
        PoolOptions {
            file_size: CHUNK + META_PAGE,
            target: 4,
        },
    )
    .unwrap();
    let opts = CopysetOptions {
        chunk_size: CHUNK,
        page_size: 4096,
        segment_size: 1 << 20,
        heartbeat_ms: 100,
        election_ms: (500, 1000),
        ring: None,
    };
    let manager = Arc::new(
        CopysetNodeManager::new(u64::from(id), &dir.path().join("copysets"), pool, opts).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let svc = ChunkServerServices::with_limit(manager.clone(), max_inflight);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftServiceServer::new(svc.clone()))
            .add_service(ChunkServiceServer::new(svc.clone()))
            .add_service(CliServiceServer::new(svc.clone()))
            .add_service(CopysetServiceServer::new(svc))
            .serve_with_incoming_shutdown(curve_chunkserver::service::incoming(listener), async {
                let _ = rx.await;
            }),
    );
    Node {
        id,
        addr,
        manager,
        stop: Some(tx),
        _dir: dir,
    }
}

async fn chunk_client(addr: &str) -> ChunkServiceClient<Channel> {
    ChunkServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn write_req(copyset: u32, chunk: u64, offset: u64, data: Vec<u8>, epoch: u64) -> ChunkRequest {
    ChunkRequest {
        logical_pool_id: 1,
        copyset_id: copyset,
        chunk_id: chunk,
        offset,
        size: data.len() as u32,
        data: data.into(),
        epoch,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_serve_through_the_leader() {
    let mut nodes = copyset_of_three().await;
    // A leader is elected, and every replica agrees on it (twice, 300 ms apart).
    let all: Vec<&Node> = nodes.iter().collect();
    let agreed = || leader_seen_by(&all);
    let mut leader = None;
    for _ in 0..400 {
        if let Some(l) = agreed() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if agreed() == Some(l) {
                leader = Some(l);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let leader = leader.expect("a leader within 10 s") as u32;
    let leader_node = nodes.iter().find(|n| n.id == leader).unwrap();
    let follower = nodes.iter().find(|n| n.id != leader).unwrap();

    // A follower redirects to the leader.
    let mut fc = chunk_client(&follower.addr).await;
    let r = fc
        .write_chunk(write_req(1, 7, 0, vec![1; 4096], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ChunkStatus::Redirected as i32);
    let to = r.redirect.unwrap();
    assert_eq!(
        (to.chunkserver_id, to.address.as_str()),
        (leader, leader_node.addr.as_str())
    );

    // The leader takes writes and serves reads.
    let mut lc = chunk_client(&leader_node.addr).await;
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
    let r = lc
        .write_chunk(write_req(1, 7, 4096, data.clone(), 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ChunkStatus::Success as i32);
    let mut read = write_req(1, 7, 4096, Vec::new(), 5);
    read.size = 8192;
    let r = lc.read_chunk(read.clone()).await.unwrap().into_inner();
    assert_eq!(r.status, ChunkStatus::Success as i32);
    assert_eq!(r.data, data);
    let r = fc.read_chunk(read.clone()).await.unwrap().into_inner();
    assert_eq!(
        r.status,
        ChunkStatus::Redirected as i32,
        "followers do not serve reads"
    );

    // Every replica has the data once applied.
    for n in &nodes {
        let store = n.manager.get(1, 1).unwrap().store().clone();
        let mut back = vec![0u8; 8192];
        let mut ok = false;
        for _ in 0..200 {
            if store.read_chunk(7, 4096, &mut back).is_ok() && back == data {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ok, "replica {} did not apply the write", n.id);
    }

    // Bad input gets status codes; the servers keep serving.
    let bad = [
        (
            write_req(1, 7, 100, vec![0; 4096], 5),
            ChunkStatus::InvalidRequest,
        ),
        (
            write_req(1, 7, 0, vec![0; 100], 5),
            ChunkStatus::InvalidRequest,
        ),
        (
            write_req(1, 7, CHUNK, vec![0; 4096], 5),
            ChunkStatus::InvalidRequest,
        ),
        (
            write_req(9, 7, 0, vec![0; 4096], 5),
            ChunkStatus::CopysetNotexist,
        ),
        (
            write_req(1, 7, 0, vec![0; 4096], 3),
            ChunkStatus::EpochTooOld,
        ),
    ];
    for (req, want) in bad {
        let r = lc.write_chunk(req).await.unwrap().into_inner();
        assert_eq!(r.status, want as i32);
    }
    let mut missing = read.clone();
    missing.chunk_id = 999;
    assert_eq!(
        lc.read_chunk(missing).await.unwrap().into_inner().status,
        ChunkStatus::ChunkNotexist as i32
    );
    let r = lc.read_chunk(read).await.unwrap().into_inner();
    assert_eq!(r.data, data, "the refused writes changed nothing");

    // Copyset status names the leader and the three peers.
    let mut c = CopysetServiceClient::connect(format!("http://{}", follower.addr))
        .await
        .unwrap();
    let s = c
        .get_copyset_status(GetCopysetStatusRequest {
            logical_pool_id: 1,
            copyset_id: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.leader.unwrap().chunkserver_id, leader);
    assert_eq!(s.peers.len(), 3);

    for n in &mut nodes {
        n.manager.shutdown().await;
        let _ = n.stop.take().unwrap().send(());
    }
}

async fn create(node: &Node, peers: Vec<Peer>) {
    create_copyset(node, 1, peers).await
}

async fn create_copyset(node: &Node, copyset: u32, peers: Vec<Peer>) {
    let mut c = CopysetServiceClient::connect(format!("http://{}", node.addr))
        .await
        .unwrap();
    let r = c
        .create_copyset_node(CreateCopysetRequest {
            copysets: vec![CopysetSpec {
                logical_pool_id: 1,
                copyset_id: copyset,
                peers,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, 0, "{}", r.message);
}

fn peer(n: &Node) -> Peer {
    Peer {
        chunkserver_id: n.id,
        address: n.addr.clone(),
    }
}

/// Chunkservers 1, 2 and 3, each with copyset 1 of all three.
async fn copyset_of_three() -> Vec<Node> {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start(id).await);
    }
    let peers: Vec<Peer> = nodes.iter().map(peer).collect();
    for n in &nodes {
        create(n, peers.clone()).await;
    }
    nodes
}

fn leader_seen_by(nodes: &[&Node]) -> Option<u64> {
    leader_of_copyset(nodes, 1)
}

/// The leader of copyset `copyset` that every node agrees on.
fn leader_of_copyset(nodes: &[&Node], copyset: u32) -> Option<u64> {
    let seen: Vec<Option<u64>> = nodes
        .iter()
        .map(|n| {
            n.manager
                .get(1, copyset)
                .unwrap()
                .raft
                .metrics()
                .borrow()
                .current_leader
        })
        .collect();
    seen[0].filter(|l| seen.iter().all(|s| *s == Some(*l)))
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_remove_and_transfer_leader_and_data_follows() {
    let mut nodes = copyset_of_three().await;
    let all: Vec<&Node> = nodes.iter().collect();
    until("a leader", || leader_seen_by(&all).is_some()).await;
    let leader = leader_seen_by(&all).unwrap() as u32;
    let li = nodes.iter().position(|n| n.id == leader).unwrap();
    let mut lc = chunk_client(&nodes[li].addr).await;
    for chunk in 0..4u64 {
        let r = lc
            .write_chunk(write_req(1, chunk, 0, vec![chunk as u8 + 1; 4096], 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ChunkStatus::Success as i32);
    }
    // Snapshot and purge the leader's log: a new peer can only catch up from the snapshot.
    let raft = nodes[li].manager.get(1, 1).unwrap().raft.clone();
    raft.trigger().snapshot().await.unwrap();
    until("a snapshot", || raft.metrics().borrow().snapshot.is_some()).await;
    let upto = raft.metrics().borrow().snapshot.unwrap().index;
    raft.trigger().purge_log(upto).await.unwrap();
    until("the purge", || {
        raft.metrics()
            .borrow()
            .purged
            .is_some_and(|p| p.index >= upto)
    })
    .await;

    // AddPeer: a new, empty replica joins and receives the chunks.
    let n4 = start(4).await;
    create(&n4, Vec::new()).await;
    let mut cli = CliServiceClient::connect(format!("http://{}", nodes[li].addr))
        .await
        .unwrap();
    let req = |p: Peer| CliRequest {
        logical_pool_id: 1,
        copyset_id: 1,
        peer: Some(p),
        new_peers: Vec::new(),
    };
    let r = cli.add_peer(req(peer(&n4))).await.unwrap().into_inner();
    assert_eq!(r.status, CliStatus::CliOk as i32, "{}", r.message);
    let store4 = n4.manager.get(1, 1).unwrap().store().clone();
    until("the new peer's chunks", || {
        (0..4u64).all(|c| {
            let mut b = vec![0u8; 4096];
            store4.read_chunk(c, 0, &mut b).is_ok() && b == vec![c as u8 + 1; 4096]
        })
    })
    .await;
    // A follower asked to change the configuration names the leader.
    let fi = (li + 1) % 3;
    let mut fcli = CliServiceClient::connect(format!("http://{}", nodes[fi].addr))
        .await
        .unwrap();
    let r = fcli.add_peer(req(peer(&n4))).await.unwrap().into_inner();
    assert_eq!(r.status, CliStatus::CliNotLeader as i32);
    assert_eq!(r.leader.unwrap().chunkserver_id, leader);

    // RemovePeer: back to three voters.
    let r = cli
        .remove_peer(req(peer(&nodes[fi])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, CliStatus::CliOk as i32, "{}", r.message);
    let r = cli.get_leader(req(peer(&n4))).await.unwrap().into_inner();
    let mut ids: Vec<u32> = r.peers.iter().map(|p| p.chunkserver_id).collect();
    ids.sort_unstable();
    let mut want: Vec<u32> = nodes
        .iter()
        .filter(|n| n.id != nodes[fi].id)
        .map(|n| n.id)
        .chain([4])
        .collect();
    want.sort_unstable();
    assert_eq!(ids, want);

    // TransferLeader to the new peer; it then takes writes, and they reach the others.
    let r = cli
        .transfer_leader(req(peer(&n4)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, CliStatus::CliOk as i32, "{}", r.message);
    let voters: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.id != nodes[fi].id)
        .chain([&n4])
        .collect();
    until("the new leader", || leader_seen_by(&voters) == Some(4)).await;
    let mut c4 = chunk_client(&n4.addr).await;
    let r = c4
        .write_chunk(write_req(1, 9, 0, vec![0x99; 4096], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ChunkStatus::Success as i32);
    let store = nodes[li].manager.get(1, 1).unwrap().store().clone();
    until("the old leader applies the new leader's write", || {
        let mut b = vec![0u8; 4096];
        store.read_chunk(9, 0, &mut b).is_ok() && b == vec![0x99; 4096]
    })
    .await;
    for n in nodes.iter_mut().chain([&mut { n4 }]) {
        n.manager.shutdown().await;
        let _ = n.stop.take().unwrap().send(());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_inflight_limit_requests_get_overload() {
    // A limit of 0 refuses everything: the status a client must back off on.
    let mut n = start_with(1, 0).await;
    let mut c = chunk_client(&n.addr).await;
    let r = c
        .write_chunk(write_req(1, 1, 0, vec![0; 4096], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ChunkStatus::Overload as i32);
    let mut read = write_req(1, 1, 0, Vec::new(), 1);
    read.size = 4096;
    assert_eq!(
        c.read_chunk(read).await.unwrap().into_inner().status,
        ChunkStatus::Overload as i32
    );
    let _ = n.stop.take().unwrap().send(());
}

/// A chunkserver answers raft RPCs in protobuf and, for a peer of an older version, in bincode
/// (each reply in its request's encoding, saying it reads protobuf); a message that does not
/// decode is refused with InvalidArgument and the copyset keeps its leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raft_rpcs_are_answered_in_protobuf_and_in_bincode() {
    use curve_chunkserver::codec;
    use curve_proto::raft::raft_service_client::RaftServiceClient;
    use curve_proto::raft::{Encoding, RaftRequest};
    use openraft::raft::{VoteRequest, VoteResponse};

    let nodes = copyset_of_three().await;
    let all: Vec<&Node> = nodes.iter().collect();
    until("a leader all three see", || leader_seen_by(&all).is_some()).await;
    let leader = leader_seen_by(&all).unwrap();
    let follower = nodes.iter().find(|n| u64::from(n.id) != leader).unwrap();
    // The leader learnt from its followers' first replies that they read protobuf.
    until("the leader sends protobuf to its followers", || {
        nodes
            .iter()
            .filter(|n| u64::from(n.id) != leader)
            .all(|n| curve_chunkserver::network::sends_protobuf_to(&n.addr))
    })
    .await;
    let mut raft = RaftServiceClient::connect(format!("http://{}", follower.addr))
        .await
        .unwrap();
    // A stale candidate (term 0): refused, in either encoding.
    let stale = VoteRequest::<u64>::new(openraft::Vote::new(0, 9), None);
    let req = |payload: Vec<u8>, encoding: Encoding| RaftRequest {
        logical_pool_id: 1,
        copyset_id: 1,
        payload: payload.into(),
        encoding: encoding as i32,
    };
    let r = raft
        .vote(req(bincode::serialize(&stale).unwrap(), Encoding::Bincode))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.encoding, Encoding::Bincode as i32);
    assert_eq!(r.accepts, Encoding::Protobuf as i32);
    let answer: Result<VoteResponse<u64>, openraft::error::RaftError<u64>> =
        bincode::deserialize(&r.payload).unwrap();
    let answer = answer.unwrap();
    assert!(!answer.vote_granted);
    assert!(answer.vote.leader_id.term > 0);

    let r = raft
        .vote(req(codec::encode_vote(&stale), Encoding::Protobuf))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.encoding, Encoding::Protobuf as i32);
    let answer = codec::decode_vote_reply(r.payload).unwrap().unwrap();
    assert!(!answer.vote_granted);

    for (payload, encoding) in [
        (vec![0xff; 9], Encoding::Protobuf),
        (vec![0xff; 3], Encoding::Bincode),
    ] {
        let e = raft
            .append_entries(req(payload, encoding))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    }
    let mut bad = req(Vec::new(), Encoding::Protobuf);
    bad.encoding = 7;
    let e = raft.vote(bad).await.unwrap_err();
    assert!(e.message().contains("unknown raft encoding 7"), "{e}");
    // Still one leader, and writes go on through it.
    assert_eq!(leader_seen_by(&all), Some(leader));
    let leader_node = nodes.iter().find(|n| u64::from(n.id) == leader).unwrap();
    let w = chunk_client(&leader_node.addr)
        .await
        .write_chunk(write_req(1, 1, 0, vec![3; 4096], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.status, ChunkStatus::Success as i32);
}

/// The copysets of a chunkserver share one raft log stream: writes to several copysets at once
/// are made durable by fewer fdatasyncs than appends (group commit across copysets), and every
/// write reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copysets_share_one_log_stream_and_its_fsyncs() {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start(id).await);
    }
    let peers: Vec<Peer> = nodes.iter().map(peer).collect();
    const COPYSETS: u32 = 4;
    for c in 1..=COPYSETS {
        for n in &nodes {
            create_copyset(n, c, peers.clone()).await;
        }
    }
    let leader_of = |c: u32| -> Option<usize> {
        let l = leader_of_copyset(&nodes.iter().collect::<Vec<_>>(), c)?;
        nodes.iter().position(|n| u64::from(n.id) == l)
    };
    until("a leader of every copyset", || {
        (1..=COPYSETS).all(|c| leader_of(c).is_some())
    })
    .await;
    let before: Vec<(u64, u64)> = nodes.iter().map(stream_counts).collect();
    // 16 writes in flight to each copyset at once, each to its own 4 KiB block.
    let mut writes = Vec::new();
    for c in 1..=COPYSETS {
        let addr = nodes[leader_of(c).unwrap()].addr.clone();
        for i in 0..16u64 {
            let addr = addr.clone();
            writes.push(tokio::spawn(async move {
                let req = write_req(c, 1, i * 4096, vec![c as u8 + i as u8; 4096], 1);
                let r = through_the_leader(&addr, req, true).await;
                (c, i, r.status)
            }));
        }
    }
    for w in writes {
        let (c, i, status) = w.await.unwrap();
        assert_eq!(status, ChunkStatus::Success as i32, "copyset {c} write {i}");
    }
    let (mut fsyncs, mut appends) = (0, 0);
    for (n, b) in nodes.iter().zip(&before) {
        let (f, a) = stream_counts(n);
        fsyncs += f - b.0;
        appends += a - b.1;
    }
    println!("{appends} appends, {fsyncs} fsyncs on 3 chunkservers");
    assert!(appends >= 3 * 16, "every replica appended: {appends}");
    assert!(
        fsyncs < appends,
        "one fsync makes several appends durable: {fsyncs} fsyncs for {appends} appends"
    );
    for c in 1..=COPYSETS {
        let addr = nodes[leader_of(c).unwrap_or(0)].addr.clone();
        for i in 0..16u64 {
            let req = ChunkRequest {
                logical_pool_id: 1,
                copyset_id: c,
                chunk_id: 1,
                offset: i * 4096,
                size: 4096,
                epoch: 1,
                ..Default::default()
            };
            let r = through_the_leader(&addr, req, false).await;
            assert_eq!(r.status, ChunkStatus::Success as i32);
            assert!(
                r.data.iter().all(|b| *b == c as u8 + i as u8),
                "copyset {c} block {i}"
            );
        }
    }
    for n in &mut nodes {
        n.manager.shutdown().await;
        let _ = n.stop.take().unwrap().send(());
    }
}

/// A write (or read) sent to `addr`, following redirects (a leader may change meanwhile on a
/// loaded machine) for up to 10 s.
async fn through_the_leader(
    addr: &str,
    req: ChunkRequest,
    write: bool,
) -> curve_proto::chunk::ChunkResponse {
    let mut addr = addr.to_owned();
    for _ in 0..200 {
        let mut cl = chunk_client(&addr).await;
        let r = if write {
            cl.write_chunk(req.clone()).await
        } else {
            cl.read_chunk(req.clone()).await
        }
        .unwrap()
        .into_inner();
        if r.status == ChunkStatus::Success as i32 {
            return r;
        }
        if let Some(to) = r.redirect.as_ref().filter(|p| !p.address.is_empty()) {
            addr = to.address.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no success through the leader within 10 s");
}

/// (fsyncs, appends made durable) of a chunkserver's log stream.
fn stream_counts(n: &Node) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = n.manager.log_stream().stats();
    (s.fsyncs.load(Relaxed), s.flushed_appends.load(Relaxed))
}
