//! Kernel NBD devices (`/dev/nbdN`) that part2 attaches itself, the way rbd-nbd does: socket
//! pairs, one end served here (transmission only: the handshake is implied), the other ends
//! handed to the kernel with `NBD_CMD_CONNECT` over generic netlink.
//!
//! ```text
//!  KernelDevice::attach ── socketpair × N ── our ends: one thread each (conn.rs, simple replies)
//!        │                                 └ kernel ends: NBD_CMD_CONNECT {index?, size, block
//!        │                                   size, server flags, timeouts, backend cookie}
//!        └─ supervisor thread: a connection that ends while the device is ours (the kernel
//!           timed a request out and reset it, or a protocol error) gets a new socket pair
//!           through NBD_CMD_RECONFIGURE
//!  KernelDevice::reattach  (a restarted part2) checks /sys/block/nbdN/backend against the
//!           cookie and gives the kernel new sockets with NBD_CMD_RECONFIGURE
//!  KernelDevice::detach    NBD_CMD_DISCONNECT;  drop: the device is left to the kernel, which
//!           waits `reattach_timeout` for the next part2
//! ```
//!
//! Requests the kernel had sent on a socket that died are resent once they are `io_timeout`
//! old (the kernel's request timer); requests started after the death wait for the new sockets.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use curve_blockdev::exec::Notifier;
use parking_lot::Mutex;

use crate::netlink::{self, Reply, Request, ctrl, nbd};
use crate::server::Export;

/// A kernel NBD connection parked for a hand-over: our end of its socket pair and the bytes
/// read from it that no request consumed yet.
pub type ParkedSocket = (OwnedFd, Vec<u8>);

/// Most connections per device.
pub const MAX_CONNECTIONS: u16 = 16;

/// Errors of kernel NBD devices.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel has no `nbd` generic netlink family.
    #[error(
        "the kernel has no NBD driver (the nbd generic netlink family is missing): load it with `modprobe nbd`"
    )]
    NoDriver,
    /// Not a `/dev/nbdN` path.
    #[error("bad NBD device {0:?}: expected /dev/nbdN")]
    BadPath(String),
    /// The device is connected to something else.
    #[error("{0} is in use")]
    InUse(String),
    /// The device serves another backend (its cookie differs).
    #[error("{path} serves another backend ({found:?}, not {expected:?}): left alone")]
    NotOurs {
        /// Device.
        path: String,
        /// Its `/sys/block/nbdN/backend`.
        found: String,
        /// Ours.
        expected: String,
    },
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// The kernel refused a request.
    #[error("NBD netlink {what} failed")]
    Netlink {
        /// Which request.
        what: &'static str,
        /// errno.
        #[source]
        source: io::Error,
    },
    /// A socket could not be made.
    #[error("socket pair")]
    Socket(#[source] io::Error),
}

/// How a device is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Connections (socket pairs, each its own thread here; the kernel spreads requests).
    pub connections: u16,
    /// Seconds after which the kernel resends a request (0: never; it then waits for the
    /// answer however long it takes).
    pub io_timeout: u32,
    /// Seconds the kernel holds I/O once every connection is dead, waiting for new sockets.
    pub reattach_timeout: u32,
    /// Backend identifier (`/sys/block/nbdN/backend`): tells a restarted part2 the device is
    /// its own.
    pub cookie: String,
}

impl DeviceOptions {
    /// Checks the options.
    pub fn check(&self) -> Result<(), KernelError> {
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(KernelError::Options(format!(
                "{} connections: 1 to {MAX_CONNECTIONS}",
                self.connections
            )));
        }
        if self.cookie.is_empty() || self.cookie.len() > 255 {
            return Err(KernelError::Options("backend cookie: 1-255 bytes".into()));
        }
        Ok(())
    }
}

/// `/dev/nbdN` → N.
pub fn parse_device_path(path: &str) -> Result<u32, KernelError> {
    path.strip_prefix("/dev/nbd")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n.len() <= 6)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| KernelError::BadPath(path.to_owned()))
}

/// `/dev/nbdN`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

