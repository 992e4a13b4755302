//! The part1 service of part2: File Service, Heartbeat Service and IO Executor over the
//! nebd-proto framed protocol on `<run-dir>/nebd.sock`.
//!
//! Each part1 connection is served by its own thread, executor and buffers (as NBD
//! connections are): requests are read in batches, data requests run on the file's block
//! device (completing inline for synchronous backends), responses leave with one writev.
//! Control requests (OPEN, CLOSE, GET_INFO, RESIZE, HEARTBEAT) are answered inline.
//! Any framing error (bad magic, oversized payload) closes that connection only.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use curve_blockdev::exec::{self, Notifier, OutQueue, Reply, is_transient};
use curve_blockdev::queue::{self, QueueSource, RequestFuture};
use curve_blockdev::{AlignedBuf, BlockDevice, BufPool, IoError, WriteFlags, check_range};
use nebd_proto::{self as proto, Op, RequestHeader, ResponseHeader};

use crate::files::{FileError, FileManager};

/// File name of the part1 socket inside the run directory.
pub const PART1_SOCKET: &str = "nebd.sock";

const RBUF_LEN: usize = 256 * 1024;
const MAX_QUEUED: usize = 512;

/// A finished part1 request, to be answered.
#[derive(Debug)]
pub struct Done {
    id: u64,
    /// Payload bytes the request held (see [`Part1Conn`]'s budget).
    bytes: usize,
    result: Result<Option<AlignedBuf>, IoError>,
    /// Buffer to give back to the pool (write payloads).
    spent: Option<AlignedBuf>,
}

type ExecFuture = RequestFuture<'static, Done>;

/// One part1 connection.
pub struct Part1Conn {
    sock: UnixStream,
    files: Arc<FileManager>,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// A request whose payload is still arriving, and how much of it has.
    pending: Option<(RequestHeader, AlignedBuf, usize)>,
    out: OutQueue,
    pool: BufPool,
    /// Payload bytes of the requests in flight.
    inflight_bytes: usize,
    closing: bool,
}

impl std::fmt::Debug for Part1Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Part1Conn").finish_non_exhaustive()
    }
}

fn status_of(e: &IoError) -> i32 {
    -e.errno()
}

