//! `curve bench` against real targets: verify through the nbd driver (two connections) and
//! the nebd driver on a RAM volume, and through the client driver on a cluster volume; JSON
//! carries the figures; a bad target is a clear error.

use std::process::Command;

use curve_tests::cluster::MiniCluster;
use curve_tests::{Part2, bin};

/// root's key of the cluster a test runs, if any (authentication is on).
static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn bench(args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(bin("curve"));
    if let Some(k) = KEY.get() {
        cmd.env("CURVE_KEY_FILE", k);
    }
    let out = cmd
        .arg("bench")
        .args(args)
        .args(["--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curve bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn clean(v: &serde_json::Value, ios: u64) {
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["mismatches"], 0, "{v}");
    assert_eq!(v["ios"], ios, "{v}");
    for k in [
        "iops",
        "bandwidth_bytes",
        "lat_p50_us",
        "lat_p99_us",
        "lat_p999_us",
    ] {
        if k == "bandwidth_bytes" && v["workload"] == "flush" {
            continue; // flushes move no data
        }
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    assert!(!v["histogram"].as_array().unwrap().is_empty());
}

#[test]
fn verify_through_nbd_and_nebd_drivers() {
    let p = Part2::start();
    let uri = p.export_mem("r", "64M");
    // Two jobs (two connections), 1500 verified writes each: 2 x 1500 x (write + read).
    let v = bench(&[
        "--driver",
        "nbd",
        "--target",
        &uri,
        "-w",
        "verify",
        "-q",
        "8",
        "-j",
        "2",
        "--io-count",
        "1500",
    ]);
    clean(&v, 6000);
    for w in [
        "randread",
        "randwrite",
        "rw",
        "trim",
        "flush",
        "write_zeroes",
    ] {
        let v = bench(&[
            "--driver",
            "nbd",
            "--target",
            &uri,
            "-w",
            w,
            "-q",
            "4",
            "--io-count",
            "200",
        ]);
        clean(&v, 200);
        assert_eq!(v["workload"], w);
    }
    let sock = p.part1_socket();
    let v = bench(&[
        "--driver",
        "nebd",
        "--target",
        sock.to_str().unwrap(),
        "--volume",
        "mem:16M",
        "-w",
        "verify",
        "-q",
        "8",
        "--io-count",
        "1000",
    ]);
    clean(&v, 2000);
    // Bad targets: clear errors, exit status 1.
    let out = Command::new(bin("curve"))
        .args(["bench", "--driver", "nbd", "--target"])
        .arg(uri.replace("/r?", "/missing?"))
        .args(["-t", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no export named"));
    let out = Command::new(bin("curve"))
        .args([
            "bench", "--driver", "nbd", "--target", "http://x", "-t", "1",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected nbd+unix"));
}

#[test]
fn verify_through_the_client_driver_on_a_cluster_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    let _ = KEY.set(cluster.key());
    let mds = cluster.mds_addrs()[0].clone();
    let out = Command::new(bin("curve"))
        .env("CURVE_KEY_FILE", cluster.key())
        .args(["--mds", &mds, "volume", "create", "/b", "--size", "2G"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two jobs: the second half of the volume is in the second segment.
    let v = bench(&[
        "--mds",
        &mds,
        "--driver",
        "client",
        "--target",
        "curve:/b",
        "-w",
        "verify",
        "-q",
        "8",
        "-j",
        "2",
        "--io-count",
        "200",
    ]);
    clean(&v, 800);
    // The run closed its session: a second run opens the volume at once (no OCCUPIED while a
    // lease lapses).
    let v = bench(&[
        "--mds",
        &mds,
        "--driver",
        "client",
        "--target",
        "curve:/b",
        "-w",
        "randread",
        "-q",
        "4",
        "--io-count",
        "100",
    ]);
    clean(&v, 100);
    // The same cluster through part1 -> part2 (the nebd driver opens curve:/b2 there).
    let out = Command::new(bin("curve"))
        .env("CURVE_KEY_FILE", cluster.key())
        .args(["--mds", &mds, "volume", "create", "/b2", "--size", "1G"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = Part2::start_with(&["--mds", &mds, "--key-file", &cluster.key()]);
    let sock = p.part1_socket();
    let v = bench(&[
        "--driver",
        "nebd",
        "--target",
        sock.to_str().unwrap(),
        "--volume",
        "curve:/b2",
        "-w",
        "verify",
        "-q",
        "8",
        "--io-count",
        "200",
    ]);
    clean(&v, 400);
}

#[test]
fn vhost_user_driver_against_qemu_storage_daemon() {
    let qsd = curve_tests::require_tool("qemu-storage-daemon");
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sock = tmp.path().join("vub.sock");
    let mut cmd = Command::new(qsd);
    cmd.arg("--blockdev")
        .arg(format!("driver=file,filename={},node-name=f", img.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=2",
            sock.display()
        ));
    let _qsd = curve_tests::Daemon::spawn(cmd, &tmp.path().join("qsd.log"));
    // Listening, not only bound: the socket file exists a moment before connects succeed.
    assert!(
        curve_tests::wait_until(std::time::Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        }),
        "qemu-storage-daemon listens on {}",
        sock.display()
    );
    let s = sock.to_str().unwrap();
    // Two queues, verified; then every request type.
    let v = bench(&[
        "--driver",
        "vhost-user",
        "--target",
        s,
        "-w",
        "verify",
        "-q",
        "8",
        "-j",
        "2",
        "--io-count",
        "1000",
    ]);
    clean(&v, 4000);
    // What the verify run wrote through virtio is in the image, read on the host: each job's
    // first block carries its pattern (offset, pass 0).
    let data = std::fs::read(&img).unwrap();
    for offset in [0usize, 32 << 20] {
        let mut expected = vec![0u8; 4096];
        curve_bench::workload::pattern(&mut expected, offset as u64, 0);
        assert!(
            data[offset..offset + 4096] == expected[..],
            "block at {offset}"
        );
    }
    for w in ["randread", "randwrite", "flush", "trim", "write_zeroes"] {
        let v = bench(&[
            "--driver",
            "vhost-user",
            "--target",
            s,
            "-w",
            w,
            "-q",
            "4",
            "--io-count",
            "200",
        ]);
        clean(&v, 200);
    }
}
