//! The exports part2 serves: each is a volume opened through the block-device seam and
//! offered by one frontend. Names are unique across frontends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use curve_nbd::kernel::{self as nbd_kernel, DeviceOptions, KernelDevice};
use curve_nbd::{Export, ListenAddr, NbdServer};

use crate::control::{ExportSpec, ExportStatus, Frontend};
use crate::metafile::Metafile;
use crate::volume::VolumeSpec;

enum Served {
    Nbd {
        addr: ListenAddr,
        export: Arc<Export>,
    },
    VhostUserBlk {
        path: String,
        device: Arc<dyn curve_blockdev::BlockDevice>,
        // Stops serving (and removes the socket) when dropped.
        _server: curve_vhost_user_blk::Server,
    },
    Ublk {
        device: Arc<dyn curve_blockdev::BlockDevice>,
        // Left to the kernel when dropped (part2 going down: the next one recovers it);
        // taken by `remove`, which deletes the device.
        export: Option<curve_ublk::UblkExport>,
    },
    NbdDevice {
        export: Arc<Export>,
        path: String,
        // Left to the kernel when dropped (it holds I/O until the next part2 reattaches);
        // taken by `remove`, which disconnects it.
        kernel: Option<KernelDevice>,
    },
}

struct Entry {
    spec: ExportSpec,
    served: Served,
}

/// What the previous process handed over for one export.
enum Handed {
    /// The NBD listener of the export's address (None: another export of the address got it).
    Listener(Option<std::os::fd::OwnedFd>),
    /// A frozen vhost-user-blk back-end.
    Vhost(curve_vhost_user_blk::Frozen),
    /// A kernel NBD device's connections and their unconsumed bytes.
    Device(Vec<nbd_kernel::ParkedSocket>),
}

/// The exports held still for a hand-over (see [`ExportManager::hold`]).
pub struct Held<'a>(tokio::sync::MutexGuard<'a, BTreeMap<String, Entry>>);

impl Held<'_> {
    /// Exports.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No exports.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Held<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("exports", &self.0.len())
            .finish()
    }
}

/// What [`ExportManager::pause`] stopped.
#[derive(Debug, Default)]
pub struct Paused {
    /// NBD listeners and connections.
    pub nbd: curve_nbd::Paused,
    /// Kernel NBD devices: export, connections.
    pub devices: Vec<(String, Vec<nbd_kernel::ParkedSocket>)>,
    /// vhost-user-blk exports: name, frozen back-end.
    pub vhost: Vec<(String, curve_vhost_user_blk::Frozen)>,
}

/// Every export of this nebd-server.
pub struct ExportManager {
    nbd: NbdServer,
    /// NBD connections handed over, served once the hand-over commits.
    adopted: parking_lot::Mutex<Vec<curve_nbd::ParkedConnection>>,
    socket_group: Option<u32>,
    entries: tokio::sync::Mutex<BTreeMap<String, Entry>>,
    meta: Option<Arc<Metafile>>,
}

impl std::fmt::Debug for ExportManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportManager").finish_non_exhaustive()
    }
}

/// Checks an export name: 1–128 characters of `A-Z a-z 0-9 . _ -`, so that it can appear in
/// URIs and paths unescaped.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad export name {name:?}: use 1-128 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

impl ExportManager {
    /// No exports yet; when `meta` is given, exports are persisted there.
    pub fn new(meta: Option<Arc<Metafile>>) -> Self {
        ExportManager {
            nbd: NbdServer::new(),
            adopted: Default::default(),
            socket_group: None,
            entries: Default::default(),
            meta,
        }
    }

    /// Gives the export sockets (NBD on a Unix path, vhost-user) to group `gid` (0660).
    pub fn with_socket_group(mut self, gid: Option<u32>) -> Self {
        self.socket_group = gid;
        self
    }

    /// Re-creates the exports recorded in the metafile (after a restart), on the same
    /// addresses. Failures are logged; the record stays for the next start.
    pub async fn restore(&self) {
        let Some(meta) = &self.meta else { return };
        for spec in meta.state().exports {
            let name = spec.name.clone();
            match self.add_inner(spec, false, None).await {
                Ok(s) => tracing::info!(name, uri = %s.uri, "export restored"),
                Err(e) => tracing::error!(name, error = %e, "cannot restore export"),
            }
        }
    }

