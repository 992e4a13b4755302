//! The data plane of one ublk hardware queue: a [`QueueSource`] over the queue's io_uring,
//! served by the frontends' one queue loop ([`curve_blockdev::queue::serve`]).
//!
//! ```text
//!   io_uring (one per queue thread)
//!     FETCH / COMMIT_AND_FETCH uring_cmds, one per tag   -> a CQE when the kernel has a request
//!     POLL_ADD on the thread's Notifier eventfd          -> a CQE when a device future woke us
//!   take:  io_uring_enter(min_complete = 0): submit the queued commits, reap CQEs;
//!          each new tag -> its descriptor parsed (request.rs) -> the device call on the tag's
//!          buffer (a read lands in it, a write is read from it), polled once: answered at
//!          once if it is done (RAM, page cache), an in-flight future otherwise
//!   complete: COMMIT_AND_FETCH queued for the tag (result, and the tag's buffer for the next)
//!   send:  io_uring_enter(min_complete = 0): one syscall for every queued commit
//!   park:  io_uring_enter(min_complete = 1): a request or a wakeup
//! ```
//!
//! Requests complete in any order: a tag is answered whenever its future finishes.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use curve_blockdev::exec::Notifier;
use curve_blockdev::queue::{QueueSource, RequestFuture};
use curve_blockdev::{BlockDevice, IoFuture, WriteFlags, ZeroFlags};
use libublk::helpers::IoBuf;
use libublk::io::{UblkIOCtx, UblkQueue};
use libublk::{BufDesc, UblkError, UblkIORes, UblkUringData};

use crate::request::{self, Limits, Request};

/// A finished request: its tag and the result for the kernel (bytes, or a negated errno).
pub(crate) type Done = (u16, i32);

/// One ublk queue as the queue loop sees it.
pub(crate) struct UblkSource<'q, 'a> {
    queue: &'q UblkQueue<'q>,
    device: &'a dyn BlockDevice,
    bufs: &'a [IoBuf<u8>],
    limits: Limits,
    notifier: Arc<Notifier>,
    /// Wakes this thread (through `notifier`) when a device future can make progress.
    waker: Waker,
    /// Tags whose new request the kernel has delivered and we have not taken yet.
    arrived: Vec<u16>,
    /// A POLL_ADD on the notifier is pending in the ring.
    armed: bool,
    /// Commits queued in the submission ring and not yet submitted.
    unsubmitted: usize,
    /// The kernel aborted the queue (device stopped or deleted).
    down: bool,
}

impl<'q, 'a> UblkSource<'q, 'a> {
    pub(crate) fn new(
        queue: &'q UblkQueue<'q>,
        device: &'a dyn BlockDevice,
        bufs: &'a [IoBuf<u8>],
        limits: Limits,
        notifier: Arc<Notifier>,
    ) -> Self {
        UblkSource {
            queue,
            device,
            bufs,
            limits,
            waker: Waker::from(notifier.clone()),
            notifier,
            arrived: Vec::with_capacity(bufs.len()),
            armed: false,
            unsubmitted: 0,
            down: false,
        }
    }

    /// Submits what is queued and reaps completions, waiting for `wait` of them.
    fn enter(&mut self, wait: usize) -> io::Result<bool> {
        let arrived = &mut self.arrived;
        let armed = &mut self.armed;
        let notifier = &self.notifier;
        let r = self.queue.flush_and_wake_io_tasks(
            |data, cqe, _last| {
                if data & UblkUringData::Target as u64 != 0 {
                    // Our notifier's poll: a device future woke the thread.
                    *armed = false;
                    notifier.reset();
                } else if cqe.result() == libublk::sys::UBLK_IO_RES_OK as i32 {
                    arrived.push(UblkIOCtx::user_data_to_tag(data) as u16);
                }
                // UBLK_IO_RES_ABORT: the queue is going down; libublk counts it.
            },
            wait,
        );
        self.unsubmitted = 0;
        match r {
            Ok(n) => Ok(n > 0),
            Err(UblkError::QueueIsDown) => {
                self.down = true;
                Ok(true)
            }
            Err(e) => Err(io::Error::other(crate::describe(&e))),
        }
    }

    /// Asks the ring to report the notifier's eventfd becoming readable.
    fn arm(&mut self) -> io::Result<()> {
        if self.armed {
            return Ok(());
        }
        let sqe = io_uring::opcode::PollAdd::new(
            io_uring::types::Fd(self.notifier.as_raw_fd()),
            libc::POLLIN as u32,
        )
        .build()
        .user_data(UblkIOCtx::build_user_data(0, 0, 0, true));
        self.queue
            .ublk_submit_sqe_sync(sqe)
            .map_err(|e| io::Error::other(crate::describe(&e)))?;
        self.armed = true;
        Ok(())
    }

