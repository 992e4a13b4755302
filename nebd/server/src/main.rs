//! `nebd-server`: NEBD part2.

use std::path::PathBuf;

use clap::Parser;
use nebd_server::daemon::{self, Config, DEFAULT_RUN_DIR};

/// NEBD part2: serves Curve-rs volumes to NBD, kernel NBD, vhost-user-blk and ublk consumers,
/// and to libnebd programs (part1).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory of the sockets (control.sock, nebd.sock), pid file and metafile.
    #[arg(long, env = "CURVE_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// Close a file part1 has sent no heartbeat for in this many milliseconds (it is
    /// reopened on its next request).
    #[arg(long, default_value_t = 30_000)]
    heartbeat_timeout_ms: u64,
    /// MDS addresses of the cluster that `curve:/path` volumes live on (host:port,...).
    #[arg(
        long,
        env = "CURVE_MDS",
        value_delimiter = ',',
        default_value = "127.0.0.1:6700"
    )]
    mds: Vec<String>,
    /// Owner `curve:` volumes are opened as (default: the key's user, else `curve`).
    #[arg(long, env = "CURVE_OWNER")]
    owner: Option<String>,
    /// The user's key file (`curve user create`): MDS requests are signed with it, as a
    /// cluster with authentication on requires.
    #[arg(long, env = "CURVE_KEY_FILE", value_name = "PATH")]
    key_file: Option<std::path::PathBuf>,
    /// TLS to the cluster: DIR/ca.pem verifies its daemons (the cluster's `--tls-dir`).
    #[arg(long, env = "CURVE_TLS_DIR", value_name = "DIR")]
    tls_dir: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port): per export and part1 file,
    /// operations, bytes, errors, latency, in flight, connections.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Group (name or gid) given the sockets consumers connect to (control, part1, NBD,
    /// vhost-user; all 0660): e.g. QEMU's group. The run dir is then 0750.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Take over from the nebd-server running on --run-dir: its sockets, devices, front-ends
    /// and sessions, while I/O flows (a live upgrade; `curve upgrade` starts this).
    #[arg(long)]
    takeover: bool,
    /// How long a hand-over may take: in-flight requests finishing, the offer, the answer.
    #[arg(long, default_value_t = 10_000)]
    takeover_timeout_ms: u64,
}

/// This process's arguments for the binary an upgrade starts (without the take-over flags,
/// which the upgrade adds).
fn next_args() -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in std::env::args_os().skip(1) {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        match a.to_str() {
            Some("--takeover") => {}
            Some("--takeover-timeout-ms") => skip_value = true,
            Some(s) if s.starts_with("--takeover-timeout-ms=") => {}
            _ => out.push(a),
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let nofile = curve_metrics::process::daemon_setup();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tracing::info!(open_files = nofile, "open-file limit");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nebd-ctl")
        .enable_all()
        .build()?;
    let key = curve_auth::key_from_env(args.key_file.as_deref())?.map(std::sync::Arc::new);
    curve_auth::tls::init(args.tls_dir.as_deref(), false)?;
    let config = Config {
        heartbeat_timeout: std::time::Duration::from_millis(args.heartbeat_timeout_ms),
        mds: args.mds,
        owner: args
            .owner
            .or_else(|| key.as_ref().map(|k| k.user.clone()))
            .unwrap_or_else(|| "curve".into()),
        key,
        metrics_listen: args.metrics_listen,
        socket_group: match &args.socket_group {
            Some(g) => Some(daemon::group_id(g).map_err(anyhow::Error::msg)?),
            None => None,
        },
        takeover: args.takeover,
        takeover_timeout: std::time::Duration::from_millis(args.takeover_timeout_ms),
        next_args: next_args(),
        ..Config::new(args.run_dir)
    };
    rt.block_on(daemon::run(config, shutdown_signal()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
