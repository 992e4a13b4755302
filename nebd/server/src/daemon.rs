//! The nebd-server process: run directory, control socket, shutdown.
//!
//! ```text
//!  <run-dir>/nebd-server.pid   flock'ed for the life of the process (one server per dir)
//!  <run-dir>/control.sock      control protocol (crate::control), served here
//!  <run-dir>/nebd.sock         part1 service (crate::part1): File, Heartbeat, IO
//!  <run-dir>/nebd-server.meta  open files and exports (crate::metafile), restored on start
//! ```
//!
//! Start-up order: lock, load the metafile (a corrupt one stops the start), reopen files,
//! re-create exports on their old sockets, then open the part1 and control sockets, so
//! that a restarted part2 is complete when its clients find it again.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use curve_blockdev::exec::Notifier;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::control::{self, Request, Response};
use crate::exports::ExportManager;
use crate::files::FileManager;
use crate::metafile::Metafile;
use crate::part1::{PART1_SOCKET, Part1Conn};

/// Listens for part1 connections; each gets its own thread (see [`crate::part1`]).
/// Opens a socket to consumers: mode 0660 (explicitly: the process's umask makes everything
/// else 0600), group `group` when given.
pub fn share_socket(path: &Path, group: Option<u32>) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    Ok(())
}

/// The gid of group `name` (or a number).
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("bad group name {name:?}"))?;
    // SAFETY: getgrnam with a valid C string; the result is read at once, before any other
    // call that could reuse its static buffer.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        return Err(format!("no group named {name:?}"));
    }
    // SAFETY: g is a valid group record (checked non-null above).
    Ok(unsafe { (*g).gr_gid })
}

/// The part1 socket's listener and its connections (a thread each, see [`crate::part1`]).
/// Paused for a hand-over: no accepting (new connections wait in the backlog for the next
/// process), every connection answers what it read and closes; libnebd reconnects and
/// resends what it had not been answered, as it does after a crash.
pub(crate) struct Part1Service {
    listener: std::os::fd::OwnedFd,
    paused: tokio::sync::watch::Sender<bool>,
    conns: Arc<parking_lot::Mutex<Vec<Arc<Notifier>>>>,
}

