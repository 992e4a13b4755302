//! Volume specifications (`mem:1G`, `file:/path`, `file:/path?direct`,
//! `curve:/path[?mds=HOST:PORT,...&owner=NAME]`) and opening them as block devices: the part
//! of part2's File Manager that knows the backends.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use std::sync::OnceLock;

use curve_blockdev::{BlockDevice, FileDevice, FileOptions, IoError, MemDevice, parse_size};

/// Where `curve:` volumes are found unless their specification says otherwise.
#[derive(Debug, Clone)]
pub struct ClusterDefaults {
    /// MDS addresses.
    pub mds: Vec<String>,
    /// Owner the volumes are opened as.
    pub owner: String,
    /// The key MDS requests are signed with.
    pub key: Option<Arc<curve_auth::UserKey>>,
    /// This part2's identity at the MDS (a restart takes its own sessions over).
    pub client_id: String,
}

static DEFAULTS: OnceLock<ClusterDefaults> = OnceLock::new();

/// Sets the defaults of `curve:` volumes (once, at start).
pub fn set_cluster_defaults(d: ClusterDefaults) {
    let _ = DEFAULTS.set(d);
}

fn cluster_defaults() -> ClusterDefaults {
    DEFAULTS.get().cloned().unwrap_or_else(|| ClusterDefaults {
        mds: vec!["127.0.0.1:6700".into()],
        owner: "curve".into(),
        key: None,
        client_id: format!("nebd-server-{}", std::process::id()),
    })
}

/// The cluster volumes this process opened (their sessions go to the next part2 in a live
/// upgrade).
static OPEN_CLUSTER: parking_lot::Mutex<Vec<std::sync::Weak<curve_client::CurveDevice>>> =
    parking_lot::Mutex::new(Vec::new());

/// Sessions handed over by the previous part2, by volume path: the next open of that path
/// continues the session instead of opening a new one (which would raise the epoch).
static HANDED_OVER: std::sync::LazyLock<
    parking_lot::Mutex<std::collections::HashMap<String, curve_client::SessionState>>,
> = std::sync::LazyLock::new(Default::default);

/// The sessions of the cluster volumes open now, by path.
pub fn cluster_sessions() -> Vec<(String, curve_client::SessionState)> {
    let mut open = OPEN_CLUSTER.lock();
    open.retain(|w| w.strong_count() > 0);
    open.iter()
        .filter_map(|w| w.upgrade())
        .map(|d| (d.volume().path().to_owned(), d.volume().session()))
        .collect()
}

/// Closes the MDS session of every cluster volume still open (a clean stop: the volumes are
/// free for another client at once, not after their leases), waiting up to `timeout` in all.
/// Returns how many closed.
pub async fn close_cluster_sessions(timeout: std::time::Duration) -> usize {
    let open: Vec<_> = {
        let mut open = OPEN_CLUSTER.lock();
        std::mem::take(&mut *open)
            .into_iter()
            .filter_map(|w| w.upgrade())
            .collect()
    };
    let volumes: Vec<curve_client::Volume> = open.iter().map(|d| d.volume().clone()).collect();
    // On the client's runtime, where the volumes' connections live.
    let closing = curve_client::device::runtime().spawn(async move {
        let mut closed = 0;
        for v in volumes {
            match v.close().await {
                Ok(()) => closed += 1,
                Err(e) => tracing::warn!(volume = v.path(), error = %e, "closing the session"),
            }
        }
        closed
    });
    let started = std::time::Instant::now();
    let closed = match tokio::time::timeout(timeout, closing).await {
        Ok(Ok(closed)) => closed,
        _ => 0,
    };
    // And those of devices dropped just before (their exports went away first).
    if !curve_client::device::closes_done(timeout.saturating_sub(started.elapsed())).await
        || closed < open.len()
    {
        tracing::warn!("the MDS did not confirm every session closed in {timeout:?}");
    }
    closed
}

/// Sessions to continue instead of opening (see [`cluster_sessions`]).
pub fn adopt_sessions(sessions: Vec<(String, curve_client::SessionState)>) {
    HANDED_OVER.lock().extend(sessions);
}

