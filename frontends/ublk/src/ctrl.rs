//! The control plane: adding a ublk device for a volume, recovering one a dead server left
//! behind, and deleting one. The data plane (one thread per queue) is in [`crate::queue`].
//!
//! ```text
//!   add:      ADD_DEV (USER_RECOVERY | USER_RECOVERY_REISSUE) -> SET_PARAMS
//!             -> queue threads (FETCH every tag) -> START_DEV          => /dev/ublkbN
//!   recover:  START_USER_RECOVERY (waits until the kernel has seen the old server die and
//!             quiesced the device) -> queue threads -> END_USER_RECOVERY => the same /dev/ublkbN;
//!             requests the old server held are reissued to the new one
//!   remove:   STOP_DEV (the kernel drains what is in flight, then aborts the queues)
//!             -> queue threads end -> DEL_DEV
//!   drop:     the device is left to the kernel (quiesced once this process is gone), for the
//!             next server to recover
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use curve_blockdev::BlockDevice;
use curve_blockdev::exec::Notifier;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDescList, UblkFlags};

use crate::queue::UblkSource;
use crate::request::Limits;

/// The ublk driver's control device.
pub const CONTROL_DEVICE: &str = "/dev/ublk-control";
/// Deepest queue the driver accepts (`UBLK_MAX_QUEUE_DEPTH`).
pub const MAX_QUEUE_DEPTH: u16 = 4096;
/// Most queues a device may have here (the driver allows 4096; one thread each).
pub const MAX_QUEUES: u16 = 64;
/// Largest request: the volume's limit, at most this (each tag has a buffer of that size).
pub const MAX_IO_BYTES: u32 = 1 << 20;
/// Largest discard or write-zeroes the kernel sends in one request.
const MAX_DISCARD_BYTES: u32 = 64 << 20;
const CTRL_FLAGS: u64 =
    (libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

/// How a device is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Hardware queues (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub queue_depth: u16,
    /// Refuse writes, discards and write-zeroes (the kernel sees a read-only disk).
    pub read_only: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queues: 1,
            queue_depth: 128,
            read_only: false,
        }
    }
}

/// Why a device could not be set up or removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No ublk driver in this kernel.
    #[error(
        "the ublk driver is not loaded: {CONTROL_DEVICE} is missing (load the kernel module with `modprobe ublk_drv`)"
    )]
    NoDriver,
    /// The driver lacks a feature every device needs.
    #[error("the ublk driver does not support user recovery with reissue (Linux 6.0 or later)")]
    NoRecovery,
    /// Queue depth out of range.
    #[error("queue depth {0} is out of range: the ublk driver takes 1 to {MAX_QUEUE_DEPTH}")]
    QueueDepth(u32),
    /// Queue count out of range.
    #[error("{0} queues: 1 to {MAX_QUEUES}")]
    Queues(u32),
    /// A control command failed.
    #[error("ublk {op} failed: {reason}")]
    Control {
        /// What was asked.
        op: &'static str,
        /// The driver's answer.
        reason: String,
    },
    /// A queue thread could not start.
    #[error("ublk queue {queue} could not start: {reason}")]
    Queue {
        /// Queue index.
        queue: u16,
        /// Why.
        reason: String,
    },
}

fn control(op: &'static str) -> impl Fn(libublk::UblkError) -> Error {
    move |e| Error::Control {
        op,
        reason: crate::describe(&e),
    }
}

/// Checks options before anything reaches the kernel.
pub fn check(opts: &Options) -> Result<(), Error> {
    if opts.queue_depth == 0 || opts.queue_depth > MAX_QUEUE_DEPTH {
        return Err(Error::QueueDepth(opts.queue_depth.into()));
    }
    if opts.queues == 0 || opts.queues > MAX_QUEUES {
        return Err(Error::Queues(opts.queues.into()));
    }
    if !Path::new(CONTROL_DEVICE).exists() {
        return Err(Error::NoDriver);
    }
    Ok(())
}

/// A volume served as `/dev/ublkbN`. Dropping it leaves the device to the kernel for a
/// later server to recover; [`UblkExport::remove`] deletes it.
pub struct UblkExport {
    // Boxed: libublk's control state is large, an export handle small.
    ctrl: Box<UblkCtrl>,
    id: u32,
    threads: Vec<JoinHandle<()>>,
    /// One per queue thread: cancelling ends its loop once what is in flight is answered.
    notifiers: Vec<Arc<Notifier>>,
}

