//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a shared buffer the
//! front-end keeps across back-end restarts, where the back-end marks every request it took
//! from the available ring until its completion is in the used ring. A restarted back-end
//! resubmits what is still marked, in the order it was taken, so requests that were in flight
//! (even completed out of order around them) are neither lost nor run twice. The buffer is
//! mapped and accessed through `vm-memory` (atomic, bounds-checked accesses).
//!
//! ```text
//!  per queue (64-byte aligned):
//!   u64 features | u16 version (1) | u16 desc_num | u16 last_batch_head | u16 used_idx
//!   desc[desc_num]: u8 inflight | u8 pad[5] | u16 next | u64 counter
//! ```

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

use crate::Error;

const HEADER: usize = 16;
const DESC: usize = 16;

/// Bytes of one queue's region.
pub fn queue_region(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(64)
}

/// The mapped buffer.
#[derive(Debug)]
pub struct Inflight {
    map: MmapRegion<()>,
    file: File,
    len: usize,
    offset: u64,
    /// Queues it covers.
    pub queues: u16,
    /// Ring size it was made for.
    pub queue_size: u16,
}

impl Inflight {
    /// A new zeroed buffer (GET_INFLIGHT_FD).
    pub fn create(queues: u16, queue_size: u16) -> Result<Self, Error> {
        if queues == 0 || queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(Error::Bad(format!(
                "inflight for {queues} queues of {queue_size}"
            )));
        }
        let len = usize::from(queues) * queue_region(queue_size);
        // SAFETY: memfd_create with a valid name.
        let fd = unsafe { libc::memfd_create(c"vhost-blk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        let me = Self::map(file, len, 0, queues, queue_size)?;
        for q in 0..queues {
            let r = me.region_offset(q);
            me.store_u16(r + 8, 1, Ordering::Relaxed);
            me.store_u16(r + 10, queue_size, Ordering::Relaxed);
        }
        Ok(me)
    }

    /// Maps a buffer the front-end hands back (SET_INFLIGHT_FD).
    pub fn map(
        file: File,
        len: usize,
        offset: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, Error> {
        if queue_size == 0 || len < usize::from(queues) * queue_region(queue_size) {
            return Err(Error::Bad(format!(
                "inflight buffer of {len} bytes for {queues} queues of {queue_size}"
            )));
        }
        let map = MmapRegion::from_file(FileOffset::new(file.try_clone()?, offset), len)
            .map_err(|e| Error::Bad(format!("cannot map the inflight buffer: {e}")))?;
        Ok(Inflight {
            map,
            file,
            len,
            offset,
            queues,
            queue_size,
        })
    }

    /// Its file (to hand to the front-end).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where it starts in its file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Its size.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: a buffer covers at least one queue).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn region_offset(&self, q: u16) -> usize {
        usize::from(q) * queue_region(self.queue_size)
    }

    fn store_u16(&self, at: usize, v: u16, order: Ordering) {
        let _ = self.map.as_volatile_slice().store(v, at, order);
    }

    fn load_u16(&self, at: usize, order: Ordering) -> u16 {
        self.map.as_volatile_slice().load(at, order).unwrap_or(0)
    }

    fn store_u8(&self, at: usize, v: u8, order: Ordering) {
        let _ = self.map.as_volatile_slice().store(v, at, order);
    }

    fn load_u8(&self, at: usize, order: Ordering) -> u8 {
        self.map.as_volatile_slice().load(at, order).unwrap_or(0)
    }

    fn store_u64(&self, at: usize, v: u64, order: Ordering) {
        let _ = self.map.as_volatile_slice().store(v, at, order);
    }

    fn load_u64(&self, at: usize, order: Ordering) -> u64 {
        self.map.as_volatile_slice().load(at, order).unwrap_or(0)
    }
}

/// One queue's view of the buffer, owned by its worker.
#[derive(Debug)]
pub struct QueueInflight {
    buf: Arc<Inflight>,
    region: usize,
    num: u16,
    counter: u64,
}

impl QueueInflight {
    /// Queue `q`'s region, for a ring of `num` entries (None when the buffer does not fit).
    pub fn new(buf: Arc<Inflight>, q: u16, num: u16) -> Option<Self> {
        if q >= buf.queues || num != buf.queue_size {
            return None;
        }
        let region = buf.region_offset(q);
        Some(QueueInflight {
            buf,
            region,
            num,
            counter: 0,
        })
    }

    fn desc(&self, head: u16) -> usize {
        self.region + HEADER + DESC * usize::from(head)
    }

    /// After a restart: settles a completion interrupted midway, and returns the heads still
    /// in flight, in the order they were taken. `used_idx` is the used ring's index.
    pub fn recover(&mut self, used_idx: u16) -> Vec<u16> {
        let b = &self.buf;
        let saved = b.load_u16(self.region + 14, Ordering::Acquire);
        if saved != used_idx {
            // Died between publishing a used element and recording it: that one is done.
            let last = b.load_u16(self.region + 12, Ordering::Acquire);
            if last < self.num {
                b.store_u8(self.desc(last), 0, Ordering::Relaxed);
            }
            b.store_u16(self.region + 14, used_idx, Ordering::Release);
        }
        let mut pending: Vec<(u64, u16)> = (0..self.num)
            .filter(|h| b.load_u8(self.desc(*h), Ordering::Acquire) == 1)
            .map(|h| (b.load_u64(self.desc(h) + 8, Ordering::Relaxed), h))
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |p| p.0);
        pending.into_iter().map(|p| p.1).collect()
    }

    /// Marks `head` taken from the available ring.
    pub fn take(&mut self, head: u16) {
        if head >= self.num {
            return;
        }
        self.counter += 1;
        self.buf
            .store_u64(self.desc(head) + 8, self.counter, Ordering::Relaxed);
        self.buf.store_u8(self.desc(head), 1, Ordering::Release);
    }

    /// Before publishing `head` in the used ring.
    pub fn completing(&mut self, head: u16) {
        self.buf.store_u16(self.region + 12, head, Ordering::SeqCst);
    }

    /// After publishing `head` in the used ring (whose index is now `used_idx`).
    pub fn completed(&mut self, head: u16, used_idx: u16) {
        if head < self.num {
            self.buf.store_u8(self.desc(head), 0, Ordering::Relaxed);
        }
        self.buf
            .store_u16(self.region + 14, used_idx, Ordering::Release);
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
        let again = Inflight::map(buf.file().try_clone().unwrap(), buf.len(), 0, 2, 8).unwrap();
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
