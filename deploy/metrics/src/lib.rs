//! Metrics of every Curve-rs daemon, one way: a [`Metrics`] registry (the `prometheus-client`
//! crate) that the daemon fills, families for block I/O ([`IoFamilies`]), and the endpoint that
//! serves it as OpenMetrics text on `GET /metrics` ([`serve`], `--metrics-listen HOST:PORT`).
//!
//! ```text
//!  daemon ── Metrics::registry() ── register families (counters, gauges, histograms)
//!         └─ Metrics::on_scrape(f) ── gauges read from live state just before each scrape
//!  serve(addr) ── GET /metrics ── on_scrape hooks, then text::encode(registry)
//! ```

pub mod process;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
pub use prometheus_client;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a series: `(name, value)` pairs, in order.
pub type Labels = Vec<(String, String)>;

/// A histogram family labelled by [`Labels`].
pub type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// The latency buckets every daemon uses: 25 µs to ~13 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(25e-6, 2.0, 20))
}

fn new_latency_family() -> HistogramFamily {
    Family::new_with_constructor(latency_histogram)
}

type Hook = Box<dyn Fn() + Send + Sync>;

/// The metrics of one process.
pub struct Metrics {
    registry: Mutex<Registry>,
    hooks: Mutex<Vec<Hook>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            registry: Mutex::new(Registry::default()),
            hooks: Mutex::new(Vec::new()),
        }
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The registry, to register families in.
    pub fn registry(&self) -> parking_lot::MutexGuard<'_, Registry> {
        self.registry.lock()
    }

    /// Registers a counter family.
    pub fn counter(&self, name: &str, help: &str) -> Family<Labels, Counter> {
        let f = Family::<Labels, Counter>::default();
        self.registry.lock().register(name, help, f.clone());
        f
    }

    /// Registers a counter family labelled `label` whose values are read from `read` (running
    /// totals kept elsewhere, e.g. refusals counted by a library) just before each scrape.
    pub fn counters_from(
        &self,
        name: &str,
        help: &str,
        label: &'static str,
        read: impl Fn() -> Vec<(&'static str, u64)> + Send + Sync + 'static,
    ) {
        let f = self.counter(name, help);
        self.on_scrape(move || {
            for (v, n) in read() {
                let c = f.get_or_create(&vec![(label.to_string(), v.to_string())]);
                c.inc_by(n.saturating_sub(c.get()));
            }
        });
    }

    /// Registers a gauge family.
    pub fn gauge(&self, name: &str, help: &str) -> Family<Labels, Gauge> {
        let f = Family::<Labels, Gauge>::default();
        self.registry.lock().register(name, help, f.clone());
        f
    }

    /// Registers a latency histogram family (seconds).
    pub fn latency(&self, name: &str, help: &str) -> HistogramFamily {
        let f = new_latency_family();
        self.registry.lock().register(name, help, f.clone());
        f
    }

    /// Runs `f` before every scrape (to set gauges from live state).
    pub fn on_scrape(&self, f: impl Fn() + Send + Sync + 'static) {
        self.hooks.lock().push(Box::new(f));
    }

    /// Everything, as OpenMetrics text.
    pub fn render(&self) -> String {
        for h in self.hooks.lock().iter() {
            h();
        }
        let mut out = String::new();
        let registry = self.registry.lock();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Operations, bytes, errors, latency and requests in flight of block I/O, by labels
/// (`op` last): `<prefix>_ops_total`, `_bytes_total`, `_errors_total`, `_latency_seconds`,
/// `_inflight`.
#[derive(Debug, Clone)]
pub struct IoFamilies {
    /// Operations completed.
    pub ops: Family<Labels, Counter>,
    /// Bytes moved by operations that succeeded.
    pub bytes: Family<Labels, Counter>,
    /// Operations that failed.
    pub errors: Family<Labels, Counter>,
    /// Latency of each operation.
    pub latency: HistogramFamily,
    /// Operations started and not completed.
    pub inflight: Family<Labels, Gauge>,
}

impl IoFamilies {
    /// Registers the families under `prefix` (e.g. `curve_export`); `what` names the scope in
    /// their help texts.
    pub fn register(m: &Metrics, prefix: &str, what: &str) -> Self {
        IoFamilies {
            ops: m.counter(
                &format!("{prefix}_ops"),
                &format!("Operations completed by {what}"),
            ),
            bytes: m.counter(
                &format!("{prefix}_bytes"),
                &format!("Bytes moved by {what} (successful operations)"),
            ),
            errors: m.counter(
                &format!("{prefix}_errors"),
                &format!("Operations of {what} that failed"),
            ),
            latency: m.latency(
                &format!("{prefix}_latency_seconds"),
                &format!("Latency of the operations of {what}"),
            ),
            inflight: m.gauge(
                &format!("{prefix}_inflight"),
                &format!("Operations of {what} in flight"),
            ),
        }
    }

    /// The series of `labels` plus `op`.
    pub fn op(&self, labels: &Labels, op: &str) -> IoSeries {
        let mut l = labels.clone();
        l.push(("op".into(), op.into()));
        IoSeries {
            ops: self.ops.get_or_create(&l).clone(),
            bytes: self.bytes.get_or_create(&l).clone(),
            errors: self.errors.get_or_create(&l).clone(),
            latency: self.latency.get_or_create(&l).clone(),
            inflight: self.inflight.get_or_create(&l).clone(),
        }
    }

    /// Drops the series of `labels` with each of `ops` (an export removed).
    pub fn remove(&self, labels: &Labels, ops: &[&str]) {
        for op in ops {
            let mut l = labels.clone();
            l.push(("op".into(), (*op).into()));
            self.ops.remove(&l);
            self.bytes.remove(&l);
            self.errors.remove(&l);
            self.latency.remove(&l);
            self.inflight.remove(&l);
        }
    }
}

/// The metrics of one operation of one scope: cheap clones of the family members, so the I/O
/// path touches atomics only.
#[derive(Debug, Clone)]
pub struct IoSeries {
    ops: Counter,
    bytes: Counter,
    errors: Counter,
    latency: Histogram,
    inflight: Gauge,
}

impl IoSeries {
    /// Operations completed so far.
    pub fn ops(&self) -> u64 {
        self.ops.get()
    }

    /// An operation starts.
    pub fn start(&self) {
        self.inflight.inc();
    }

    /// An operation started with [`IoSeries::start`] ends.
    pub fn finish(&self, bytes: u64, ok: bool, took: Duration) {
        self.inflight.dec();
        self.record(bytes, ok, took);
    }

    /// Records one operation (no in-flight accounting).
    pub fn record(&self, bytes: u64, ok: bool, took: Duration) {
        self.ops.inc();
        if ok {
            self.bytes.inc_by(bytes);
        } else {
            self.errors.inc();
        }
        self.latency.observe(took.as_secs_f64());
    }
}

/// gRPC requests served, by method and status, and their latency: a tower layer for tonic
/// servers (`Server::builder().layer(GrpcMetrics::register(...))`). The status is the
/// `grpc-status` of a trailers-only answer (how tonic returns errors), else `OK`.
#[derive(Debug, Clone)]
pub struct GrpcMetrics {
    requests: Family<Labels, Counter>,
    latency: HistogramFamily,
}

impl GrpcMetrics {
    /// Registers `<prefix>_requests_total{method,status}` and
    /// `<prefix>_request_latency_seconds{method}`.
    pub fn register(m: &Metrics, prefix: &str) -> Self {
        GrpcMetrics {
            requests: m.counter(
                &format!("{prefix}_requests"),
                "gRPC requests answered, by method and status",
            ),
            latency: m.latency(
                &format!("{prefix}_request_latency_seconds"),
                "gRPC request latency, by method",
            ),
        }
    }

    fn record(&self, method: &str, status: &str, took: Duration) {
        self.requests
            .get_or_create(&vec![
                ("method".to_owned(), method.to_owned()),
                ("status".to_owned(), status.to_owned()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("method".to_owned(), method.to_owned())])
            .observe(took.as_secs_f64());
    }
}

impl<S> tower_layer::Layer<S> for GrpcMetrics {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.clone(),
        }
    }
}

/// The service [`GrpcMetrics`] wraps around each tonic service.
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: GrpcMetrics,
}

