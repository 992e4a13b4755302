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
    let extend = |len| {
        let c = &c;
        async move {
            c.call(|mut m| async move {
                m.extend_file(curve_proto::mds::ExtendFileRequest {
                    path: "/vms/disk0".into(),
                    new_length: len,
                    owner: "alice".into(),
                })
                .await
            })
            .await
        }
    };
    assert_eq!(status(extend(5 * G).await), Some(MdsStatus::ShrinkRefused));
    assert_eq!(status(extend(20 * G).await), Some(MdsStatus::Ok));
    // Exclusive open, lease refresh, close.
    let (info, s) = c.open("/vms/disk0", "alice", "host-a").await.unwrap();
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
    // Deleting an open volume is refused.
    let del = |path: &'static str, force| {
        let c = &c;
        async move {
            c.call(|mut m| async move {
                m.delete_file(curve_proto::mds::DeleteFileRequest {
                    path: path.into(),
                    owner: "alice".into(),
                    force,
                })
                .await
            })
            .await
        }
    };
    assert_eq!(
        status(del("/vms/disk0", false).await),
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
    assert_eq!(status(del("/vms", false).await), Some(MdsStatus::NotEmpty));
    let gone = c.call(|mut m| async move {
        m.delete_file(curve_proto::mds::DeleteFileRequest {
            path: "/vms/disk512".into(),
            owner: "alice".into(),
            force: false,
        })
        .await
    });
    let gone = gone.await.unwrap().info.unwrap();
    assert_eq!(gone.status, FileStatus::Deleted as i32);
    let bin = c.list("/RecycleBin").await.unwrap();
    assert_eq!(bin.len(), 1);
    assert_eq!(bin[0].path, "/vms/disk512");
    let recovered = c.call(|mut m| async move {
        m.recover_file(curve_proto::mds::RecycleRequest {
            path: "/vms/disk512".into(),
            owner: "alice".into(),
        })
        .await
    });
    assert_eq!(recovered.await.unwrap().info.unwrap().path, "/vms/disk512");
    assert_eq!(c.stat("/vms/disk512").await.unwrap().block_size, 512);
    // Rename.
    c.call(|mut m| async move {
        m.rename_file(curve_proto::mds::RenameFileRequest {
            from: "/vms/disk512".into(),
            to: "/small".into(),
            owner: "alice".into(),
        })
        .await
    })
    .await
    .unwrap();
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
    let (_, s) = c.open("/vms/disk0", "alice", "host-b").await.unwrap();
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
    // The followers answer NOT_LEADER naming the leader.
    for a in addrs.iter().filter(|a| **a != leader) {
        let mut m = MdsServiceClient::connect(format!("http://{a}"))
            .await
            .unwrap();
        let r = m
            .stat_file(PathRequest {
                path: "/v1".into(),
                owner: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, MdsStatus::NotLeader as i32);
        assert_eq!(r.leader, leader, "a follower names the leader");
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
