//! The README's main-job command, as a user runs it: `deploy/playground.sh DIR` starts a
//! supervised nebd-server with an NBD export, prints its URI, survives a kill -9 of
//! nebd-server, and stops everything on SIGINT (Ctrl-C).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use curve_tests::{bin, require_tool, run_ok, wait_until};

#[test]
fn playground_serves_survives_kill_9_and_stops_on_ctrl_c() {
    require_tool("nbdinfo");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = bin("nebd-server").parent().unwrap().to_owned();
    let mut child = Command::new(root.join("deploy/playground.sh"))
        .arg(dir.path())
        .env("CURVE_BIN_DIR", &bin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // If the test fails midway, the playground and its nebd-server go away (by PID, while they
    // are still ours: once the test has seen them exit, nothing is signalled).
    struct Stop {
        playground: i32,
        dir: std::path::PathBuf,
        armed: bool,
    }
    impl Drop for Stop {
        fn drop(&mut self) {
            if !self.armed {
                return;
            }
            let server = std::fs::read_to_string(self.dir.join("nebd-server.pid.current"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            // SAFETY: signals the playground this test started, which is still running.
            unsafe { libc::kill(self.playground, libc::SIGINT) };
            if let Some(p) = server {
                // SAFETY: the nebd-server the playground started for this test.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
    let mut stop = Stop {
        playground: pid,
        dir: dir.path().to_owned(),
        armed: true,
    };
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let uri = loop {
        let line = rx
            .recv_timeout(deadline - Instant::now())
            .expect("the playground printed its URI");
        if let Some(u) = line.trim().strip_prefix("nbd+unix://") {
            break format!("nbd+unix://{u}");
        }
    };
    assert!(uri.contains("/vol0?socket="), "{uri}");
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert_eq!(size.trim(), "1073741824");

    // kill -9 of nebd-server: the playground restarts it with its export.
    let pidfile = dir.path().join("nebd-server.pid.current");
    let first: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: the nebd-server the playground started.
    unsafe { libc::kill(first, libc::SIGKILL) };
    let back = wait_until(Duration::from_secs(20), || {
        let now: i32 = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(first);
        now != first
            && Command::new("nbdinfo")
                .arg("--size")
                .arg(&uri)
                .output()
                .is_ok_and(|o| o.status.success())
    });
    assert!(back, "nebd-server was not restarted with its export");
    let second: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // Ctrl-C stops the playground and its nebd-server.
    // SAFETY: signals the playground we started.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let exited = wait_until(Duration::from_secs(20), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "the playground did not stop on SIGINT");
    stop.armed = false;
    // SAFETY: kill(pid, 0) only checks whether the process exists.
    let gone = wait_until(
        Duration::from_secs(10),
        || unsafe { libc::kill(second, 0) } != 0,
    );
    assert!(gone, "nebd-server outlived the playground");
}
