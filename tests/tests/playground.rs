//! The README's main-job command, as a user runs it: `deploy/playground.sh DIR` starts an MDS,
//! three raft chunkservers and nebd-server, exports a cluster volume over NBD and prints its
//! URI. fio verifies data written across chunk and segment boundaries, never-written ranges
//! read as zeros, and faults stay invisible to the consumer (0 fio errors, verify clean): kill
//! -9 of the leader chunkserver of the busy copyset (the playground restarts it), kill -9 of
//! the MDS (restarted too). `curve playground status` and `down` work from another shell.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use curve_client::MdsClient;
use curve_tests::cluster::free_port;
use curve_tests::{bin, require_tool, run_ok, wait_until};
use curve_tests::{metric, scrape};

fn pid_in(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill(pid, 0) only checks whether the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Stops the playground when the test ends, even on failure (SIGTERM to the process the test
/// started; it stops its own daemons, which also die with it).
struct Stop(i32, bool);

impl Drop for Stop {
    fn drop(&mut self) {
        if self.1 {
            // SAFETY: signals the playground this test started and has not seen exit.
            unsafe { libc::kill(self.0, libc::SIGTERM) };
        }
    }
}

fn fio(uri: &str, jobs: &[&str]) -> String {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--verify=crc32c",
        "--verify_state_save=0",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=normal",
    ]);
    cmd.args(jobs);
    run_ok(&mut cmd)
}

