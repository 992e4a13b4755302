//! Listeners, exports and connections: the part of the NBD frontend that does I/O.
//!
//! ```text
//!  NbdServer ── one Listener per address (unix:PATH | tcp:HOST:PORT)
//!                 │  its ExportTable: name -> Export (several exports may share a socket)
//!                 └─ accept ─> negotiation task (control runtime, 30 s limit)
//!                                └─ GO / EXPORT_NAME ─> a thread with its own
//!                                   single-threaded runtime serves transmission
//! ```
//!
//! Removing an export cancels its connections (they finish what is in flight and close);
//! removing the last export of a listener closes the listener and unlinks its socket.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use curve_blockdev::BlockDevice;
use parking_lot::RwLock;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::conn::{Connection, Parked};
use crate::negotiate::{ExportSummary, Exports, Negotiation, Outcome};
use crate::proto::{self, tflag};
use crate::request::Limits;
use crate::stream::{StdStream, Stream};
use curve_blockdev::exec::Notifier;

/// How long a client may take to negotiate.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest read or write we accept (the limit the NBD spec recommends clients respect).
pub const MAX_BLOCK: u32 = 32 << 20;

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/curve/nbd.sock".into());
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            use std::net::ToSocketAddrs;
            let a = addr
                .to_socket_addrs()
                .map_err(|e| format!("bad TCP address {addr:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("TCP address {addr:?} resolves to nothing"))?;
            Ok(ListenAddr::Tcp(a))
        } else {
            Err(format!(
                "bad NBD address {s:?}: expected unix:PATH or tcp:HOST:PORT"
            ))
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl ListenAddr {
    /// The NBD URI (as nbdinfo, qemu and fio take it) of export `name` at this address.
    pub fn uri(&self, name: &str) -> String {
        match self {
            ListenAddr::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            ListenAddr::Tcp(a) => format!("nbd://{a}/{name}"),
        }
    }
}

/// Errors of export management.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the listener failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address.
        addr: ListenAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process serves the socket path.
    #[error("{0} is in use by another server")]
    InUse(ListenAddr),
    /// Something other than a socket is at the path (never replaced).
    #[error("{0}: the path exists and is not a socket (left alone)")]
    NotASocket(ListenAddr),
    /// The name is taken.
    #[error("an export named {0:?} already exists")]
    Exists(String),
    /// No export with this name.
    #[error("no export named {0:?}")]
    NotFound(String),
}

/// A volume offered under a name.
#[derive(Debug)]
pub struct Export {
    name: String,
    description: String,
    device: Arc<dyn BlockDevice>,
    read_only: bool,
    cancel: CancellationToken,
    connections: AtomicUsize,
}

impl Export {
    /// An export of `device` under `name`.
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> Arc<Self> {
        Arc::new(Export {
            name: name.into(),
            description: description.into(),
            read_only: read_only || device.info().read_only,
            device,
            cancel: CancellationToken::new(),
            connections: AtomicUsize::new(0),
        })
    }

    /// Export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The device it serves.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// Connections in transmission now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn summary(&self) -> ExportSummary {
        let info = self.device.info();
        let mut flags = tflag::HAS_FLAGS
            | tflag::SEND_FLUSH
            | tflag::SEND_FUA
            | tflag::CAN_MULTI_CONN
            | tflag::SEND_CACHE;
        if self.read_only {
            flags |= tflag::READ_ONLY;
        } else {
            flags |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
        }
        let min_block = info.alignment.max(1);
        ExportSummary {
            name: self.name.clone(),
            description: self.description.clone(),
            size: info.size,
            flags,
            min_block,
            preferred_block: info.optimal_io_size.max(min_block),
            max_block: info.max_io_size.clamp(min_block, MAX_BLOCK),
            refused: self.refusal(),
        }
    }

    /// Why a new connection may not start now: this export at [`MAX_CONNECTIONS_PER_EXPORT`],
    /// or the server at [`max_connections`] (file descriptors run out past it, and with them
    /// every other socket of the process).
    fn refusal(&self) -> Option<String> {
        let mine = self.connections();
        let all = LIVE_CONNECTIONS.load(Ordering::Relaxed);
        if mine >= MAX_CONNECTIONS_PER_EXPORT {
            Some(format!(
                "export {:?} has {mine} connections, its limit: close some first",
                self.name
            ))
        } else if all >= max_connections() {
            Some(format!(
                "the server has {all} NBD connections, its limit for its open-file limit: \
                 close some first"
            ))
        } else {
            None
        }
    }
}