    /// Opens the volume, starts serving it and records it in the metafile.
    pub async fn add(&self, spec: ExportSpec) -> Result<ExportStatus, String> {
        self.add_inner(spec, true, None).await
    }

    async fn add_inner(
        &self,
        spec: ExportSpec,
        persist: bool,
        handed: Option<Handed>,
    ) -> Result<ExportStatus, String> {
        let mut entries = self.entries.lock().await;
        self.add_locked(&mut entries, spec, persist, handed).await
    }

    async fn add_locked(
        &self,
        entries: &mut BTreeMap<String, Entry>,
        mut spec: ExportSpec,
        persist: bool,
        handed: Option<Handed>,
    ) -> Result<ExportStatus, String> {
        validate_name(&spec.name)?;
        let volume: VolumeSpec = spec.volume.parse().map_err(|e| format!("{e}"))?;
        let addr: Option<ListenAddr> = match &spec.frontend {
            Frontend::Nbd { address } => Some(address.parse()?),
            Frontend::VhostUserBlk { path, queues } => {
                if path.is_empty() || !path.starts_with('/') {
                    return Err(format!("vhost-user-blk socket {path:?}: an absolute path"));
                }
                if *queues == 0 || *queues > 64 {
                    return Err(format!("{queues} queues: 1 to 64"));
                }
                None
            }
            Frontend::Ublk {
                queues,
                queue_depth,
                ..
            } => {
                curve_ublk::check(&ublk_options(*queues, *queue_depth, spec.read_only))
                    .map_err(|e| e.to_string())?;
                None
            }
            Frontend::NbdDevice {
                device,
                connections,
                ..
            } => {
                if let Some(d) = device {
                    nbd_kernel::parse_device_path(d).map_err(|e| e.to_string())?;
                }
                if *connections == 0 || *connections > nbd_kernel::MAX_CONNECTIONS {
                    return Err(format!(
                        "{connections} connections: 1 to {}",
                        nbd_kernel::MAX_CONNECTIONS
                    ));
                }
                if handed.is_none() {
                    // (A device handed over proves the driver is there.)
                    nbd_kernel::check_driver().map_err(|e| error_chain(&e))?;
                }
                None
            }
        };
        if entries.contains_key(&spec.name) {
            return Err(format!("an export named {:?} already exists", spec.name));
        }
        spec.volume = volume.to_string();
        if let Some(a) = &addr {
            spec.frontend = Frontend::Nbd {
                address: a.to_string(),
            };
        }
        let read_only = spec.read_only;
        let device = tokio::task::spawn_blocking(move || volume.open(read_only))
            .await
            .map_err(|e| format!("volume open panicked: {e}"))?
            .map_err(|e| error_chain(&e))?;
        // A volume that is read-only whatever was asked (a snapshot, curve:/PATH@NAME) is
        // exported read-only by every frontend.
        let read_only = read_only || device.info().read_only;
        spec.read_only = read_only;
        let labels = crate::metered::labels(&spec.name, spec.frontend.kind(), &spec.volume);
        let device = crate::metered::Metered::wrap(device, &labels);
        let served = match (&spec.frontend, addr) {
            (Frontend::Nbd { .. }, Some(addr)) => {
                let export = Export::new(spec.name.clone(), spec.volume.clone(), device, read_only);
                let listening = match handed {
                    Some(Handed::Listener(fd)) => fd,
                    _ => None,
                };
                self.nbd
                    .add_export_on(&addr, export.clone(), listening)
                    .await
                    .map_err(|e| error_chain(&e))?;
                if let ListenAddr::Unix(path) = &addr {
                    crate::daemon::share_socket(path, self.socket_group)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
                Served::Nbd { addr, export }
            }
            (Frontend::VhostUserBlk { path, queues }, _) => {
                let opts = curve_vhost_user_blk::Options {
                    queues: *queues,
                    read_only,
                    serial: spec.name.clone(),
                };
                let sock = std::path::Path::new(path);
                let server = match handed {
                    Some(Handed::Vhost(frozen)) => {
                        curve_vhost_user_blk::Server::adopt(sock, frozen, device.clone(), opts)
                            .map_err(|e| {
                                format!("cannot take over vhost-user-blk at {path}: {e}")
                            })?
                    }
                    _ => curve_vhost_user_blk::Server::start(sock, device.clone(), opts)
                        .map_err(|e| format!("cannot serve vhost-user-blk at {path}: {e}"))?,
                };
                crate::daemon::share_socket(std::path::Path::new(path), self.socket_group)
                    .map_err(|e| format!("{path}: {e}"))?;
                Served::VhostUserBlk {
                    path: path.clone(),
                    device,
                    _server: server,
                }
            }
            (
                Frontend::Ublk {
                    queues,
                    queue_depth,
                    device_id,
                },
                _,
            ) => {
                let opts = ublk_options(*queues, *queue_depth, read_only);
                let recover = device_id.filter(|_| !persist);
                let dev = device.clone();
                let export = tokio::task::spawn_blocking(move || match recover {
                    Some(id) if curve_ublk::UblkExport::exists(id) => {
                        tracing::info!(id, "recovering ublk device");
                        curve_ublk::UblkExport::recover(id, dev, &opts)
                    }
                    _ => curve_ublk::UblkExport::add(dev, &opts),
                })
                .await
                .map_err(|e| format!("ublk set-up panicked: {e}"))?
                .map_err(|e| error_chain(&e))?;
                if !persist && *device_id != Some(export.id()) {
                    // The recorded device was gone: record the new one.
                    let (name, id) = (spec.name.clone(), export.id());
                    if let Some(meta) = &self.meta {
                        let _ = meta.update(|s| {
                            for e in s.exports.iter_mut().filter(|e| e.name == name) {
                                if let Frontend::Ublk { device_id, .. } = &mut e.frontend {
                                    *device_id = Some(id);
                                }
                            }
                        });
                    }
                }
                spec.frontend = Frontend::Ublk {
                    queues: *queues,
                    queue_depth: *queue_depth,
                    device_id: Some(export.id()),
                };
                Served::Ublk {
                    device,
                    export: Some(export),
                }
            }
            (
                Frontend::NbdDevice {
                    device: path,
                    connections,
                    io_timeout,
                    reattach_timeout,
                    cookie,
                },
                _,
            ) => {
                let export = Export::new(spec.name.clone(), spec.volume.clone(), device, read_only);
                // A restored export takes back the device it recorded, if that still carries
                // its cookie; a new one gets a new cookie.
                let recorded = cookie.clone().filter(|_| !persist);
                let opts = DeviceOptions {
                    connections: *connections,
                    io_timeout: *io_timeout,
                    reattach_timeout: *reattach_timeout,
                    cookie: recorded.clone().unwrap_or_else(|| new_cookie(&spec.name)),
                };
                let index = match path {
                    Some(p) => Some(nbd_kernel::parse_device_path(p).map_err(|e| e.to_string())?),
                    None => None,
                };
                let handed_conns = match handed {
                    Some(Handed::Device(c)) => Some(c),
                    _ => None,
                };
                let adopted = handed_conns.is_some();
                let kernel = tokio::task::spawn_blocking({
                    let export = export.clone();
                    let opts = opts.clone();
                    move || match (recorded, index, handed_conns) {
                        (Some(_), Some(i), Some(c)) => KernelDevice::adopt(export, i, &opts, c),
                        (Some(_), Some(i), None) => KernelDevice::reattach(export, i, &opts),
                        _ => KernelDevice::attach(export, index, &opts),
                    }
                })
                .await
                .map_err(|e| format!("NBD device set-up panicked: {e}"))?
                .map_err(|e| error_chain(&e))?;
                let path = kernel.path().display().to_string();
                spec.frontend = Frontend::NbdDevice {
                    device: Some(path.clone()),
                    connections: *connections,
                    io_timeout: *io_timeout,
                    reattach_timeout: *reattach_timeout,
                    cookie: Some(opts.cookie),
                };
                // A device taken over keeps its record as it is.
                if !persist
                    && !adopted
                    && let Some(meta) = &self.meta
                {
                    let record = spec.clone();
                    let _ = meta.update(|s| {
                        for e in s.exports.iter_mut().filter(|e| e.name == record.name) {
                            *e = record.clone();
                        }
                    });
                }
                Served::NbdDevice {
                    export,
                    path,
                    kernel: Some(kernel),
                }
            }
            (Frontend::Nbd { .. }, None) => unreachable!("NBD exports have an address"),
        };
        if let (true, Some(meta)) = (persist, &self.meta) {
            let record = spec.clone();
            if let Err(e) = meta.update(|s| s.exports.push(record)) {
                match served {
                    Served::Nbd { .. } => {
                        let _ = self.nbd.remove_export(&spec.name).await;
                    }
                    Served::Ublk {
                        export: Some(export),
                        ..
                    } => {
                        let _ = tokio::task::spawn_blocking(move || export.remove()).await;
                    }
                    Served::NbdDevice {
                        kernel: Some(kernel),
                        ..
                    } => {
                        let _ = tokio::task::spawn_blocking(move || kernel.detach()).await;
                    }
                    _ => {}
                }
                return Err(format!("cannot write the metafile: {e}"));
            }
        }
        tracing::info!(name = %spec.name, volume = %spec.volume, frontend = ?spec.frontend, read_only, "export added");
        let entry = Entry { spec, served };
        let status = status(&entry);
        entries.insert(entry.spec.name.clone(), entry);
        Ok(status)
    }

    /// Holds the exports for a hand-over: nothing is added or removed until the guard goes.
    pub async fn hold(&self) -> Held<'_> {
        Held(self.entries.lock().await)
    }

