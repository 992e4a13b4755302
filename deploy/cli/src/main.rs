//! `curve`: the command-line tool of Curve-rs.

mod cluster;
mod playground;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use nebd_control::DEFAULT_RUN_DIR;
use nebd_control::error_chain;
use nebd_control::{ControlClient, ExportSpec, ExportStatus, Frontend, Request};

/// Curve-rs: a distributed block store with NBD, vhost-user-blk and ublk frontends.
#[derive(Debug, Parser)]
#[command(name = "curve", version)]
struct Cli {
    /// Run directory of the local nebd-server (where its control socket is).
    #[arg(long, global = true, env = "CURVE_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// MDS addresses (host:port,...) for volume and cluster commands.
    #[arg(
        long,
        global = true,
        env = "CURVE_MDS",
        value_delimiter = ',',
        default_value = "127.0.0.1:6700"
    )]
    mds: Vec<String>,
    /// Owner of the volumes a command works on (default: the key's user, else `curve`).
    #[arg(long, global = true, env = "CURVE_OWNER")]
    owner: Option<String>,
    /// Your key file (`curve user create`, or the playground's DIR/keys/admin.key): every MDS
    /// request is signed with it, as a cluster with authentication on requires.
    #[arg(long, global = true, env = "CURVE_KEY_FILE", value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// TLS to the cluster: DIR/ca.pem verifies its daemons (the cluster's `--tls-dir`).
    #[arg(long, global = true, env = "CURVE_TLS_DIR", value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exports of the local nebd-server: volumes served to consumers.
    #[command(subcommand)]
    Export(ExportCommand),
    /// The single-machine cluster: MDS, 3 chunkservers, nebd-server and an NBD export.
    #[command(subcommand)]
    Playground(PlaygroundCommand),
    /// Volumes and directories of the cluster.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshots of volumes (read them as curve:/PATH@NAME; clone them with `volume clone`).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// The cluster as a whole.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Measure a target like SPDK's bdevperf: IOPS, bandwidth, latency percentiles, histogram.
    Bench(BenchArgs),
    /// Users of a cluster with authentication on (admin only: root with the admin key).
    #[command(subcommand)]
    User(UserCommand),
    /// Key files: the cluster keyring (create, rotate) and user keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Live upgrade of the local nebd-server: a new binary takes over every export, device,
    /// connection and session while I/O flows; consumers see a pause, never a disconnect.
    Upgrade(UpgradeArgs),
}

#[derive(Debug, clap::Args)]
struct UpgradeArgs {
    /// The new nebd-server binary (default: the path the running one was started from).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// How long the new binary may take to start and take over, ms.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BenchDriver {
    /// Our NBD client: --target nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME.
    Nbd,
    /// libnebd through part2: --target RUN_DIR/nebd.sock --volume SPEC.
    Nebd,
    /// The client library on a cluster volume: --target curve:/PATH (MDS from --mds).
    Client,
    /// A userspace virtio-blk front-end: --target a vhost-user-blk socket (jobs are queues).
    VhostUser,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// How to reach the target.
    #[arg(long, value_enum)]
    driver: BenchDriver,
    /// The target: a URI or a socket, by driver.
    #[arg(long)]
    target: String,
    /// The volume to open (nebd driver), as part2 names it: curve:/PATH, mem:SIZE, file:PATH.
    #[arg(long)]
    volume: Option<String>,
    /// read, write, randread, randwrite, rw, verify, flush, trim, write_zeroes.
    #[arg(long, short = 'w', default_value = "randread")]
    workload: String,
    /// Operations in flight per job.
    #[arg(long, short = 'q', default_value_t = 1)]
    queue_depth: usize,
    /// Bytes per operation.
    #[arg(long, short = 'o', default_value = "4096", value_parser = size)]
    block_size: u64,
    /// Seconds to run.
    #[arg(long, short = 't', default_value_t = 10.0)]
    time: f64,
    /// Stop after this many I/Os per job instead.
    #[arg(long)]
    io_count: Option<u64>,
    /// Jobs (each with its own connection and queue).
    #[arg(long, short = 'j', default_value_t = 1)]
    jobs: usize,
    /// Reads in percent for the rw workload.
    #[arg(long, short = 'M', default_value_t = 50)]
    rw_mix: u32,
    /// Zipf skew of random offsets (e.g. 1.2).
    #[arg(long)]
    zipf: Option<f64>,
    /// Bytes of the target to use (split between jobs); default: all of it.
    #[arg(long, value_parser = size)]
    size: Option<u64>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Debug, Subcommand)]