fn sys(index: u32, attr: &str) -> PathBuf {
    PathBuf::from(format!("/sys/block/nbd{index}/{attr}"))
}

/// Whether `/dev/nbdN` has a configuration (a `pid` while connected).
pub fn is_connected(index: u32) -> bool {
    sys(index, "pid").exists()
}

/// `/sys/block/nbdN/backend`, trimmed (empty when none was given).
pub fn backend_of(index: u32) -> Option<String> {
    std::fs::read_to_string(sys(index, "backend"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A generic netlink socket talking to the `nbd` family.
struct Netlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl Netlink {
    fn open() -> Result<Self, KernelError> {
        let err = |source| KernelError::Netlink {
            what: "socket",
            source,
        };
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A kernel that never answers must not hang part2.
        let tv = libc::timeval {
            tv_sec: 30,
            tv_usec: 0,
        };
        // SAFETY: tv outlives the call; the length is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        let mut nl = Netlink {
            fd,
            family: ctrl::ID,
            seq: 0,
        };
        let mut req = Request::new(ctrl::ID, ctrl::CMD_GETFAMILY, 1, nl.next_seq());
        req.string(ctrl::ATTR_FAMILY_NAME, nbd::FAMILY);
        let family = match nl.call(&mut req) {
            Ok(attrs) => netlink::attr_u16(&attrs, ctrl::ATTR_FAMILY_ID),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(KernelError::NoDriver),
            Err(source) => {
                return Err(KernelError::Netlink {
                    what: "family lookup",
                    source,
                });
            }
        };
        nl.family = family.ok_or(KernelError::NoDriver)?;
        Ok(nl)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn request(&mut self, cmd: u8) -> Request {
        let seq = self.next_seq();
        Request::new(self.family, cmd, nbd::VERSION, seq)
    }

    /// Sends `req` and waits for its acknowledgement; returns the attributes of the message
    /// the kernel answered with before it (empty if none).
    fn call(&mut self, req: &mut Request) -> io::Result<Vec<u8>> {
        let msg = req.finish();
        let seq = u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes"));
        // SAFETY: msg is a valid buffer of msg.len() bytes.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 64 << 10];
        let mut answer = Vec::new();
        loop {
            // SAFETY: buf is writable for buf.len() bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let replies = netlink::parse(&buf[..n as usize])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            for r in replies {
                match r {
                    Reply::Ack { seq: s } if s == seq => return Ok(answer),
                    Reply::Error { seq: s, errno } if s == seq => {
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                    Reply::Message { seq: s, attrs, .. } if s == seq => {
                        answer = attrs.to_vec();
                    }
                    _ => {}
                }
            }
        }
    }
}

fn sockets(req: &mut Request, fds: &[RawFd]) {
    req.begin_nested(nbd::ATTR_SOCKETS);
    for fd in fds {
        req.begin_nested(nbd::SOCK_ITEM)
            .u32(nbd::SOCK_FD, *fd as u32)
            .end_nested();
    }
    req.end_nested();
}

fn netlink_err(what: &'static str) -> impl FnOnce(io::Error) -> KernelError {
    move |source| KernelError::Netlink { what, source }
}

/// Checks that the kernel has the NBD driver.
pub fn check_driver() -> Result<(), KernelError> {
    Netlink::open().map(|_| ())
}

struct Shared {
    export: Arc<Export>,
    index: u32,
    opts: DeviceOptions,
    /// Detached or dropped: connections that end are not replaced.
    stopping: AtomicBool,
    /// One per live connection thread.
    notifiers: Mutex<Vec<Arc<Notifier>>>,
    /// Connections parked for a hand-over: their sockets and unconsumed bytes.
    parked: Mutex<Vec<(UnixStream, Vec<u8>)>>,
    ended: Mutex<Option<mpsc::Sender<()>>>,
}

/// A kernel NBD device this process serves.
pub struct KernelDevice {
    shared: Arc<Shared>,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDevice")
            .field("index", &self.shared.index)
            .field("opts", &self.shared.opts)
            .finish()
    }
}

impl KernelDevice {
    /// Attaches `export` to `/dev/nbd<index>` (or the first free device) with
    /// `NBD_CMD_CONNECT`.
    pub fn attach(
        export: Arc<Export>,
        index: Option<u32>,
        opts: &DeviceOptions,
    ) -> Result<KernelDevice, KernelError> {
        opts.check()?;
        let mut nl = Netlink::open()?;
        if let Some(i) = index
            && is_connected(i)
        {
            return Err(KernelError::InUse(device_path(i).display().to_string()));
        }
        let summary = export.summary();
        let (ours, theirs) = pairs(opts.connections)?;
        let mut req = nl.request(nbd::CMD_CONNECT);
        if let Some(i) = index {
            req.u32(nbd::ATTR_INDEX, i);
        }
        let block = summary.min_block.clamp(512, 4096).next_power_of_two();
        req.u64(nbd::ATTR_SIZE_BYTES, summary.size)
            .u64(nbd::ATTR_BLOCK_SIZE_BYTES, u64::from(block))
            .u64(nbd::ATTR_SERVER_FLAGS, u64::from(summary.flags))
            .u64(nbd::ATTR_CLIENT_FLAGS, 0)
            .u64(
                nbd::ATTR_DEAD_CONN_TIMEOUT,
                u64::from(opts.reattach_timeout),
            )
            .string(nbd::ATTR_BACKEND_IDENTIFIER, &opts.cookie);
        if opts.io_timeout > 0 {
            req.u64(nbd::ATTR_TIMEOUT, u64::from(opts.io_timeout));
        }
        let fds: Vec<RawFd> = theirs.iter().map(|s| s.as_raw_fd()).collect();
        sockets(&mut req, &fds);
        let answer = nl
            .call(&mut req)
            .map_err(|e| match (e.raw_os_error(), index) {
                (Some(libc::EBUSY), Some(i)) => {
                    KernelError::InUse(device_path(i).display().to_string())
                }
                _ => KernelError::Netlink {
                    what: "connect",
                    source: e,
                },
            })?;
        drop(theirs);
        let index = netlink::attr_u32(&answer, nbd::ATTR_INDEX)
            .or(index)
            .ok_or_else(|| KernelError::Netlink {
                what: "connect",
                source: io::Error::other("the kernel did not say which device it used"),
            })?;
        tracing::info!(
            device = %device_path(index).display(),
            export = export.name(),
            connections = opts.connections,
            "kernel NBD device attached"
        );
        Ok(Self::start(export, index, opts.clone(), fresh(ours)))
    }

    /// Takes back `/dev/nbd<index>` after a restart: checks its backend cookie and gives the
    /// kernel new sockets with `NBD_CMD_RECONFIGURE`. A device that is not connected any more
    /// is attached again.
    pub fn reattach(
        export: Arc<Export>,
        index: u32,
        opts: &DeviceOptions,
    ) -> Result<KernelDevice, KernelError> {
        opts.check()?;
        if !is_connected(index) {
            tracing::warn!(device = %device_path(index).display(), "not connected any more: attaching it again");
            return Self::attach(export, Some(index), opts);
        }
        let found = backend_of(index).unwrap_or_default();
        if found != opts.cookie {
            return Err(KernelError::NotOurs {
                path: device_path(index).display().to_string(),
                found,
                expected: opts.cookie.clone(),
            });
        }
        let mut nl = Netlink::open()?;
        let (ours, theirs) = pairs(opts.connections)?;
        reconfigure(&mut nl, index, &opts.cookie, &theirs)?;
        drop(theirs);
        tracing::info!(device = %device_path(index).display(), export = export.name(), "kernel NBD device reattached");
        Ok(Self::start(export, index, opts.clone(), fresh(ours)))
    }

    /// Takes `/dev/nbd<index>` with the connections another process parked for a hand-over
    /// (see [`pause`](Self::pause)), paused: nothing is read from them until
    /// [`resume_parked`](Self::resume_parked). The kernel sees nothing happen.
    pub fn adopt(
        export: Arc<Export>,
        index: u32,
        opts: &DeviceOptions,
        connections: Vec<ParkedSocket>,
    ) -> Result<KernelDevice, KernelError> {
        let mut ours = Vec::new();
        for (fd, leftover) in connections {
            let s = UnixStream::from(fd);
            s.set_nonblocking(true).map_err(KernelError::Socket)?;
            ours.push((s, leftover));
        }
        tracing::info!(device = %device_path(index).display(), export = export.name(), connections = ours.len(), "kernel NBD device taken over");
        let dev = Self::start(export, index, opts.clone(), Vec::new());
        *dev.shared.parked.lock() = ours;
        Ok(dev)
    }

    /// Serves the connections parked here (an adopted device, once the hand-over commits).
    pub fn resume_parked(&self) {
        let parked = std::mem::take(&mut *self.shared.parked.lock());
        for (s, leftover) in parked {
            spawn_connection(&self.shared, s, leftover);
        }
    }

    /// Parks every connection between requests (what is in flight is answered first), for a
    /// hand-over: the sockets and their unconsumed bytes. Fails, resuming, when a connection
    /// does not stop within `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<Vec<ParkedSocket>, KernelError> {
        let notifiers = self.shared.notifiers.lock().clone();
        for n in &notifiers {
            n.hand_over();
        }
        let deadline = std::time::Instant::now() + timeout;
        while !self.shared.notifiers.lock().is_empty() {
            if std::time::Instant::now() > deadline {
                let parked = std::mem::take(&mut *self.shared.parked.lock());
                self.resume(
                    parked
                        .into_iter()
                        .map(|(s, l)| (OwnedFd::from(s), l))
                        .collect(),
                );
                return Err(KernelError::Socket(io::Error::other(format!(
                    "{}: connections did not finish their requests within {timeout:?}",
                    self.path().display()
                ))));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let parked = std::mem::take(&mut *self.shared.parked.lock());
        Ok(parked
            .into_iter()
            .map(|(s, l)| (OwnedFd::from(s), l))
            .collect())
    }

    /// Serves again the connections [`pause`](Self::pause) parked (a hand-over that failed).
    pub fn resume(&self, parked: Vec<ParkedSocket>) {
        for (fd, leftover) in parked {
            spawn_connection(&self.shared, UnixStream::from(fd), leftover);
        }
    }

    /// What the device was attached with.
    pub fn options(&self) -> &DeviceOptions {
        &self.shared.opts
    }

    fn start(
        export: Arc<Export>,
        index: u32,
        opts: DeviceOptions,
        ours: Vec<(UnixStream, Vec<u8>)>,
    ) -> KernelDevice {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            export,
            index,
            opts,
            stopping: AtomicBool::new(false),
            notifiers: Mutex::new(Vec::new()),
            parked: Mutex::new(Vec::new()),
            ended: Mutex::new(Some(tx)),
        });
        for (s, leftover) in ours {
            spawn_connection(&shared, s, leftover);
        }
        let supervisor = std::thread::Builder::new()
            .name(format!("nbd{index}-supervisor"))
            .spawn({
                let shared = shared.clone();
                move || supervise(&shared, &rx)
            })
            .ok();
        KernelDevice { shared, supervisor }
    }

    /// `/dev/nbdN`.
    pub fn path(&self) -> PathBuf {
        device_path(self.shared.index)
    }

    /// N.
    pub fn index(&self) -> u32 {
        self.shared.index
    }

    /// Disconnects the device (`NBD_CMD_DISCONNECT`): the kernel fails what is queued and
    /// sends nothing more; our connections finish what they hold and close.
    pub fn detach(mut self) -> Result<(), KernelError> {
        self.shared.stopping.store(true, Ordering::Release);
        let r = Netlink::open().and_then(|mut nl| {
            let mut req = nl.request(nbd::CMD_DISCONNECT);
            req.u32(nbd::ATTR_INDEX, self.shared.index);
            nl.call(&mut req)
                .map(|_| ())
                .map_err(netlink_err("disconnect"))
        });
        self.stop();
        r
    }

    fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        for n in self.shared.notifiers.lock().iter() {
            n.cancel();
        }
        self.shared.ended.lock().take();
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
    }
}

