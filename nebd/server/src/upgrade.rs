//! Live upgrade: a new nebd-server takes every socket, device and session of the running one
//! while I/O flows, and no consumer sees a disconnect.
//!
//! ```text
//!  curve upgrade ──Upgrade──> old: starts `BINARY <its args> --takeover`
//!                              new: connects to control.sock, sends Takeover
//!  old (give): hold the exports; send the Preview (the MDS sessions)
//!  new (take): open every volume of the metafile (cluster volumes continue the sessions: no
//!              new open, the same epoch); answer Ready
//!  old:        pause control + part1 accepting, close part1 connections once answered, pause
//!              every frontend between requests (in-flight answered); send the Offer (sockets,
//!              vhost-user state, unconsumed bytes)
//!  new:        adopt the run-dir lock, listeners and exports (NBD listeners + connections,
//!              vhost-user front-ends, kernel NBD connections) on the volumes opened; serve;
//!              answer Prepared
//!  old: answers `curve upgrade`, exits 0       new: sees EOF, writes the pid file, recovers
//!                                                   ublk devices (kernel recovery), metrics
//!  any failure before Prepared: the old kills the new one (it may have started serving) and
//!  resumes everything it paused: a failed upgrade is a no-op.
//! ```
//!
//! Failpoints for tests (`NEBD_FAILPOINT` in the new process's environment):
//! `takeover-offer-received` and `takeover-before-prepared` kill it with SIGKILL at that step;
//! `takeover-abort` makes it refuse the offer.

use std::future::Future;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nebd_control::UpgradeReport;
use tokio::net::UnixStream;

use crate::daemon::{Config, RunDirLock, State};
use crate::exports::{ExportManager, Paused};
use crate::files::FileManager;
use crate::handover::{self, Answer, Attachments, Offer, Preview};
use crate::metafile::Metafile;

/// How a hand-over ended, for the old process.
pub(crate) struct Outcome {
    /// What to tell `curve upgrade`.
    pub(crate) result: Result<UpgradeReport, String>,
    /// The new process was told to serve: this one must exit, whatever `result` says.
    pub(crate) committed: bool,
}

impl Outcome {
    fn failed(e: String) -> Self {
        Outcome {
            result: Err(e),
            committed: false,
        }
    }
}

/// A `curve upgrade` waiting for the hand-over's outcome.
pub(crate) struct Waiter {
    tx: tokio::sync::oneshot::Sender<Outcome>,
    /// The hand-over has begun (the new process connected).
    started: Arc<std::sync::atomic::AtomicBool>,
    timeout: Duration,
}

/// Tells systemd (`Type=notify`), when it supervises us.
pub(crate) fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

fn failpoint(name: &str) {
    if std::env::var("NEBD_FAILPOINT").is_ok_and(|v| v == name) {
        tracing::warn!(name, "failpoint: killing this process");
        // SAFETY: raise(3) on ourselves.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// This process has handed everything over: it leaves at once, closing nothing (sessions,
/// sockets and devices are the new process's now). Status 1 when the new process was told to
/// serve and was not heard of again (a supervisor starts nebd-server then).
pub(crate) fn exit_handed_over(ok: bool) -> ! {
    if ok {
        tracing::info!("handed over to the new nebd-server; exiting");
        std::process::exit(0)
    }
    tracing::error!("handed over to a new nebd-server that did not confirm; exiting");
    std::process::exit(1)
}

/// `curve upgrade`: starts the new binary and waits for it to take over.
pub(crate) async fn upgrade(
    state: &Arc<State>,
    binary: Option<String>,
    timeout_ms: u64,
) -> Outcome {
    let binary = binary
        .map(PathBuf::from)
        .unwrap_or_else(|| state.config.exe.clone());
    if let Err(e) = check_executable(&binary) {
        return Outcome::failed(e);
    }
    let timeout = Duration::from_millis(timeout_ms.max(100));
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let mut w = state.upgrade.lock();
        if w.is_some() {
            return Outcome::failed("an upgrade is already in progress".into());
        }
        *w = Some(Waiter {
            tx,
            started: started.clone(),
            timeout,
        });
    }
    let clear = || drop(state.upgrade.lock().take());
    let mut cmd = tokio::process::Command::new(&binary);
    cmd.args(&state.config.next_args)
        .arg("--takeover")
        .arg("--takeover-timeout-ms")
        .arg(timeout.as_millis().to_string())
        .stdin(std::process::Stdio::null());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            clear();
            return Outcome::failed(format!("cannot start {}: {e}", binary.display()));
        }
    };
    let pid = child.id().unwrap_or_default();
    tracing::info!(binary = %binary.display(), pid, "upgrade: new nebd-server started");
    let begun = || started.load(std::sync::atomic::Ordering::Acquire);
    let deadline = tokio::time::Instant::now() + timeout;
    let outcome = tokio::select! {
        r = &mut rx => r,
        st = child.wait() => {
            if begun() {
                (&mut rx).await
            } else {
                clear();
                let st = st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                return Outcome::failed(format!(
                    "the new nebd-server ({}) exited ({st}) before taking over: see its log; this one serves on",
                    binary.display()
                ));
            }
        }
        _ = tokio::time::sleep_until(deadline) => {
            if begun() {
                (&mut rx).await
            } else {
                clear();
                let _ = child.kill().await;
                return Outcome::failed(format!(
                    "the new nebd-server ({}) did not take over within {timeout:?}; it was stopped and this one serves on",
                    binary.display()
                ));
            }
        }
    };
    match outcome {
        Ok(o) => {
            if !o.committed {
                // It was killed by the hand-over: reap it.
                let _ = child.wait().await;
            }
            o
        }
        Err(_) => Outcome::failed("the hand-over ended without an outcome".into()),
    }
}