#[test]
fn playground_fio_verify_and_faults_invisible() {
    require_tool("fio");
    require_tool("qemu-io");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let port = free_port();
    let bin_dir = bin("curve").parent().unwrap().to_owned();
    let mut child = Command::new(root.join("deploy/playground.sh"))
        .arg(&dir)
        .args(["--size", "4G", "--port", &port.to_string()])
        .env("CURVE_BIN_DIR", &bin_dir)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let mut stop = Stop(child.id() as i32, true);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    let uri = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        let line = line.unwrap_or_else(|_| {
            panic!(
                "the playground printed no URI:\n{}",
                std::fs::read_to_string(dir.with_extension("err")).unwrap_or_default()
            )
        });
        if line.starts_with("nbd+unix://") {
            break line.trim().to_string();
        }
    };
    assert!(
        uri.ends_with(&format!(
            "/vol0?socket={}",
            dir.join("nebd/nbd.sock").display()
        )),
        "{uri}"
    );
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert_eq!(size.trim(), (4u64 << 30).to_string());

    // Across chunk (16 MiB) and segment (1 GiB) boundaries, sequential and random.
    let out = fio(
        &uri,
        &[
            "--name=segment-edge",
            "--rw=write",
            "--bs=12k",
            "--offset=1065353216", // 1 GiB - 8 MiB
            "--size=16M",
            "--name=chunk-edges",
            "--rw=randwrite",
            "--bs=4k",
            "--offset=33488896", // 32 MiB - 64 KiB
            "--size=128K",
        ],
    );
    assert!(out.contains("err= 0"), "{out}");
    // Never written: zeros (a segment never allocated, and a hole in an allocated one).
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=vol0",
        dir.join("nebd/nbd.sock").display()
    );
    let out = run_ok(Command::new("qemu-io").args([
        "--image-opts",
        &opts,
        "-c",
        "read -P 0 3G 1M",
        "-c",
        "read -P 0 1090519040 65536", // 1 GiB + 16 MiB: allocated segment, unwritten chunk
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // Metrics: every daemon of the playground answers, and the counters move by what a client
    // did — 10 writes of 64 KiB through NBD are 10 writes and 640 KiB on the export, and at
    // least 10 chunk writes on the chunkservers.
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("playground.json")).unwrap())
            .unwrap();
    let urls = info["metrics"].as_object().expect("metrics URLs").clone();
    assert_eq!(urls.len(), 5, "{info}");
    let addr = |name: &str| {
        urls[name]
            .as_str()
            .unwrap()
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_owned()
    };
    let export = "export=\"vol0\",frontend=\"nbd\",volume=\"curve:/vol0\",op=\"write\"";
    let chunk_writes = || -> f64 {
        (1..=3)
            .map(|i| {
                let m = scrape(&addr(&format!("curve-chunkserver {i}")));
                metric(&m, "curve_chunkserver_ops_total", "op=\"write\"").unwrap_or(0.0)
            })
            .sum()
    };
    let before = scrape(&addr("nebd-server"));
    let ops0 = metric(&before, "curve_export_ops_total", export).expect("export writes");
    let bytes0 = metric(&before, "curve_export_bytes_total", export).unwrap();
    let chunks0 = chunk_writes();
    let mut writes = Vec::new();
    for i in 0..10u64 {
        writes.push("-c".to_owned());
        writes.push(format!(
            "write -P 0x5a {} 64k",
            (2u64 << 30) + i * (1 << 20)
        ));
    }
    run_ok(
        Command::new("qemu-io")
            .args(["--image-opts", &opts])
            .args(&writes),
    );
    let after = scrape(&addr("nebd-server"));
    assert_eq!(
        metric(&after, "curve_export_ops_total", export).unwrap() - ops0,
        10.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "curve_export_bytes_total", export).unwrap() - bytes0,
        655360.0
    );
    assert_eq!(
        metric(&after, "curve_export_errors_total", export),
        Some(0.0)
    );
    assert!(metric(&after, "curve_export_latency_seconds_count", export).unwrap() >= ops0 + 10.0);
    assert_eq!(
        metric(&after, "curve_exports", "frontend=\"nbd\""),
        Some(1.0)
    );
    let chunks = chunk_writes() - chunks0;
    assert!(chunks >= 10.0, "{chunks} chunk writes for 10 client writes");
    let mds = scrape(&addr("curve-mds"));
    assert_eq!(metric(&mds, "curve_mds_leader", ""), Some(1.0), "{mds}");
    assert_eq!(
        metric(&mds, "curve_mds_chunkservers", "state=\"online\""),
        Some(3.0)
    );
    assert!(metric(&mds, "curve_mds_copysets", "health=\"healthy\"").unwrap() > 0.0);
    assert!(
        metric(&mds, "curve_mds_sessions", "").unwrap() >= 1.0,
        "vol0 is open"
    );
    assert!(
        mds.lines()
            .any(|l| l
                .starts_with("curve_mds_grpc_requests_total{method=\"OpenFile\",status=\"OK\"}")),
        "{mds}"
    );
    let cs = scrape(&addr("curve-chunkserver 1"));
    assert!(cs.contains("curve_raft_log_fsync_seconds_count"), "{cs}");
    assert!(
        cs.contains("curve_chunkserver_grpc_requests_total{method=\""),
        "{cs}"
    );

    // Data at rest is the owner's only: every file under the playground directory 0600 (or
    // stricter), every directory 0700, the sockets 0660; another local user reads nothing.
    let mut checked = 0;
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let Ok(md) = std::fs::symlink_metadata(e.path()) else {
                continue; // gone meanwhile (a raft log rolled over)
            };
            let mode = std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777;
            let ft = md.file_type();
            if ft.is_dir() {
                assert_eq!(mode & 0o077, 0, "{}: {mode:o}", e.path().display());
                stack.push(e.path());
            } else if std::os::unix::fs::FileTypeExt::is_socket(&ft) {
                assert_eq!(mode, 0o660, "{}: {mode:o}", e.path().display());
            } else {
                assert_eq!(mode & 0o077, 0, "{}: {mode:o}", e.path().display());
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "{checked} entries checked");
    if let Some(runuser) = ["/usr/sbin/runuser", "/sbin/runuser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    {
        for f in [
            "nebd/nebd-server.meta",
            "mds/mds.redb",
            "cs1/chunkserver.dat",
            "keys/admin.key",
            "keys/cluster.key",
        ] {
            let out = Command::new(runuser)
                .args(["-u", "nobody", "--", "cat"])
                .arg(dir.join(f))
                .output()
                .unwrap();
            assert!(!out.status.success(), "nobody read {f}");
        }
    }

    // The copyset behind offset 0, and its leader's process.
    let mds_addr = format!("127.0.0.1:{port}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Authentication is on: the playground says how to use its admin key; without a key the
    // MDS refuses (and counts it), with it the CLI works.
    let err = std::fs::read_to_string(dir.with_extension("err")).unwrap_or_default();
    let admin_key = dir.join("keys/admin.key");
    assert!(
        err.contains(&format!("export CURVE_KEY_FILE={}", admin_key.display())),
        "{err}"
    );
    let anon = Command::new(bin("curve"))
        .env_remove("CURVE_KEY_FILE")
        .args(["--mds", &mds_addr, "volume", "list", "/"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&anon.stderr);
    assert!(
        !anon.status.success() && said.contains("not signed"),
        "{said}"
    );
    let listed = run_ok(
        Command::new(bin("curve"))
            .env("CURVE_KEY_FILE", &admin_key)
            .args(["--mds", &mds_addr, "volume", "list", "/"]),
    );
    assert!(listed.contains("/vol0"), "{listed}");
    let refused = metric(
        &scrape(&addr("curve-mds")),
        "curve_mds_auth_refused_total",
        "reason=\"missing\"",
    );
    assert!(refused.is_some_and(|n| n >= 1.0), "the refusal is counted");
    let mds = MdsClient::with_key(
        vec![mds_addr.clone()],
        Some(std::sync::Arc::new(
            curve_auth::UserKey::load(&admin_key).unwrap(),
        )),
    );
    let seg = rt
        .block_on(mds.segment("/vol0", "curve", 0, true))
        .unwrap()
        .unwrap();
    let copyset = seg.chunks[0].copyset_id;
    let leader_dir = || {
        let t = rt.block_on(mds.topology()).unwrap();
        let cs = t.copysets.iter().find(|c| c.copyset_id == copyset).unwrap();
        let leader = cs.leader.as_ref().unwrap().address.clone();
        let port = leader.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        dir.join(format!("cs{}", port - self_port(&mds_addr)))
    };
    fn self_port(a: &str) -> u16 {
        a.rsplit(':').next().unwrap().parse().unwrap()
    }

    // A verifying writer on that copyset while its leader chunkserver is killed -9, then the
    // MDS. The playground restarts both; fio sees a pause, no error.
    let writer = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            fio(
                &uri,
                &[
                    "--name=busy",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=8",
                    "--offset=0",
                    "--size=8M",
                    "--time_based",
                    "--runtime=20",
                ],
            )
        })
    };
    std::thread::sleep(Duration::from_secs(4));
    let victim = pid_in(&leader_dir().join("chunkserver.pid")).expect("leader pid");
    // SAFETY: a chunkserver of the playground this test started (its pid file, under lock).
    unsafe { libc::kill(victim, libc::SIGKILL) };
    std::thread::sleep(Duration::from_secs(3));
    // A live upgrade of the playground's part2 in the middle of it: fio's connection and the
    // volume's session go to the new process; the playground supervises that one now.
    let nebd_before = pid_in(&dir.join("nebd/nebd-server.pid")).expect("nebd pid");
    let upgraded = run_ok(
        Command::new(bin("curve"))
            .args(["playground", "upgrade", "--dir"])
            .arg(&dir),
    );
    assert!(
        upgraded.starts_with("upgraded: nebd-server pid"),
        "{upgraded}"
    );
    println!("{}", upgraded.trim());
    assert!(wait_until(Duration::from_secs(10), || {
        pid_in(&dir.join("nebd/nebd-server.pid")).is_some_and(|p| p != nebd_before && alive(p))
    }));
    std::thread::sleep(Duration::from_secs(3));
    let mds_pid = pid_in(&dir.join("mds/mds.pid")).expect("mds pid");
    // SAFETY: the MDS of the playground this test started.
    unsafe { libc::kill(mds_pid, libc::SIGKILL) };
    let out = writer.join().unwrap();
    assert!(out.contains("err= 0"), "{out}");
    // Both came back (new processes).
    assert!(wait_until(Duration::from_secs(30), || {
        pid_in(&dir.join("mds/mds.pid")).is_some_and(|p| p != mds_pid && alive(p))
    }));
    let status = run_ok(
        Command::new(bin("curve"))
            .args(["playground", "status", "--format", "json", "--dir"])
            .arg(&dir),
    );
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["running"], true, "{status}");
    assert_eq!(v["uri"], uri.as_str());
    let err = std::fs::read_to_string(dir.with_extension("err")).unwrap_or_default();
    assert!(
        err.contains("nebd-server upgraded live") && !err.contains("nebd-server exited"),
        "the playground followed its part2 to the new process:\n{err}"
    );

    // `down` from another shell stops everything.
    let pids: Vec<i32> = [
        "mds/mds.pid",
        "cs1/chunkserver.pid",
        "cs2/chunkserver.pid",
        "cs3/chunkserver.pid",
        "nebd/nebd-server.pid",
    ]
    .iter()
    .filter_map(|f| pid_in(&dir.join(f)))
    .collect();
    assert_eq!(pids.len(), 5, "every daemon has its pid file");
    run_ok(
        Command::new(bin("curve"))
            .args(["playground", "down", "--dir"])
            .arg(&dir),
    );
    assert!(wait_until(Duration::from_secs(20), || matches!(
        child.try_wait(),
        Ok(Some(_))
    )));
    stop.1 = false;
    assert!(
        wait_until(Duration::from_secs(20), || pids.iter().all(|p| !alive(*p))),
        "daemons left behind"
    );
}

/// A playground whose ports another process holds refuses to start, with a message naming the
/// port, and starts nothing (before, it adopted another cluster's MDS on its port).
#[test]
fn a_playground_refuses_ports_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    for taken in [port, port + 2, port + 14] {
        let Ok(_held) = std::net::TcpListener::bind(("127.0.0.1", taken)) else {
            continue; // someone else's: the point stands, the next port tells it
        };
        let out = Command::new(bin("curve"))
            .args(["playground", "up", "--dir"])
            .arg(dir.path())
            .args(["--size", "1G", "--port", &port.to_string()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "started with port {taken} taken: {err}"
        );
        assert!(
            err.contains(&format!("port {taken} on 127.0.0.1 is in use")) && err.contains("--port"),
            "{err}"
        );
        assert!(!dir.path().join("mds").exists(), "no daemon started");
    }
}
