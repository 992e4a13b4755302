//! NEBD part1 (`libnebd`): a thin library through which a program reaches volumes held open by
//! part2 (`nebd-server`) over its Unix socket `<run-dir>/nebd.sock`.
//!
//! As in the seed, part1 only forwards, with limited retry:
//! - no RPC timeout: a request waits for its answer however long part2 takes;
//! - transport errors (connection lost or refused) are retried: a reader thread reconnects
//!   with a short backoff (5 ms doubling to 100 ms) and resends every request that has no
//!   answer yet, in order, once per connection; part2 restores its files with the same fds,
//!   so an upgrade or a crash of part2 is a pause, not an error;
//! - application errors (a status in the answer) go back to the caller at once.
//!
//! A heartbeat thread tells part2 which fds this process holds open.
//!
//! ```text
//!  caller threads ──submit──> pending (id -> frame, completion) ──write──> socket
//!  reader thread  <──answer── socket: completes the pending entry, or reconnects + resends
//!  heartbeat thread: every interval, HEARTBEAT(open fds)
//! ```
//!
//! Completion callbacks run on the reader thread: they must not wait for another libnebd
//! call to complete (that answer could only be delivered by the thread they block).
//!
//! Replayed requests are safe: reads, writes of the same data, discards, flushes and opens
//! are idempotent; a replayed CLOSE that finds the fd already gone counts as done.

mod capi;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nebd_proto::{self as proto, Op, RequestHeader};
use parking_lot::{Condvar, Mutex};

pub use nebd_proto::FileInfo;

/// Errors returned by part1 calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NebdError {
    /// part2 answered with an error status.
    #[error("nebd {op:?} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Status {
        /// The operation.
        op: Op,
        /// Positive errno.
        errno: i32,
    },
    /// part2 answered with a payload that does not fit the operation.
    #[error("nebd {0:?}: malformed answer")]
    Malformed(Op),
    /// The library is shutting down.
    #[error("nebd client is shut down")]
    Shutdown,
}

impl NebdError {
    /// The errno this error maps to.
    pub fn errno(&self) -> i32 {
        match self {
            NebdError::Status { errno, .. } => *errno,
            NebdError::Malformed(_) => libc::EIO,
            NebdError::Shutdown => libc::ESHUTDOWN,
        }
    }
}

/// How part1 reaches part2.
#[derive(Debug, Clone)]
pub struct Options {
    /// part2's part1 socket (`<run-dir>/nebd.sock`).
    pub socket: PathBuf,
    /// Interval of heartbeats to part2.
    pub heartbeat_interval: Duration,
}

impl Options {
    /// Defaults for the socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Options {
            socket: socket.into(),
            heartbeat_interval: Duration::from_secs(1),
        }
    }
}

/// What the reader hands a completion: status and payload of the answer.
type Answer = Result<(i32, Vec<u8>), NebdError>;
type Completion = Box<dyn FnOnce(Answer) + Send>;

struct Pending {
    frame: Arc<Vec<u8>>,
    /// Connection generation this frame was last sent on (0: not yet).
    sent_gen: u64,
    /// Sent on more than one connection.
    replayed: bool,
    op: Op,
    done: Completion,
}

struct Writer {
    stream: Option<UnixStream>,
    generation: u64,
    /// A resender thread is replaying unanswered requests on this connection: submitters
    /// leave their frames to it, so frames never interleave and old ones go out first.
    resending: bool,
}

struct Inner {
    opts: Options,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
    writer: Mutex<Writer>,
    shutdown: AtomicBool,
    open_fds: Mutex<BTreeSet<u32>>,
    wake: (Mutex<()>, Condvar),
    /// Reconnections so far (for tests and metrics).
    reconnects: AtomicU64,
}

