//! The transmission phase of one connection: read requests, execute them on the block
//! device, write replies — a [`QueueSource`] on the frontends' one queue loop
//! ([`curve_blockdev::queue`]).
//!
//! One connection is served by one thread running a single-threaded executor, so nothing on
//! this path is shared or locked. Each turn of the loop:
//!
//! ```text
//!   read what the socket has (one syscall for many requests)
//!     -> parse + validate headers (pure: proto, request)
//!     -> start each command on the device; poll it once: RAM and page-cache backends
//!        finish right here, others join the in-flight set
//!   collect in-flight completions
//!   write every queued reply with one writev (read data is sent from its buffer, not copied)
//!   park in poll(2) on the socket and the connection's eventfd only when nothing moved
//! ```
//!
//! The thread is its own executor: device futures are polled with a waker that signals the
//! connection's eventfd ([`curve_blockdev::exec`]), so a backend that completes on another thread (the
//! cluster client) wakes exactly this thread, and one that completes at once costs nothing.
//!
//! Buffers come from a per-connection [`BufPool`]; large write payloads are read straight
//! into their buffer.

use std::io;

use curve_blockdev::{AlignedBuf, BlockDevice, BufPool, Extent, IoError, WriteFlags, ZeroFlags};
use std::sync::Arc;

use crate::negotiate::BASE_ALLOCATION_ID;
use crate::proto::{self, cmd, errno};
use crate::request::{self, Command, Limits, Refusal};
use crate::stream::StdStream;
use curve_blockdev::exec::{self as wake, Notifier, OutQueue, Reply, is_transient};
use curve_blockdev::queue::{self, QueueSource, RequestFuture};

