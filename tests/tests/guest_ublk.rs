//! ublk devices (`/dev/ublkbN`) in a Linux guest (QEMU, TCG): the guest kernel's `ublk_drv`
//! is the consumer and a part2 inside the guest serves it (the host kernel has no ublk). See
//! `curve_tests::guest` for the harness and `tests/guest/scenarios/ublk_*.sh` for what runs
//! inside.

use std::time::Duration;

use curve_tests::guest::{Guest, GuestSpec, guest_dir};

/// `curve export add --volume mem:256M --ublk` prints `/dev/ublkb0`; the device has the
/// volume's geometry and is listed as a ublk export; O_DIRECT patterns at 4 KiB and 1 MiB read
/// back; the bytes equal those an NBD export of the same volume serves; blkdiscard and sync
/// reach the volume; a read-only device refuses writes and serves reads; bad input gets clear
/// messages; `export remove` under writers fails their I/O only; dmesg clean.
#[test]
fn guest_ublk_pattern_discard_flush_read_only_and_bad_input() {
    let dir = guest_dir();
    let nbdcopy = curve_tests::require_tool("nbdcopy");
    let guest = Guest::boot(
        dir.path(),
        &GuestSpec::new("ublk_pattern")
            .ublk("mem:256M", 2, 64)
            .tool(&nbdcopy),
    );
    let run = guest
        .finish(Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("{e}"));
    run.assert_ok();
    let r = run.results();
    assert_eq!(r["path"], "/dev/ublkb0", "the path export add printed");
    assert_eq!(r["size"], (256u64 << 20).to_string(), "capacity");
    assert_eq!(r["queues"], "2", "--queues");
    assert_eq!(r["ro"], "0");
    assert_eq!(r["lbs"], "512", "logical block size of a mem: volume");
    assert_eq!(r["max_hw_kb"], "1024", "the volume's max I/O size (1 MiB)");
    assert_ne!(r["discard_max"], "0", "discard advertised");
    assert_eq!(r["write_cache"], "write_back", "flush reaches the volume");
    assert_eq!(r["listed"], "yes", "export list --format json");
    assert_eq!(
        run.md5("ublk"),
        run.md5("nbd"),
        "the bytes written through ublk, read through an NBD export of the same volume"
    );
    assert_eq!(
        run.md5("ublk-discarded"),
        run.md5("zeros"),
        "discarded: zeros on ublk"
    );
    assert_eq!(
        run.md5("nbd-discarded"),
        run.md5("zeros"),
        "and through NBD"
    );
    assert_eq!(
        r["file_blocks"].parse::<u64>().unwrap(),
        8 << 10,
        "the discard punched the file: only the first 8 MiB are allocated"
    );
    assert_eq!(r["ro_write"], "refused");
    assert_eq!(r["ro_dev"], "1", "the kernel sees a read-only disk");
    assert_eq!(
        run.md5("ro"),
        run.md5("rw"),
        "the read-only device reads the volume"
    );
    let errors = run.lines("CURVE-ERROR");
    let depth = errors.iter().find(|l| l.starts_with("depth")).unwrap();
    assert!(
        depth.contains("queue depth 5000") && depth.contains("4096"),
        "{depth}"
    );
    let name = errors.iter().find(|l| l.starts_with("name")).unwrap();
    assert!(name.contains("already exists"), "{name}");
    assert_eq!(r["dmesg"], "clean", "{}", run.console);
    assert_ne!(
        r["removed_writers_rc"], "0",
        "writers on a removed device see their I/O fail"
    );
    assert_eq!(r["removed_dev_gone"], "yes");
    assert_eq!(r["still_serving"], "yes");
    println!(
        "guest ublk O_DIRECT: {}\n  {}\n(guest ran {:.1} s)",
        run.result_line("write").unwrap_or_default(),
        run.result_line("verify").unwrap_or_default(),
        run.took.as_secs_f64()
    );
}