impl Part1Conn {
    /// Wraps an accepted (non-blocking) connection.
    pub fn new(sock: UnixStream, files: Arc<FileManager>) -> Self {
        Part1Conn {
            sock,
            files,
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

    /// Serves the connection until part1 hangs up or `notifier` is cancelled.
    pub fn serve(mut self, notifier: &Arc<Notifier>) -> io::Result<()> {
        exec::batch_scheduling();
        queue::serve_within(&mut self, notifier, MAX_QUEUED, &queue::SOCKET_QUEUES)
    }

    fn fill(&mut self) -> io::Result<bool> {
        let result = if let Some((h, buf, filled)) =
            self.pending.as_mut().filter(|_| self.rstart == self.rend)
        {
            let n = (&self.sock).read(&mut buf[*filled..h.payload as usize]);
            if let Ok(n) = n {
                *filled += n;
            }
            n
        } else {
            if self.rstart == self.rend {
                self.rstart = 0;
                self.rend = 0;
            } else if self.rbuf.len() - self.rend < proto::REQUEST_LEN {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            let n = (&self.sock).read(&mut self.rbuf[self.rend..]);
            if let Ok(n) = n {
                self.rend += n;
            }
            n
        };
        match result {
            Ok(0) => {
                self.closing = true;
                Ok(true)
            }
            Ok(_) => Ok(true),
            Err(e) if is_transient(&e) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                self.closing = true;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// The next request whose header and payload have arrived, as a future.
    fn next_request(&mut self) -> io::Result<Option<ExecFuture>> {
        loop {
            if let Some((h, buf, filled)) = &mut self.pending {
                let need = h.payload as usize - *filled;
                let take = need.min(self.rend - self.rstart);
                buf[*filled..*filled + take]
                    .copy_from_slice(&self.rbuf[self.rstart..self.rstart + take]);
                *filled += take;
                self.rstart += take;
                if *filled < h.payload as usize {
                    return Ok(None);
                }
                let (h, buf, _) = self.pending.take().expect("checked");
                if let Some(f) = self.dispatch(h, buf) {
                    return Ok(Some(f));
                }
                continue;
            }
            let h = match proto::parse_request(&self.rbuf[self.rstart..self.rend]) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(None),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            };
            self.rstart += proto::REQUEST_LEN;
            let buf = self.pool.take(h.payload as usize);
            self.pending = Some((h, buf, 0));
        }
    }

    fn respond(&mut self, id: u64, status: i32, payload: &[u8]) {
        let head = proto::encode_response(&ResponseHeader {
            id,
            status,
            payload: payload.len() as u32,
        });
        self.out
            .push(Reply::new(&head).with_extra(payload.to_vec()));
    }

    fn refuse(&mut self, id: u64, e: &FileError) {
        tracing::debug!(id, error = %e, "part1 request refused");
        self.respond(id, e.errno, &[]);
    }

    /// Runs control requests inline; turns data requests into futures.
    fn dispatch(&mut self, h: RequestHeader, payload: AlignedBuf) -> Option<ExecFuture> {
        let files = self.files.clone();
        let Some(op) = Op::from_u8(h.op) else {
            self.pool.give(payload);
            self.respond(h.id, -libc::EINVAL, &[]);
            return None;
        };
        let control = match op {
            Op::Open => Some(
                std::str::from_utf8(&payload)
                    .map_err(|_| FileError {
                        errno: -libc::EINVAL,
                        message: "volume name is not UTF-8".into(),
                    })
                    .and_then(|name| files.open(name))
                    .map(|i| proto::encode_file_info(&i).to_vec()),
            ),
            Op::Close => Some(files.close(h.fd).map(|()| Vec::new())),
            Op::GetInfo => Some(
                files
                    .info(h.fd)
                    .map(|i| proto::encode_file_info(&i).to_vec()),
            ),
            Op::Resize => Some(
                files
                    .resize(h.fd, h.offset)
                    .map(|i| proto::encode_file_info(&i).to_vec()),
            ),
            Op::Heartbeat => Some(match proto::parse_fds(&payload) {
                Ok(fds) => {
                    files.heartbeat(&fds);
                    Ok(Vec::new())
                }
                Err(_) => Err(FileError {
                    errno: -libc::EINVAL,
                    message: "malformed heartbeat".into(),
                }),
            }),
            Op::Read | Op::Write | Op::Discard | Op::Flush => None,
        };
        if let Some(result) = control {
            self.pool.give(payload);
            match result {
                Ok(p) => self.respond(h.id, 0, &p),
                Err(e) => self.refuse(h.id, &e),
            }
            return None;
        }
        let dev = match files.device(h.fd) {
            Ok(d) => d,
            Err(e) => {
                self.pool.give(payload);
                self.refuse(h.id, &e);
                return None;
            }
        };
        let checked = match op {
            Op::Write => check_range(dev.info(), h.offset, u64::from(h.payload)),
            Op::Read if h.length > u64::from(proto::MAX_PAYLOAD) => Err(IoError::OutOfRange {
                offset: h.offset,
                len: h.length,
                size: dev.info().size,
            }),
            Op::Read | Op::Discard => check_range(dev.info(), h.offset, h.length),
            _ => Ok(()),
        };
        if let Err(e) = checked {
            self.pool.give(payload);
            self.respond(h.id, status_of(&e), &[]);
            return None;
        }
        let read_buf = (op == Op::Read).then(|| self.pool.take(h.length as usize));
        self.inflight_bytes += payload.len() + read_buf.as_ref().map_or(0, |b| b.len());
        Some(Box::pin(execute(dev, h, op, payload, read_buf)))
    }

    fn complete(&mut self, done: Done) {
        self.inflight_bytes -= done.bytes;
        if let Some(b) = done.spent {
            self.pool.give(b);
        }
        match done.result {
            Ok(Some(data)) => {
                let head = proto::encode_response(&ResponseHeader {
                    id: done.id,
                    status: 0,
                    payload: data.len() as u32,
                });
                self.out.push(Reply::new(&head).with_data(data));
            }
            Ok(None) => self.respond(done.id, 0, &[]),
            Err(e) => {
                tracing::debug!(id = done.id, error = %e, "part1 I/O failed");
                self.respond(done.id, status_of(&e), &[]);
            }
        }
    }
}

/// A part1 connection on the frontends' one queue loop.
impl QueueSource<'static> for Part1Conn {
    type Done = Done;
    type Error = io::Error;

    fn take(&mut self, room: usize, out: &mut Vec<ExecFuture>) -> io::Result<bool> {
        let mut moved = self.fill()?;
        while out.len() < room {
            let Some(fut) = self.next_request()? else {
                break;
            };
            moved = true;
            out.push(fut);
            // Reads ask for their buffers in a few header bytes: stop at the budget here too.
            if queue::SOCKET_QUEUES.over(self.held_bytes()) {
                break;
            }
        }
        Ok(moved)
    }

    fn complete(&mut self, done: Done) {
        Part1Conn::complete(self, done);
    }

    fn send(&mut self) -> io::Result<bool> {
        if self.out.is_empty() {
            return Ok(false);
        }
        let sock = &self.sock;
        self.out
            .flush(|iov| (&*sock).write_vectored(iov), &mut self.pool)
    }

    fn unsent(&self) -> usize {
        self.out.len()
    }

    fn held_bytes(&self) -> usize {
        let pending = self.pending.as_ref().map_or(0, |(_, b, _)| b.len());
        self.inflight_bytes + pending + self.out.bytes()
    }

    fn finished(&self) -> bool {
        self.closing
    }

    fn park(&mut self, notifier: &Notifier, want_requests: bool) -> io::Result<()> {
        exec::park(
            notifier,
            self.sock.as_raw_fd(),
            want_requests,
            !self.out.is_empty(),
        )
    }
}

async fn execute(
    dev: Arc<dyn BlockDevice>,
    h: RequestHeader,
    op: Op,
    payload: AlignedBuf,
    read_buf: Option<AlignedBuf>,
) -> Done {
    let bytes = payload.len() + read_buf.as_ref().map_or(0, |b| b.len());
    let (result, spent) = match (op, read_buf) {
        (Op::Read, Some(mut buf)) => {
            let r = dev.read(h.offset, &mut buf).await;
            (r.map(|()| Some(buf)), Some(payload))
        }
        (Op::Write, _) => {
            let fua = h.flags & proto::FLAG_FUA != 0;
            let r = dev.write(h.offset, &payload, WriteFlags { fua }).await;
            (r.map(|()| None), Some(payload))
        }
        (Op::Discard, _) => (
            dev.discard(h.offset, h.length).await.map(|()| None),
            Some(payload),
        ),
        _ => (dev.flush().await.map(|()| None), Some(payload)),
    };
    Done {
        id: h.id,
        bytes,
        result,
        spent,
    }
}
