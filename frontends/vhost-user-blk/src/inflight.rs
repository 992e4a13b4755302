//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a shared buffer the
//! front-end keeps across back-end restarts, where the back-end marks every request it took
//! from the available ring until its completion is in the used ring. A restarted back-end
//! resubmits what is still marked, in the order it was taken, so requests that were in flight
//! (even completed out of order around them) are neither lost nor run twice.
//!
//! ```text
//!  per queue (64-byte aligned):
//!   u64 features | u16 version (1) | u16 desc_num | u16 last_batch_head | u16 used_idx
//!   desc[desc_num]: u8 inflight | u8 pad[5] | u16 next | u64 counter
//! ```

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use crate::protocol::ProtoError;

const HEADER: usize = 16;
const DESC: usize = 16;

/// Bytes of one queue's region.
pub fn queue_region(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(64)
}

/// The mapped buffer.
#[derive(Debug)]
pub struct Inflight {
    base: *mut u8,
    len: usize,
    fd: OwnedFd,
    /// Queues it covers.
    pub queues: u16,
    /// Ring size it was made for.
    pub queue_size: u16,
}

// SAFETY: the mapping lives as long as Inflight; each queue's worker touches only its region.
unsafe impl Send for Inflight {}
// SAFETY: as above.
unsafe impl Sync for Inflight {}

impl Drop for Inflight {
    fn drop(&mut self) {
        // SAFETY: unmapping what we mapped, once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl Inflight {
    /// A new zeroed buffer (GET_INFLIGHT_FD).
    pub fn create(queues: u16, queue_size: u16) -> Result<Self, ProtoError> {
        if queues == 0 || queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(ProtoError::Bad(format!(
                "inflight for {queues} queues of {queue_size}"
            )));
        }
        let len = usize::from(queues) * queue_region(queue_size);
        let name = std::ffi::CString::new("vhost-blk-inflight").expect("no NUL");
        // SAFETY: memfd_create with a valid name.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizing our memfd (zero-filled).
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let me = Self::map(fd, len, 0, queues, queue_size)?;
        for q in 0..queues {
            let r = me.region(q);
            // SAFETY: the header of queue q's region, inside the mapping.
            unsafe {
                std::ptr::write_volatile(r.add(8).cast::<u16>(), 1);
                std::ptr::write_volatile(r.add(10).cast::<u16>(), queue_size);
            }
        }
        Ok(me)
    }

    /// Maps a buffer the front-end hands back (SET_INFLIGHT_FD).
    pub fn map(
        fd: OwnedFd,
        len: usize,
        offset: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, ProtoError> {
        if queue_size == 0 || len < usize::from(queues) * queue_region(queue_size) {
            return Err(ProtoError::Bad(format!(
                "inflight buffer of {len} bytes for {queues} queues of {queue_size}"
            )));
        }
        // SAFETY: a shared mapping of the descriptor; unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as i64,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Inflight {
            base: p.cast(),
            len,
            fd,
            queues,
            queue_size,
        })
    }

    /// Its descriptor (to hand to the front-end).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Its size.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: a buffer covers at least one queue).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn region(&self, q: u16) -> *mut u8 {
        // SAFETY: q < queues, so the region lies inside the mapping.
        unsafe {
            self.base
                .add(usize::from(q) * queue_region(self.queue_size))
        }
    }
}

/// One queue's view of the buffer, owned by its worker.
#[derive(Debug)]
pub struct QueueInflight {
    _buf: Arc<Inflight>,
    region: *mut u8,
    num: u16,
    counter: u64,
}

// SAFETY: one worker owns a queue's region; the buffer outlives it (Arc).
unsafe impl Send for QueueInflight {}

impl QueueInflight {
    /// Queue `q`'s region, for a ring of `num` entries (None when the buffer does not fit).
    pub fn new(buf: Arc<Inflight>, q: u16, num: u16) -> Option<Self> {
        if q >= buf.queues || num != buf.queue_size {
            return None;
        }
        let region = buf.region(q);
        Some(QueueInflight {
            _buf: buf,
            region,
            num,
            counter: 0,
        })
    }

