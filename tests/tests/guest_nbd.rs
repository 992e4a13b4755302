//! Kernel NBD devices (`/dev/nbdN`) in a Linux guest (QEMU, TCG): the guest kernel's `nbd`
//! driver is the consumer. Two ways in: Debian's `nbd-client` attaching to an export (of a
//! nebd-server on the host, over TCP through QEMU's restricted user-mode network, or of a part2
//! in the guest over a Unix socket), and `curve export add --nbd-device`, where part2 (in the
//! guest: the host kernel has no nbd) hands the kernel socket pairs through netlink and takes the
//! device back after a crash. See `tests/guest/scenarios/nbd_*.sh` for what runs inside.

use std::time::Duration;

use curve_tests::Part2;
use curve_tests::cluster::free_port;
use curve_tests::guest::{Guest, GuestSpec, guest_dir, md5_of};

/// Debian's nbd-client in the guest attaches two TCP exports of a nebd-server on the host,
/// reached through QEMU's user-mode network restricted to one forward per port: an O_DIRECT
/// pattern (the host's file holds the guest's bytes), blkdiscard reaching the file, and an ext4
/// file system made, filled, unmounted, checked clean by e2fsck and read back. Then nbd-client
/// on a Unix-socket export of a part2 in the guest: the device holds the file's bytes.
#[test]
fn guest_nbd_client_over_tcp_to_the_host_and_over_a_unix_socket() {
    let nbd_client = curve_tests::require_tool("nbd-client");
    let mke2fs = curve_tests::require_tool("mke2fs");
    let e2fsck = curve_tests::require_tool("e2fsck");
    let p = Part2::start();
    let mut ports = Vec::new();
    let mut files = Vec::new();
    for i in 0..2 {
        let file = p.path(&format!("h{i}.img"));
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(64 << 20))
            .expect("volume file");
        let port = free_port();
        p.curve_ok(&[
            "export",
            "add",
            "--volume",
            &format!("file:{}", file.display()),
            "--nbd",
            &format!("tcp:127.0.0.1:{port}"),
            "--name",
            &format!("h{i}"),
        ]);
        ports.push(port);
        files.push(file);
    }
    let guest = Guest::boot(
        p.dir.path(),
        &GuestSpec::new("nbd_client")
            .forward(10809, ports[0])
            .forward(10810, ports[1])
            .part2()
            .tool(&nbd_client)
            .tool(&mke2fs)
            .tool(&e2fsck),
    );
    let run = guest
        .finish(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\npart2:\n{}", p.log()));
    run.assert_ok();
    println!("{}", run.console);
    let r = run.results();
    assert_eq!(
        r["tcp_size"],
        (64u64 << 20).to_string(),
        "capacity over TCP"
    );
    assert_eq!(r["tcp_ro"], "0");
    assert_ne!(r["tcp_discard_max"], "0", "trim advertised");
    assert_eq!(
        run.md5("tcp-pattern"),
        md5_of(&files[0], 0, 8 << 20),
        "the host's file holds what the guest wrote over TCP"
    );
    assert_eq!(run.md5("tcp-discarded"), run.md5("zeros"));
    assert_eq!(
        md5_of(&files[0], 8 << 20, 8 << 20),
        run.md5("zeros"),
        "the guest's blkdiscard reached the host's file"
    );
    assert_eq!(r["fsck_rc"], "0", "e2fsck finds the file system clean");
    assert_eq!(r["fs_same"], "yes", "the files read back after a remount");
    assert_eq!(r["unix_size"], (32u64 << 20).to_string());
    assert_eq!(run.md5("unix-device"), run.md5("unix-file"));
    assert_eq!(r["dmesg"], "clean", "{}", run.console);
    let log = p.log();
    assert!(
        !log.contains("ERROR") && !log.contains("panicked"),
        "part2 on the host:\n{log}"
    );
    println!(
        "guest nbd-client over TCP: {}\n(guest ran {:.1} s)",
        run.result_line("write").unwrap_or_default(),
        run.took.as_secs_f64()
    );
}

