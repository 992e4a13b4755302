//! Where a volume's bytes live in its chunks (pure: volume offset -> chunk-space address).
//!
//! A volume's chunks, in order (segment by segment, each segment's chunks in order), make up
//! its *chunk space*: chunk `k` holds chunk-space bytes `[k × chunk_size, (k+1) × chunk_size)`.
//! Without striping a volume offset is its chunk-space address, so a sequential stream stays
//! on one chunk, and so on one copyset leader, for a whole chunk (16 MiB).
//!
//! Striped (Curve's and RBD's "fancy striping"): the volume is cut into stripe units of
//! `stripe_unit` bytes dealt round `stripe_count` chunks — unit 0 to the first chunk of the
//! set, unit 1 to the second, ..., unit `stripe_count` to the first again, below unit 0 —
//! until those chunks are full; then the next `stripe_count` chunks (the next *object set*).
//! An object set covers the same range in the volume and in chunk space (the mapping permutes
//! units within it), so a range of whole object sets is its own chunk-space range.

/// The newest layout this code maps, as clients tell the MDS when they open a volume
/// (`OpenFileRequest.layout_version`): 0 chunks in order, 1 striping.
pub const VERSION: u32 = 1;

/// Why a client may not open a volume with this layout (`None`: it may): one that maps
/// layouts up to `client_version` would otherwise read and write a striped volume unstriped.
pub fn refuse_open(stripe_count: u32, client_version: u32) -> Option<String> {
    (stripe_count > 1 && client_version < 1).then(|| {
        "the volume is striped and this client maps no striping (it is older than the \
         cluster): upgrade it"
            .to_string()
    })
}

/// A volume's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes per chunk (a power of two).
    pub chunk_size: u64,
    /// Bytes per stripe unit (0: not striped).
    pub stripe_unit: u64,
    /// Chunks a stripe goes round (0 or 1: not striped).
    pub stripe_count: u64,
}

/// Why a layout is refused (the MDS's check and the client's are this one).
pub fn check(chunk_size: u64, stripe_unit: u64, stripe_count: u64) -> Result<(), String> {
    match (stripe_unit, stripe_count) {
        (0, 0) => Ok(()),
        (0, _) | (_, 0) => Err("--stripe-unit and --stripe-count go together".into()),
        (u, _) if !u.is_power_of_two() || u < 4096 || u > chunk_size => Err(format!(
            "stripe unit {u}: a power of two from 4096 to the chunk size ({chunk_size})"
        )),
        (_, c) if c > MAX_STRIPE_COUNT => {
            Err(format!("stripe count {c}: at most {MAX_STRIPE_COUNT}"))
        }
        _ => Ok(()),
    }
}

/// The most chunks one stripe goes round.
pub const MAX_STRIPE_COUNT: u64 = 256;

impl Layout {
    /// The unstriped layout.
    pub fn linear(chunk_size: u64) -> Self {
        Layout {
            chunk_size,
            stripe_unit: 0,
            stripe_count: 0,
        }
    }

    /// The layout a volume's record gives.
    pub fn of(info: &crate::mds::FileInfo) -> Self {
        Layout {
            chunk_size: info.chunk_size.max(4096),
            stripe_unit: info.stripe_unit,
            stripe_count: u64::from(info.stripe_count),
        }
    }

    /// Whether offsets are dealt round several chunks.
    pub fn is_striped(&self) -> bool {
        // A unit of a whole chunk deals chunks in order: the identity.
        self.stripe_count > 1 && self.stripe_unit > 0 && self.stripe_unit < self.chunk_size
    }

    /// Bytes of an object set (`stripe_count` chunks; one chunk unstriped).
    pub fn set_size(&self) -> u64 {
        if self.is_striped() {
            self.chunk_size * self.stripe_count
        } else {
            self.chunk_size
        }
    }

    /// How far chunk space reaches for a volume of `length` bytes: whole object sets.
    pub fn span(&self, length: u64) -> u64 {
        length.div_ceil(self.set_size()) * self.set_size()
    }

    /// The chunk-space address of volume offset `off`, and how many bytes from there are
    /// contiguous in both (to the end of its stripe unit; unstriped, of its chunk).
    pub fn map(&self, off: u64) -> (u64, u64) {
        let cs = self.chunk_size;
        if !self.is_striped() {
            return (off, cs - off % cs);
        }
        let (su, sc) = (self.stripe_unit, self.stripe_count);
        let (unit, within) = (off / su, off % su);
        let (stripe, column) = (unit / sc, unit % sc);
        let per_chunk = cs / su;
        let chunk = stripe / per_chunk * sc + column;
        (chunk * cs + stripe % per_chunk * su + within, su - within)
    }