impl Inner {
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        op: Op,
        fd: u32,
        offset: u64,
        length: u64,
        flags: u8,
        payload: &[u8],
        done: Completion,
    ) {
        if self.shutdown.load(Ordering::Acquire) {
            return done(Err(NebdError::Shutdown));
        }
        // part2 would drop the connection for such a frame, and it would be replayed forever.
        let too_big = |n: u64| n > u64::from(proto::MAX_PAYLOAD);
        if too_big(payload.len() as u64) || (op == Op::Read && too_big(length)) {
            return done(Err(NebdError::Status {
                op,
                errno: libc::EINVAL,
            }));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::with_capacity(proto::REQUEST_LEN + payload.len());
        proto::encode_request(
            &mut frame,
            &RequestHeader {
                op: op as u8,
                flags,
                fd,
                payload: payload.len() as u32,
                id,
                offset,
                length,
            },
        );
        frame.extend_from_slice(payload);
        let frame = Arc::new(frame);
        self.pending.lock().insert(
            id,
            Pending {
                frame: frame.clone(),
                sent_gen: 0,
                replayed: false,
                op,
                done,
            },
        );
        let w = self.writer.lock();
        if w.resending {
            return; // the resender sends it after the replayed ones
        }
        let Some(stream) = &w.stream else {
            return; // the reader sends it when it connects
        };
        let send = match self.pending.lock().get_mut(&id) {
            Some(p) if p.sent_gen != w.generation => {
                p.sent_gen = w.generation;
                true
            }
            _ => false,
        };
        if send && (&*stream).write_all(&frame).is_err() {
            // The reader sees the broken connection, reconnects and resends.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A part1 client. Cheap to clone; the threads stop when the last clone is dropped.
#[derive(Clone)]
pub struct Nebd {
    inner: Arc<Inner>,
    _threads: Arc<Threads>,
}

impl std::fmt::Debug for Nebd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nebd")
            .field("socket", &self.inner.opts.socket)
            .finish_non_exhaustive()
    }
}

struct Threads {
    inner: Arc<Inner>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::Release);
        if let Some(s) = &self.inner.writer.lock().stream {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.inner.wake.1.notify_all();
        for h in self.handles.lock().drain(..) {
            // The last handle may be dropped by a callback, on the reader thread itself.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        for (_, p) in self.inner.pending.lock().drain() {
            (p.done)(Err(NebdError::Shutdown));
        }
    }
}

