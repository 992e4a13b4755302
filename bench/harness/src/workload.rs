//! What a job does: the workload, its parameters, and the next operation (pure: a seeded
//! generator over offsets, with an optional zipf skew).

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A workload, as bdevperf names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Random reads and writes, `rw_mix` percent reads.
    Rw,
    /// Writes a block, reads it back and compares.
    Verify,
    /// Flushes.
    Flush,
    /// Discards (trim) of a block each.
    Trim,
    /// Write-zeroes of a block each.
    WriteZeroes,
}

impl Workload {
    /// Its name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
            Workload::Verify => "verify",
            Workload::Flush => "flush",
            Workload::Trim => "trim",
            Workload::WriteZeroes => "write_zeroes",
        }
    }
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "read" => Workload::Read,
            "write" => Workload::Write,
            "randread" => Workload::RandRead,
            "randwrite" => Workload::RandWrite,
            "rw" | "randrw" => Workload::Rw,
            "verify" => Workload::Verify,
            "flush" => Workload::Flush,
            "trim" | "unmap" => Workload::Trim,
            "write_zeroes" | "write-zeroes" => Workload::WriteZeroes,
            _ => {
                return Err(format!(
                    "unknown workload {s:?}: read, write, randread, randwrite, rw, verify, flush, \
                     trim, write_zeroes"
                ));
            }
        })
    }
}

/// One I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset`.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write `len` bytes at `offset`.
    Write {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Flush.
    Flush,
    /// Discard.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
}

impl Op {
    /// Bytes moved (0 for flush).
    pub fn bytes(&self) -> u64 {
        match *self {
            Op::Read { len, .. }
            | Op::Write { len, .. }
            | Op::Trim { len, .. }
            | Op::WriteZeroes { len, .. } => u64::from(len),
            Op::Flush => 0,
        }
    }
}

/// The offsets and kinds of a job's operations.
#[derive(Debug)]
pub struct Generator {
    workload: Workload,
    block: u64,
    start: u64,
    blocks: u64,
    next_seq: u64,
    rw_mix: u32,
    zipf: Option<Zipf>,
    rng: SmallRng,
}

