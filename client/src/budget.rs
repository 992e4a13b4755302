//! Bytes in flight in the client: every read and write holds its length from a volume's budget
//! and from the process's (shared by all its volumes) until it completes. A request over either
//! waits for earlier ones to finish — backpressure to the caller, never an error — so callers
//! that issue without bound (a library user, a frontend with deep queues, many volumes at once)
//! cannot make the client hold more payload and responses than the budgets.
//!
//! The semaphores are fair (first come, first served): a large request is not starved by small
//! ones behind it. A request larger than a whole budget takes all of it (it runs alone).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

/// Largest budget (a semaphore takes at most `u32::MAX` permits at once).
const MAX_BUDGET: u64 = u32::MAX as u64;

/// The process's budget, shared by all volumes: 1 GiB.
pub static PROCESS: ByteBudget = ByteBudget::new(1 << 30);

/// A volume's budget unless its options say otherwise: 32 MiB. More does not go faster (a
/// 1 MiB write QD8 holds 8 MiB; 32 MiB keeps a striped volume's copysets busy), and every byte
/// in flight is held twice here (the caller's payload and its encoded request) and once more
/// on a chunkserver: with 256 MiB a 4 MiB QD16 writer made part2 peak at ~200 MiB.
pub const VOLUME_DEFAULT: u64 = 32 << 20;

/// A budget of bytes in flight.
#[derive(Debug)]
pub struct ByteBudget {
    sem: Semaphore,
    total: u64,
    held: AtomicU64,
    peak: AtomicU64,
}

/// Bytes taken from a budget, given back on drop.
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a ByteBudget,
    permit: Option<SemaphorePermit<'a>>,
    bytes: u64,
}

impl ByteBudget {
    /// A budget of `total` bytes (at least 1, at most 4 GiB − 1).
    pub const fn new(total: u64) -> Self {
        let total = if total == 0 {
            1
        } else if total > MAX_BUDGET {
            MAX_BUDGET
        } else {
            total
        };
        ByteBudget {
            sem: Semaphore::const_new(total as usize),
            total,
            held: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// Its size in bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Most bytes held at once since the budget was made.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Takes `bytes` (all of the budget when larger), waiting while others hold too much.
    pub async fn take(&self, bytes: u64) -> Held<'_> {
        let bytes = bytes.min(self.total);
        let permit = if bytes == 0 {
            None
        } else {
            // The semaphore is never closed.
            Some(
                self.sem
                    .acquire_many(bytes as u32)
                    .await
                    .expect("open semaphore"),
            )
        };
        let now = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Held {
            budget: self,
            permit,
            bytes,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
        drop(self.permit.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_request_over_the_budget_waits_for_earlier_ones() {
        let b = ByteBudget::new(100);
        let first = b.take(60).await;
        assert_eq!(b.held(), 60);
        // 60 + 50 > 100: waits.
        let waiting = tokio::time::timeout(Duration::from_millis(50), b.take(50)).await;
        assert!(waiting.is_err(), "the second request did not wait");
        let small = b.take(40).await; // fits beside the first
        assert_eq!(b.held(), 100);
        drop(first);
        drop(small);
        let second = tokio::time::timeout(Duration::from_secs(5), b.take(50))
            .await
            .expect("the second request goes once the first is done");
        assert_eq!(b.held(), 50);
        assert_eq!(b.peak(), 100);
        drop(second);
        assert_eq!(b.held(), 0);
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_runs_alone() {
        let b = ByteBudget::new(100);
        let big = b.take(1000).await;
        assert_eq!(b.held(), 100);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), b.take(1))
                .await
                .is_err()
        );
        drop(big);
        let _ = b.take(0).await;
        assert_eq!(b.held(), 0);
        assert_eq!(ByteBudget::new(0).total(), 1);
        assert_eq!(ByteBudget::new(u64::MAX).total(), u32::MAX as u64);
    }

    #[tokio::test]
    async fn waiters_are_served_in_order() {
        let b = std::sync::Arc::new(ByteBudget::new(10));
        let first = b.take(10).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (i, n) in [(0, 8u64), (1, 1), (2, 1)] {
            let b = b.clone();
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let h = b.take(n).await;
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(h);
            }));
            // Each waits in the semaphore's queue before the next is spawned.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        let order: Vec<i32> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        // The large request is not overtaken by the small ones queued after it.
        assert_eq!(order[0], 0);
        assert_eq!(order.len(), 3);
    }
}
