//! Snapshots and clones of cluster volumes (authentication on), through the client library,
//! the CLI and an NBD export of part2:
//! - snapshots taken while a writer runs hold exactly the writes acknowledged before their
//!   create, and none started after it returned; the volume itself is intact; deleting them
//!   gives every replica's COW files back to the pool;
//! - 20 clones of one snapshot, each written differently, read their own writes and the
//!   snapshot elsewhere; a clone of a clone's snapshot; flatten under a verifying writer;
//! - bad input: each refused with a clear error.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use curve_client::chunk::Connections;
use curve_client::{ClientError, Volume, VolumeOptions};
use curve_tests::cluster::MiniCluster;
use curve_tests::{Part2, bin, require_tool};

const BLOCK: u64 = 4096;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn options(cluster: &MiniCluster) -> VolumeOptions {
    let mut o = cluster.volume_options();
    o.fill_rate = 0; // the tests flatten explicitly
    o
}

async fn open(cluster: &MiniCluster, path: &str) -> Result<Volume, ClientError> {
    Volume::open(path, options(cluster), Arc::new(Connections::default())).await
}

/// A block's content: its number and the write's number, repeated.
fn pattern(block: u64, n: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK as usize);
    while v.len() < BLOCK as usize {
        v.extend_from_slice(&block.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
    }
    v
}

/// The write number a block holds (0: zeros, never written); panics on anything else.
fn decode(block: u64, data: &[u8]) -> u64 {
    if data.iter().all(|b| *b == 0) {
        return 0;
    }
    let n = u64::from_le_bytes(data[8..16].try_into().unwrap());
    assert_eq!(
        data,
        pattern(block, n),
        "block {block}: a torn or foreign block"
    );
    n
}

/// COW files on every chunkserver under `dir`.
fn cow_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_string_lossy().contains("_snap_") {
                n += 1;
            }
        }
    }
    n
}

/// One acknowledged write: block, number, when it started and when it was acknowledged.
#[derive(Debug, Clone, Copy)]
struct Acked {
    block: u64,
    n: u64,
    start: Instant,
    ack: Instant,
}