    /// Starts the request the kernel delivered on `tag` and polls it once: a device that
    /// completes at once (RAM, page cache) is answered here, with no future kept; one that
    /// completes later becomes an in-flight future.
    fn start(&mut self, tag: u16) -> Option<RequestFuture<'a, Done>> {
        let iod = self.queue.get_iod(tag);
        let req = match request::parse(iod.op_flags, iod.start_sector, iod.nr_sectors, &self.limits)
        {
            Ok(req) => req,
            Err(errno) => {
                tracing::debug!(tag, op_flags = iod.op_flags, errno, "ublk request refused");
                self.complete((tag, -errno));
                return None;
            }
        };
        let device = self.device;
        let buf = &self.bufs[usize::from(tag)];
        let (ptr, cap) = (buf.as_mut_ptr(), buf.len());
        let (mut io, bytes): (IoFuture<'a>, i32) = match req {
            Request::Read { offset, len } | Request::Write { offset, len, .. } => {
                let len = (len as usize).min(cap);
                // SAFETY: the buffer belongs to this tag alone; the kernel hands a tag at most
                // one request at a time, copies a write's data in before delivering it and a
                // read's data out only after we commit it, so nothing else touches these bytes
                // while the request runs. The buffers outlive every request (the queue loop
                // returns before they are dropped).
                let data = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                let io = match req {
                    Request::Write { fua, .. } => device.write(offset, data, WriteFlags { fua }),
                    _ => device.read(offset, data),
                };
                (io, len as i32)
            }
            Request::Flush => (device.flush(), 0),
            Request::Discard { offset, len } => (device.discard(offset, len), 0),
            Request::WriteZeroes {
                offset,
                len,
                may_unmap,
                fua,
            } => {
                let flags = ZeroFlags {
                    may_unmap,
                    fast_only: false,
                    fua,
                };
                (device.write_zeroes(offset, len, flags), 0)
            }
        };
        let mut cx = Context::from_waker(&self.waker);
        match io.as_mut().poll(&mut cx) {
            Poll::Ready(r) => {
                self.complete((tag, result(tag, r, bytes)));
                None
            }
            Poll::Pending => Some(Box::pin(async move { (tag, result(tag, io.await, bytes)) })),
        }
    }
}

/// The result the kernel gets: the bytes transferred, or the negated errno.
fn result(tag: u16, r: curve_blockdev::IoResult<()>, bytes: i32) -> i32 {
    match r {
        Ok(()) => bytes,
        Err(e) => {
            tracing::debug!(tag, error = %e, "ublk request failed");
            -e.errno()
        }
    }
}

impl<'a> QueueSource<'a> for UblkSource<'_, 'a> {
    type Done = Done;
    type Error = io::Error;

    fn take(&mut self, room: usize, out: &mut Vec<RequestFuture<'a, Done>>) -> io::Result<bool> {
        let mut moved = if self.arrived.is_empty() {
            self.enter(0)?
        } else {
            false
        };
        let n = room.min(self.arrived.len());
        for i in 0..n {
            let tag = self.arrived[i];
            moved = true;
            if let Some(f) = self.start(tag) {
                out.push(f);
            }
        }
        self.arrived.drain(..n);
        Ok(moved)
    }

    fn complete(&mut self, (tag, result): Done) {
        let buf = self.bufs[usize::from(tag)].as_slice();
        if let Err(e) = self.queue.complete_io_cmd_unified(
            tag,
            BufDesc::Slice(buf),
            Ok(UblkIORes::Result(result)),
        ) {
            tracing::error!(tag, error = %crate::describe(&e), "cannot commit a ublk request");
        }
        self.unsubmitted += 1;
    }

    fn send(&mut self) -> io::Result<bool> {
        if self.unsubmitted == 0 {
            return Ok(false);
        }
        self.enter(0)
    }

    fn unsent(&self) -> usize {
        self.unsubmitted
    }

    fn finished(&self) -> bool {
        self.down
    }

    fn park(&mut self, notifier: &Notifier, _want_requests: bool) -> io::Result<()> {
        if self.down {
            // Only in-flight requests are left: wait for their wakeups.
            return curve_blockdev::exec::park(notifier, notifier.as_raw_fd(), false, false);
        }
        self.arm()?;
        self.enter(1).map(|_| ())
    }
}