/// The canonical name of a gRPC status code.
pub fn grpc_code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "6" => "ALREADY_EXISTS",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "10" => "ABORTED",
        "11" => "OUT_OF_RANGE",
        "12" => "UNIMPLEMENTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "15" => "DATA_LOSS",
        "16" => "UNAUTHENTICATED",
        _ => "OTHER",
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let started = std::time::Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let r = fut.await;
            let status = match &r {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .map(grpc_code_name)
                    .unwrap_or("OK"),
                Err(_) => "TRANSPORT",
            };
            metrics.record(&method, status, started.elapsed());
            r
        })
    }
}

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Not a `HOST:PORT`, or it cannot be bound.
    #[error("cannot serve metrics on {addr:?}")]
    Bind {
        /// The address given.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Binds `addr` (`HOST:PORT`) and serves `GET /metrics` from `metrics` on the current tokio
/// runtime; returns the bound address (port 0 picks one).
pub async fn serve(addr: &str, metrics: Arc<Metrics>) -> Result<std::net::SocketAddr, ServeError> {
    let bind_err = |source| ServeError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    tokio::spawn(accept_loop(listener, metrics));
    tracing::info!(%local, "metrics at http://{local}/metrics");
    Ok(local)
}

async fn accept_loop(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(s, &metrics)).await;
        });
    }
}

