//! `curve-mds`: the metadata server.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use curve_mds::cluster::Timeouts;
use curve_mds::daemon::{Config, run};
use curve_mds::mds::Options;
use curve_mds::namespace::Geometry;
use curve_mds::topology::TopologySpec;

/// The Curve-rs MDS: namespace, topology, sessions, heartbeats, scheduler.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// host:port to serve clients and chunkservers on (advertised to the other MDS).
    #[arg(long, default_value = "127.0.0.1:6700")]
    listen: String,
    /// Data directory: the embedded store and the pid lock.
    #[arg(long, env = "CURVE_MDS_DATA_DIR", default_value = "/var/lib/curve/mds")]
    data_dir: PathBuf,
    /// etcd endpoints (host:port,...): store the metadata there and elect one leader among
    /// the MDS that share them. Without it, the embedded store.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix in etcd.
    #[arg(long, default_value = "/curve/")]
    etcd_prefix: String,
    /// Election lease TTL in seconds (a dead leader is replaced after about this long).
    #[arg(long, default_value_t = 3)]
    election_ttl_s: u64,
    /// Topology description (TOML: [[pool]] and [[server]]); default: one 3-replica pool
    /// taking any chunkserver.
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Chunk size of new volumes.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    chunk_size: u64,
    /// Segment size of new volumes.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    segment_size: u64,
    /// Session lease, ms.
    #[arg(long, default_value_t = 20_000)]
    lease_ms: u64,
    /// A chunkserver silent this long is unstable, ms.
    #[arg(long, default_value_t = 10_000)]
    unstable_timeout_ms: u64,
    /// A chunkserver silent this long is offline and its replicas are rebuilt elsewhere, ms.
    #[arg(long, default_value_t = 300_000)]
    offline_timeout_ms: u64,
    /// A configuration change not done in this long is dropped, ms.
    #[arg(long, default_value_t = 120_000)]
    operator_timeout_ms: u64,
    /// Scheduler period, ms.
    #[arg(long, default_value_t = 1_000)]
    schedule_ms: u64,
    /// Do not balance copysets and leaders (recovery still runs).
    #[arg(long)]
    no_balance: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// The cluster keyring (`curve key cluster`): turns authentication on. Every request must
    /// then be signed by a user or by the cluster; tickets and grants are sealed with it.
    #[arg(long, env = "CURVE_CLUSTER_KEY_FILE", value_name = "PATH")]
    cluster_key_file: Option<PathBuf>,
    /// The admin's key file (its `public` line is enough): `root` signing with this key is the
    /// admin. Required with --cluster-key-file.
    #[arg(long, value_name = "PATH")]
    admin_key_file: Option<PathBuf>,
    /// TLS for every gRPC connection: DIR/ca.pem (the cluster's CA), DIR/cert.pem and
    /// DIR/key.pem (this daemon's certificate; `curve key tls DIR` makes them).
    #[arg(long, env = "CURVE_TLS_DIR", value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// How long a ticket works, ms (clients renew theirs with every session refresh).
    #[arg(long, default_value_t = 600_000)]
    ticket_ttl_ms: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match &s[i..].to_ascii_uppercase()[..] {
                "K" | "KIB" => 1u64 << 10,
                "M" | "MIB" => 1 << 20,
                "G" | "GIB" => 1 << 30,
                u => return Err(format!("unknown unit {u:?}")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("size {s:?} too large"))
}

fn main() -> anyhow::Result<()> {
    let nofile = curve_metrics::process::daemon_setup();
    let a = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    tracing::info!(open_files = nofile, "open-file limit");
    let topology = match &a.topology {
        Some(p) => TopologySpec::parse(
            &std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        None => TopologySpec::default_single_pool(),
    };
    if a.chunk_size < 4096 || !a.chunk_size.is_multiple_of(4096) {
        anyhow::bail!("the chunk size must be a multiple of 4096");
    }
    if !a.segment_size.is_multiple_of(a.chunk_size) {
        anyhow::bail!("the segment size must be a multiple of the chunk size");
    }
    curve_auth::tls::init(a.tls_dir.as_deref(), true)?;
    let auth = match (&a.cluster_key_file, &a.admin_key_file) {
        (None, None) => None,
        (Some(ring), Some(admin)) => {
            let ring = curve_auth::SharedKeyring::watch(ring, Duration::from_secs(1))?;
            let (name, public) = curve_auth::public_from_file(admin)?;
            if name != "root" {
                anyhow::bail!(
                    "{}: the admin key is root's (user = root), not {name}'s",
                    admin.display()
                );
            }
            Some(std::sync::Arc::new(curve_mds::auth::Auth::new(
                ring,
                (name, public),
                Duration::from_millis(a.ticket_ttl_ms.max(1000)),
            )))
        }
        _ => {
            anyhow::bail!("--cluster-key-file and --admin-key-file go together (authentication on)")
        }
    };
    if auth.is_none() {
        tracing::warn!(
            "authentication is off: any client may do anything (give --cluster-key-file and --admin-key-file)"
        );
    }
    let cfg = Config {
        listen: a.listen,
        data_dir: a.data_dir,
        etcd: a.etcd,
        etcd_prefix: a.etcd_prefix,
        election_ttl: Duration::from_secs(a.election_ttl_s.max(1)),
        schedule_every: Duration::from_millis(a.schedule_ms.max(10)),
        metrics_listen: a.metrics_listen,
        opts: Options {
            geometry: Geometry {
                chunk_size: a.chunk_size,
                segment_size: a.segment_size,
            },
            lease: Duration::from_millis(a.lease_ms),
            timeouts: Timeouts {
                unstable: Duration::from_millis(a.unstable_timeout_ms),
                offline: Duration::from_millis(a.offline_timeout_ms),
                operator: Duration::from_millis(a.operator_timeout_ms),
                resend: Duration::from_secs(5),
            },
            topology,
            balance: !a.no_balance,
            auth,
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(cfg, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }))
}
