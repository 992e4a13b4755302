//! Striped volumes (`curve volume create --stripe-unit U --stripe-count N`): a volume's bytes
//! dealt round N chunks in units of U, so that one sequential stream reaches N copysets at
//! once. Through the CLI, part2's NBD export, qemu-io, nbdinfo and fio:
//! - a 256 KiB write lands in 4 chunks (1 without striping), and reads back;
//! - the last unit of a volume whose size is not whole stripe sets is written and read back
//!   (its chunk-space address lies past the volume's size);
//! - fio writes and verifies random sizes over the whole volume (requests across units);
//! - nbdinfo's map, zeroing and discarding follow the units;
//! - a clone of a striped volume's snapshot reads the snapshot, takes its own writes, and is
//!   flattened;
//! - layouts that cannot work are refused with the reason.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use curve_tests::cluster::MiniCluster;
use curve_tests::{Part2, require_tool, run_ok};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri));
    assert!(
        !out.contains("error") && !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

/// Chunk files holding data, on every chunkserver (3 replicas each).
fn chunk_files(cluster: &MiniCluster) -> usize {
    fn walk(d: &Path, n: &mut usize) {
        let Ok(entries) = std::fs::read_dir(d) else {
            return;
        };
        for e in entries.flatten() {
            let (path, meta) = (e.path(), e.metadata().unwrap());
            if meta.is_dir() {
                walk(&path, n);
            } else if e.file_name().to_string_lossy().starts_with("chunk_") && meta.blocks() > 0 {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    for c in &cluster.chunkservers {
        walk(&c.dir, &mut n);
    }
    n
}

/// nbdinfo --map: is the byte at each of `at` data (true) or a hole?
fn data_at(uri: &str, at: &[u64]) -> Vec<bool> {
    let map: Vec<(u64, u64, bool)> = run_ok(Command::new("nbdinfo").args(["--map", uri]))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| (f[0].parse().unwrap(), f[1].parse().unwrap(), f[3] == "data"))
        })
        .collect();
    at.iter()
        .map(|a| {
            map.iter()
                .find(|(o, l, _)| (*o..o + l).contains(a))
                .unwrap_or_else(|| panic!("{a} not in the map {map:?}"))
                .2
        })
        .collect()
}

/// Waits (60 s at most: followers apply a heartbeat later) until the chunk files holding
/// data number `want`.
fn wait_chunk_files(cluster: &MiniCluster, want: usize, what: &str) {
    let done = curve_tests::wait_until(std::time::Duration::from_secs(60), || {
        chunk_files(cluster) == want
    });
    assert!(
        done,
        "{what}: {want} chunk files with data expected (waited 60 s), found {}",
        chunk_files(cluster)
    );
}

fn create<'a>(path: &'a str, unit: &'a str, count: &'a str) -> [&'a str; 9] {
    let (size, u, c) = ("--size", "--stripe-unit", "--stripe-count");
    ["volume", "create", path, size, "40M", u, unit, c, count]
}

