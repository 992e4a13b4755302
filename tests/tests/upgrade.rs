//! Live upgrade of part2 (`curve upgrade`): a new nebd-server takes every export, connection
//! and front-end of the running one while verifying loads run on all of them — our
//! vhost-user front-end (reconnects counted), our NBD client on a Unix and a TCP export,
//! qemu-io without reconnect-delay (its connection must survive), and libnebd (which
//! reconnects cleanly: part1 connections are closed once answered) — twice in a row. Then
//! every way an upgrade can fail, each a no-op the loads never see.

use std::process::{Command, Stdio};
use std::time::Duration;

use curve_tests::{Part2, bin, pid_alive, require_tool, wait_until};

fn image(p: &Part2, name: &str, size: u64) -> String {
    let path = p.path(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path.display().to_string()
}

/// `curve bench ... --format json` in a thread: its summary (panics on a failed run).
fn bench(args: Vec<String>) -> std::thread::JoinHandle<serde_json::Value> {
    std::thread::spawn(move || {
        let out = Command::new(bin("curve"))
            .arg("bench")
            .args(&args)
            .args(["--format", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bench {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    })
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `curve bench --driver DRIVER --target TARGET -w WORKLOAD -q QD EXTRA...` in a thread.
fn load(
    driver: &str,
    target: &str,
    workload: &str,
    qd: &str,
    extra: &[&str],
) -> std::thread::JoinHandle<serde_json::Value> {
    let mut args = strings(&[
        "--driver", driver, "--target", target, "-w", workload, "-q", qd,
    ]);
    args.extend(strings(extra));
    bench(args)
}

fn assert_clean(what: &str, v: &serde_json::Value) {
    assert_eq!(v["errors"], 0, "{what}: {v}");
    assert_eq!(v["mismatches"], 0, "{what}: {v}");
    assert!(v["ios"].as_u64().unwrap() > 0, "{what}: {v}");
    println!(
        "{what}: {} I/Os, longest {:.1} ms",
        v["ios"],
        v["lat_max_us"].as_f64().unwrap() / 1000.0
    );
}

#[test]
fn two_upgrades_under_vhost_user_nbd_qemu_io_and_libnebd_load() {
    require_tool("qemu-io");
    let mut p = Part2::start();
    let run = p.run_dir();
    let vu = run.join("vu.sock");
    let nbd_sock = run.join("n.sock");
    let port = curve_tests::cluster::free_port();
    let add = |args: &[&str]| p.curve_ok(&[&["export", "add"], args].concat());
    add(&[
        "--volume",
        &format!("file:{}", image(&p, "vu.img", 64 << 20)),
        "--vhost-user-blk",
        vu.to_str().unwrap(),
        "--queues",
        "2",
        "--name",
        "vu",
    ]);
    let n_uri = add(&[
        "--volume",
        &format!("file:{}", image(&p, "n.img", 32 << 20)),
        "--nbd",
        &format!("unix:{}", nbd_sock.display()),
        "--name",
        "n",
    ]);
    let t_uri = add(&[
        "--volume",
        &format!("file:{}", image(&p, "t.img", 32 << 20)),
        "--nbd",
        &format!("tcp:127.0.0.1:{port}"),
        "--name",
        "t",
    ]);
    // qemu-io shares the Unix socket with export n, on its own export.
    add(&[
        "--volume",
        &format!("file:{}", image(&p, "q.img", 16 << 20)),
        "--nbd",
        &format!("unix:{}", nbd_sock.display()),
        "--name",
        "q",
    ]);
    let before = p.curve_ok(&["export", "list", "--format", "json"]);
    let p1 = image(&p, "p1.img", 16 << 20);

    let secs = "6";
    let loads = vec![
        (
            "vhost-user (2 queues)",
            load(
                "vhost-user",
                vu.to_str().unwrap(),
                "verify",
                "16",
                &["-j", "2", "-t", secs],
            ),
        ),
        (
            "NBD on a Unix socket",
            load("nbd", n_uri.trim(), "verify", "8", &["-t", secs]),
        ),
        (
            "NBD over TCP",
            load("nbd", t_uri.trim(), "verify", "8", &["-t", secs]),
        ),
        (
            "libnebd (part1)",
            load(
                "nebd",
                run.join("nebd.sock").to_str().unwrap(),
                "verify",
                "8",
                &["--volume", &format!("file:{p1}"), "-t", secs],
            ),
        ),
    ];
    // qemu-io, no reconnect-delay: 64 KiB blocks written with patterns while the upgrades
    // happen, read back and compared at the end on the same connection.
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=q",
        nbd_sock.display()
    );
    let mut args = vec!["--image-opts".to_string(), opts];
    let blocks = 256u64;
    let writes = 6000u64;
    for i in 0..writes {
        args.push("-c".into());
        args.push(format!(
            "write -P {} {} 65536",
            i % 250 + 1,
            (i % blocks) * 65536
        ));
    }
    for b in 0..blocks {
        let last = (0..writes).rev().find(|i| i % blocks == b).unwrap();
        args.push("-c".into());
        args.push(format!("read -P {} {} 65536", last % 250 + 1, b * 65536));
    }
    let qemu_io = Command::new("qemu-io")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    std::thread::sleep(Duration::from_millis(1500));
    let first = p.upgrade(&[]);
    std::thread::sleep(Duration::from_millis(1000));
    let second = p.upgrade(&["--timeout-ms", "20000"]);
    for r in [&first, &second] {
        println!(
            "upgrade: pid {} -> {}, {} exports, {} connections, pause {:.1} ms",
            r["old_pid"],
            r["new_pid"],
            r["exports"],
            r["connections"],
            r["pause_us"].as_f64().unwrap() / 1000.0
        );
        assert_eq!(r["exports"], 4, "{r}");
        assert!(
            r["connections"].as_u64().unwrap() >= 4,
            "vhost-user, two NBD clients and qemu-io were connected: {r}"
        );
    }
    assert_ne!(first["new_pid"], second["new_pid"]);

    for (what, h) in loads {
        let v = h.join().unwrap();
        assert_clean(what, &v);
        if what.starts_with("vhost-user") {
            assert_eq!(v["reconnects"], 0, "the front-end never reconnected: {v}");
        }
    }
    let out = qemu_io.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io: {text}");
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io saw no error and every pattern verified: {}",
        &text[text.len().saturating_sub(2000)..]
    );
    assert_eq!(
        text.matches("read 65536/65536 bytes").count() as u64,
        blocks,
        "every block read back"
    );
    // The same exports, at the same addresses, served by the new process.
    let after = p.curve_ok(&["export", "list", "--format", "json"]);
    let uris = |s: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["uri"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(uris(&before), uris(&after));
    let log = p.log();
    assert_eq!(log.matches("took over: serving").count(), 2, "{log}");
    // A crash after the upgrades is still only a pause: the metafile is the new process's.
    p.kill9_and_restart();
    // The restarted server answers its control socket first and then restores the exports
    // from the metafile: a new client (not a reconnecting one) waits until its export
    // negotiates again (the killed process's socket file refuses until then).
    assert!(
        curve_tests::wait_until(Duration::from_secs(30), || {
            Command::new("nbdinfo")
                .args(["--size", n_uri.trim()])
                .output()
                .is_ok_and(|o| o.status.success())
        }),
        "the NBD export negotiates again within 30 s of the restart:\n{}",
        p.log()
    );
    let v = load("nbd", n_uri.trim(), "verify", "4", &["--io-count", "500"]).join();
    let Ok(v) = v else {
        panic!(
            "NBD load after the restart failed; the servers' logs:\n{}",
            p.log()
        );
    };
    assert_clean("NBD after kill -9 of the upgraded server", &v);
}

/// A `--binary` that runs nebd-server with a failpoint set.
fn failing_binary(p: &Part2, failpoint: &str) -> String {
    let path = p.path(&format!("nebd-{failpoint}.sh"));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nNEBD_FAILPOINT={failpoint} exec {} \"$@\"\n",
            bin("nebd-server").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

#[test]
fn failed_upgrades_are_no_ops_the_load_never_sees() {
    let mut p = Part2::start();
    let vu = p.run_dir().join("vu.sock");
    p.curve_ok(&[
        "export",
        "add",
        "--volume",
        &format!("file:{}", image(&p, "vu.img", 32 << 20)),
        "--vhost-user-blk",
        vu.to_str().unwrap(),
        "--name",
        "vu",
    ]);
    let n_uri = p.curve_ok(&[
        "export",
        "add",
        "--volume",
        &format!("file:{}", image(&p, "n.img", 16 << 20)),
        "--nbd",
        &format!("unix:{}", p.run_dir().join("n.sock").display()),
        "--name",
        "n",
    ]);
    let secs = "14";
    let vhost = load(
        "vhost-user",
        vu.to_str().unwrap(),
        "verify",
        "8",
        &["-t", secs],
    );
    let nbd = load("nbd", n_uri.trim(), "verify", "8", &["-t", secs]);
    std::thread::sleep(Duration::from_millis(500));
    let old = p.pid();
    let refused = |args: &[&str], what: &str| {
        let out = p.curve(&[&["upgrade", "--timeout-ms", "5000"], args].concat());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(what), "{args:?}: {err}");
        assert!(pid_alive(old), "the old server runs on after {args:?}");
        // It serves: the control socket answers and lists both exports.
        let list = p.curve_ok(&["export", "list", "--format", "json"]);
        assert!(list.contains("\"vu\"") && list.contains("\"n\""), "{list}");
        println!("refused as expected: {}", err.trim());
    };
    refused(
        &["--binary", "/nonexistent/nebd-server"],
        "/nonexistent/nebd-server",
    );
    let plain = p.path("not-executable");
    std::fs::write(&plain, "x").unwrap();
    refused(&["--binary", plain.to_str().unwrap()], "not an executable");
    refused(&["--binary", "/bin/false"], "before taking over");
    for (fp, what) in [
        ("takeover-offer-received", "went away"),
        ("takeover-abort", "refused"),
        ("takeover-before-prepared", "went away"),
    ] {
        let b = failing_binary(&p, fp);
        refused(&["--binary", &b], what);
    }
    // The old one stuck (SIGSTOP): a new one started by hand gives up; the old one, once
    // going again, finds nobody to hand over to and resumes.
    p.signal(libc::SIGSTOP);
    let out = Command::new(bin("nebd-server"))
        .arg("--run-dir")
        .arg(p.run_dir())
        .args(["--takeover", "--takeover-timeout-ms", "1000"])
        .output()
        .unwrap();
    p.signal(libc::SIGCONT);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("offer"), "{err}");
    assert!(
        wait_until(Duration::from_secs(10), || p
            .log()
            .contains("hand-over failed")),
        "the old server noticed: {}",
        p.log()
    );
    assert!(pid_alive(old));
    // A good upgrade still works after all that.
    let r = p.upgrade(&[]);
    assert_ne!(r["new_pid"].as_u64().unwrap() as u32, old);
    for (what, h) in [("vhost-user", vhost), ("NBD", nbd)] {
        let v = h.join().unwrap();
        assert_clean(what, &v);
        if what == "vhost-user" {
            assert_eq!(v["reconnects"], 0, "{v}");
        }
    }
    // Not a nebd-server run dir at all: a clear error.
    let out = Command::new(bin("nebd-server"))
        .arg("--run-dir")
        .arg(p.path("nowhere"))
        .arg("--takeover")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no nebd-server to take over"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What systemd (`Type=notify`, `NotifyAccess=all`, deploy/systemd/nebd-server.service) hears,
/// on a notify socket of our own: READY=1 when part2 serves; on a live upgrade the old process
/// names the new main PID (MAINPID=) before it exits, and the new one says READY=1.
#[test]
fn systemd_hears_ready_and_the_new_main_pid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // SAFETY: set before any thread of this test process reads the environment (nextest runs
    // each test in a process of its own); part2 inherits it.
    unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
    let mut p = Part2::start();
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    let r = p.upgrade(&[]);
    let new = r["new_pid"].as_u64().unwrap();
    let mut got = vec![next(), next()];
    got.sort();
    assert_eq!(got, vec![format!("MAINPID={new}"), "READY=1".to_owned()]);
}
