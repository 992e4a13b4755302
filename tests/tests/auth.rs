//! Authentication and authorization, tried as an attacker would: a second, unprivileged OS
//! user and gRPC clients without a key, with a wrong key, a revoked user's key, a replayed
//! request, a forged epoch, another volume's ticket, a DeleteChunk the MDS did not sign, raft
//! and copyset RPCs without the cluster key, a stolen ticket after its expiry and after the
//! volume was reopened. Each is refused with a clear status and counted in the metrics, while
//! the volume's owner writes and verifies on without an error.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use curve_auth::UserKey;
use curve_client::chunk::Connections;
use curve_client::{MdsClient, Volume, VolumeOptions};
use curve_proto::chunk::chunk_service_client::ChunkServiceClient;
use curve_proto::chunk::{ChunkRequest, ChunkStatus};
use curve_proto::copyset::copyset_service_client::CopysetServiceClient;
use curve_proto::copyset::{CopysetStatus, CreateCopysetRequest};
use curve_proto::mds::mds_service_client::MdsServiceClient;
use curve_proto::mds::{DeleteFileRequest, MdsStatus, PathRequest};
use curve_proto::raft::RaftRequest;
use curve_proto::raft::raft_service_client::RaftServiceClient;
use curve_tests::cluster::{Extras, MiniCluster};
use curve_tests::{Part2, bin, metric, require_tool, run_ok, scrape};

