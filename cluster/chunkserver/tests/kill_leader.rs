//! Three chunkserver processes and a fake MDS (the same heartbeat proto): registration,
//! a copyset across the three, a stream of writes through the leader while the leader is
//! killed with SIGKILL; a new leader takes over, every acknowledged write is there, no block
//! is torn, and the killed chunkserver restarts from its disk and catches up.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use curve_proto::chunk::chunk_service_client::ChunkServiceClient;
use curve_proto::chunk::{ChunkRequest, ChunkStatus};
use curve_proto::common::CopysetKey;
use curve_proto::common::Peer;
use curve_proto::copyset::copyset_service_client::CopysetServiceClient;
use curve_proto::copyset::{CopysetSpec, CreateCopysetRequest, GetCopysetStatusRequest};
use curve_proto::heartbeat::heartbeat_service_server::{HeartbeatService, HeartbeatServiceServer};
use curve_proto::heartbeat::{
    ConfigChange, ConfigChangeType, HeartbeatRequest, HeartbeatResponse, HeartbeatStatus,
    RegisterRequest, RegisterResponse,
};
use parking_lot::Mutex;
use tonic::{Request, Response, Status};

/// Registration and heartbeats: ids in registration order, tokens checked, and configuration
/// changes handed to whichever chunkserver reports itself leader of the copyset, until done.
#[derive(Default, Clone)]
struct FakeMds {
    registered: Arc<Mutex<Vec<(u32, String, String)>>>, // id, address, token
    heartbeats: Arc<Mutex<HashMap<u32, usize>>>,
    changes: Arc<Mutex<Vec<ConfigChange>>>,
    /// Copyset peers as last reported by a leader.
    peers: Arc<Mutex<Vec<u32>>>,
}

#[tonic::async_trait]
impl HeartbeatService for FakeMds {
    async fn register(
        &self,
        r: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let r = r.into_inner();
        let mut reg = self.registered.lock();
        let id = reg.len() as u32 + 1;
        let token = format!("token-{id}");
        reg.push((id, r.address, token.clone()));
        Ok(Response::new(RegisterResponse {
            status: HeartbeatStatus::HbOk as i32,
            chunkserver_id: id,
            token,
            ..Default::default()
        }))
    }

    async fn heartbeat(
        &self,
        r: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = r.into_inner();
        let ok = self
            .registered
            .lock()
            .iter()
            .any(|(id, _, t)| *id == r.chunkserver_id && *t == r.token);
        let mut changes = Vec::new();
        if ok {
            *self.heartbeats.lock().entry(r.chunkserver_id).or_default() += 1;
            let leads = r.copysets.iter().find(|c| {
                c.leader
                    .as_ref()
                    .is_some_and(|l| l.chunkserver_id == r.chunkserver_id)
            });
            if let Some(c) = leads {
                let peers: Vec<u32> = c.peers.iter().map(|p| p.chunkserver_id).collect();
                // As the MDS does: a change is sent again until the copyset reports it done
                // (a leader may lose its leadership before it can execute one).
                let mut pending = self.changes.lock();
                pending.retain(|ch| {
                    ch.peer
                        .as_ref()
                        .is_none_or(|p| !peers.contains(&p.chunkserver_id))
                });
                changes = pending.clone();
                *self.peers.lock() = peers;
            }
        }
        Ok(Response::new(HeartbeatResponse {
            status: if ok {
                HeartbeatStatus::HbOk
            } else {
                HeartbeatStatus::HbUnauthorized
            } as i32,
            changes,
            ..Default::default()
        }))
    }
}

struct Proc {
    child: Option<Child>,
    addr: String,
    dir: std::path::PathBuf,
}

impl Proc {
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A port whose successor is free too (service + metrics), below the ephemeral range: a
/// chunkserver restarts on the same address, and other tests binding port 0 must not grab it
/// while it is down.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() % 4000) as u16 * 2;
    loop {
        let port = 22000 + (seed + NEXT.fetch_add(2, Ordering::Relaxed)) % 10000;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 1) {
            return port;
        }
    }
}

