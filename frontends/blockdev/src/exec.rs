//! The executor of a frontend queue or connection thread: an eventfd that wakers signal, and
//! a poll(2) on it together with the thread's socket. Device futures that do not complete at
//! once wake the thread through their [`std::task::Waker`] (made from the [`Notifier`]); the
//! socket wakes it through poll. No runtime, no cross-thread hand-off on the data path.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Wake;

/// An eventfd plus a flag that collapses repeated wakes into one write.
#[derive(Debug)]
pub struct Notifier {
    fd: OwnedFd,
    armed: AtomicBool,
    /// Set when the connection must stop taking requests.
    pub cancelled: AtomicBool,
    /// Set with `cancelled` when the stop is for a hand-over to another process: the
    /// connection stops between requests and keeps its transport open.
    pub handing_over: AtomicBool,
}

impl Notifier {
    pub fn new() -> io::Result<Arc<Self>> {
        // SAFETY: eventfd creates a new descriptor; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Notifier {
            // SAFETY: fd is a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
        }))
    }

    /// Wakes the thread parked in [`park`].
    pub fn notify(&self) {
        if !self.armed.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
        }
    }

    /// Consumes a pending notification (called by the parked thread after waking).
    ///
    /// The eventfd is drained before the flag is cleared: a `notify` racing with this either
    /// finds the flag still set (and the caller, which polls everything after waking, sees
    /// its work) or writes again after the drain. Clearing first could let the drain swallow
    /// a write whose flag then stays set, muting every later `notify`.
    pub fn reset(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut v).cast(), 8) };
        self.armed.store(false, Ordering::Release);
    }

    /// Stops the connection for a hand-over: it finishes what is in flight, answers it, and
    /// stops between requests with its transport open (see `handing_over`).
    pub fn hand_over(&self) {
        self.handing_over.store(true, Ordering::Release);
        self.cancel();
    }

    /// Whether the stop was [`hand_over`](Self::hand_over).
    pub fn is_handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Acquire)
    }

    /// Stops the connection: it finishes what is in flight and closes.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.notify();
    }
}

