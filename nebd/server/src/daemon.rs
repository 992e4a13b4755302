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

fn spawn_part1_service(
    run_dir: &Path,
    files: Arc<FileManager>,
    stop: CancellationToken,
    group: Option<u32>,
) -> anyhow::Result<()> {
    let path = run_dir.join(PART1_SOCKET);
    // We hold the run dir lock: a socket file here is left by a dead server.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot bind part1 socket {}", path.display()))?;
    share_socket(&path, group)?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => break,
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
                let (notifier, stop, finished) = (notifier.clone(), stop.clone(), finished.clone());
                async move {
                    tokio::select! {
                        _ = stop.cancelled() => notifier.cancel(),
                        _ = finished.cancelled() => {}
                    }
                }
            });
            let files = files.clone();
            let spawned = std::thread::Builder::new()
                .name("nebd-part1".into())
                .spawn(move || {
                    if let Err(e) = Part1Conn::new(sock, files).serve(&notifier) {
                        tracing::info!(error = %e, "part1 connection closed");
                    }
                    finished.cancel();
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a part1 connection thread");
            }
        }
    });
    Ok(())
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
    /// host:port of the Prometheus endpoint (`GET /metrics`), if any.
    pub metrics_listen: Option<String>,
    /// Group given the sockets consumers connect to (control, part1, NBD, vhost-user): they
    /// are 0660, so members of this group (QEMU's) may connect; the run dir is then 0750.
    pub socket_group: Option<u32>,
}

impl Config {
    /// Defaults for `run_dir`.
    pub fn new(run_dir: PathBuf) -> Self {
        Config {
            run_dir,
            heartbeat_timeout: Duration::from_secs(30),
            mds: vec!["127.0.0.1:6700".into()],
            owner: "curve".into(),
            metrics_listen: None,
            socket_group: None,
        }
    }
}

/// What the control handlers work on.
struct State {
    exports: ExportManager,
    files: Arc<FileManager>,
}

/// Holds the run directory's lock for the life of the process.
#[derive(Debug)]
struct RunDirLock {
    _file: File,
    path: PathBuf,
}

impl Drop for RunDirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(RunDirLock { _file: file, path })
}

/// Runs nebd-server until `shutdown` completes; then closes every export cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let _lock = lock_run_dir(&config.run_dir)?;
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
    let socket = control::control_socket(&config.run_dir);
    // We hold the lock, so a socket file left here belongs to a dead server.
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("cannot bind control socket {}", socket.display()))?;
    share_socket(&socket, config.socket_group)?;
    let meta = Arc::new(Metafile::open(&config.run_dir)?);
    let files = Arc::new(FileManager::restore(meta.clone()));
    let state = Arc::new(State {
        exports: ExportManager::new(Some(meta)).with_socket_group(config.socket_group),
        files: files.clone(),
    });
    if let Some(addr) = &config.metrics_listen {
        let m = &crate::metered::METRICS.metrics;
        let s = Arc::downgrade(&state);
        m.on_scrape(move || {
            if let Some(s) = s.upgrade() {
                s.exports.update_gauges();
            }
        });
        curve_metrics::serve(addr, m.clone()).await?;
    }
    state.exports.restore().await;
    let stop = CancellationToken::new();
    spawn_part1_service(
        &config.run_dir,
        files.clone(),
        stop.clone(),
        config.socket_group,
    )?;
    let timeout = config.heartbeat_timeout;
    tokio::spawn({
        let stop = stop.clone();
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
    tracing::info!(run_dir = %config.run_dir.display(), pid = std::process::id(), "nebd-server started");

    let accept = {
        let state = state.clone();
        let stop = stop.clone();
        async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "control accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
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
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => tracing::info!("shutting down"),
    }
    stop.cancel();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(config.run_dir.join(PART1_SOCKET));
    state.exports.shutdown(Duration::from_secs(5)).await;
    tracing::info!("nebd-server stopped");
    Ok(())
}

async fn serve_control(
    stream: UnixStream,
    state: &State,
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