impl Drop for KernelDevice {
    /// Leaves the device to the kernel: it holds I/O for `reattach_timeout` seconds, long
    /// enough for the next part2 to reattach.
    fn drop(&mut self) {
        self.stop();
    }
}

fn pairs(n: u16) -> Result<(Vec<UnixStream>, Vec<UnixStream>), KernelError> {
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..n {
        let (a, b) = UnixStream::pair().map_err(KernelError::Socket)?;
        a.set_nonblocking(true).map_err(KernelError::Socket)?;
        ours.push(a);
        theirs.push(b);
    }
    Ok((ours, theirs))
}

fn reconfigure(
    nl: &mut Netlink,
    index: u32,
    cookie: &str,
    theirs: &[UnixStream],
) -> Result<(), KernelError> {
    let mut req = nl.request(nbd::CMD_RECONFIGURE);
    req.u32(nbd::ATTR_INDEX, index)
        .string(nbd::ATTR_BACKEND_IDENTIFIER, cookie);
    let fds: Vec<RawFd> = theirs.iter().map(|s| s.as_raw_fd()).collect();
    sockets(&mut req, &fds);
    nl.call(&mut req)
        .map(|_| ())
        .map_err(netlink_err("reconfigure"))
}

/// New socket pairs: nothing read from them yet.
fn fresh(ours: Vec<UnixStream>) -> Vec<(UnixStream, Vec<u8>)> {
    ours.into_iter().map(|s| (s, Vec::new())).collect()
}

