//! TRIM and WRITE_ZEROES of a cluster volume cost metadata, not data: qemu-io discards and
//! zeroes a whole 10 GiB volume through part2's NBD export, every replica punches holes (the
//! space of the chunk files goes back, as `du` counts it), reads give zeros, and nbdinfo's
//! BLOCK_STATUS map shows holes where data was.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use curve_tests::cluster::MiniCluster;
use curve_tests::{Part2, require_tool, run_ok, wait_until};

const GIB: u64 = 1 << 30;

/// Bytes allocated to the chunk files under a chunkserver's data dir (what `du` counts for
/// them): the pool, the raft logs and the metadata are left out.
fn chunk_bytes(dir: &Path) -> u64 {
    fn walk(d: &Path, total: &mut u64) {
        let Ok(entries) = std::fs::read_dir(d) else {
            return;
        };
        for e in entries.flatten() {
            let (path, meta) = (e.path(), e.metadata().unwrap());
            if meta.is_dir() {
                walk(&path, total);
            } else if e.file_name().to_string_lossy().starts_with("chunk_") {
                *total += meta.blocks() * 512;
            }
        }
    }
    let mut total = 0;
    walk(dir, &mut total);
    total
}

/// A qemu-io command over the whole volume, a GiB at a time (qemu-io takes less than 2 GiB).
fn per_gib(cmd: &str) -> Vec<String> {
    (0..10).map(|g| format!("{cmd} {g}G 1G")).collect()
}

fn qemu_io<S: AsRef<str>>(uri: &str, cmds: &[S]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd.as_ref()]);
    }
    let out = run_ok(c.arg(uri));
    assert!(
        !out.contains("error") && !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {:?}: {out}",
        cmds.iter().map(|c| c.as_ref()).collect::<Vec<_>>()
    );
    out
}

/// nbdinfo --map: (offset, length, description) of every extent.
fn map(uri: &str) -> Vec<(u64, u64, String)> {
    run_ok(Command::new("nbdinfo").args(["--map", uri]))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| {
                (
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                    f[3].to_string(),
                )
            })
        })
        .collect()
}

/// The map's description of the byte at `at`.
fn kind_at(m: &[(u64, u64, String)], at: u64) -> &str {
    m.iter()
        .find(|(o, l, _)| (*o..o + l).contains(&at))
        .map(|(_, _, d)| d.as_str())
        .unwrap_or("missing")
}

/// Waits until every replica holds less than 1 MiB of chunk data (followers apply what the
/// leader committed a heartbeat later).
fn given_back(held: &dyn Fn() -> Vec<u64>, what: &str) {
    let ok = wait_until(Duration::from_secs(60), || {
        held().iter().all(|b| *b < 1 << 20)
    });
    let after = held();
    println!("held after {what}: {after:?}");
    assert!(
        ok,
        "each replica gave the space back after {what} (waited 60 s): {after:?}"
    );
}

#[test]
fn trim_and_write_zeroes_of_a_whole_volume_give_the_space_back_on_every_replica() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    let mds = cluster.mds_addrs()[0].clone();
    let part2 = Part2::start_with(&["--mds", &mds, "--key-file", &cluster.key()]);
    cluster.create_volume("/v", 10 * GIB);
    let (uri, _) = part2.export_nbd("v", "curve:/v");
    let replicas: Vec<&Path> = cluster
        .chunkservers
        .iter()
        .map(|c| c.dir.as_path())
        .collect();
    let held = || {
        replicas
            .iter()
            .map(|d| chunk_bytes(d))
            .collect::<Vec<u64>>()
    };

    // Data in three places: the start, the middle and the end of the volume.
    let spots = [0, 5 * GIB, 10 * GIB - 32 * (1 << 20)];
    let fill = |pattern: u8| {
        for at in spots {
            qemu_io(&uri, &[&format!("write -P {pattern} {at} 32M")]);
        }
    };
    fill(0xab);
    let before = held();
    println!("chunk files held by each replica with 96 MiB written: {before:?}");
    for b in &before {
        assert!(*b >= 96 << 20, "every replica holds the data: {before:?}");
    }
    let m = map(&uri);
    for at in spots {
        assert_eq!(kind_at(&m, at), "data", "written range at {at}: {m:?}");
    }
    assert!(
        kind_at(&m, 2 * GIB).contains("hole"),
        "never written: {m:?}"
    );

    // The whole volume discarded or zeroed by `cmd`: timed, the space back on every replica,
    // zeros where the data was.
    let clear_all = |cmd: &str, what: &str| {
        let t = Instant::now();
        qemu_io(&uri, &per_gib(cmd));
        println!("{what} of 10 GiB: {:.2} s", t.elapsed().as_secs_f64());
        given_back(&held, what);
        for at in spots {
            qemu_io(&uri, &[&format!("read -P 0 {at} 32M")]);
        }
    };
    // TRIM of the whole volume.
    clear_all("discard", "TRIM");
    let m = map(&uri);
    assert!(
        m.iter()
            .all(|(_, _, d)| d.contains("hole") && d.contains("zero")),
        "all holes after TRIM: {m:?}"
    );

    // Written again, then WRITE_ZEROES of the whole volume (qemu-io's write -z).
    fill(0xcd);
    for at in spots {
        qemu_io(&uri, &[&format!("read -P 0xcd {at} 32M")]);
    }
    assert!(held().iter().all(|b| *b >= 96 << 20));
    clear_all("write -z -u", "WRITE_ZEROES");
    // A fast zero (NBD_CMD_FLAG_FAST_ZERO) is taken: zeroing costs no data here.
    qemu_io(&uri, &["write -z -n -u 1M 1M"]);
    // Zeroes past the end are refused; the export keeps serving.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -z 10G 1M", &uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("error") || text.contains("Input/output") || text.contains("Invalid"),
        "past the end: {text}"
    );
    qemu_io(&uri, &["write -P 0x11 0 4k", "read -P 0x11 0 4k"]);
    // Zeroes with NO_HOLE (qemu-io's write -z without -u): zeros, the space kept allocated.
    qemu_io(&uri, &["write -P 0x22 0 32M"]);
    wait_until(Duration::from_secs(60), || {
        held().iter().all(|b| *b >= 32 << 20)
    });
    qemu_io(&uri, &["write -z 0 32M", "read -P 0 0 32M"]);
    std::thread::sleep(Duration::from_secs(2));
    let kept = held();
    println!("held after NO_HOLE zeroes of 32 MiB: {kept:?}");
    assert!(
        kept.iter().all(|b| *b >= 32 << 20),
        "allocated still: {kept:?}"
    );
}
