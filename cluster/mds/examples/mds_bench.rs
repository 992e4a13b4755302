//! MDS metadata rates over gRPC: create + open + close of N volumes, and GetOrAllocateSegment,
//! with C concurrent callers. Run against a running MDS (bench/mds_bench.sh starts one on the
//! embedded store and one on etcd, with chunkservers so that segments can be allocated).
//!
//! ```text
//! cargo run --release -p curve-mds --example mds_bench -- --mds 127.0.0.1:6700 \
//!     [--volumes 10000] [--concurrency 32] [--segments 2000] [--label embedded]
//! ```

use std::sync::Arc;
use std::time::Instant;

use curve_client::MdsClient;
use curve_proto::mds::FileType;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

async fn phase<F, Fut>(label: &str, what: &str, n: usize, conc: usize, f: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (f, next) = (f.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                f(i).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    println!("{label:>9} {what:<22} {n:>6} ops  {rate:>9.0} ops/s");
    rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mds: Vec<String> = arg("--mds", "127.0.0.1:6700")
        .split(',')
        .map(String::from)
        .collect();
    let n: usize = arg("--volumes", "10000").parse().unwrap();
    let conc: usize = arg("--concurrency", "32").parse().unwrap();
    let segs: usize = arg("--segments", "2000").parse().unwrap();
    let label = arg("--label", "mds");
    let run = format!("/bench-{}", std::process::id());
    let c = Arc::new(MdsClient::new(mds));
    c.create(&run, FileType::Directory, 0, 0, "bench")
        .await
        .unwrap();
    let t = Instant::now();
    let (cc, r) = (c.clone(), run.clone());
    phase(&label, "create", n, conc, move |i| {
        let (c, r) = (cc.clone(), r.clone());
        async move {
            c.create(&format!("{r}/v{i}"), FileType::Volume, 10 << 30, 0, "bench")
                .await
                .unwrap();
        }
    })
    .await;
    let sessions = Arc::new(parking_lot::Mutex::new(vec![String::new(); n]));
    let (cc, r, s) = (c.clone(), run.clone(), sessions.clone());
    phase(&label, "open", n, conc, move |i| {
        let (c, r, s) = (cc.clone(), r.clone(), s.clone());
        async move {
            let (_, sess, _) = c
                .open(&format!("{r}/v{i}"), "bench", "bench")
                .await
                .unwrap();
            s.lock()[i] = sess.session_id;
        }
    })
    .await;
    let (cc, r, s) = (c.clone(), run.clone(), sessions.clone());
    phase(&label, "close", n, conc, move |i| {
        let (c, r, s) = (cc.clone(), r.clone(), s.clone());
        async move {
            let id = s.lock()[i].clone();
            c.close(&format!("{r}/v{i}"), &id).await.unwrap();
        }
    })
    .await;
    let total = t.elapsed().as_secs_f64();
    println!(
        "{label:>9} {:<22} {:>6} vols {:>9.1} s ({:.0} volumes/s)",
        "create+open+close",
        n,
        total,
        n as f64 / total
    );
    // Segment allocation: one big volume, a new segment each time.
    let big = format!("{run}/big");
    c.create(&big, FileType::Volume, (segs as u64) << 30, 0, "bench")
        .await
        .unwrap();
    let (cc, b) = (c.clone(), big.clone());
    phase(&label, "GetOrAllocateSegment", segs, conc, move |i| {
        let (c, b) = (cc.clone(), b.clone());
        async move {
            let s = c
                .segment(&b, "bench", (i as u64) << 30, true)
                .await
                .unwrap();
            assert!(s.is_some_and(|s| !s.chunks.is_empty()));
        }
    })
    .await;
    let (cc, b) = (c.clone(), big.clone());
    phase(&label, "GetSegment (allocated)", segs, conc, move |i| {
        let (c, b) = (cc.clone(), b.clone());
        async move {
            c.segment(&b, "bench", (i as u64) << 30, false)
                .await
                .unwrap();
        }
    })
    .await;
}