    /// The chunk-space ranges that hold `[offset, offset+len)`, in address order, adjacent
    /// ones joined: for work whose order does not matter (zeroing, discarding).
    pub fn ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset + len;
        let set = self.set_size();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let pieces = |from: u64, to: u64, out: &mut Vec<(u64, u64)>| {
            let mut at = from;
            while at < to {
                let (a, run) = self.map(at);
                let n = run.min(to - at);
                out.push((a, n));
                at += n;
            }
        };
        // Whole object sets are their own range; only the partial ones at the ends are mapped.
        let first_whole = offset.div_ceil(set) * set;
        let last_whole = end / set * set;
        if first_whole < last_whole {
            pieces(offset, first_whole, &mut out);
            out.push((first_whole, last_whole - first_whole));
            pieces(last_whole, end, &mut out);
        } else {
            pieces(offset, end, &mut out);
        }
        out.sort_unstable();
        let mut joined: Vec<(u64, u64)> = Vec::with_capacity(out.len());
        for (a, n) in out {
            match joined.last_mut() {
                Some(last) if last.0 + last.1 == a => last.1 += n,
                _ => joined.push((a, n)),
            }
        }
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn striped(unit: u64, count: u64) -> Layout {
        Layout {
            chunk_size: 16 * MIB,
            stripe_unit: unit,
            stripe_count: count,
        }
    }

    #[test]
    fn unstriped_is_the_identity_to_each_chunk_end() {
        let l = Layout::linear(16 * MIB);
        assert_eq!(l.map(0), (0, 16 * MIB));
        assert_eq!(l.map(17 * MIB + 5), (17 * MIB + 5, 15 * MIB - 5));
        assert_eq!(l.span(1), 16 * MIB);
        assert_eq!(l.ranges(5, 40 * MIB), vec![(5, 40 * MIB)]);
        for (u, c) in [(0, 0), (MIB, 1), (16 * MIB, 4)] {
            assert!(!striped(u, c).is_striped(), "{u} {c}");
        }
    }

    #[test]
    fn units_go_round_the_set_then_down_then_to_the_next_set() {
        let l = striped(MIB, 4);
        let chunk = |k: u64, at: u64| k * 16 * MIB + at;
        assert_eq!(l.map(0), (chunk(0, 0), MIB));
        assert_eq!(l.map(MIB + 7), (chunk(1, 7), MIB - 7));
        assert_eq!(l.map(3 * MIB), (chunk(3, 0), MIB));
        assert_eq!(
            l.map(4 * MIB),
            (chunk(0, MIB), MIB),
            "second stripe, first chunk"
        );
        assert_eq!(
            l.map(63 * MIB),
            (chunk(3, 15 * MIB), MIB),
            "the set's last unit"
        );
        assert_eq!(l.map(64 * MIB), (chunk(4, 0), MIB), "the next set");
        assert_eq!(l.map(64 * MIB + 6 * MIB), (chunk(6, MIB), MIB));
        assert_eq!(l.span(1), 64 * MIB);
        assert_eq!(l.span(64 * MIB), 64 * MIB);
        assert_eq!(l.span(64 * MIB + 1), 128 * MIB);
    }

    #[test]
    fn the_mapping_is_one_to_one_within_each_object_set() {
        for l in [striped(4096, 3), striped(MIB, 4), striped(64 << 10, 8)] {
            let unit = l.stripe_unit;
            let mut seen = std::collections::HashSet::new();
            for i in 0..(2 * l.set_size() / unit) {
                let (a, run) = l.map(i * unit);
                assert_eq!(run, unit);
                assert!(
                    a / l.set_size() == i * unit / l.set_size(),
                    "stays in its set"
                );
                assert!(seen.insert(a), "{l:?}: unit {i} maps where another did");
            }
        }
    }

    #[test]
    fn ranges_cover_exactly_what_was_asked() {
        let l = striped(MIB, 4);
        assert_eq!(
            l.ranges(0, 128 * MIB),
            vec![(0, 128 * MIB)],
            "two whole sets"
        );
        assert_eq!(l.ranges(0, 2 * MIB), vec![(0, MIB), (16 * MIB, MIB)]);
        let r = l.ranges(3 * MIB + 5, 70 * MIB);
        assert_eq!(r.iter().map(|r| r.1).sum::<u64>(), 70 * MIB);
        // Every byte asked for maps into the ranges, and the ranges hold nothing else.
        for off in (3 * MIB + 5..73 * MIB + 5).step_by(4093) {
            let a = l.map(off).0;
            assert!(r.iter().any(|(s, n)| a >= *s && a < s + n), "{off}");
        }
        assert!(
            r.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0),
            "sorted, joined"
        );
        assert!(l.ranges(9, 0).is_empty());
    }

    #[test]
    fn clients_older_than_striping_may_not_open_striped_volumes() {
        assert!(refuse_open(4, 0).unwrap().contains("upgrade"));
        assert_eq!(refuse_open(4, VERSION), None);
        assert_eq!(refuse_open(0, 0), None);
        assert_eq!(
            refuse_open(1, 0),
            None,
            "one chunk per stripe: chunks in order"
        );
    }

    #[test]
    fn layouts_are_checked() {
        let c = 16 * MIB;
        assert!(check(c, 0, 0).is_ok());
        assert!(check(c, MIB, 4).is_ok());
        assert!(check(c, 4096, 256).is_ok());
        assert!(check(c, c, 2).is_ok());
        assert!(check(c, MIB, 0).unwrap_err().contains("together"));
        assert!(check(c, 0, 4).unwrap_err().contains("together"));
        assert!(check(c, 3 << 20, 4).unwrap_err().contains("power of two"));
        assert!(check(c, 2048, 4).unwrap_err().contains("power of two"));
        assert!(check(c, 2 * c, 4).unwrap_err().contains("chunk size"));
        assert!(check(c, MIB, 257).unwrap_err().contains("at most 256"));
    }
}