/// `curve export add --nbd-device --connections 2` prints `/dev/nbd0`; the device has the
/// volume's size, 2 connections, the backend cookie part2 recorded; an O_DIRECT pattern at
/// 4 KiB and 1 MiB reads back and equals the volume file's bytes; blkdiscard punches the file
/// and reads zeros; a read-only device refuses writes; bad input gets clear messages; `export
/// remove` under writers fails their I/O only; dmesg clean. A device whose backend cookie is
/// not the one part2 recorded is left alone after a restart, with a message.
#[test]
fn guest_nbd_device_pattern_discard_read_only_and_bad_input() {
    let dir = guest_dir();
    let guest = Guest::boot(dir.path(), &GuestSpec::new("nbd_device").part2());
    let run = guest
        .finish(Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("{e}"));
    run.assert_ok();
    println!("{}", run.console);
    let r = run.results();
    assert_eq!(r["path"], "/dev/nbd0", "the path export add printed");
    assert_eq!(r["size"], (64u64 << 20).to_string(), "capacity");
    assert_eq!(r["ro"], "0");
    assert_eq!(r["connections"], "2", "--connections 2: two sockets served");
    assert_eq!(
        r["backend_matches"], "yes",
        "/sys/block/nbd0/backend is our cookie"
    );
    assert_ne!(r["discard_max"], "0", "discard advertised");
    assert_eq!(r["write_cache"], "write_back", "flush reaches the volume");
    assert_eq!(r["listed"], "yes", "export list --format json");
    assert_eq!(
        run.md5("device"),
        run.md5("file"),
        "the device holds the file's bytes"
    );
    assert_eq!(run.md5("discarded"), run.md5("zeros"), "discarded: zeros");
    assert_eq!(
        run.md5("file-discarded"),
        run.md5("zeros"),
        "in the file too"
    );
    assert!(
        r["file_kib"].parse::<u64>().unwrap() <= 8 << 10,
        "the discard punched the file: {} KiB allocated",
        r["file_kib"]
    );
    assert_eq!(r["ro_path"], "/dev/nbd1");
    assert_eq!(r["ro_write"], "refused");
    assert_eq!(r["ro_dev"], "1", "the kernel sees a read-only disk");
    assert_eq!(
        run.md5("ro"),
        run.md5("rw"),
        "the read-only device reads the volume"
    );
    let errors = run.lines("CURVE-ERROR");
    let find = |what: &str| {
        errors
            .iter()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no {what} error:\n{}", run.console))
            .clone()
    };
    let in_use = find("in-use");
    assert!(in_use.contains("/dev/nbd0 is in use"), "{in_use}");
    let path = find("path");
    assert!(path.contains("bad NBD device \"/dev/sda\""), "{path}");
    let conns = find("connections");
    assert!(conns.contains("17 connections: 1 to 16"), "{conns}");
    let flags = find("flags");
    assert!(flags.contains("--nbd-device exports only"), "{flags}");
    assert_eq!(r["dmesg"], "clean", "{}", run.console);
    assert_ne!(
        r["removed_writers_rc"], "0",
        "writers on a removed device see their I/O fail"
    );
    assert_eq!(r["removed_size"], "0", "the removed device is disconnected");
    assert_eq!(r["still_serving"], "yes");
    assert_eq!(
        r["other_backend_warned"], "yes",
        "a restarted part2 says why it leaves a device alone"
    );
    assert_eq!(r["other_backend_kept"], "yes", "and does not touch it");
    assert_eq!(r["other_backend_listed"], "no");
    println!(
        "guest nbd device O_DIRECT: {}\n  {}\n(guest ran {:.1} s)",
        run.result_line("write").unwrap_or_default(),
        run.result_line("verify").unwrap_or_default(),
        run.took.as_secs_f64()
    );
}

/// 4 O_DIRECT writers on `/dev/nbd0` (`--nbd-device --connections 2 --io-timeout 5`, a file
/// volume on the guest's tmpfs); part2 (in the guest) is killed -9 two seconds in and
/// restarted: it checks the device's backend cookie and reattaches it with
/// NBD_CMD_RECONFIGURE; the kernel resends what the dead part2 held. 0 I/O errors, every
/// region verified, the device reads what the file holds, the same device, dmesg clean. Then
/// SIGTERM and a new part2: the same device and bytes.
fn nbd_writers_survive_kill_9(volume: &str, mib: u64) {
    let dir = guest_dir();
    let guest = Guest::boot(
        dir.path(),
        &GuestSpec::new("nbd_writers")
            .param("jobs", 4)
            .param("mib", mib)
            .param("secs", 12)
            .param("nbd_volume", volume)
            .part2(),
    );
    let run = guest
        .finish(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));
    run.assert_ok();
    println!("{}", run.console);
    let r = run.results();
    assert_eq!(r["reattached"], "yes", "{}", run.console);
    run.assert_writers_survived_restarts("/dev/nbd0");
    println!(
        "guest nbd device writers across kill -9: {}\n  {}\n{}\n(guest ran {:.1} s)",
        run.result_line("writers").unwrap_or_default(),
        run.result_line("writers-verify").unwrap_or_default(),
        run.lines("CURVE-KERNEL").join("\n"),
        run.took.as_secs_f64()
    );
}