fn check_executable(binary: &std::path::Path) -> Result<(), String> {
    let meta = std::fs::metadata(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    let c = std::ffi::CString::new(binary.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("bad path {}", binary.display()))?;
    // SAFETY: access(2) with a valid C string.
    let exec = unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0;
    if !meta.is_file() || !exec {
        return Err(format!(
            "{} is not an executable file: nothing was changed",
            binary.display()
        ));
    }
    Ok(())
}

/// The old side of a hand-over, on the connection a new process sent Takeover on.
pub(crate) async fn give(state: &Arc<State>, stream: UnixStream) {
    let peer = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .and_then(|p| u32::try_from(p).ok());
    let (timeout, started) = match &*state.upgrade.lock() {
        Some(w) => (w.timeout, Some(w.started.clone())),
        None => (state.config.takeover_timeout, None),
    };
    if let Some(s) = started {
        s.store(true, std::sync::atomic::Ordering::Release);
    }
    let outcome = match peer {
        Some(pid) => give_to(state, stream, pid, timeout).await,
        None => Outcome::failed("cannot tell which process asks to take over".into()),
    };
    let waiter = state.upgrade.lock().take();
    match (outcome, waiter) {
        (o, Some(w)) => {
            let _ = w.tx.send(o);
        }
        (o, None) if o.committed => exit_handed_over(o.result.is_ok()),
        (o, None) => {
            if let Err(e) = o.result {
                tracing::error!(error = %e, "hand-over failed");
            }
        }
    }
}

async fn give_to(
    state: &Arc<State>,
    stream: UnixStream,
    new_pid: u32,
    timeout: Duration,
) -> Outcome {
    let mut held = state.exports.hold().await;
    let fail = |e: String| {
        Outcome::failed(format!(
            "the hand-over to pid {new_pid} failed: {e}; the old nebd-server (pid {}) serves on",
            std::process::id()
        ))
    };
    // Phase 1, nothing paused: the new process opens every volume.
    let preview = Preview {
        version: handover::VERSION,
        old_pid: std::process::id(),
        sessions: crate::volume::cluster_sessions(),
    };
    let mut sock = match preview_exchange(stream, preview, timeout).await {
        Ok(s) => s,
        Err(e) => {
            kill_and_wait(new_pid).await;
            tracing::warn!(new_pid, error = %e, "hand-over failed before the pause");
            return fail(e);
        }
    };
    // Phase 2: the pause.
    let t0 = Instant::now();
    let paused_at_us = handover::now_us();
    if let Err(e) = state.pause_sockets(timeout).await {
        kill_and_wait(new_pid).await;
        return fail(e);
    }
    let paused = match state.exports.pause(&mut held, timeout).await {
        Ok(p) => p,
        Err(e) => {
            state.resume_sockets();
            kill_and_wait(new_pid).await;
            return fail(e);
        }
    };
    tracing::info!(new_pid, took = ?t0.elapsed(), "frontends paused for a hand-over");
    let exports = held.len();
    let connections = paused.nbd.connections.len()
        + paused.devices.iter().map(|(_, c)| c.len()).sum::<usize>()
        + paused
            .vhost
            .iter()
            .filter(|(_, f)| f.state.conn.is_some())
            .count();
    let prepared = match build_offer(state, &paused, paused_at_us) {
        Ok((offer, att)) => offer_exchange(&mut sock, offer, att, timeout).await,
        Err(e) => Err(e),
    };
    let pid = match prepared {
        Ok(pid) => pid,
        Err(e) => {
            // It serves nothing before it is told to; killed, it never will.
            kill_and_wait(new_pid).await;
            state.exports.resume(&mut held, paused).await;
            state.resume_sockets();
            tracing::warn!(new_pid, error = %e, "hand-over failed; serving on");
            return fail(e);
        }
    };
    // Phase 3: commit. From here on this process never serves again.
    sd_notify(&format!("MAINPID={pid}"));
    let serving = commit_exchange(sock, timeout).await;
    match serving {
        Ok(pause_us) => {
            tracing::info!(new_pid = pid, pause_us, "the new nebd-server serves");
            Outcome {
                result: Ok(UpgradeReport {
                    old_pid: std::process::id(),
                    new_pid: pid,
                    pause_us,
                    exports,
                    connections,
                }),
                committed: true,
            }
        }
        Err(e) => Outcome {
            result: Err(format!(
                "the new nebd-server (pid {pid}) was told to serve and did not confirm: {e}; \
                 this one exits (a supervisor starts nebd-server again)"
            )),
            committed: true,
        },
    }
}

fn io_reason(e: std::io::Error, timeout: Duration) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("no answer within {timeout:?}")
        }
        std::io::ErrorKind::UnexpectedEof => "the new nebd-server went away".into(),
        _ => e.to_string(),
    }
}