/// Reads one request head and answers it (HTTP/1.1, `Connection: close`).
async fn answer(mut s: tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    loop {
        if n == buf.len() {
            return Ok(()); // no request head in 8 KiB: not a scraper
        }
        let k = s.read(&mut buf[n..]).await?;
        if k == 0 {
            return Ok(());
        }
        n += k;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let path = std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|h| h.lines().next())
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("");
    let (status, ctype, body) = if path == "/metrics" || path.starts_with("/metrics?") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "only GET /metrics is served here\n".to_owned(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

/// Fetches `http://addr/metrics` (tests and `curve` use it).
pub async fn scrape(addr: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out);
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other(format!(
            "bad answer from {addr}: {}",
            text.lines().next().unwrap_or("")
        ))),
    }
}

/// The value of the series `name{labels}` in a scrape (labels as written, e.g.
/// `export="v0",op="write"`); None when absent.
pub fn value(text: &str, name: &str, labels: &str) -> Option<f64> {
    let want = format!("{name}{{{labels}}}");
    text.lines().find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        (series == want || (labels.is_empty() && series == name)).then(|| v.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoint_serves_families_and_hooks() {
        let m = Metrics::new();
        let io = IoFamilies::register(&m, "curve_test", "tests");
        let labels = vec![("export".to_owned(), "v0".to_owned())];
        let w = io.op(&labels, "write");
        w.start();
        w.finish(4096, true, Duration::from_micros(300));
        w.record(0, false, Duration::from_millis(2));
        let g = m.gauge("curve_test_live", "set on scrape");
        let gc = g.clone();
        m.on_scrape(move || {
            gc.get_or_create(&vec![]).set(7);
        });
        let addr = serve("127.0.0.1:0", m.clone()).await.unwrap().to_string();
        let text = scrape(&addr).await.unwrap();
        assert_eq!(
            value(&text, "curve_test_ops_total", "export=\"v0\",op=\"write\""),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "curve_test_bytes_total",
                "export=\"v0\",op=\"write\""
            ),
            Some(4096.0)
        );
        assert_eq!(
            value(
                &text,
                "curve_test_errors_total",
                "export=\"v0\",op=\"write\""
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "curve_test_inflight", "export=\"v0\",op=\"write\""),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                "curve_test_latency_seconds_count",
                "export=\"v0\",op=\"write\""
            ),
            Some(2.0)
        );
        assert_eq!(value(&text, "curve_test_live", ""), Some(7.0), "{text}");
        io.remove(&labels, &["write"]);
        let text = scrape(&addr).await.unwrap();
        assert_eq!(
            value(&text, "curve_test_ops_total", "export=\"v0\",op=\"write\""),
            None
        );
        // Anything else: 404.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    }

    #[tokio::test]
    async fn bad_address_is_a_clear_error() {
        let e = serve("nonsense", Metrics::new()).await.unwrap_err();
        assert!(e.to_string().contains("\"nonsense\""), "{e}");
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        assert!(serve(&addr, Metrics::new()).await.is_err());
    }
}
