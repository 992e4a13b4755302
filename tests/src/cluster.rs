//! Cluster daemons for the tests: etcd (Debian's `etcd-server`) on loopback ports in a
//! temporary directory, `curve-mds` and `curve-chunkserver` processes on fixed loopback
//! ports (so that they restart on the same address). All are killed by PID when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use std::sync::Arc;

use crate::netbed::NetBed;
use crate::{Daemon, bin, require_tool, wait_until};

/// A loopback port whose successor is free too, below the ephemeral range, different per
/// test process: daemons restart on the same port, so port 0 will not do.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() % 3000) as u16 * 3;
    loop {
        let port = 12000 + (seed + NEXT.fetch_add(2, Ordering::Relaxed)) % 9000;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 1) {
            return port;
        }
    }
}

/// Whether `addr` accepts TCP connections.
pub fn listening(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(
        &addr.parse().expect("host:port"),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// etcd (Debian's `etcd-server`): one member on loopback, or a cluster with one member in each
/// of some hosts of a [`NetBed`].
#[derive(Debug)]
pub struct Etcd {
    /// The member processes.
    pub daemons: Vec<Daemon>,
    /// host:port of every member's client endpoint, comma-separated (what `--etcd` takes).
    pub endpoint: String,
}

impl Etcd {
    /// Starts a one-member etcd on loopback with its data in `dir`.
    pub fn start(dir: &Path) -> Self {
        let (client, peer) = (free_port(), free_port());
        Self::start_members(
            dir,
            &[(
                None,
                format!("127.0.0.1:{client}"),
                format!("127.0.0.1:{peer}"),
            )],
        )
    }

    /// Starts a cluster of one member in each of `hosts` of `bed`, with data under `dir`.
    pub fn start_on(dir: &Path, bed: &Arc<NetBed>, hosts: &[usize]) -> Self {
        let members: Vec<(OnHost, String, String)> = hosts
            .iter()
            .map(|&i| {
                let ip = &bed.hosts[i].ip;
                (
                    Some((bed.clone(), i)),
                    format!("{ip}:{}", free_port()),
                    format!("{ip}:{}", free_port()),
                )
            })
            .collect();
        Self::start_members(dir, &members)
    }

    /// Starts one member per (host, client address, peer address).
    fn start_members(dir: &Path, members: &[(OnHost, String, String)]) -> Self {
        let etcd = require_tool("etcd");
        let initial: Vec<String> = members
            .iter()
            .enumerate()
            .map(|(n, (_, _, peer))| format!("e{n}=http://{peer}"))
            .collect();
        let mut daemons = Vec::new();
        for (n, (host, client, peer)) in members.iter().enumerate() {
            let mut cmd = match host {
                None => Command::new(&etcd),
                Some((bed, i)) => bed.command(*i, &etcd),
            };
            cmd.args(["--name", &format!("e{n}"), "--data-dir"])
                .arg(dir.join(format!("etcd{n}")))
                .args([
                    "--listen-client-urls",
                    &format!("http://{client}"),
                    "--advertise-client-urls",
                    &format!("http://{client}"),
                    "--listen-peer-urls",
                    &format!("http://{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://{peer}"),
                    "--initial-cluster",
                    &initial.join(","),
                    "--initial-cluster-state",
                    "new",
                    // A member cut off and back must not depose the leader with the term it
                    // raised alone (etcd 3.5's default; 3.4, Debian's, has it off): without
                    // it, a healed partition stalled the MDS's lease keep-alive past its TTL.
                    "--pre-vote",
                    "--log-level",
                    "warn",
                ]);
            daemons.push(Daemon::spawn(cmd, &dir.join(format!("etcd{n}.log"))));
        }
        for (n, (_, client, _)) in members.iter().enumerate() {
            assert!(
                wait_until(Duration::from_secs(30), || listening(client)),
                "etcd member e{n} did not start: {}",
                std::fs::read_to_string(dir.join(format!("etcd{n}.log"))).unwrap_or_default()
            );
        }
        let endpoint = members
            .iter()
            .map(|(_, c, _)| c.as_str())
            .collect::<Vec<_>>()
            .join(",");
        Etcd { daemons, endpoint }
    }
}

/// A `curve-mds` process.
#[derive(Debug)]
pub struct Mds {
    /// The process (None while stopped).
    pub daemon: Option<Daemon>,
    /// host:port.
    pub addr: String,
    /// Its data directory.
    pub dir: PathBuf,
    args: Vec<String>,
    starts: u32,
    host: Option<(Arc<NetBed>, usize)>,
}

/// A host of a [`NetBed`] a daemon runs in (none: this one, on loopback).
pub type OnHost = Option<(Arc<NetBed>, usize)>;

/// The command running `program` where `host` says, and the address it serves on there.
fn placed(host: &OnHost, program: &str) -> (Command, String) {
    match host {
        None => (
            Command::new(bin(program)),
            format!("127.0.0.1:{}", free_port()),
        ),
        Some((bed, i)) => (
            bed.command(*i, &bin(program)),
            format!("{}:{}", bed.hosts[*i].ip, free_port()),
        ),
    }
}

impl Mds {
    /// Starts an MDS with its data under `dir`, with extra `args` (`--etcd ...`, timeouts).
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        Self::start_on(dir, args, None)
    }

    /// As [`Mds::start`], in a host of a [`NetBed`].
    pub fn start_on(dir: &Path, args: &[&str], host: OnHost) -> Self {
        let mut m = Mds {
            daemon: None,
            addr: placed(&host, "curve-mds").1,
            dir: dir.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
            starts: 0,
            host,
        };
        m.restart();
        m
    }

    /// Starts it (again) on the same address and data directory.
    pub fn restart(&mut self) {
        self.starts += 1;
        let mut cmd = placed(&self.host, "curve-mds").0;
        cmd.args(["--listen", &self.addr, "--data-dir"])
            .arg(&self.dir)
            .args(&self.args)
            .env("RUST_LOG", "info");
        let log = self.dir.with_extension(format!("log.{}", self.starts));
        std::fs::create_dir_all(&self.dir).unwrap();
        self.daemon = Some(Daemon::spawn(cmd, &log));
        let addr = self.addr.clone();
        assert!(
            wait_until(Duration::from_secs(20), || listening(&addr)),
            "curve-mds did not listen: {}",
            self.log()
        );
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.signal(libc::SIGKILL);
            d.wait(Duration::from_secs(10));
        }
    }

    /// The log of the latest start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension(format!("log.{}", self.starts)))
            .unwrap_or_default()
    }
}

