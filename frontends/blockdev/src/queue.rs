//! The one queue loop every frontend runs: an NBD connection, a part1 connection, a
//! vhost-user virtqueue and a ublk hardware queue are each a [`QueueSource`] served by
//! [`serve`] on a thread of its own.
//!
//! ```text
//!   loop {
//!     take      what has arrived (a socket read, a ring pop, io_uring completions), without
//!               blocking; each request becomes a device future, polled once at once: RAM and
//!               page-cache backends finish right here, others join the in-flight set
//!     collect   finished in-flight futures (their wakers signalled this thread's Notifier)
//!     complete  queue each answer (reply bytes, a used element, a COMMIT_AND_FETCH sqe)
//!     send      every queued answer with one syscall (writev, one call eventfd, io_uring_enter)
//!     park      only when nothing moved and the adaptive poller says stop looking
//!   }
//! ```
//!
//! The thread is its own executor: device futures are polled with a waker that signals the
//! source's [`Notifier`], so a backend that completes on another thread (the cluster client)
//! wakes exactly this thread, and one that completes at once costs nothing. Nothing here is
//! shared or locked: a source owns its buffers, its ring or socket and its answers.
//!
//! The loop ends when the source has finished (the consumer hung up, the queue was aborted) or
//! the notifier was cancelled, and only once every request in flight has been answered.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use futures::stream::{FuturesUnordered, StreamExt};

use crate::exec::{Notifier, Poller};

/// A request running on the device: resolves to what the source needs to answer it.
pub type RequestFuture<'a, D> = Pin<Box<dyn Future<Output = D> + 'a>>;

/// One connection or queue of a frontend: where requests come from and answers go.
pub trait QueueSource<'a> {
    /// What a finished request hands back to be answered.
    type Done;
    /// Why the source cannot go on (the loop ends with it).
    type Error: From<io::Error>;

    /// Takes what has arrived without blocking: at most `room` requests to run are pushed on
    /// `out`; requests refused on parsing are answered at once (queued, not sent). Returns
    /// whether anything moved.
    fn take(
        &mut self,
        room: usize,
        out: &mut Vec<RequestFuture<'a, Self::Done>>,
    ) -> Result<bool, Self::Error>;

    /// Queues the answer of a finished request.
    fn complete(&mut self, done: Self::Done);

    /// Sends what [`complete`](Self::complete) and [`take`](Self::take) queued, batched into
    /// as few syscalls as the transport allows. Returns whether anything moved.
    fn send(&mut self) -> Result<bool, Self::Error>;

    /// Answers queued but not yet sent (they count against the in-flight limit).
    fn unsent(&self) -> usize {
        0
    }

    /// Bytes of request and reply payloads the source holds now: buffers of requests in
    /// flight, of a request being read, of answers not yet sent. [`serve_within`] takes no new
    /// request while they are over its budget (the socket is not read: backpressure).
    fn held_bytes(&self) -> usize {
        0
    }

    /// No more requests will come (hang-up, disconnect command, aborted queue).
    fn finished(&self) -> bool;

    /// Sleeps until the source may have something (`want_requests`: new requests can be
    /// taken; otherwise wait only for the transport to take answers) or `notifier` fires.
    fn park(&mut self, notifier: &Notifier, want_requests: bool) -> Result<(), Self::Error>;
}

/// Serves `source` until it finishes or `notifier` is cancelled, with at most `max_queued`
/// requests in flight or answers unsent; in-flight requests are answered before it returns.
pub fn serve<'a, S: QueueSource<'a>>(
    source: &mut S,
    notifier: &Arc<Notifier>,
    max_queued: usize,
) -> Result<(), S::Error> {
    serve_within(source, notifier, max_queued, &Budget::unlimited())
}

/// Bytes of payload the queues of a process may hold: each queue up to `per_queue`, all
/// together up to `total` (see [`QueueSource::held_bytes`]). A queue over either takes no new
/// request until its own requests finish; a queue holding nothing may always take one, so
/// every queue makes progress, and memory stays under `total` plus one request per queue.
#[derive(Debug)]
pub struct Budget {
    /// Bytes one queue may hold.
    pub per_queue: usize,
    /// Bytes all queues sharing this budget may hold.
    pub total: usize,
    held: std::sync::atomic::AtomicUsize,
}

