//! A cluster volume as a block device (`curve_blockdev::BlockDevice`), so that every frontend
//! of part2 serves `curve:/path` volumes. The client's work runs on its own small tokio
//! runtime; the frontends' executors only await a completion (a oneshot), whatever executor
//! they are.

use std::sync::{Arc, OnceLock};

use curve_blockdev::{BlockDevice, DeviceInfo, Extent, IoError, IoFuture, WriteFlags, ZeroFlags};
use tokio::sync::oneshot;

use crate::chunk::Connections;
use crate::volume::{ClientError, SessionState, Volume, VolumeOptions};

/// The client runtime (2 threads) shared by every volume of the process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("curve-client")
            .enable_all()
            .build()
            .expect("the client runtime starts")
    })
}

fn connections() -> Arc<Connections> {
    static C: OnceLock<Arc<Connections>> = OnceLock::new();
    C.get_or_init(Arc::default).clone()
}

fn io_error(e: ClientError) -> IoError {
    match e {
        ClientError::OutOfRange { offset, len, size } => IoError::OutOfRange { offset, len, size },
        e => IoError::Backend(e.to_string()),
    }
}

/// An open cluster volume.
#[derive(Debug)]
pub struct CurveDevice {
    volume: Volume,
    info: DeviceInfo,
}

impl CurveDevice {
    /// Opens `path` (blocking: waits for the MDS).
    pub fn open(path: &str, opts: VolumeOptions, read_only: bool) -> Result<Self, ClientError> {
        Self::open_with(path, opts, read_only, None)
    }

    /// Opens `path` with the session another process handed over (see [`Volume::adopt`]),
    /// or a new one when `session` is None.
    pub fn open_with(
        path: &str,
        opts: VolumeOptions,
        read_only: bool,
        session: Option<SessionState>,
    ) -> Result<Self, ClientError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_string();
        runtime().spawn(async move {
            let v = match session {
                Some(s) => Volume::adopt(&path, opts, connections(), s).await,
                None => Volume::open(&path, opts, connections()).await,
            };
            let _ = tx.send(v);
        });
        let volume = rx.recv().map_err(|_| ClientError::Closed)??;
        let i = volume.info();
        let block = i.block_size.max(512);
        let info = DeviceInfo {
            size: i.length,
            block_size: block,
            alignment: block,
            optimal_io_size: 64 << 10,
            max_io_size: 32 << 20,
            // A snapshot (PATH@NAME) is read-only whatever was asked.
            read_only: read_only || volume.is_read_only(),
            // Discard and zeroes punch holes on the replicas (a clone's zeroes are written).
            can_discard: true,
            fast_zero: !volume.is_clone(),
            volatile_cache: false,
        };
        Ok(CurveDevice { volume, info })
    }

    /// The volume.
    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// Runs `f` on the client runtime and awaits its result from any executor.
    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = Result<T, ClientError>> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, IoError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        runtime().spawn(async move {
            let _ = tx.send(f.await);
        });
        async move {
            rx.await
                .map_err(|_| IoError::Backend("the client runtime stopped".into()))?
                .map_err(io_error)
        }
    }
}

/// Sessions of dropped devices whose close is still on its way to the MDS.
static CLOSING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Waits (up to `timeout`) until the sessions of every device dropped so far are closed at
/// the MDS: a process about to exit calls it, so its volumes are free at once rather than
/// after their leases. Whether they all were.
pub async fn closes_done(timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while CLOSING.load(std::sync::atomic::Ordering::Acquire) > 0 {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    true
}

impl Drop for CurveDevice {
    fn drop(&mut self) {
        let v = self.volume.clone();
        CLOSING.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        runtime().spawn(async move {
            if let Err(e) = v.close().await {
                tracing::warn!(error = %e, "closing the volume");
            }
            CLOSING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
    }
}

impl BlockDevice for CurveDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a> {
        let v = self.volume.clone();
        let len = buf.len();
        let done = self.run(async move {
            let mut data = vec![0u8; len];
            v.read(offset, &mut data).await.map(|_| data)
        });
        Box::pin(async move {
            buf.copy_from_slice(&done.await?);
            Ok(())
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], _flags: WriteFlags) -> IoFuture<'a> {
        if self.info.read_only {
            return Box::pin(std::future::ready(Err(IoError::ReadOnly)));
        }
        let v = self.volume.clone();
        // One copy, shared by the parts and every retry of them.
        let data = bytes::Bytes::copy_from_slice(buf);
        // Acknowledged writes are on a raft quorum: FUA needs nothing more.
        Box::pin(self.run(async move { v.write_bytes(offset, data).await }))
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        if self.info.read_only {
            return Box::pin(std::future::ready(Err(IoError::ReadOnly)));
        }
        let v = self.volume.clone();
        Box::pin(self.run(async move { v.discard(offset, len).await }))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        if self.info.read_only {
            return Box::pin(std::future::ready(Err(IoError::ReadOnly)));
        }
        if flags.fast_only && !self.info.fast_zero {
            return Box::pin(std::future::ready(Err(IoError::NotSupported(
                "fast zeroing",
            ))));
        }
        let v = self.volume.clone();
        Box::pin(self.run(async move {
            if flags.may_unmap {
                v.write_zeroes(offset, len).await
            } else {
                v.write_zeroes_allocated(offset, len).await
            }
        }))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        let v = self.volume.clone();
        Box::pin(self.run(async move {
            Ok(v.extents(offset, len)
                .await?
                .into_iter()
                .map(|(len, hole)| Extent {
                    len,
                    hole,
                    zero: hole,
                })
                .collect())
        }))
    }
}
