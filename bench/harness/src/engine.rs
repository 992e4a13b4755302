//! The driver seam: a queue that takes operations tagged by the caller and hands back their
//! completions, in whatever order they finish.

use crate::workload::Op;

/// A completed operation.
#[derive(Debug)]
pub struct Completion {
    /// The tag it was submitted with.
    pub tag: usize,
    /// Its outcome; reads carry their data.
    pub result: Result<Option<Vec<u8>>, String>,
}

/// One job's queue to the target.
pub trait Engine: Send {
    /// Size of the target, bytes.
    fn size(&self) -> u64;
    /// Submits `op` (with `data` for writes) under `tag`.
    fn submit(&mut self, tag: usize, op: Op, data: &[u8]) -> Result<(), String>;
    /// Waits for at least one completion.
    fn reap(&mut self) -> Result<Vec<Completion>, String>;
}

/// Opens one queue per job.
pub trait Driver: Send + Sync {
    /// A new queue.
    fn open(&self) -> Result<Box<dyn Engine>, String>;

    /// Times the driver had to reconnect to its target (drivers that reconnect say so).
    fn reconnects(&self) -> Option<u64> {
        None
    }

    /// Ends what the run opened (a cluster volume's session), once every job is done.
    fn close(&self) {}
}