    fn desc(&self, head: u16) -> *mut u8 {
        // SAFETY: head < num (callers check), inside the region.
        unsafe { self.region.add(HEADER + DESC * usize::from(head)) }
    }

    /// After a restart: settles a completion interrupted midway, and returns the heads still
    /// in flight, in the order they were taken. `used_idx` is the used ring's index.
    pub fn recover(&mut self, used_idx: u16) -> Vec<u16> {
        // SAFETY: header fields and descriptor states of this region.
        unsafe {
            let saved = std::ptr::read_volatile(self.region.add(14).cast::<u16>());
            if saved != used_idx {
                // Died between publishing a used element and recording it: that one is done.
                let last = std::ptr::read_volatile(self.region.add(12).cast::<u16>());
                if last < self.num {
                    std::ptr::write_volatile(self.desc(last), 0);
                }
                std::ptr::write_volatile(self.region.add(14).cast::<u16>(), used_idx);
            }
            let mut pending: Vec<(u64, u16)> = (0..self.num)
                .filter(|h| std::ptr::read_volatile(self.desc(*h)) == 1)
                .map(|h| {
                    (
                        std::ptr::read_volatile(self.desc(h).add(8).cast::<u64>()),
                        h,
                    )
                })
                .collect();
            pending.sort_unstable();
            self.counter = pending.last().map_or(0, |p| p.0);
            pending.into_iter().map(|p| p.1).collect()
        }
    }

    /// Marks `head` taken from the available ring.
    pub fn take(&mut self, head: u16) {
        if head >= self.num {
            return;
        }
        self.counter += 1;
        // SAFETY: descriptor state of head < num.
        unsafe {
            std::ptr::write_volatile(self.desc(head).add(8).cast::<u64>(), self.counter);
            fence(Ordering::Release);
            std::ptr::write_volatile(self.desc(head), 1);
        }
    }

    /// Before publishing `head` in the used ring.
    pub fn completing(&mut self, head: u16) {
        // SAFETY: the header's last_batch_head.
        unsafe { std::ptr::write_volatile(self.region.add(12).cast::<u16>(), head) };
        fence(Ordering::SeqCst);
    }

    /// After publishing `head` in the used ring (whose index is now `used_idx`).
    pub fn completed(&mut self, head: u16, used_idx: u16) {
        // SAFETY: descriptor state of head < num (an invalid head has none), then the
        // header's used_idx, always.
        unsafe {
            if head < self.num {
                std::ptr::write_volatile(self.desc(head), 0);
            }
            fence(Ordering::Release);
            std::ptr::write_volatile(self.region.add(14).cast::<u16>(), used_idx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_in_taken_order_and_settles_an_interrupted_completion() {
        let buf = Arc::new(Inflight::create(2, 8).unwrap());
        let mut q = QueueInflight::new(buf.clone(), 1, 8).unwrap();
        assert!(QueueInflight::new(buf.clone(), 2, 8).is_none());
        for h in [5, 2, 7, 0] {
            q.take(h);
        }
        // 2 completed fully; 7 published in the used ring (idx 2) but not recorded.
        q.completing(2);
        q.completed(2, 1);
        q.completing(7);
        // The back-end dies; a new one maps the same buffer.
        let again = Inflight::map(buf.fd().try_clone().unwrap(), buf.len(), 0, 2, 8).unwrap();
        let mut q2 = QueueInflight::new(Arc::new(again), 1, 8).unwrap();
        assert_eq!(
            q2.recover(2),
            vec![5, 0],
            "taken order, without the completed ones"
        );
        // Queue 0 is untouched.
        let mut q0 = QueueInflight::new(buf, 0, 8).unwrap();
        assert!(q0.recover(0).is_empty());
        // New heads count on from the recovered counter.
        q2.take(3);
        assert_eq!(q2.recover(2), vec![5, 0, 3]);
    }
}
