//! The vhost-user-blk back-end: a listener on a Unix socket; one front-end (QEMU, a driver)
//! at a time; its control messages set up guest memory and queues; a worker thread per
//! started queue takes requests, runs them on the block device and completes them.
//!
//! ```text
//!  listener ── accept ── control loop (messages) ── start/stop ── worker per queue
//!                                                                   kick eventfd -> pop chains
//!                                                                   -> parse -> BlockDevice
//!                                                                   -> status, used, call
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use curve_blockdev::exec::Notifier;
use curve_blockdev::queue::{self, QueueSource, RequestFuture};
use curve_blockdev::{BlockDevice, WriteFlags, ZeroFlags};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend as BackendReq, BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};

use crate::Error;
use crate::inflight::{Inflight, QueueInflight};
use crate::memory::{MemRegion, Memory};
use crate::request::{self, Kind, Limits, Request, s};
use crate::virtq::Vring;

const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;
const F_INDIRECT_DESC: u64 = 1 << 28;
const BLK_F_SIZE_MAX: u64 = 1 << 1;
const BLK_F_SEG_MAX: u64 = 1 << 2;
const BLK_F_RO: u64 = 1 << 5;
const BLK_F_BLK_SIZE: u64 = 1 << 6;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_F_TOPOLOGY: u64 = 1 << 10;
const BLK_F_MQ: u64 = 1 << 12;
const BLK_F_DISCARD: u64 = 1 << 13;
const BLK_F_WRITE_ZEROES: u64 = 1 << 14;

fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Data segments per request (seg_max): what fits QEMU's default 128-entry ring with the
/// header and status descriptors, for drivers without indirect descriptors (Linux does not
/// cap its chains by the ring size and would wait forever for room).
const SEG_MAX: u32 = 126;
/// Bytes per segment (size_max). SEG_MAX × SIZE_MAX bounds a request (8 MiB, what one request
/// may bounce through the back-end's buffer). SeaBIOS divides that product by the block size
/// into a u16 and loops forever on zero-length reads when it overflows (≥ 32 MiB at 512-byte
/// blocks): keep it well below.
const SIZE_MAX: u32 = 64 << 10;

/// How an export behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Queues offered.
    pub queues: u16,
    /// Refuse writes.
    pub read_only: bool,
    /// The id GET_ID returns (up to 20 bytes).
    pub serial: String,
}

/// A served export: stops (and removes its socket) on drop.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    ctl: Arc<Notifier>,
    cmds: std::sync::mpsc::Sender<Cmd>,
    paused: std::sync::mpsc::Receiver<Result<Frozen, Error>>,
    thread: Option<JoinHandle<()>>,
}

enum Cmd {
    /// Stop accepting and handling messages, freeze the queues, answer with [`Frozen`].
    Pause,
    /// Serve again after a pause (a hand-over that failed).
    Resume,
    /// End the thread and its connection.
    Stop,
}

/// A back-end frozen for a hand-over to another process: the listening socket, and the
/// connected front-end (if any) with everything negotiated on it. Descriptors are in `fds`;
/// the state refers to them by index.
#[derive(Debug)]
pub struct Frozen {
    /// What was negotiated.
    pub state: FrozenState,
    /// The listening socket, then the descriptors `state` names.
    pub fds: Vec<OwnedFd>,
}

/// The negotiated state of a frozen back-end (fds by index into [`Frozen::fds`]).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FrozenState {
    /// The connected front-end, if any.
    pub conn: Option<FrozenConn>,
}

/// One front-end connection, frozen.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FrozenConn {
    /// Its socket.
    pub sock: usize,
    /// Virtio features acked.
    pub features: u64,
    /// Protocol features acked.
    pub protocol_features: u64,
    /// Guest memory regions, and each one's descriptor.
    pub regions: Vec<(MemRegion, usize)>,
    /// The inflight buffer: (descriptor, size, offset, queues, queue size).
    pub inflight: Option<(usize, usize, u64, u16, u16)>,
    /// The queues.
    pub queues: Vec<FrozenQueue>,
}