/// 4 O_DIRECT writers on `/dev/ublkb0` (a file volume on the guest's tmpfs, so that its data
/// outlives part2); part2 (in the guest) is killed -9 two seconds in and restarted: it finds
/// the device in its metafile and recovers it (START/END_USER_RECOVERY); the kernel reissues
/// what the dead part2 held. 0 I/O errors, every region verified, the device reads what the
/// file holds, the same device, dmesg clean. Then SIGTERM and a new part2: the same device and
/// bytes again (a planned restart goes through recovery on 6.12).
fn ublk_writers_survive_kill_9(
    volume: &str,
    mib: u64,
) -> std::collections::BTreeMap<String, String> {
    let dir = guest_dir();
    let guest = Guest::boot(
        dir.path(),
        &GuestSpec::new("ublk_writers")
            .param("jobs", 4)
            .param("mib", mib)
            .param("secs", 12)
            .ublk(volume, 2, 64),
    );
    let run = guest
        .finish(Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("{e}"));
    run.assert_ok();
    let r = run.results();
    assert_eq!(r["recovered"], "yes", "{}", run.console);
    run.assert_writers_survived_restarts("/dev/ublkb0");
    println!(
        "guest ublk writers across kill -9: {}\n  {}\n(guest ran {:.1} s)",
        run.result_line("writers").unwrap_or_default(),
        run.result_line("writers-verify").unwrap_or_default(),
        run.took.as_secs_f64()
    );
    r
}

#[test]
fn guest_ublk_writers_survive_kill_9_of_part2() {
    ublk_writers_survive_kill_9("file:/tmp/w.img", 4);
}

/// The same with a volume that completes every 5th request 20 ms late (out of order): the
/// requests the dead part2 held are reissued to the new one.
#[test]
fn guest_ublk_writers_survive_kill_9_of_part2_with_out_of_order_completions() {
    ublk_writers_survive_kill_9("delay:5:20:file:/tmp/w.img", 1);
}

/// Benchmark (not run by the suite; `docs/benchmarks.md` has the command and figures): fio in
/// one guest boot, 4K random read and write at QD1 and QD32, on our ublk device (a part2 in the
/// guest, `mem:`), on rublk's null target (the libublk authors' server: `cargo install rublk`,
/// found in PATH or `CURVE_RUBLK`) and on our vhost-user-blk export of a `mem:` volume. Under
/// TCG only the ratios mean anything. Prints a table; asserts nothing about speed.
#[test]
#[ignore = "benchmark: run with --run-ignored only (needs rublk and release binaries)"]
fn bench_ublk_against_rublk_and_vhost_user() {
    let rublk = std::env::var_os("CURVE_RUBLK")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| curve_tests::require_tool("rublk"));
    let fio = curve_tests::require_tool("fio");
    let secs: u32 = std::env::var("CURVE_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let p = curve_tests::Part2::start();
    let sock = p.run_dir().join("vu.sock");
    p.curve_ok(&[
        "export",
        "add",
        "--volume",
        "mem:256M",
        "--vhost-user-blk",
        sock.to_str().unwrap(),
        "--queues",
        "1",
        "--name",
        "vu",
    ]);
    let poll_us = std::env::var("CURVE_NBD_POLL_US").unwrap_or_else(|_| "50".into());
    let rounds: u32 = std::env::var("CURVE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut spec = GuestSpec::new("ublk_bench")
        .param("secs", secs)
        .param("poll_us", poll_us)
        .param("rounds", rounds)
        .vhost_user_blk(&sock, 1)
        .ublk("mem:256M", 1, 128)
        .tool(&rublk)
        .tool(&fio);
    spec.memory_mib = 1536;
    let guest = Guest::boot(p.dir.path(), &spec);
    let run = guest
        .finish(Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("{e}\npart2:\n{}", p.log()));
    run.assert_ok();
    let best = run.bench_medians();
    println!("median of {rounds} rounds x {secs} s, one guest boot");
    println!(
        "| fio job (guest, TCG) | ours ublk IOPS (lat µs) | rublk null | ours vhost-user-blk | ublk / rublk | ublk / vhost-user |"
    );
    println!("|---|---|---|---|---|---|");
    for (rw, qd) in [
        ("randread", "1"),
        ("randwrite", "1"),
        ("randread", "32"),
        ("randwrite", "32"),
    ] {
        let get = |d: &str| best[&(rw.to_owned(), qd.to_owned(), d.to_owned())];
        let (o, r, v) = (get("ours"), get("rublk"), get("vhost"));
        println!(
            "| 4K {rw} QD{qd} | {:.0} ({:.0}) | {:.0} ({:.0}) | {:.0} ({:.0}) | {:.2}× | {:.2}× |",
            o.0,
            o.1,
            r.0,
            r.1,
            v.0,
            v.1,
            o.0 / r.0,
            o.0 / v.0
        );
    }
}
