//! Prometheus metrics of a chunkserver: per chunkserver and per copyset, I/O operations,
//! bytes, errors and latency histograms; the raft log's fsync latency. Served as text on
//! `GET /metrics` (`--metrics-listen`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, microseconds.
const BOUNDS_US: [u64; 14] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000,
];

/// A latency histogram with fixed buckets (quantiles via PromQL `histogram_quantile`).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        if let Some(i) = BOUNDS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, n) in BOUNDS_US.iter().zip(&self.buckets) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
                *b as f64 / 1e6
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Counters of one kind of operation.
#[derive(Debug, Default)]
pub struct OpMetrics {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

impl OpMetrics {
    /// Records one operation.
    pub fn record(&self, bytes: u64, ok: bool, took: Duration) {
        self.ops.fetch_add(1, Relaxed);
        if ok {
            self.bytes.fetch_add(bytes, Relaxed);
        } else {
            self.errors.fetch_add(1, Relaxed);
        }
        self.latency.observe(took);
    }

    fn render(&self, prefix: &str, op: &str, labels: &str, out: &mut String) {
        let l = if labels.is_empty() {
            format!("op=\"{op}\"")
        } else {
            format!("{labels},op=\"{op}\"")
        };
        let _ = writeln!(out, "{prefix}_ops_total{{{l}}} {}", self.ops.load(Relaxed));
        let _ = writeln!(
            out,
            "{prefix}_bytes_total{{{l}}} {}",
            self.bytes.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "{prefix}_errors_total{{{l}}} {}",
            self.errors.load(Relaxed)
        );
        self.latency
            .render(&format!("{prefix}_latency_seconds"), &l, out);
    }
}

/// Reads and writes of one scope (the chunkserver, or one copyset).
#[derive(Debug, Default)]
pub struct IoMetrics {
    /// Chunk writes.
    pub write: OpMetrics,
    /// Chunk reads.
    pub read: OpMetrics,
}

impl IoMetrics {
    /// Renders both, under `prefix`, with `labels`.
    pub fn render(&self, prefix: &str, labels: &str, out: &mut String) {
        self.write.render(prefix, "write", labels, out);
        self.read.render(prefix, "read", labels, out);
    }
}

/// Process-wide raft log fsync latency.
pub static RAFT_FSYNC: std::sync::LazyLock<Histogram> =
    std::sync::LazyLock::new(Histogram::default);

/// Process-wide chunk I/O.
pub static CHUNKSERVER_IO: std::sync::LazyLock<IoMetrics> =
    std::sync::LazyLock::new(IoMetrics::default);

/// Renders every metric of the process; `copysets` yields (pool, copyset, metrics).
pub fn render<'a>(copysets: impl Iterator<Item = (u32, u32, &'a IoMetrics)>) -> String {
    let mut out = String::new();
    out.push_str("# TYPE curve_chunkserver_ops_total counter\n");
    CHUNKSERVER_IO.render("curve_chunkserver", "", &mut out);
    out.push_str("# TYPE curve_copyset_ops_total counter\n");
    for (pool, copyset, m) in copysets {
        m.render(
            "curve_copyset",
            &format!("pool=\"{pool}\",copyset=\"{copyset}\""),
            &mut out,
        );
    }
    out.push_str("# TYPE curve_raft_log_fsync_seconds histogram\n");
    RAFT_FSYNC.render("curve_raft_log_fsync_seconds", "", &mut out);
    out
}

/// Serves `GET /metrics` on `listener` with what `render` returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let render = std::sync::Arc::new(render);
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            while n < buf.len() {
                match s.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let (status, body) = if buf.starts_with(b"GET /metrics") {
                ("200 OK", render())
            } else {
                (
                    "404 Not Found",
                    "only /metrics is served here\n".to_string(),
                )
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_text() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(70));
        h.observe(Duration::from_millis(3));
        let mut s = String::new();
        h.render("x", "a=\"1\"", &mut s);
        assert!(s.contains("x_bucket{a=\"1\",le=\"0.0001\"} 1"), "{s}");
        assert!(s.contains("x_bucket{a=\"1\",le=\"0.005\"} 2"), "{s}");
        assert!(s.contains("x_count{a=\"1\"} 2"), "{s}");
    }
}