#[test]
fn guest_nbd_device_writers_survive_kill_9_of_part2() {
    nbd_writers_survive_kill_9("file:/tmp/w.img", 4);
}

/// The same with a volume that completes every 5th request 20 ms late (out of order).
#[test]
fn guest_nbd_device_writers_survive_kill_9_of_part2_with_out_of_order_completions() {
    nbd_writers_survive_kill_9("delay:5:20:file:/tmp/w.img", 1);
}

/// Benchmark (not run by the suite; `docs/benchmarks.md` has the command and figures): fio in
/// one guest boot, 4K random read and write at QD1 and QD32, on our kernel NBD device
/// (`--nbd-device`, a part2 in the guest, `mem:`), on nbd-client attached to qemu-nbd (a file
/// on the guest's tmpfs) and to `nbdkit memory` (when nbdkit is installed), and on our ublk
/// device of a `mem:` volume. Under TCG only the ratios mean anything. Prints a table; asserts
/// nothing about speed.
#[test]
#[ignore = "benchmark: run with --run-ignored only (release binaries recommended)"]
fn bench_nbd_device_against_qemu_nbd_nbdkit_and_ublk() {
    let fio = curve_tests::require_tool("fio");
    let nbd_client = curve_tests::require_tool("nbd-client");
    let qemu_nbd = curve_tests::require_tool("qemu-nbd");
    let env = |k: &str, d: u32| -> u32 {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (secs, rounds) = (env("CURVE_BENCH_SECS", 5), env("CURVE_BENCH_ROUNDS", 3));
    let poll_us = std::env::var("CURVE_NBD_POLL_US").unwrap_or_else(|_| "50".into());
    let dir = guest_dir();
    let mut spec = GuestSpec::new("nbd_bench")
        .param("secs", secs)
        .param("rounds", rounds)
        .param("poll_us", poll_us)
        .part2()
        .tool(&fio)
        .tool(&nbd_client)
        .tool(&qemu_nbd);
    let plugin =
        std::path::Path::new("/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-memory-plugin.so");
    let nbdkit = which("nbdkit").filter(|_| plugin.exists());
    if let Some(nbdkit) = &nbdkit {
        spec = spec
            .tool(nbdkit)
            .file(plugin)
            .param("nbdkit_plugin", plugin.display());
    }
    spec.memory_mib = 2048;
    let guest = Guest::boot(dir.path(), &spec);
    let run = guest
        .finish(Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("{e}"));
    run.assert_ok();
    let best = run.bench_medians();
    let peers: Vec<&str> = if nbdkit.is_some() {
        vec!["qemu", "nbdkit"]
    } else {
        vec!["qemu"]
    };
    println!("median of {rounds} rounds x {secs} s, one guest boot, IOPS (mean latency µs)");
    println!(
        "| fio job (guest, TCG) | ours /dev/nbdN | {} | ours ublk | ours / best NBD peer | ours NBD / ours ublk |",
        peers
            .iter()
            .map(|p| format!("nbd-client + {p}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|{}---|---|---|", "---|".repeat(peers.len()));
    for (rw, qd) in [
        ("randread", "1"),
        ("randwrite", "1"),
        ("randread", "32"),
        ("randwrite", "32"),
    ] {
        let get = |d: &str| best[&(rw.to_owned(), qd.to_owned(), d.to_owned())];
        let ours = get("ours");
        let ublk = get("ublk");
        let peer_cells: Vec<String> = peers
            .iter()
            .map(|p| format!("{:.0} ({:.0})", get(p).0, get(p).1))
            .collect();
        let best_peer = peers.iter().map(|p| get(p).0).fold(0.0, f64::max);
        println!(
            "| 4K {rw} QD{qd} | {:.0} ({:.0}) | {} | {:.0} ({:.0}) | {:.2}× | {:.2}× |",
            ours.0,
            ours.1,
            peer_cells.join(" | "),
            ublk.0,
            ublk.1,
            ours.0 / best_peer,
            ours.0 / ublk.0
        );
    }
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}