/// Requests in flight plus replies waiting to be written, per connection.
const MAX_QUEUED: usize = 512;
const RBUF_LEN: usize = 256 * 1024;
/// Most extents in one block-status reply.
const MAX_EXTENTS: usize = 1024;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("socket error")]
    Io(#[from] io::Error),
    #[error("protocol error")]
    Proto(#[from] proto::ProtoError),
    #[error("write payload of {0} bytes exceeds the maximum block size")]
    PayloadTooLarge(u32),
}

/// A connection stopped between requests for a hand-over to another process: its socket,
/// what it negotiated, and the bytes it had read that no request consumed yet.
#[derive(Debug)]
pub struct Parked<S> {
    /// The socket.
    pub stream: S,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was negotiated (NBD_CMD_BLOCK_STATUS allowed).
    pub block_status: bool,
    /// Read from the socket, not yet a request: the next process parses these first.
    pub leftover: Vec<u8>,
}

/// A command ready to run on the device.
enum Exec {
    Read {
        offset: u64,
        buf: AlignedBuf,
    },
    Write {
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
    Cache,
}

enum Output {
    None,
    Read {
        offset: u64,
        buf: AlignedBuf,
    },
    Written(AlignedBuf),
    Extents {
        extents: Vec<Extent>,
        len: u64,
        req_one: bool,
    },
}

pub(crate) struct Done {
    cookie: u64,
    /// Payload bytes the request held ([`Connection::held_bytes`]).
    bytes: usize,
    result: Result<Output, IoError>,
}

async fn execute(dev: &dyn BlockDevice, cookie: u64, exec: Exec) -> Done {
    let bytes = exec.bytes();
    let result = match exec {
        Exec::Read { offset, mut buf } => match dev.read(offset, &mut buf).await {
            Ok(()) => Ok(Output::Read { offset, buf }),
            Err(e) => Err(e),
        },
        Exec::Write { offset, buf, fua } => dev
            .write(offset, &buf, WriteFlags { fua })
            .await
            .map(|()| Output::Written(buf)),
        Exec::Flush => dev.flush().await.map(|()| Output::None),
        Exec::Trim { offset, len, fua } => match dev.discard(offset, len).await {
            Ok(()) if fua => dev.flush().await.map(|()| Output::None),
            r => r.map(|()| Output::None),
        },
        Exec::Zero { offset, len, flags } => dev
            .write_zeroes(offset, len, flags)
            .await
            .map(|()| Output::None),
        Exec::BlockStatus {
            offset,
            len,
            req_one,
        } => dev
            .block_status(offset, len)
            .await
            .map(|extents| Output::Extents {
                extents,
                len,
                req_one,
            }),
        Exec::Cache => Ok(Output::None),
    };
    Done {
        cookie,
        bytes,
        result,
    }
}

impl Exec {
    /// Bytes of its buffer.
    fn bytes(&self) -> usize {
        match self {
            Exec::Read { buf, .. } | Exec::Write { buf, .. } => buf.len(),
            _ => 0,
        }
    }
}

/// A write whose header has been read and whose payload is still arriving.
struct PendingWrite {
    /// The request as it came (a hand-over gives it back to be parsed again).
    header: [u8; proto::REQUEST_LEN],
    cookie: u64,
    /// Where the payload goes: a buffer, or nowhere if the request was refused.
    target: Result<(Command, AlignedBuf), Refusal>,
    len: usize,
    filled: usize,
}

/// One connection in transmission.
pub(crate) struct Connection<'a> {
    stream: StdStream,
    dev: &'a dyn BlockDevice,
    limits: Limits,
    structured: bool,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    pending: Option<PendingWrite>,
    out: OutQueue,
    pool: BufPool,
    /// Payload bytes of the requests in flight.
    inflight_bytes: usize,
    /// No more requests are read (NBD_CMD_DISC, EOF or cancellation).
    closing: bool,
}

impl<'a> Connection<'a> {
    pub(crate) fn new(
        stream: StdStream,
        dev: &'a dyn BlockDevice,
        limits: Limits,
        structured: bool,
    ) -> Self {
        Connection {
            stream,
            dev,
            limits,
            structured,
            rbuf: vec![0u8; RBUF_LEN].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            pending: None,
            out: OutQueue::default(),
            pool: BufPool::default(),
            inflight_bytes: 0,
            closing: false,
        }
    }

    /// A connection another process served until now: `leftover` is what it had read and not
    /// yet consumed (see [`Parked`]).
    pub(crate) fn resume(
        stream: StdStream,
        dev: &'a dyn BlockDevice,
        limits: Limits,
        structured: bool,
        leftover: &[u8],
    ) -> Self {
        let mut c = Self::new(stream, dev, limits, structured);
        if leftover.len() > c.rbuf.len() {
            c.rbuf = vec![0u8; leftover.len()].into_boxed_slice();
        }
        c.rbuf[..leftover.len()].copy_from_slice(leftover);
        c.rend = leftover.len();
        c
    }

    /// Serves requests until the client disconnects or `notifier` is cancelled; in-flight
    /// requests are finished and answered first. A stop for a hand-over
    /// ([`Notifier::hand_over`]) returns the connection parked between requests.
    pub(crate) fn serve(
        mut self,
        notifier: &Arc<Notifier>,
    ) -> Result<Option<Parked<StdStream>>, ConnError> {
        queue::serve_within(&mut self, notifier, MAX_QUEUED, &queue::SOCKET_QUEUES)?;
        if !notifier.is_handing_over() || self.closing {
            return Ok(None);
        }
        // What was read and not consumed: a write whose payload is still arriving goes back
        // as its header and the payload so far (a refused one's payload is not kept: zeros
        // of the same length are as good, it is refused again), then the unparsed bytes.
        let mut leftover = Vec::new();
        if let Some(p) = &self.pending {
            leftover.extend_from_slice(&p.header);
            match &p.target {
                Ok((_, buf)) => leftover.extend_from_slice(&buf[..p.filled]),
                Err(_) => leftover.resize(leftover.len() + p.filled, 0),
            }
        }
        leftover.extend_from_slice(&self.rbuf[self.rstart..self.rend]);
        Ok(Some(Parked {
            stream: self.stream,
            structured: self.structured,
            block_status: self.limits.block_status,
            leftover,
        }))
    }

    /// Reads what the socket has, into the pending write's buffer or the read buffer.
    /// Returns whether anything was read.
    fn fill(&mut self) -> Result<bool, ConnError> {
        let buffered = self.rend - self.rstart;
        // Payload still to come and nothing of it buffered: read it in place.
        let direct = matches!(&self.pending, Some(p) if buffered == 0 && p.target.is_ok());
        let result = match if direct { self.pending.as_mut() } else { None } {
            Some(PendingWrite {
                target: Ok((_, buf)),
                filled,
                len,
                ..
            }) if direct => self.stream.try_read(&mut buf[*filled..*len]),
            _ => self.read_into_rbuf(),
        };
        match result {
            Ok(0) => {
                self.closing = true;
                Ok(true)
            }
            Ok(n) => {
                if let Some(p) = self.pending.as_mut().filter(|_| direct) {
                    p.filled += n;
                }
                Ok(true)
            }
            Err(e) if is_transient(&e) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                self.closing = true;
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn read_into_rbuf(&mut self) -> io::Result<usize> {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rbuf.len() - self.rend < proto::REQUEST_LEN {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let n = self.stream.try_read(&mut self.rbuf[self.rend..])?;
        self.rend += n;
        Ok(n)
    }

    /// The next command to execute from what has been read, answering refused ones.
    fn next_exec(&mut self) -> Result<Option<(u64, Exec)>, ConnError> {
        loop {
            if let Some(p) = &mut self.pending {
                let take = (p.len - p.filled).min(self.rend - self.rstart);
                if let Ok((_, buf)) = &mut p.target {
                    buf[p.filled..p.filled + take]
                        .copy_from_slice(&self.rbuf[self.rstart..self.rstart + take]);
                }
                p.filled += take;
                self.rstart += take;
                if p.filled < p.len {
                    return Ok(None);
                }
                let p = self.pending.take().expect("checked above");
                match p.target {
                    Ok((Command::Write { offset, fua, .. }, buf)) => {
                        return Ok(Some((p.cookie, Exec::Write { offset, buf, fua })));
                    }
                    Ok((_, buf)) => self.pool.give(buf),
                    Err(refusal) => self.refuse(p.cookie, refusal),
                }
                continue;
            }
            let Some(h) = proto::parse_request(&self.rbuf[self.rstart..self.rend])? else {
                return Ok(None);
            };
            let mut header = [0u8; proto::REQUEST_LEN];
            header.copy_from_slice(&self.rbuf[self.rstart..self.rstart + proto::REQUEST_LEN]);
            self.rstart += proto::REQUEST_LEN;
            let validated = request::validate(&h, &self.limits);
            if h.kind == cmd::WRITE {
                if h.len > self.limits.max_block {
                    // We cannot skip an arbitrarily large payload safely: end the connection.
                    return Err(ConnError::PayloadTooLarge(h.len));
                }
                let len = h.len as usize;
                self.pending = Some(PendingWrite {
                    header,
                    cookie: h.cookie,
                    target: validated.map(|c| (c, self.pool.take(len))),
                    len,
                    filled: 0,
                });
                continue;
            }
            let exec = match validated {
                Err(refusal) => {
                    self.refuse(h.cookie, refusal);
                    continue;
                }
                Ok(Command::Disconnect) => {
                    self.closing = true;
                    return Ok(None);
                }
                Ok(Command::Read { offset, len }) => Exec::Read {
                    offset,
                    buf: self.pool.take(len as usize),
                },
                Ok(Command::Flush) => Exec::Flush,
                Ok(Command::Trim { offset, len, fua }) => Exec::Trim {
                    offset,
                    len: len.into(),
                    fua,
                },
                Ok(Command::WriteZeroes {
                    offset,
                    len,
                    fua,
                    no_hole,
                    fast,
                }) => Exec::Zero {
                    offset,
                    len: len.into(),
                    flags: ZeroFlags {
                        may_unmap: !no_hole,
                        fast_only: fast,
                        fua,
                    },
                },
                Ok(Command::BlockStatus {
                    offset,
                    len,
                    req_one,
                }) => Exec::BlockStatus {
                    offset,
                    len: len.into(),
                    req_one,
                },
                Ok(Command::Cache) => Exec::Cache,
                Ok(Command::Write { .. }) => unreachable!("writes are handled above"),
            };
            return Ok(Some((h.cookie, exec)));
        }
    }

    fn refuse(&mut self, cookie: u64, refusal: Refusal) {
        self.queue_error(cookie, refusal.error, refusal.message);
    }

    fn queue_error(&mut self, cookie: u64, error: u32, message: &str) {
        let mut v = Vec::with_capacity(32);
        let r = if self.structured {
            proto::encode_structured_error(&mut v, cookie, error, message);
            Reply::new(&[]).with_extra(v)
        } else {
            proto::encode_simple_reply(&mut v, cookie, error);
            Reply::new(&v)
        };
        self.out.push(r);
    }

    fn complete(&mut self, done: Done) {
        self.inflight_bytes -= done.bytes;
        let cookie = done.cookie;
        let output = match done.result {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(cookie, error = %e, "request failed");
                let message = e.to_string();
                return self.queue_error(cookie, wire_errno(&e), &message);
            }
        };
        let mut head = Vec::with_capacity(28);
        let mut extra = Vec::new();
        let mut data = None;
        match output {
            Output::Read { offset, buf } => {
                if self.structured {
                    proto::encode_read_chunk_header(&mut head, cookie, offset, buf.len() as u32);
                } else {
                    proto::encode_simple_reply(&mut head, cookie, 0);
                }
                data = Some(buf);
            }
            Output::Extents {
                extents,
                len,
                req_one,
            } => {
                let descriptors = descriptors(&extents, len, req_one);
                proto::encode_block_status(&mut extra, cookie, BASE_ALLOCATION_ID, &descriptors);
            }
            Output::Written(buf) => {
                self.pool.give(buf);
                proto::encode_simple_reply(&mut head, cookie, 0);
            }
            Output::None => proto::encode_simple_reply(&mut head, cookie, 0),
        }
        let mut r = Reply::new(&head).with_extra(extra);
        if let Some(d) = data {
            r = r.with_data(d);
        }
        self.out.push(r);
    }
}

/// A connection on the frontends' one queue loop: requests come from the socket, answers go
/// back with one `writev`.
impl<'a> QueueSource<'a> for Connection<'a> {
    type Done = Done;
    type Error = ConnError;

    fn take(
        &mut self,
        room: usize,
        out: &mut Vec<RequestFuture<'a, Done>>,
    ) -> Result<bool, ConnError> {
        let mut moved = self.fill()?;
        while out.len() < room {
            let Some((cookie, exec)) = self.next_exec()? else {
                break;
            };
            moved = true;
            self.inflight_bytes += exec.bytes();
            out.push(Box::pin(execute(self.dev, cookie, exec)));
            // Reads ask for their buffers in a few header bytes: stop at the budget here too,
            // not only between loop passes.
            if queue::SOCKET_QUEUES.over(self.held_bytes()) {
                break;
            }
        }
        Ok(moved)
    }

    fn held_bytes(&self) -> usize {
        let pending = match &self.pending {
            Some(PendingWrite {
                target: Ok((_, buf)),
                ..
            }) => buf.len(),
            _ => 0,
        };
        self.inflight_bytes + pending + self.out.bytes()
    }

    fn complete(&mut self, done: Done) {
        Connection::complete(self, done);
    }

    fn send(&mut self) -> Result<bool, ConnError> {
        if self.out.is_empty() {
            return Ok(false);
        }
        let stream = &self.stream;
        Ok(self
            .out
            .flush(|iov| stream.try_write_vectored(iov), &mut self.pool)?)
    }

    fn unsent(&self) -> usize {
        self.out.len()
    }

    fn finished(&self) -> bool {
        self.closing
    }

    fn park(&mut self, notifier: &Notifier, want_requests: bool) -> Result<(), ConnError> {
        Ok(wake::park(
            notifier,
            self.stream.fd(),
            want_requests,
            !self.out.is_empty(),
        )?)
    }
}

/// Block-status descriptors for `base:allocation`, clipped to the request and to u32.
fn descriptors(extents: &[Extent], len: u64, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        if covered >= len || e.len == 0 {
            break;
        }
        let flags =
            (u32::from(e.hole) * proto::STATE_HOLE) | (u32::from(e.zero) * proto::STATE_ZERO);
        let l = e.len.min(len - covered).min(u64::from(u32::MAX) & !4095) as u32;
        match out.last_mut() {
            Some((prev, f))
                if *f == flags && u64::from(*prev) + u64::from(l) <= u64::from(u32::MAX) =>
            {
                *prev += l
            }
            _ => out.push((l, flags)),
        }
        covered += u64::from(l);
        if out.len() >= MAX_EXTENTS {
            break;
        }
    }
    if out.is_empty() {
        out.push((len.min(u64::from(u32::MAX)) as u32, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// Maps a device error onto the errno values NBD defines.
fn wire_errno(e: &IoError) -> u32 {
    let v = e.errno() as u32;
    match v {
        errno::EPERM
        | errno::EIO
        | errno::ENOMEM
        | errno::EINVAL
        | errno::ENOSPC
        | errno::EOVERFLOW
        | errno::ENOTSUP
        | errno::ESHUTDOWN => v,
        x if x == libc::EROFS as u32 => errno::EPERM,
        x if x == libc::EDQUOT as u32 => errno::ENOSPC,
        x if x == libc::EOPNOTSUPP as u32 => errno::ENOTSUP,
        _ => errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len: u64, hole: bool) -> Extent {
        Extent {
            len,
            hole,
            zero: hole,
        }
    }

    #[test]
    fn descriptors_merge_and_clip() {
        let d = descriptors(
            &[ext(4096, false), ext(4096, false), ext(8192, true)],
            10000,
            false,
        );
        assert_eq!(
            d,
            vec![(8192, 0), (1808, proto::STATE_HOLE | proto::STATE_ZERO)]
        );
        let d = descriptors(&[ext(4096, true), ext(4096, false)], 8192, true);
        assert_eq!(d, vec![(4096, 3)]);
        assert_eq!(descriptors(&[], 512, false), vec![(512, 0)]);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(wire_errno(&IoError::ReadOnly), errno::EPERM);
        assert_eq!(
            wire_errno(&IoError::Os(io::Error::from_raw_os_error(libc::EBADF))),
            errno::EIO
        );
        assert_eq!(wire_errno(&IoError::NotSupported("x")), errno::ENOTSUP);
    }
}