impl Nebd {
    /// Starts a client. It does not wait for part2: requests wait until part2 answers.
    pub fn new(opts: Options) -> Self {
        let inner = Arc::new(Inner {
            opts,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            writer: Mutex::new(Writer {
                stream: None,
                generation: 0,
                resending: false,
            }),
            shutdown: AtomicBool::new(false),
            open_fds: Mutex::new(BTreeSet::new()),
            wake: (Mutex::new(()), Condvar::new()),
            reconnects: AtomicU64::new(0),
        });
        let reader = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("nebd-reader".into())
                .spawn(move || reader_loop(&inner))
                .expect("spawn the nebd reader thread")
        };
        let heartbeat = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("nebd-heartbeat".into())
                .spawn(move || heartbeat_loop(&inner))
                .expect("spawn the nebd heartbeat thread")
        };
        Nebd {
            _threads: Arc::new(Threads {
                inner: inner.clone(),
                handles: Mutex::new(vec![reader, heartbeat]),
            }),
            inner,
        }
    }

    /// How many times the connection to part2 was re-established.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Submits and waits for the answer.
    fn call(
        &self,
        op: Op,
        fd: u32,
        offset: u64,
        length: u64,
        flags: u8,
        payload: &[u8],
    ) -> Result<Vec<u8>, NebdError> {
        let slot = Arc::new((Mutex::new(None::<Answer>), Condvar::new()));
        let s = slot.clone();
        self.inner.submit(
            op,
            fd,
            offset,
            length,
            flags,
            payload,
            Box::new(move |a| {
                *s.0.lock() = Some(a);
                s.1.notify_one();
            }),
        );
        let mut g = slot.0.lock();
        while g.is_none() {
            slot.1.wait(&mut g);
        }
        let (status, data) = g.take().expect("answered")?;
        if status != 0 {
            return Err(NebdError::Status { op, errno: -status });
        }
        Ok(data)
    }

    /// Opens a volume (`file:/path`, `mem:1G`, ...) and returns its fd, size and block size.
    pub fn open(&self, name: &str) -> Result<FileInfo, NebdError> {
        let data = self.call(Op::Open, 0, 0, 0, 0, name.as_bytes())?;
        let info = proto::parse_file_info(&data).map_err(|_| NebdError::Malformed(Op::Open))?;
        self.inner.open_fds.lock().insert(info.fd);
        Ok(info)
    }

    /// Closes an fd.
    pub fn close(&self, fd: u32) -> Result<(), NebdError> {
        self.call(Op::Close, fd, 0, 0, 0, &[])?;
        self.inner.open_fds.lock().remove(&fd);
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn pread(&self, fd: u32, buf: &mut [u8], offset: u64) -> Result<(), NebdError> {
        let data = self.call(Op::Read, fd, offset, buf.len() as u64, 0, &[])?;
        if data.len() != buf.len() {
            return Err(NebdError::Malformed(Op::Read));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Writes `buf` at `offset` (`fua`: durable when it returns).
    pub fn pwrite(&self, fd: u32, buf: &[u8], offset: u64, fua: bool) -> Result<(), NebdError> {
        let flags = if fua { proto::FLAG_FUA } else { 0 };
        self.call(Op::Write, fd, offset, buf.len() as u64, flags, buf)
            .map(|_| ())
    }

    /// Discards a range.
    pub fn discard(&self, fd: u32, offset: u64, len: u64) -> Result<(), NebdError> {
        self.call(Op::Discard, fd, offset, len, 0, &[]).map(|_| ())
    }

    /// Makes completed writes durable.
    pub fn flush(&self, fd: u32) -> Result<(), NebdError> {
        self.call(Op::Flush, fd, 0, 0, 0, &[]).map(|_| ())
    }

    /// Size and block size.
    pub fn info(&self, fd: u32) -> Result<FileInfo, NebdError> {
        let data = self.call(Op::GetInfo, fd, 0, 0, 0, &[])?;
        proto::parse_file_info(&data).map_err(|_| NebdError::Malformed(Op::GetInfo))
    }

    /// Grows the volume to `size` bytes.
    pub fn resize(&self, fd: u32, size: u64) -> Result<FileInfo, NebdError> {
        let data = self.call(Op::Resize, fd, size, 0, 0, &[])?;
        proto::parse_file_info(&data).map_err(|_| NebdError::Malformed(Op::Resize))
    }

    /// Reads asynchronously; `done` runs on the reader thread with the data.
    pub fn aio_read(
        &self,
        fd: u32,
        offset: u64,
        len: usize,
        done: impl FnOnce(Result<Vec<u8>, NebdError>) + Send + 'static,
    ) {
        self.inner.submit(
            Op::Read,
            fd,
            offset,
            len as u64,
            0,
            &[],
            Box::new(move |a| done(status(Op::Read, a))),
        );
    }

    /// Writes asynchronously; `done` runs on the reader thread.
    pub fn aio_write(
        &self,
        fd: u32,
        offset: u64,
        data: &[u8],
        fua: bool,
        done: impl FnOnce(Result<(), NebdError>) + Send + 'static,
    ) {
        let flags = if fua { proto::FLAG_FUA } else { 0 };
        self.inner.submit(
            Op::Write,
            fd,
            offset,
            data.len() as u64,
            flags,
            data,
            Box::new(move |a| done(status(Op::Write, a).map(|_| ()))),
        );
    }

    /// Discards asynchronously.
    pub fn aio_discard(
        &self,
        fd: u32,
        offset: u64,
        len: u64,
        done: impl FnOnce(Result<(), NebdError>) + Send + 'static,
    ) {
        self.inner.submit(
            Op::Discard,
            fd,
            offset,
            len,
            0,
            &[],
            Box::new(move |a| done(status(Op::Discard, a).map(|_| ()))),
        );
    }

    /// Flushes asynchronously.
    pub fn aio_flush(&self, fd: u32, done: impl FnOnce(Result<(), NebdError>) + Send + 'static) {
        self.inner.submit(
            Op::Flush,
            fd,
            0,
            0,
            0,
            &[],
            Box::new(move |a| done(status(Op::Flush, a).map(|_| ()))),
        );
    }
}

fn status(op: Op, a: Answer) -> Result<Vec<u8>, NebdError> {
    let (status, data) = a?;
    if status != 0 {
        return Err(NebdError::Status { op, errno: -status });
    }
    Ok(data)
}

/// Connects, then has every unanswered request resent on the new connection.
fn connect(inner: &Arc<Inner>) -> Option<UnixStream> {
    let mut backoff = Duration::from_millis(5);
    loop {
        if inner.shutdown.load(Ordering::Acquire) {
            return None;
        }
        match UnixStream::connect(&inner.opts.socket) {
            Ok(s) => {
                let Ok(write_half) = s.try_clone() else {
                    continue;
                };
                let mut w = inner.writer.lock();
                // Shutdown sets its flag before it takes this lock to close the stream.
                if inner.shutdown.load(Ordering::Acquire) {
                    return None;
                }
                w.generation += 1;
                let generation = w.generation;
                w.stream = Some(write_half);
                w.resending = !inner.pending.lock().is_empty();
                if generation > 1 {
                    inner.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                if w.resending {
                    // From another thread: the reader must keep reading answers while the
                    // replayed frames go out, or full sockets in both directions would block
                    // both sides.
                    let inner = inner.clone();
                    std::thread::spawn(move || resend(&inner, generation));
                }
                return Some(s);
            }
            Err(_) => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
        }
    }
}

/// Writes every request not yet sent on connection `generation`, oldest first, until none
/// is left; then lets submitters write again.
fn resend(inner: &Inner, generation: u64) {
    loop {
        let (frames, stream) = {
            let mut w = inner.writer.lock();
            if w.generation != generation {
                return;
            }
            let frames: Vec<Arc<Vec<u8>>> = {
                let mut p = inner.pending.lock();
                let mut ids: Vec<u64> = p
                    .iter()
                    .filter(|(_, e)| e.sent_gen != generation)
                    .map(|(id, _)| *id)
                    .collect();
                ids.sort_unstable();
                ids.iter()
                    .map(|id| {
                        let e = p.get_mut(id).expect("listed");
                        e.replayed |= e.sent_gen != 0;
                        e.sent_gen = generation;
                        e.frame.clone()
                    })
                    .collect()
            };
            if frames.is_empty() {
                w.resending = false;
                return;
            }
            let Some(stream) = w.stream.as_ref().and_then(|s| s.try_clone().ok()) else {
                return;
            };
            (frames, stream)
        };
        for f in frames {
            if (&stream).write_all(&f).is_err() {
                return; // the reader reconnects and starts over
            }
        }
    }
}

fn reader_loop(inner: &Arc<Inner>) {
    let mut payload = Vec::new();
    while !inner.shutdown.load(Ordering::Acquire) {
        let Some(mut stream) = connect(inner) else {
            return;
        };
        loop {
            let mut h = [0u8; proto::RESPONSE_LEN];
            if stream.read_exact(&mut h).is_err() {
                break;
            }
            let Ok(Some(h)) = proto::parse_response(&h) else {
                break; // framing lost: reconnect
            };
            payload.clear();
            payload.resize(h.payload as usize, 0);
            if stream.read_exact(&mut payload).is_err() {
                break;
            }
            let Some(p) = inner.pending.lock().remove(&h.id) else {
                continue; // answer to a request already answered on another connection
            };
            let status = if p.op == Op::Close && p.replayed && h.status == -libc::EBADF {
                0 // the first send closed it before the connection broke
            } else {
                h.status
            };
            (p.done)(Ok((status, std::mem::take(&mut payload))));
        }
        let mut w = inner.writer.lock();
        if let Some(s) = w.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn heartbeat_loop(inner: &Inner) {
    loop {
        {
            let mut g = inner.wake.0.lock();
            inner.wake.1.wait_for(&mut g, inner.opts.heartbeat_interval);
        }
        if inner.shutdown.load(Ordering::Acquire) {
            return;
        }
        let fds: Vec<u32> = inner.open_fds.lock().iter().copied().collect();
        if fds.is_empty() {
            continue;
        }
        inner.submit(
            Op::Heartbeat,
            0,
            0,
            0,
            0,
            &proto::encode_fds(&fds),
            Box::new(|_| {}),
        );
    }
}
