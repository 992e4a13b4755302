//! The seed's IoTracker: a user request split at chunk boundaries (and, striped, at stripe
//! units; and at the largest request a chunkserver takes) into parts that run in parallel,
//! and the request's one result once every part has answered — the first failure, else
//! success.

use crate::volume::ClientError;
use curve_proto::layout::Layout;

/// One part of a user request: a range inside one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Where it is in the volume's chunk space ([`Layout::map`]; unstriped, the volume
    /// offset).
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// Offset in the user buffer.
    pub buf_offset: usize,
}

/// Splits volume range `[offset, offset+len)` where `layout` puts it in chunk space (at chunk
/// boundaries, and striped at stripe units), at most `max` bytes per part; in volume order.
pub fn split(offset: u64, len: u64, layout: &Layout, max: u64) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let (addr, run) = layout.map(at);
        let n = (end - at).min(run).min(max.max(1));
        parts.push(Part {
            offset: addr,
            len: n,
            buf_offset: (at - offset) as usize,
        });
        at += n;
    }
    parts
}

/// The chunk-space parts of volume range `[offset, offset+len)` in address order, not volume
/// order (for work whose order does not matter: zeroing), at most `max` bytes each; whole
/// stripe sets go as whole chunks ([`Layout::ranges`]).
pub fn split_unordered(offset: u64, len: u64, layout: &Layout, max: u64) -> Vec<Part> {
    let chunked = Layout::linear(layout.chunk_size);
    layout
        .ranges(offset, len)
        .into_iter()
        .flat_map(|(at, n)| split(at, n, &chunked, max))
        .collect()
}

/// One user request in flight: its parts and what they answered.
#[derive(Debug)]
pub struct IoTracker {
    parts: Vec<Part>,
    answered: usize,
    error: Option<ClientError>,
}

impl IoTracker {
    /// `[offset, offset+len)` split as [`split`] does.
    pub fn new(offset: u64, len: u64, layout: &Layout, max: u64) -> Self {
        IoTracker {
            parts: split(offset, len, layout, max),
            answered: 0,
            error: None,
        }
    }

    /// The parts, in offset order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// A part answered.
    pub fn record(&mut self, result: Result<(), ClientError>) {
        self.answered += 1;
        if let (Err(e), None) = (result, &self.error) {
            self.error = Some(e);
        }
    }

    /// Every part answered.
    pub fn finished(&self) -> bool {
        self.answered >= self.parts.len()
    }

    /// The request's result: the first part's failure, else success.
    pub fn result(self) -> Result<(), ClientError> {
        debug_assert!(self.finished(), "a result before every part answered");
        match self.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_at_chunks_and_max() {
        let (c, cs) = (&Layout::linear(16 << 20), 16u64 << 20);
        assert_eq!(
            split(0, 4096, c, 1 << 20),
            vec![Part {
                offset: 0,
                len: 4096,
                buf_offset: 0
            }]
        );
        let p = split(cs - 4096, 8192, c, 1 << 20);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].len, p[1].offset, p[1].buf_offset), (4096, cs, 4096));
        let p = split(512, 3 << 20, c, 1 << 20);
        assert_eq!(p.len(), 3);
        let p = split(cs - 512, 3 << 20, c, 1 << 20);
        assert_eq!(p.len(), 4, "512 B, then 1 MiB, 1 MiB, 1 MiB - 512 B");
        assert_eq!(p.iter().map(|p| p.len).sum::<u64>(), 3 << 20);
        assert!(p.iter().all(|p| p.len <= 1 << 20));
        assert!(split(0, 0, c, 1 << 20).is_empty());
    }

    #[test]
    fn striped_requests_split_at_stripe_units_and_keep_the_buffer_order() {
        let l = Layout {
            chunk_size: 16 << 20,
            stripe_unit: 64 << 10,
            stripe_count: 4,
        };
        let p = split((64 << 10) - 4096, 200 << 10, &l, 1 << 20);
        let lens: Vec<u64> = p.iter().map(|p| p.len).collect();
        assert_eq!(lens, vec![4096, 64 << 10, 64 << 10, 64 << 10, 4096]);
        let at: Vec<u64> = p.iter().map(|p| p.offset).collect();
        let chunk = 16u64 << 20;
        assert_eq!(
            at,
            vec![(64 << 10) - 4096, chunk, 2 * chunk, 3 * chunk, 64 << 10],
            "unit 0's tail, then the next unit of each chunk, then the first chunk again"
        );
        let bufs: Vec<usize> = p.iter().map(|p| p.buf_offset).collect();
        assert_eq!(
            bufs,
            vec![
                0,
                4096,
                4096 + (64 << 10),
                4096 + (128 << 10),
                4096 + (192 << 10)
            ]
        );
    }

    #[test]
    fn the_first_failure_is_the_result_once_all_answered() {
        let mut t = IoTracker::new(0, 3 << 20, &Layout::linear(16 << 20), 1 << 20);
        assert_eq!(t.parts().len(), 3);
        t.record(Ok(()));
        assert!(!t.finished());
        t.record(Err(ClientError::Fenced));
        t.record(Err(ClientError::Closed));
        assert!(t.finished());
        assert!(matches!(t.result(), Err(ClientError::Fenced)));
        let mut t = IoTracker::new(4096, 4096, &Layout::linear(16 << 20), 1 << 20);
        t.record(Ok(()));
        assert!(t.result().is_ok());
        assert!(
            IoTracker::new(0, 0, &Layout::linear(16 << 20), 1 << 20).finished(),
            "nothing to do"
        );
    }
}