fn curve(key: Option<&Path>, mds: &str, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(bin("curve"));
    c.env_remove("CURVE_KEY_FILE").args(["--mds", mds]);
    if let Some(k) = key {
        c.arg("--key-file").arg(k);
    }
    c.args(args).output().unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn refused(out: std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should be refused ({what})");
    assert!(err.contains(what), "expected {what:?} in: {err}");
}

fn key(path: &Path) -> Arc<UserKey> {
    Arc::new(UserKey::load(path).unwrap())
}

/// A raw chunk request to `chunk` of the segment at offset 0 of a volume.
struct Target {
    leader: String,
    req: ChunkRequest,
}

async fn target(mds: &MdsClient, path: &str, owner: &str) -> Target {
    let seg = mds.segment(path, owner, 0, true).await.unwrap().unwrap();
    let c = &seg.chunks[0];
    let loc = mds
        .copysets(seg.logical_pool_id, &[c.copyset_id])
        .await
        .unwrap();
    let leader = loc[0].leader.as_ref().unwrap().address.clone();
    Target {
        leader,
        req: ChunkRequest {
            logical_pool_id: seg.logical_pool_id,
            copyset_id: c.copyset_id,
            chunk_id: c.chunk_id,
            offset: 0,
            size: 4096,
            grant: c.grant.clone(),
            ..Default::default()
        },
    }
}

/// Status of a raw write (or read) at the leader of the target's copyset (following
/// redirects).
async fn chunk_status(t: &Target, req: ChunkRequest, write: bool) -> ChunkStatus {
    let mut leader = t.leader.clone();
    for _ in 0..50 {
        let mut c = ChunkServiceClient::connect(format!("http://{leader}"))
            .await
            .unwrap();
        let r = if write {
            c.write_chunk(req.clone()).await
        } else {
            c.read_chunk(req.clone()).await
        }
        .unwrap()
        .into_inner();
        let s = ChunkStatus::try_from(r.status).unwrap();
        if s != ChunkStatus::Redirected {
            return s;
        }
        if let Some(l) = r.redirect.filter(|l| !l.address.is_empty()) {
            leader = l.address;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader answered");
}

fn write_req(t: &Target, ticket: &[u8], data: u8) -> ChunkRequest {
    ChunkRequest {
        data: vec![data; 4096].into(),
        ticket: ticket.to_vec(),
        ..t.req.clone()
    }
}

#[test]
fn every_rpc_needs_the_right_credential_and_the_owner_never_notices() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start_with(
        tmp.path(),
        1,
        false,
        &Extras {
            mds_args: vec!["--ticket-ttl-ms".into(), "4000".into()],
            metrics: true,
            ..Extras::default()
        },
    );
    let mds = cluster.mds_addrs()[0].clone();
    let admin = cluster.admin_key.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Users: root makes alice and bob; their secrets stay in their key files (0600).
    let alice_key: PathBuf = tmp.path().join("alice.key");
    let bob_key: PathBuf = tmp.path().join("bob.key");
    for (name, f) in [("alice", &alice_key), ("bob", &bob_key)] {
        let said = ok(curve(
            Some(&admin),
            &mds,
            &["user", "create", name, "--out", f.to_str().unwrap()],
        ));
        assert!(said.contains(&format!("user {name} created")), "{said}");
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(f).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }
    let users = ok(curve(
        Some(&admin),
        &mds,
        &["user", "list", "--format", "json"],
    ));
    let users: serde_json::Value = serde_json::from_str(&users).unwrap();
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["root", "alice", "bob"]);
    refused(
        curve(
            Some(&alice_key),
            &mds,
            &["user", "create", "eve", "--out", "/dev/null/x"],
        ),
        "only an admin",
    );
    refused(
        curve(Some(&alice_key), &mds, &["user", "list"]),
        "only an admin",
    );
    refused(
        curve(
            Some(&admin),
            &mds,
            &[
                "user",
                "create",
                "alice",
                "--out",
                tmp.path().join("a2.key").to_str().unwrap(),
            ],
        ),
        "exists",
    );
    ok(curve(
        Some(&alice_key),
        &mds,
        &["volume", "create", "/a", "--size", "1G"],
    ));
    ok(curve(
        Some(&alice_key),
        &mds,
        &["volume", "create", "/c", "--size", "1G"],
    ));
    ok(curve(
        Some(&bob_key),
        &mds,
        &["volume", "create", "/b", "--size", "1G"],
    ));
    ok(curve(
        Some(&admin),
        &mds,
        &["volume", "create", "/r", "--size", "1G"],
    ));
    let info = ok(curve(
        Some(&alice_key),
        &mds,
        &["volume", "info", "/a", "--format", "json"],
    ));
    assert!(info.contains("\"owner\": \"alice\""), "{info}");

    // The owner's writer runs through everything below.
    let stop = Arc::new(AtomicBool::new(false));
    let opts = VolumeOptions::new(vec![mds.clone()], "").with_key(Some(key(&alice_key)));
    let volume = rt
        .block_on(Volume::open("/a", opts, Arc::new(Connections::default())))
        .unwrap();
    let writer = {
        let (v, stop) = (volume.clone(), stop.clone());
        rt.spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 100_000 {
                // 64 blocks over the first chunk, each with its write's number.
                let off = (n % 64) * 4096;
                v.write(off, &vec![(n % 251) as u8; 4096]).await?;
                n += 1;
            }
            Ok::<u64, curve_client::ClientError>(n)
        })
    };

    // 1. No key, as another OS user and as a client: every MDS request refused.
    refused(curve(None, &mds, &["volume", "list", "/"]), "not signed");
    refused(
        curve(None, &mds, &["volume", "create", "/evil", "--size", "1G"]),
        "not signed",
    );
    refused(
        curve(None, &mds, &["volume", "delete", "/a", "--force"]),
        "not signed",
    );
    refused(curve(None, &mds, &["cluster", "status"]), "AuthFailed");
    if let Some(runuser) = ["/usr/sbin/runuser", "/sbin/runuser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    {
        // nobody cannot read root's key (0600 in a 0700 directory) nor any chunk file.
        let out = Command::new(runuser)
            .args(["-u", "nobody", "--"])
            .arg(bin("curve"))
            .args(["--mds", &mds, "--key-file"])
            .arg(&admin)
            .args(["volume", "list", "/"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Permission denied"),
            "{err}"
        );
        let out = Command::new(runuser)
            .args(["-u", "nobody", "--"])
            .arg(bin("curve"))
            .args(["--mds", &mds, "volume", "delete", "/a", "--force"])
            .env_remove("CURVE_KEY_FILE")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("not signed"), "{err}");
        let out = Command::new(runuser)
            .args(["-u", "nobody", "--", "find"])
            .arg(tmp.path().join("cs1"))
            .args(["-name", "chunk_*"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "nobody listed chunk files");
    }

    // 2. A wrong key (alice's name, another secret), a revoked user, an unknown one.
    let forged = tmp.path().join("forged.key");
    UserKey::generate("alice").save_new(&forged).unwrap();
    refused(
        curve(Some(&forged), &mds, &["volume", "info", "/a"]),
        "bad signature",
    );
    let eve = tmp.path().join("eve.key");
    UserKey::generate("eve").save_new(&eve).unwrap();
    refused(
        curve(Some(&eve), &mds, &["volume", "list", "/"]),
        "unknown user",
    );
    ok(curve(
        Some(&admin),
        &mds,
        &[
            "user",
            "create",
            "carol",
            "--out",
            tmp.path().join("carol.key").to_str().unwrap(),
        ],
    ));
    ok(curve(
        Some(&tmp.path().join("carol.key")),
        &mds,
        &["volume", "list", "/"],
    ));
    ok(curve(Some(&admin), &mds, &["user", "delete", "carol"]));
    refused(
        curve(
            Some(&tmp.path().join("carol.key")),
            &mds,
            &["volume", "list", "/"],
        ),
        "unknown user",
    );

    // 3. Owners are who the signature says: bob cannot act as alice, nor as root.
    refused(
        curve(Some(&bob_key), &mds, &["volume", "delete", "/a", "--force"]),
        "owner mismatch",
    );
    refused(
        curve(
            Some(&bob_key),
            &mds,
            &["--owner", "alice", "volume", "delete", "/a", "--force"],
        ),
        "signed by bob, not by the owner alice",
    );
    refused(
        curve(
            Some(&bob_key),
            &mds,
            &["--owner", "root", "volume", "delete", "/r", "--force"],
        ),
        "signed by bob",
    );
    let bob = MdsClient::with_key(vec![mds.clone()], Some(key(&bob_key)));
    let alice = MdsClient::with_key(vec![mds.clone()], Some(key(&alice_key)));
    assert_eq!(
        rt.block_on(bob.open("/a", "bob", "bob-host"))
            .unwrap_err()
            .status(),
        Some(MdsStatus::AuthFailed)
    );

    // 4. A replayed request: the same signed DeleteFile sent twice (the first refused for the
    // owner, the second as a replay — never executed).
    rt.block_on(async {
        let mut raw = MdsServiceClient::connect(format!("http://{mds}"))
            .await
            .unwrap();
        let signed = UserKey::load(&alice_key).unwrap().sign(
            "StatFile",
            &prost::Message::encode_to_vec(&PathRequest {
                path: "/a".into(),
                owner: String::new(),
            }),
        );
        let req = || {
            let mut r = tonic::Request::new(PathRequest {
                path: "/a".into(),
                owner: String::new(),
            });
            signed.attach(&mut r);
            r
        };
        let first = raw.stat_file(req()).await.unwrap().into_inner();
        assert_eq!(first.status, MdsStatus::Ok as i32);
        let again = raw.stat_file(req()).await.unwrap().into_inner();
        assert_eq!(again.status, MdsStatus::AuthFailed as i32);
        assert!(again.message.contains("replayed"), "{}", again.message);
        // A signature of one request on another (the body is signed).
        let mut r = tonic::Request::new(DeleteFileRequest {
            path: "/a".into(),
            owner: String::new(),
            force: true,
        });
        signed.attach(&mut r);
        let other = raw.delete_file(r).await.unwrap().into_inner();
        assert_eq!(
            other.status,
            MdsStatus::AuthFailed as i32,
            "{}",
            other.message
        );
    });

    // 5. Chunk RPCs.
    rt.block_on(async {
        let a = target(&alice, "/a", "alice").await;
        let b = target(&bob, "/b", "bob").await;
        let (_, bob_session, _) = bob.open("/b", "bob", "bob-host").await.unwrap();
        // A fresh ticket for each use (they live 4 s here).
        let bob_ticket = || async {
            bob.refresh("/b", &bob_session.session_id)
                .await
                .unwrap()
                .ticket
        };
        // No ticket, even with a forged huge epoch (the old attack that fenced the owner).
        let forged_epoch = ChunkRequest {
            epoch: u64::MAX / 2,
            ..write_req(&a, &[], 7)
        };
        assert_eq!(
            chunk_status(&a, forged_epoch, true).await,
            ChunkStatus::AuthFailed
        );
        assert_eq!(
            chunk_status(&a, write_req(&a, &[], 0), false).await,
            ChunkStatus::AuthFailed
        );
        // bob's valid ticket on alice's chunk: with alice's grant, or with his own grant.
        let with_alices_grant = ChunkRequest {
            epoch: u64::MAX / 2,
            ..write_req(&a, &bob_ticket().await, 7)
        };
        assert_eq!(
            chunk_status(&a, with_alices_grant, true).await,
            ChunkStatus::AuthFailed
        );
        let with_his_grant = ChunkRequest {
            grant: b.req.grant.clone(),
            ..write_req(&a, &bob_ticket().await, 7)
        };
        assert_eq!(
            chunk_status(&a, with_his_grant, true).await,
            ChunkStatus::AuthFailed
        );
        assert_eq!(
            chunk_status(&a, write_req(&a, &bob_ticket().await, 0), false).await,
            ChunkStatus::AuthFailed
        );
        // A forged ticket (bits flipped) and a ticket of a made-up cluster key.
        let mut flipped = bob_ticket().await;
        flipped[7] ^= 1;
        assert_eq!(
            chunk_status(&b, write_req(&b, &flipped, 7), true).await,
            ChunkStatus::AuthFailed
        );
        let alien = curve_auth::Ticket {
            volume: 1,
            epoch: 1,
            expiry_ms: u64::MAX,
            read_only: false,
            fill: false,
        }
        .seal(&curve_auth::Keyring::generate());
        assert_eq!(
            chunk_status(&a, write_req(&a, &alien, 7), true).await,
            ChunkStatus::AuthFailed
        );
        // bob's own chunk with his ticket: fine.
        assert_eq!(
            chunk_status(&b, write_req(&b, &bob_ticket().await, 9), true).await,
            ChunkStatus::Success
        );
        // DeleteChunk not signed by the MDS (with or without a ticket).
        let mut c = ChunkServiceClient::connect(format!("http://{}", a.leader))
            .await
            .unwrap();
        let del = c
            .delete_chunk(write_req(&a, &bob_ticket().await, 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(del.status, ChunkStatus::AuthFailed as i32);
        // Raft and copyset RPCs without the cluster key.
        let mut r = RaftServiceClient::connect(format!("http://{}", a.leader))
            .await
            .unwrap();
        let e = r
            .append_entries(RaftRequest {
                logical_pool_id: a.req.logical_pool_id,
                copyset_id: a.req.copyset_id,
                payload: vec![0; 64].into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        let mut cc = CopysetServiceClient::connect(format!("http://{}", a.leader))
            .await
            .unwrap();
        let cr = cc
            .create_copyset_node(CreateCopysetRequest {
                copysets: Vec::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(cr.status, CopysetStatus::CopysetFailed as i32);
        // Heartbeats and registrations need the cluster key at the MDS.
        let mut hb =
            curve_proto::heartbeat::heartbeat_service_client::HeartbeatServiceClient::connect(
                format!("http://{mds}"),
            )
            .await
            .unwrap();
        let h = hb
            .heartbeat(curve_proto::heartbeat::HeartbeatRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            h.status,
            curve_proto::heartbeat::HeartbeatStatus::HbInvalid as i32,
            "{}",
            h.leader
        );
    });

    // 6. A stolen ticket: works until its expiry (4 s here), then TICKET_EXPIRED; and stops
    // at once when the volume is reopened (the MDS pushes the new epoch to the chunkservers).
    rt.block_on(async {
        let c = target(&alice, "/c", "alice").await;
        let (_, session, stolen) = alice.open("/c", "alice", "alice-host").await.unwrap();
        assert_eq!(
            chunk_status(&c, write_req(&c, &stolen, 1), true).await,
            ChunkStatus::Success
        );
        // The owner keeps the session alive (each refresh gives the owner a new ticket); the
        // stolen one ages past its 4 s.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            alice.refresh("/c", &session.session_id).await.unwrap();
        }
        assert_eq!(
            chunk_status(&c, write_req(&c, &stolen, 2), true).await,
            ChunkStatus::TicketExpired
        );
        // A fresh one (the owner's refresh) works; then the volume is reopened.
        let fresh = alice
            .refresh("/c", &session.session_id)
            .await
            .unwrap()
            .ticket;
        assert_eq!(
            chunk_status(&c, write_req(&c, &fresh, 3), false).await,
            ChunkStatus::Success
        );
        alice.close("/c", &session.session_id).await.unwrap();
        let (_, s2, _) = alice.open("/c", "alice", "alice-host-2").await.unwrap();
        assert!(s2.epoch > session.epoch);
        // Without the new session touching this chunkserver: the MDS's heartbeat reply says.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut last = ChunkStatus::Success;
        while std::time::Instant::now() < deadline {
            last = chunk_status(&c, write_req(&c, &fresh, 4), false).await;
            if last == ChunkStatus::EpochTooOld {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            last,
            ChunkStatus::EpochTooOld,
            "the ticket of the closed session stops working"
        );
    });

    // The owner's writer saw nothing: no error, and every block reads back its last write.
    stop.store(true, Ordering::Relaxed);
    let n = rt
        .block_on(writer)
        .unwrap()
        .expect("the owner's writes all succeeded");
    assert!(n >= 64, "{n} writes");
    let mut buf = vec![0u8; 4096];
    for i in 0..64u64 {
        rt.block_on(volume.read(i * 4096, &mut buf)).unwrap();
        // The last write to block i is the largest k < n with k % 64 == i.
        let last = (0..n).rev().find(|k| k % 64 == i).unwrap();
        assert!(buf.iter().all(|&x| x == (last % 251) as u8), "block {i}");
    }
    rt.block_on(volume.close()).unwrap();

    // Counted: the MDS's and the chunkservers' refusals, by reason.
    let m = scrape(&cluster.metrics[0]);
    for reason in [
        "missing",
        "bad_signature",
        "unknown_user",
        "replay",
        "forbidden",
    ] {
        let n = metric(
            &m,
            "curve_mds_auth_refused_total",
            &format!("reason=\"{reason}\""),
        );
        assert!(n.is_some_and(|n| n >= 1.0), "{reason}: {n:?}");
    }
    let total = |reason: &str| -> f64 {
        cluster.metrics[1..]
            .iter()
            .filter_map(|a| {
                metric(
                    &scrape(a),
                    "curve_chunkserver_auth_refused_total",
                    &format!("reason=\"{reason}\""),
                )
            })
            .sum()
    };
    for reason in [
        "missing",
        "wrong_volume",
        "bad_signature",
        "expired",
        "stale_epoch",
    ] {
        assert!(total(reason) >= 1.0, "chunkservers counted no {reason}");
    }
}

/// TLS on every connection: daemons, the CLI, part2 and its NBD consumer (fio verifying); a
/// client that does not speak TLS reaches nothing.
#[test]
fn a_cluster_on_tls_serves_volumes_and_plaintext_reaches_nothing() {
    require_tool("fio");
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start_with(
        tmp.path(),
        1,
        false,
        &Extras {
            tls: true,
            ..Extras::default()
        },
    );
    let mds = cluster.mds_addrs()[0].clone();
    let tls = cluster.tls_dir.clone().unwrap();
    let tls_s = tls.display().to_string();
    let admin = cluster.admin_key.clone();
    // Plaintext: the MDS answers nothing (the CLI gives up quickly on a transport error).
    let out = curve(Some(&admin), &mds, &["cluster", "status"]);
    assert!(!out.status.success(), "plaintext reached a TLS MDS");
    let plain = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = MdsServiceClient::connect(format!("http://{mds}"))
            .await
            .unwrap();
        c.stat_file(PathRequest {
            path: "/".into(),
            owner: String::new(),
        })
        .await
    });
    assert!(plain.is_err(), "a plaintext gRPC call was answered");
    // Over TLS: a volume, exported by part2 (TLS to the cluster), written and verified by fio.
    ok(curve(
        Some(&admin),
        &mds,
        &[
            "--tls-dir",
            &tls_s,
            "volume",
            "create",
            "/t",
            "--size",
            "1G",
        ],
    ));
    let status = ok(curve(
        Some(&admin),
        &mds,
        &["--tls-dir", &tls_s, "cluster", "status", "--format", "json"],
    ));
    assert!(status.contains("\"copysets_healthy\""), "{status}");
    let part2 = Part2::start_with(&[
        "--mds",
        &mds,
        "--key-file",
        &cluster.key(),
        "--tls-dir",
        &tls_s,
    ]);
    let sock = part2.run_dir().join("t.sock");
    let uri = part2.curve_ok(&[
        "export",
        "add",
        "--volume",
        "curve:/t",
        "--nbd",
        &format!("unix:{}", sock.display()),
        "--name",
        "t",
    ]);
    let out = run_ok(Command::new("fio").args([
        "--name=tls",
        "--ioengine=nbd",
        &format!("--uri={}", uri.trim()),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--size=16M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
    ]));
    assert!(out.contains("err= 0"), "{out}");
}

/// The cluster key rotates while the owner writes: a new key added everywhere, made primary,
/// the old one retired; no write fails, every block reads back; a ticket sealed with the old
/// key stops working once it is retired.
#[test]
fn the_cluster_key_rotates_without_downtime() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start_with(
        tmp.path(),
        1,
        false,
        &Extras {
            mds_args: vec!["--ticket-ttl-ms".into(), "3000".into()],
            ..Extras::default()
        },
    );
    let mds = cluster.mds_addrs()[0].clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let root = cluster.mds_client();
    rt.block_on(root.create(
        "/k",
        curve_proto::mds::FileType::Volume,
        1 << 30,
        4096,
        "root",
    ))
    .unwrap();
    // A grant sealed with key 1, to try after the retirement.
    rt.block_on(root.create(
        "/old",
        curve_proto::mds::FileType::Volume,
        1 << 30,
        4096,
        "root",
    ))
    .unwrap();
    let old = rt.block_on(target(&root, "/old", "root"));
    let opts = VolumeOptions::new(vec![mds.clone()], "").with_key(Some(key(&cluster.admin_key)));
    let volume = rt
        .block_on(Volume::open("/k", opts, Arc::new(Connections::default())))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (v, stop) = (volume.clone(), stop.clone());
        rt.spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 200_000 {
                // Blocks over two segments' first chunks: two grants to renew.
                let off = (n % 32) * 4096 + (n % 2) * (1 << 30) / 2;
                v.write(off.min((1 << 30) - 4096), &vec![(n % 251) as u8; 4096])
                    .await?;
                n += 1;
            }
            Ok::<u64, curve_client::ClientError>(n)
        })
    };
    let ring = cluster.cluster_key.to_str().unwrap().to_string();
    let step = |args: &[&str], wait: u64| {
        let said = ok(curve(None, &mds, args));
        println!("{}", said.trim());
        std::thread::sleep(Duration::from_secs(wait));
    };
    std::thread::sleep(Duration::from_secs(2));
    step(&["key", "rotate", &ring], 3); // every daemon has key 2 (reloads within 1 s)
    step(&["key", "promote", &ring, "2"], 5); // tickets sealed with key 2 from now on (TTL 3 s)
    step(&["key", "retire", &ring, "1"], 3);
    stop.store(true, Ordering::Relaxed);
    let n = rt
        .block_on(writer)
        .unwrap()
        .expect("no write failed across the rotation");
    assert!(n >= 64, "{n} writes");
    let ids = curve_auth::Keyring::load(&cluster.cluster_key)
        .unwrap()
        .ids();
    assert_eq!(ids, vec![2]);
    // A grant sealed with key 1 (fetched before the rotation) is refused now.
    let (_, _, t) = rt.block_on(root.open("/old", "root", "old-host")).unwrap();
    assert_eq!(
        u32::from_le_bytes(t[1..5].try_into().unwrap()),
        2,
        "sealed with key 2"
    );
    let r = rt.block_on(chunk_status(&old, write_req(&old, &t, 1), true));
    assert_eq!(r, ChunkStatus::AuthFailed, "a grant of the retired key");
    // The owner's data: every block of the first segment holds its last write.
    let mut buf = vec![0u8; 4096];
    for i in 0..32u64 {
        let last = (0..n).rev().find(|k| k % 32 == i && k % 2 == 0);
        let Some(last) = last else { continue };
        rt.block_on(volume.read(i * 4096, &mut buf)).unwrap();
        assert!(buf.iter().all(|&x| x == (last % 251) as u8), "block {i}");
    }
    rt.block_on(volume.close()).unwrap();
}
