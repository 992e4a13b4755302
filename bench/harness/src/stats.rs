//! Latencies and counts of a run, and their summary (IOPS, bandwidth, mean/min/max,
//! percentiles, a log2 histogram) as text and JSON.

use serde::Serialize;

/// What one job recorded.
#[derive(Debug, Default, Clone)]
pub struct Recorder {
    /// Latencies in ns.
    pub lat_ns: Vec<u64>,
    /// Bytes moved.
    pub bytes: u64,
    /// Failed I/Os.
    pub errors: u64,
    /// Verify mismatches.
    pub mismatches: u64,
}

impl Recorder {
    /// Records one completed I/O.
    pub fn record(&mut self, ns: u64, bytes: u64, ok: bool) {
        self.lat_ns.push(ns);
        if ok {
            self.bytes += bytes;
        } else {
            self.errors += 1;
        }
    }

    /// Adds another job's records.
    pub fn merge(&mut self, o: Recorder) {
        self.lat_ns.extend(o.lat_ns);
        self.bytes += o.bytes;
        self.errors += o.errors;
        self.mismatches += o.mismatches;
    }
}

/// One histogram bucket: I/Os with latency below `le_us` (and above the previous bucket).
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// Upper bound, µs.
    pub le_us: u64,
    /// I/Os.
    pub count: u64,
}

/// The summary of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Driver.
    pub driver: String,
    /// Target.
    pub target: String,
    /// Workload.
    pub workload: String,
    /// Queue depth per job.
    pub queue_depth: usize,
    /// Block size.
    pub block_size: u32,
    /// Jobs.
    pub jobs: usize,
    /// Seconds measured.
    pub seconds: f64,
    /// Completed I/Os.
    pub ios: u64,
    /// I/Os per second.
    pub iops: f64,
    /// Bytes per second.
    pub bandwidth_bytes: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Mean latency, µs.
    pub lat_mean_us: f64,
    /// Minimum, µs.
    pub lat_min_us: f64,
    /// Maximum, µs.
    pub lat_max_us: f64,
    /// Median, µs.
    pub lat_p50_us: f64,
    /// 99th percentile, µs.
    pub lat_p99_us: f64,
    /// 99.9th percentile, µs.
    pub lat_p999_us: f64,
    /// Failed I/Os.
    pub errors: u64,
    /// Verify mismatches.
    pub mismatches: u64,
    /// Reconnects to the target (drivers that reconnect: vhost-user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnects: Option<u64>,
    /// Latency histogram (log2 buckets).
    pub histogram: Vec<Bucket>,
}

/// Summarises `r` measured over `seconds`.
pub fn summarise(
    mut r: Recorder,
    seconds: f64,
    head: (String, String, String, usize, u32, usize),
) -> Summary {
    r.lat_ns.sort_unstable();
    let n = r.lat_ns.len();
    let pct = |p: f64| -> f64 {
        if n == 0 {
            return 0.0;
        }
        let i = ((p / 100.0) * n as f64).ceil() as usize;
        r.lat_ns[i.clamp(1, n) - 1] as f64 / 1000.0
    };
    let mean = if n == 0 {
        0.0
    } else {
        r.lat_ns.iter().map(|x| *x as f64).sum::<f64>() / n as f64 / 1000.0
    };
    let mut histogram = Vec::new();
    let mut le = 1u64;
    let mut i = 0;
    while i < n {
        let bound_ns = le * 1000;
        let start = i;
        while i < n && r.lat_ns[i] < bound_ns {
            i += 1;
        }
        if i > start || !histogram.is_empty() {
            histogram.push(Bucket {
                le_us: le,
                count: (i - start) as u64,
            });
        }
        le *= 2;
    }
    let secs = seconds.max(1e-9);
    Summary {
        driver: head.0,
        target: head.1,
        workload: head.2,
        queue_depth: head.3,
        block_size: head.4,
        jobs: head.5,
        seconds,
        ios: n as u64,
        iops: n as f64 / secs,
        bandwidth_bytes: r.bytes as f64 / secs,
        mib_s: r.bytes as f64 / secs / (1 << 20) as f64,
        lat_mean_us: mean,
        lat_min_us: r.lat_ns.first().map_or(0.0, |x| *x as f64 / 1000.0),
        lat_max_us: r.lat_ns.last().map_or(0.0, |x| *x as f64 / 1000.0),
        lat_p50_us: pct(50.0),
        lat_p99_us: pct(99.0),
        lat_p999_us: pct(99.9),
        errors: r.errors,
        mismatches: r.mismatches,
        reconnects: None,
        histogram,
    }
}

impl Summary {
    /// For people.
    pub fn text(&self) -> String {
        let mut s = format!(
            "{} {} on {} (QD {} x {} jobs, {} B blocks, {:.1} s)\n\
             IOPS {:.0}  {:.2} MiB/s  ios {}  errors {}  mismatches {}\n\
             latency µs: mean {:.1}  min {:.1}  max {:.1}  p50 {:.1}  p99 {:.1}  p99.9 {:.1}\n\
             histogram (µs):\n",
            self.workload,
            self.driver,
            self.target,
            self.queue_depth,
            self.jobs,
            self.block_size,
            self.seconds,
            self.iops,
            self.mib_s,
            self.ios,
            self.errors,
            self.mismatches,
            self.lat_mean_us,
            self.lat_min_us,
            self.lat_max_us,
            self.lat_p50_us,
            self.lat_p99_us,
            self.lat_p999_us
        );
        let max = self
            .histogram
            .iter()
            .map(|b| b.count)
            .max()
            .unwrap_or(1)
            .max(1);
        for b in &self.histogram {
            let bar = "#".repeat(((b.count * 40) / max) as usize);
            s.push_str(&format!("  < {:>8}  {:>9}  {bar}\n", b.le_us, b.count));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_histogram_and_rates() {
        let mut r = Recorder::default();
        for i in 1..=1000u64 {
            r.record(i * 1000, 4096, true);
        }
        r.record(5_000_000, 0, false);
        let s = summarise(
            r,
            2.0,
            ("nbd".into(), "t".into(), "randread".into(), 1, 4096, 1),
        );
        assert_eq!(s.ios, 1001);
        assert!((s.iops - 500.5).abs() < 1e-6);
        assert_eq!(s.bandwidth_bytes, 1000.0 * 4096.0 / 2.0);
        assert_eq!(s.lat_min_us, 1.0);
        assert_eq!(s.lat_max_us, 5000.0);
        assert_eq!(s.lat_p50_us, 501.0);
        assert_eq!(s.lat_p99_us, 991.0);
        assert_eq!(s.errors, 1);
        assert_eq!(s.histogram.iter().map(|b| b.count).sum::<u64>(), 1001);
        assert!(s.text().contains("p99.9"));
        let j = serde_json::to_value(&s).unwrap();
        assert!(
            j["iops"].is_number()
                && j["bandwidth_bytes"].is_number()
                && j["lat_p99_us"].is_number()
        );
    }
}
