//! The `curve` CLI and the nebd-server daemon: errors, listing, removal, shutdown, run dir.

use std::process::Command;
use std::time::Duration;

use curve_nbd::proto::cmd;
use curve_tests::nbd::Client;
use curve_tests::{Daemon, Part2, bin, wait_until};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn no_server_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("curve"))
        .args(["export", "list"])
        .env("CURVE_RUN_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("cannot reach nebd-server") && err.contains("control.sock"),
        "{err}"
    );
}

#[test]
fn bad_requests_get_messages_and_the_server_keeps_serving() {
    let p2 = Part2::start();
    let sock = format!("unix:{}", p2.path("a.sock").display());
    let cases: [(&[&str], &str); 6] = [
        (
            &["--volume", "mem:lots", "--nbd", &sock, "--name", "a"],
            "bad volume",
        ),
        (
            &["--volume", "rbd:pool/img", "--nbd", &sock, "--name", "a"],
            "expected mem:SIZE",
        ),
        (
            &["--volume", "mem:1M", "--nbd", "http://x", "--name", "a"],
            "expected unix:PATH or tcp:HOST:PORT",
        ),
        (
            &["--volume", "mem:1M", "--nbd", &sock, "--name", "a b"],
            "bad export name",
        ),
        (
            &[
                "--volume",
                "file:/nonexistent/img",
                "--nbd",
                &sock,
                "--name",
                "a",
            ],
            "/nonexistent/img",
        ),
        (
            &[
                "--volume",
                "mem:1M",
                "--nbd",
                "tcp:203.0.113.1:1",
                "--name",
                "a",
            ],
            "cannot listen",
        ),
    ];
    for (args, want) in cases {
        let mut full = vec!["export", "add"];
        full.extend_from_slice(args);
        let out = p2.curve(&full);
        assert_eq!(out.status.code(), Some(1), "{full:?}");
        assert!(
            stderr_of(&out).contains(want),
            "{full:?}: {}",
            stderr_of(&out)
        );
    }
    p2.export_mem("a", "1M");
    let out = p2.curve(&[
        "export", "add", "--volume", "mem:1M", "--nbd", &sock, "--name", "a",
    ]);
    assert!(
        stderr_of(&out).contains("already exists"),
        "{}",
        stderr_of(&out)
    );
    let out = p2.curve(&["export", "remove", "zzz"]);
    assert!(
        stderr_of(&out).contains("no export named \"zzz\""),
        "{}",
        stderr_of(&out)
    );
    // Garbage on the control socket gets an error line, not a crash.
    let mut c = nebd_server::control::ControlClient::connect(&p2.run_dir()).unwrap();
    let r = c.call(&nebd_server::control::Request::ListExports).unwrap();
    assert_eq!(r.exports.len(), 1);
    {
        use std::io::{BufRead, BufReader, Write};
        let mut s =
            std::os::unix::net::UnixStream::connect(p2.run_dir().join("control.sock")).unwrap();
        s.write_all(b"{not json\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(
            line.contains("\"ok\":false") && line.contains("bad request"),
            "{line}"
        );
    }
    let list = p2.curve_ok(&["export", "list", "--format", "json"]);
    let j: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(j.as_array().unwrap().len(), 1);
    assert_eq!(j[0]["volume"], "mem:1048576");
    assert_eq!(j[0]["frontend"]["type"], "nbd");
}

#[test]
fn several_exports_share_a_socket_and_remove_closes_clients() {
    let p2 = Part2::start();
    let sock = p2.path("shared.sock");
    for name in ["one", "two"] {
        p2.curve_ok(&[
            "export",
            "add",
            "--volume",
            "mem:1M",
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            name,
        ]);
    }
    let (mut c1, size, _) = Client::open(&sock, "one", false).unwrap();
    assert_eq!(size, 1 << 20);
    let (mut c2, _, _) = Client::open(&sock, "two", false).unwrap();
    assert!(wait_until(Duration::from_secs(5), || p2
        .curve_ok(&["export", "list"])
        .contains("  1  ")));
    p2.curve_ok(&["export", "remove", "one"]);
    // The client of the removed export is disconnected; the other keeps working.
    assert!(c1.closed_by_server());
    c2.request(cmd::READ, 0, 7, 0, 512, &[]).unwrap();
    assert_eq!(c2.reply(512).unwrap().error, 0);
    assert!(sock.exists());
    p2.curve_ok(&["export", "remove", "two"]);
    assert!(c2.closed_by_server());
    assert!(!sock.exists(), "the socket goes with the last export on it");
    assert_eq!(
        p2.curve_ok(&["export", "list", "--format", "json"]).trim(),
        "[]"
    );
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut p2 = Part2::start();
    p2.export_mem("vol", "1M");
    let (_client, _, _) = Client::open(&p2.socket("vol"), "vol", false).unwrap();
    p2.daemon.signal(libc::SIGTERM);
    assert_eq!(
        p2.daemon.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        p2.log()
    );
    assert!(!p2.run_dir().join("control.sock").exists());
    assert!(!p2.run_dir().join("nebd-server.pid").exists());
    assert!(!p2.socket("vol").exists());
    assert!(p2.log().contains("nebd-server stopped"));
}

