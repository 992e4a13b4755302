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
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use curve_blockdev::exec::Notifier;
use curve_blockdev::queue::{self, QueueSource, RequestFuture};
use curve_blockdev::{BlockDevice, WriteFlags, ZeroFlags};

use crate::inflight::{Inflight, QueueInflight};
use crate::memory::GuestMemory;
use crate::protocol::{self, Message, ProtoError, req};
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
const PF_MQ: u64 = 1 << 0;
const PF_REPLY_ACK: u64 = 1 << 3;
const PF_CONFIG: u64 = 1 << 9;
const PF_INFLIGHT: u64 = 1 << 12;
const PF_ALL: u64 = PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_INFLIGHT;

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
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Server {
    /// Serves `device` at `path` (replacing a stale socket file).
    pub fn start(
        path: &Path,
        device: Arc<dyn BlockDevice>,
        opts: Options,
    ) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-blk".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s2.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    // One front-end at a time: a reconnecting QEMU comes after the old one left.
                    let mut c = Connection::new(device.clone(), opts.clone());
                    match c.serve(&conn) {
                        Ok(()) => tracing::info!("vhost-user front-end disconnected"),
                        Err(e) => tracing::warn!(error = %e, "vhost-user connection ended"),
                    }
                    c.stop_all();
                }
            })?;
        Ok(Server {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

#[derive(Default)]
struct QueueSetup {
    num: u16,
    base: u16,
    addr: Option<protocol::VringAddr>,
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

struct Connection {
    device: Arc<dyn BlockDevice>,
    opts: Options,
    features: u64,
    protocol_features: u64,
    mem: Option<Arc<GuestMemory>>,
    inflight: Option<Arc<Inflight>>,
    queues: HashMap<u32, QueueSetup>,
}

impl Connection {
    fn new(device: Arc<dyn BlockDevice>, opts: Options) -> Self {
        Connection {
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

    fn serve(&mut self, sock: &UnixStream) -> Result<(), ProtoError> {
        loop {
            let msg = match protocol::recv(sock) {
                Ok(m) => m,
                Err(ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let request = msg.request;
            // Requests that answer anyway are not acknowledged as well; on failure they still
            // get an (empty) answer so that the front-end never waits forever.
            let answers = matches!(
                request,
                req::GET_FEATURES
                    | req::GET_PROTOCOL_FEATURES
                    | req::GET_QUEUE_NUM
                    | req::GET_VRING_BASE
                    | req::GET_CONFIG
                    | req::GET_INFLIGHT_FD
            );
            let need_ack = !answers
                && msg.flags & protocol::NEED_REPLY != 0
                && self.protocol_features & PF_REPLY_ACK != 0;
            let r = self.handle(sock, msg);
            if answers && matches!(r, Err(ProtoError::Bad(_))) {
                protocol::reply(sock, request, &[], &[])?;
            }
            if need_ack {
                let code: u64 = if r.is_ok() { 0 } else { 1 };
                protocol::reply(sock, request, &code.to_le_bytes(), &[])?;
            }
            if let Err(e) = r {
                tracing::warn!(request, error = %e, "vhost-user request refused");
                if matches!(e, ProtoError::Io(_)) {
                    return Err(e);
                }
            }
        }
    }

    fn queue(&mut self, index: u32) -> Result<&mut QueueSetup, ProtoError> {
        if index >= u32::from(self.opts.queues) {
            return Err(ProtoError::Bad(format!(
                "queue {index} of {}",
                self.opts.queues
            )));
        }
        Ok(self.queues.entry(index).or_default())
    }

    fn handle(&mut self, sock: &UnixStream, mut msg: Message) -> Result<(), ProtoError> {
        let p = &msg.payload;
        match msg.request {
            req::GET_FEATURES => {
                protocol::reply(sock, req::GET_FEATURES, &self.offered().to_le_bytes(), &[])?
            }
            req::SET_FEATURES => {
                let f = protocol::parse_u64(p)?;
                if f & !self.offered() != 0 {
                    return Err(ProtoError::Bad(format!("features {f:#x} were not offered")));
                }
                self.features = f;
            }
            req::GET_PROTOCOL_FEATURES => {
                let pf = PF_ALL;
                protocol::reply(sock, req::GET_PROTOCOL_FEATURES, &pf.to_le_bytes(), &[])?;
            }
            req::SET_PROTOCOL_FEATURES => {
                self.protocol_features = protocol::parse_u64(p)? & PF_ALL;
            }
            req::GET_QUEUE_NUM => {
                protocol::reply(
                    sock,
                    req::GET_QUEUE_NUM,
                    &u64::from(self.opts.queues).to_le_bytes(),
                    &[],
                )?;
            }
            req::SET_OWNER => {}
            req::RESET_OWNER => self.stop_all(),
            req::SET_MEM_TABLE => {
                let regions = protocol::parse_mem_table(p)?;
                let mem = GuestMemory::map(&regions, &msg.fds)?;
                // Running queues move to the new table: stopped (in-flight requests finish),
                // then started again on it.
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
            }
            req::SET_LOG_BASE | req::SET_LOG_FD => {
                return Err(ProtoError::Bad("dirty logging is not supported".into()));
            }
            req::SET_VRING_NUM => {
                let (i, n) = protocol::parse_state(p)?;
                if n == 0 || n > 32768 || !n.is_power_of_two() {
                    return Err(ProtoError::Bad(format!("ring size {n}")));
                }
                self.queue(i)?.num = n as u16;
            }
            req::SET_VRING_BASE => {
                let (i, b) = protocol::parse_state(p)?;
                self.queue(i)?.base = b as u16;
            }
            req::SET_VRING_ADDR => {
                let a = protocol::parse_addr(p)?;
                self.queue(a.index)?.addr = Some(a);
            }
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
                let v = protocol::parse_u64(p)?;
                let i = (v & 0xff) as u32;
                let nofd = v & 0x100 != 0;
                let fd = if nofd { None } else { msg.fds.pop() };
                let kind = msg.request;
                // A running queue picks new descriptors up by restarting (QEMU swaps the call
                // fd when the guest masks interrupts).
                let was_running = self.stop_queue(i)?;
                let q = self.queue(i)?;
                match kind {
                    req::SET_VRING_KICK => q.kick = fd,
                    req::SET_VRING_CALL => q.call = fd.map(Arc::new),
                    _ => {}
                }
                if kind == req::SET_VRING_KICK && self.features & F_PROTOCOL_FEATURES == 0 {
                    // Without protocol features a ring starts when it gets its kick.
                    self.queue(i)?.enabled = true;
                }
                if kind == req::SET_VRING_KICK || was_running {
                    self.maybe_start(i)?;
                }
            }
            req::SET_VRING_ENABLE => {
                let (i, on) = protocol::parse_state(p)?;
                if on != 1 {
                    self.stop_queue(i)?;
                }
                self.queue(i)?.enabled = on == 1;
                if on == 1 {
                    self.maybe_start(i)?;
                }
            }
            req::GET_VRING_BASE => {
                let (i, _) = protocol::parse_state(p)?;
                self.stop_queue(i)?;
                let q = self.queue(i)?;
                q.kick = None;
                q.enabled = false;
                let base = q.base;
                protocol::reply(
                    sock,
                    req::GET_VRING_BASE,
                    &[&i.to_le_bytes()[..], &u32::from(base).to_le_bytes()].concat(),
                    &[],
                )?;
            }
            req::GET_CONFIG => {
                let (off, size) = protocol::parse_config(p)?;
                let c = self.config();
                let mut out = p[..12.min(p.len())].to_vec();
                out.resize(12, 0);
                let end = (off as usize).saturating_add(size as usize);
                if end > c.len() {
                    return Err(ProtoError::Bad(format!("config {off}+{size}")));
                }
                out.extend_from_slice(&c[off as usize..end]);
                protocol::reply(sock, req::GET_CONFIG, &out, &[])?;
            }
            req::SET_CONFIG => {} // writeback cache toggles: our devices acknowledge writes durably
            req::GET_INFLIGHT_FD => {
                let (_, _, queues, size) = protocol::parse_inflight(p)?;
                let buf = Inflight::create(queues, size)?;
                let answer = protocol::encode_inflight(buf.len() as u64, 0, queues, size);
                protocol::reply(sock, req::GET_INFLIGHT_FD, &answer, &[buf.fd().as_raw_fd()])?;
                self.inflight = Some(Arc::new(buf));
            }
            req::SET_INFLIGHT_FD => {
                let (size, offset, queues, qsize) = protocol::parse_inflight(p)?;
                let fd = msg.fds.pop().ok_or_else(|| {
                    ProtoError::Bad("SET_INFLIGHT_FD without a descriptor".into())
                })?;
                let buf = Inflight::map(fd, size as usize, offset, queues, qsize)?;
                self.inflight = Some(Arc::new(buf));
            }
            other => return Err(ProtoError::Bad(format!("request {other} is not supported"))),
        }
        Ok(())
    }

    /// Stops a queue's worker (its in-flight requests finish first); returns whether it ran.
    fn stop_queue(&mut self, i: u32) -> Result<bool, ProtoError> {
        let q = self.queue(i)?;
        let Some(w) = q.worker.take() else {
            return Ok(false);
        };
        w.notifier.cancel();
        match w.thread.join() {
            Ok(base) => q.base = base,
            Err(_) => return Err(ProtoError::Bad(format!("queue {i}: its worker panicked"))),
        }
        Ok(true)
    }

    fn maybe_start(&mut self, i: u32) -> Result<(), ProtoError> {
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
        let (Some(mem), Some(addr), Some(kick), Some(call)) =
            (mem, q.addr, q.kick.as_ref(), q.call.clone())
        else {
            return Ok(());
        };
        let vring = Vring::new(
            mem, q.num, addr.desc, addr.avail, addr.used, q.base, event_idx,
        )
        .ok_or_else(|| ProtoError::Bad(format!("queue {i}: rings outside guest memory")))?;
        let tracker = inflight.and_then(|b| QueueInflight::new(b, i as u16, q.num));
        let tracked = tracker.is_some();
        let kick = kick.try_clone()?;
        let notifier = Notifier::new()?;
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
            })?;
        q.worker = Some(Worker { notifier, thread });
        tracing::info!(
            queue = i,
            inflight_tracking = tracked,
            "vhost-user queue started"
        );
        Ok(())
    }

    fn stop_all(&mut self) {
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
            self.vring.last_avail = used.wrapping_add(replay.len() as u16);
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
        self.vring.last_avail
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

    /// Parses the chain at `head` and returns its execution, or answers it at once.
    fn take(&mut self, head: u16) -> Option<Exec> {
        let mem = self.vring.memory().clone();
        let Some(chain) = self.vring.chain(head) else {
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
            while let Some(head) = self.vring.pop() {
                moved = true;
                if let Some(t) = self.tracker.as_mut() {
                    t.take(head);
                }
                match self.take(head) {
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
async fn execute(
    device: &dyn BlockDevice,
    mem: &GuestMemory,
    r: &Request,
    serial: &str,
) -> (u8, u32) {
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
                let mut buf = Vec::with_capacity(bytes);
                for seg in &r.segs {
                    match mem.read(seg.addr, seg.len as usize) {
                        Some(d) => buf.extend(d),
                        None => return (s::IOERR, 0),
                    }
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