#[test]
fn snapshots_under_load_hold_exactly_the_acknowledged_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    let rt = runtime();
    let mds = cluster.mds_client();
    // 48 MiB: three chunks' worth of blocks, written by 8 writers on disjoint blocks.
    const BLOCKS: u64 = 48 << 8;
    cluster.curve_ok(&["volume", "create", "/v", "--size", "64M"]);
    let v = rt.block_on(open(&cluster, "/v")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let (v, stop) = (v.clone(), stop.clone());
            rt.spawn(async move {
                let mut log = Vec::new();
                let mut n = w + 1;
                let mut x = w.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                while !stop.load(Ordering::Relaxed) && log.len() < 20_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let block = (x % (BLOCKS / 8)) * 8 + w;
                    let start = Instant::now();
                    v.write(block * BLOCK, &pattern(block, n)).await?;
                    log.push(Acked {
                        block,
                        n,
                        start,
                        ack: Instant::now(),
                    });
                    n += 8;
                }
                Ok::<_, ClientError>(log)
            })
        })
        .collect();
    // Three snapshots while the writers run.
    let mut snaps = Vec::new();
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        let name = format!("s{i}");
        let call = Instant::now();
        let s = rt
            .block_on(mds.create_snapshot("/v", &name, "root"))
            .unwrap();
        let ret = Instant::now();
        assert!(s.ready, "{s:?}");
        eprintln!("snapshot {name}: seq {} in {:?}", s.seq, ret - call);
        snaps.push((name, call, ret));
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let mut log: Vec<Acked> = Vec::new();
    for w in writers {
        log.extend(rt.block_on(w).unwrap().unwrap());
    }
    assert!(log.len() > 100, "the writers wrote {} blocks", log.len());
    let mut by_block: HashMap<u64, Vec<Acked>> = HashMap::new();
    for a in &log {
        by_block.entry(a.block).or_default().push(*a);
    }
    let read_all = |v: &Volume| -> Vec<u8> {
        let mut buf = vec![0u8; (BLOCKS * BLOCK) as usize];
        rt.block_on(v.read(0, &mut buf)).unwrap();
        buf
    };
    // Each snapshot: per block, the last write acknowledged before the create was called, or
    // one in flight during the create; never one started after it returned.
    for (name, call, ret) in &snaps {
        let s = rt.block_on(open(&cluster, &format!("/v@{name}"))).unwrap();
        assert!(s.is_read_only());
        let data = read_all(&s);
        let (mut exact, mut inflight) = (0, 0);
        for block in 0..BLOCKS {
            let got = decode(block, &data[(block * BLOCK) as usize..][..BLOCK as usize]);
            let writes = by_block.get(&block).map(Vec::as_slice).unwrap_or(&[]);
            let before = writes
                .iter()
                .filter(|a| a.ack < *call)
                .map(|a| a.n)
                .max()
                .unwrap_or(0);
            if got == before {
                exact += 1;
                continue;
            }
            let w = writes.iter().find(|a| a.n == got).unwrap_or_else(|| {
                panic!("snapshot {name}, block {block}: {got} was never acknowledged")
            });
            assert!(
                w.start < *ret && w.ack >= *call,
                "snapshot {name}, block {block}: holds write {got} (started {:?} after the \
                 create returned), not {before}",
                w.start.checked_duration_since(*ret)
            );
            inflight += 1;
        }
        eprintln!("snapshot {name}: {exact} blocks exact, {inflight} from writes in flight");
        // Writing to a snapshot is refused.
        assert!(matches!(
            rt.block_on(s.write(0, &pattern(0, 1))),
            Err(ClientError::ReadOnly(_))
        ));
    }
    // The volume holds every block's last acknowledged write.
    let data = read_all(&v);
    for (block, writes) in &by_block {
        let last = writes.iter().map(|a| a.n).max().unwrap();
        assert_eq!(
            decode(*block, &data[(block * BLOCK) as usize..][..BLOCK as usize]),
            last,
            "block {block} of the volume"
        );
    }
    rt.block_on(v.close()).unwrap();

    // Bad input, each refused with a clear message.
    cluster.curve_fails_with(
        &["snapshot", "create", "/missing", "--name", "x"],
        "NotFound",
    );
    cluster.curve_fails_with(&["snapshot", "create", "/v", "--name", "s0"], "Exists");
    cluster.curve_fails_with(
        &["snapshot", "create", "/v", "--name", "a@b"],
        "snapshot name",
    );
    cluster.curve_fails_with(&["snapshot", "delete", "/v@nope"], "NotFound");
    cluster.curve_fails_with(&["snapshot", "delete", "/v"], "PATH@NAME");
    cluster.curve_fails_with(&["volume", "delete", "/v"], "has snapshots");
    cluster.curve_fails_with(
        &["volume", "create", "/x@y", "--size", "1G"],
        "names a snapshot",
    );
    let list = cluster.curve_ok(&["snapshot", "list", "/v", "--format", "json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    let info = cluster.curve_ok(&["volume", "info", "/v"]);
    assert!(info.contains("/v@s1") && info.contains("holds"), "{info}");
    let info = cluster.curve_ok(&["volume", "info", "/v", "--format", "json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info[0]["bytes_used"],
        3u64 * (16 << 20),
        "three chunks written: {info}"
    );
    let held: u64 = (0..3)
        .map(|i| info[0]["snapshots"][i]["bytes"].as_u64().unwrap())
        .sum();
    assert!(held > 0 && held <= 9 * (16 << 20), "COW space: {info}");

    // Deleting the snapshots gives their COW files back on every replica.
    let cows = cow_files(tmp.path());
    assert!(cows > 0, "the writes after the snapshots copied chunks");
    for (name, _, _) in &snaps {
        cluster.curve_ok(&["snapshot", "delete", &format!("/v@{name}")]);
    }
    assert_eq!(
        cow_files(tmp.path()),
        0,
        "COW files left after deleting every snapshot"
    );
    cluster.curve_ok(&["volume", "delete", "/v", "--force"]);
}

/// Reads block `block` of `v` and returns its write number.
fn block_of(rt: &tokio::runtime::Runtime, v: &Volume, block: u64) -> u64 {
    let mut b = vec![0u8; BLOCK as usize];
    rt.block_on(v.read(block * BLOCK, &mut b)).unwrap();
    decode(block, &b)
}

#[test]
fn clones_read_their_writes_and_the_snapshot_elsewhere() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    let rt = runtime();
    // The source: blocks 0..64 of each of 3 chunks written with 1000+block, snapshot s1,
    // then overwritten with 2000+block.
    cluster.curve_ok(&["volume", "create", "/src", "--size", "64M"]);
    let blocks: Vec<u64> = (0..3u64)
        .flat_map(|c| (0..64).map(move |b| c * 4096 + b * 3))
        .collect();
    let src = rt.block_on(open(&cluster, "/src")).unwrap();
    for b in &blocks {
        rt.block_on(src.write(b * BLOCK, &pattern(*b, 1000 + b)))
            .unwrap();
    }
    cluster.curve_ok(&["snapshot", "create", "/src", "--name", "s1"]);
    for b in &blocks {
        rt.block_on(src.write(b * BLOCK, &pattern(*b, 2000 + b)))
            .unwrap();
    }
    // 20 clones, each writing its own blocks.
    for i in 0..20 {
        cluster.curve_ok(&["volume", "clone", "/src@s1", &format!("/c{i}")]);
    }
    let clones: Vec<Volume> = (0..20)
        .map(|i| rt.block_on(open(&cluster, &format!("/c{i}"))).unwrap())
        .collect();
    for (i, c) in clones.iter().enumerate() {
        let i = i as u64;
        // One block that the source has (overwritten), one in a chunk of the source it never
        // wrote, one in a chunk the source never had.
        for b in [blocks[i as usize * 7], 10000 + i, 12300 + i] {
            rt.block_on(c.write(b * BLOCK, &pattern(b, 5000 + i * 100 + b)))
                .unwrap();
        }
    }
    for (i, c) in clones.iter().enumerate() {
        let i = i as u64;
        for (k, b) in blocks.iter().enumerate() {
            let want = if k == i as usize * 7 {
                5000 + i * 100 + b
            } else {
                1000 + b
            };
            assert_eq!(block_of(&rt, c, *b), want, "clone {i}, block {b}");
        }
        for b in [10000 + i, 12300 + i] {
            assert_eq!(block_of(&rt, c, b), 5000 + i * 100 + b, "clone {i}");
        }
        assert_eq!(block_of(&rt, c, 10100), 0, "clone {i}: never written");
    }
    // The source and the snapshot are unchanged.
    let snap = rt.block_on(open(&cluster, "/src@s1")).unwrap();
    for b in &blocks {
        assert_eq!(block_of(&rt, &src, *b), 2000 + b);
        assert_eq!(block_of(&rt, &snap, *b), 1000 + b);
    }
    assert_eq!(
        block_of(&rt, &src, 10000),
        0,
        "clone writes stay in the clone"
    );
    assert_eq!(
        block_of(&rt, &src, 12300),
        0,
        "clone writes stay in the clone"
    );

    // The snapshot through part2: an NBD export of curve:/src@s1 is read-only.
    let part2 = Part2::start_with(&[
        "--mds",
        &cluster.mds_addrs()[0],
        "--key-file",
        &cluster.key(),
    ]);
    let sock = part2.run_dir().join("snap.sock");
    let out = Command::new(bin("curve"))
        .args(["--run-dir"])
        .arg(part2.run_dir())
        .args([
            "export",
            "add",
            "--name",
            "snap",
            "--volume",
            "curve:/src@s1",
            "--nbd",
        ])
        .arg(format!("unix:{}", sock.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uri = format!("nbd+unix:///snap?socket={}", sock.display());
    let qio = |args: &[&str]| {
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(args)
            .arg(&uri)
            .output()
            .unwrap()
    };
    let back = tmp.path().join("back");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&back)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = std::fs::read(&back).unwrap();
    assert_eq!(image.len(), 64 << 20);
    for b in &blocks {
        let got = &image[(b * BLOCK) as usize..][..BLOCK as usize];
        assert!(
            got == pattern(*b, 1000 + b),
            "block {b} of the snapshot over NBD"
        );
    }
    let w = qio(&["-c", "write -P 0x55 0 4k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&w.stdout),
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(
        !w.status.success() || text.contains("failed") || text.contains("read-only"),
        "a write to a snapshot export: {text}"
    );
    assert_eq!(block_of(&rt, &snap, 0), 1000, "the snapshot is unchanged");
    // vhost-user-blk (our virtio front-end) and part1 (libnebd) on the same part2: reads
    // serve, every write fails.
    let vu = part2.run_dir().join("snap-vu.sock");
    part2.curve_ok(&[
        "export",
        "add",
        "--volume",
        "curve:/src@s1",
        "--vhost-user-blk",
        vu.to_str().unwrap(),
        "--name",
        "snapvu",
    ]);
    let part1 = part2.part1_socket();
    for target in [
        vec!["--driver", "vhost-user", "--target", vu.to_str().unwrap()],
        vec![
            "--driver",
            "nebd",
            "--target",
            part1.to_str().unwrap(),
            "--volume",
            "curve:/src@s1",
        ],
    ] {
        let run = |w: &str| {
            let mut args = vec!["bench"];
            args.extend(&target);
            args.extend(["-w", w, "-q", "4", "--io-count", "100", "--format", "json"]);
            let out = cluster.curve(&args);
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "{target:?} {w}: {e}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        };
        let r = run("randread");
        assert_eq!(
            (r["ios"].as_u64(), r["errors"].as_u64()),
            (Some(100), Some(0)),
            "{target:?}: {r}"
        );
        let r = run("randwrite");
        assert_eq!(
            r["errors"], 100,
            "{target:?}: every write to the snapshot fails: {r}"
        );
    }
    drop(part2);
    // And through `curve bench --driver client`: reads run, writes are refused.
    let bench = |w: &str| {
        cluster.curve(&[
            "bench",
            "--driver",
            "client",
            "--target",
            "curve:/src@s1",
            "-w",
            w,
            "-q",
            "4",
            "--io-count",
            "200",
            "--format",
            "json",
        ])
    };
    let out = bench("randread");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["errors"], 0, "{r}");
    let out = bench("randwrite");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["errors"], 200, "every write to a snapshot fails: {r}");

    // The CloneManager: a clone open for writing copies its source in the background (at a
    // bounded rate) and ends flat by itself.
    cluster.curve_ok(&["volume", "clone", "/src@s1", "/bg"]);
    let bg = {
        let mut o = options(&cluster);
        o.fill_rate = 32 << 20;
        rt.block_on(Volume::open("/bg", o, Arc::new(Connections::default())))
            .unwrap()
    };
    rt.block_on(bg.write(0, &pattern(0, 77))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while rt.block_on(bg.stat()).unwrap().clone_source.is_some() {
        assert!(
            Instant::now() < deadline,
            "the background fill did not end in 120 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(block_of(&rt, &bg, 0), 77);
    for b in &blocks[1..] {
        assert_eq!(block_of(&rt, &bg, *b), 1000 + b, "background-filled clone");
    }
    rt.block_on(bg.close()).unwrap();

    // A clone of a clone's snapshot reads the clone, and through it the source.
    cluster.curve_ok(&["snapshot", "create", "/c3", "--name", "t"]);
    cluster.curve_ok(&["volume", "clone", "/c3@t", "/cc"]);
    let cc = rt.block_on(open(&cluster, "/cc")).unwrap();
    assert_eq!(block_of(&rt, &cc, blocks[21]), 5000 + 300 + blocks[21]);
    assert_eq!(block_of(&rt, &cc, blocks[22]), 1000 + blocks[22]);
    assert_eq!(block_of(&rt, &cc, 10003), 5000 + 300 + 10003);

    // Bad input around clones.
    cluster.curve_fails_with(&["volume", "clone", "/src@s1", "/c0"], "Exists");
    cluster.curve_fails_with(&["volume", "clone", "/src@nope", "/n"], "NotFound");
    cluster.curve_fails_with(&["volume", "clone", "/src", "/n"], "clone a snapshot");
    cluster.curve_fails_with(&["snapshot", "delete", "/src@s1"], "has clones");
    cluster.curve_fails_with(&["volume", "flatten", "/src"], "not a clone");

    // Flatten /c0 while a writer verifies its own writes on it.
    let c0 = clones[0].clone();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c0, stop) = (c0.clone(), stop.clone());
        rt.spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 5000 {
                let b = 4096 * 2 + 1000 + n % 200;
                c0.write(b * BLOCK, &pattern(b, 9000 + n)).await?;
                let mut back = vec![0u8; BLOCK as usize];
                c0.read(b * BLOCK, &mut back).await?;
                assert_eq!(back, pattern(b, 9000 + n), "clone 0 block {b} read back");
                n += 1;
            }
            Ok::<u64, ClientError>(n)
        })
    };
    let out = cluster.curve(&["volume", "flatten", "/c0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("100.0%"));
    stop.store(true, Ordering::Relaxed);
    let wrote = rt.block_on(writer).unwrap().unwrap();
    assert!(wrote > 0);
    let info = cluster.curve_ok(&["volume", "info", "/c0", "--format", "json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(info[0]["clone_source"].is_null(), "{info}");
    for (k, b) in blocks.iter().enumerate() {
        let want = if k == 0 { 5000 + b } else { 1000 + b };
        assert_eq!(block_of(&rt, &c0, *b), want, "flattened clone 0, block {b}");
    }
    // Once every clone is flat or gone, the snapshot can go.
    for (i, c) in clones.into_iter().enumerate().skip(1) {
        rt.block_on(c.close()).unwrap();
        if i == 3 {
            continue; // /c3@t reads through it: flattened below
        }
        cluster.curve_ok(&["volume", "delete", &format!("/c{i}"), "--force"]);
    }
    cluster.curve_fails_with(&["snapshot", "delete", "/src@s1"], "/c3@t");
    rt.block_on(cc.close()).unwrap();
    cluster.curve_ok(&["volume", "delete", "/cc", "--force"]);
    cluster.curve_ok(&["snapshot", "delete", "/c3@t"]);
    cluster.curve_ok(&["volume", "flatten", "/c3"]);
    cluster.curve_ok(&["snapshot", "delete", "/src@s1"]);
    assert_eq!(
        block_of(&rt, &c0, blocks[5]),
        1000 + blocks[5],
        "flat: no source needed"
    );
}

/// The chunkserver leading the most copysets (index into `cluster.chunkservers`).
fn busiest_leader(rt: &tokio::runtime::Runtime, cluster: &MiniCluster) -> usize {
    let t = rt.block_on(cluster.mds_client().topology()).unwrap();
    let mut count = vec![0usize; cluster.chunkservers.len()];
    for c in &t.copysets {
        if let Some(l) = &c.leader
            && let Some(i) = cluster
                .chunkservers
                .iter()
                .position(|cs| cs.addr == l.address)
        {
            count[i] += 1;
        }
    }
    (0..count.len()).max_by_key(|i| count[*i]).unwrap()
}

/// Writes random blocks of `range` (pattern numbers from `first`, step 1) until `stop` or
/// `max` writes, reading each back; answers what it acknowledged.
fn spawn_writer(
    rt: &tokio::runtime::Runtime,
    v: &Volume,
    range: std::ops::Range<u64>,
    first: u64,
    max: usize,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<Vec<Acked>, ClientError>> {
    let (v, stop) = (v.clone(), stop.clone());
    rt.spawn(async move {
        let mut log = Vec::new();
        let mut x = first | 1;
        while !stop.load(Ordering::Relaxed) && log.len() < max {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let block = range.start + x % (range.end - range.start);
            let n = first + log.len() as u64;
            let start = Instant::now();
            v.write(block * BLOCK, &pattern(block, n)).await?;
            let mut back = vec![0u8; BLOCK as usize];
            v.read(block * BLOCK, &mut back).await?;
            assert!(back == pattern(block, n), "block {block} read back");
            log.push(Acked {
                block,
                n,
                start,
                ack: Instant::now(),
            });
        }
        Ok(log)
    })
}

/// The last acknowledged write of every block in `log`.
fn last_writes(log: &[Acked]) -> HashMap<u64, u64> {
    let mut m = HashMap::new();
    for a in log {
        let e = m.entry(a.block).or_insert(a.n);
        *e = (*e).max(a.n);
    }
    m
}

#[test]
fn kill_9_during_copy_on_write_flatten_and_snapshot_create() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = MiniCluster::start(tmp.path(), 1, false);
    let rt = runtime();
    const BLOCKS: u64 = 3 * 4096; // three chunks
    cluster.curve_ok(&["volume", "create", "/v", "--size", "64M"]);
    let v = rt.block_on(open(&cluster, "/v")).unwrap();
    // Every block of three chunks holds 1_000_000 + block; then snapshot s1.
    let base = |b: u64| 1_000_000 + b;
    for chunk in 0..3u64 {
        let mut buf = Vec::with_capacity((4096 * BLOCK) as usize);
        for b in chunk * 4096..(chunk + 1) * 4096 {
            buf.extend_from_slice(&pattern(b, base(b)));
        }
        for (i, piece) in buf.chunks(1 << 20).enumerate() {
            let at = chunk * 4096 * BLOCK + (i as u64) * (1 << 20);
            rt.block_on(v.write(at, piece)).unwrap();
        }
    }
    cluster.curve_ok(&["snapshot", "create", "/v", "--name", "s1"]);

    // 1. A COW burst, and kill -9 of the busiest leader in the middle of it.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&rt, &v, 0..BLOCKS, 1, 3000, &stop);
    std::thread::sleep(Duration::from_secs(2));
    let victim = busiest_leader(&rt, &cluster);
    cluster.chunkservers[victim].kill9();
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    let log = rt.block_on(writer).unwrap().unwrap();
    cluster.chunkservers[victim].restart();
    let cow_writes = last_writes(&log);
    let writes = &cow_writes;
    eprintln!("COW burst: {} writes across the kill", log.len());
    let check = |cluster: &MiniCluster, what: &str| {
        let s = rt.block_on(open(cluster, "/v@s1")).unwrap();
        let mut buf = vec![0u8; (BLOCKS * BLOCK) as usize];
        rt.block_on(s.read(0, &mut buf)).unwrap();
        for b in 0..BLOCKS {
            let got = decode(b, &buf[(b * BLOCK) as usize..][..BLOCK as usize]);
            assert_eq!(got, base(b), "{what}: snapshot s1, block {b}");
        }
        rt.block_on(v.read(0, &mut buf)).unwrap();
        for b in 0..BLOCKS {
            let want = writes.get(&b).copied().unwrap_or(base(b));
            let got = decode(b, &buf[(b * BLOCK) as usize..][..BLOCK as usize]);
            assert_eq!(got, want, "{what}: volume, block {b}");
        }
    };
    check(&cluster, "after the kill");
    // Every replica holds the copies: each chunkserver in turn is stopped (so that the
    // others lead), and the snapshot reads the same.
    for i in 0..cluster.chunkservers.len() {
        cluster.wait_healthy(Duration::from_secs(120));
        cluster.chunkservers[i].kill9();
        check(&cluster, &format!("chunkserver {i} down"));
        cluster.chunkservers[i].restart();
    }
    cluster.wait_healthy(Duration::from_secs(120));

    // 2. Flatten a clone while its writer runs, with kill -9 of a leader during it.
    cluster.curve_ok(&["volume", "clone", "/v@s1", "/c"]);
    let c = rt.block_on(open(&cluster, "/c")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&rt, &c, 0..BLOCKS, 5_000_000, 100_000, &stop);
    let flatten = {
        let mds = cluster.mds_addrs().join(",");
        let key = cluster.key();
        std::thread::spawn(move || {
            Command::new(bin("curve"))
                .env("CURVE_KEY_FILE", key)
                .args(["--mds", &mds, "volume", "flatten", "/c", "--rate", "8M"])
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let victim = busiest_leader(&rt, &cluster);
    cluster.chunkservers[victim].kill9();
    let out = flatten.join().unwrap();
    assert!(
        out.status.success(),
        "flatten across a kill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop.store(true, Ordering::Relaxed);
    let log = rt.block_on(writer).unwrap().unwrap();
    cluster.chunkservers[victim].restart();
    let writes = last_writes(&log);
    let mut buf = vec![0u8; (BLOCKS * BLOCK) as usize];
    rt.block_on(c.read(0, &mut buf)).unwrap();
    for b in 0..BLOCKS {
        let want = writes.get(&b).copied().unwrap_or(base(b));
        assert_eq!(
            decode(b, &buf[(b * BLOCK) as usize..][..BLOCK as usize]),
            want,
            "flattened clone, block {b}"
        );
    }
    rt.block_on(c.close()).unwrap();
    cluster.curve_ok(&["snapshot", "delete", "/v@s1"]);
    rt.block_on(c.read(0, &mut buf)).unwrap_err(); // closed
    let c = rt.block_on(open(&cluster, "/c")).unwrap();
    let mut again = vec![0u8; buf.len()];
    rt.block_on(c.read(0, &mut again)).unwrap();
    assert!(again == buf, "the flat clone without its source");
    rt.block_on(c.close()).unwrap();

    // 3. kill -9 of the MDS during `snapshot create`: the snapshot exists and holds the
    //    writes acknowledged before the call (plus ones in flight), or it does not exist and
    //    the command failed.
    cluster.wait_healthy(Duration::from_secs(120));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&rt, &v, 0..BLOCKS, 9_000_000, 100_000, &stop);
    std::thread::sleep(Duration::from_secs(1));
    let call = Instant::now();
    let create = {
        let mds = cluster.mds_addrs().join(",");
        let key = cluster.key();
        std::thread::spawn(move || {
            Command::new(bin("curve"))
                .env("CURVE_KEY_FILE", key)
                .args(["--mds", &mds, "snapshot", "create", "/v", "--name", "k"])
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(30));
    cluster.mds[0].kill9();
    cluster.mds[0].restart();
    let out = create.join().unwrap();
    let listed = cluster.curve_ok(&["snapshot", "list", "/v", "--format", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let exists = listed.as_array().unwrap().iter().any(|s| s["name"] == "k");
    eprintln!(
        "snapshot create across a kill -9 of the MDS: exit {:?}, exists {exists}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    if !exists {
        assert!(
            !out.status.success(),
            "the command said it made a snapshot that is not there"
        );
        stop.store(true, Ordering::Relaxed);
        rt.block_on(writer).unwrap().unwrap();
        return;
    }
    // It exists: it becomes readable once the writer took it; then check it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        match rt.block_on(open(&cluster, "/v@k")) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for /v@k: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("/v@k never became readable: {e}"),
        }
    };
    let ready = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let log = rt.block_on(writer).unwrap().unwrap();
    let mut by_block: HashMap<u64, Vec<Acked>> = HashMap::new();
    for a in &log {
        by_block.entry(a.block).or_default().push(*a);
    }
    rt.block_on(s.read(0, &mut buf)).unwrap();
    for b in 0..BLOCKS {
        let got = decode(b, &buf[(b * BLOCK) as usize..][..BLOCK as usize]);
        let ws = by_block.get(&b).map(Vec::as_slice).unwrap_or(&[]);
        // Before the call: the last write acknowledged then, or the value before this writer.
        let before = ws
            .iter()
            .filter(|a| a.ack < call)
            .map(|a| a.n)
            .max()
            .unwrap_or_else(|| writes_before(&cow_writes, b, base(b)));
        if got == before {
            continue;
        }
        let w = ws
            .iter()
            .find(|a| a.n == got)
            .unwrap_or_else(|| panic!("/v@k block {b}: {got} is not a write of this run"));
        assert!(
            w.start < ready && w.ack >= call,
            "/v@k block {b}: holds write {got}, started after the snapshot was taken"
        );
    }
    rt.block_on(v.close()).unwrap();
}

/// What block `b` held before the last writer: the previous writer's last write, else `base`.
fn writes_before(prev: &HashMap<u64, u64>, b: u64, base: u64) -> u64 {
    prev.get(&b).copied().unwrap_or(base)
}

/// A `snapshot delete` whose first attempt gets no answer in time (every chunkserver is
/// stopped, so the MDS waits on them to drop the snapshot's data) is tried again, finds the
/// snapshot gone — the first attempt deleted it — and succeeds instead of answering NotFound;
/// the MDS goes on dropping the snapshot's data after its caller stopped waiting, so the COW
/// files go once the chunkservers resume.
#[test]
fn a_snapshot_delete_tried_again_after_a_timeout_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = MiniCluster::start(tmp.path(), 1, false);
    cluster.create_volume("/v", 64 << 20);
    let rt = runtime();
    let v = rt.block_on(open(&cluster, "/v")).unwrap();
    rt.block_on(v.write(0, &pattern(0, 1))).unwrap();
    cluster.curve_ok(&["snapshot", "create", "/v", "--name", "s"]);
    // Written after the snapshot: the chunk keeps the snapshot's copy in a COW file.
    rt.block_on(v.write(0, &pattern(0, 2))).unwrap();
    rt.block_on(v.close()).unwrap();
    assert!(
        cow_files(tmp.path()) > 0,
        "the write after the snapshot made a COW file"
    );
    for c in &cluster.chunkservers {
        c.daemon.as_ref().unwrap().signal(libc::SIGSTOP);
    }
    let t0 = Instant::now();
    let out = cluster.curve(&["snapshot", "delete", "/v@s"]);
    let took = t0.elapsed();
    for c in &cluster.chunkservers {
        c.daemon.as_ref().unwrap().signal(libc::SIGCONT);
    }
    assert!(
        took >= Duration::from_secs(10),
        "the first attempt waited on the stopped chunkservers until it timed out ({took:?})"
    );
    assert!(
        out.status.success(),
        "the delete succeeded: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = cluster.curve_ok(&["snapshot", "list", "/v", "--format", "json"]);
    assert!(!list.contains("\"s\""), "the snapshot is gone: {list}");
    cluster.curve_fails_with(&["snapshot", "delete", "/v@s"], "NotFound");
    let deadline = Instant::now() + Duration::from_secs(90);
    while cow_files(tmp.path()) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        cow_files(tmp.path()),
        0,
        "the snapshot's COW files dropped after the chunkservers resumed (waited 90 s)"
    );
}
