//! One chunkserver's data disk fills up (a small tmpfs, filled by another file) while fio
//! writes and verifies through part2: the full chunkserver hands the leadership of its copysets
//! to followers and takes no writes, the two healthy replicas serve on (fio: 0 errors, verify
//! clean), `curve cluster status` names the full disk; freed, it is reported as such again.
//! Before, its raft cores quit with ENOSPC while it kept claiming leadership, and the client
//! retried it forever.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use curve_tests::cluster::{Chunkserver, Extras, MiniCluster};
use curve_tests::{Part2, bin, require_tool, run_ok, wait_until};

/// A tmpfs mounted for the test; unmounted when dropped (after the daemons on it stopped:
/// declare it before them).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs as a chunkserver's disk (it runs as root, as CI \
             does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// (capacity, available) bytes of the file system at `p`.
fn space(p: &Path) -> (u64, u64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the zeroed struct we pass, for a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut s), 0);
        (s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize)
    }
}

/// `curve cluster status --format json`: the chunkserver at `addr`.
fn chunkserver_status(mds: &str, key: &str, addr: &str) -> serde_json::Value {
    let out = run_ok(
        Command::new(bin("curve"))
            .env("CURVE_KEY_FILE", key)
            .args(["--mds", mds, "cluster", "status", "--format", "json"]),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["chunkservers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"] == addr)
        .cloned()
        .unwrap_or_default()
}

/// Fills the file system at `dir` down to 2% free with a file `dir/ballast`.
fn fill(dir: &Path) -> PathBuf {
    let ballast = dir.join("ballast");
    let f = std::fs::File::create(&ballast).unwrap();
    // The chunkserver writes meanwhile: what was free a moment ago may not be now. Try again
    // with what is free then (each try leaving a little more).
    let mut capacity = 0;
    for attempt in 0..50u64 {
        let (c, avail) = space(dir);
        capacity = c;
        let len = avail.saturating_sub(capacity / 50 + attempt * (capacity / 1000));
        // SAFETY: fallocate on a file we own.
        let rc = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, len as i64) };
        if rc == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        assert!(
            e.raw_os_error() == Some(libc::ENOSPC) && attempt < 49,
            "fallocate {len}: {e}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    println!(
        "{} filled: {} MiB free of {} MiB",
        dir.display(),
        space(dir).1 >> 20,
        capacity >> 20
    );
    ballast
}