impl std::fmt::Debug for UblkExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkExport").field("id", &self.id).finish()
    }
}

impl UblkExport {
    /// Creates a new device for `device` (the driver picks its number).
    pub fn add(device: Arc<dyn BlockDevice>, opts: &Options) -> Result<Self, Error> {
        check(opts)?;
        let features = UblkCtrl::get_features().unwrap_or(0);
        if features & CTRL_FLAGS != CTRL_FLAGS {
            return Err(Error::NoRecovery);
        }
        let info = device.info();
        let io_buf = info.max_io_size.clamp(4096, MAX_IO_BYTES) & !4095;
        let ctrl = UblkCtrlBuilder::default()
            .name("curve")
            .id(-1)
            .nr_queues(opts.queues)
            .depth(opts.queue_depth)
            .io_buf_bytes(io_buf)
            .ctrl_flags(CTRL_FLAGS)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV | UblkFlags::UBLK_DEV_F_SINGLE_CPU_AFFINITY)
            .build()
            .map_err(control("ADD_DEV"))?;
        Self::start(ctrl, device, opts)
    }

    /// Takes over device `id`, left by a server that died: waits until the kernel has
    /// quiesced it, then serves it again; requests in flight at the crash are reissued.
    pub fn recover(id: u32, device: Arc<dyn BlockDevice>, opts: &Options) -> Result<Self, Error> {
        check(opts)?;
        let ctrl = UblkCtrlBuilder::default()
            .name("curve")
            .id(id as i32)
            .nr_queues(opts.queues)
            .depth(opts.queue_depth)
            .ctrl_flags(CTRL_FLAGS)
            .dev_flags(
                UblkFlags::UBLK_DEV_F_RECOVER_DEV | UblkFlags::UBLK_DEV_F_SINGLE_CPU_AFFINITY,
            )
            .build()
            .map_err(control("GET_DEV_INFO"))?;
        let di = ctrl.dev_info();
        if di.flags & CTRL_FLAGS != CTRL_FLAGS {
            return Err(Error::Control {
                op: "START_USER_RECOVERY",
                reason: format!("device {id} was not created with user recovery"),
            });
        }
        ctrl.start_user_recover()
            .map_err(control("START_USER_RECOVERY"))?;
        Self::start(ctrl, device, opts)
    }

    /// Whether device `id` exists.
    pub fn exists(id: u32) -> bool {
        Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
    }

    fn start(ctrl: UblkCtrl, device: Arc<dyn BlockDevice>, opts: &Options) -> Result<Self, Error> {
        let info = device.info().clone();
        let read_only = opts.read_only || info.read_only;
        let id = ctrl.dev_info().dev_id;
        let dev = UblkDev::new(ctrl.get_name(), |d| set_params(d, &info, read_only), &ctrl);
        let dev = match dev {
            Ok(d) => Arc::new(d),
            Err(e) => {
                let _ = ctrl.del_dev();
                return Err(control("SET_PARAMS")(e));
            }
        };
        let limits = Limits {
            size: info.size,
            max_io: dev.dev_info.max_io_buf_bytes,
            read_only,
        };
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::new();
        for q in 0..dev.dev_info.nr_hw_queues {
            let (dev, device, thread_tx) = (dev.clone(), device.clone(), tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("ublk{id}-q{q}"))
                .spawn(move || queue_thread(q, &dev, &*device, limits, thread_tx));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let _ = tx.send((q, Err(e.to_string())));
                }
            }
        }
        drop(tx);
        let mut failed = None;
        let mut notifiers = Vec::new();
        for _ in 0..dev.dev_info.nr_hw_queues {
            match rx.recv() {
                Ok((q, Ok((tid, notifier)))) => {
                    notifiers.push(notifier);
                    ctrl.set_thread_affinity(q, tid);
                    if let Err(e) = ctrl.configure_queue(&dev, q, tid) {
                        failed.get_or_insert(Error::Queue {
                            queue: q,
                            reason: crate::describe(&e),
                        });
                    }
                }
                Ok((queue, Err(reason))) => {
                    failed.get_or_insert(Error::Queue { queue, reason });
                }
                Err(_) => {
                    failed.get_or_insert(Error::Queue {
                        queue: 0,
                        reason: "queue thread ended".into(),
                    });
                }
            }
        }
        let started = match failed {
            Some(e) => Err(e),
            None => ctrl
                .start_dev(&dev)
                .map(|_| ())
                .map_err(control("START_DEV")),
        };
        let export = UblkExport {
            ctrl: Box::new(ctrl),
            id,
            threads,
            notifiers,
        };
        if let Err(e) = started {
            for n in &export.notifiers {
                n.cancel();
            }
            let _ = export.remove();
            return Err(e);
        }
        tracing::info!(
            id,
            queues = opts.queues,
            depth = opts.queue_depth,
            read_only,
            "ublk device serving"
        );
        Ok(export)
    }

    /// The device number N of `/dev/ublkbN`.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// `/dev/ublkbN`.
    pub fn path(&self) -> PathBuf {
        block_path(self.id)
    }

    /// Stops the device (the kernel finishes what is in flight; later I/O fails), ends the
    /// queue threads and deletes it.
    pub fn remove(mut self) -> Result<(), Error> {
        let stopped = self
            .ctrl
            .kill_dev()
            .map(|_| ())
            .map_err(control("STOP_DEV"));
        // STOP_DEV returns once the kernel has drained the device and aborted the queues;
        // the cancellation only matters to a queue that never got its abort.
        for n in &self.notifiers {
            n.cancel();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let deleted = self.ctrl.del_dev().map(|_| ()).map_err(control("DEL_DEV"));
        self.ctrl.disown();
        stopped.and(deleted)
    }
}