/// What a volume is and where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSpec {
    /// RAM of this size, preallocated.
    Mem {
        /// Size in bytes.
        size: u64,
    },
    /// A local file or block device.
    File {
        /// Path.
        path: PathBuf,
        /// Open with O_DIRECT.
        direct: bool,
    },
    /// A test volume: `inner` with every `every`-th request completing `ms` late
    /// (`delay:EVERY:MS:SPEC`), for out-of-order completion tests.
    Delayed {
        /// Which requests are late.
        every: u64,
        /// How late, ms.
        ms: u64,
        /// The volume.
        inner: Box<VolumeSpec>,
    },
    /// A volume of the cluster.
    Curve {
        /// Its path in the namespace.
        path: String,
        /// MDS addresses (the daemon's `--mds` when absent).
        mds: Option<Vec<String>>,
        /// Owner (the daemon's `--owner` when absent).
        owner: Option<String>,
    },
}

/// Why a volume could not be parsed or opened.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The specification does not parse.
    #[error("bad volume {spec:?}: {reason}")]
    Spec {
        /// What was given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// The backend refused to open it.
    #[error("cannot open volume {spec}")]
    Open {
        /// The volume.
        spec: String,
        /// Cause.
        #[source]
        source: IoError,
    },
}

impl FromStr for VolumeSpec {
    type Err = VolumeError;
    fn from_str(s: &str) -> Result<Self, VolumeError> {
        let bad = |reason: String| VolumeError::Spec {
            spec: s.to_owned(),
            reason,
        };
        if let Some(size) = s.strip_prefix("mem:") {
            let size = parse_size(size).map_err(bad)?;
            if size == 0 {
                return Err(bad("size must be above 0".into()));
            }
            Ok(VolumeSpec::Mem { size })
        } else if let Some(path) = s.strip_prefix("file:") {
            let (path, direct) = match path.strip_suffix("?direct") {
                Some(p) => (p, true),
                None => (path, false),
            };
            if path.is_empty() {
                return Err(bad("file: needs a path".into()));
            }
            Ok(VolumeSpec::File {
                path: path.into(),
                direct,
            })
        } else if let Some(rest) = s.strip_prefix("delay:") {
            let mut it = rest.splitn(3, ':');
            let (Some(every), Some(ms), Some(inner)) = (it.next(), it.next(), it.next()) else {
                return Err(bad("delay:EVERY:MS:VOLUME".into()));
            };
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{v:?} is not a number")))
            };
            Ok(VolumeSpec::Delayed {
                every: num(every)?,
                ms: num(ms)?,
                inner: Box::new(inner.parse()?),
            })
        } else if let Some(rest) = s.strip_prefix("curve:") {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !path.starts_with('/') || path.len() < 2 {
                return Err(bad("curve: needs an absolute volume path".into()));
            }
            let (mut mds, mut owner) = (None, None);
            for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                match kv.split_once('=') {
                    Some(("mds", v)) if !v.is_empty() => {
                        mds = Some(v.split(',').map(String::from).collect());
                    }
                    Some(("owner", v)) if !v.is_empty() => owner = Some(v.to_string()),
                    _ => return Err(bad(format!("unknown option {kv:?} (mds=, owner=)"))),
                }
            }
            Ok(VolumeSpec::Curve {
                path: path.to_string(),
                mds,
                owner,
            })
        } else {
            Err(bad(
                "expected mem:SIZE (e.g. mem:1G), file:PATH[?direct] or curve:/PATH".into(),
            ))
        }
    }
}

impl fmt::Display for VolumeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VolumeSpec::Mem { size } => write!(f, "mem:{size}"),
            VolumeSpec::File { path, direct } => {
                write!(
                    f,
                    "file:{}{}",
                    path.display(),
                    if *direct { "?direct" } else { "" }
                )
            }
            VolumeSpec::Delayed { every, ms, inner } => write!(f, "delay:{every}:{ms}:{inner}"),
            VolumeSpec::Curve { path, mds, owner } => {
                write!(f, "curve:{path}")?;
                let mut q = Vec::new();
                if let Some(m) = mds {
                    q.push(format!("mds={}", m.join(",")));
                }
                if let Some(o) = owner {
                    q.push(format!("owner={o}"));
                }
                if !q.is_empty() {
                    write!(f, "?{}", q.join("&"))?;
                }
                Ok(())
            }
        }
    }
}

/// Volumes a new process opened before the pause of a hand-over, by specification and mode:
/// the next open of the same volume takes one from here (so the pause holds no opening).
static PREOPENED: std::sync::LazyLock<parking_lot::Mutex<Preopened>> =
    std::sync::LazyLock::new(Default::default);

/// Open devices by (volume specification, read-only).
type Preopened = std::collections::HashMap<(String, bool), Vec<Arc<dyn BlockDevice>>>;

