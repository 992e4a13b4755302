//! A split virtqueue in guest memory, from the device's side: take available heads, read
//! their descriptor chains (bounded, inside guest memory), publish used elements, and decide
//! when the guest wants a notification (event idx).

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use crate::memory::GuestMemory;
use crate::request::{Desc, F_NEXT};

const F_INDIRECT: u16 = 4;

/// One queue's rings.
#[derive(Debug)]
pub struct Vring {
    mem: Arc<GuestMemory>,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    /// Ring size.
    pub num: u16,
    /// Next available entry to take.
    pub last_avail: u16,
    used_idx: u16,
    event_idx: bool,
    signalled_used: Option<u16>,
}

// SAFETY: the pointers are into `mem`, which the Vring keeps alive; one worker thread owns it.
unsafe impl Send for Vring {}

impl Vring {
    /// The rings at front-end addresses `desc`, `avail`, `used`, or None when outside memory.
    pub fn new(
        mem: Arc<GuestMemory>,
        num: u16,
        desc: u64,
        avail: u64,
        used: u64,
        base: u16,
        event_idx: bool,
    ) -> Option<Self> {
        let n = u64::from(num);
        if num == 0 || !num.is_power_of_two() {
            return None;
        }
        let d = mem.uaddr(desc, 16 * n)?;
        let a = mem.uaddr(avail, 6 + 2 * n)?;
        let u = mem.uaddr(used, 6 + 8 * n)?;
        // The alignment virtio requires (and our volatile accesses need).
        if !(d as usize).is_multiple_of(16)
            || !(a as usize).is_multiple_of(2)
            || !(u as usize).is_multiple_of(4)
        {
            return None;
        }
        // SAFETY: the used index of this ring, inside memory (checked above).
        let used_idx = unsafe { std::ptr::read_volatile(u.add(2).cast::<u16>()) };
        Some(Vring {
            mem,
            desc: d,
            avail: a,
            used: u,
            num,
            last_avail: base,
            used_idx,
            event_idx,
            signalled_used: None,
        })
    }

    fn avail_idx(&self) -> u16 {
        // SAFETY: the avail index, inside memory.
        let i = unsafe { std::ptr::read_volatile(self.avail.add(2).cast::<u16>()) };
        fence(Ordering::Acquire);
        i
    }

    /// The next available head, if the guest added one.
    pub fn pop(&mut self) -> Option<u16> {
        let avail = self.avail_idx();
        if avail == self.last_avail {
            return None;
        }
        if avail.wrapping_sub(self.last_avail) > self.num {
            // More entries than the ring holds: a broken ring; take nothing from it.
            tracing::warn!(avail, last = self.last_avail, "avail index beyond the ring");
            return None;
        }
        let slot = usize::from(self.last_avail % self.num);
        // SAFETY: ring entry `slot` < num of the avail ring.
        let head = unsafe { std::ptr::read_volatile(self.avail.add(4 + 2 * slot).cast::<u16>()) };
        self.last_avail = self.last_avail.wrapping_add(1);
        Some(head)
    }

    /// With event idx: asks the guest to kick when it adds past what was taken. Returns
    /// whether more arrived meanwhile (take them before sleeping).
    pub fn arm(&mut self) -> bool {
        if self.event_idx {
            let at = 4 + 8 * usize::from(self.num);
            // SAFETY: avail_event, right after the used ring's entries.
            unsafe { std::ptr::write_volatile(self.used.add(at).cast::<u16>(), self.last_avail) };
            fence(Ordering::SeqCst);
        }
        self.avail_idx() != self.last_avail
    }

    /// The chain starting at `head` (no indirect descriptors, at most `num` long); None when
    /// it cannot be walked.
    pub fn chain(&self, head: u16) -> Option<Vec<Desc>> {
        let mut out = Vec::new();
        let mut i = head;
        loop {
            if i >= self.num || out.len() >= usize::from(self.num) {
                return None;
            }
            // SAFETY: descriptor i < num of the table.
            let d = unsafe {
                let p = self.desc.add(16 * usize::from(i));
                Desc {
                    addr: std::ptr::read_volatile(p.cast::<u64>()),
                    len: std::ptr::read_volatile(p.add(8).cast::<u32>()),
                    flags: std::ptr::read_volatile(p.add(12).cast::<u16>()),
                }
            };
            let next = {
                // SAFETY: as above.
                unsafe {
                    std::ptr::read_volatile(self.desc.add(16 * usize::from(i) + 14).cast::<u16>())
                }
            };
            // Buffers outside guest memory are the request parser's and executor's to refuse
            // (IOERR in the status byte); only a chain that cannot be walked is refused here.
            if d.flags & F_INDIRECT != 0 {
                return None;
            }
            out.push(d);
            if d.flags & F_NEXT == 0 {
                return Some(out);
            }
            i = next;
        }
    }

    /// Publishes a used element.
    pub fn push_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.used_idx % self.num);
        // SAFETY: used ring entry `slot` < num, then the used index.
        unsafe {
            let e = self.used.add(4 + 8 * slot);
            std::ptr::write_volatile(e.cast::<u32>(), u32::from(head));
            std::ptr::write_volatile(e.add(4).cast::<u32>(), len);
            fence(Ordering::Release);
            self.used_idx = self.used_idx.wrapping_add(1);
            std::ptr::write_volatile(self.used.add(2).cast::<u16>(), self.used_idx);
        }
    }

    /// Whether the guest wants a notification for what was used since the last one.
    pub fn needs_notify(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let new = self.used_idx;
        let old = self.signalled_used.replace(new);
        if !self.event_idx {
            // SAFETY: the avail ring's flags.
            let flags = unsafe { std::ptr::read_volatile(self.avail.cast::<u16>()) };
            return flags & 1 == 0 && old != Some(new);
        }
        let Some(old) = old else {
            return true;
        };
        let at = 4 + 2 * usize::from(self.num);
        // SAFETY: used_event, right after the avail ring's entries.
        let event = unsafe { std::ptr::read_volatile(self.avail.add(at).cast::<u16>()) };
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// The used ring's index as this side last published it.
    pub fn used_idx(&self) -> u16 {
        self.used_idx
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }
}