impl Drop for UblkExport {
    fn drop(&mut self) {
        // Leave the device for the next server (libublk would delete one it added).
        self.ctrl.disown();
    }
}

/// `/dev/ublkbN` of device `id`.
pub fn block_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// The device's parameters, from the volume: capacity, logical block size, largest request,
/// discard and write-zeroes, a write-back cache (flushes and FUA reach the volume), read-only.
fn set_params(
    d: &mut UblkDev,
    info: &curve_blockdev::DeviceInfo,
    read_only: bool,
) -> Result<(), libublk::UblkError> {
    use libublk::sys;
    d.set_default_params(info.size);
    let shift = |v: u32| v.max(512).next_power_of_two().trailing_zeros() as u8;
    let lbs = shift(info.block_size);
    let p = &mut d.tgt.params;
    p.basic.logical_bs_shift = lbs;
    p.basic.physical_bs_shift = lbs.max(12);
    p.basic.io_min_shift = lbs;
    p.basic.io_opt_shift = shift(info.optimal_io_size).max(lbs);
    p.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    if read_only {
        p.basic.attrs |= sys::UBLK_ATTR_READ_ONLY;
    } else {
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard.discard_granularity = 1 << lbs.max(12);
        p.discard.max_discard_sectors = MAX_DISCARD_BYTES >> 9;
        p.discard.max_write_zeroes_sectors = MAX_DISCARD_BYTES >> 9;
        p.discard.max_discard_segments = 1;
    }
    Ok(())
}

type Started = (u16, Result<(i32, Arc<Notifier>), String>);

/// One queue: its io_uring, tag buffers and requests, on the frontends' queue loop.
fn queue_thread(
    q: u16,
    dev: &UblkDev,
    device: &dyn BlockDevice,
    limits: Limits,
    tx: mpsc::Sender<Started>,
) {
    let tid = UblkCtrl::init_queue_thread();
    let bufs = dev.alloc_queue_io_bufs();
    let queue = UblkQueue::new(q, dev)
        .and_then(|queue| queue.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))));
    let queue = match queue {
        Ok(queue) => queue,
        Err(e) => {
            let _ = tx.send((q, Err(crate::describe(&e))));
            return;
        }
    };
    let notifier = match Notifier::new() {
        Ok(n) => n,
        Err(e) => {
            let _ = tx.send((q, Err(e.to_string())));
            return;
        }
    };
    let _ = tx.send((q, Ok((tid, notifier.clone()))));
    let mut source = UblkSource::new(&queue, device, &bufs, limits, notifier.clone());
    match curve_blockdev::queue::serve(&mut source, &notifier, usize::MAX) {
        Ok(()) => tracing::info!(queue = q, "ublk queue stopped"),
        Err(e) => tracing::error!(queue = q, error = %e, "ublk queue failed"),
    }
}