/// A `curve-chunkserver` process.
#[derive(Debug)]
pub struct Chunkserver {
    /// The process (None while stopped).
    pub daemon: Option<Daemon>,
    /// host:port.
    pub addr: String,
    /// Data directory.
    pub dir: PathBuf,
    args: Vec<String>,
    starts: u32,
    host: OnHost,
}

impl Chunkserver {
    /// Starts a chunkserver in `zone` on server `server`, registering with `mds`.
    pub fn start(dir: &Path, mds: &[String], zone: &str, server: &str, extra: &[&str]) -> Self {
        Self::start_on(dir, mds, zone, server, extra, None)
    }

    /// As [`Chunkserver::start`], in a host of a [`NetBed`].
    pub fn start_on(
        dir: &Path,
        mds: &[String],
        zone: &str,
        server: &str,
        extra: &[&str],
        host: OnHost,
    ) -> Self {
        let mut args: Vec<String> = vec![
            "--mds".into(),
            mds.join(","),
            "--zone".into(),
            zone.into(),
            "--server".into(),
            server.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut c = Chunkserver {
            daemon: None,
            addr: placed(&host, "curve-chunkserver").1,
            dir: dir.to_owned(),
            args,
            starts: 0,
            host,
        };
        c.restart();
        c
    }

    /// Starts it (again).
    pub fn restart(&mut self) {
        self.starts += 1;
        let mut cmd = placed(&self.host, "curve-chunkserver").0;
        cmd.args(["--listen", &self.addr, "--data-dir"])
            .arg(&self.dir)
            .args(&self.args)
            .env("RUST_LOG", "info,openraft=warn");
        std::fs::create_dir_all(&self.dir).unwrap();
        let log = self.dir.with_extension(format!("log.{}", self.starts));
        self.daemon = Some(Daemon::spawn(cmd, &log));
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.signal(libc::SIGKILL);
            d.wait(Duration::from_secs(10));
        }
    }