enum PlaygroundCommand {
    /// Start it and stay in the foreground (Ctrl-C stops); prints the export's URI.
    Up {
        /// Directory of its data, logs and sockets.
        #[arg(long, default_value = "/tmp/curve-playground")]
        dir: PathBuf,
        /// Size of the volume.
        #[arg(long, default_value = "10G", value_parser = size)]
        size: u64,
        /// Name of the volume (/NAME) and of its export.
        #[arg(long, default_value = "vol0")]
        name: String,
        /// MDS port; the chunkservers take the next three.
        #[arg(long, default_value_t = 6700)]
        port: u16,
        /// Authentication off (any local user may read and write every volume): only to
        /// measure what authentication costs (bench/auth_overhead).
        #[arg(long)]
        no_auth: bool,
        /// Stripe the volume in units of this size (as `curve volume create`).
        #[arg(long, value_parser = size, requires = "stripe_count")]
        stripe_unit: Option<u64>,
        /// Chunks a stripe goes round; with --stripe-unit.
        #[arg(long, requires = "stripe_unit")]
        stripe_count: Option<u32>,
    },
    /// Stop the playground running in DIR.
    Down {
        /// Its directory.
        #[arg(long, default_value = "/tmp/curve-playground")]
        dir: PathBuf,
    },
    /// Live upgrade of the playground's nebd-server (as `curve upgrade` on its run dir).
    Upgrade {
        /// Its directory.
        #[arg(long, default_value = "/tmp/curve-playground")]
        dir: PathBuf,
        #[command(flatten)]
        args: UpgradeArgs,
    },
    /// Whether it runs, its URI and its cluster's health.
    Status {
        /// Its directory.
        #[arg(long, default_value = "/tmp/curve-playground")]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot: it holds every write acknowledged before this command started and
    /// none started after it returned; it costs nothing until the volume is written.
    Create {
        /// The volume.
        path: String,
        /// The snapshot's name (PATH@NAME).
        #[arg(long)]
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// List a volume's snapshots.
    List {
        path: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Delete a snapshot (PATH@NAME); refused while clones read from it.
    Delete {
        path: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume from a snapshot (SOURCE is PATH@NAME) at once: it reads the snapshot
    /// until written, and copies it in the background while open (or all at once: flatten).
    Clone {
        source: String,
        path: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Copy what a clone still reads from its source into it, then cut it loose (the source
    /// snapshot can then be deleted). Prints progress.
    Flatten {
        path: String,
        /// At most this many bytes per second (e.g. 100M; 0: unlimited).
        #[arg(long, value_parser = size, default_value = "0")]
        rate: u64,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Create a volume (or, with --directory, a directory).
    Create {
        /// Path, e.g. /vms/disk0.
        path: String,
        /// Size (e.g. 10G).
        #[arg(long, value_parser = size, required_unless_present = "directory")]
        size: Option<u64>,
        /// Block size: 4096 or 512.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Stripe the volume: its bytes go round --stripe-count chunks (and so copysets and
        /// their leaders) in units of this size (a power of two from 4K to the chunk size,
        /// e.g. 1M), so that one sequential stream is spread out. Default: not striped.
        #[arg(long, value_parser = size, requires = "stripe_count")]
        stripe_unit: Option<u64>,
        /// Chunks a stripe goes round (2 to 256); with --stripe-unit.
        #[arg(long, requires = "stripe_unit")]
        stripe_count: Option<u32>,
        /// Create a directory instead.
        #[arg(long)]
        directory: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// List a directory.
    List {
        #[arg(default_value = "/")]
        path: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show a volume.
    Info {
        path: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Grow a volume.
    Extend {
        path: String,
        /// New size (larger than the current one).
        #[arg(long, value_parser = size)]
        size: u64,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Rename or move.
    Rename {
        from: String,
        to: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Move to the recycle bin (/RecycleBin), or purge with --force.
    Delete {
        path: String,
        #[arg(long)]
        force: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Bring a volume back from the recycle bin (by its old path or its path in the bin).
    Recover {
        path: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Set limits (0 = unlimited); the client applies them within a lease period.
    Qos {
        path: String,
        #[arg(long, default_value_t = 0)]
        iops: u64,
        #[arg(long, default_value_t = 0)]
        read_iops: u64,
        #[arg(long, default_value_t = 0)]
        write_iops: u64,
        /// Bytes per second (e.g. 100M).
        #[arg(long, value_parser = size, default_value = "0")]
        bps: u64,
        #[arg(long, value_parser = size, default_value = "0")]
        read_bps: u64,
        #[arg(long, value_parser = size, default_value = "0")]
        write_bps: u64,
        /// Burst window in ms (a bucket holds this long at the rate).
        #[arg(long, default_value_t = 1000)]
        burst_ms: u64,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Creates user NAME: makes its key pair here, writes the key file (0600) and registers
    /// the public key with the MDS (the secret never leaves this machine).
    Create {
        name: String,
        /// Where to write the key file.
        #[arg(long, default_value = "NAME.key")]
        out: String,
    },
    /// The users and their public keys.
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Removes user NAME (its volumes stay; an admin manages them).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Writes a new cluster keyring (one key) for the MDS and the chunkservers.
    Cluster { file: PathBuf },
    /// Writes a new key file for user NAME without registering it (the admin's `root` key
    /// that the MDS starts with: --admin-key-file).
    User {
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes a new CA and a certificate for the cluster into DIR (ca.pem, cert.pem, key.pem)
    /// for the daemons' --tls-dir; clients need only ca.pem.
    Tls { dir: PathBuf },
    /// Rotation step 1: adds a new key to the keyring (not primary yet); prints its id. Copy
    /// the file to every MDS and chunkserver (they reload it within a second).
    Rotate { file: PathBuf },
    /// Rotation step 2: makes key ID the one that signs (once every daemon has it).
    Promote { file: PathBuf, id: u32 },
    /// Rotation step 3: removes key ID (once the tickets it sealed have expired).
    Retire { file: PathBuf, id: u32 },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// MDS leader, chunkservers online, copysets healthy and degraded.
    Status {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

fn size(s: &str) -> Result<u64, String> {
    curve_blockdev::parse_size(s)
}

#[derive(Debug, Subcommand)]
enum ExportCommand {
    /// Open a volume and serve it.
    Add {
        /// Volume: mem:SIZE (RAM, e.g. mem:1G), file:PATH[?direct] or
        /// curve:/PATH[?mds=HOST:PORT,...&owner=NAME] (a cluster volume).
        #[arg(long)]
        volume: String,
        /// Serve over NBD at unix:PATH or tcp:HOST:PORT.
        #[arg(
            long,
            required_unless_present_any = ["vhost_user_blk", "ublk", "nbd_device"],
            conflicts_with_all = ["vhost_user_blk", "ublk", "nbd_device"]
        )]
        nbd: Option<String>,
        /// Serve as a vhost-user-blk device on the Unix socket PATH (for QEMU).
        #[arg(long, value_name = "PATH", conflicts_with_all = ["ublk", "nbd_device"])]
        vhost_user_blk: Option<PathBuf>,
        /// Serve as a ublk block device /dev/ublkbN (needs the kernel's ublk_drv); prints its path.
        #[arg(long, conflicts_with = "nbd_device")]
        ublk: bool,
        /// Attach as a kernel NBD device (needs the kernel's nbd driver): /dev/nbdN, or the first
        /// free one when no path is given; prints its path. Survives a part2 restart.
        #[arg(long, value_name = "/dev/nbdN", num_args = 0..=1, default_missing_value = "")]
        nbd_device: Option<String>,
        /// Connections (socket pairs) of a kernel NBD device (1 to 16).
        #[arg(long)]
        connections: Option<u16>,
        /// Seconds after which the kernel resends a request of an NBD device (0: never; default
        /// 30): bounds the pause of requests a crashed part2 held.
        #[arg(long, value_name = "SECS")]
        io_timeout: Option<u32>,
        /// Seconds the kernel holds an NBD device's I/O while no part2 serves it (default 120).
        #[arg(long, value_name = "SECS")]
        reattach_timeout: Option<u32>,
        /// Queues of a vhost-user-blk or ublk export.
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Requests in flight per queue of a ublk export (1 to 4096; default 128).
        #[arg(long)]
        queue_depth: Option<u16>,
        /// Export name (the NBD export name).
        #[arg(long)]
        name: String,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
    },
    /// List exports.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Stop serving an export and close its volume.
    Remove {
        /// Export name.
        name: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn call(run_dir: &std::path::Path, req: &Request) -> Result<Vec<ExportStatus>, String> {
    let mut client = ControlClient::connect(run_dir).map_err(|e| error_chain(&e))?;
    let resp = client.call(req).map_err(|e| error_chain(&e))?;
    if resp.ok {
        Ok(resp.exports)
    } else {
        Err(resp.error.unwrap_or_else(|| "request failed".into()))
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let json = |f: Format| matches!(f, Format::Json);
    let key = curve_auth::key_from_env(cli.key_file.as_deref())
        .map_err(|e| e.to_string())?
        .map(Arc::new);
    curve_auth::tls::init(cli.tls_dir.as_deref(), false).map_err(|e| e.to_string())?;
    let owner = cli
        .owner
        .clone()
        .or_else(|| key.as_ref().map(|k| k.user.clone()))
        .unwrap_or_else(|| "curve".into());
    let volume = |op: cluster::VolumeOp, f: Format| -> Result<(), String> {
        let rt = runtime()?;
        let c = cluster::client(&cli.mds, 30, key.clone());
        rt.block_on(cluster::volume(&c, &owner, op, json(f)))
            .map_err(|e| e.to_string())
    };
    match cli.command {
        Command::Playground(PlaygroundCommand::Up {
            dir,
            size,
            name,
            port,
            no_auth,
            stripe_unit,
            stripe_count,
        }) => playground::up(&playground::Options {
            dir,
            size,
            port,
            name,
            auth: !no_auth,
            stripe: (stripe_unit.unwrap_or(0), stripe_count.unwrap_or(0)),
        })?,
        Command::Playground(PlaygroundCommand::Down { dir }) => playground::down(&dir)?,
        Command::Playground(PlaygroundCommand::Status { dir, format }) => {
            playground::status(&dir, json(format))?;
        }
        Command::Bench(b) => bench(b, &cli.mds, &owner, key.clone())?,
        Command::Snapshot(s) => {
            use cluster::SnapshotOp as S;
            let (op, format) = match s {
                SnapshotCommand::Create { path, name, format } => (S::Create(path, name), format),
                SnapshotCommand::List { path, format } => (S::List(path), format),
                SnapshotCommand::Delete { path, format } => (S::Delete(path), format),
            };
            let rt = runtime()?;
            // A create waits for the volume's writer to take the snapshot (a lease at most).
            let c = cluster::client(&cli.mds, 120, key.clone());
            rt.block_on(cluster::snapshot(&c, &owner, op, json(format)))
                .map_err(|e| e.to_string())?;
        }
        Command::User(u) => {
            let rt = runtime()?;
            let c = cluster::client(&cli.mds, 30, key.clone());
            rt.block_on(cluster::user(&c, u_op(u)?))?;
        }
        Command::Key(k) => key_command(k)?,
        Command::Upgrade(args) => upgrade(&cli.run_dir, &args)?,
        Command::Playground(PlaygroundCommand::Upgrade { dir, args }) => {
            upgrade(&dir.join("nebd"), &args)?
        }
        Command::Cluster(ClusterCommand::Status { format }) => {
            let rt = runtime()?;
            let c = cluster::client(&cli.mds, 10, key.clone());
            let s = rt
                .block_on(cluster::summary(&c))
                .map_err(|e| e.to_string())?;
            if json(format) {
                println!("{}", serde_json::to_string_pretty(&s).expect("json"));
            } else {
                cluster::print_summary(&s);
            }
        }
        Command::Volume(v) => {
            use cluster::VolumeOp as Op;
            match v {
                VolumeCommand::Create {
                    path,
                    size,
                    block_size,
                    stripe_unit,
                    stripe_count,
                    directory,
                    format,
                } => {
                    let op = if directory {
                        Op::Mkdir(path)
                    } else {
                        Op::Create {
                            path,
                            size: size.unwrap_or(0),
                            block_size,
                            stripe: (stripe_unit.unwrap_or(0), stripe_count.unwrap_or(0)),
                        }
                    };
                    volume(op, format)?;
                }
                VolumeCommand::List { path, format } => volume(Op::List(path), format)?,
                VolumeCommand::Info { path, format } => volume(Op::Info(path), format)?,
                VolumeCommand::Extend { path, size, format } => {
                    volume(Op::Extend(path, size), format)?;
                }
                VolumeCommand::Rename { from, to, format } => {
                    volume(Op::Rename(from, to), format)?;
                }
                VolumeCommand::Delete {
                    path,
                    force,
                    format,
                } => volume(Op::Delete(path, force), format)?,
                VolumeCommand::Recover { path, format } => volume(Op::Recover(path), format)?,
                VolumeCommand::Clone {
                    source,
                    path,
                    format,
                } => volume(Op::Clone(source, path), format)?,
                VolumeCommand::Flatten { path, rate, format } => {
                    flatten(&path, rate, &cli.mds, &owner, key.clone(), json(format))?
                }
                VolumeCommand::Qos {
                    path,
                    iops,
                    read_iops,
                    write_iops,
                    bps,
                    read_bps,
                    write_bps,
                    burst_ms,
                    format,
                } => volume(
                    Op::Qos(
                        path,
                        curve_proto::mds::Qos {
                            iops_total: iops,
                            iops_read: read_iops,
                            iops_write: write_iops,
                            bps_total: bps,
                            bps_read: read_bps,
                            bps_write: write_bps,
                            burst_ms,
                        },
                    ),
                    format,
                )?,
            }
        }
        Command::Export(ExportCommand::Add {
            volume,
            nbd,
            vhost_user_blk,
            ublk,
            nbd_device,
            connections,
            io_timeout,
            reattach_timeout,
            queues,
            queue_depth,
            name,
            read_only,
        }) => {
            if queue_depth.is_some() && !ublk {
                return Err("--queue-depth applies to --ublk exports only".into());
            }
            if nbd_device.is_none()
                && (connections.is_some() || io_timeout.is_some() || reattach_timeout.is_some())
            {
                return Err(
                    "--connections, --io-timeout and --reattach-timeout apply to --nbd-device exports only"
                        .into(),
                );
            }
            let frontend = match (nbd, vhost_user_blk) {
                _ if nbd_device.is_some() => Frontend::NbdDevice {
                    device: nbd_device.filter(|d| !d.is_empty()),
                    connections: connections.unwrap_or(1),
                    io_timeout: io_timeout.unwrap_or(nebd_control::DEFAULT_IO_TIMEOUT),
                    reattach_timeout: reattach_timeout
                        .unwrap_or(nebd_control::DEFAULT_REATTACH_TIMEOUT),
                    cookie: None,
                },
                _ if ublk => Frontend::Ublk {
                    queues,
                    queue_depth: queue_depth.unwrap_or(128),
                    device_id: None,
                },
                (Some(address), _) => Frontend::Nbd { address },
                (None, Some(p)) => Frontend::VhostUserBlk {
                    path: std::path::absolute(&p)
                        .map_err(|e| format!("{}: {e}", p.display()))?
                        .display()
                        .to_string(),
                    queues,
                },
                (None, None) => {
                    return Err(
                        "--nbd, --vhost-user-blk, --ublk or --nbd-device is required".into(),
                    );
                }
            };
            let req = Request::AddExport(ExportSpec {
                name,
                volume,
                frontend,
                read_only,
            });
            for e in call(&cli.run_dir, &req)? {
                println!("{}", e.uri);
            }
        }
        Command::Export(ExportCommand::Remove { name }) => {
            call(&cli.run_dir, &Request::RemoveExport { name })?;
        }
        Command::Export(ExportCommand::List { format }) => {
            let exports = call(&cli.run_dir, &Request::ListExports)?;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&exports).expect("statuses serialise")
                ),
                Format::Text => print_table(&exports),
            }
        }
    }
    Ok(())
}

fn upgrade(run_dir: &std::path::Path, args: &UpgradeArgs) -> Result<(), String> {
    let binary = match &args.binary {
        Some(b) => Some(
            std::path::absolute(b)
                .map_err(|e| format!("{}: {e}", b.display()))?
                .display()
                .to_string(),
        ),
        None => None,
    };
    let mut client = ControlClient::connect(run_dir).map_err(|e| error_chain(&e))?;
    let resp = client
        .call(&Request::Upgrade {
            binary,
            timeout_ms: args.timeout_ms,
        })
        .map_err(|e| error_chain(&e))?;
    if !resp.ok {
        return Err(resp.error.unwrap_or_else(|| "upgrade failed".into()));
    }
    let r = resp.upgrade.unwrap_or_default();
    match args.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("reports serialise")
        ),
        Format::Text => println!(
            "upgraded: nebd-server pid {} -> {}, {} exports and {} connections handed over, I/O paused {:.1} ms",
            r.old_pid,
            r.new_pid,
            r.exports,
            r.connections,
            r.pause_us as f64 / 1000.0
        ),
    }
    Ok(())
}

fn print_table(exports: &[ExportStatus]) {
    let rows: Vec<[String; 6]> = exports
        .iter()
        .map(|e| {
            [
                e.spec.name.clone(),
                e.spec.volume.clone(),
                human_size(e.size),
                if e.spec.read_only { "ro" } else { "rw" }.into(),
                e.connections.to_string(),
                e.uri.clone(),
            ]
        })
        .collect();
    let header = ["NAME", "VOLUME", "SIZE", "MODE", "CONNS", "URI"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn u_op(u: UserCommand) -> Result<cluster::UserOp, String> {
    Ok(match u {
        UserCommand::Create { name, out } => {
            let out = if out == "NAME.key" {
                format!("{name}.key")
            } else {
                out
            };
            cluster::UserOp::Create(name, PathBuf::from(out))
        }
        UserCommand::List { format } => cluster::UserOp::List(matches!(format, Format::Json)),
        UserCommand::Delete { name } => cluster::UserOp::Delete(name),
    })
}

fn key_command(k: KeyCommand) -> Result<(), String> {
    use curve_auth::Keyring;
    let edit = |file: &std::path::Path, f: &dyn Fn(&mut Keyring) -> Result<String, String>| {
        let mut ring = Keyring::load(file).map_err(|e| e.to_string())?;
        let said = f(&mut ring)?;
        curve_auth::replace_secret_file(file, &ring.to_file_text())
            .map_err(|e| format!("{}: {e}", file.display()))?;
        println!("{said}");
        Ok::<(), String>(())
    };
    match k {
        KeyCommand::Cluster { file } => {
            curve_auth::write_secret_file(&file, &Keyring::generate().to_file_text())
                .map_err(|e| format!("{}: {e}", file.display()))?;
            println!("cluster keyring written to {} (mode 0600)", file.display());
        }
        KeyCommand::User { name, out } => {
            if !curve_auth::valid_user_name(&name) {
                return Err(format!("bad user name {name:?}"));
            }
            curve_auth::UserKey::generate(&name)
                .save_new(&out)
                .map_err(|e| format!("{}: {e}", out.display()))?;
            println!("key of {name} written to {} (mode 0600)", out.display());
        }
        KeyCommand::Tls { dir } => {
            curve_auth::tls::generate(&dir)?;
            println!(
                "TLS CA and certificate written to {} (ca.pem, cert.pem, key.pem)",
                dir.display()
            );
        }
        KeyCommand::Rotate { file } => edit(&file, &|r| {
            let id = r.add();
            Ok(format!(
                "key {id} added to {}; copy it to every daemon, then `curve key promote {} {id}`",
                file.display(),
                file.display()
            ))
        })?,
        KeyCommand::Promote { file, id } => edit(&file, &|r| {
            r.promote(id)?;
            Ok(format!("key {id} is primary in {}", file.display()))
        })?,
        KeyCommand::Retire { file, id } => edit(&file, &|r| {
            r.retire(id)?;
            Ok(format!("key {id} removed from {}", file.display()))
        })?,
    }
    Ok(())
}

/// `curve volume flatten`: fills the clone from its source through a sessionless open (the
/// clone may be open elsewhere, by its writer), then tells the MDS it is flat.
fn flatten(
    path: &str,
    rate: u64,
    mds: &[String],
    owner: &str,
    key: Option<Arc<curve_auth::UserKey>>,
    json_out: bool,
) -> Result<(), String> {
    let rt = runtime()?;
    let mut opts = curve_client::VolumeOptions::new(mds.to_vec(), owner).with_key(key);
    opts.fill = true;
    let conns = Arc::new(curve_client::chunk::Connections::default());
    let started = std::time::Instant::now();
    rt.block_on(async {
        let v = curve_client::Volume::open(path, opts, conns)
            .await
            .map_err(|e| e.to_string())?;
        let last = std::sync::Mutex::new(std::time::Instant::now());
        let progress = |done: u64, total: u64| {
            let mut l = last.lock().expect("progress");
            if done == total || l.elapsed() >= std::time::Duration::from_secs(1) {
                *l = std::time::Instant::now();
                eprintln!(
                    "flatten {path}: {:.1}% ({} of {} MiB)",
                    done as f64 * 100.0 / total.max(1) as f64,
                    done >> 20,
                    total >> 20
                );
            }
        };
        let r = v.fill_from_source(rate, &progress).await;
        r.map_err(|e| e.to_string())
    })?;
    let secs = started.elapsed().as_secs_f64();
    if json_out {
        println!(
            "{}",
            serde_json::json!({ "flattened": path, "seconds": secs })
        );
    } else {
        println!("flattened {path} in {secs:.1} s");
    }
    Ok(())
}

fn bench(
    b: BenchArgs,
    mds: &[String],
    owner: &str,
    key: Option<Arc<curve_auth::UserKey>>,
) -> Result<(), String> {
    use curve_bench::drivers::{
        client::ClientDriver, nbd::NbdDriver, nbd::NbdTarget, nebd::NebdDriver,
    };
    let workload: curve_bench::Workload = b.workload.parse()?;
    if b.block_size == 0 || b.block_size > (64 << 20) {
        return Err("--block-size: 1 byte to 64 MiB".into());
    }
    let (driver, name): (Arc<dyn curve_bench::engine::Driver>, &str) = match b.driver {
        BenchDriver::Nbd => (
            Arc::new(NbdDriver {
                target: NbdTarget::parse(&b.target)?,
            }),
            "nbd",
        ),
        BenchDriver::Nebd => (
            Arc::new(NebdDriver {
                socket: b.target.clone(),
                volume: b
                    .volume
                    .clone()
                    .ok_or("the nebd driver needs --volume (e.g. curve:/vol0)")?,
            }),
            "nebd",
        ),
        BenchDriver::Client => (
            Arc::new({
                let mut d = ClientDriver::parse(&b.target, mds, owner)?;
                d.key = key;
                d
            }),
            "client",
        ),
        BenchDriver::VhostUser => (
            Arc::new(curve_bench::drivers::vhost_user::VhostUserDriver::new(
                &b.target,
                b.jobs.max(1),
                b.queue_depth.max(1),
                b.block_size as usize,
            )),
            "vhost-user",
        ),
    };
    let spec = curve_bench::Spec {
        workload,
        queue_depth: b.queue_depth.max(1),
        block_size: b.block_size as u32,
        time: b
            .io_count
            .is_none()
            .then(|| std::time::Duration::from_secs_f64(b.time.max(0.1))),
        io_count: b.io_count,
        jobs: b.jobs.max(1),
        rw_mix: b.rw_mix,
        zipf: b.zipf,
        size: b.size,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    // Ctrl-C or SIGTERM ends the run early, through the driver's close (a client volume's
    // session closed, not left to its lease).
    extern "C" fn on_signal(_: libc::c_int) {
        curve_bench::runner::interrupt();
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let summary = curve_bench::run(driver, &spec, (name, &b.target))?;
    match b.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&summary).expect("json")),
        Format::Text => print!("{}", summary.text()),
    }
    if summary.errors > 0 || summary.mismatches > 0 {
        return Err(format!(
            "{} I/O errors, {} verify mismatches",
            summary.errors, summary.mismatches
        ));
    }
    Ok(())
}