impl Generator {
    /// Operations over `[start, start + len)` in blocks of `block` bytes.
    pub fn new(
        workload: Workload,
        block: u32,
        start: u64,
        len: u64,
        rw_mix: u32,
        zipf_theta: Option<f64>,
        seed: u64,
    ) -> Self {
        let blocks = (len / u64::from(block)).max(1);
        Generator {
            workload,
            block: u64::from(block),
            start,
            blocks,
            next_seq: 0,
            rw_mix: rw_mix.min(100),
            zipf: zipf_theta.map(|t| Zipf::new(blocks, t)),
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    fn seq_offset(&mut self) -> u64 {
        let o = self.start + (self.next_seq % self.blocks) * self.block;
        self.next_seq += 1;
        o
    }

    fn rand_offset(&mut self) -> u64 {
        let b = match &self.zipf {
            Some(z) => z.sample(&mut self.rng),
            None => self.rng.random_range(0..self.blocks),
        };
        self.start + b * self.block
    }

    /// The next operation (for `Verify`: the write; the read-back follows its completion).
    pub fn next_op(&mut self) -> Op {
        let len = self.block as u32;
        match self.workload {
            Workload::Read => Op::Read {
                offset: self.seq_offset(),
                len,
            },
            Workload::Write | Workload::Verify => Op::Write {
                offset: self.seq_offset(),
                len,
            },
            Workload::RandRead => Op::Read {
                offset: self.rand_offset(),
                len,
            },
            Workload::RandWrite => Op::Write {
                offset: self.rand_offset(),
                len,
            },
            Workload::Rw => {
                let offset = self.rand_offset();
                if self.rng.random_range(0..100) < self.rw_mix {
                    Op::Read { offset, len }
                } else {
                    Op::Write { offset, len }
                }
            }
            Workload::Flush => Op::Flush,
            Workload::Trim => Op::Trim {
                offset: self.rand_offset(),
                len,
            },
            Workload::WriteZeroes => Op::WriteZeroes {
                offset: self.rand_offset(),
                len,
            },
        }
    }
}

/// Zipf-distributed block numbers over `[0, n)` (theta in (0, 1) ∪ (1, ...)): a few blocks get
/// most of the I/O. Gray et al.'s method, as fio uses.
#[derive(Debug, Clone)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    /// The distribution over `n` items with skew `theta`.
    pub fn new(n: u64, theta: f64) -> Self {
        let theta = if (theta - 1.0).abs() < 1e-6 {
            0.999
        } else {
            theta
        };
        // zeta(n) summed over at most 10M terms (the tail converges).
        let zeta = |k: u64| {
            (1..=k.min(10_000_000))
                .map(|i| 1.0 / (i as f64).powf(theta))
                .sum::<f64>()
        };
        let zetan = zeta(n);
        let zeta2 = zeta(2);
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Zipf {
            n,
            theta,
            alpha,
            zetan,
            eta,
        }
    }

    /// One sample; the hot items are scattered over the range, not all at its start.
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        let v = if uz < 1.0 {
            0
        } else if uz < 1.0 + 0.5f64.powf(self.theta) {
            1
        } else {
            ((self.n as f64) * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64
        };
        // Scatter: a fixed odd multiplier permutes [0, n) when n is a power of two; for other
        // n it still spreads (collisions only shift the distribution slightly).
        v.min(self.n - 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) % self.n
    }
}

/// The data of a verify write: every 8 bytes carry (offset, generation) mixed, so a block
/// read back from elsewhere or from an older pass does not compare equal.
pub fn pattern(buf: &mut [u8], offset: u64, generation: u64) {
    let mut x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation.rotate_left(17);
    for c in buf.chunks_mut(8) {
        x = x.wrapping_add(0x6A09_E667_F3BC_C909);
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_stay_in_range_and_aligned() {
        for w in [
            Workload::Read,
            Workload::RandWrite,
            Workload::Rw,
            Workload::Trim,
        ] {
            let mut g = Generator::new(w, 4096, 1 << 20, 64 << 10, 50, None, 7);
            for _ in 0..1000 {
                if let Op::Read { offset, .. }
                | Op::Write { offset, .. }
                | Op::Trim { offset, .. } = g.next_op()
                {
                    assert!((1 << 20..(1 << 20) + (64 << 10)).contains(&offset));
                    assert_eq!(offset % 4096, 0);
                }
            }
        }
        let mut g = Generator::new(Workload::Read, 4096, 0, 8192, 0, None, 1);
        let seq: Vec<Op> = (0..3).map(|_| g.next_op()).collect();
        assert_eq!(
            seq[2],
            Op::Read {
                offset: 0,
                len: 4096
            },
            "wraps around"
        );
    }

    #[test]
    fn rw_mix_and_zipf_skew() {
        let mut g = Generator::new(Workload::Rw, 4096, 0, 1 << 30, 70, None, 3);
        let reads = (0..10_000)
            .filter(|_| matches!(g.next_op(), Op::Read { .. }))
            .count();
        assert!((6500..7500).contains(&reads), "{reads}");
        let z = Zipf::new(1000, 1.2);
        let mut rng = SmallRng::seed_from_u64(5);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[z.sample(&mut rng) as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top10: u32 = counts[..10].iter().sum();
        assert!(
            top10 > 50_000,
            "the 10 hottest blocks take most of the I/O: {top10}"
        );
    }

    #[test]
    fn patterns_differ_by_offset_and_generation() {
        let (mut a, mut b, mut c) = ([0u8; 64], [0u8; 64], [0u8; 64]);
        pattern(&mut a, 4096, 1);
        pattern(&mut b, 8192, 1);
        pattern(&mut c, 4096, 2);
        assert_ne!(a, b);
        assert_ne!(a, c);
        let mut a2 = [0u8; 64];
        pattern(&mut a2, 4096, 1);
        assert_eq!(a, a2);
    }
}
