//! Per-volume QoS: token buckets for operations and bytes per second (reads, writes, both),
//! each holding a burst window's worth; a request waits until every bucket it draws from has
//! the tokens (a debt is allowed, so one big request never waits forever).

use std::time::{Duration, Instant};

use curve_proto::mds::Qos;
use parking_lot::Mutex;

#[derive(Debug)]
struct Bucket {
    rate: f64,
    cap: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, burst: Duration, now: Instant) -> Option<Self> {
        if rate == 0 {
            return None;
        }
        let cap = (rate as f64 * burst.as_secs_f64()).max(1.0);
        Some(Bucket {
            rate: rate as f64,
            cap,
            tokens: cap,
            last: now,
        })
    }

    /// Takes `n` tokens (going into debt if needed); returns how long the caller must wait.
    fn take(&mut self, n: f64, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.cap);
        self.last = now;
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[derive(Debug, Default)]
struct Buckets {
    iops: [Option<Bucket>; 3], // total, read, write
    bps: [Option<Bucket>; 3],
    spec: Option<Qos>,
}

/// The limiter of one volume.
#[derive(Debug, Default)]
pub struct Limiter {
    inner: Mutex<Buckets>,
}

impl Limiter {
    /// Applies `q` (again: changed limits take effect at once, unchanged ones keep state).
    pub fn set(&self, q: &Qos) {
        let mut b = self.inner.lock();
        if b.spec.as_ref() == Some(q) {
            return;
        }
        let now = Instant::now();
        let burst = Duration::from_millis(if q.burst_ms == 0 { 1000 } else { q.burst_ms });
        b.iops = [
            Bucket::new(q.iops_total, burst, now),
            Bucket::new(q.iops_read, burst, now),
            Bucket::new(q.iops_write, burst, now),
        ];
        b.bps = [
            Bucket::new(q.bps_total, burst, now),
            Bucket::new(q.bps_read, burst, now),
            Bucket::new(q.bps_write, burst, now),
        ];
        b.spec = Some(*q);
    }

    /// How long a request of `bytes` must wait before it is sent.
    pub fn delay(&self, write: bool, bytes: u64) -> Duration {
        let mut b = self.inner.lock();
        let now = Instant::now();
        let dir = if write { 2 } else { 1 };
        let mut wait = Duration::ZERO;
        for i in [0, dir] {
            if let Some(k) = b.iops[i].as_mut() {
                wait = wait.max(k.take(1.0, now));
            }
            if let Some(k) = b.bps[i].as_mut() {
                wait = wait.max(k.take(bytes as f64, now));
            }
        }
        wait
    }

    /// Waits for the request's turn.
    pub async fn admit(&self, write: bool, bytes: u64) {
        let d = self.delay(write, bytes);
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let l = Limiter::default();
        l.set(&Qos {
            iops_write: 100,
            burst_ms: 100,
            ..Default::default()
        });
        // 10 tokens of burst, then 10 ms per write.
        let waits: Vec<Duration> = (0..12).map(|_| l.delay(true, 4096)).collect();
        assert!(waits[..10].iter().all(|w| w.is_zero()), "{waits:?}");
        assert!(waits[10] > Duration::from_millis(5) && waits[11] > waits[10]);
        // Reads are not limited by a write limit.
        assert!(l.delay(false, 4096).is_zero());
        // Unlimited when cleared.
        l.set(&Qos::default());
        assert!((0..1000).all(|_| l.delay(true, 1 << 20).is_zero()));
    }
}