impl Part1Service {
    fn start(
        listener: std::os::unix::net::UnixListener,
        files: Arc<FileManager>,
        stop: CancellationToken,
        paused: bool,
    ) -> anyhow::Result<Arc<Self>> {
        let dup = std::os::fd::OwnedFd::from(listener.try_clone()?);
        listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(listener)?;
        let (paused, mut watch) = tokio::sync::watch::channel(paused);
        let conns: Arc<parking_lot::Mutex<Vec<Arc<Notifier>>>> = Arc::default();
        let service = Arc::new(Part1Service {
            listener: dup,
            paused,
            conns: conns.clone(),
        });
        tokio::spawn(async move {
            loop {
                if *watch.borrow_and_update() {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = watch.changed() => continue,
                    }
                }
                let stream = tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = watch.changed() => continue,
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "part1 accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let (Ok(sock), Ok(notifier)) = (stream.into_std(), Notifier::new()) else {
                    tracing::warn!("cannot take over a part1 connection");
                    continue;
                };
                let finished = CancellationToken::new();
                tokio::spawn({
                    let (notifier, stop, finished) =
                        (notifier.clone(), stop.clone(), finished.clone());
                    async move {
                        tokio::select! {
                            _ = stop.cancelled() => notifier.cancel(),
                            _ = finished.cancelled() => {}
                        }
                    }
                });
                conns.lock().push(notifier.clone());
                let (files, conns) = (files.clone(), conns.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("nebd-part1".into())
                        .spawn(move || {
                            if let Err(e) = Part1Conn::new(sock, files).serve(&notifier) {
                                tracing::info!(error = %e, "part1 connection closed");
                            }
                            conns.lock().retain(|n| !Arc::ptr_eq(n, &notifier));
                            finished.cancel();
                        });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a part1 connection thread");
                }
            }
        });
        Ok(service)
    }

    /// Stops accepting and closes every connection once it has answered what it read.
    async fn pause(&self, timeout: Duration) -> Result<(), String> {
        self.paused.send_replace(true);
        for n in self.conns.lock().iter() {
            n.cancel();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.conns.lock().is_empty() {
            if tokio::time::Instant::now() > deadline {
                self.resume();
                return Err(format!(
                    "part1 connections did not finish their requests within {timeout:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    fn resume(&self) {
        self.paused.send_replace(false);
    }
}

/// Default run directory.
pub use crate::control::DEFAULT_RUN_DIR;

/// How nebd-server runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of the sockets, pid file and metafile.
    pub run_dir: PathBuf,
    /// A file part1 has not sent a heartbeat for this long is closed (and reopened on its
    /// next request).
    pub heartbeat_timeout: Duration,
    /// MDS addresses for `curve:` volumes.
    pub mds: Vec<String>,
    /// Owner `curve:` volumes are opened as.
    pub owner: String,
    /// The key MDS requests are signed with (clusters with auth on).
    pub key: Option<std::sync::Arc<curve_auth::UserKey>>,
    /// host:port of the Prometheus endpoint (`GET /metrics`), if any.
    pub metrics_listen: Option<String>,
    /// Group given the sockets consumers connect to (control, part1, NBD, vhost-user): they
    /// are 0660, so members of this group (QEMU's) may connect; the run dir is then 0750.
    pub socket_group: Option<u32>,
    /// Take everything over from the nebd-server running on `run_dir` (a live upgrade)
    /// instead of starting afresh.
    pub takeover: bool,
    /// How long a hand-over may take (the new binary starting, in-flight requests finishing).
    pub takeover_timeout: Duration,
    /// The binary a `curve upgrade` without `--binary` starts: this one's path.
    pub exe: PathBuf,
    /// The arguments the next binary gets in an upgrade (this one's, `--takeover` added).
    pub next_args: Vec<std::ffi::OsString>,
}

impl Config {
    /// Defaults for `run_dir`.
    pub fn new(run_dir: PathBuf) -> Self {
        Config {
            run_dir,
            heartbeat_timeout: Duration::from_secs(30),
            mds: vec!["127.0.0.1:6700".into()],
            owner: "curve".into(),
            key: None,
            metrics_listen: None,
            socket_group: None,
            takeover: false,
            takeover_timeout: Duration::from_secs(10),
            exe: std::env::current_exe().unwrap_or_else(|_| "nebd-server".into()),
            next_args: Vec::new(),
        }
    }
}

/// What the control handlers work on.
pub(crate) struct State {
    pub(crate) exports: ExportManager,
    pub(crate) files: Arc<FileManager>,
    pub(crate) config: Config,
    pub(crate) lock: RunDirLock,
    /// The control socket's listener (a duplicate: the accept loop owns another).
    pub(crate) control: std::os::fd::OwnedFd,
    /// Set while a hand-over holds the control socket's accepting.
    pub(crate) control_paused: tokio::sync::watch::Sender<bool>,
    pub(crate) part1: Arc<Part1Service>,
    /// Whoever waits for the outcome of a hand-over in progress (`curve upgrade`).
    pub(crate) upgrade: parking_lot::Mutex<Option<crate::upgrade::Waiter>>,
}

impl State {
    /// Pauses the control and part1 sockets for a hand-over.
    pub(crate) async fn pause_sockets(&self, timeout: Duration) -> Result<(), String> {
        self.control_paused.send_replace(true);
        if let Err(e) = self.part1.pause(timeout).await {
            self.control_paused.send_replace(false);
            return Err(e);
        }
        Ok(())
    }

    /// Undoes [`pause_sockets`](Self::pause_sockets).
    pub(crate) fn resume_sockets(&self) {
        self.part1.resume();
        self.control_paused.send_replace(false);
    }

    /// Duplicates of the part1 and control listeners.
    pub(crate) fn listeners(
        &self,
    ) -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
        Ok((self.control.try_clone()?, self.part1.listener.try_clone()?))
    }
}

/// Holds the run directory's lock for the life of the process.
#[derive(Debug)]
pub(crate) struct RunDirLock {
    file: File,
    path: PathBuf,
}

impl RunDirLock {
    /// The lock handed over by the previous process (the same open file, so the same flock).
    pub(crate) fn adopt(fd: std::os::fd::OwnedFd, run_dir: &Path) -> Self {
        RunDirLock {
            file: File::from(fd),
            path: run_dir.join(control::PID_FILE),
        }
    }

    /// A duplicate, to hand over.
    pub(crate) fn dup(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        Ok(self.file.try_clone()?.into())
    }

    /// Writes this process's pid into the pid file.
    pub(crate) fn write_pid(&self) -> std::io::Result<()> {
        let mut f = &self.file;
        f.set_len(0)?;
        f.rewind()?;
        writeln!(f, "{}", std::process::id())
    }
}

impl Drop for RunDirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes the socket a dead server left at `path`; anything else there is refused, never
/// deleted.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display())),
        Ok(_) => bail!(
            "{} exists and is not a socket: left alone (move it away, or use another --run-dir)",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

fn lock_run_dir(run_dir: &Path) -> anyhow::Result<RunDirLock> {
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create run dir {}", run_dir.display()))?;
    let path = run_dir.join(control::PID_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        bail!(
            "another nebd-server (pid {}) is running with run dir {}",
            pid.trim(),
            run_dir.display()
        );
    }
    let lock = RunDirLock { file, path };
    lock.write_pid()?;
    Ok(lock)
}

/// Runs nebd-server until `shutdown` completes; then closes every export cleanly. With
/// `config.takeover`, takes the running server's place instead (see [`crate::upgrade`]).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if config.takeover {
        return crate::upgrade::take(config, shutdown).await;
    }
    let lock = lock_run_dir(&config.run_dir)?;
    prepare_run_dir(&config)?;
    let socket = control::control_socket(&config.run_dir);
    // We hold the lock, so a socket file left here belongs to a dead server.
    remove_stale_socket(&socket)?;
    let control = std::os::unix::net::UnixListener::bind(&socket)
        .with_context(|| format!("cannot bind control socket {}", socket.display()))?;
    share_socket(&socket, config.socket_group)?;
    let meta = Arc::new(Metafile::open(&config.run_dir)?);
    let files = Arc::new(FileManager::restore(meta.clone()));
    let exports = ExportManager::new(Some(meta)).with_socket_group(config.socket_group);
    exports.restore().await;
    let path = config.run_dir.join(PART1_SOCKET);
    // We hold the run dir lock: a socket file here is left by a dead server.
    remove_stale_socket(&path)?;
    let part1 = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot bind part1 socket {}", path.display()))?;
    share_socket(&path, config.socket_group)?;
    let stop = CancellationToken::new();
    let parts = Parts {
        config,
        lock,
        control,
        part1,
        files,
        exports,
    };
    let state = start(parts, stop.clone(), false)?;
    serve_metrics(&state).await?;
    crate::upgrade::sd_notify("READY=1");
    tracing::info!(run_dir = %state.config.run_dir.display(), pid = std::process::id(), "nebd-server started");
    serve_until(&state, &stop, shutdown).await;
    Ok(())
}

/// Serves until `shutdown` completes; then stops accepting, removes the sockets and closes
/// every export cleanly.
pub(crate) async fn serve_until(
    state: &State,
    stop: &CancellationToken,
    shutdown: impl Future<Output = ()>,
) {
    shutdown.await;
    tracing::info!("shutting down");
    stop.cancel();
    let _ = std::fs::remove_file(control::control_socket(&state.config.run_dir));
    let _ = std::fs::remove_file(state.config.run_dir.join(PART1_SOCKET));
    state.exports.shutdown(Duration::from_secs(5)).await;
    let closed = crate::volume::close_cluster_sessions(Duration::from_secs(5)).await;
    tracing::info!(sessions_closed = closed, "nebd-server stopped");
}

/// Modes of the run directory, and this process's identity at the MDS.
pub(crate) fn prepare_run_dir(config: &Config) -> anyhow::Result<()> {
    // The metafile and pid file are this user's (0600 by the umask); the directory lets only
    // the socket group through.
    let dir_mode = if config.socket_group.is_some() {
        0o750
    } else {
        0o700
    };
    std::fs::set_permissions(&config.run_dir, std::fs::Permissions::from_mode(dir_mode))?;
    if let Some(gid) = config.socket_group {
        std::os::unix::fs::chown(&config.run_dir, None, Some(gid))?;
    }
    // A restarted part2 on the same run directory is the same client to the MDS: it takes
    // its volumes' sessions over instead of waiting for their leases to lapse.
    crate::volume::set_cluster_defaults(crate::volume::ClusterDefaults {
        mds: config.mds.clone(),
        owner: config.owner.clone(),
        key: config.key.clone(),
        client_id: format!(
            "nebd-server:{}:{}",
            hostname(),
            config
                .run_dir
                .canonicalize()
                .unwrap_or(config.run_dir.clone())
                .display()
        ),
    });
    Ok(())
}

/// The Prometheus endpoint, if configured.
pub(crate) async fn serve_metrics(state: &Arc<State>) -> anyhow::Result<()> {
    if let Some(addr) = &state.config.metrics_listen {
        let m = &crate::metered::METRICS.metrics;
        let s = Arc::downgrade(state);
        m.on_scrape(move || {
            if let Some(s) = s.upgrade() {
                s.exports.update_gauges();
            }
        });
        curve_metrics::serve(addr, m.clone()).await?;
    }
    Ok(())
}

/// What a serving nebd-server is made of, before it serves.
pub(crate) struct Parts {
    pub(crate) config: Config,
    pub(crate) lock: RunDirLock,
    pub(crate) control: std::os::unix::net::UnixListener,
    pub(crate) part1: std::os::unix::net::UnixListener,
    pub(crate) files: Arc<FileManager>,
    pub(crate) exports: ExportManager,
}

/// Starts serving part1, the control socket and the heartbeat expiry on the listeners given
/// (with `paused`, the two sockets accept only after [`State::resume_sockets`]).
pub(crate) fn start(
    parts: Parts,
    stop: CancellationToken,
    paused: bool,
) -> anyhow::Result<Arc<State>> {
    let Parts {
        config,
        lock,
        control,
        part1,
        files,
        exports,
    } = parts;
    let part1 = Part1Service::start(part1, files.clone(), stop.clone(), paused)?;
    let timeout = config.heartbeat_timeout;
    tokio::spawn({
        let (stop, files) = (stop.clone(), files.clone());
        async move {
            let mut tick = tokio::time::interval((timeout / 4).max(Duration::from_millis(10)));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => { files.expire(timeout); }
                }
            }
        }
    });
    let dup = std::os::fd::OwnedFd::from(control.try_clone()?);
    control.set_nonblocking(true)?;
    let listener = UnixListener::from_std(control)?;
    let (control_paused, mut watch) = tokio::sync::watch::channel(paused);
    let state = Arc::new(State {
        exports,
        files,
        config,
        lock,
        control: dup,
        control_paused,
        part1,
        upgrade: parking_lot::Mutex::new(None),
    });
    tokio::spawn({
        let state = state.clone();
        async move {
            // A descriptor kept in reserve: when the process runs out (clients holding every
            // one), it is given up for a control connection, served alone, so that the
            // operator can still see and act on what is going on.
            let mut spare = std::fs::File::open("/dev/null").ok();
            loop {
                if *watch.borrow_and_update() {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = watch.changed() => continue,
                    }
                }
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = watch.changed() => continue,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) if out_of_descriptors(&e) && spare.is_some() => {
                            tracing::warn!(
                                error = %e,
                                "out of file descriptors: a control connection gets the spare one"
                            );
                            drop(spare.take());
                            if let Ok(Ok((stream, _))) =
                                tokio::time::timeout(Duration::from_secs(1), listener.accept()).await
                            {
                                let served = tokio::time::timeout(
                                    Duration::from_secs(30),
                                    serve_control(stream, &state, &stop),
                                );
                                let _ = served.await;
                            }
                            spare = std::fs::File::open("/dev/null").ok();
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            if spare.is_none() {
                                spare = std::fs::File::open("/dev/null").ok();
                            }
                            continue;
                        }
                    },
                };
                let state = state.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_control(stream, &state, &stop).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
        }
    });
    Ok(state)
}