/// Opens `spec` now, for a later [`VolumeSpec::open`] of the same volume and mode.
pub fn preopen(spec: &VolumeSpec, read_only: bool) -> Result<(), VolumeError> {
    let d = spec.open_now(read_only)?;
    PREOPENED
        .lock()
        .entry((spec.to_string(), read_only))
        .or_default()
        .push(d);
    Ok(())
}

/// Closes what was pre-opened and not used.
pub fn drop_preopened() {
    PREOPENED.lock().clear();
}

impl VolumeSpec {
    /// Opens the volume (or takes it from what a hand-over pre-opened, see [`preopen`]).
    pub fn open(&self, read_only: bool) -> Result<Arc<dyn BlockDevice>, VolumeError> {
        let key = (self.to_string(), read_only);
        if let Some(d) = PREOPENED.lock().get_mut(&key).and_then(Vec::pop) {
            return Ok(d);
        }
        self.open_now(read_only)
    }

    fn open_now(&self, read_only: bool) -> Result<Arc<dyn BlockDevice>, VolumeError> {
        let opened: Result<Arc<dyn BlockDevice>, IoError> = match self {
            VolumeSpec::Mem { size } => MemDevice::new(*size).map(|d| Arc::new(d) as _),
            VolumeSpec::File { path, direct } => FileDevice::open(
                path,
                FileOptions {
                    direct: *direct,
                    read_only,
                },
            )
            .map(|d| Arc::new(d) as _),
            VolumeSpec::Delayed { every, ms, inner } => {
                return inner.open_now(read_only).map(|d| {
                    Arc::new(curve_blockdev::DelayDevice::new(
                        d,
                        *every,
                        std::time::Duration::from_millis(*ms),
                    )) as _
                });
            }
            VolumeSpec::Curve { path, mds, owner } => {
                let d = cluster_defaults();
                let mut opts = curve_client::VolumeOptions::new(
                    mds.clone().unwrap_or(d.mds),
                    owner.as_deref().unwrap_or(&d.owner),
                );
                opts.client_id = d.client_id;
                opts.key = d.key;
                let handed = HANDED_OVER.lock().remove(path);
                let adopted = handed.is_some();
                curve_client::CurveDevice::open_with(path, opts, read_only, handed)
                    .map(|d| {
                        let d = Arc::new(d);
                        if adopted {
                            tracing::info!(path, "volume session taken over");
                        }
                        OPEN_CLUSTER.lock().push(Arc::downgrade(&d));
                        d as _
                    })
                    .map_err(|e| IoError::Backend(e.to_string()))
            }
        };
        opened.map_err(|source| VolumeError::Open {
            spec: self.to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let v: VolumeSpec = "mem:1G".parse().unwrap();
        assert_eq!(v, VolumeSpec::Mem { size: 1 << 30 });
        assert_eq!(v.to_string(), "mem:1073741824");
        let f: VolumeSpec = "file:/tmp/a?direct".parse().unwrap();
        assert_eq!(
            f,
            VolumeSpec::File {
                path: "/tmp/a".into(),
                direct: true
            }
        );
        assert_eq!(f.to_string(), "file:/tmp/a?direct");
        let c: VolumeSpec = "curve:/vms/d0?mds=127.0.0.1:1,127.0.0.1:2&owner=bob"
            .parse()
            .unwrap();
        assert_eq!(
            c,
            VolumeSpec::Curve {
                path: "/vms/d0".into(),
                mds: Some(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()]),
                owner: Some("bob".into())
            }
        );
        assert_eq!(c.to_string().parse::<VolumeSpec>().unwrap(), c);
        assert_eq!(
            "curve:/v".parse::<VolumeSpec>().unwrap().to_string(),
            "curve:/v"
        );
        let d: VolumeSpec = "delay:7:20:file:/tmp/x?direct".parse().unwrap();
        assert_eq!(d.to_string(), "delay:7:20:file:/tmp/x?direct");
        assert!("delay:7:file:/x".parse::<VolumeSpec>().is_err());
        assert!("delay:a:1:mem:1M".parse::<VolumeSpec>().is_err());
        for bad in [
            "mem:",
            "mem:0",
            "mem:1Q",
            "file:",
            "rbd:x",
            "",
            "curve:",
            "curve:v",
            "curve:/v?x=1",
        ] {
            assert!(bad.parse::<VolumeSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn open_errors_are_clear() {
        let v: VolumeSpec = "file:/nonexistent/vol".parse().unwrap();
        let e = v.open(false).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vol"));
    }
}