    /// Pauses every frontend that hands over (NBD listeners and connections, kernel NBD
    /// devices, vhost-user-blk): what they had in flight is answered, and they stop between
    /// requests with their sockets open. ublk devices go on serving (the next process takes
    /// them through the kernel's recovery once this one has exited). On failure what was
    /// paused resumes.
    pub async fn pause(&self, held: &mut Held<'_>, timeout: Duration) -> Result<Paused, String> {
        let mut paused = Paused {
            nbd: self.nbd.pause(timeout).await?,
            ..Default::default()
        };
        let mut failed = None;
        for (name, e) in held.0.iter() {
            let r = tokio::task::block_in_place(|| match &e.served {
                Served::NbdDevice {
                    kernel: Some(k), ..
                } => k
                    .pause(timeout)
                    .map(|c| paused.devices.push((name.clone(), c)))
                    .map_err(|e| error_chain(&e)),
                Served::VhostUserBlk { _server: s, .. } => s
                    .pause()
                    .map(|f| paused.vhost.push((name.clone(), f)))
                    .map_err(|e| format!("{name}: {e}")),
                _ => Ok(()),
            });
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
        }
        match failed {
            None => Ok(paused),
            Some(e) => {
                self.resume(held, paused).await;
                Err(e)
            }
        }
    }