/// The metrics endpoint sits next to the service port in these tests.
fn metrics_addr(addr: &str) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    format!("{host}:{}", port.parse::<u16>().unwrap() + 1)
}

fn get_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(metrics_addr(addr)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn spawn(dir: &std::path::Path, addr: &str, mds: &str, log: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_curve-chunkserver"))
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            addr,
            "--mds",
            mds,
        ])
        .args([
            "--chunk-size",
            "65536",
            "--pool-target",
            "4",
            "--election-ms",
            "300",
        ])
        .args(["--heartbeat-ms", "200"])
        .args(["--metrics-listen", &metrics_addr(addr)])
        .env(
            "RUST_LOG",
            std::env::var("CURVE_TEST_LOG").unwrap_or("info,openraft=warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn pattern(i: u64) -> Vec<u8> {
    let mut b: Vec<u8> = (0..4096u64)
        .map(|k| (i.wrapping_mul(31) + k) as u8)
        .collect();
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

const SLOTS: u64 = 32;

fn slot(i: u64) -> (u64, u64) {
    (i % 4, (i % SLOTS) / 4 * 4096) // (chunk, offset)
}

async fn status(addr: &str) -> Option<(u32, u64)> {
    let mut c = CopysetServiceClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    let s = c
        .get_copyset_status(GetCopysetStatusRequest {
            logical_pool_id: 1,
            copyset_id: 1,
        })
        .await
        .ok()?
        .into_inner();
    Some((
        s.leader.map(|l| l.chunkserver_id).unwrap_or(0),
        s.applied_index,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_leader_loses_no_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let mds = FakeMds::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mds_addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HeartbeatServiceServer::new(mds.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut procs: Vec<Proc> = (0..3)
        .map(|i| {
            let dir = tmp.path().join(format!("cs{i}"));
            let addr = format!("127.0.0.1:{}", free_port());
            let child = spawn(
                &dir,
                &addr,
                &mds_addr,
                tmp.path().join(format!("cs{i}.log")).to_str().unwrap(),
            );
            Proc {
                child: Some(child),
                addr,
                dir,
            }
        })
        .collect();
    // Registration, then heartbeats with the right token.
    let deadline = Instant::now() + Duration::from_secs(20);
    while (mds.registered.lock().len() < 3 || mds.heartbeats.lock().len() < 3)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reg = mds.registered.lock().clone();
    assert_eq!(reg.len(), 3, "chunkservers did not register");
    let id_of = |addr: &str| reg.iter().find(|r| r.1 == addr).unwrap().0;
    let peers: Vec<Peer> = procs
        .iter()
        .map(|p| Peer {
            chunkserver_id: id_of(&p.addr),
            address: p.addr.clone(),
        })
        .collect();
    for p in &procs {
        let mut c = CopysetServiceClient::connect(format!("http://{}", p.addr))
            .await
            .unwrap();
        let r = c
            .create_copyset_node(CreateCopysetRequest {
                copysets: vec![CopysetSpec {
                    logical_pool_id: 1,
                    copyset_id: 1,
                    peers: peers.clone(),
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, 0, "{}", r.message);
    }

    // The writer: follows redirects, retries through transport errors, never gives up.
    let addrs: Vec<String> = procs.iter().map(|p| p.addr.clone()).collect();
    let mut acked: HashMap<u64, u64> = HashMap::new(); // slot -> last acknowledged i
    let mut attempted: HashMap<u64, Vec<u64>> = HashMap::new(); // slot -> writes not acked
    let mut target = 0usize;
    let mut killed: Option<usize> = None;
    let mut longest = Duration::ZERO;
    let mut i = 0u64;
    while acked.values().count() < SLOTS as usize || i < 300 {
        let (chunk, offset) = slot(i);
        attempted.entry(i % SLOTS).or_default().push(i);
        let started = Instant::now();
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no leader for 30 s"
            );
            let Ok(mut c) = ChunkServiceClient::connect(format!("http://{}", addrs[target])).await
            else {
                target = (target + 1) % 3;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let req = ChunkRequest {
                logical_pool_id: 1,
                copyset_id: 1,
                chunk_id: chunk,
                offset,
                size: 4096,
                data: pattern(i).into(),
                ..Default::default()
            };
            match c.write_chunk(req).await.map(|r| r.into_inner()) {
                Ok(r) if r.status == ChunkStatus::Success as i32 => break,
                Ok(r) if r.status == ChunkStatus::Redirected as i32 => {
                    if let Some(l) = r.redirect.filter(|l| !l.address.is_empty()) {
                        target = addrs.iter().position(|a| *a == l.address).unwrap();
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                _ => {
                    target = (target + 1) % 3;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        longest = longest.max(started.elapsed());
        acked.insert(i % SLOTS, i);
        attempted.get_mut(&(i % SLOTS)).unwrap().clear();
        if i == 120 {
            // Kill the leader in the middle of the stream.
            let leader = status(&addrs[target]).await.map(|s| s.0).unwrap();
            let idx = procs.iter().position(|p| id_of(&p.addr) == leader).unwrap();
            procs[idx].kill9();
            killed = Some(idx);
        }
        i += 1;
    }
    let killed = killed.expect("the leader was killed");
    println!("{i} writes, longest (election after kill -9) {longest:?}");

    // A new leader serves every acknowledged write, and no block is torn.
    let mut c = ChunkServiceClient::connect(format!("http://{}", addrs[target]))
        .await
        .unwrap();
    for (s, last) in &acked {
        let (chunk, offset) = slot(*s);
        let req = ChunkRequest {
            logical_pool_id: 1,
            copyset_id: 1,
            chunk_id: chunk,
            offset,
            size: 4096,
            ..Default::default()
        };
        // Like the client library: follow redirects, retry transient failures (leadership
        // being confirmed).
        let mut r = c.read_chunk(req.clone()).await.unwrap().into_inner();
        for _ in 0..100 {
            if r.status == ChunkStatus::Success as i32 {
                break;
            }
            if let Some(l) = r.redirect.as_ref().filter(|l| !l.address.is_empty()) {
                target = addrs.iter().position(|a| *a == l.address).unwrap();
                c = ChunkServiceClient::connect(format!("http://{}", addrs[target]))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            r = c.read_chunk(req.clone()).await.unwrap().into_inner();
        }
        assert_eq!(r.status, ChunkStatus::Success as i32);
        let j = u64::from_le_bytes(r.data[..8].try_into().unwrap());
        assert_eq!(r.data, pattern(j), "slot {s} is torn");
        assert_eq!(
            j, *last,
            "slot {s}: the last acknowledged write is {last}, found {j}"
        );
    }

    // The killed chunkserver restarts from its disk (same id, copysets rebuilt) and catches up.
    let p = &mut procs[killed];
    p.child = Some(spawn(
        &p.dir,
        &p.addr,
        &mds_addr,
        tmp.path().join("restarted.log").to_str().unwrap(),
    ));
    let (_, leader_applied) = status(&addrs[target]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut caught_up = false;
    while Instant::now() < deadline {
        if status(&addrs[killed])
            .await
            .is_some_and(|(_, applied)| applied >= leader_applied)
        {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(tmp.path().join("restarted.log")).unwrap_or_default();
    assert!(
        caught_up,
        "the restarted chunkserver did not catch up:\n{log}"
    );
    assert!(
        log.contains("copysets=1"),
        "copysets rebuilt from disk:\n{log}"
    );
    assert_eq!(
        mds.registered.lock().len(),
        3,
        "a restart does not register again"
    );

    // Prometheus metrics of the leader: its writes, per copyset, and the raft log's fsyncs.
    let m = get_metrics(&addrs[target]);
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    let writes = m
        .lines()
        .find(|l| l.starts_with("curve_chunkserver_ops_total{op=\"write\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(writes > 0, "{m}");
    assert!(
        m.contains("curve_copyset_latency_seconds_count{pool=\"1\",copyset=\"1\",op=\"write\"}"),
        "{m}"
    );
    assert!(m.contains("curve_raft_log_fsync_seconds_count"), "{m}");
}

async fn fake_mds() -> (FakeMds, String) {
    let mds = FakeMds::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HeartbeatServiceServer::new(mds.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (mds, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_identity_is_refused_not_re_registered() {
    let tmp = tempfile::tempdir().unwrap();
    let (mds, mds_addr) = fake_mds().await;
    let dir = tmp.path().join("cs");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut p = Proc {
        child: Some(spawn(
            &dir,
            &addr,
            &mds_addr,
            tmp.path().join("cs.log").to_str().unwrap(),
        )),
        addr,
        dir: dir.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while mds.registered.lock().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mds.registered.lock().len(), 1);
    // The identity is saved before the first heartbeat.
    while mds.heartbeats.lock().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.kill9();
    let dat = dir.join("chunkserver.dat");
    let text = std::fs::read_to_string(&dat)
        .unwrap()
        .replace("token-1", "token-9");
    std::fs::write(&dat, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_curve-chunkserver"))
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            &p.addr,
            "--mds",
            &mds_addr,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("chunkserver.dat") && err.contains("corrupt"),
        "{err}"
    );
    assert_eq!(mds.registered.lock().len(), 1, "it did not register again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_executes_add_peer_from_a_heartbeat_reply() {
    let tmp = tempfile::tempdir().unwrap();
    let (mds, mds_addr) = fake_mds().await;
    let procs: Vec<Proc> = (0..4)
        .map(|i| {
            let dir = tmp.path().join(format!("cs{i}"));
            let addr = format!("127.0.0.1:{}", free_port());
            let log = tmp.path().join(format!("cs{i}.log"));
            Proc {
                child: Some(spawn(&dir, &addr, &mds_addr, log.to_str().unwrap())),
                addr,
                dir,
            }
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while mds.registered.lock().len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reg = mds.registered.lock().clone();
    assert_eq!(reg.len(), 4);
    let id_of = |addr: &str| reg.iter().find(|r| r.1 == addr).unwrap().0;
    let peers: Vec<Peer> = procs[..3]
        .iter()
        .map(|p| Peer {
            chunkserver_id: id_of(&p.addr),
            address: p.addr.clone(),
        })
        .collect();
    for (i, p) in procs.iter().enumerate() {
        let mut c = CopysetServiceClient::connect(format!("http://{}", p.addr))
            .await
            .unwrap();
        let spec = CopysetSpec {
            logical_pool_id: 1,
            copyset_id: 1,
            // The fourth is created empty: it joins when the MDS has it added.
            peers: if i < 3 { peers.clone() } else { Vec::new() },
        };
        let r = c
            .create_copyset_node(CreateCopysetRequest {
                copysets: vec![spec],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, 0, "{}", r.message);
    }
    let new = &procs[3];
    mds.changes.lock().push(ConfigChange {
        key: Some(CopysetKey {
            logical_pool_id: 1,
            copyset_id: 1,
        }),
        r#type: ConfigChangeType::AddPeer as i32,
        peer: Some(Peer {
            chunkserver_id: id_of(&new.addr),
            address: new.addr.clone(),
        }),
        ..Default::default()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = id_of(&new.addr);
    while !mds.peers.lock().contains(&want) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs: Vec<String> = (0..4)
        .map(|k| std::fs::read_to_string(tmp.path().join(format!("cs{k}.log"))).unwrap_or_default())
        .collect();
    assert!(
        mds.peers.lock().contains(&want),
        "the copyset did not gain the peer (heartbeats {:?}, pending changes {}, reported peers {:?}, want {want}):\n{}",
        mds.heartbeats.lock(),
        mds.changes.lock().len(),
        mds.peers.lock(),
        logs.join("\n---\n")
    );
    assert_eq!(mds.peers.lock().len(), 4);
}
