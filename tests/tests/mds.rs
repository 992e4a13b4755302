//! The MDS as a real process: the namespace and its bad input on the embedded store and on
//! a real etcd, surviving kill -9; three MDS on etcd with one leader, kill -9 of the leader,
//! a client with all three addresses carrying on; and a chunkserver killed for longer than
//! the offline timeout having its copysets rebuilt on the others.

use std::time::{Duration, Instant};

use curve_client::{MdsClient, MdsError};
use curve_proto::heartbeat::heartbeat_service_client::HeartbeatServiceClient;
use curve_proto::heartbeat::{HeartbeatRequest, HeartbeatStatus, RegisterRequest};
use curve_proto::mds::mds_service_client::MdsServiceClient;
use curve_proto::mds::{FileStatus, FileType, MdsStatus, PathRequest};
use curve_tests::cluster::{Chunkserver, Etcd, Mds};

fn status(r: Result<impl std::fmt::Debug, MdsError>) -> Option<MdsStatus> {
    match r {
        Ok(_) => Some(MdsStatus::Ok),
        Err(e) => e.status(),
    }
}

const G: u64 = 1 << 30;

/// Namespace, sessions and bad input against one MDS, then kill -9 and restart: it all
/// survives.
async fn namespace_scenario(mds: &mut Mds) {
    let c = MdsClient::new(vec![mds.addr.clone()]);
    let vol = FileType::Volume;
    let dir = FileType::Directory;
    c.create("/vms", dir, 0, 0, "alice").await.unwrap();
    let v = c
        .create("/vms/disk0", vol, 10 * G, 0, "alice")
        .await
        .unwrap();
    assert_eq!(
        (v.length, v.block_size, v.path.as_str()),
        (10 * G, 4096, "/vms/disk0")
    );
    c.create("/vms/disk512", vol, 4096 * 3, 512, "alice")
        .await
        .unwrap();
    // Bad input: clear status codes.
    let bad = [
        (
            c.create("/vms/disk0", vol, G, 0, "alice").await.err(),
            MdsStatus::Exists,
        ),
        (
            c.create("/vms/x", vol, 0, 0, "alice").await.err(),
            MdsStatus::Invalid,
        ),
        (
            c.create("/vms/x", vol, 1000, 0, "alice").await.err(),
            MdsStatus::Invalid,
        ),
        (
            c.create("/vms/x", vol, G, 1024, "alice").await.err(),
            MdsStatus::Invalid,
        ),
        (
            c.create("vms/x", vol, G, 0, "alice").await.err(),
            MdsStatus::Invalid,
        ),
        (
            c.create("/none/x", vol, G, 0, "alice").await.err(),
            MdsStatus::NotFound,
        ),
        (
            c.create("/vms/disk0/x", vol, G, 0, "alice").await.err(),
            MdsStatus::NotDirectory,
        ),
        (
            c.open("/vms/missing", "alice", "t").await.err(),
            MdsStatus::NotFound,
        ),
        (
            c.open("/vms/disk0", "mallory", "t").await.err(),
            MdsStatus::AuthFailed,
        ),
        (
            c.open("/vms", "alice", "t").await.err(),
            MdsStatus::NotAVolume,
        ),
    ];
    for (i, (got, want)) in bad.iter().enumerate() {
        assert_eq!(
            got.as_ref().and_then(|e| e.status()),
            Some(*want),
            "case {i}: {got:?}"
        );
    }
    assert_eq!(
        status(c.extend("/vms/disk0", 5 * G, "alice").await),
        Some(MdsStatus::ShrinkRefused)
    );
    assert_eq!(
        status(c.extend("/vms/disk0", 20 * G, "alice").await),
        Some(MdsStatus::Ok)
    );
    // A striped volume: its layout kept, bad layouts refused, and refused to a client older
    // than striping (which would read and write it unstriped).
    let st = c
        .create_striped("/vms/striped", G, 0, (1 << 20, 4), "alice")
        .await
        .unwrap();
    assert_eq!((st.stripe_unit, st.stripe_count), (1 << 20, 4));
    for layout in [(3 << 20, 4), (1 << 20, 0), (1 << 20, 1000), (1 << 30, 2)] {
        assert_eq!(
            status(c.create_striped("/vms/y", G, 0, layout, "alice").await),
            Some(MdsStatus::Invalid),
            "{layout:?}"
        );
    }
    let mut raw = MdsServiceClient::connect(format!("http://{}", mds.addr))
        .await
        .unwrap();
    let old = raw
        .open_file(curve_proto::mds::OpenFileRequest {
            path: "/vms/striped".into(),
            owner: "alice".into(),
            client: "an old client".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.status, MdsStatus::Invalid as i32, "{old:?}");
    assert!(old.message.contains("upgrade"), "{}", old.message);
    let (info, s, _) = c.open("/vms/striped", "alice", "new").await.unwrap();
    assert_eq!(info.stripe_count, 4);
    c.close("/vms/striped", &s.session_id).await.unwrap();

    // Exclusive open, lease refresh, close.
    let (info, s, _) = c.open("/vms/disk0", "alice", "host-a").await.unwrap();
    assert_eq!(info.length, 20 * G);
    assert_eq!(s.epoch, 1);
    assert_eq!(
        status(c.open("/vms/disk0", "alice", "host-b").await),
        Some(MdsStatus::Occupied)
    );
    c.refresh("/vms/disk0", &s.session_id).await.unwrap();
    assert_eq!(
        status(c.refresh("/vms/disk0", "forged").await),
        Some(MdsStatus::SessionExpired)
    );
    // Renaming an open volume, or a directory above one, is refused (clients use paths).
    assert_eq!(
        status(c.rename("/vms/disk0", "/moved", "alice").await),
        Some(MdsStatus::Occupied)
    );
    assert_eq!(
        status(c.rename("/vms", "/vms2", "alice").await),
        Some(MdsStatus::Occupied)
    );
    // Deleting an open volume is refused.
    assert_eq!(
        status(c.delete("/vms/disk0", "alice", false).await),
        Some(MdsStatus::Occupied)
    );
    c.close("/vms/disk0", &s.session_id).await.unwrap();
    // Segments: none allocated yet (reads are zeros); no copysets to allocate from yet.
    assert!(
        c.segment("/vms/disk0", "alice", 0, false)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        status(c.segment("/vms/disk0", "alice", 0, true).await),
        Some(MdsStatus::NoSpace)
    );
    assert_eq!(
        status(c.segment("/vms/disk0", "alice", 30 * G, false).await),
        Some(MdsStatus::Invalid)
    );
    // Delete to the recycle bin, recover, delete again; a directory that is not empty stays.
    assert_eq!(
        status(c.delete("/vms", "alice", false).await),
        Some(MdsStatus::NotEmpty)
    );
    let gone = c.delete("/vms/disk512", "alice", false).await.unwrap();
    assert_eq!(gone.status, FileStatus::Deleted as i32);
    let bin = c.list("/RecycleBin").await.unwrap();
    assert_eq!(bin.len(), 1);
    assert_eq!(bin[0].path, "/vms/disk512");
    let recovered = c.recover("/vms/disk512", "alice").await.unwrap();
    assert_eq!(recovered.path, "/vms/disk512");
    assert_eq!(c.stat("/vms/disk512").await.unwrap().block_size, 512);
    // Rename.
    c.rename("/vms/disk512", "/small", "alice").await.unwrap();
    let names: Vec<String> = c
        .list("/")
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, vec!["RecycleBin", "small", "vms"]);

    // A forged chunkserver token is refused; a bad registration too.
    let mut hb = HeartbeatServiceClient::connect(format!("http://{}", mds.addr))
        .await
        .unwrap();
    let r = hb
        .heartbeat(HeartbeatRequest {
            chunkserver_id: 1,
            token: "forged".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, HeartbeatStatus::HbUnauthorized as i32);
    let r = hb
        .register(RegisterRequest {
            address: "not an address".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, HeartbeatStatus::HbInvalid as i32, "{}", r.leader);

    // kill -9 and restart: everything is still there, the epoch keeps growing.
    mds.kill9();
    mds.restart();
    let c = MdsClient::new(vec![mds.addr.clone()]);
    assert_eq!(c.stat("/vms/disk0").await.unwrap().length, 20 * G);
    assert_eq!(c.stat("/small").await.unwrap().block_size, 512);
    let st = c.stat("/vms/striped").await.unwrap();
    assert_eq!(
        (st.stripe_unit, st.stripe_count),
        (1 << 20, 4),
        "layouts survive"
    );
    let (_, s, _) = c.open("/vms/disk0", "alice", "host-b").await.unwrap();
    assert_eq!(
        s.epoch, 2,
        "epochs survive restarts (old writers stay fenced)"
    );
    assert_eq!(
        status(c.open("/vms/disk0", "alice", "host-c").await),
        Some(MdsStatus::Occupied)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_and_bad_input_on_the_embedded_store_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let mut mds = Mds::start(&tmp.path().join("mds"), &[]);
    namespace_scenario(&mut mds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_and_bad_input_on_etcd_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(tmp.path());
    let mut mds = Mds::start(&tmp.path().join("mds"), &["--etcd", &etcd.endpoint]);
    namespace_scenario(&mut mds).await;
    assert!(
        mds.log().contains("store=\"etcd\"") || mds.log().contains("store=etcd"),
        "{}",
        mds.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_mds_on_etcd_one_leader_and_kill_9_of_the_leader() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(tmp.path());
    let args = ["--etcd", &etcd.endpoint, "--election-ttl-s", "2"];
    let mut mdss: Vec<Mds> = (0..3)
        .map(|i| Mds::start(&tmp.path().join(format!("mds{i}")), &args))
        .collect();
    let addrs: Vec<String> = mdss.iter().map(|m| m.addr.clone()).collect();
    let c = MdsClient::new(addrs.clone());
    c.create("/v1", FileType::Volume, G, 0, "alice")
        .await
        .unwrap();
    let leader = c.current().await;
    // The followers answer NOT_LEADER naming the leader (once they have read it from etcd:
    // a follower polls the election, so it may answer with no name for a moment).
    for a in addrs.iter().filter(|a| **a != leader) {
        let mut m = MdsServiceClient::connect(format!("http://{a}"))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = m
                .stat_file(PathRequest {
                    path: "/v1".into(),
                    owner: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.status, MdsStatus::NotLeader as i32);
            if r.leader == leader {
                break;
            }
            assert!(
                r.leader.is_empty() && Instant::now() < deadline,
                "a follower names the leader {leader} within 10 s: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // kill -9 of the leader: another one serves within a few seconds, with the namespace.
    let idx = addrs.iter().position(|a| *a == leader).unwrap();
    mdss[idx].kill9();
    let t = Instant::now();
    c.create("/v2", FileType::Volume, G, 0, "alice")
        .await
        .unwrap();
    let took = t.elapsed();
    println!("a new MDS leader served after {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    let new_leader = c.current().await;
    assert_ne!(new_leader, leader);
    assert_eq!(c.stat("/v1").await.unwrap().length, G);
    // The old leader comes back as a follower.
    mdss[idx].restart();
    let mut m = MdsServiceClient::connect(format!("http://{leader}"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = m
            .stat_file(PathRequest {
                path: "/v2".into(),
                owner: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if r.status == MdsStatus::NotLeader as i32 && r.leader == new_leader {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted MDS follows: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The copysets as the MDS sees them: (id, peers, leader).
async fn copysets(c: &MdsClient) -> Vec<(u32, Vec<u32>, Option<u32>)> {
    let t = c.topology().await.unwrap();
    t.copysets
        .iter()
        .map(|cs| {
            let mut peers: Vec<u32> = cs.peers.iter().map(|p| p.chunkserver_id).collect();
            peers.sort_unstable();
            (
                cs.copyset_id,
                peers,
                cs.leader.as_ref().map(|l| l.chunkserver_id),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_chunkserver_has_its_copysets_rebuilt_on_the_others() {
    use curve_proto::chunk::chunk_service_client::ChunkServiceClient;
    use curve_proto::chunk::{ChunkRequest, ChunkStatus};
    use curve_proto::copyset::GetCopysetStatusRequest;
    use curve_proto::copyset::copyset_service_client::CopysetServiceClient;

    let tmp = tempfile::tempdir().unwrap();
    // Four servers in four zones, one chunkserver each: copysets are placed once all four
    // registered.
    let mut topo =
        String::from("[[pool]]\nname = \"pool1\"\nreplicas = 3\ncopysets_per_chunkserver = 3\n");
    for i in 1..=4 {
        topo.push_str(&format!(
            "[[server]]\nname = \"s{i}\"\nzone = \"z{i}\"\npool = \"pool1\"\n"
        ));
    }
    let topo_path = tmp.path().join("topology.toml");
    std::fs::write(&topo_path, topo).unwrap();
    let mds = Mds::start(
        &tmp.path().join("mds"),
        &[
            "--topology",
            topo_path.to_str().unwrap(),
            "--unstable-timeout-ms",
            "1000",
            "--offline-timeout-ms",
            "3000",
            "--schedule-ms",
            "200",
            "--no-balance",
        ],
    );
    let cs_args = [
        "--heartbeat-ms",
        "200",
        "--election-ms",
        "300",
        "--chunk-size",
        "1048576",
        "--pool-target",
        "2",
    ];
    let mut css: Vec<Chunkserver> = (1..=4)
        .map(|i| {
            Chunkserver::start(
                &tmp.path().join(format!("cs{i}")),
                std::slice::from_ref(&mds.addr),
                &format!("z{i}"),
                &format!("s{i}"),
                &cs_args,
            )
        })
        .collect();
    let c = MdsClient::new(vec![mds.addr.clone()]);
    // 4 copysets (4 x 3 / 3), each with a leader reported.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sets = loop {
        let sets = copysets(&c).await;
        if sets.len() == 4 && sets.iter().all(|s| s.2.is_some()) {
            break sets;
        }
        assert!(
            Instant::now() < deadline,
            "copysets not created: {sets:?}\n{}",
            mds.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let t = c.topology().await.unwrap();
    let addr_of = |id: u32| {
        t.chunkservers
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.address.clone())
            .unwrap()
    };
    for cs in &t.chunkservers {
        assert_eq!(cs.copysets, 3, "balanced placement: {:?}", t.chunkservers);
    }
    // One write per copyset, through its leader (following a redirect: under load the
    // leadership may move meanwhile).
    let write = |copyset: u32, leader: u32| {
        let mut addr = addr_of(leader).to_string();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut ch = ChunkServiceClient::connect(format!("http://{addr}"))
                    .await
                    .unwrap();
                let r = ch
                    .write_chunk(ChunkRequest {
                        logical_pool_id: 1,
                        copyset_id: copyset,
                        chunk_id: 100 + u64::from(copyset),
                        offset: 0,
                        size: 4096,
                        data: vec![copyset as u8; 4096].into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if r.status == ChunkStatus::Success as i32 {
                    return;
                }
                if let Some(p) = r.redirect.as_ref().filter(|p| !p.address.is_empty()) {
                    addr.clone_from(&p.address);
                }
                assert!(
                    Instant::now() < deadline,
                    "write to copyset {copyset}: {r:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for (id, _, leader) in &sets {
        write(*id, leader.unwrap()).await;
    }
    // kill -9 a chunkserver holding three copysets; beyond the offline timeout the MDS adds a
    // peer on the fourth chunkserver to each, then removes the dead one.
    let dead = 2u32;
    let dead_idx = css.iter().position(|c| addr_of(dead) == c.addr).unwrap();
    css[dead_idx].kill9();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(90);
    loop {
        let sets = copysets(&c).await;
        let topo = c.topology().await.unwrap();
        let healthy = sets.iter().all(|(_, peers, leader)| {
            peers.len() == 3 && !peers.contains(&dead) && leader.is_some_and(|l| l != dead)
        });
        if healthy && topo.operators == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "copysets not rebuilt: {sets:?} ops {}\n{}",
            topo.operators,
            mds.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("copysets rebuilt {:?} after the kill", t0.elapsed());
    let t = c.topology().await.unwrap();
    let dead_state = t.chunkservers.iter().find(|c| c.id == dead).unwrap().state;
    assert_eq!(dead_state, curve_proto::mds::OnlineState::Offline as i32);
    // Every peer of every copyset has it, with the same configuration, and has applied the
    // write; the data reads back through the leader.
    for (id, peers, leader) in copysets(&c).await {
        for p in &peers {
            let mut cc = CopysetServiceClient::connect(format!("http://{}", addr_of(*p)))
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let s = cc
                    .get_copyset_status(GetCopysetStatusRequest {
                        logical_pool_id: 1,
                        copyset_id: id,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let mut got: Vec<u32> = s.peers.iter().map(|p| p.chunkserver_id).collect();
                got.sort_unstable();
                if s.status == 0 && got == peers && s.applied_index >= 2 {
                    break;
                }
                assert!(Instant::now() < deadline, "copyset {id} on {p}: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let mut ch = ChunkServiceClient::connect(format!("http://{}", addr_of(leader.unwrap())))
            .await
            .unwrap();
        let r = ch
            .read_chunk(ChunkRequest {
                logical_pool_id: 1,
                copyset_id: id,
                chunk_id: 100 + u64::from(id),
                offset: 0,
                size: 4096,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ChunkStatus::Success as i32, "{r:?}");
        assert_eq!(r.data, vec![id as u8; 4096]);
    }
}