#[test]
fn one_server_per_run_dir_and_exports_come_back_after_kill_9() {
    let mut p2 = Part2::start();
    // A second server on the same run dir is refused.
    let out = Command::new(bin("nebd-server"))
        .env("CURVE_RUN_DIR", p2.run_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("another nebd-server") && err.contains(&p2.daemon.pid().to_string()),
        "{err}"
    );
    // kill -9 leaves the sockets behind; a new server on the same dir replaces them and
    // re-creates the export from its metafile, on the same socket.
    p2.export_mem("vol", "1M");
    p2.daemon.signal(libc::SIGKILL);
    p2.daemon.wait(Duration::from_secs(10));
    assert!(p2.socket("vol").exists() && p2.run_dir().join("control.sock").exists());
    let mut cmd = Command::new(bin("nebd-server"));
    cmd.env("CURVE_RUN_DIR", p2.run_dir());
    let _second = Daemon::spawn(cmd, &p2.path("second.log"));
    assert!(wait_until(Duration::from_secs(10), || p2
        .curve(&["export", "list"])
        .status
        .success()));
    assert!(p2.curve_ok(&["export", "list"]).contains("vol"));
    let (mut c, _, _) = Client::open(&p2.socket("vol"), "vol", false).unwrap();
    c.request(cmd::READ, 0, 1, 0, 512, &[]).unwrap();
    assert_eq!(c.reply(512).unwrap().error, 0);
}

#[test]
fn a_corrupt_metafile_is_refused_with_a_clear_error() {
    let mut p2 = Part2::start();
    p2.export_mem("vol", "1M");
    p2.daemon.signal(libc::SIGKILL);
    p2.daemon.wait(Duration::from_secs(10));
    let meta = p2.run_dir().join("nebd-server.meta");
    let mut bytes = std::fs::read(&meta).unwrap();
    bytes[5] ^= 0x20; // one flipped bit inside the JSON
    std::fs::write(&meta, &bytes).unwrap();
    let out = Command::new(bin("nebd-server"))
        .arg("--run-dir")
        .arg(p2.run_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("nebd-server.meta is corrupt") && err.contains("checksum"),
        "{err}"
    );
    // Nothing was silently replaced.
    assert_eq!(std::fs::read(&meta).unwrap(), bytes);
}

#[test]
fn removed_exports_stay_removed_after_a_restart() {
    let mut p2 = Part2::start();
    p2.export_mem("keep", "1M");
    p2.export_mem("gone", "1M");
    p2.curve_ok(&["export", "remove", "gone"]);
    p2.kill9_and_restart();
    let list = p2.curve_ok(&["export", "list", "--format", "json"]);
    let j: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["keep"], "{}", p2.log());
}

/// This host's kernel has no ublk driver (the guest tests have one): `--ublk` says which module
/// is missing, and part2 serves on.
#[test]
fn ublk_without_the_driver_names_the_module() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        eprintln!("skipped: this kernel has ublk_drv loaded");
        return;
    }
    let p2 = Part2::start();
    let out = p2.curve(&[
        "export", "add", "--volume", "mem:16M", "--ublk", "--name", "u0",
    ]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("ublk_drv") && err.contains("/dev/ublk-control"),
        "{err}"
    );
    // Options are checked before the driver: a depth above the kernel's limit says so.
    let out = p2.curve(&[
        "export",
        "add",
        "--volume",
        "mem:16M",
        "--ublk",
        "--queue-depth",
        "5000",
        "--name",
        "u0",
    ]);
    assert!(
        stderr_of(&out).contains("queue depth 5000"),
        "{}",
        stderr_of(&out)
    );
    // --queue-depth belongs to --ublk.
    let out = p2.curve(&[
        "export",
        "add",
        "--volume",
        "mem:16M",
        "--nbd",
        "unix:/tmp/x.sock",
        "--queue-depth",
        "8",
        "--name",
        "u0",
    ]);
    assert!(!out.status.success());
    p2.export_mem("still", "1M");
    assert!(p2.curve_ok(&["export", "list"]).contains("still"));
}

/// `--nbd-device` on a kernel without the nbd driver (this host's): a message naming the
/// module, part2 serving on. Options are checked first.
#[test]
fn nbd_device_without_the_driver_names_the_module() {
    if std::path::Path::new("/sys/module/nbd").exists() {
        eprintln!("skipped: this kernel has nbd loaded");
        return;
    }
    let p2 = Part2::start();
    let out = p2.curve(&[
        "export",
        "add",
        "--volume",
        "mem:16M",
        "--nbd-device",
        "--name",
        "k0",
    ]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("no NBD driver") && err.contains("modprobe nbd"),
        "{err}"
    );
    for (args, want) in [
        (
            &["--nbd-device", "/dev/vda"][..],
            "bad NBD device \"/dev/vda\"",
        ),
        (
            &["--nbd-device", "--connections", "0"][..],
            "0 connections: 1 to 16",
        ),
        (&["--ublk", "--nbd-device"][..], "cannot be used with"),
    ] {
        let mut a = vec!["export", "add", "--volume", "mem:16M", "--name", "k0"];
        a.extend_from_slice(args);
        let out = p2.curve(&a);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr_of(&out).contains(want),
            "{args:?}: {}",
            stderr_of(&out)
        );
    }
    p2.export_mem("still", "1M");
    assert!(p2.curve_ok(&["export", "list"]).contains("still"));
    assert!(!p2.log().contains("panicked"), "{}", p2.log());
}