/// Whether an accept failed for want of file descriptors (the process's or the system's).
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

async fn serve_control(
    stream: UnixStream,
    state: &Arc<State>,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut r).take(control::MAX_LINE as u64 + 1);
        let n = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            n = limited.read_line(&mut line) => n?,
        };
        if n == 0 {
            return Ok(());
        }
        if line.len() > control::MAX_LINE {
            let mut reply = serde_json::to_string(&Response::error("request line too long"))?;
            reply.push('\n');
            w.write_all(reply.as_bytes()).await?;
            return Ok(());
        }
        let response = match control::parse_request(line.trim()) {
            Err(e) => Response::error(e),
            Ok(Request::Takeover) => {
                // The connection becomes the hand-over wire.
                let stream = r
                    .into_inner()
                    .reunite(w)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                crate::upgrade::give(state, stream).await;
                return Ok(());
            }
            Ok(Request::Upgrade { binary, timeout_ms }) => {
                let outcome = crate::upgrade::upgrade(state, binary, timeout_ms).await;
                let (ok, committed) = (outcome.result.is_ok(), outcome.committed);
                let response = match outcome.result {
                    Ok(report) => Response {
                        ok: true,
                        upgrade: Some(report),
                        ..Default::default()
                    },
                    Err(e) => Response::error(e),
                };
                let mut reply = serde_json::to_string(&response)?;
                reply.push('\n');
                w.write_all(reply.as_bytes()).await?;
                let _ = w.flush().await;
                if committed {
                    crate::upgrade::exit_handed_over(ok);
                }
                continue;
            }
            Ok(req) => handle(state, req).await,
        };
        let mut reply = serde_json::to_string(&response)?;
        reply.push('\n');
        w.write_all(reply.as_bytes()).await?;
    }
}

async fn handle(state: &State, req: Request) -> Response {
    match req {
        Request::AddExport(spec) => match state.exports.add(spec).await {
            Ok(status) => Response::ok(vec![status]),
            Err(e) => Response::error(e),
        },
        Request::RemoveExport { name } => match state.exports.remove(&name).await {
            Ok(()) => Response::ok(Vec::new()),
            Err(e) => Response::error(e),
        },
        Request::ListExports => Response::ok(state.exports.list().await),
        Request::ListFiles => Response {
            ok: true,
            files: state.files.list(),
            ..Default::default()
        },
        Request::Upgrade { .. } | Request::Takeover => {
            Response::error("handled on the connection itself")
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