/// Sends the preview; waits for Ready.
async fn preview_exchange(
    stream: UnixStream,
    preview: Preview,
    timeout: Duration,
) -> Result<std::os::unix::net::UnixStream, String> {
    let mut sock = stream.into_std().map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || {
        sock.set_nonblocking(false)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        handover::write_json(&mut sock, &preview)?;
        let answer: Answer = handover::read_json(&mut sock)?;
        Ok::<_, std::io::Error>((sock, answer))
    })
    .await
    .map_err(|e| format!("the hand-over thread failed: {e}"))?
    .map_err(|e| io_reason(e, timeout))
    .and_then(|(sock, a)| match a {
        Answer::Ready => Ok(sock),
        Answer::Abort { reason } => Err(format!("the new nebd-server refused: {reason}")),
        _ => Err("the new nebd-server answered out of turn".into()),
    })
}

fn build_offer(
    state: &State,
    paused: &Paused,
    paused_at_us: u64,
) -> Result<(Offer, Attachments), String> {
    let io = |e: std::io::Error| e.to_string();
    let mut att = Attachments::default();
    let (control, part1) = state.listeners().map_err(io)?;
    let mut offer = Offer {
        version: handover::VERSION,
        old_pid: std::process::id(),
        paused_at_us,
        lock: att.fd(state.lock.dup().map_err(io)?),
        control: att.fd(control),
        part1: att.fd(part1),
        ..Default::default()
    };
    for (addr, fd, names) in &paused.nbd.listeners {
        let i = att.fd(fd.try_clone().map_err(io)?);
        offer
            .nbd_listeners
            .push((addr.to_string(), i, names.clone()));
    }
    for c in &paused.nbd.connections {
        offer.nbd_connections.push(handover::NbdConnection {
            export: c.export.clone(),
            fd: att.fd(c.fd.try_clone().map_err(io)?),
            tcp: c.tcp,
            structured: c.structured,
            block_status: c.block_status,
            leftover: att.blob(c.leftover.clone()),
        });
    }
    for (name, conns) in &paused.devices {
        let mut v = Vec::new();
        for (fd, leftover) in conns {
            v.push((
                att.fd(fd.try_clone().map_err(io)?),
                att.blob(leftover.clone()),
            ));
        }
        offer.nbd_devices.push((name.clone(), v));
    }
    for (name, frozen) in &paused.vhost {
        let mut idx = Vec::new();
        for fd in &frozen.fds {
            idx.push(att.fd(fd.try_clone().map_err(io)?));
        }
        offer.vhost.push((name.clone(), frozen.state.clone(), idx));
    }
    Ok((offer, att))
}