/// One queue, frozen (its worker stopped, everything taken answered).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FrozenQueue {
    /// Index.
    pub index: u32,
    /// Ring size.
    pub num: u16,
    /// Next available index to take.
    pub base: u16,
    /// Ring addresses (desc, used, avail) in front-end virtual addresses.
    pub addr: Option<(u64, u64, u64)>,
    /// Kick eventfd.
    pub kick: Option<usize>,
    /// Call eventfd.
    pub call: Option<usize>,
    /// Enabled.
    pub enabled: bool,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Stop);
        self.ctl.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Server {
    /// Serves `device` at `path` (replacing a stale socket file; anything else at the path is
    /// refused, never deleted).
    pub fn start(
        path: &Path,
        device: Arc<dyn BlockDevice>,
        opts: Options,
    ) -> std::io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "{}: the path exists and is not a socket (left alone)",
                        path.display()
                    ),
                ));
            }
            // A live server answers; a stale socket left by a killed one refuses.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "{}: another server is listening on this socket (left alone)",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        Self::spawn(path, listener, None, device, opts, false)
    }

    /// Takes what another process froze (see [`Server::pause`]): its listening socket, and
    /// its front-end with everything negotiated (guest memory mapped here at once). Paused:
    /// nothing is served until [`resume`](Self::resume) (the hand-over commits); then it goes
    /// on from where the other process stopped. The front-end sees nothing happen.
    pub fn adopt(
        path: &Path,
        frozen: Frozen,
        device: Arc<dyn BlockDevice>,
        opts: Options,
    ) -> Result<Self, Error> {
        let mut fds: Vec<Option<OwnedFd>> = frozen.fds.into_iter().map(Some).collect();
        let listener = fds
            .first_mut()
            .and_then(Option::take)
            .ok_or_else(|| Error::Bad("no listening socket".into()))?;
        let conn = match frozen.state.conn {
            Some(c) => Some(Backend::thaw_from(
                device.clone(),
                opts.clone(),
                &c,
                &mut fds,
            )?),
            None => None,
        };
        Ok(Self::spawn(
            path,
            UnixListener::from(listener),
            conn,
            device,
            opts,
            true,
        )?)
    }

    fn spawn(
        path: &Path,
        listener: UnixListener,
        conn: Option<(UnixStream, Backend)>,
        device: Arc<dyn BlockDevice>,
        opts: Options,
        start_paused: bool,
    ) -> std::io::Result<Self> {
        let ctl = Notifier::new()?;
        let (cmds, cmd_rx) = std::sync::mpsc::channel();
        let (paused_tx, paused) = std::sync::mpsc::channel();
        let ctl2 = ctl.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-blk".into())
            .spawn(move || {
                let mut l = Loop {
                    listener,
                    device,
                    opts,
                    conn: None,
                    ctl: ctl2,
                    cmds: cmd_rx,
                    paused: paused_tx,
                };
                if let Some((sock, backend)) = conn {
                    l.connect(sock, backend);
                }
                l.run(start_paused);
            })?;
        Ok(Server {
            path: path.to_owned(),
            ctl,
            cmds,
            paused,
            thread: Some(thread),
        })
    }

    /// Freezes the export for a hand-over: no new front-end is accepted, no message handled;
    /// every queue stops once what it took is answered. Returns duplicates of everything the
    /// next process needs. [`resume`](Self::resume) undoes it.
    pub fn pause(&self) -> Result<Frozen, Error> {
        self.cmds
            .send(Cmd::Pause)
            .map_err(|_| Error::Bad("the vhost-user thread ended".into()))?;
        self.ctl.notify();
        self.paused
            .recv()
            .map_err(|_| Error::Bad("the vhost-user thread ended".into()))?
    }

    /// Serves again after [`pause`](Self::pause).
    pub fn resume(&self) {
        let _ = self.cmds.send(Cmd::Resume);
        self.ctl.notify();
    }
}

/// The thread of one export: accepts a front-end, handles its messages.
struct Loop {
    listener: UnixListener,
    device: Arc<dyn BlockDevice>,
    opts: Options,
    conn: Option<Conn>,
    ctl: Arc<Notifier>,
    cmds: std::sync::mpsc::Receiver<Cmd>,
    paused: std::sync::mpsc::Sender<Result<Frozen, Error>>,
}

struct Conn {
    /// A duplicate of the socket the handler owns (polled here, handed over).
    sock: UnixStream,
    backend: Arc<Mutex<Backend>>,
    handler: BackendReqHandler<Mutex<Backend>>,
}