fn spawn_connection(shared: &Arc<Shared>, stream: UnixStream, leftover: Vec<u8>) {
    let notifier = match Notifier::new() {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "cannot create a connection eventfd");
            return;
        }
    };
    shared.notifiers.lock().push(notifier.clone());
    let ended = shared.ended.lock().clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nbd{}-conn", shared.index))
        .spawn({
            let shared = shared.clone();
            let notifier = notifier.clone();
            move || {
                let parked = crate::server::serve_kernel_connection(
                    &shared.export,
                    stream,
                    &leftover,
                    &notifier,
                );
                let handed = parked.is_some();
                if let Some(p) = parked
                    && let crate::stream::StdStream::Unix(s) = p.stream
                {
                    shared.parked.lock().push((s, p.leftover));
                }
                shared
                    .notifiers
                    .lock()
                    .retain(|n| !Arc::ptr_eq(n, &notifier));
                // A parked connection is not lost: the supervisor does not replace it.
                if let (Some(tx), false) = (ended, handed) {
                    let _ = tx.send(());
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a connection thread");
    }
}

/// Replaces connections that end while the device is ours.
fn supervise(shared: &Arc<Shared>, ended: &mpsc::Receiver<()>) {
    let mut backoff = Duration::from_millis(20);
    while ended.recv().is_ok() {
        if shared.stopping.load(Ordering::Acquire) {
            continue; // drain until every sender is gone
        }
        std::thread::sleep(backoff);
        if shared.stopping.load(Ordering::Acquire) {
            continue;
        }
        let path = device_path(shared.index);
        if !is_connected(shared.index) {
            tracing::warn!(device = %path.display(), "disconnected from outside: not reconnecting");
            shared.stopping.store(true, Ordering::Release);
            continue;
        }
        let attempt = Netlink::open().and_then(|mut nl| {
            let (ours, theirs) = pairs(1)?;
            reconfigure(&mut nl, shared.index, &shared.opts.cookie, &theirs)?;
            Ok(ours)
        });
        match attempt {
            // Not taken (the kernel had no dead slot yet): the socket reads EOF at once and
            // comes back here, later.
            Ok(ours) => {
                tracing::info!(device = %path.display(), "connection replaced");
                for s in ours {
                    spawn_connection(shared, s, Vec::new());
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::warn!(device = %path.display(), error = %e, "cannot replace a connection");
                backoff = (backoff * 2).min(Duration::from_secs(1));
                // Try again later: report the loss to ourselves.
                if let Some(tx) = shared.ended.lock().as_ref() {
                    let _ = tx.send(());
                }
            }
        }
    }
}