impl Budget {
    /// A budget of `per_queue` bytes per queue and `total` for all.
    pub const fn new(per_queue: usize, total: usize) -> Self {
        Budget {
            per_queue,
            total,
            held: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// No limit.
    pub const fn unlimited() -> Self {
        Self::new(usize::MAX, usize::MAX)
    }

    /// Bytes all queues hold now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether a queue holding `own` bytes is over this budget (its own share or the total):
    /// a source's `take` stops there too, between the requests of one read from its socket.
    pub fn over(&self, own: usize) -> bool {
        own >= self.per_queue || self.held() >= self.total
    }
}

/// The budget every socket queue of a process shares (NBD and part1 connections, whose
/// clients may pipeline as much as they like): 64 MiB a connection (two of NBD's largest
/// writes), 512 MiB for all.
pub static SOCKET_QUEUES: Budget = Budget::new(64 << 20, 512 << 20);

/// [`serve`], with the payload bytes the source holds kept within `budget`.
pub fn serve_within<'a, S: QueueSource<'a>>(
    source: &mut S,
    notifier: &Arc<Notifier>,
    max_queued: usize,
    budget: &Budget,
) -> Result<(), S::Error> {
    // What this queue has counted into the shared total (given back when the loop ends).
    struct Counted<'b>(&'b Budget, usize);
    impl Counted<'_> {
        fn set(&mut self, now: usize) {
            if now > self.1 {
                self.0.held.fetch_add(now - self.1, Ordering::Relaxed);
            } else {
                self.0.held.fetch_sub(self.1 - now, Ordering::Relaxed);
            }
            self.1 = now;
        }
    }
    impl Drop for Counted<'_> {
        fn drop(&mut self) {
            self.set(0);
        }
    }
    let mut counted = Counted(budget, 0);
    // Requests that may be taken now: none while over the budget with requests of our own in
    // flight (their answers make room), else up to `max_queued` in flight or unsent.
    let room_now = |source: &S, inflight: usize, counted: &mut Counted<'_>| {
        counted.set(source.held_bytes());
        let busy = inflight + source.unsent();
        if busy > 0 && counted.0.over(counted.1) {
            0
        } else {
            max_queued.saturating_sub(busy)
        }
    };
    let mut inflight: FuturesUnordered<RequestFuture<'a, S::Done>> = FuturesUnordered::new();
    let waker = Waker::from(notifier.clone());
    let mut cx = Context::from_waker(&waker);
    let mut poller = Poller::default();
    let mut fresh = Vec::new();
    loop {
        let stopping = notifier.cancelled.load(Ordering::Acquire) || source.finished();
        let room = room_now(source, inflight.len(), &mut counted);
        let mut progress = false;
        if !stopping && room > 0 {
            progress |= source.take(room, &mut fresh)?;
            for mut fut in fresh.drain(..) {
                match fut.as_mut().poll(&mut cx) {
                    Poll::Ready(done) => source.complete(done),
                    Poll::Pending => inflight.push(fut),
                }
            }
        }
        while let Poll::Ready(Some(done)) = inflight.poll_next_unpin(&mut cx) {
            source.complete(done);
            progress = true;
        }
        progress |= source.send()?;
        if stopping && inflight.is_empty() && source.unsent() == 0 {
            return Ok(());
        }
        if progress {
            poller.progressed();
        } else if stopping || !poller.keep_polling() {
            let room = room_now(source, inflight.len(), &mut counted);
            source.park(notifier, !stopping && room > 0)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A source fed from a list; requests finish on another thread after a delay.
    struct Scripted {
        incoming: VecDeque<u32>,
        answered: Vec<u32>,
        sent: usize,
        parks: usize,
    }

    impl<'a> QueueSource<'a> for Scripted {
        type Done = u32;
        type Error = io::Error;
        fn take(&mut self, room: usize, out: &mut Vec<RequestFuture<'a, u32>>) -> io::Result<bool> {
            let n = room.min(self.incoming.len());
            for id in self.incoming.drain(..n) {
                if id % 2 == 0 {
                    out.push(Box::pin(std::future::ready(id)));
                } else {
                    let (tx, rx) = futures::channel::oneshot::channel();
                    std::thread::spawn(move || {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        let _ = tx.send(id);
                    });
                    out.push(Box::pin(async move { rx.await.unwrap() }));
                }
            }
            Ok(n > 0)
        }
        fn complete(&mut self, done: u32) {
            self.answered.push(done);
        }
        fn send(&mut self) -> io::Result<bool> {
            let moved = self.sent < self.answered.len();
            self.sent = self.answered.len();
            Ok(moved)
        }
        fn finished(&self) -> bool {
            self.incoming.is_empty()
        }
        fn park(&mut self, n: &Notifier, _want: bool) -> io::Result<()> {
            self.parks += 1;
            use std::os::fd::AsRawFd;
            crate::exec::park(n, n.as_raw_fd(), false, false)
        }
    }

    #[test]
    fn every_request_is_answered_before_the_loop_ends() {
        let mut s = Scripted {
            incoming: (0..40).collect(),
            answered: Vec::new(),
            sent: 0,
            parks: 0,
        };
        let n = Notifier::new().unwrap();
        serve(&mut s, &n, 8).unwrap();
        let mut got = s.answered.clone();
        got.sort();
        assert_eq!(got, (0..40).collect::<Vec<_>>());
        // Even ids finish inline, in order; odd ones on another thread, later.
        assert!(s.parks > 0, "the loop slept while requests ran elsewhere");
    }
}
