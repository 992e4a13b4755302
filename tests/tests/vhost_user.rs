//! vhost-user-blk exports of part2, driven by `curve bench --driver vhost-user` (a userspace
//! virtio-blk front-end): verify on two queues, every request type, the data seen through
//! an NBD export of the same file, a second front-end after the first left, the export
//! re-created on the same socket after kill -9 of part2, and bad export requests.

use std::process::Command;

use curve_tests::{Part2, bin, run_ok};

fn bench(sock: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("curve"))
        .args([
            "bench",
            "--driver",
            "vhost-user",
            "--target",
            sock,
            "--format",
            "json",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["mismatches"], 0, "{v}");
    v
}

#[test]
fn vhost_user_blk_export_serves_verifies_and_comes_back_after_kill_9() {
    let mut p = Part2::start();
    let file = p.dir.path().join("vol.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sock = p.run_dir().join("vu.sock");
    let s = sock.to_str().unwrap().to_string();
    let printed = p.curve_ok(&[
        "export",
        "add",
        "--volume",
        &format!("file:{}", file.display()),
        "--vhost-user-blk",
        &s,
        "--queues",
        "2",
        "--name",
        "vu",
    ]);
    assert_eq!(
        printed.trim(),
        s,
        "export add prints the socket QEMU connects to"
    );
    let v = bench(
        &s,
        &["-w", "verify", "-q", "16", "-j", "2", "--io-count", "2000"],
    );
    assert_eq!(v["ios"], 8000);
    // What went through virtio is in the file, and reads back through an NBD export of it.
    let nbd = p.curve_ok(&[
        "export",
        "add",
        "--volume",
        &format!("file:{}", file.display()),
        "--nbd",
        &format!("unix:{}", p.run_dir().join("n.sock").display()),
        "--name",
        "n",
    ]);
    let mut expected = vec![0u8; 4096];
    curve_bench::workload::pattern(&mut expected, 32 << 20, 0);
    let img = std::fs::read(&file).unwrap();
    assert!(
        img[32 << 20..(32 << 20) + 4096] == expected[..],
        "second queue's first block"
    );
    let copy = p.dir.path().join("copy.img");
    run_ok(Command::new("nbdcopy").arg(nbd.trim()).arg(&copy));
    assert!(
        std::fs::read(&copy).unwrap() == img,
        "NBD sees what vhost-user wrote"
    );
    for w in [
        "randread",
        "randwrite",
        "flush",
        "trim",
        "write_zeroes",
        "read",
    ] {
        bench(&s, &["-w", w, "-q", "8", "--io-count", "300"]);
    }
    // kill -9 of part2: the export comes back on the same socket (metafile), and serves.
    p.kill9_and_restart();
    // Listening again, not only there: the killed process's socket file refuses until the
    // restarted one has restored the export.
    assert!(
        curve_tests::wait_until(std::time::Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        }),
        "the vhost-user export listens again after the restart"
    );
    bench(&s, &["-w", "verify", "-q", "4", "--io-count", "500"]);
    let list = p.curve_ok(&["export", "list", "--format", "json"]);
    assert!(list.contains("vhost_user_blk"), "{list}");
    // Bad requests: a relative socket path is made absolute; zero queues are refused.
    let out = p.curve(&[
        "export",
        "add",
        "--volume",
        "mem:1M",
        "--vhost-user-blk",
        "/tmp/x.sock",
        "--queues",
        "0",
        "--name",
        "bad",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("queues"));
    let out = p.curve(&["export", "add", "--volume", "mem:1M", "--name", "none"]);
    assert!(!out.status.success(), "a frontend is required");
}

/// kill -9 of part2 under a verifying vhost-user front-end (two queues) on a volume that
/// completes every 5th request 20 ms late: requests complete out of order, so after the
/// restart only the inflight buffer tells the new back-end which ones to redo. The front-end
/// reconnects (as QEMU's `reconnect=1` does) and sees a pause: 0 errors, 0 mismatches.
#[test]
fn kill_9_of_part2_with_out_of_order_completions_is_invisible_to_the_front_end() {
    let mut p = Part2::start();
    let file = p.dir.path().join("vol.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let sock = p.run_dir().join("vu.sock");
    let s = sock.to_str().unwrap().to_string();
    p.curve_ok(&[
        "export",
        "add",
        "--volume",
        &format!("delay:5:20:file:{}", file.display()),
        "--vhost-user-blk",
        &s,
        "--queues",
        "2",
        "--name",
        "vu",
    ]);
    let s2 = s.clone();
    let run =
        std::thread::spawn(move || bench(&s2, &["-w", "verify", "-q", "16", "-j", "2", "-t", "6"]));
    std::thread::sleep(std::time::Duration::from_secs(2));
    p.kill9_and_restart();
    let v = run.join().unwrap();
    println!(
        "{} I/Os, longest {:.0} ms (the restart)",
        v["ios"],
        v["lat_max_us"].as_f64().unwrap() / 1000.0
    );
    let log = p.log_of(1);
    assert!(log.contains("inflight_tracking=true"), "{log}");
    assert!(
        log.contains("resubmitting inflight requests"),
        "with 20 ms requests in flight, the new part2 had some to redo:\n{log}"
    );
}