/// Sends the offer; waits for Prepared (everything adopted, nothing served yet).
async fn offer_exchange(
    sock: &mut std::os::unix::net::UnixStream,
    mut offer: Offer,
    att: Attachments,
    timeout: Duration,
) -> Result<u32, String> {
    let mut s = sock.try_clone().map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || {
        handover::send_offer(&mut s, &mut offer, &att)?;
        handover::read_json::<Answer>(&mut s)
    })
    .await
    .map_err(|e| format!("the hand-over thread failed: {e}"))?
    .map_err(|e| io_reason(e, timeout))
    .and_then(|a| match a {
        Answer::Prepared { pid } => Ok(pid),
        Answer::Abort { reason } => Err(format!("the new nebd-server refused: {reason}")),
        _ => Err("the new nebd-server answered out of turn".into()),
    })
}

/// Tells the new process to serve; waits for it to say it does (the pause it measured, µs).
async fn commit_exchange(
    mut sock: std::os::unix::net::UnixStream,
    timeout: Duration,
) -> Result<u64, String> {
    tokio::task::spawn_blocking(move || {
        handover::write_json(&mut sock, &handover::Commit { serve: true })?;
        let answer: Answer = handover::read_json(&mut sock)?;
        // The socket stays open until we exit: the new process reads EOF then.
        std::mem::forget(sock);
        Ok::<_, std::io::Error>(answer)
    })
    .await
    .map_err(|e| format!("the hand-over thread failed: {e}"))?
    .map_err(|e| io_reason(e, timeout))
    .and_then(|a| match a {
        Answer::Serving { pause_us } => Ok(pause_us),
        _ => Err("the new nebd-server answered out of turn".into()),
    })
}

/// Whether `pid` still runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

