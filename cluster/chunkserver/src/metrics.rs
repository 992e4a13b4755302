//! Prometheus metrics of a chunkserver (`--metrics-listen`, through `curve-metrics` like every
//! daemon): per chunkserver and per copyset, chunk reads and writes (operations, bytes, errors,
//! latency histograms); the raft log's fsync latency; gRPC requests by method and status.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use curve_metrics::prometheus_client::metrics::histogram::Histogram;
use curve_metrics::{IoFamilies, IoSeries, Labels, Metrics};

/// The process's registry.
pub static METRICS: LazyLock<Arc<Metrics>> = LazyLock::new(|| {
    let m = Metrics::new();
    m.counters_from(
        "curve_chunkserver_auth_refused",
        "Chunk, raft and copyset requests refused by authentication, by reason",
        "reason",
        curve_auth::refusals,
    );
    m
});

struct Families {
    chunkserver: IoFamilies,
    copyset: IoFamilies,
    raft_fsync: Histogram,
}

static FAMILIES: LazyLock<Families> = LazyLock::new(|| {
    let m = &*METRICS;
    let raft_fsync = curve_metrics::latency_histogram();
    m.registry().register(
        "curve_raft_log_fsync_seconds",
        "Latency of the raft log's fdatasync",
        raft_fsync.clone(),
    );
    Families {
        chunkserver: IoFamilies::register(m, "curve_chunkserver", "this chunkserver's chunk I/O"),
        copyset: IoFamilies::register(m, "curve_copyset", "a copyset's chunk I/O"),
        raft_fsync,
    }
});

/// Reads and writes of one scope (the chunkserver, or one copyset).
#[derive(Debug, Clone)]
pub struct IoMetrics {
    /// Chunk writes.
    pub write: IoSeries,
    /// Chunk reads.
    pub read: IoSeries,
}

impl IoMetrics {
    fn of(f: &IoFamilies, labels: &Labels) -> Self {
        IoMetrics {
            write: f.op(labels, "write"),
            read: f.op(labels, "read"),
        }
    }

    /// The series of copyset `copyset` of pool `pool`.
    pub fn copyset(pool: u32, copyset: u32) -> Self {
        Self::of(
            &FAMILIES.copyset,
            &vec![
                ("pool".to_owned(), pool.to_string()),
                ("copyset".to_owned(), copyset.to_string()),
            ],
        )
    }
}

/// Process-wide chunk I/O.
pub static CHUNKSERVER_IO: LazyLock<IoMetrics> =
    LazyLock::new(|| IoMetrics::of(&FAMILIES.chunkserver, &Vec::new()));

/// Records one raft log fsync.
pub fn raft_fsync(took: Duration) {
    FAMILIES.raft_fsync.observe(took.as_secs_f64());
}

/// The gRPC layer of the chunkserver's server.
pub fn grpc_layer() -> curve_metrics::GrpcMetrics {
    static GRPC: LazyLock<curve_metrics::GrpcMetrics> =
        LazyLock::new(|| curve_metrics::GrpcMetrics::register(&METRICS, "curve_chunkserver_grpc"));
    GRPC.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render() {
        IoMetrics::copyset(9, 7)
            .write
            .record(4096, true, Duration::from_micros(70));
        CHUNKSERVER_IO
            .read
            .record(0, false, Duration::from_millis(3));
        raft_fsync(Duration::from_micros(500));
        let s = METRICS.render();
        assert_eq!(
            curve_metrics::value(
                &s,
                "curve_copyset_bytes_total",
                "pool=\"9\",copyset=\"7\",op=\"write\""
            ),
            Some(4096.0),
            "{s}"
        );
        assert_eq!(
            curve_metrics::value(
                &s,
                "curve_copyset_latency_seconds_count",
                "pool=\"9\",copyset=\"7\",op=\"write\""
            ),
            Some(1.0),
            "{s}"
        );
        assert!(
            curve_metrics::value(&s, "curve_chunkserver_errors_total", "op=\"read\"").unwrap()
                >= 1.0
        );
        assert!(s.contains("curve_raft_log_fsync_seconds_count"), "{s}");
    }
}