/// Connections in transmission one export takes at most.
pub const MAX_CONNECTIONS_PER_EXPORT: usize = 64;

/// Connections in transmission now, every export of every server of this process.
static LIVE_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Connections in transmission the process takes at most: a quarter of its open-file limit
/// (a connection holds a socket and an eventfd; chunk connections, files and the control
/// socket need the rest), at least 16.
pub fn max_connections() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit with a pointer to a local struct.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0 {
            l.rlim_cur
        } else {
            1024
        };
        (soft / 4).clamp(16, 1 << 20) as usize
    })
}

type ExportTable = RwLock<HashMap<String, Arc<Export>>>;

struct TableView<'a>(&'a HashMap<String, Arc<Export>>);

impl Exports for TableView<'_> {
    type Export = Arc<Export>;

    fn find(&self, name: &str) -> Option<(Arc<Export>, ExportSummary)> {
        let e = match self.0.get(name) {
            Some(e) => e,
            // The default export "" is the only export, when there is exactly one.
            None if name.is_empty() && self.0.len() == 1 => self.0.values().next()?,
            None => return None,
        };
        Some((e.clone(), e.summary()))
    }

    fn list(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .0
            .values()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect();
        v.sort();
        v
    }
}

struct Listener {
    table: Arc<ExportTable>,
    /// Ends the listener's connections (and its accept loop).
    cancel: CancellationToken,
    /// Ends the accept loop only (a hand-over pauses accepting).
    accepting: CancellationToken,
    /// The listening socket (a duplicate: the accept loop owns another).
    sock: OwnedFd,
}

