//! The seed's IoTracker: a user request split at chunk boundaries (and at the largest request
//! a chunkserver takes) into parts that run in parallel, and the request's one result once
//! every part has answered — the first failure, else success.

use crate::volume::ClientError;

/// One part of a user request: a range inside one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Offset in the volume.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// Offset in the user buffer.
    pub buf_offset: usize,
}

/// Splits `[offset, offset+len)` at chunk boundaries and at most `max` bytes per part.
pub fn split(offset: u64, len: u64, chunk_size: u64, max: u64) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let chunk_end = (at / chunk_size + 1) * chunk_size;
        let n = (end.min(chunk_end) - at).min(max.max(1));
        parts.push(Part {
            offset: at,
            len: n,
            buf_offset: (at - offset) as usize,
        });
        at += n;
    }
    parts
}

/// One user request in flight: its parts and what they answered.
#[derive(Debug)]
pub struct IoTracker {
    parts: Vec<Part>,
    answered: usize,
    error: Option<ClientError>,
}

impl IoTracker {
    /// `[offset, offset+len)` split at `chunk_size` boundaries and at most `max` bytes a part.
    pub fn new(offset: u64, len: u64, chunk_size: u64, max: u64) -> Self {
        IoTracker {
            parts: split(offset, len, chunk_size, max),
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
        let c = 16 << 20;
        assert_eq!(
            split(0, 4096, c, 1 << 20),
            vec![Part {
                offset: 0,
                len: 4096,
                buf_offset: 0
            }]
        );
        let p = split(c - 4096, 8192, c, 1 << 20);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].len, p[1].offset, p[1].buf_offset), (4096, c, 4096));
        let p = split(512, 3 << 20, c, 1 << 20);
        assert_eq!(p.len(), 3);
        let p = split(c - 512, 3 << 20, c, 1 << 20);
        assert_eq!(p.len(), 4, "512 B, then 1 MiB, 1 MiB, 1 MiB - 512 B");
        assert_eq!(p.iter().map(|p| p.len).sum::<u64>(), 3 << 20);
        assert!(p.iter().all(|p| p.len <= 1 << 20));
        assert!(split(0, 0, c, 1 << 20).is_empty());
    }

    #[test]
    fn the_first_failure_is_the_result_once_all_answered() {
        let mut t = IoTracker::new(0, 3 << 20, 16 << 20, 1 << 20);
        assert_eq!(t.parts().len(), 3);
        t.record(Ok(()));
        assert!(!t.finished());
        t.record(Err(ClientError::Fenced));
        t.record(Err(ClientError::Closed));
        assert!(t.finished());
        assert!(matches!(t.result(), Err(ClientError::Fenced)));
        let mut t = IoTracker::new(4096, 4096, 16 << 20, 1 << 20);
        t.record(Ok(()));
        assert!(t.result().is_ok());
        assert!(
            IoTracker::new(0, 0, 16 << 20, 1 << 20).finished(),
            "nothing to do"
        );
    }
}