    /// The log of the latest start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension(format!("log.{}", self.starts)))
            .unwrap_or_default()
    }
}

/// An MDS (or three on etcd) and three chunkservers in three zones, with the pool's copysets
/// created and led: a cluster for the client and part2 tests.
#[derive(Debug)]
pub struct MiniCluster {
    /// etcd, when the MDS are on it.
    pub etcd: Option<Etcd>,
    /// The MDS processes.
    pub mds: Vec<Mds>,
    /// The chunkservers.
    pub chunkservers: Vec<Chunkserver>,
    /// root's key (authentication is on: every client signs with it or a user's key).
    pub admin_key: PathBuf,
    /// The cluster keyring the MDS and the chunkservers share.
    pub cluster_key: PathBuf,
    /// Metrics endpoints (host:port): the MDS, then the chunkservers (empty unless asked).
    pub metrics: Vec<String>,
    /// The TLS directory every daemon serves with (when asked): `--tls-dir` for clients.
    pub tls_dir: Option<PathBuf>,
    /// The netns bed its daemons run in, if any.
    pub bed: Option<Arc<NetBed>>,
}

/// What a [`MiniCluster`] adds to its defaults.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// More arguments of every MDS.
    pub mds_args: Vec<String>,
    /// Every daemon serves Prometheus metrics ([`MiniCluster::metrics`]: the MDS first).
    pub metrics: bool,
    /// Every daemon speaks TLS (a CA and a certificate made in DIR/tls).
    pub tls: bool,
    /// The daemons in hosts of a bed. With one MDS (no etcd): the MDS in the bed's first
    /// host, chunkserver i in host i + 1. With three MDS: `deploy/topology-3hosts.toml` made
    /// real, host i (0..3) runs an etcd member, MDS i and chunkserver i. Further hosts are
    /// the test's, for clients (part2).
    pub bed: Option<Arc<NetBed>>,
}

/// Makes a cluster keyring and root's key under `dir/keys` (0700; the files 0600).
pub fn make_keys(dir: &Path) -> (PathBuf, PathBuf) {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let cluster = keys.join("cluster.key");
    if !cluster.exists() {
        curve_auth::write_secret_file(&cluster, &curve_auth::Keyring::generate().to_file_text())
            .unwrap();
    }
    let admin = keys.join("admin.key");
    if !admin.exists() {
        curve_auth::UserKey::generate("root")
            .save_new(&admin)
            .unwrap();
    }
    (cluster, admin)
}

impl MiniCluster {
    /// Starts `n_mds` MDS (on etcd when more than one, or when `etcd`) and 3 chunkservers
    /// under `dir`, and waits until every copyset has 3 peers and a leader.
    pub fn start(dir: &Path, n_mds: usize, etcd: bool) -> Self {
        Self::start_with(dir, n_mds, etcd, &Extras::default())
    }

