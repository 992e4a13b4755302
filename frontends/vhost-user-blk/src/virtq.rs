//! A split virtqueue in guest memory, from the device's side: take available heads, read
//! their descriptor chains (bounded, inside guest memory), publish used elements, and decide
//! when the guest wants a notification (event idx).

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use crate::memory::GuestMemory;
use crate::request::{Desc, F_NEXT};

const F_INDIRECT: u16 = 4;
/// Entries of one indirect table we walk (Linux sizes them by seg_max + 2).
pub const MAX_INDIRECT: u32 = 1024;

/// Descriptor `i` of the table at `table` and its `next` field.
fn read_desc(table: *mut u8, i: u16) -> (Desc, u16) {
    // SAFETY: callers pass i < the table's entry count, the table being inside guest memory.
    unsafe {
        let p = table.add(16 * usize::from(i));
        (
            Desc {
                addr: std::ptr::read_volatile(p.cast::<u64>()),
                len: std::ptr::read_volatile(p.add(8).cast::<u32>()),
                flags: std::ptr::read_volatile(p.add(12).cast::<u16>()),
            },
            std::ptr::read_volatile(p.add(14).cast::<u16>()),
        )
    }
}

/// Follows `next` links from entry `start` of a table of `n` descriptors; at most `n` long.
/// Buffers outside guest memory are the request parser's and executor's to refuse (IOERR in
/// the status byte); only a chain that cannot be walked is refused here.
fn walk(table: *mut u8, n: u16, start: u16) -> Option<Vec<Desc>> {
    let mut out = Vec::new();
    let mut i = start;
    loop {
        if i >= n || out.len() >= usize::from(n) {
            return None;
        }
        let (d, next) = read_desc(table, i);
        if d.flags & F_INDIRECT != 0 {
            // Only a ring's head may be indirect (alone); a table must not point to another.
            return None;
        }
        out.push(d);
        if d.flags & F_NEXT == 0 {
            return Some(out);
        }
        i = next;
    }
}

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

    /// The chain starting at `head`, following an indirect table when the head points to one
    /// (at most [`MAX_INDIRECT`] entries, no nesting); None when it cannot be walked.
    pub fn chain(&self, head: u16) -> Option<Vec<Desc>> {
        if head >= self.num {
            return None;
        }
        let first = read_desc(self.desc, head);
        if first.0.flags & F_INDIRECT != 0 {
            // An indirect head stands alone (no NEXT) and points to a table of whole
            // descriptors in guest memory, walked from its entry 0.
            let d = first.0;
            if d.flags & F_NEXT != 0 || d.len == 0 || !d.len.is_multiple_of(16) {
                return None;
            }
            let n = d.len / 16;
            if n > MAX_INDIRECT {
                return None;
            }
            let table = self.mem.gpa(d.addr, u64::from(d.len))?;
            if !(table as usize).is_multiple_of(8) {
                return None;
            }
            return walk(table, n as u16, 0);
        }
        walk(self.desc, self.num, head)
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

#[cfg(test)]
mod tests {
    use crate::fuzzing::guest_memory;
    use crate::request::F_WRITE;

    use super::*;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        d
    }

    /// A ring of 4 (descriptors at 0, avail at 0x100, used at 0x200) whose avail ring offers
    /// `heads`, with `table` written at 0x1000.
    fn ring(descs: &[[u8; 16]], heads: &[u16], table: &[[u8; 16]]) -> Vring {
        let mut m = vec![0u8; 0x2000];
        for (i, d) in descs.iter().enumerate() {
            m[16 * i..16 * i + 16].copy_from_slice(d);
        }
        m[0x102..0x104].copy_from_slice(&(heads.len() as u16).to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            m[0x104 + 2 * i..0x106 + 2 * i].copy_from_slice(&h.to_le_bytes());
        }
        for (i, d) in table.iter().enumerate() {
            m[0x1000 + 16 * i..0x1010 + 16 * i].copy_from_slice(d);
        }
        Vring::new(guest_memory(&m), 4, 0, 0x100, 0x200, 0, false).unwrap()
    }

    #[test]
    fn direct_and_indirect_chains() {
        // Head 0: a direct chain 0 -> 1 -> 2. Head 3: an indirect table of 3 at 0x1000
        // (Linux's form for multi-segment requests), longer than the ring itself would allow.
        let table = [
            desc(0x1800, 16, F_NEXT, 1),
            desc(0x1900, 512, F_NEXT | F_WRITE, 2),
            desc(0x1a00, 1, F_WRITE, 0),
        ];
        let mut r = ring(
            &[
                desc(0x10, 16, F_NEXT, 1),
                desc(0x20, 512, F_NEXT | F_WRITE, 2),
                desc(0x30, 1, F_WRITE, 0),
                desc(0x1000, 48, F_INDIRECT, 0),
            ],
            &[0, 3],
            &table,
        );
        let h = r.pop().unwrap();
        assert_eq!(r.chain(h).unwrap().len(), 3);
        let h = r.pop().unwrap();
        let c = r.chain(h).unwrap();
        assert_eq!(
            c.iter().map(|d| (d.addr, d.len)).collect::<Vec<_>>(),
            [(0x1800, 16), (0x1900, 512), (0x1a00, 1)]
        );
        assert!(r.pop().is_none());
    }

    #[test]
    fn broken_indirect_tables_are_refused() {
        let t = [desc(0x1800, 16, F_NEXT, 1), desc(0x1900, 1, F_WRITE, 0)];
        for head in [
            desc(0x1000, 33, F_INDIRECT, 0),          // not whole descriptors
            desc(0x1000, 0, F_INDIRECT, 0),           // empty
            desc(0x1000, 32, F_INDIRECT | F_NEXT, 1), // indirect and next
            desc(0xf000_0000, 32, F_INDIRECT, 0),     // outside guest memory
            desc(0x1000, 16 * 2048, F_INDIRECT, 0),   // too long
            desc(0x1004, 32, F_INDIRECT, 0),          // misaligned
        ] {
            let r = ring(&[head], &[0], &t);
            assert!(r.chain(0).is_none(), "{head:?}");
        }
        // A loop inside the table, a next past its end, a nested indirect.
        for table in [
            [desc(0x1800, 16, F_NEXT, 1), desc(0x1900, 1, F_NEXT, 0)],
            [desc(0x1800, 16, F_NEXT, 5), desc(0x1900, 1, F_WRITE, 0)],
            [desc(0x1000, 32, F_INDIRECT, 0), desc(0x1900, 1, F_WRITE, 0)],
        ] {
            let r = ring(&[desc(0x1000, 32, F_INDIRECT, 0)], &[0], &table);
            assert!(r.chain(0).is_none());
        }
    }
}