impl Loop {
    fn connect(&mut self, sock: UnixStream, backend: Backend) {
        let Ok(dup) = sock.try_clone() else {
            tracing::warn!("cannot duplicate the front-end socket");
            return;
        };
        let backend = Arc::new(Mutex::new(backend));
        let handler = BackendReqHandler::from_stream(sock, backend.clone());
        self.conn = Some(Conn {
            sock: dup,
            backend,
            handler,
        });
    }

    fn disconnect(&mut self) {
        if let Some(c) = self.conn.take() {
            c.backend
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stop_all();
        }
    }

    fn run(&mut self, mut paused: bool) {
        loop {
            let watched = match (&self.conn, paused) {
                (_, true) => None,
                (Some(c), false) => Some(c.sock.as_raw_fd()),
                (None, false) => Some(self.listener.as_raw_fd()),
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.ctl.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: watched.unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll on two pollfds we own, for as long as it takes.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                continue; // EINTR
            }
            if fds[0].revents != 0 {
                self.ctl.reset();
                while let Ok(cmd) = self.cmds.try_recv() {
                    match cmd {
                        Cmd::Pause => {
                            paused = true;
                            let frozen = self.freeze();
                            let _ = self.paused.send(frozen);
                        }
                        Cmd::Resume => {
                            paused = false;
                            if let Some(c) = &self.conn {
                                c.backend.lock().unwrap_or_else(|p| p.into_inner()).thaw();
                            }
                            tracing::info!("vhost-user export resumed");
                        }
                        Cmd::Stop => {
                            self.disconnect();
                            return;
                        }
                    }
                }
                continue;
            }
            if fds[1].revents == 0 || paused {
                continue;
            }
            if self.conn.is_none() {
                match self.listener.accept() {
                    // One front-end at a time: a reconnecting QEMU comes after the old one left.
                    Ok((sock, _)) => {
                        tracing::info!("vhost-user front-end connected");
                        let backend = Backend::new(self.device.clone(), self.opts.clone());
                        self.connect(sock, backend);
                    }
                    Err(e) => tracing::warn!(error = %e, "vhost-user accept failed"),
                }
                continue;
            }
            let Some(c) = self.conn.as_mut() else {
                continue;
            };
            match c.handler.handle_request() {
                Ok(()) => {}
                Err(VuError::Disconnected) | Err(VuError::PartialMessage) => {
                    tracing::info!("vhost-user front-end disconnected");
                    self.disconnect();
                }
                Err(e @ (VuError::SocketBroken(_) | VuError::SocketError(_))) => {
                    tracing::warn!(error = %e, "vhost-user connection ended");
                    self.disconnect();
                }
                Err(e) => tracing::warn!(error = %e, "vhost-user request refused"),
            }
        }
    }

    fn freeze(&mut self) -> Result<Frozen, Error> {
        let mut fds = vec![OwnedFd::from(self.listener.try_clone()?)];
        let mut state = FrozenState::default();
        if let Some(c) = &self.conn {
            fds.push(OwnedFd::from(c.sock.try_clone()?));
            let mut b = c.backend.lock().unwrap_or_else(|p| p.into_inner());
            state.conn = Some(b.freeze(&mut fds)?);
        }
        tracing::info!(
            connected = state.conn.is_some(),
            "vhost-user export frozen for a hand-over"
        );
        Ok(Frozen { state, fds })
    }
}

#[derive(Default)]
struct QueueSetup {
    num: u16,
    base: u16,
    addr: Option<(u64, u64, u64)>,
    kick: Option<OwnedFd>,
    call: Option<Arc<OwnedFd>>,
    enabled: bool,
    worker: Option<Worker>,
}

struct Worker {
    /// Cancelled to stop the worker (its in-flight requests finish first).
    notifier: Arc<Notifier>,
    thread: JoinHandle<u16>,
}

/// The back-end of one front-end connection: what it negotiated, guest memory, the queues.
pub struct Backend {
    device: Arc<dyn BlockDevice>,
    opts: Options,
    features: u64,
    protocol_features: u64,
    mem: Option<Arc<Memory>>,
    inflight: Option<Arc<Inflight>>,
    queues: HashMap<u32, QueueSetup>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("opts", &self.opts)
            .field("features", &self.features)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

fn refuse(msg: impl Into<String>) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(msg.into()))
}