    /// As [`MiniCluster::start`], with [`Extras`].
    pub fn start_with(dir: &Path, n_mds: usize, etcd: bool, extras: &Extras) -> Self {
        let mds_extra: Vec<&str> = extras.mds_args.iter().map(String::as_str).collect();
        let tls_dir = extras.tls.then(|| {
            let d = dir.join("tls");
            if !d.join("ca.pem").exists() {
                curve_auth::tls::generate(&d).unwrap();
            }
            // This process's own clients (wait_healthy, mds_client) speak TLS too.
            curve_auth::tls::init(Some(&d), false).unwrap();
            d
        });
        let tls_args: Vec<String> = tls_dir
            .iter()
            .flat_map(|d| ["--tls-dir".to_string(), d.display().to_string()])
            .collect();
        let metrics: Vec<String> = if extras.metrics {
            (0..n_mds + 3)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect()
        } else {
            Vec::new()
        };
        // Where the daemons run: MDS i in host mds_host(i), chunkserver i (0..3) in host
        // cs_host(i).
        let three_hosts = extras.bed.is_some() && n_mds > 1;
        assert!(
            extras.bed.is_none() || (n_mds == 1 && !etcd) || n_mds == 3,
            "a bed cluster has one MDS (no etcd) or three (one per host, on etcd)"
        );
        let mds_host = |i: usize| extras.bed.clone().map(|b| (b, i));
        let cs_host = |i: usize| {
            extras
                .bed
                .clone()
                .map(|b| (b, if three_hosts { i } else { i + 1 }))
        };
        let etcd = (etcd || n_mds > 1).then(|| match &extras.bed {
            Some(bed) => Etcd::start_on(dir, bed, &[0, 1, 2]),
            None => Etcd::start(dir),
        });
        let mut topo = String::from(
            "[[pool]]\nname = \"pool1\"\nreplicas = 3\ncopysets_per_chunkserver = 4\n",
        );
        for i in 1..=3 {
            topo.push_str(&format!(
                "[[server]]\nname = \"s{i}\"\nzone = \"z{i}\"\npool = \"pool1\"\n"
            ));
        }
        let topo_path = dir.join("topology.toml");
        std::fs::write(&topo_path, topo).unwrap();
        let (cluster_key, admin_key) = make_keys(dir);
        let mut args = vec![
            "--cluster-key-file".to_string(),
            cluster_key.display().to_string(),
            "--admin-key-file".into(),
            admin_key.display().to_string(),
            "--topology".into(),
            topo_path.display().to_string(),
            "--unstable-timeout-ms".into(),
            "2000".into(),
            "--schedule-ms".into(),
            "300".into(),
            // Sessions refresh every second: QoS changes reach clients quickly.
            "--lease-ms".into(),
            "3000".into(),
        ];
        if let Some(e) = &etcd {
            args.extend([
                "--etcd".into(),
                e.endpoint.clone(),
                "--election-ttl-s".into(),
                "2".into(),
            ]);
        }
        args.extend(mds_extra.iter().map(|s| s.to_string()));
        args.extend(tls_args.iter().cloned());
        let mds: Vec<Mds> = (0..n_mds)
            .map(|i| {
                let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
                if let Some(m) = metrics.get(i) {
                    args.extend(["--metrics-listen", m]);
                }
                Mds::start_on(&dir.join(format!("mds{i}")), &args, mds_host(i))
            })
            .collect();
        let addrs: Vec<String> = mds.iter().map(|m| m.addr.clone()).collect();
        let ck = cluster_key.display().to_string();
        let chunkservers = (1..=3)
            .map(|i| {
                let mut extra = vec![
                    "--pool-target",
                    "2",
                    "--heartbeat-ms",
                    "300",
                    "--cluster-key-file",
                    &ck,
                ];
                if let Some(m) = metrics.get(n_mds + i - 1) {
                    extra.extend(["--metrics-listen", m]);
                }
                extra.extend(tls_args.iter().map(String::as_str));
                Chunkserver::start_on(
                    &dir.join(format!("cs{i}")),
                    &addrs,
                    &format!("z{i}"),
                    &format!("s{i}"),
                    &extra,
                    cs_host(i - 1),
                )
            })
            .collect();
        let c = MiniCluster {
            etcd,
            mds,
            chunkservers,
            admin_key,
            cluster_key,
            metrics,
            tls_dir,
            bed: extras.bed.clone(),
        };
        c.wait_healthy(Duration::from_secs(120));
        c
    }

