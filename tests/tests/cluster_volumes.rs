//! Cluster volumes served by part2: bad input at the CLI and on the NBD wire, per-volume QoS
//! under load, and three MDS on etcd with kill -9 of the leader under a verifying fio.

use std::process::Command;
use std::time::{Duration, Instant};

use curve_tests::cluster::MiniCluster;
use curve_tests::{Part2, bin, require_tool, run_ok, wait_until};

/// root's key of the cluster the test runs (authentication is on).
static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn curve(mds: &str, run_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("curve"))
        .env("CURVE_KEY_FILE", KEY.get().expect("a cluster runs"))
        .args(["--mds", mds, "--run-dir"])
        .arg(run_dir)
        .args(args)
        .output()
        .unwrap()
}

fn fails_with(out: std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail with {what}");
    assert!(err.contains(what), "expected {what:?} in: {err}");
}

#[test]
fn bad_input_and_qos_on_cluster_volumes() {
    require_tool("fio");
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    let _ = KEY.set(cluster.key());
    let mds = cluster.mds_addrs()[0].clone();
    let part2 = Part2::start_with(&["--mds", &mds, "--key-file", &cluster.key()]);
    let run = part2.run_dir();
    let ok = |args: &[&str]| {
        let out = curve(&mds, &run, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    ok(&["volume", "create", "/v", "--size", "1G"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["volume", "info", "/v", "--format", "json"])).unwrap();
    assert_eq!(info[0]["size"], 1u64 << 30);
    // CLI errors.
    fails_with(
        curve(&mds, &run, &["volume", "create", "/v", "--size", "1G"]),
        "Exists",
    );
    fails_with(
        curve(&mds, &run, &["volume", "create", "/w", "--size", "0"]),
        "Invalid",
    );
    fails_with(
        curve(&mds, &run, &["volume", "info", "/missing"]),
        "NotFound",
    );
    fails_with(
        curve(&mds, &run, &["volume", "extend", "/v", "--size", "512M"]),
        "ShrinkRefused",
    );
    // Exports of a missing volume, and of one another client holds, are refused clearly.
    let sock = |n: &str| format!("unix:{}", run.join(format!("{n}.sock")).display());
    fails_with(
        curve(
            &mds,
            &run,
            &[
                "export",
                "add",
                "--volume",
                "curve:/missing",
                "--nbd",
                &sock("m"),
                "--name",
                "m",
            ],
        ),
        "NotFound",
    );
    ok(&["volume", "create", "/held", "--size", "1G"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let other = cluster.mds_client();
    let (_, session, _) = rt
        .block_on(other.open("/held", "root", "another-host"))
        .unwrap();
    fails_with(
        curve(
            &mds,
            &run,
            &[
                "export",
                "add",
                "--volume",
                "curve:/held",
                "--nbd",
                &sock("h"),
                "--name",
                "h",
            ],
        ),
        "Occupied",
    );
    rt.block_on(other.close("/held", &session.session_id))
        .unwrap();
    // The daemon keeps serving: the volume exports fine.
    let uri = ok(&[
        "export",
        "add",
        "--volume",
        "curve:/v",
        "--nbd",
        &sock("v"),
        "--name",
        "v",
    ]);
    let uri = uri.trim().to_string();
    // IO past the end: an error on the wire (EINVAL), the connection stays usable.
    let (mut c, size, _) = curve_tests::nbd::Client::open(&run.join("v.sock"), "v", false).unwrap();
    assert_eq!(size, 1 << 30);
    c.request(0, 0, 1, 1 << 30, 4096, &[]).unwrap();
    assert_eq!(c.reply(4096).unwrap().error, 22, "EINVAL past the end");
    c.request(1, 0, 2, (1 << 30) - 4096, 4096, &[7u8; 4096])
        .unwrap();
    assert_eq!(c.reply(0).unwrap().error, 0);
    c.request(0, 0, 3, (1 << 30) - 4096, 4096, &[]).unwrap();
    assert_eq!(c.reply(4096).unwrap().data, vec![7u8; 4096]);
    drop(c);

    // QoS: 100 write IOPS (a 100 ms burst), applied by the client at its next lease refresh.
    ok(&[
        "volume",
        "qos",
        "/v",
        "--write-iops",
        "100",
        "--burst-ms",
        "100",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    let out = run_ok(Command::new("fio").args([
        "--name=qos",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=16M",
        "--ramp_time=1",
        "--time_based",
        "--runtime=6",
        "--output-format=json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let iops = v["jobs"][0]["write"]["iops"].as_f64().unwrap();
    println!("QoS 100 write IOPS at QD32: {iops:.0}");
    assert!((90.0..=110.0).contains(&iops), "100 ± 10%: {iops}");
    // Lifted: faster than the limit again.
    ok(&["volume", "qos", "/v"]);
    std::thread::sleep(Duration::from_secs(3));
    let out = run_ok(Command::new("fio").args([
        "--name=free",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=16M",
        "--time_based",
        "--runtime=3",
        "--output-format=json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let free = v["jobs"][0]["write"]["iops"].as_f64().unwrap();
    println!("unlimited: {free:.0}");
    assert!(free > 150.0, "{free}");
}

#[test]
fn three_mds_on_etcd_kill_9_of_the_leader_is_invisible_to_fio() {
    require_tool("fio");
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = MiniCluster::start(tmp.path(), 3, true);
    let _ = KEY.set(cluster.key());
    let addrs = cluster.mds_addrs();
    let part2 = Part2::start_with(&["--mds", &addrs.join(","), "--key-file", &cluster.key()]);
    let run = part2.run_dir();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mds = cluster.mds_client();
    rt.block_on(mds.create(
        "/v",
        curve_proto::mds::FileType::Volume,
        4 << 30,
        4096,
        "curve",
    ))
    .unwrap();
    let leader = rt.block_on(mds.current());
    let sock = run.join("v.sock");
    let uri = part2.curve_ok(&[
        "export",
        "add",
        "--volume",
        "curve:/v",
        "--nbd",
        &format!("unix:{}", sock.display()),
        "--name",
        "v",
    ]);
    let uri = uri.trim().to_string();
    // Writes spread over three segments, so some allocate while the MDS leader is gone.
    let writer = std::thread::spawn(move || {
        run_ok(Command::new("fio").args([
            "--name=spread",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--size=3G",
            "--time_based",
            "--runtime=15",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
        ]))
    });
    std::thread::sleep(Duration::from_secs(4));
    let idx = addrs.iter().position(|a| *a == leader).unwrap();
    let t = Instant::now();
    cluster.mds[idx].kill9();
    let out = writer.join().unwrap();
    assert!(out.contains("err= 0"), "{out}");
    // Another MDS leads, and the volume's sessions and segments are there.
    let info = rt.block_on(mds.stat("/v")).unwrap();
    assert_eq!(info.epoch, 1);
    assert_ne!(rt.block_on(mds.current()), leader);
    println!(
        "MDS leader killed {:?} before the end of the run",
        t.elapsed()
    );
}

/// A cluster volume served over NBD under fio verify while part2 is upgraded live twice: the
/// volume's MDS session is handed over (no new open: the epoch stays 1, so nothing the old
/// process wrote is fenced and the new one is never OCCUPIED), fio sees no error.
#[test]
fn live_upgrades_of_part2_keep_the_cluster_session_under_fio_verify() {
    require_tool("fio");
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    let _ = KEY.set(cluster.key());
    let addrs = cluster.mds_addrs();
    let mut part2 = Part2::start_with(&["--mds", &addrs.join(","), "--key-file", &cluster.key()]);
    let run = part2.run_dir();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mds = cluster.mds_client();
    rt.block_on(mds.create(
        "/v",
        curve_proto::mds::FileType::Volume,
        1 << 30,
        4096,
        "curve",
    ))
    .unwrap();
    let sock = run.join("v.sock");
    let uri = part2
        .curve_ok(&[
            "export",
            "add",
            "--volume",
            "curve:/v",
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            "v",
        ])
        .trim()
        .to_string();
    let writer = std::thread::spawn(move || {
        run_ok(Command::new("fio").args([
            "--name=upgrade",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=256M",
            "--time_based",
            "--runtime=10",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
        ]))
    });
    std::thread::sleep(Duration::from_secs(3));
    let first = part2.upgrade(&[]);
    std::thread::sleep(Duration::from_secs(2));
    let second = part2.upgrade(&[]);
    let out = writer.join().unwrap();
    assert!(out.contains("err= 0"), "{out}");
    let info = rt.block_on(mds.stat("/v")).unwrap();
    assert_eq!(info.epoch, 1, "the session was handed over, never reopened");
    let log = part2.log();
    assert_eq!(log.matches("volume session taken over").count(), 2, "{log}");
    assert!(
        !log.contains("OCCUPIED") && !log.to_lowercase().contains("fenced"),
        "{log}"
    );
    println!(
        "cluster volume under fio verify: part2 paused {:.1} ms and {:.1} ms\n{}",
        first["pause_us"].as_f64().unwrap() / 1000.0,
        second["pause_us"].as_f64().unwrap() / 1000.0,
        log.lines()
            .filter(|l| l.contains("paused for") || l.contains("offer") || l.contains("took over"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Clients that stop close their sessions: a volume is free for another client at once, not
/// after its 20 s lease. nebd-server stopped with SIGTERM, and `curve bench --driver client`
/// interrupted with Ctrl-C (SIGINT) in the middle of its run.
#[test]
fn stopped_clients_free_their_volumes_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    let _ = KEY.set(cluster.key());
    let mds = cluster.mds_addrs()[0].clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = cluster.mds_client();
    for v in ["/p", "/b"] {
        cluster.create_volume(v, 1 << 30);
    }
    // Opened by another host right after the client stopped: no OCCUPIED.
    let free_now = |path: &str| {
        let (_, s, _) = rt
            .block_on(client.open(path, "curve", "another-host"))
            .unwrap_or_else(|e| panic!("{path} should be free at once: {e}"));
        rt.block_on(client.close(path, &s.session_id)).unwrap();
    };

    let part2 = Part2::start_with(&["--mds", &mds, "--key-file", &cluster.key()]);
    part2.export_nbd("p", "curve:/p");
    assert!(
        rt.block_on(client.open("/p", "curve", "another-host"))
            .is_err(),
        "held while exported"
    );
    part2.signal(libc::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(30), || !curve_tests::pid_alive(
            part2.pid()
        )),
        "nebd-server stops on SIGTERM (waited 30 s)"
    );
    free_now("/p");

    let log = tmp.path().join("bench.log");
    let mut cmd = Command::new(bin("curve"));
    cmd.env("CURVE_KEY_FILE", cluster.key())
        .args(["--mds", &mds, "bench", "--driver", "client"])
        .args([
            "--target",
            "curve:/b",
            "-w",
            "randwrite",
            "-q",
            "4",
            "-t",
            "120",
        ]);
    let mut bench = curve_tests::Daemon::spawn(cmd, &log);
    // Writing: its first write allocated a segment (asked without taking the volume).
    let writing = wait_until(Duration::from_secs(60), || {
        rt.block_on(client.segment("/b", "curve", 0, false))
            .is_ok_and(|s| s.is_some())
    });
    assert!(
        writing,
        "the bench writes to its volume (waited 60 s): {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        rt.block_on(client.open("/b", "curve", "another-host"))
            .is_err_and(|e| e.status() == Some(curve_proto::mds::MdsStatus::Occupied)),
        "held while the bench runs"
    );
    std::thread::sleep(Duration::from_secs(2));
    bench.signal(libc::SIGINT);
    let code = bench.wait(Duration::from_secs(60));
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(0), "an interrupted bench ends cleanly: {out}");
    free_now("/b");
}

/// Peak resident memory of a process (VmHWM), bytes.
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        << 10
}

/// One NBD client pipelining 32 MiB writes (the largest NBD takes) as fast as its socket
/// lets it: nebd-server stops reading that socket while the connection holds its budget
/// (64 MiB), so its memory stays bounded however much the client sends, and every write
/// completes. Before, it queued up to 512 requests per connection (6.5 GB RSS seen).
#[test]
fn pipelined_maximum_size_writes_keep_nebd_server_memory_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    let mds = cluster.mds_addrs()[0].clone();
    let part2 = Part2::start_with(&["--mds", &mds, "--key-file", &cluster.key()]);
    cluster.create_volume("/m", 1 << 30);
    let (_, sock) = part2.export_nbd("m", "curve:/m");
    let base = peak_rss(part2.pid());
    let (mut c, _, _) = curve_tests::nbd::Client::open(&sock, "m", false).unwrap();
    c.sock
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    const WRITES: u64 = 12;
    const LEN: usize = 32 << 20;
    let mut w = c.sock.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let payload = vec![0x5au8; LEN];
        for i in 0..WRITES {
            let mut head = Vec::new();
            curve_nbd::proto::encode_request(
                &mut head,
                &curve_nbd::proto::RequestHeader {
                    flags: 0,
                    kind: curve_nbd::proto::cmd::WRITE,
                    cookie: i,
                    offset: (i * LEN as u64) % (1 << 30),
                    len: LEN as u32,
                },
            );
            std::io::Write::write_all(&mut w, &head).unwrap();
            std::io::Write::write_all(&mut w, &payload).unwrap();
        }
    });
    let started = Instant::now();
    for _ in 0..WRITES {
        let r = c.reply(0).unwrap();
        assert_eq!(r.error, 0, "write {} failed", r.cookie);
    }
    writer.join().unwrap();
    let peak = peak_rss(part2.pid());
    println!(
        "{WRITES} pipelined 32 MiB writes in {:.1} s: nebd-server peak RSS {} MiB (at start {} MiB)",
        started.elapsed().as_secs_f64(),
        peak >> 20,
        base >> 20
    );
    // The connection's budget (64 MiB) plus the request that crossed it, the client's copy
    // of what is in flight and its gRPC buffers: well under 384 MiB. Unbounded, the 384 MiB
    // sent would all be held, twice.
    assert!(peak < 384 << 20, "peak RSS {} MiB", peak >> 20);
}

/// A caller of the client library that issues without bound (48 concurrent 1 MiB writes, then
/// 48 reads) is held to the volume's budget of bytes in flight: with 8 MiB, at most 8 MiB is
/// ever in flight and every request completes (backpressure, no error) with its data intact;
/// the same load on a volume with a 128 MiB budget puts all 48 MiB in flight at once, and the
/// default budget (32 MiB) holds it to 32 MiB.
#[test]
fn the_client_holds_no_more_than_its_budget_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    cluster.create_volume("/small", 256 << 20);
    cluster.create_volume("/large", 256 << 20);
    cluster.create_volume("/default", 256 << 20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut opts = cluster.volume_options();
    opts.max_inflight_bytes = 8 << 20;
    let small = rt.block_on(cluster.open_volume_with("/small", opts.clone()));
    opts.max_inflight_bytes = 128 << 20;
    let large = rt.block_on(cluster.open_volume_with("/large", opts));
    let default = rt.block_on(cluster.open_volume("/default"));
    const N: u64 = 48;
    let pattern = |i: u64| vec![(i as u8).wrapping_mul(7).wrapping_add(1); 1 << 20];
    for v in [&small, &large, &default] {
        let writes = (0..N).map(|i| {
            let v = v.clone();
            async move { v.write(i << 20, &pattern(i)).await }
        });
        let done = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(300), futures::future::join_all(writes))
                .await
                .expect("48 writes of 1 MiB within 300 s")
        });
        for (i, r) in done.into_iter().enumerate() {
            r.unwrap_or_else(|e| panic!("{}: write {i}: {e}", v.path()));
        }
        let reads = (0..N).map(|i| {
            let v = v.clone();
            async move {
                let mut buf = vec![0u8; 1 << 20];
                v.read(i << 20, &mut buf).await.map(|_| buf)
            }
        });
        let done = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(300), futures::future::join_all(reads))
                .await
                .expect("48 reads of 1 MiB within 300 s")
        });
        for (i, r) in done.into_iter().enumerate() {
            let buf = r.unwrap_or_else(|e| panic!("{}: read {i}: {e}", v.path()));
            assert!(
                buf == pattern(i as u64),
                "{}: block {i} reads back",
                v.path()
            );
        }
        assert_eq!(v.inflight().held(), 0, "{}: nothing held after", v.path());
    }
    let (peak_small, peak_large, peak_default) = (
        small.inflight().peak(),
        large.inflight().peak(),
        default.inflight().peak(),
    );
    println!(
        "peak bytes in flight: budget 8 MiB {peak_small}, 128 MiB {peak_large}, default \
         {peak_default}"
    );
    assert!(peak_small <= 8 << 20, "the 8 MiB budget held: {peak_small}");
    assert_eq!(
        peak_large,
        N << 20,
        "with a budget larger than the load all 48 MiB go at once"
    );
    assert!(
        peak_default <= curve_client::budget::VOLUME_DEFAULT && peak_default > 8 << 20,
        "the default budget held: {peak_default}"
    );
    assert!(curve_client::budget::PROCESS.peak() <= curve_client::budget::PROCESS.total());
    rt.block_on(async {
        small.close().await.unwrap();
        large.close().await.unwrap();
        default.close().await.unwrap();
    });
}
