//! One split virtqueue from the device's side, on `virtio-queue`: available heads and their
//! descriptor chains (direct or through an indirect table), used elements, event idx and
//! notification suppression. What it does not provide is here: ring addresses given as
//! front-end virtual addresses, and walking the chain of a head known from elsewhere (the
//! inflight buffer's, after a restart: `DescriptorChain::new` is private upstream).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::Memory;
use crate::request::{Desc, F_NEXT};

const F_INDIRECT: u16 = 4;
/// Descriptors of one chain we accept (Linux sizes indirect tables by seg_max + 2).
pub const MAX_INDIRECT: u32 = 1024;

/// One queue's rings.
#[derive(Debug)]
pub struct Vring {
    mem: Arc<Memory>,
    queue: Queue,
    desc_table: u64,
}

fn split(addr: u64) -> (Option<u32>, Option<u32>) {
    (Some(addr as u32), Some((addr >> 32) as u32))
}

impl Vring {
    /// The rings at front-end addresses `desc`, `avail`, `used`, resuming at `base`, or None
    /// when they are outside guest memory or misaligned.
    pub fn new(
        mem: Arc<Memory>,
        num: u16,
        desc: u64,
        avail: u64,
        used: u64,
        base: u16,
        event_idx: bool,
    ) -> Option<Self> {
        if num == 0 || !num.is_power_of_two() {
            return None;
        }
        let n = u64::from(num);
        let d = mem.uaddr_to_gpa(desc, 16 * n)?;
        let a = mem.uaddr_to_gpa(avail, 6 + 2 * n)?;
        let u = mem.uaddr_to_gpa(used, 6 + 8 * n)?;
        // The alignment virtio requires of split rings.
        if !d.is_multiple_of(16) || !a.is_multiple_of(2) || !u.is_multiple_of(4) {
            return None;
        }
        let mut queue = Queue::new(num).ok()?;
        queue.set_size(num);
        let (lo, hi) = split(d);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(a);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(u);
        queue.set_used_ring_address(lo, hi);
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem.guest()) {
            return None;
        }
        let used_idx = queue.used_idx(mem.guest(), Ordering::Acquire).ok()?;
        queue.set_next_used(used_idx.0);
        queue.set_next_avail(base);
        Some(Vring {
            mem,
            queue,
            desc_table: d,
        })
    }

    /// The next available head and its chain (None for the chain when it cannot be walked:
    /// empty, or longer than [`MAX_INDIRECT`]).
    pub fn pop(&mut self) -> Option<(u16, Option<Vec<Desc>>)> {
        let chain = self.queue.pop_descriptor_chain(self.mem.guest())?;
        let head = chain.head_index();
        let mut out = Vec::new();
        for d in chain {
            if out.len() >= MAX_INDIRECT as usize {
                return Some((head, None));
            }
            out.push(Desc {
                addr: d.addr().0,
                len: d.len(),
                flags: d.flags(),
            });
        }
        Some((head, (!out.is_empty()).then_some(out)))
    }

    /// With event idx: asks the guest to kick when it adds past what was taken. Returns
    /// whether more arrived meanwhile (take them before sleeping).
    pub fn arm(&mut self) -> bool {
        self.queue
            .enable_notification(self.mem.guest())
            .unwrap_or(true)
    }

    fn read_desc(&self, table: u64, i: u32) -> Option<(Desc, u16)> {
        let mut b = [0u8; 16];
        self.mem
            .guest()
            .read_slice(&mut b, GuestAddress(table.checked_add(16 * u64::from(i))?))
            .ok()?;
        Some((
            Desc {
                addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
                len: u32::from_le_bytes(b[8..12].try_into().ok()?),
                flags: u16::from_le_bytes([b[12], b[13]]),
            },
            u16::from_le_bytes([b[14], b[15]]),
        ))
    }

    /// Follows `next` links from entry `start` of a table of `n` descriptors; at most `n` long;
    /// no indirect entry inside.
    fn walk(&self, table: u64, n: u32, start: u16) -> Option<Vec<Desc>> {
        let mut out = Vec::new();
        let mut i = u32::from(start);
        loop {
            if i >= n || out.len() >= n as usize {
                return None;
            }
            let (d, next) = self.read_desc(table, i)?;
            if d.flags & F_INDIRECT != 0 {
                return None;
            }
            out.push(d);
            if d.flags & F_NEXT == 0 {
                return Some(out);
            }
            i = u32::from(next);
        }
    }

    /// The chain starting at `head` (a head the inflight buffer names), following an indirect
    /// table when the head points to one; None when it cannot be walked.
    pub fn chain(&self, head: u16) -> Option<Vec<Desc>> {
        let num = u32::from(self.queue.size());
        if u32::from(head) >= num {
            return None;
        }
        let (first, _) = self.read_desc(self.desc_table, u32::from(head))?;
        if first.flags & F_INDIRECT != 0 {
            // An indirect head stands alone and points to a table of whole descriptors.
            if first.flags & F_NEXT != 0 || first.len == 0 || !first.len.is_multiple_of(16) {
                return None;
            }
            let n = first.len / 16;
            if n > MAX_INDIRECT {
                return None;
            }
            return self.walk(first.addr, n, 0);
        }
        self.walk(self.desc_table, num, head)
    }

    /// Publishes a used element.
    pub fn push_used(&mut self, head: u16, len: u32) {
        if let Err(e) = self.queue.add_used(self.mem.guest(), head, len) {
            tracing::warn!(head, error = %e, "cannot publish a used element");
        }
    }

    /// Whether the guest wants a notification for what was used since the last one.
    pub fn needs_notify(&mut self) -> bool {
        self.queue
            .needs_notification(self.mem.guest())
            .unwrap_or(true)
    }

    /// The used ring's index as this side last published it.
    pub fn used_idx(&self) -> u16 {
        self.queue.next_used()
    }

    /// The next available entry to take.
    pub fn last_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// Resumes taking at `idx`.
    pub fn set_last_avail(&mut self, idx: u16) {
        self.queue.set_next_avail(idx);
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<Memory> {
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
        let (h, c) = r.pop().unwrap();
        assert_eq!(h, 0);
        assert_eq!(c.unwrap().len(), 3);
        assert_eq!(r.chain(0).unwrap().len(), 3, "the replay walk agrees");
        let (h, c) = r.pop().unwrap();
        assert_eq!(h, 3);
        let want = [(0x1800, 16), (0x1900, 512), (0x1a00, 1)];
        let c = c.unwrap();
        assert_eq!(c.iter().map(|d| (d.addr, d.len)).collect::<Vec<_>>(), want);
        let again = r.chain(3).unwrap();
        assert_eq!(
            again.iter().map(|d| (d.addr, d.len)).collect::<Vec<_>>(),
            want
        );
        assert!(r.pop().is_none());
        r.push_used(0, 1);
        assert_eq!(r.used_idx(), 1);
    }

    #[test]
    fn broken_indirect_tables_are_refused_by_the_replay_walk() {
        let t = [desc(0x1800, 16, F_NEXT, 1), desc(0x1900, 1, F_WRITE, 0)];
        for head in [
            desc(0x1000, 33, F_INDIRECT, 0),          // not whole descriptors
            desc(0x1000, 0, F_INDIRECT, 0),           // empty
            desc(0x1000, 32, F_INDIRECT | F_NEXT, 1), // indirect and next
            desc(0xf000_0000, 32, F_INDIRECT, 0),     // outside guest memory
            desc(0x1000, 16 * 2048, F_INDIRECT, 0),   // too long
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

    #[test]
    fn rings_outside_memory_or_misaligned_are_refused() {
        let mem = guest_memory(&[]);
        assert!(Vring::new(mem.clone(), 4, 0, 0x100, 0x200, 0, false).is_some());
        assert!(Vring::new(mem.clone(), 4, 0xffff_0000, 0x100, 0x200, 0, false).is_none());
        assert!(Vring::new(mem.clone(), 4, 8, 0x100, 0x200, 0, false).is_none());
        assert!(Vring::new(mem, 3, 0, 0x100, 0x200, 0, false).is_none());
    }
}