async fn kill_and_wait(pid: u32) {
    if pid == 0 || pid == std::process::id() {
        return;
    }
    // SAFETY: kill(2) of the process that asked to take over (identified by SO_PEERCRED).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The new side: takes the running server's place (`nebd-server --takeover`).
pub(crate) async fn take(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let socket = nebd_control::control_socket(&config.run_dir);
    let mut sock = std::os::unix::net::UnixStream::connect(&socket).with_context(|| {
        format!(
            "no nebd-server to take over at {} (start without --takeover)",
            socket.display()
        )
    })?;
    sock.set_read_timeout(Some(config.takeover_timeout))?;
    std::io::Write::write_all(&mut sock, b"{\"op\":\"takeover\"}\n")?;
    let t = Instant::now();
    let preview = tokio::task::block_in_place(|| handover::recv_preview(&mut sock))
        .context("receiving the running nebd-server's offer (its preview)")?;
    let old_pid = preview.old_pid;
    // Before the pause: every volume the metafile names is opened (the sessions continued).
    let meta = match prepare(&config, preview) {
        Ok(m) => m,
        Err(reason) => abort(&mut sock, reason),
    };
    tracing::info!(took = ?t.elapsed(), "volumes open: ready for the offer");
    handover::write_json(&mut sock, &Answer::Ready)?;
    let (mut offer, mut rec) = tokio::task::block_in_place(|| handover::recv_offer(&mut sock))
        .context("receiving the running nebd-server's offer")?;
    tracing::info!(
        fds = offer.fds,
        blobs = offer.blobs,
        waited = ?t.elapsed(),
        "received the offer"
    );
    failpoint("takeover-offer-received");
    let stop = tokio_util::sync::CancellationToken::new();
    let adopted = if std::env::var("NEBD_FAILPOINT").is_ok_and(|v| v == "takeover-abort") {
        Err("failpoint takeover-abort".to_owned())
    } else {
        adopt(config, meta, &mut offer, &mut rec, stop.clone()).await
    };
    let state = match adopted {
        Ok(s) => s,
        Err(reason) => abort(&mut sock, reason),
    };
    failpoint("takeover-before-prepared");
    handover::write_json(
        &mut sock,
        &Answer::Prepared {
            pid: std::process::id(),
        },
    )?;
    // Nothing is served until the old process says so: if it resumes instead (it kills us
    // first), no byte of any consumer was read here.
    let commit: handover::Commit =
        tokio::task::block_in_place(|| handover::read_json(&mut sock))
            .context("waiting for the old nebd-server to commit the hand-over")?;
    if !commit.serve {
        anyhow::bail!("the old nebd-server did not commit the hand-over");
    }
    state.exports.start_adopted().await;
    state.resume_sockets();
    let pause_us = handover::now_us().saturating_sub(offer.paused_at_us);
    tracing::info!(old_pid, pause_us, took = ?t.elapsed(), "took over: serving");
    // From here on this process serves whatever happens: if the old one cannot hear us, it
    // has exited already.
    if let Err(e) = handover::write_json(&mut sock, &Answer::Serving { pause_us }) {
        tracing::warn!(error = %e, "cannot answer the old nebd-server");
    }
    // The old one exits once it has our answer: its end of the socket closes then.
    let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
    let gone = tokio::task::spawn_blocking(move || {
        let mut b = [0u8; 1];
        matches!(sock.read(&mut b), Ok(0))
    })
    .await
    .unwrap_or(false);
    if !gone {
        tracing::warn!(old_pid, "the old nebd-server did not exit in 30 s");
    }
    if let Err(e) = state.lock.write_pid() {
        tracing::error!(error = %e, "cannot write the pid file");
    }
    state.exports.restore_ublk().await;
    crate::volume::drop_preopened();
    if let Err(e) = crate::daemon::serve_metrics(&state).await {
        tracing::error!(error = %e, "cannot serve metrics");
    }
    sd_notify("READY=1");
    tracing::info!(run_dir = %state.config.run_dir.display(), pid = std::process::id(), "nebd-server started (took over)");
    crate::daemon::serve_until(&state, &stop, shutdown).await;
    Ok(())
}

/// Refuses the hand-over and leaves without closing anything: the sessions and sockets stay
/// the old process's.
fn abort(sock: &mut std::os::unix::net::UnixStream, reason: String) -> ! {
    tracing::error!(%reason, "cannot take over; the old nebd-server resumes");
    let _ = handover::write_json(sock, &Answer::Abort { reason });
    std::process::exit(1);
}

/// Before the pause: the run dir's modes and identity, the metafile, and every volume it names
/// opened (cluster volumes continuing the old process's sessions).
fn prepare(config: &Config, preview: handover::Preview) -> Result<Arc<Metafile>, String> {
    crate::daemon::prepare_run_dir(config).map_err(|e| e.to_string())?;
    crate::volume::adopt_sessions(preview.sessions);
    let meta = Arc::new(Metafile::open(&config.run_dir).map_err(|e| e.to_string())?);
    let state = meta.state();
    tokio::task::block_in_place(|| {
        for e in &state.exports {
            let spec: crate::volume::VolumeSpec = e.volume.parse().map_err(|e| format!("{e}"))?;
            crate::volume::preopen(&spec, e.read_only)
                .map_err(|err| format!("{}: {}", e.name, crate::exports::error_chain(&err)))?;
        }
        for f in &state.files {
            // A file that does not open stays recorded, closed (as on a restart).
            if let Ok(spec) = f.name.parse::<crate::volume::VolumeSpec>() {
                let _ = crate::volume::preopen(&spec, false);
            }
        }
        Ok::<_, String>(())
    })?;
    Ok(meta)
}

/// Builds this process from an offer: lock, listeners, files, exports; serving.
async fn adopt(
    config: Config,
    meta: Arc<Metafile>,
    offer: &mut Offer,
    rec: &mut handover::Received,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Arc<State>, String> {
    let io = |e: std::io::Error| e.to_string();
    let t = Instant::now();
    let lock = RunDirLock::adopt(rec.fd(offer.lock).map_err(io)?, &config.run_dir);
    let control = std::os::unix::net::UnixListener::from(rec.fd(offer.control).map_err(io)?);
    let part1 = std::os::unix::net::UnixListener::from(rec.fd(offer.part1).map_err(io)?);
    let files = Arc::new(tokio::task::block_in_place(|| {
        FileManager::restore(meta.clone())
    }));
    let files_at = t.elapsed();
    let exports = ExportManager::new(Some(meta)).with_socket_group(config.socket_group);
    exports.adopt(offer, rec).await?;
    let exports_at = t.elapsed();
    let parts = crate::daemon::Parts {
        config,
        lock,
        control,
        part1,
        files,
        exports,
    };
    let state = crate::daemon::start(parts, stop, true).map_err(|e| e.to_string())?;
    tracing::info!(?files_at, ?exports_at, ready_at = ?t.elapsed(), "adopted the offer");
    Ok(state)
}