    /// Serves again what [`pause`](Self::pause) stopped (the hand-over failed).
    pub async fn resume(&self, held: &mut Held<'_>, paused: Paused) {
        let Paused {
            nbd,
            devices,
            vhost,
        } = paused;
        let mut devices: std::collections::HashMap<_, _> = devices.into_iter().collect();
        for (name, e) in held.0.iter() {
            match &e.served {
                Served::NbdDevice {
                    kernel: Some(k), ..
                } => {
                    if let Some(c) = devices.remove(name) {
                        k.resume(c);
                    }
                }
                Served::VhostUserBlk { _server: s, .. } if vhost.iter().any(|(n, _)| n == name) => {
                    s.resume();
                }
                _ => {}
            }
        }
        self.nbd.resume(nbd).await;
        tracing::info!("exports resumed after a failed hand-over");
    }

    /// Serves the exports of the metafile on what the previous process handed over
    /// (`offer`); ublk exports are left for [`restore_ublk`](Self::restore_ublk), once the
    /// previous process is gone. Fails at the first export that cannot be taken over.
    pub async fn adopt(
        &self,
        offer: &mut crate::handover::Offer,
        rec: &mut crate::handover::Received,
    ) -> Result<(), String> {
        let Some(meta) = &self.meta else {
            return Ok(());
        };
        // Nothing is served before the hand-over commits (see `start_adopted`).
        self.nbd.hold();
        let io = |e: std::io::Error| e.to_string();
        let mut listeners: Vec<(String, Option<std::os::fd::OwnedFd>)> = Vec::new();
        for (addr, fd, _) in &offer.nbd_listeners {
            listeners.push((addr.clone(), Some(rec.fd(*fd).map_err(io)?)));
        }
        for spec in meta.state().exports {
            let handed = match &spec.frontend {
                Frontend::Ublk { .. } => continue,
                Frontend::Nbd { address } => {
                    let fd = listeners
                        .iter_mut()
                        .find(|(a, _)| a == address)
                        .and_then(|(_, fd)| fd.take());
                    Handed::Listener(fd)
                }
                Frontend::VhostUserBlk { .. } => {
                    let Some(i) = offer.vhost.iter().position(|(n, _, _)| *n == spec.name) else {
                        return Err(format!("{}: the offer has no vhost-user state", spec.name));
                    };
                    let (_, state, idx) = offer.vhost.swap_remove(i);
                    let mut fds = Vec::new();
                    for i in idx {
                        fds.push(rec.fd(i).map_err(io)?);
                    }
                    Handed::Vhost(curve_vhost_user_blk::Frozen { state, fds })
                }
                Frontend::NbdDevice { .. } => {
                    let Some(i) = offer.nbd_devices.iter().position(|(n, _)| *n == spec.name)
                    else {
                        return Err(format!("{}: the offer has no NBD device", spec.name));
                    };
                    let (_, conns) = offer.nbd_devices.swap_remove(i);
                    let mut c = Vec::new();
                    for (fd, blob) in conns {
                        c.push((rec.fd(fd).map_err(io)?, rec.blob(blob).map_err(io)?));
                    }
                    Handed::Device(c)
                }
            };
            let name = spec.name.clone();
            self.add_inner(spec, false, Some(handed))
                .await
                .map_err(|e| format!("{name}: {e}"))?;
        }
        let entries = self.entries.lock().await;
        for c in std::mem::take(&mut offer.nbd_connections) {
            if !matches!(
                entries.get(&c.export).map(|e| &e.served),
                Some(Served::Nbd { .. })
            ) {
                return Err(format!("a connection to {:?}, not an NBD export", c.export));
            }
            self.adopted.lock().push(curve_nbd::ParkedConnection {
                export: c.export,
                fd: rec.fd(c.fd).map_err(io)?,
                tcp: c.tcp,
                structured: c.structured,
                block_status: c.block_status,
                leftover: rec.blob(c.leftover).map_err(io)?,
            });
        }
        Ok(())
    }