    /// Creates a volume of `size` bytes owned by `curve` (blocking).
    pub fn create_volume(&self, path: &str, size: u64) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(self.mds_client().create(
            path,
            curve_proto::mds::FileType::Volume,
            size,
            4096,
            "curve",
        ))
        .unwrap_or_else(|e| panic!("create {path}: {e}"));
    }

    /// Client options for this cluster as root (the admin key).
    pub fn volume_options(&self) -> curve_client::VolumeOptions {
        let key = std::sync::Arc::new(curve_auth::UserKey::load(&self.admin_key).unwrap());
        curve_client::VolumeOptions::new(self.mds_addrs(), "curve").with_key(Some(key))
    }

    /// Opens a volume through the client library as root (on the caller's runtime).
    pub async fn open_volume(&self, path: &str) -> curve_client::Volume {
        self.open_volume_with(path, self.volume_options()).await
    }

    /// [`MiniCluster::open_volume`] with `opts`.
    pub async fn open_volume_with(
        &self,
        path: &str,
        opts: curve_client::VolumeOptions,
    ) -> curve_client::Volume {
        curve_client::Volume::open(
            path,
            opts,
            Arc::new(curve_client::chunk::Connections::default()),
        )
        .await
        .unwrap_or_else(|e| panic!("open {path}: {e}"))
    }

    /// The index (in `chunkservers`) of the live leader of the copyset holding the written
    /// chunk of volume `path` (owned by `curve`) at `offset`; waits up to 30 s for one.
    pub fn leader_of(&self, path: &str, offset: u64) -> usize {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mds = self.mds_client();
        let seg = rt
            .block_on(mds.segment(path, "curve", offset, false))
            .unwrap_or_else(|e| panic!("segment of {path} at {offset}: {e}"))
            .unwrap_or_else(|| panic!("{path} is written at {offset}"));
        let chunk_size = rt.block_on(mds.stat(path)).unwrap().chunk_size;
        let copyset = seg.chunks[((offset - seg.offset) / chunk_size) as usize].copyset_id;
        let mut found = None;
        wait_until(Duration::from_secs(30), || {
            let Ok(t) = rt.block_on(mds.topology()) else {
                return false;
            };
            let leader = t
                .copysets
                .iter()
                .find(|c| c.copyset_id == copyset)
                .and_then(|c| c.leader.clone());
            found = leader.and_then(|l| {
                self.chunkservers
                    .iter()
                    .position(|c| c.addr == l.address && c.daemon.is_some())
            });
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("copyset {copyset} has no live leader (waited 30 s)"))
    }

    /// The index (in `mds`) of the MDS that leads now (the one that answers).
    pub fn mds_leader(&self) -> usize {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = self.mds_client();
        let addr = rt.block_on(async {
            c.topology().await.expect("an MDS leads");
            c.current().await
        });
        self.mds
            .iter()
            .position(|m| m.addr == addr)
            .expect("one of ours")
    }

    /// The bed its daemons run in (see [`Extras::bed`]).
    pub fn bed(&self) -> &NetBed {
        self.bed.as_deref().expect("a cluster on a netns bed")
    }

    /// The MDS addresses.
    pub fn mds_addrs(&self) -> Vec<String> {
        self.mds.iter().map(|m| m.addr.clone()).collect()
    }

    /// root's key file, as a string (for `--key-file` and `CURVE_KEY_FILE`).
    pub fn key(&self) -> String {
        self.admin_key.display().to_string()
    }

    /// Runs `curve --mds ALL ARGS` with root's key.
    pub fn curve(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(crate::bin("curve"))
            .env("CURVE_KEY_FILE", self.key())
            .args(["--mds", &self.mds_addrs().join(",")])
            .args(args)
            .output()
            .expect("run curve")
    }

    /// [`MiniCluster::curve`] that must succeed: its stdout.
    pub fn curve_ok(&self, args: &[&str]) -> String {
        let out = self.curve(args);
        assert!(
            out.status.success(),
            "curve {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// [`MiniCluster::curve`] that must fail, saying `what`.
    pub fn curve_fails_with(&self, args: &[&str], what: &str) {
        let out = self.curve(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "curve {args:?} should fail with {what}"
        );
        assert!(err.contains(what), "curve {args:?}: {what:?} not in: {err}");
    }

    /// A client of the MDS signing as root.
    pub fn mds_client(&self) -> curve_client::MdsClient {
        curve_client::MdsClient::with_key(
            self.mds_addrs(),
            Some(std::sync::Arc::new(
                curve_auth::UserKey::load(&self.admin_key).unwrap(),
            )),
        )
    }

    /// Waits until every copyset has 3 peers and a leader.
    pub fn wait_healthy(&self, timeout: Duration) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut c = self.mds_client();
        c.deadline = Duration::from_secs(2);
        let ok = wait_until(timeout, || {
            rt.block_on(c.topology()).is_ok_and(|t| {
                !t.copysets.is_empty()
                    && t.copysets
                        .iter()
                        .all(|s| s.peers.len() == 3 && s.leader.is_some())
            })
        });
        assert!(
            ok,
            "the cluster did not become healthy:\n{}",
            self.mds
                .iter()
                .map(|m| m.log())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
