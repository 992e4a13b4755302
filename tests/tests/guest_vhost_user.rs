//! A Linux guest (QEMU, TCG) on vhost-user-blk exports of part2: the guest kernel's virtio-blk
//! driver is the consumer. See `curve_tests::guest` for the harness and `tests/guest/` for what
//! runs inside.

use std::time::Duration;

use curve_tests::guest::{Guest, GuestRun, GuestSpec, md5_of};
use curve_tests::{Part2, bin};

/// Creates a sparse `mib` MiB file volume and a vhost-user-blk export of it; returns the
/// file and the socket.
fn export(
    p: &Part2,
    volume_prefix: &str,
    mib: u64,
    queues: u16,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let file = p.path("vol.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let sock = p.run_dir().join("vu.sock");
    p.curve_ok(&[
        "export",
        "add",
        "--volume",
        &format!("{volume_prefix}file:{}", file.display()),
        "--vhost-user-blk",
        sock.to_str().unwrap(),
        "--queues",
        &queues.to_string(),
        "--name",
        "vu",
    ]);
    (file, sock)
}

/// The guest writes a pattern with O_DIRECT, reads it back and hashes it; the host reads the
/// same volume through an NBD export and gets the same hash. Then the guest discards half of
/// it (blkdiscard) and flushes (fsync of the block device): the host sees zeros there.
#[test]
fn guest_pattern_discard_and_flush_on_a_vhost_user_blk_export() {
    let p = Part2::start();
    let (file, sock) = export(&p, "", 64, 2);
    let guest = Guest::boot(
        p.dir.path(),
        &GuestSpec::new("pattern")
            .param("mib", 16)
            .vhost_user_blk(&sock, 2),
    );
    let run = guest
        .finish(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\npart2:\n{}", p.log()));
    run.assert_ok();
    let r = run.results();
    assert_eq!(
        r["size"],
        (64u64 << 20).to_string(),
        "capacity from config space"
    );
    assert_eq!(r["queues"], "2", "num_queues from config space");
    assert_eq!(r["ro"], "0");
    assert_ne!(r["discard_max"], "0", "discard advertised");
    assert_eq!(r["write_cache"], "write_back", "flush advertised");
    assert_eq!(r["dmesg"], "clean");
    println!(
        "guest O_DIRECT: {}\n               {}\n(guest ran {:.1} s)",
        run.result_line("write").unwrap(),
        run.result_line("verify").unwrap(),
        run.took.as_secs_f64()
    );
    // What the guest wrote, read on the host through another frontend (NBD).
    let uri = p
        .curve_ok(&[
            "export",
            "add",
            "--volume",
            &format!("file:{}", file.display()),
            "--nbd",
            &format!("unix:{}", p.run_dir().join("n.sock").display()),
            "--name",
            "n",
        ])
        .trim()
        .to_owned();
    let copy = p.path("copy.img");
    curve_tests::run_ok(std::process::Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert_eq!(md5_of(&copy, 0, 16 << 20), run.md5("after-discard"));
    assert_eq!(
        run.md5("discarded"),
        run.md5("zeros"),
        "discarded range reads zeros in the guest"
    );
    assert_eq!(
        md5_of(&copy, 8 << 20, 8 << 20),
        run.md5("zeros"),
        "and on the host"
    );
    assert_eq!(md5_of(&copy, 0, 8 << 20), md5_of(&file, 0, 8 << 20));
    // The first half is still the pattern the guest hashed before the discard.
    assert_ne!(run.md5("pattern"), run.md5("after-discard"));
}

/// Boots a guest whose `jobs` O_DIRECT writers rewrite `mib` MiB each on the export at `sock`
/// for `secs` seconds; returns once they have been writing for 2 s.
fn boot_writers(p: &Part2, sock: &std::path::Path, jobs: u64, mib: u64, secs: u64) -> Guest {
    let mut guest = Guest::boot(
        p.dir.path(),
        &GuestSpec::new("writers")
            .param("jobs", jobs)
            .param("mib", mib)
            .param("secs", secs)
            .vhost_user_blk(sock, 2),
    );
    assert!(
        guest.wait_for("CURVE-WRITERS-STARTED", Duration::from_secs(60)),
        "the writers did not start:\n{}\npart2:\n{}",
        guest.console(),
        p.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    guest
}

/// What the writers must show whatever happened to part2 meanwhile: a clean dmesg, no I/O
/// error, every region verified after at least two passes, and the host reading the bytes the
/// guest verified.
fn assert_writers_clean(run: &GuestRun, file: &std::path::Path, jobs: u64, mib: u64) {
    run.assert_ok();
    let r = run.results();
    assert_eq!(r["dmesg"], "clean", "{}", run.console);
    assert_eq!(r["errors"], "0", "{}", run.console);
    assert_eq!(r["mismatches"], "0");
    assert!(
        r["passes"]
            .split(',')
            .all(|n| n.parse::<u32>().is_ok_and(|n| n >= 2)),
        "every writer was still writing when part2 went: {:?}",
        r["passes"]
    );
    assert_eq!(
        md5_of(file, 0, (jobs * mib) << 20),
        run.md5("writers"),
        "the host reads what the guest verified"
    );
}

/// 4 O_DIRECT writers in the guest rewrite their regions pass after pass; once they are
/// running, part2 is killed with SIGKILL and restarted (the supervisor's part); QEMU reconnects
/// (`reconnect=1`), the new part2 re-creates the export on the same socket, and the guest
/// sees a pause: no I/O error, a clean dmesg, every region verified, and the host reads the
/// same bytes from the volume. Returns the new part2's log.
fn writers_survive_kill_9(volume_prefix: &str, mib: u64) -> String {
    let mut p = Part2::start();
    let (file, sock) = export(&p, volume_prefix, 32, 2);
    let jobs = 4u64;
    let guest = boot_writers(&p, &sock, jobs, mib, 10);
    p.kill9_and_restart();
    let run = guest
        .finish(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\npart2:\n{}", p.log()));
    assert_writers_clean(&run, &file, jobs, mib);
    println!(
        "guest writers across kill -9: {}\n  {}\n(guest ran {:.1} s)",
        run.result_line("writers").unwrap(),
        run.result_line("writers-verify").unwrap(),
        run.took.as_secs_f64()
    );
    p.log_of(1)
}

#[test]
fn guest_writers_survive_kill_9_of_part2() {
    let log = writers_survive_kill_9("", 4);
    assert!(log.contains("inflight_tracking=true"), "{log}");
}

/// The same with a volume that completes every 5th request 20 ms late: requests complete out
/// of order, so the used index alone does not say which ones are done; the new part2 replays
/// exactly the ones the guest still has in flight, from the inflight region QEMU kept.
#[test]
fn guest_writers_survive_kill_9_of_part2_with_out_of_order_completions() {
    let log = writers_survive_kill_9("delay:5:20:", 1);
    assert!(
        log.contains("resubmitting inflight requests"),
        "with 20 ms requests in flight, the new part2 had some to redo:\n{log}"
    );
}

/// 4 O_DIRECT writers in the guest while part2 is upgraded live twice (to a second copy of the
/// binary, then back): QEMU's vhost-user connection, guest memory, rings, kick/call eventfds
/// and the inflight region are handed to the new process, which serves from where the old one
/// stopped. QEMU never sees its socket close: it does not connect again, logs nothing, and the guest
/// sees a pause (its longest write, printed) — no error, a clean dmesg, every region verified.
#[test]
fn guest_writers_see_only_a_pause_across_two_live_upgrades() {
    let mut p = Part2::start();
    let (file, sock) = export(&p, "", 32, 2);
    let second = p.path("nebd-server-2");
    std::fs::copy(bin("nebd-server"), &second).unwrap();
    let (jobs, mib) = (4u64, 4u64);
    let guest = boot_writers(&p, &sock, jobs, mib, 12);
    let first = p.upgrade(&["--binary", second.to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(2));
    let back = p.upgrade(&["--binary", bin("nebd-server").to_str().unwrap()]);
    let run = guest
        .finish(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\npart2:\n{}", p.log()));
    assert_writers_clean(&run, &file, jobs, mib);
    let r = run.results();
    for u in [&first, &back] {
        assert_eq!(
            u["connections"], 1,
            "QEMU's connection was handed over: {u}"
        );
    }
    // From the first upgrade on, QEMU never connects again. (Before it, under a loaded
    // machine's TCG boot, QEMU has been seen to drop and remake its connection once, before
    // any upgrade: that is not what this test is about, and is printed.)
    let log = p.log();
    let (before, during) = log.split_at(
        log.find("upgrade: new nebd-server started")
            .expect("the upgrade is in the log"),
    );
    let early = before.matches("vhost-user front-end connected").count();
    if early > 1 {
        println!("QEMU connected {early} times before the first upgrade");
    }
    assert!(early >= 1, "QEMU connected to the first part2:\n{log}");
    assert_eq!(
        during.matches("vhost-user front-end connected").count(),
        0,
        "QEMU never connected again once the upgrades began:\n{log}"
    );
    assert_eq!(log.matches("vhost-user front-end taken over").count(), 2);
    let qemu_log = std::fs::read_to_string(p.dir.path().join("qemu.log")).unwrap_or_default();
    assert!(
        !qemu_log.contains("vhost"),
        "QEMU saw no vhost-user disconnect:\n{qemu_log}"
    );
    println!(
        "live upgrades under 4 guest writers: part2 paused {:.1} ms and {:.1} ms; the guest's longest write {:.1} ms\n  {}\n  {}",
        first["pause_us"].as_f64().unwrap() / 1000.0,
        back["pause_us"].as_f64().unwrap() / 1000.0,
        r["max_us"].parse::<f64>().unwrap() / 1000.0,
        run.result_line("writers").unwrap(),
        run.result_line("writers-verify").unwrap(),
    );
}