    /// Serves what [`adopt`](Self::adopt) took (the hand-over committed): NBD listeners and
    /// connections, kernel NBD connections, vhost-user front-ends.
    pub async fn start_adopted(&self) {
        for e in self.entries.lock().await.values() {
            match &e.served {
                Served::NbdDevice {
                    kernel: Some(k), ..
                } => k.resume_parked(),
                Served::VhostUserBlk { _server: s, .. } => s.resume(),
                _ => {}
            }
        }
        let connections = std::mem::take(&mut *self.adopted.lock());
        self.nbd
            .resume(curve_nbd::Paused {
                listeners: Vec::new(),
                connections,
            })
            .await;
    }

    /// Recovers the ublk exports of the metafile (after a hand-over, once the previous
    /// process has exited and the kernel holds their I/O).
    pub async fn restore_ublk(&self) {
        let Some(meta) = &self.meta else { return };
        for spec in meta.state().exports {
            if !matches!(spec.frontend, Frontend::Ublk { .. }) {
                continue;
            }
            let name = spec.name.clone();
            match self.add_inner(spec, false, None).await {
                Ok(s) => tracing::info!(name, uri = %s.uri, "ublk export recovered"),
                Err(e) => tracing::error!(name, error = %e, "cannot recover ublk export"),
            }
        }
    }

