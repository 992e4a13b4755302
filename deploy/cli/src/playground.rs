//! `curve playground up|down|status`: the single-machine cluster. `up` starts, as separate
//! processes, an MDS on its embedded store, three chunkservers (one zone each) and
//! nebd-server, creates a volume, exports it over NBD on a Unix socket, prints how to attach,
//! and supervises the daemons in the foreground until Ctrl-C, SIGTERM or `down`.
//!
//! ```text
//!  DIR/playground.pid        the `up` process (flock'ed while it runs)
//!  DIR/playground.json       mds, uri, socket (for scripts)
//!  DIR/topology.toml         3 servers in 3 zones, one pool
//!  DIR/mds  DIR/cs1..3  DIR/nebd      data and run directories
//!  DIR/logs/<daemon>.log     each daemon's log (appended across restarts)
//! ```

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use curve_client::MdsClient;
use curve_proto::mds::MdsStatus;
use nebd_control::{ControlClient, ExportSpec, Frontend, Request};

/// What `up` starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory of everything.
    pub dir: PathBuf,
    /// Size of the volume.
    pub size: u64,
    /// MDS port; chunkservers take the next three; metrics the MDS port + 10 (MDS), + 11..13
    /// (chunkservers) and + 14 (nebd-server).
    pub port: u16,
    /// Name of the volume and of its export.
    pub name: String,
    /// Authentication on (the default): keys in DIR/keys.
    pub auth: bool,
    /// The volume's striping: (stripe unit, stripe count); (0, 0): none.
    pub stripe: (u64, u32),
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn bin(name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("CURVE_BIN_DIR") {
        return PathBuf::from(d).join(name);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

struct Daemon {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Where a daemon that can be upgraded live (nebd-server) names the process serving now.
    pid_file: Option<PathBuf>,
    /// The process that took over in a live upgrade: our child too (we are a subreaper).
    adopted: Option<i32>,
}

impl Daemon {
    fn start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl in the child between fork and exec only sets its parent-death signal:
        // if `up` itself is killed, its daemons do not outlive it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Restarts it if it exited; says so. A daemon that exited 0 after handing over to a new
    /// process (a live upgrade) is followed to that process instead.
    fn supervise(&mut self) -> Result<(), String> {
        if let Some(pid) = self.adopted {
            let mut status = 0;
            // SAFETY: waitpid(2) without blocking on the process that took over, reparented
            // to us (PR_SET_CHILD_SUBREAPER).
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid || (r < 0 && !alive(pid)) {
                self.adopted = None;
                if libc::WIFEXITED(status)
                    && libc::WEXITSTATUS(status) == 0
                    && let Some(next) = self.took_over(pid)
                {
                    eprintln!("{} upgraded live: pid {pid} -> {next}", self.name);
                    self.adopted = Some(next);
                    return Ok(());
                }
                eprintln!("{} (pid {pid}) exited; restarting it", self.name);
                self.start()?;
            }
            return Ok(());
        }
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            let old = c.id() as i32;
            if status.success()
                && let Some(next) = self.took_over(old)
            {
                eprintln!("{} upgraded live: pid {old} -> {next}", self.name);
                self.child = None;
                self.adopted = Some(next);
                return Ok(());
            }
            eprintln!("{} exited ({status}); restarting it", self.name);
            self.start()?;
        }
        Ok(())
    }

    /// The process that took over from `old`, if one did: its pid file names another live
    /// process within 2 s.
    fn took_over(&self, old: i32) -> Option<i32> {
        let path = self.pid_file.as_ref()?;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(pid) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .filter(|p| *p != old && alive(*p))
            {
                return Some(pid);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running(&self) -> bool {
        self.child.is_some() || self.adopted.is_some()
    }

    fn stop(&mut self) {
        if let Some(pid) = self.adopted.take() {
            // SAFETY: kill(2) and waitpid(2) on the process that took over from our child
            // (reparented to us, so not reaped by anyone else).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut status = 0;
            // SAFETY: as above.
            while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
                if Instant::now() > deadline {
                    // SAFETY: as above.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, &mut status, 0);
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn lock(dir: &Path) -> Result<std::fs::File, String> {
    let path = dir.join("playground.pid");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(format!(
            "a playground already runs in {} (pid {})",
            dir.display(),
            pid.trim()
        ));
    }
    f.set_len(0).map_err(|e| e.to_string())?;
    writeln!(f, "{}", std::process::id()).map_err(|e| e.to_string())?;
    Ok(f)
}

fn listening(addr: &str) -> bool {
    addr.parse()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).ok())
        .is_some()
}

const TOPOLOGY: &str = "# The playground: one pool over three chunkservers in three zones.
[[pool]]
name = \"pool1\"
replicas = 3
copysets_per_chunkserver = 8

[[server]]
name = \"server1\"
zone = \"zone1\"
pool = \"pool1\"

[[server]]
name = \"server2\"
zone = \"zone2\"
pool = \"pool1\"

[[server]]
name = \"server3\"
zone = \"zone3\"
pool = \"pool1\"
";

/// Runs the playground in the foreground.
/// The ports a playground on `port` serves on (MDS, chunkservers, metrics).
fn ports(port: u16) -> Vec<u16> {
    [0, 1, 2, 3, 10, 11, 12, 13, 14]
        .iter()
        .map(|i| port.saturating_add(*i))
        .collect()
}

/// Refuses to start when another process listens on one of the playground's ports: its
/// daemons would fail to bind, and an MDS found listening there is another cluster's.
fn ports_free(port: u16) -> Result<(), String> {
    if port > u16::MAX - 14 {
        return Err(format!("--port {port}: the playground needs PORT..PORT+14"));
    }
    for p in ports(port) {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", p)) {
            return Err(format!(
                "port {p} on 127.0.0.1 is in use ({e}): another cluster or service holds it; \
                 the playground needs ports {port}..{} (choose others with --port)",
                port + 14
            ));
        }
    }
    Ok(())
}

pub fn up(o: &Options) -> Result<(), String> {
    // Everything under DIR (volume data, logs, state) is the user's only; the daemons say the
    // same of what they create (and raise their open-file limits, as this does for them).
    curve_metrics::process::daemon_setup();
    let dir = &o.dir;
    std::fs::create_dir_all(dir.join("logs")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = dir.canonicalize().map_err(|e| e.to_string())?;
    let _lock = lock(&dir)?;
    ports_free(o.port)?;
    // A nebd-server upgraded live (`curve playground upgrade`) is started by the old one,
    // which then exits: its successor is reparented to us, and supervised like our own child.
    // SAFETY: prctl only marks this process as a subreaper.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    std::fs::write(dir.join("topology.toml"), TOPOLOGY).map_err(|e| e.to_string())?;
    let keys = make_keys(&dir)?;
    let mds_addr = format!("127.0.0.1:{}", o.port);
    let d = |p: &str| dir.join(p).display().to_string();
    let mut daemons = vec![Daemon {
        name: "curve-mds".into(),
        program: bin("curve-mds"),
        args: vec![
            "--listen".into(),
            mds_addr.clone(),
            "--data-dir".into(),
            d("mds"),
            "--topology".into(),
            d("topology.toml"),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", o.port + 10),
        ]
        .into_iter()
        .chain(auth_args(
            o.auth,
            &[
                "--cluster-key-file",
                &d("keys/cluster.key"),
                "--admin-key-file",
                &d("keys/admin.key"),
            ],
        ))
        .collect(),
        log: dir.join("logs/mds.log"),
        child: None,
        pid_file: None,
        adopted: None,
    }];
    for i in 1..=3u16 {
        daemons.push(Daemon {
            name: format!("curve-chunkserver {i}"),
            program: bin("curve-chunkserver"),
            args: vec![
                "--data-dir".into(),
                d(&format!("cs{i}")),
                "--listen".into(),
                format!("127.0.0.1:{}", o.port + i),
                "--mds".into(),
                mds_addr.clone(),
                "--zone".into(),
                format!("zone{i}"),
                "--server".into(),
                format!("server{i}"),
                "--pool-target".into(),
                "4".into(),
                "--metrics-listen".into(),
                format!("127.0.0.1:{}", o.port + 10 + i),
            ]
            .into_iter()
            .chain(auth_args(
                o.auth,
                &["--cluster-key-file", &d("keys/cluster.key")],
            ))
            .collect(),
            log: dir.join(format!("logs/cs{i}.log")),
            child: None,
            pid_file: None,
            adopted: None,
        });
    }
    daemons.push(Daemon {
        name: "nebd-server".into(),
        program: bin("nebd-server"),
        args: vec![
            "--run-dir".into(),
            d("nebd"),
            "--mds".into(),
            mds_addr.clone(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", o.port + 14),
            "--owner".into(),
            "curve".into(),
        ]
        .into_iter()
        .chain(auth_args(o.auth, &["--key-file", &d("keys/admin.key")]))
        .collect(),
        log: dir.join("logs/nebd-server.log"),
        child: None,
        pid_file: Some(dir.join("nebd/nebd-server.pid")),
        adopted: None,
    });
    let result = serve(o, &dir, &mds_addr, &keys, &mut daemons);
    for dmn in daemons.iter_mut().rev() {
        dmn.stop();
    }
    let _ = std::fs::remove_file(dir.join("playground.json"));
    match &result {
        Ok(()) => eprintln!("playground stopped"),
        Err(e) => eprintln!(
            "playground failed: {e}; logs in {}",
            dir.join("logs").display()
        ),
    }
    result
}

fn stopping() -> Result<(), String> {
    if STOP.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// Waits for `cond` while supervising; fails on Ctrl-C or after `timeout`.
fn wait_for(
    what: &str,
    timeout: Duration,
    daemons: &mut [Daemon],
    mut cond: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let started = Instant::now();
    let mut said = false;
    loop {
        stopping()?;
        if cond() {
            if said {
                eprintln!(
                    "  {what}: ready after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
            return Ok(());
        }
        if !said && started.elapsed() > Duration::from_secs(1) {
            eprintln!("  waiting for {what}...");
            said = true;
        }
        for dmn in daemons.iter_mut().filter(|d| d.running()) {
            dmn.supervise()?;
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn auth_args(on: bool, args: &[&str]) -> Vec<String> {
    if on {
        args.iter().map(|s| s.to_string()).collect()
    } else {
        Vec::new()
    }
}

/// The playground's keys in DIR/keys (0700): the cluster keyring and root's key (0600 from
/// their creation), made once and kept across restarts; root's key.
fn make_keys(dir: &Path) -> Result<std::sync::Arc<curve_auth::UserKey>, String> {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).map_err(|e| format!("{}: {e}", keys.display()))?;
    std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", keys.display()))?;
    let cluster = keys.join("cluster.key");
    if !cluster.exists() {
        curve_auth::write_secret_file(&cluster, &curve_auth::Keyring::generate().to_file_text())
            .map_err(|e| format!("{}: {e}", cluster.display()))?;
    }
    let admin = keys.join("admin.key");
    if !admin.exists() {
        curve_auth::UserKey::generate("root")
            .save_new(&admin)
            .map_err(|e| format!("{}: {e}", admin.display()))?;
    }
    curve_auth::UserKey::load(&admin)
        .map(std::sync::Arc::new)
        .map_err(|e| e.to_string())
}

fn serve(
    o: &Options,
    dir: &Path,
    mds_addr: &str,
    keys: &std::sync::Arc<curve_auth::UserKey>,
    daemons: &mut [Daemon],
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    eprintln!(
        "starting curve-mds, 3 curve-chunkservers and nebd-server in {}",
        dir.display()
    );
    daemons[0].start()?;
    wait_for("the MDS", Duration::from_secs(30), daemons, || {
        listening(mds_addr)
    })?;
    for dmn in &mut daemons[1..4] {
        dmn.start()?;
    }
    let mut mds = MdsClient::with_key(vec![mds_addr.to_string()], Some(keys.clone()));
    mds.deadline = Duration::from_secs(2);
    wait_for(
        "the copysets (3 replicas each, with leaders)",
        Duration::from_secs(180),
        daemons,
        || {
            rt.block_on(mds.topology()).is_ok_and(|t| {
                !t.copysets.is_empty()
                    && t.copysets
                        .iter()
                        .all(|c| c.peers.len() == 3 && c.leader.is_some())
            })
        },
    )?;
    daemons[4].start()?;
    let run_dir = dir.join("nebd");
    wait_for("nebd-server", Duration::from_secs(30), daemons, || {
        ControlClient::connect(&run_dir).is_ok()
    })?;
    // The volume (kept across playground restarts).
    let path = format!("/{}", o.name);
    mds.deadline = Duration::from_secs(30);
    match rt.block_on(mds.create_striped(&path, o.size, 4096, o.stripe, "curve")) {
        Ok(_) => {}
        Err(e) if e.status() == Some(MdsStatus::Exists) => {}
        Err(e) => return Err(format!("cannot create {path}: {e}")),
    }
    let socket = run_dir.join("nbd.sock");
    let mut control = ControlClient::connect(&run_dir).map_err(|e| e.to_string())?;
    let listed = control
        .call(&Request::ListExports)
        .map_err(|e| e.to_string())?;
    let uri = match listed.exports.iter().find(|e| e.spec.name == o.name) {
        Some(e) => e.uri.clone(),
        None => {
            let r = control
                .call(&Request::AddExport(ExportSpec {
                    name: o.name.clone(),
                    volume: format!("curve:{path}"),
                    frontend: Frontend::Nbd {
                        address: format!("unix:{}", socket.display()),
                    },
                    read_only: false,
                }))
                .map_err(|e| e.to_string())?;
            if !r.ok {
                return Err(format!(
                    "cannot export {path}: {}",
                    r.error.unwrap_or_default()
                ));
            }
            r.exports.first().map(|e| e.uri.clone()).unwrap_or_default()
        }
    };
    let metrics = serde_json::json!({
        "curve-mds": format!("http://127.0.0.1:{}/metrics", o.port + 10),
        "curve-chunkserver 1": format!("http://127.0.0.1:{}/metrics", o.port + 11),
        "curve-chunkserver 2": format!("http://127.0.0.1:{}/metrics", o.port + 12),
        "curve-chunkserver 3": format!("http://127.0.0.1:{}/metrics", o.port + 13),
        "nebd-server": format!("http://127.0.0.1:{}/metrics", o.port + 14),
    });
    let info = serde_json::json!({
        "metrics": metrics,
        "mds": mds_addr,
        "uri": uri,
        "socket": socket,
        "volume": path,
        "run_dir": run_dir,
        "pid": std::process::id(),
    });
    std::fs::write(dir.join("playground.json"), info.to_string()).map_err(|e| e.to_string())?;
    let s = socket.display();
    println!("{uri}");
    eprintln!(
        "
The playground serves {path} ({size}) of a 3-replica cluster (curve-mds {mds_addr},
chunkservers :{p1} :{p2} :{p3}) through nebd-server over NBD:
  {uri}

Prometheus metrics (deploy/prometheus.yml scrapes them; deploy/grafana-dashboard.json shows them):
  curve-mds           http://127.0.0.1:{m0}/metrics
  curve-chunkservers  http://127.0.0.1:{m1}/metrics  :{m2}  :{m3}
  nebd-server         http://127.0.0.1:{m4}/metrics

Attach with:
  nbdinfo '{uri}'
  qemu-io --image-opts 'driver=nbd,server.type=unix,server.path={s},export={name}' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  fio --name=t --ioengine=nbd --uri='{uri}' --rw=randrw --bs=4k --iodepth=32 --time_based --runtime=10
  qemu-system-x86_64 ... -drive driver=nbd,server.type=unix,server.path={s},export={name},if=virtio
  export CURVE_KEY_FILE={admin_key}   # authentication is on: the admin's key
  curve --mds {mds_addr} cluster status
  curve --mds {mds_addr} volume list /
Logs: {logs}. Ctrl-C (or `curve playground down --dir {dir}`) stops.",
        size = human(o.size),
        admin_key = dir.join("keys/admin.key").display(),
        p1 = o.port + 1,
        p2 = o.port + 2,
        p3 = o.port + 3,
        m0 = o.port + 10,
        m1 = o.port + 11,
        m2 = o.port + 12,
        m3 = o.port + 13,
        m4 = o.port + 14,
        name = o.name,
        logs = dir.join("logs").display(),
        dir = dir.display(),
    );
    let _ = std::io::stdout().flush();
    // Supervise until stopped.
    loop {
        if STOP.load(Ordering::SeqCst) {
            return Ok(());
        }
        for dmn in daemons.iter_mut() {
            dmn.supervise()?;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

fn human(n: u64) -> String {
    if n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else {
        format!("{} MiB", n >> 20)
    }
}

fn running_pid(dir: &Path) -> Option<i32> {
    let path = dir.join("playground.pid");
    let f = std::fs::File::open(&path).ok()?;
    // SAFETY: flock on a descriptor we own; a lock we get means nobody holds it.
    let free = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if free {
        return None;
    }
    std::fs::read_to_string(&path).ok()?.trim().parse().ok()
}

/// Stops the playground running in `dir`.
pub fn down(dir: &Path) -> Result<(), String> {
    let pid = running_pid(dir).ok_or_else(|| format!("no playground runs in {}", dir.display()))?;
    // SAFETY: kill(2) of the pid the running playground wrote under its lock.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if running_pid(dir).is_none() {
            eprintln!("playground in {} stopped", dir.display());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the playground (pid {pid}) did not stop within 60 s"
    ))
}

/// Says whether a playground runs in `dir`, and how its cluster is.
pub fn status(dir: &Path, json: bool) -> Result<(), String> {
    let Some(pid) = running_pid(dir) else {
        if json {
            println!("{}", serde_json::json!({ "running": false }));
            return Ok(());
        }
        return Err(format!("no playground runs in {}", dir.display()));
    };
    let info: serde_json::Value = std::fs::read_to_string(dir.join("playground.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let mds = info["mds"].as_str().unwrap_or("127.0.0.1:6700").to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let key = curve_auth::UserKey::load(&dir.join("keys/admin.key"))
        .ok()
        .map(std::sync::Arc::new);
    let mut client = MdsClient::with_key(vec![mds.clone()], key);
    client.deadline = Duration::from_secs(3);
    let cluster = rt.block_on(crate::cluster::summary(&client));
    if json {
        println!(
            "{}",
            serde_json::json!({
                "running": true,
                "pid": pid,
                "uri": info["uri"],
                "mds": mds,
                "cluster": cluster.as_ref().ok(),
            })
        );
    } else {
        println!("playground running (pid {pid}) in {}", dir.display());
        println!("uri: {}", info["uri"].as_str().unwrap_or("(starting)"));
        match cluster {
            Ok(c) => crate::cluster::print_summary(&c),
            Err(e) => println!("cluster: {e}"),
        }
    }
    Ok(())
}