#[test]
fn a_striped_volume_spreads_a_stream_over_chunks_and_serves_every_consumer() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    require_tool("fio");
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    let part2 = Part2::start_with(&[
        "--mds",
        &cluster.mds_addrs()[0],
        "--key-file",
        &cluster.key(),
    ]);

    // Layouts that cannot work.
    cluster.curve_fails_with(&create("/x", "3K", "4"), "power of two");
    cluster.curve_fails_with(&create("/x", "64M", "4"), "chunk size");
    cluster.curve_fails_with(&create("/x", "64K", "1000"), "at most 256");
    cluster.curve_fails_with(
        &[
            "volume",
            "create",
            "/x",
            "--size",
            "1G",
            "--stripe-unit",
            "64K",
        ],
        "--stripe-count",
    );

    // 40 MiB in units of 64 KiB round 4 chunks of 16 MiB: a stripe set is 64 MiB, so the
    // volume's last units live in chunk space past 40 MiB.
    cluster.curve_ok(&create("/s", "64K", "4"));
    let info: serde_json::Value =
        serde_json::from_str(&cluster.curve_ok(&["volume", "info", "/s", "--format", "json"]))
            .unwrap();
    assert_eq!(
        (
            info[0]["stripe_unit"].as_u64(),
            info[0]["stripe_count"].as_u64()
        ),
        (Some(64 * KIB), Some(4)),
        "{info}"
    );
    assert!(
        cluster
            .curve_ok(&["volume", "info", "/s"])
            .contains("units of 64 KiB round 4 chunks")
    );
    cluster.curve_ok(&["volume", "create", "/plain", "--size", "40M"]);
    let (s, _) = part2.export_nbd("s", "curve:/s");
    let (plain, _) = part2.export_nbd("plain", "curve:/plain");

    // One 256 KiB write: 4 chunks striped (× 3 replicas), 1 without.
    assert_eq!(chunk_files(&cluster), 0);
    qemu_io(&plain, &["write -P 0x33 0 256K".into()]);
    wait_chunk_files(&cluster, 3, "256 KiB on the plain volume");
    qemu_io(&s, &["write -P 0x11 0 256K".into()]);
    wait_chunk_files(&cluster, 3 + 12, "256 KiB on the striped volume");

    // The last unit (chunk-space address 48 MiB + 159 × 64 KiB, past the 40 MiB size).
    let last = 40 * MIB - 64 * KIB;
    qemu_io(
        &s,
        &[
            format!("write -P 0x22 {last} 64K"),
            "read -P 0x11 0 256K".into(),
            format!("read -P 0x22 {last} 64K"),
            format!("read -P 0 256K {}", last - 256 * KIB),
        ],
    );
    // (Written chunks come from the pool allocated whole: all of the 4 chunks, so all of
    // this volume, is data now; holes are punched below.)
    assert_eq!(
        data_at(&s, &[0, 20 * MIB, last]),
        vec![true, true, true],
        "nbdinfo --map of the striped volume"
    );

    // Zero the first unit and a half (holes punched where they map), discard the last unit.
    qemu_io(
        &s,
        &[
            "write -z -u 0 96K".into(),
            format!("discard {last} 64K"),
            "read -P 0 0 96K".into(),
            "read -P 0x11 96K 160K".into(),
            format!("read -P 0 {last} 64K"),
        ],
    );
    assert_eq!(
        data_at(&s, &[0, 64 * KIB, 95 * KIB, 96 * KIB, 255 * KIB, last]),
        vec![false, false, false, true, true, false],
        "the map after zeroing and discarding"
    );

    // fio: random sizes across unit boundaries over the whole volume, written and verified.
    let out = run_ok(Command::new("fio").args([
        "--name=stripes",
        "--ioengine=nbd",
        &format!("--uri={s}"),
        "--rw=randwrite",
        "--bsrange=4k-200k",
        "--size=40M",
        "--io_size=24M",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--output-format=terse",
    ]));
    assert!(
        out.lines().any(|l| l.split(';').nth(4) == Some("0")),
        "fio: errors or a failed verify: {out}"
    );

    // A clone of a snapshot of the striped volume: the snapshot's content, its own writes,
    // then flat (everything copied from the source in chunk space, whole stripe sets).
    let tail = 40 * MIB - MIB;
    qemu_io(
        &s,
        &[
            "write -P 0x44 0 1M".into(),
            format!("write -P 0x44 {tail} 1M"),
            format!("write -P 0x55 {} 64K", 64 * KIB),
        ],
    );
    cluster.curve_ok(&["snapshot", "create", "/s", "--name", "a"]);
    qemu_io(
        &s,
        &[
            "write -P 0x66 0 1M".into(),
            format!("write -P 0x66 {tail} 1M"),
        ],
    );
    cluster.curve_ok(&["volume", "clone", "/s@a", "/c"]);
    let (c, _) = part2.export_nbd("c", "curve:/c");
    let clone_reads_its_own = |c: &str| {
        qemu_io(
            c,
            &[
                "read -P 0x44 0 64K".into(),
                format!("read -P 0x55 {} 64K", 64 * KIB),
                format!("read -P 0x44 {} {}", 128 * KIB, MIB - 128 * KIB),
                format!("read -P 0x44 {tail} {}", MIB - 4096),
                // its own write, in the last unit's last block
                format!("read -P 0x77 {} 4K", 40 * MIB - 4096),
            ],
        )
    };
    qemu_io(&c, &[format!("write -P 0x77 {} 4K", 40 * MIB - 4096)]);
    clone_reads_its_own(&c);
    let out = cluster.curve(&["volume", "flatten", "/c"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stderr).contains("100.0%"),
        "flatten: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Flat: the snapshot goes, and the clone, opened again, reads the same without it.
    part2.curve_ok(&["export", "remove", "c"]);
    cluster.curve_ok(&["snapshot", "delete", "/s@a"]);
    let (c, _) = part2.export_nbd("c", "curve:/c");
    clone_reads_its_own(&c);
    qemu_io(
        &s,
        &[
            "read -P 0x66 0 1M".into(),
            format!("read -P 0x66 {tail} 1M"),
        ],
    );
}
