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
    pub fn reset(&self) {
        self.armed.store(false, Ordering::Release);
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut v).cast(), 8) };
    }

    /// Stops the connection: it finishes what is in flight and closes.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.notify();
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