impl From<Error> for VuError {
    fn from(e: Error) -> Self {
        refuse(e.to_string())
    }
}

impl Backend {
    /// A back-end of `device`.
    pub fn new(device: Arc<dyn BlockDevice>, opts: Options) -> Self {
        Backend {
            device,
            opts,
            features: 0,
            protocol_features: 0,
            mem: None,
            inflight: None,
            queues: HashMap::new(),
        }
    }

    fn offered(&self) -> u64 {
        let info = self.device.info();
        let mut f = F_VERSION_1
            | F_PROTOCOL_FEATURES
            | F_EVENT_IDX
            | F_INDIRECT_DESC
            | BLK_F_SIZE_MAX
            | BLK_F_SEG_MAX
            | BLK_F_BLK_SIZE
            | BLK_F_FLUSH
            | BLK_F_TOPOLOGY
            | BLK_F_MQ
            | BLK_F_WRITE_ZEROES;
        if info.can_discard {
            f |= BLK_F_DISCARD;
        }
        if self.opts.read_only || info.read_only {
            f |= BLK_F_RO;
        }
        f
    }

    fn config(&self) -> [u8; 60] {
        let info = self.device.info();
        let mut c = [0u8; 60];
        let bs = info.block_size.max(512);
        c[0..8].copy_from_slice(&(info.size / 512).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&bs.to_le_bytes());
        let opt = (info.optimal_io_size / bs).max(1);
        c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size, in blocks
        c[28..32].copy_from_slice(&opt.to_le_bytes());
        c[34..36].copy_from_slice(&self.opts.queues.to_le_bytes());
        let max_sectors = max_zero_sectors(info);
        c[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&(bs / 512).to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    fn queue(&mut self, index: u32) -> VuResult<&mut QueueSetup> {
        if index >= u32::from(self.opts.queues) {
            return Err(refuse(format!("queue {index} of {}", self.opts.queues)));
        }
        Ok(self.queues.entry(index).or_default())
    }

    /// Kick, call or err descriptor of queue `index`: a running queue picks new descriptors
    /// up by restarting (QEMU swaps the call fd when the guest masks interrupts).
    fn set_vring_fd(&mut self, kind: FdKind, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = u32::from(index);
        let was_running = self.stop_queue(i)?;
        let q = self.queue(i)?;
        match kind {
            FdKind::Kick => q.kick = fd.map(OwnedFd::from),
            FdKind::Call => q.call = fd.map(|f| Arc::new(OwnedFd::from(f))),
            FdKind::Err => {}
        }
        if kind == FdKind::Kick && self.features & F_PROTOCOL_FEATURES == 0 {
            // Without protocol features a ring starts when it gets its kick.
            self.queue(i)?.enabled = true;
        }
        if kind == FdKind::Kick || was_running {
            self.maybe_start(i)?;
        }
        Ok(())
    }

    /// Stops a queue's worker (its in-flight requests finish first); returns whether it ran.
    fn stop_queue(&mut self, i: u32) -> VuResult<bool> {
        let q = self.queue(i)?;
        let Some(w) = q.worker.take() else {
            return Ok(false);
        };
        w.notifier.cancel();
        match w.thread.join() {
            Ok(base) => q.base = base,
            Err(_) => return Err(refuse(format!("queue {i}: its worker panicked"))),
        }
        Ok(true)
    }

    fn maybe_start(&mut self, i: u32) -> VuResult<()> {
        let mem = self.mem.clone();
        let inflight = self.inflight.clone();
        let event_idx = self.features & F_EVENT_IDX != 0;
        let read_only = self.opts.read_only || self.device.info().read_only;
        let device = self.device.clone();
        let serial = self.opts.serial.clone();
        let q = self.queue(i)?;
        if q.worker.is_some() || !q.enabled {
            return Ok(());
        }
        let (Some(mem), Some((desc, used, avail)), Some(kick), Some(call)) =
            (mem, q.addr, q.kick.as_ref(), q.call.clone())
        else {
            return Ok(());
        };
        let vring = Vring::new(mem, q.num, desc, avail, used, q.base, event_idx)
            .ok_or_else(|| refuse(format!("queue {i}: rings outside guest memory")))?;
        let tracker = inflight.and_then(|b| QueueInflight::new(b, i as u16, q.num));
        let tracked = tracker.is_some();
        let kick = kick.try_clone().map_err(VuError::SocketError)?;
        let notifier = Notifier::new().map_err(VuError::SocketError)?;
        let info = device.info().clone();
        let limits = Limits {
            capacity: info.size,
            block_size: info.block_size.max(512),
            max_bytes: u64::from(SEG_MAX) * u64::from(SIZE_MAX),
            max_segs: SEG_MAX as usize,
            max_zero_bytes: u64::from(max_zero_sectors(&info)) * 512,
            read_only,
        };
        let n2 = notifier.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-blk-q{i}"))
            .spawn(move || {
                let mut w = QueueWorker {
                    vring,
                    tracker,
                    device,
                    limits,
                    serial,
                    kick,
                    call,
                    notifier: n2,
                    replay: Vec::new(),
                    used_unsignalled: false,
                };
                w.run()
            })
            .map_err(VuError::SocketError)?;
        q.worker = Some(Worker { notifier, thread });
        tracing::info!(
            queue = i,
            inflight_tracking = tracked,
            "vhost-user queue started"
        );
        Ok(())
    }

    /// Stops every queue (what each took is answered first) and describes the connection for
    /// another process: descriptors are appended to `fds`. [`thaw`](Self::thaw) restarts
    /// the queues here.
    fn freeze(&mut self, fds: &mut Vec<OwnedFd>) -> Result<FrozenConn, Error> {
        let sock = fds.len() - 1;
        let running: Vec<u32> = self.queues.keys().copied().collect();
        for i in running {
            self.stop_queue(i).map_err(|e| Error::Bad(e.to_string()))?;
        }
        let mut c = FrozenConn {
            sock,
            features: self.features,
            protocol_features: self.protocol_features,
            ..Default::default()
        };
        if let Some(mem) = &self.mem {
            for (r, f) in mem.regions().iter().zip(mem.files()?) {
                fds.push(OwnedFd::from(f));
                c.regions.push((*r, fds.len() - 1));
            }
        }
        if let Some(b) = &self.inflight {
            fds.push(OwnedFd::from(b.file().try_clone()?));
            c.inflight = Some((fds.len() - 1, b.len(), b.offset(), b.queues, b.queue_size));
        }
        let mut indices: Vec<u32> = self.queues.keys().copied().collect();
        indices.sort();
        for i in indices {
            let q = &self.queues[&i];
            let mut dup = |fd: Option<&OwnedFd>| -> Result<Option<usize>, Error> {
                Ok(match fd {
                    Some(f) => {
                        fds.push(f.try_clone()?);
                        Some(fds.len() - 1)
                    }
                    None => None,
                })
            };
            let kick = dup(q.kick.as_ref())?;
            let call = dup(q.call.as_deref())?;
            c.queues.push(FrozenQueue {
                index: i,
                num: q.num,
                base: q.base,
                addr: q.addr,
                kick,
                call,
                enabled: q.enabled,
            });
        }
        Ok(c)
    }

    /// Starts every queue that can run (after [`freeze`](Self::freeze), or on adoption).
    fn thaw(&mut self) {
        let indices: Vec<u32> = self.queues.keys().copied().collect();
        for i in indices {
            if let Err(e) = self.maybe_start(i) {
                tracing::error!(queue = i, error = %e, "cannot restart a queue");
            }
        }
    }

    /// The back-end of a connection another process froze, its queues stopped.
    fn thaw_from(
        device: Arc<dyn BlockDevice>,
        opts: Options,
        c: &FrozenConn,
        fds: &mut [Option<OwnedFd>],
    ) -> Result<(UnixStream, Backend), Error> {
        let mut take = |i: usize| {
            fds.get_mut(i)
                .and_then(Option::take)
                .ok_or_else(|| Error::Bad(format!("descriptor {i} missing or used twice")))
        };
        let sock = UnixStream::from(take(c.sock)?);
        let mut b = Backend::new(device, opts);
        b.features = c.features;
        b.protocol_features = c.protocol_features;
        if !c.regions.is_empty() {
            let regions: Vec<MemRegion> = c.regions.iter().map(|(r, _)| *r).collect();
            let mut files = Vec::new();
            for (_, i) in &c.regions {
                files.push(File::from(take(*i)?));
            }
            b.mem = Some(Arc::new(Memory::map(&regions, files)?));
        }
        if let Some((i, len, offset, queues, size)) = c.inflight {
            let f = File::from(take(i)?);
            b.inflight = Some(Arc::new(Inflight::map(f, len, offset, queues, size)?));
        }
        for q in &c.queues {
            let kick = match q.kick {
                Some(i) => Some(take(i)?),
                None => None,
            };
            let call = match q.call {
                Some(i) => Some(Arc::new(take(i)?)),
                None => None,
            };
            let setup = b.queue(q.index).map_err(|e| Error::Bad(e.to_string()))?;
            setup.num = q.num;
            setup.base = q.base;
            setup.addr = q.addr;
            setup.kick = kick;
            setup.call = call;
            setup.enabled = q.enabled;
        }
        b.thaw();
        tracing::info!(queues = c.queues.len(), "vhost-user front-end taken over");
        Ok((sock, b))
    }

    /// Stops every queue (their in-flight requests finish) and forgets guest memory.
    pub fn stop_all(&mut self) {
        for q in self.queues.values_mut() {
            if let Some(w) = q.worker.take() {
                w.notifier.cancel();
                let _ = w.thread.join();
            }
        }
        self.queues.clear();
        self.mem = None;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FdKind {
    Kick,
    Call,
    Err,
}

/// The vhost-user requests, as the `vhost` crate decodes them.
impl VhostUserBackendReqHandlerMut for Backend {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.stop_all();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_all();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.offered() != 0 {
            return Err(refuse(format!("features {features:#x} were not offered")));
        }
        self.features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<vhost::VhostUserMemoryRegionBase>>> {
        let regions: Vec<MemRegion> = ctx
            .iter()
            .map(|r| MemRegion {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                uaddr: r.user_addr,
                offset: r.mmap_offset,
            })
            .collect();
        let mem = Memory::map(&regions, files)?;
        // Running queues move to the new table: stopped (in-flight requests finish), then
        // started again on it.
        let running: Vec<u32> = self
            .queues
            .iter()
            .filter(|(_, q)| q.worker.is_some())
            .map(|(i, _)| *i)
            .collect();
        for i in &running {
            self.stop_queue(*i)?;
        }
        self.mem = Some(Arc::new(mem));
        for i in running {
            self.maybe_start(i)?;
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > 32768 || !num.is_power_of_two() {
            return Err(refuse(format!("ring size {num}")));
        }
        self.queue(index)?.num = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.queue(index)?.addr = Some((descriptor, used, available));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.queue(index)?.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.stop_queue(index)?;
        let q = self.queue(index)?;
        q.kick = None;
        q.enabled = false;
        Ok(VhostUserVringState::new(index, u32::from(q.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.set_vring_fd(FdKind::Kick, index, fd)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.set_vring_fd(FdKind::Call, index, fd)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.set_vring_fd(FdKind::Err, index, fd)
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.protocol_features = features & protocol_features().bits();
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.opts.queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if !enable {
            self.stop_queue(index)?;
        }
        self.queue(index)?.enabled = enable;
        if enable {
            self.maybe_start(index)?;
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let c = self.config();
        let end = (offset as usize).saturating_add(size as usize);
        if end > c.len() {
            return Err(refuse(format!("config {offset}+{size}")));
        }
        Ok(c[offset as usize..end].to_vec())
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Write-back cache toggles: our devices acknowledge writes durably.
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _backend: BackendReq) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(refuse("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(refuse("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let buf = Inflight::create(inflight.num_queues, inflight.queue_size)?;
        let answer = VhostUserInflight {
            mmap_size: buf.len() as u64,
            mmap_offset: 0,
            num_queues: inflight.num_queues,
            queue_size: inflight.queue_size,
        };
        let file = buf.file().try_clone().map_err(VuError::SocketError)?;
        self.inflight = Some(Arc::new(buf));
        Ok((answer, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let buf = Inflight::map(
            file,
            inflight.mmap_size as usize,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )?;
        self.inflight = Some(Arc::new(buf));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(refuse("memory slots are not supported"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<vhost::VhostUserMemoryRegionBase>> {
        Err(refuse("memory slots are not supported"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(refuse("memory slots are not supported"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(refuse("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(refuse("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(refuse("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(refuse("dirty logging is not supported"))
    }
}

/// max_discard_sectors and max_write_zeroes_sectors: the device's largest I/O.
fn max_zero_sectors(info: &curve_blockdev::DeviceInfo) -> u32 {
    (info.max_io_size / 512).max(8)
}

type Done = (u16, Request, u8, u32);
type Exec = RequestFuture<'static, Done>;

struct QueueWorker {
    vring: Vring,
    tracker: Option<QueueInflight>,
    device: Arc<dyn BlockDevice>,
    limits: Limits,
    serial: String,
    kick: OwnedFd,
    call: Arc<OwnedFd>,
    notifier: Arc<Notifier>,
    /// Requests a restarted back-end resubmits before it takes new ones.
    replay: Vec<Exec>,
    /// Used elements published since the last call signal.
    used_unsignalled: bool,
}

fn drain(fd: RawFd) {
    let mut b = [0u8; 8];
    // SAFETY: a non-blocking-or-not 8-byte read of an eventfd we hold.
    unsafe { libc::read(fd, b.as_mut_ptr().cast(), 8) };
}

impl QueueWorker {
    fn run(&mut self) -> u16 {
        // A restarted back-end: what the previous one took and did not complete runs first,
        // in the order it was taken; the ring resumes after it.
        if let Some(t) = self.tracker.as_mut() {
            let used = self.vring.used_idx();
            let replay = t.recover(used);
            if !replay.is_empty() {
                tracing::info!(requests = replay.len(), "resubmitting inflight requests");
            }
            self.vring
                .set_last_avail(used.wrapping_add(replay.len() as u16));
            for head in replay {
                if let Some(f) = self.take(head) {
                    self.replay.push(f);
                }
            }
        }
        // A (re)started queue interrupts once: completions its predecessor published without
        // signalling them are seen.
        self.signal();
        let notifier = self.notifier.clone();
        if let Err(e) = queue::serve(self, &notifier, usize::MAX) {
            tracing::warn!(error = %e, "vhost-user queue worker failed");
        }
        self.vring.last_avail()
    }

    fn signal(&self) {
        let one = 1u64.to_le_bytes();
        // SAFETY: signalling the call eventfd we hold.
        unsafe { libc::write(self.call.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    fn complete(&mut self, head: u16, r: &Request, status: u8, written: u32) {
        let len = if self.vring.memory().write(r.status, &[status]) {
            written + 1
        } else {
            0
        };
        self.used(head, len);
    }

    /// Publishes a used element, keeping the inflight buffer in step.
    fn used(&mut self, head: u16, len: u32) {
        if let Some(t) = self.tracker.as_mut() {
            t.completing(head);
        }
        self.vring.push_used(head, len);
        if let Some(t) = self.tracker.as_mut() {
            t.completed(head, self.vring.used_idx());
        }
    }

    /// Parses the chain at `head` (walked here when not given) and returns its execution, or
    /// answers it at once.
    fn take(&mut self, head: u16) -> Option<Exec> {
        let chain = self.vring.chain(head);
        self.take_chain(head, chain)
    }

    fn take_chain(&mut self, head: u16, chain: Option<Vec<crate::request::Desc>>) -> Option<Exec> {
        let mem = self.vring.memory().clone();
        let Some(chain) = chain else {
            tracing::warn!(head, "malformed descriptor chain");
            self.used(head, 0);
            return None;
        };
        let r = match request::parse(&chain, &self.limits, |a, l| mem.read(a, l)) {
            Ok(r) => r,
            Err(e) => {
                match e.status_addr {
                    Some(a) if mem.write(a, &[e.status]) => self.used(head, 1),
                    _ => self.used(head, 0),
                }
                return None;
            }
        };
        let device = self.device.clone();
        let serial = self.serial.clone();
        Some(Box::pin(async move {
            let (status, written) = execute(&*device, &mem, &r, &serial).await;
            (head, r, status, written)
        }))
    }
}

/// A virtqueue on the frontends' one queue loop: requests are popped from the avail ring
/// (kicks wake the thread), answers are used elements, signalled with one call per batch.
impl QueueSource<'static> for QueueWorker {
    type Done = Done;
    type Error = std::io::Error;

    fn take(&mut self, _room: usize, out: &mut Vec<Exec>) -> std::io::Result<bool> {
        // The ring's size bounds what the guest can have in flight.
        let mut moved = !self.replay.is_empty();
        out.append(&mut self.replay);
        loop {
            while let Some((head, chain)) = self.vring.pop() {
                moved = true;
                if let Some(t) = self.tracker.as_mut() {
                    t.take(head);
                }
                match self.take_chain(head, chain) {
                    Some(f) => out.push(f),
                    None => self.used_unsignalled = true,
                }
            }
            if !self.vring.arm() {
                break;
            }
        }
        Ok(moved)
    }

    fn complete(&mut self, (head, r, status, written): Done) {
        QueueWorker::complete(self, head, &r, status, written);
        self.used_unsignalled = true;
    }

    fn send(&mut self) -> std::io::Result<bool> {
        if std::mem::take(&mut self.used_unsignalled) && self.vring.needs_notify() {
            self.signal();
        }
        Ok(false)
    }

    fn finished(&self) -> bool {
        false
    }

    fn park(&mut self, notifier: &Notifier, want_requests: bool) -> std::io::Result<()> {
        // The kick eventfd may be blocking: it is read only when poll says it is ready.
        let mut fds = [
            libc::pollfd {
                fd: notifier.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let n = if want_requests { 2 } else { 1 };
        // SAFETY: poll on descriptors we hold.
        unsafe { libc::poll(fds.as_mut_ptr(), n, 1000) };
        if fds[0].revents != 0 {
            notifier.reset();
        }
        if fds[1].revents & libc::POLLIN != 0 {
            drain(self.kick.as_raw_fd());
        }
        Ok(())
    }
}

/// Runs one request against the device; returns its status and the bytes written to
/// device-writable buffers.
async fn execute(device: &dyn BlockDevice, mem: &Memory, r: &Request, serial: &str) -> (u8, u32) {
    let bytes: usize = r.segs.iter().map(|s| s.len as usize).sum();
    match &r.kind {
        Kind::Read { offset } => {
            // Through a buffer of our own: the guest may point two requests at the same memory,
            // so no Rust reference into guest memory is ever held across the device call.
            let mut buf = vec![0u8; bytes];
            if device.read(*offset, &mut buf).await.is_err() {
                return (s::IOERR, 0);
            }
            let mut at = 0;
            for seg in &r.segs {
                if !mem.write(seg.addr, &buf[at..at + seg.len as usize]) {
                    return (s::IOERR, 0);
                }
                at += seg.len as usize;
            }
            (s::OK, bytes as u32)
        }
        Kind::Write { offset } => {
            let flags = WriteFlags::default();
            let r = {
                let mut buf = vec![0u8; bytes];
                let mut at = 0;
                for seg in &r.segs {
                    let end = at + seg.len as usize;
                    if !mem.read_into(seg.addr, &mut buf[at..end]) {
                        return (s::IOERR, 0);
                    }
                    at = end;
                }
                device.write(*offset, &buf, flags).await
            };
            (if r.is_ok() { s::OK } else { s::IOERR }, 0)
        }
        Kind::Flush => (
            if device.flush().await.is_ok() {
                s::OK
            } else {
                s::IOERR
            },
            0,
        ),
        Kind::GetId => {
            let mut id = [0u8; 20];
            let n = serial.len().min(20);
            id[..n].copy_from_slice(&serial.as_bytes()[..n]);
            let seg = r.segs[0];
            let n = (seg.len as usize).min(20);
            (
                if mem.write(seg.addr, &id[..n]) {
                    s::OK
                } else {
                    s::IOERR
                },
                n as u32,
            )
        }
        Kind::Discard(ranges) => {
            for (o, l) in ranges {
                if device.discard(*o, *l).await.is_err() {
                    return (s::IOERR, 0);
                }
            }
            (s::OK, 0)
        }
        Kind::WriteZeroes(ranges) => {
            for (o, l, unmap) in ranges {
                let f = ZeroFlags {
                    may_unmap: *unmap,
                    ..Default::default()
                };
                if device.write_zeroes(*o, *l, f).await.is_err() {
                    return (s::IOERR, 0);
                }
            }
            (s::OK, 0)
        }
    }
}
