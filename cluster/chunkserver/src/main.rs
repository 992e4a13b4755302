//! `curve-chunkserver`: one per data disk.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use curve_chunkserver::copyset::CopysetOptions;
use curve_chunkserver::daemon::{self, Config};

/// Curve-rs chunkserver: serves the copysets of one data disk.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Data directory (one disk).
    #[arg(long)]
    data_dir: PathBuf,
    /// Address to serve on and advertise (host:port).
    #[arg(long)]
    listen: String,
    /// MDS addresses, comma separated (host:port,...).
    #[arg(long, value_delimiter = ',', required = true)]
    mds: Vec<String>,
    /// Zone reported at registration.
    #[arg(long, default_value = "zone1")]
    zone: String,
    /// Server reported at registration.
    #[arg(long, default_value = "server1")]
    server: String,
    /// Chunk size in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    chunk_size: u64,
    /// I/O alignment in bytes (4096 or 512).
    #[arg(long, default_value_t = 4096)]
    page_size: u64,
    /// Chunk files kept formatted in the pool.
    #[arg(long, default_value_t = 16)]
    pool_target: usize,
    /// Heartbeat interval to the MDS, ms.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Raft election timeout (min), ms; the max is 1.2 times it (a follower campaigns a leader
    /// lease, the max, plus its timeout after the last heartbeat: ~1.1–1.2 s at 500).
    #[arg(long, default_value_t = 500)]
    election_ms: u64,
    /// Chunk requests in flight beyond which OVERLOAD is answered (clients back off).
    #[arg(long, default_value_t = curve_chunkserver::service::DEFAULT_MAX_INFLIGHT)]
    max_inflight: usize,
    /// Free space kept on the data disk, percent of its file system: below it the disk is full
    /// (this chunkserver hands its leaderships to followers and takes no new writes).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=50))]
    disk_reserve_percent: u8,
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Threads of the async runtime (gRPC, raft). Default: a quarter of the CPUs, at least one
    /// (chunkservers share a host, one per disk; raft log fsyncs and snapshot work run on
    /// threads of their own). Each more thread a write's hops can land on is a wake-up more:
    /// on 2 CPUs with 3 chunkservers, 1 thread instead of 2 gave +20% 4K write IOPS.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,
    /// The cluster keyring (shared with the MDS; `curve key cluster`): turns authentication on
    /// (tickets and grants on chunk requests, the cluster key between daemons).
    #[arg(long, env = "CURVE_CLUSTER_KEY_FILE", value_name = "PATH")]
    cluster_key_file: Option<std::path::PathBuf>,
    /// TLS for every gRPC connection: DIR/ca.pem (the cluster's CA), DIR/cert.pem and
    /// DIR/key.pem (this daemon's certificate; `curve key tls DIR` makes them).
    #[arg(long, env = "CURVE_TLS_DIR", value_name = "DIR")]
    tls_dir: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let nofile = curve_metrics::process::daemon_setup();
    let a = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tracing::info!(open_files = nofile, "open-file limit");
    if !matches!(a.page_size, 512 | 4096) || a.chunk_size == 0 || a.chunk_size % a.page_size != 0 {
        anyhow::bail!("--chunk-size must be a multiple of --page-size (512 or 4096)");
    }
    curve_auth::tls::init(a.tls_dir.as_deref(), true)?;
    let cfg = Config {
        data_dir: a.data_dir,
        listen: a.listen,
        mds: a.mds,
        zone: a.zone,
        server: a.server,
        copyset: CopysetOptions {
            chunk_size: a.chunk_size,
            page_size: a.page_size,
            // openraft waits out a leader lease of the maximum before it campaigns: a narrow
            // range keeps a dead leader's replacement within ~2.2× the minimum.
            election_ms: (a.election_ms, a.election_ms * 6 / 5),
            heartbeat_ms: (a.election_ms / 3).max(50),
            ring: a
                .cluster_key_file
                .as_deref()
                .map(|p| curve_auth::SharedKeyring::watch(p, Duration::from_secs(1)))
                .transpose()?,
            ..CopysetOptions::default()
        },
        pool_target: a.pool_target,
        heartbeat: Duration::from_millis(a.heartbeat_ms),
        max_inflight: a.max_inflight,
        disk_reserve_percent: a.disk_reserve_percent,
        metrics_listen: a.metrics_listen,
    };
    let workers = a.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1)),
        usize::from,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    rt.block_on(daemon::run(cfg, async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }))
}