/// `--metrics-listen` with an address that cannot be served stops each daemon at start-up with
/// a message naming it (not a daemon running without its metrics).
#[test]
fn a_bad_metrics_address_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let port = curve_tests::cluster::free_port().to_string();
    let runs: [(&str, Vec<String>); 3] = [
        (
            "nebd-server",
            vec![
                "--run-dir".into(),
                dir.path().join("nebd").display().to_string(),
            ],
        ),
        (
            "curve-mds",
            vec![
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--data-dir".into(),
                dir.path().join("mds").display().to_string(),
            ],
        ),
        (
            "curve-chunkserver",
            vec![
                "--listen".into(),
                format!("127.0.0.1:{}", curve_tests::cluster::free_port()),
                "--data-dir".into(),
                dir.path().join("cs").display().to_string(),
                "--mds".into(),
                format!("127.0.0.1:{port}"),
            ],
        ),
    ];
    for (daemon, args) in runs {
        for bad in ["nonsense", taken.as_str()] {
            let out = std::process::Command::new(curve_tests::bin(daemon))
                .args(&args)
                .args(["--metrics-listen", bad])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{daemon} --metrics-listen {bad} started"
            );
            assert!(
                err.contains(&format!("cannot serve metrics on \"{bad}\"")),
                "{daemon} --metrics-listen {bad}: {err}"
            );
        }
    }
}

/// An export's socket path that holds something other than a socket (a user's file, a
/// directory) is refused with a clear error and left as it was; a stale socket is replaced.
#[test]
fn an_export_never_deletes_what_is_not_a_socket() {
    let p = Part2::start();
    let file = p.path("precious.txt");
    std::fs::write(&file, "not a socket").unwrap();
    let dir = p.path("a-dir");
    std::fs::create_dir(&dir).unwrap();
    for (path, frontend) in [
        (&file, "--nbd"),
        (&file, "--vhost-user-blk"),
        (&dir, "--nbd"),
        (&dir, "--vhost-user-blk"),
    ] {
        let target = if frontend == "--nbd" {
            format!("unix:{}", path.display())
        } else {
            path.display().to_string()
        };
        let out = p.curve(&[
            "export", "add", "--volume", "mem:1M", frontend, &target, "--name", "x",
        ]);
        assert!(!out.status.success(), "{frontend} {target}");
        assert!(
            stderr_of(&out).contains("not a socket"),
            "{frontend} {target}: {}",
            stderr_of(&out)
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a socket");
    assert!(dir.is_dir());
    // A stale socket (nobody listening) is replaced.
    let stale = p.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let uri = p.curve_ok(&[
        "export",
        "add",
        "--volume",
        "mem:1M",
        "--nbd",
        &format!("unix:{}", stale.display()),
        "--name",
        "s",
    ]);
    assert!(uri.contains("stale.sock"), "{uri}");
    assert!(p.curve_ok(&["export", "list"]).contains("stale.sock"));
    // A live socket (another server listening) is refused and left to it, on both frontends.
    let live = p.path("live.sock");
    let _other = std::os::unix::net::UnixListener::bind(&live).unwrap();
    for (frontend, target) in [
        ("--nbd", format!("unix:{}", live.display())),
        ("--vhost-user-blk", live.display().to_string()),
    ] {
        let out = p.curve(&[
            "export", "add", "--volume", "mem:1M", frontend, &target, "--name", "l",
        ]);
        assert!(!out.status.success(), "{frontend} {target}");
        let err = stderr_of(&out);
        assert!(
            err.contains("in use") || err.contains("another server is listening"),
            "{frontend}: {err}"
        );
        assert!(
            std::os::unix::net::UnixStream::connect(&live).is_ok(),
            "still theirs"
        );
    }
}

/// nebd-server's own sockets (control, part1) in its run dir: a file that is not a socket
/// there is refused at start-up, never deleted.
#[test]
fn nebd_server_never_deletes_a_file_at_its_socket_paths() {
    for name in ["control.sock", "nebd.sock"] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join(name), "precious").unwrap();
        let log = dir.path().join("log");
        let mut cmd = std::process::Command::new(curve_tests::bin("nebd-server"));
        cmd.arg("--run-dir").arg(&run);
        let mut d = Daemon::spawn(cmd, &log);
        let code = d.wait(Duration::from_secs(30));
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            code.is_some_and(|c| c != 0),
            "{name}: it should refuse to start (waited 30 s): {err}"
        );
        assert!(err.contains("is not a socket"), "{name}: {err}");
        assert_eq!(std::fs::read_to_string(run.join(name)).unwrap(), "precious");
    }
}