impl std::os::fd::AsRawFd for Notifier {
    /// The eventfd, for callers that poll it among their own descriptors.
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Wake for Notifier {
    fn wake(self: Arc<Self>) {
        self.notify();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.notify();
    }
}

/// Sleeps until `sock` is readable (if `read`), writable (if `write`), or `n` is notified.
pub fn park(n: &Notifier, sock: RawFd, read: bool, write: bool) -> io::Result<()> {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    let mut fds = [
        libc::pollfd {
            fd: sock,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: n.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a valid array of two pollfd structures.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if fds[1].revents != 0 {
        n.reset();
    }
    Ok(())
}

/// A reply waiting to be written: a small header, optional variable bytes, optional data.
#[derive(Debug)]
pub struct Reply {
    head: [u8; 32],
    head_len: u8,
    extra: Vec<u8>,
    data: Option<crate::AlignedBuf>,
}

impl Reply {
    /// A reply made of `head` (at most 32 bytes).
    pub fn new(head: &[u8]) -> Self {
        let mut r = Reply {
            head: [0; 32],
            head_len: head.len() as u8,
            extra: Vec::new(),
            data: None,
        };
        r.head[..head.len()].copy_from_slice(head);
        r
    }

    /// Adds variable bytes after the header.
    pub fn with_extra(mut self, extra: Vec<u8>) -> Self {
        self.extra = extra;
        self
    }

    /// Adds a data buffer, sent from where it is (no copy) and then returned to the pool.
    pub fn with_data(mut self, data: crate::AlignedBuf) -> Self {
        self.data = Some(data);
        self
    }

    fn len(&self) -> usize {
        self.head_len as usize + self.extra.len() + self.data.as_ref().map_or(0, |d| d.len())
    }
}

/// Replies queued on a connection, written with one `writev` per call to [`OutQueue::flush`].
#[derive(Debug, Default)]
pub struct OutQueue {
    q: std::collections::VecDeque<Reply>,
    /// Bytes of the front reply already written.
    written: usize,
    /// Bytes of the replies queued, written or not.
    bytes: usize,
}

const MAX_IOVECS: usize = 64;

impl OutQueue {
    /// Queues a reply.
    pub fn push(&mut self, r: Reply) {
        self.bytes += r.len();
        self.q.push_back(r);
    }

    /// Bytes of the replies not yet fully written (their data buffers are held until then).
    pub fn bytes(&self) -> usize {
        self.bytes - self.written
    }

    /// Replies not yet fully written.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Whether everything has been written.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Writes as much as `writev` takes; data buffers of written replies go back to `pool`.
    /// Returns whether anything was written (false when the socket would block).
    pub fn flush(
        &mut self,
        writev: impl FnOnce(&[io::IoSlice<'_>]) -> io::Result<usize>,
        pool: &mut crate::BufPool,
    ) -> io::Result<bool> {
        let mut iov = [io::IoSlice::new(&[]); MAX_IOVECS];
        let mut n_iov = 0;
        let mut skip = self.written;
        'fill: for r in &self.q {
            let parts: [&[u8]; 3] = [
                &r.head[..r.head_len as usize],
                &r.extra,
                r.data.as_deref().unwrap_or(&[]),
            ];
            for part in parts {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                iov[n_iov] = io::IoSlice::new(&part[skip..]);
                skip = 0;
                n_iov += 1;
                if n_iov == MAX_IOVECS {
                    break 'fill;
                }
            }
        }
        let mut n = match writev(&iov[..n_iov]) {
            Ok(n) => n,
            Err(e) if is_transient(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        n += self.written;
        while let Some(front) = self.q.front() {
            let len = front.len();
            if n < len {
                break;
            }
            n -= len;
            self.bytes -= len;
            let r = self.q.pop_front().expect("front exists");
            if let Some(buf) = r.data {
                pool.give(buf);
            }
        }
        self.written = n;
        Ok(true)
    }
}

/// Whether a socket error only means "not now" (would block, interrupted).
pub fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Adaptive polling of a connection thread.
///
/// After traffic the next request usually follows within microseconds: looking for it again
/// beats sleeping and paying a cross-CPU wakeup (the QD1 latency win). Each look yields the CPU;
/// if a yield hands the CPU to another thread for a while, this CPU is shared with someone who
/// needs it (the client itself, when both are on one CPU) and the poller stops polling for
/// 100 ms, so it does not compete with the work it waits for.
#[derive(Debug)]
pub struct Poller {
    window: std::time::Duration,
    last: std::time::Instant,
    /// No polling before this instant (set when the CPU turned out to be shared).
    quiet_until: std::time::Instant,
}

impl Default for Poller {
    fn default() -> Self {
        let now = std::time::Instant::now();
        Poller {
            window: poll_window(),
            last: now,
            quiet_until: now,
        }
    }
}

impl Poller {
    /// Records progress: the polling window starts again.
    pub fn progressed(&mut self) {
        self.last = std::time::Instant::now();
    }

    /// Whether to look again instead of sleeping (yields the CPU once when it says yes).
    pub fn keep_polling(&mut self) -> bool {
        let t = std::time::Instant::now();
        if t.duration_since(self.last) >= self.window || t < self.quiet_until {
            return false;
        }
        // A yield that hands the CPU to another thread counts as an involuntary switch; one
        // that finds nobody else runnable does not (nor does the hypervisor pausing us).
        // Kernel threads blink in briefly; a client sharing the CPU runs for a while.
        let before = involuntary_switches();
        std::thread::yield_now();
        if involuntary_switches() != before && t.elapsed() > std::time::Duration::from_micros(10) {
            self.quiet_until = t + std::time::Duration::from_millis(100);
        }
        true
    }
}

fn involuntary_switches() -> i64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut u);
        u.ru_nivcsw
    }
}

/// Puts the calling thread under SCHED_BATCH: a client that wakes it does not get preempted
/// by it, so when client and server share a CPU the client submits a whole batch before the
/// server answers it in one go. Threads on an otherwise idle CPU run at once either way.
pub fn batch_scheduling() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the policy of the calling thread with a valid parameter.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

/// How long a connection keeps polling its socket after the last request before it sleeps
/// (`CURVE_NBD_POLL_US`, default 50 µs; 0 turns polling off).
fn poll_window() -> std::time::Duration {
    static SPIN: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("CURVE_NBD_POLL_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        std::time::Duration::from_micros(us)
    })
}