    /// Stops serving an export and closes its volume once its connections are gone.
    pub async fn remove(&self, name: &str) -> Result<(), String> {
        let mut entries = self.entries.lock().await;
        let Some(mut entry) = entries.remove(name) else {
            return Err(format!("no export named {name:?}"));
        };
        match &mut entry.served {
            Served::Nbd { .. } => {
                self.nbd
                    .remove_export(name)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Served::Ublk { export, .. } => {
                // STOP_DEV lets what is in flight finish; later I/O on the device fails.
                if let Some(export) = export.take() {
                    tokio::task::spawn_blocking(move || export.remove())
                        .await
                        .map_err(|e| format!("ublk removal panicked: {e}"))?
                        .map_err(|e| error_chain(&e))?;
                }
            }
            Served::NbdDevice { kernel, .. } => {
                // The kernel fails what it has queued; our connections finish what they hold.
                if let Some(kernel) = kernel.take() {
                    tokio::task::spawn_blocking(move || kernel.detach())
                        .await
                        .map_err(|e| format!("NBD device removal panicked: {e}"))?
                        .map_err(|e| error_chain(&e))?;
                }
            }
            Served::VhostUserBlk { .. } => {}
        }
        crate::metered::forget(&crate::metered::labels(
            name,
            entry.spec.frontend.kind(),
            &entry.spec.volume,
        ));
        drop(entry);
        if let Some(meta) = &self.meta {
            meta.update(|s| s.exports.retain(|e| e.name != name))
                .map_err(|e| format!("cannot write the metafile: {e}"))?;
        }
        tracing::info!(name, "export removed");
        Ok(())
    }

    /// Every export, by name.
    pub async fn list(&self) -> Vec<ExportStatus> {
        self.entries.lock().await.values().map(status).collect()
    }

    /// Sets the per-export gauges (connections, exports by frontend) from what is served now;
    /// skipped while an export is being added or removed.
    pub fn update_gauges(&self) {
        let Ok(entries) = self.entries.try_lock() else {
            return;
        };
        let m = &crate::metered::METRICS;
        let mut by_frontend = std::collections::BTreeMap::<&str, i64>::new();
        for e in entries.values() {
            let kind = e.spec.frontend.kind();
            *by_frontend.entry(kind).or_default() += 1;
            let st = status(e);
            m.connections
                .get_or_create(&crate::metered::labels(&e.spec.name, kind, &e.spec.volume))
                .set(st.connections as i64);
        }
        for kind in ["nbd", "vhost_user_blk", "ublk", "nbd_device"] {
            m.exports
                .get_or_create(&vec![("frontend".to_owned(), kind.to_owned())])
                .set(by_frontend.get(kind).copied().unwrap_or(0));
        }
    }

    /// Closes every frontend, giving connections `grace` to finish.
    pub async fn shutdown(&self, grace: Duration) {
        self.nbd.shutdown(grace).await;
        self.entries.lock().await.clear();
    }
}

fn ublk_options(queues: u16, queue_depth: u16, read_only: bool) -> curve_ublk::Options {
    curve_ublk::Options {
        queues,
        queue_depth,
        read_only,
    }
}

fn status(e: &Entry) -> ExportStatus {
    let mut device_path = None;
    let (uri, info, connections) = match &e.served {
        Served::Nbd { addr, export } => (
            addr.uri(&e.spec.name),
            export.device().info().clone(),
            export.connections(),
        ),
        Served::VhostUserBlk { path, device, .. } => (path.clone(), device.info().clone(), 0),
        Served::Ublk { device, export } => {
            let path = export
                .as_ref()
                .map(|x| x.path().display().to_string())
                .unwrap_or_default();
            device_path = Some(path.clone());
            (path, device.info().clone(), 0)
        }
        Served::NbdDevice { export, path, .. } => {
            device_path = Some(path.clone());
            (
                path.clone(),
                export.device().info().clone(),
                export.connections(),
            )
        }
    };
    ExportStatus {
        spec: e.spec.clone(),
        uri,
        size: info.size,
        block_size: info.block_size,
        connections,
        device: device_path,
    }
}

/// A backend identifier for a kernel NBD device: the export's name and something unique to
/// this attachment.
fn new_cookie(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("curve-rs:{name}:{:x}-{nanos:x}", std::process::id())
}

pub use crate::control::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("vol-0.a_b").is_ok());
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
