//! The body of the fuzz target (`fuzz/`: `ublk_descriptors`), also driven with random input by
//! a unit test: I/O descriptors as the kernel could write them, through the parser, never a
//! panic, and every accepted request inside the device and its limits.

use crate::request::{Limits, Request, parse};

/// Each 24 bytes of `data`: op_flags (u32), start sector (u64), sector count (u32), and the
/// device (size in MiB and a read-only bit from the remaining u64).
pub fn descriptors(data: &[u8]) {
    for rec in data.chunks_exact(24) {
        let u32_at = |i: usize| u32::from_le_bytes(rec[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().expect("8 bytes"));
        let (op_flags, start, sectors, dev) = (u32_at(0), u64_at(4), u32_at(12), u64_at(16));
        let limits = Limits {
            size: (dev >> 1) % (1 << 44),
            max_io: 1 << 20,
            read_only: dev & 1 == 1,
        };
        let Ok(req) = parse(op_flags, start, sectors, &limits) else {
            continue;
        };
        let (offset, len, writes) = match req {
            Request::Flush => continue,
            Request::Read { offset, len } => {
                assert!(len > 0 && len <= limits.max_io);
                (offset, u64::from(len), false)
            }
            Request::Write { offset, len, .. } => {
                assert!(len > 0 && len <= limits.max_io);
                (offset, u64::from(len), true)
            }
            Request::Discard { offset, len } | Request::WriteZeroes { offset, len, .. } => {
                (offset, len, true)
            }
        };
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= limits.size)
        );
        assert_eq!(offset, start * 512);
        assert_eq!(len, u64::from(sectors) * 512);
        assert!(
            !(writes && limits.read_only),
            "{req:?} on a read-only device"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_descriptors() {
        // xorshift64*: reproducible, no dependency.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut data = vec![0u8; 24 * 4096];
        for round in 0..16 {
            for b in data.chunks_mut(8) {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                b.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
            }
            // Small ops, sectors and devices half the time, so that requests get accepted.
            if round % 2 == 0 {
                for rec in data.chunks_mut(24) {
                    rec[0] %= 6;
                    rec[1..4].fill(0);
                    rec[6..12].fill(0);
                    rec[14..16].fill(0);
                    rec[20..24].fill(0);
                }
            }
            super::descriptors(&data);
        }
    }
}