/// A connection parked for a hand-over to another process (see [`NbdServer::pause`]).
#[derive(Debug)]
pub struct ParkedConnection {
    /// The export it transmits on.
    pub export: String,
    /// Its socket.
    pub fd: OwnedFd,
    /// TCP (else a Unix socket).
    pub tcp: bool,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` negotiated.
    pub block_status: bool,
    /// Bytes read and not yet consumed as requests.
    pub leftover: Vec<u8>,
}

impl ParkedConnection {
    fn new(export: &str, p: Parked<StdStream>) -> Self {
        let (fd, tcp) = match p.stream {
            StdStream::Unix(s) => (OwnedFd::from(s), false),
            StdStream::Tcp(s) => (OwnedFd::from(s), true),
        };
        ParkedConnection {
            export: export.to_owned(),
            fd,
            tcp,
            structured: p.structured,
            block_status: p.block_status,
            leftover: p.leftover,
        }
    }
}

/// A paused NBD server: its listening sockets (not accepting; clients queue in the backlog)
/// and its connections, parked between requests.
#[derive(Debug, Default)]
pub struct Paused {
    /// Each listening socket (a duplicate; the server keeps its own) and its exports.
    pub listeners: Vec<(ListenAddr, OwnedFd, Vec<String>)>,
    /// Every connection that was in transmission.
    pub connections: Vec<ParkedConnection>,
}

/// Connections in transmission, for a hand-over.
#[derive(Debug, Default)]
struct Live {
    /// A pause is under way: connections that start transmission now park at once.
    pausing: std::sync::atomic::AtomicBool,
    notifiers: parking_lot::Mutex<Vec<Arc<Notifier>>>,
    parked: parking_lot::Mutex<Vec<ParkedConnection>>,
}

/// The NBD server of one process: its listeners and their exports.
#[derive(Debug)]
pub struct NbdServer {
    inner: tokio::sync::Mutex<HashMap<ListenAddr, Listener>>,
    shutdown: CancellationToken,
    threads: Arc<AtomicUsize>,
    live: Arc<Live>,
    /// Listeners added now do not accept until [`resume`](Self::resume) (a process taking
    /// over, before the hand-over commits).
    held: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("exports", &self.table.read().len())
            .finish()
    }
}

impl Default for NbdServer {
    fn default() -> Self {
        Self::new()
    }
}

impl NbdServer {
    /// A server with no listeners. Call from within a tokio runtime.
    pub fn new() -> Self {
        NbdServer {
            inner: Default::default(),
            shutdown: CancellationToken::new(),
            threads: Arc::new(AtomicUsize::new(0)),
            live: Arc::default(),
            held: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Listeners added from now on wait for [`resume`](Self::resume) before they accept.
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Offers `export` at `addr`, binding the address if no export uses it yet.
    pub async fn add_export(
        &self,
        addr: &ListenAddr,
        export: Arc<Export>,
    ) -> Result<(), ServerError> {
        self.add_export_on(addr, export, None).await
    }

    /// [`add_export`](Self::add_export) on `listening`, a socket already bound to `addr` (handed
    /// over by the previous process), when no export uses the address yet.
    pub async fn add_export_on(
        &self,
        addr: &ListenAddr,
        export: Arc<Export>,
        listening: Option<OwnedFd>,
    ) -> Result<(), ServerError> {
        let mut listeners = self.inner.lock().await;
        for l in listeners.values() {
            if l.table.read().contains_key(&export.name) {
                return Err(ServerError::Exists(export.name.clone()));
            }
        }
        if let Some(l) = listeners.get(addr) {
            l.table.write().insert(export.name.clone(), export);
            return Ok(());
        }
        let table = Arc::new(RwLock::new(HashMap::from([(export.name.clone(), export)])));
        let cancel = self.shutdown.child_token();
        let sock = match listening {
            Some(fd) => fd,
            None => bind(addr).await?,
        };
        let listener = Listener {
            accepting: cancel.child_token(),
            table,
            cancel,
            sock,
        };
        if self.held.load(Ordering::SeqCst) {
            listener.accepting.cancel();
        } else {
            self.spawn_listener(addr, &listener)?;
        }
        listeners.insert(addr.clone(), listener);
        Ok(())
    }

    /// Pauses every listener and parks every connection between requests (in-flight
    /// requests are finished and answered first), for a hand-over. Fails, resuming what it
    /// paused, if a connection does not stop within `timeout`.
    pub async fn pause(&self, timeout: Duration) -> Result<Paused, String> {
        let listeners = self.inner.lock().await;
        for l in listeners.values() {
            l.accepting.cancel();
        }
        self.live.pausing.store(true, Ordering::SeqCst);
        for n in self.live.notifiers.lock().iter() {
            n.hand_over();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while self.threads.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() > deadline {
                drop(listeners);
                let n = self.threads.load(Ordering::Acquire);
                let parked = std::mem::take(&mut *self.live.parked.lock());
                self.resume(Paused {
                    listeners: Vec::new(),
                    connections: parked,
                })
                .await;
                return Err(format!(
                    "{n} NBD connections did not finish their requests within {timeout:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut paused = Paused {
            connections: std::mem::take(&mut *self.live.parked.lock()),
            ..Default::default()
        };
        for (addr, l) in listeners.iter() {
            let fd = l.sock.try_clone().map_err(|e| format!("{addr}: {e}"))?;
            let mut names: Vec<String> = l.table.read().keys().cloned().collect();
            names.sort();
            paused.listeners.push((addr.clone(), fd, names));
        }
        Ok(paused)
    }

    /// Serves again what [`pause`](Self::pause) stopped (a hand-over that failed): the
    /// listeners accept, the parked connections go on from where they stopped.
    pub async fn resume(&self, paused: Paused) {
        self.live.pausing.store(false, Ordering::SeqCst);
        self.held.store(false, Ordering::SeqCst);
        {
            let mut listeners = self.inner.lock().await;
            for (addr, l) in listeners.iter_mut() {
                if !l.accepting.is_cancelled() {
                    continue;
                }
                l.accepting = l.cancel.child_token();
                if let Err(e) = self.spawn_listener(addr, l) {
                    tracing::error!(%addr, error = %e, "cannot accept again");
                }
            }
        }
        for c in paused.connections {
            if let Err(e) = self.adopt_connection(c).await {
                tracing::error!(error = %e, "cannot serve a parked connection again");
            }
        }
    }

    /// Serves a connection parked by another process (or by [`pause`](Self::pause)) on its
    /// export, from the request it stopped before.
    pub async fn adopt_connection(&self, c: ParkedConnection) -> Result<(), String> {
        let listeners = self.inner.lock().await;
        let found = listeners.values().find_map(|l| {
            let e = l.table.read().get(&c.export).cloned()?;
            Some((e, l.cancel.clone()))
        });
        let Some((export, cancel)) = found else {
            return Err(format!("no export named {:?}", c.export));
        };
        let stream = if c.tcp {
            StdStream::Tcp(std::net::TcpStream::from(c.fd))
        } else {
            StdStream::Unix(std::os::unix::net::UnixStream::from(c.fd))
        };
        let t = Transmission {
            export,
            structured: c.structured,
            block_status: c.block_status,
            leftover: c.leftover,
        };
        spawn_transmission(stream, t, cancel, self.threads.clone(), self.live.clone());
        Ok(())
    }

    /// Withdraws an export: its connections finish their in-flight requests and close.
    pub async fn remove_export(&self, name: &str) -> Result<(), ServerError> {
        let mut listeners = self.inner.lock().await;
        let mut emptied = None;
        let mut found = false;
        for (addr, l) in listeners.iter() {
            let mut table = l.table.write();
            if let Some(e) = table.remove(name) {
                e.cancel.cancel();
                found = true;
                if table.is_empty() {
                    emptied = Some(addr.clone());
                }
                break;
            }
        }
        if !found {
            return Err(ServerError::NotFound(name.to_owned()));
        }
        if let Some(addr) = emptied {
            if let Some(l) = listeners.remove(&addr) {
                l.cancel.cancel();
            }
            if let ListenAddr::Unix(path) = &addr {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// Closes every listener and connection; waits up to `grace` for connections to finish
    /// what they have in flight.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.cancel();
        let listeners = std::mem::take(&mut *self.inner.lock().await);
        for (addr, _) in listeners {
            if let ListenAddr::Unix(path) = &addr {
                let _ = std::fs::remove_file(path);
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        while self.threads.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn spawn_listener(&self, addr: &ListenAddr, l: &Listener) -> Result<(), ServerError> {
        let bind_err = |source| ServerError::Bind {
            addr: addr.clone(),
            source,
        };
        let fd = l.sock.try_clone().map_err(bind_err)?;
        let (table, cancel, accepting) = (l.table.clone(), l.cancel.clone(), l.accepting.clone());
        let (threads, live) = (self.threads.clone(), self.live.clone());
        match addr {
            ListenAddr::Unix(_) => {
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true).map_err(bind_err)?;
                let listener = UnixListener::from_std(std).map_err(bind_err)?;
                tokio::spawn(async move {
                    loop {
                        let accepted = tokio::select! {
                            _ = accepting.cancelled() => break,
                            a = listener.accept() => a,
                        };
                        match accepted {
                            Ok((s, _)) => spawn_negotiation(
                                Stream::Unix(s),
                                table.clone(),
                                cancel.clone(),
                                threads.clone(),
                                live.clone(),
                            ),
                            Err(e) => {
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
            }
            ListenAddr::Tcp(_) => {
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true).map_err(bind_err)?;
                let listener = TcpListener::from_std(std).map_err(bind_err)?;
                tokio::spawn(async move {
                    loop {
                        let accepted = tokio::select! {
                            _ = accepting.cancelled() => break,
                            a = listener.accept() => a,
                        };
                        match accepted {
                            Ok((s, _)) => {
                                let _ = s.set_nodelay(true);
                                spawn_negotiation(
                                    Stream::Tcp(s),
                                    table.clone(),
                                    cancel.clone(),
                                    threads.clone(),
                                    live.clone(),
                                )
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
            }
        }
        tracing::info!(%addr, "NBD listener started");
        Ok(())
    }
}

/// Binds `addr` (a stale Unix socket file left by a killed server is replaced).
async fn bind(addr: &ListenAddr) -> Result<OwnedFd, ServerError> {
    let bind_err = |source| ServerError::Bind {
        addr: addr.clone(),
        source,
    };
    match addr {
        ListenAddr::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                // Only a socket is ever replaced: anything else at the path is the user's.
                if !meta.file_type().is_socket() {
                    return Err(ServerError::NotASocket(addr.clone()));
                }
                // A live server answers; a stale socket left by a killed one refuses.
                if tokio::net::UnixStream::connect(path).await.is_ok() {
                    return Err(ServerError::InUse(addr.clone()));
                }
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            let l = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
            Ok(OwnedFd::from(l))
        }
        ListenAddr::Tcp(sa) => {
            let l = TcpListener::bind(sa).await.map_err(bind_err)?;
            Ok(OwnedFd::from(l.into_std().map_err(bind_err)?))
        }
    }
}

fn spawn_negotiation(
    stream: Stream,
    table: Arc<ExportTable>,
    cancel: CancellationToken,
    threads: Arc<AtomicUsize>,
    live: Arc<Live>,
) {
    tokio::spawn(async move {
        let negotiated = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(NEGOTIATION_TIMEOUT, negotiate(stream, &table)) => r,
        };
        let (stream, t) = match negotiated {
            Ok(Ok(Some(x))) => x,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "negotiation ended");
                return;
            }
            Err(_) => {
                tracing::info!("client did not finish negotiating in time");
                return;
            }
        };
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot detach connection");
                return;
            }
        };
        let t = Transmission {
            export: t.export,
            structured: t.structured,
            block_status: t.base_allocation,
            leftover: Vec::new(),
        };
        spawn_transmission(std_stream, t, cancel, threads, live);
    });
}

/// What a connection in transmission works with.
struct Transmission {
    export: Arc<Export>,
    structured: bool,
    block_status: bool,
    /// Bytes to parse before reading the socket (a connection handed over).
    leftover: Vec<u8>,
}

/// Serves a connection in transmission on a thread of its own.
fn spawn_transmission(
    std_stream: StdStream,
    t: Transmission,
    cancel: CancellationToken,
    threads: Arc<AtomicUsize>,
    live: Arc<Live>,
) {
    let notifier = match Notifier::new() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot create a connection eventfd");
            return;
        }
    };
    // Forward the listener's and the export's cancellation to the connection thread;
    // `finished` retires this watcher when the connection ends on its own.
    let finished = CancellationToken::new();
    let export_cancel = t.export.cancel.clone();
    tokio::spawn({
        let notifier = notifier.clone();
        let finished = finished.clone();
        async move {
            tokio::select! {
                _ = cancel.cancelled() => notifier.cancel(),
                _ = export_cancel.cancelled() => notifier.cancel(),
                _ = finished.cancelled() => {}
            }
        }
    });
    threads.fetch_add(1, Ordering::AcqRel);
    {
        // A connection that finished negotiating during a pause parks at once (see `pause`).
        let mut live_notifiers = live.notifiers.lock();
        live_notifiers.push(notifier.clone());
        if live.pausing.load(Ordering::SeqCst) {
            notifier.hand_over();
        }
    }
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-{}", t.export.name))
        .spawn({
            let threads = threads.clone();
            let finished = finished.clone();
            let live = live.clone();
            let notifier = notifier.clone();
            move || {
                let name = t.export.name.clone();
                if let Some(p) = transmit(std_stream, t, notifier.clone()) {
                    live.parked.lock().push(ParkedConnection::new(&name, p));
                }
                live.notifiers.lock().retain(|n| !Arc::ptr_eq(n, &notifier));
                finished.cancel();
                threads.fetch_sub(1, Ordering::AcqRel);
            }
        });
    if let Err(e) = spawned {
        live.notifiers.lock().retain(|n| !Arc::ptr_eq(n, &notifier));
        finished.cancel();
        threads.fetch_sub(1, Ordering::AcqRel);
        tracing::error!(error = %e, "cannot start a connection thread");
    }
}

type Negotiated = (Stream, crate::negotiate::Transmission<Arc<Export>>);

/// Runs negotiation on `stream`: `Ok(None)` when the client ended it without transmission.
async fn negotiate(
    mut stream: Stream,
    table: &ExportTable,
) -> Result<Option<Negotiated>, std::io::Error> {
    let mut out = Vec::with_capacity(256);
    proto::encode_greeting(&mut out);
    stream.write_all(&out).await?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).await?;
    let flags = proto::parse_client_flags(flags).map_err(invalid)?;
    let mut n = Negotiation::new(flags);
    let mut data = Vec::new();
    loop {
        let mut h = [0u8; proto::OPTION_HEADER_LEN];
        stream.read_exact(&mut h).await?;
        let header = proto::parse_option_header(&h).map_err(invalid)?;
        data.resize(header.len as usize, 0);
        stream.read_exact(&mut data).await?;
        out.clear();
        let outcome = {
            let table = table.read();
            n.handle(header.option, &data, &TableView(&table), &mut out)
        };
        stream.write_all(&out).await?;
        match outcome {
            Outcome::Continue => {}
            Outcome::Close => return Ok(None),
            Outcome::Transmit(t) => return Ok(Some((stream, t))),
        }
    }
}

fn invalid(e: proto::ProtoError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

fn transmit(
    stream: StdStream,
    t: Transmission,
    notifier: Arc<Notifier>,
) -> Option<Parked<StdStream>> {
    curve_blockdev::exec::batch_scheduling();
    let export = t.export;
    export.connections.fetch_add(1, Ordering::Relaxed);
    LIVE_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    let summary = export.summary();
    let limits = Limits {
        size: summary.size,
        min_block: summary.min_block,
        max_block: summary.max_block,
        read_only: export.read_only,
        block_status: t.block_status,
    };
    tracing::debug!(export = %export.name, structured = t.structured, "transmission started");
    let conn = Connection::resume(
        stream,
        export.device.as_ref(),
        limits,
        t.structured,
        &t.leftover,
    );
    let parked = match conn.serve(&notifier) {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(export = %export.name, error = %e, "connection closed");
            None
        }
    };
    export.connections.fetch_sub(1, Ordering::Relaxed);
    LIVE_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    parked
}

/// Serves one socket the kernel's NBD driver holds the other end of: transmission from the
/// first byte (the handshake is implied by NBD_CMD_CONNECT), simple replies only. `leftover`:
/// bytes a previous process read from it (a hand-over). Returns the connection parked when
/// stopped for a hand-over.
pub(crate) fn serve_kernel_connection(
    export: &Export,
    stream: std::os::unix::net::UnixStream,
    leftover: &[u8],
    notifier: &Arc<Notifier>,
) -> Option<Parked<StdStream>> {
    curve_blockdev::exec::batch_scheduling();
    let summary = export.summary();
    export.connections.fetch_add(1, Ordering::Relaxed);
    LIVE_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    let limits = Limits {
        size: summary.size,
        min_block: summary.min_block,
        max_block: summary.max_block,
        read_only: export.read_only,
        block_status: false,
    };
    let conn = Connection::resume(
        StdStream::Unix(stream),
        export.device.as_ref(),
        limits,
        false,
        leftover,
    );
    let parked = match conn.serve(notifier) {
        Ok(p) => {
            tracing::debug!(export = %export.name, parked = p.is_some(), "kernel connection stopped");
            p
        }
        Err(e) => {
            tracing::info!(export = %export.name, error = %e, "kernel connection closed");
            None
        }
    };
    export.connections.fetch_sub(1, Ordering::Relaxed);
    LIVE_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    parked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a: ListenAddr = "unix:/tmp/x.sock".parse().unwrap();
        assert_eq!(a.to_string(), "unix:/tmp/x.sock");
        assert_eq!(a.uri("vol"), "nbd+unix:///vol?socket=/tmp/x.sock");
        let t: ListenAddr = "tcp:127.0.0.1:10809".parse().unwrap();
        assert_eq!(t.uri("vol"), "nbd://127.0.0.1:10809/vol");
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("http://x".parse::<ListenAddr>().is_err());
        assert!("tcp:nohost".parse::<ListenAddr>().is_err());
    }
}
