//! part2's metrics: every export's and every part1 file's volume is wrapped in a [`Metered`]
//! device that counts what goes through the block-device seam (operations, bytes, errors,
//! latency, in flight), labelled by export, frontend and volume — so each frontend is measured
//! the same way, at the same place. `--metrics-listen` serves them with the rest.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use curve_blockdev::{BlockDevice, DeviceInfo, IoFuture, WriteFlags, ZeroFlags};
use curve_metrics::prometheus_client::metrics::family::Family;
use curve_metrics::prometheus_client::metrics::gauge::Gauge;
use curve_metrics::{IoFamilies, IoSeries, Labels, Metrics};

/// The operations the seam counts.
pub const OPS: [&str; 5] = ["read", "write", "flush", "discard", "write_zeroes"];

/// part2's registry and families.
#[derive(Debug)]
pub struct Part2Metrics {
    /// The registry `--metrics-listen` serves.
    pub metrics: Arc<Metrics>,
    io: IoFamilies,
    /// Consumers attached per export (NBD connections, kernel NBD sockets).
    pub connections: Family<Labels, Gauge>,
    /// Exports by frontend.
    pub exports: Family<Labels, Gauge>,
}

/// The process's metrics.
pub static METRICS: LazyLock<Part2Metrics> = LazyLock::new(|| {
    let metrics = Metrics::new();
    let io = IoFamilies::register(&metrics, "curve_export", "an export or part1 file");
    let connections = metrics.gauge(
        "curve_export_connections",
        "Consumers attached to an export (NBD connections)",
    );
    let exports = metrics.gauge("curve_exports", "Exports served, by frontend");
    Part2Metrics {
        metrics,
        io,
        connections,
        exports,
    }
});

/// The labels of an export (`export`, `frontend`, `volume`).
pub fn labels(export: &str, frontend: &str, volume: &str) -> Labels {
    vec![
        ("export".to_owned(), export.to_owned()),
        ("frontend".to_owned(), frontend.to_owned()),
        ("volume".to_owned(), volume.to_owned()),
    ]
}

/// Drops the series of `labels` (an export removed, a file closed).
pub fn forget(labels: &Labels) {
    METRICS.io.remove(labels, &OPS);
    METRICS.connections.remove(labels);
}

/// A device whose every request is counted.
#[derive(Debug)]
pub struct Metered {
    inner: Arc<dyn BlockDevice>,
    series: [IoSeries; 5],
}

impl Metered {
    /// `inner`, counted under `labels`.
    pub fn wrap(inner: Arc<dyn BlockDevice>, labels: &Labels) -> Arc<dyn BlockDevice> {
        let series = OPS.map(|op| METRICS.io.op(labels, op));
        Arc::new(Metered { inner, series })
    }
}

/// Counts one request; a request dropped before it completes counts as an error.
struct Op<'a> {
    series: &'a IoSeries,
    started: Instant,
    bytes: u64,
    done: bool,
}

impl<'a> Op<'a> {
    fn start(series: &'a IoSeries, bytes: u64) -> Self {
        series.start();
        Op {
            series,
            started: Instant::now(),
            bytes,
            done: false,
        }
    }

    fn end<T>(mut self, r: &curve_blockdev::IoResult<T>) {
        self.done = true;
        self.series
            .finish(self.bytes, r.is_ok(), self.started.elapsed());
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.series.finish(0, false, self.started.elapsed());
        }
    }
}

impl BlockDevice for Metered {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a> {
        let op = Op::start(&self.series[0], buf.len() as u64);
        let f = self.inner.read(offset, buf);
        Box::pin(async move {
            let r = f.await;
            op.end(&r);
            r
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        let op = Op::start(&self.series[1], buf.len() as u64);
        let f = self.inner.write(offset, buf, flags);
        Box::pin(async move {
            let r = f.await;
            op.end(&r);
            r
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        let op = Op::start(&self.series[2], 0);
        let f = self.inner.flush();
        Box::pin(async move {
            let r = f.await;
            op.end(&r);
            r
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        let op = Op::start(&self.series[3], len);
        let f = self.inner.discard(offset, len);
        Box::pin(async move {
            let r = f.await;
            op.end(&r);
            r
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        let op = Op::start(&self.series[4], len);
        let f = self.inner.write_zeroes(offset, len, flags);
        Box::pin(async move {
            let r = f.await;
            op.end(&r);
            r
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<curve_blockdev::Extent>> {
        self.inner.block_status(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_goes_through() {
        let mem: Arc<dyn BlockDevice> = Arc::new(curve_blockdev::MemDevice::new(1 << 20).unwrap());
        let l = labels("t0", "nbd", "mem:1M");
        let dev = Metered::wrap(mem, &l);
        let buf = vec![7u8; 4096];
        block_on(dev.write(0, &buf, WriteFlags::default())).unwrap();
        let mut back = vec![0u8; 4096];
        block_on(dev.read(0, &mut back)).unwrap();
        assert_eq!(back, buf);
        assert!(block_on(dev.read(1 << 20, &mut back)).is_err());
        let text = METRICS.metrics.render();
        let v = |name: &str, op: &str| {
            curve_metrics::value(
                &text,
                name,
                &format!("export=\"t0\",frontend=\"nbd\",volume=\"mem:1M\",op=\"{op}\""),
            )
        };
        assert_eq!(v("curve_export_ops_total", "write"), Some(1.0), "{text}");
        assert_eq!(v("curve_export_bytes_total", "write"), Some(4096.0));
        assert_eq!(v("curve_export_ops_total", "read"), Some(2.0));
        assert_eq!(v("curve_export_errors_total", "read"), Some(1.0));
        assert_eq!(v("curve_export_inflight", "read"), Some(0.0));
        forget(&l);
        let text = METRICS.metrics.render();
        assert!(!text.contains("export=\"t0\""), "{text}");
    }

    fn block_on<T>(f: IoFuture<'_, T>) -> curve_blockdev::IoResult<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(f)
    }
}