/// The copyset replicas in a chunkserver's data directory.
fn replicas_in(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("copysets"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.split_once('_'))
                        .is_some_and(|(p, c)| p.parse::<u32>().is_ok() && c.parse::<u32>().is_ok())
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_full_disk_moves_its_leaderships_and_writes_go_on() {
    require_tool("fio");
    let tmp = tempfile::tempdir().unwrap();
    // The first chunkserver's data dir is a 1 GiB tmpfs.
    let disk = Tmpfs::mount(&tmp.path().join("cs1"), "1g");
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    let mds = cluster.mds_addrs()[0].clone();
    let key = cluster.key();
    let cs1 = cluster.chunkservers[0].addr.clone();
    let part2 = Part2::start_with(&["--mds", &mds, "--key-file", &key]);
    cluster.create_volume("/d", 1 << 30);
    let (uri, _) = part2.export_nbd("d", "curve:/d");
    // The MDS balances leaders over the chunkservers of a quiet cluster: cs1 gets some.
    let mut status = serde_json::Value::Null;
    let leads = wait_until(Duration::from_secs(90), || {
        status = chunkserver_status(&mds, &key, &cs1);
        status["leaders"].as_u64().unwrap_or(0) > 0
    });
    assert!(leads, "cs1 leads some copysets (waited 90 s): {status}");
    assert_eq!(status["disk_full"], false, "{status}");

    let fio = std::thread::spawn(move || {
        run_ok(Command::new("fio").args([
            "--name=fill",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            "--size=256M",
            "--time_based",
            "--runtime=40",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
        ]))
    });
    std::thread::sleep(Duration::from_secs(8));
    // Another file takes the disk down to 2% free (the reserve is 5%).
    let ballast = fill(&disk.0);

    let mut last = serde_json::Value::Null;
    let reported = wait_until(Duration::from_secs(30), || {
        last = chunkserver_status(&mds, &key, &cs1);
        last["disk_full"] == true && last["leaders"] == 0
    });
    assert!(
        reported,
        "cluster status names cs1's disk full and cs1 leads nothing (waited 30 s): {last}"
    );
    let text = run_ok(
        Command::new(bin("curve"))
            .env("CURVE_KEY_FILE", &key)
            .args(["--mds", &mds, "cluster", "status"]),
    );
    assert!(text.contains("DISK FULL"), "{text}");

    let out = fio.join().unwrap();
    assert!(out.contains("err= 0"), "fio: {out}");
    assert!(!out.contains("verify: bad"), "fio: {out}");

    // Space back: reported so, and cs1 campaigns again.
    std::fs::remove_file(&ballast).unwrap();
    let freed = wait_until(Duration::from_secs(30), || {
        last = chunkserver_status(&mds, &key, &cs1);
        last["disk_full"] == false
    });
    assert!(
        freed,
        "cs1's disk is reported free again (waited 30 s): {last}"
    );
    drop(part2);
    drop(cluster);
}

/// With a fourth chunkserver that has room (in cs1's zone), the replicas on cs1's full disk
/// move there: the MDS adds the new peer, removes cs1's, and cs1 deletes its replicas, which
/// gives the space back; fio's data, written before and while they move, verifies.
#[test]
fn replicas_move_off_a_full_disk_and_give_its_space_back() {
    require_tool("fio");
    let tmp = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&tmp.path().join("cs1"), "1g");
    // Replicas are deleted once the MDS has led for an operator's timeout.
    let extras = Extras {
        mds_args: vec!["--operator-timeout-ms".into(), "20000".into()],
        ..Default::default()
    };
    let cluster = MiniCluster::start_with(tmp.path(), 1, false, &extras);
    let mds = cluster.mds_addrs()[0].clone();
    let key = cluster.key();
    let ck = cluster.cluster_key.display().to_string();
    // cs4's disk is its own too: on the host's disk, a machine more than 85% used (CI's, once)
    // makes cs4 "crowded", a target the MDS rightly never picks.
    let _cs4_disk = Tmpfs::mount(&tmp.path().join("cs4"), "2g");
    let cs4 = Chunkserver::start(
        &tmp.path().join("cs4"),
        &cluster.mds_addrs(),
        "z1",
        "s1",
        &[
            "--pool-target",
            "2",
            "--heartbeat-ms",
            "300",
            "--cluster-key-file",
            &ck,
        ],
    );
    let part2 = Part2::start_with(&["--mds", &mds, "--key-file", &key]);
    cluster.create_volume("/m", 1 << 30);
    let (uri, _) = part2.export_nbd("m", "curve:/m");
    let fio = |rw: &str, runtime: u32| {
        let mut c = Command::new("fio");
        c.args([
            "--name=move",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            "--bs=64k",
            "--iodepth=8",
            "--size=192M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--verify_fatal=1",
        ]);
        if runtime > 0 {
            c.args(["--time_based", &format!("--runtime={runtime}")]);
        }
        c
    };
    // Data on every copyset (192 MiB: 12 chunks).
    run_ok(&mut fio("write", 0));
    let before = replicas_in(&disk.0);
    assert!(before > 0, "cs1 holds replicas");
    let writer = {
        let mut c = fio("randwrite", 40);
        c.arg("--do_verify=1");
        std::thread::spawn(move || run_ok(&mut c))
    };
    let ballast = fill(&disk.0);
    let cs1 = cluster.chunkservers[0].addr.clone();
    let mut last = serde_json::Value::Null;
    let moved = wait_until(Duration::from_secs(240), || {
        last = chunkserver_status(&mds, &key, &cs1);
        last["copysets"] == 0 && replicas_in(&disk.0) == 0
    });
    assert!(
        moved,
        "every replica left cs1 and was deleted there (waited 240 s): {last}, {} replica \
         directories left; cs4: {}\n{}",
        replicas_in(&disk.0),
        chunkserver_status(&mds, &key, &cs4.addr),
        cluster.mds[0].log()
    );
    let (capacity, avail) = space(&disk.0);
    println!(
        "cs1's {before} replicas moved off its full disk: {} MiB free of {} MiB",
        avail >> 20,
        capacity >> 20
    );
    assert!(
        avail > capacity / 20,
        "the space is back: {avail} of {capacity} bytes free"
    );
    let out = writer.join().unwrap();
    assert!(out.contains("err= 0"), "fio: {out}");
    // Written and verified again on the new placement.
    let mut again = fio("randwrite", 10);
    again.arg("--do_verify=1");
    let out = run_ok(&mut again);
    assert!(out.contains("err= 0"), "fio: {out}");
    let status = chunkserver_status(&mds, &key, &cs4.addr);
    assert!(
        status["copysets"].as_u64().unwrap_or(0) > 0,
        "cs4 took the replicas: {status}"
    );
    std::fs::remove_file(&ballast).unwrap();
    drop(part2);
    drop(cs4);
    drop(cluster);
}
