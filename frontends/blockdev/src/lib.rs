//! The block-device seam: the one small interface between frontends and backends.
//!
//! ```text
//!   NBD connection   vhost-user-blk queue   ublk queue      <- frontends: one executor per
//!         \                  |                  /              connection / queue, each owning
//!          \                 |                 /               its buffers and in-flight set
//!           v                v                v
//!                 Arc<dyn BlockDevice>                      <- this crate: async methods,
//!           /                |                 \               Send + Sync, no global locks
//!          v                 v                  v
//!   cluster volume      MemDevice (mem:)    FileDevice (file:)  <- backends
//! ```
//!
//! A frontend holds an `Arc<dyn BlockDevice>` and runs one single-threaded executor per
//! connection or per queue. For every guest/client request it calls one of the async
//! methods below and keeps many of the returned futures in flight at once; they may complete
//! in any order. Backends that complete synchronously (RAM, page-cache file I/O) return futures
//! that are ready on their first poll, so a frontend that polls a new request once before
//! parking it completes it inline with no wakeup at all; backends that talk to the network
//! (the cluster volume) return futures that complete later.
//!
//! Methods take borrowed buffers: the frontend owns its (aligned, reused) buffers and lends
//! them for the duration of one request. Ranges are validated by the frontend against
//! [`DeviceInfo`] with [`check_range`] before they reach the backend; backends check again
//! where an out-of-range access would be unsafe.
//!
//! Errors are [`IoError`]s, which classify themselves into the errno a frontend puts on
//! the wire ([`IoError::errno`]).

mod buf;
mod delay;
mod error;
pub mod exec;
mod file;
mod mem;
pub mod queue;

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

pub use buf::{AlignedBuf, BufPool};
pub use delay::DelayDevice;
pub use error::{IoError, IoResult};
pub use file::{FileDevice, FileOptions};
pub use mem::MemDevice;

/// The future every I/O method returns.
pub type IoFuture<'a, T = ()> = Pin<Box<dyn Future<Output = IoResult<T>> + Send + 'a>>;

/// What a device is: fixed at open time, cheap to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes.
    pub size: u64,
    /// Logical block size a frontend presents to its consumer (512 or 4096).
    pub block_size: u32,
    /// Granularity that offsets and lengths must be aligned to (1 = byte addressable).
    pub alignment: u32,
    /// Preferred I/O size (a multiple of `alignment`).
    pub optimal_io_size: u32,
    /// Largest single request the device accepts.
    pub max_io_size: u32,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Discard releases space (otherwise it is a no-op that still succeeds).
    pub can_discard: bool,
    /// Write-zeroes is efficient (does not move zero buffers).
    pub fast_zero: bool,
    /// Acknowledged writes may sit in a volatile cache until [`BlockDevice::flush`].
    pub volatile_cache: bool,
}

/// Flags of a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is durable when the write completes.
    pub fua: bool,
}

/// Flags of a write-zeroes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (punched) rather than written.
    pub may_unmap: bool,
    /// Fail with [`IoError::NotSupported`] rather than fall back to writing zero buffers.
    pub fast_only: bool,
    /// Force unit access.
    pub fua: bool,
}

/// Allocation state of a range, as reported by [`BlockDevice::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never 0).
    pub len: u64,
    /// No storage is allocated for the range.
    pub hole: bool,
    /// The range reads as zeroes.
    pub zero: bool,
}

/// A block device: what every frontend consumes and every backend implements.
pub trait BlockDevice: Send + Sync + Debug {
    /// Size, block size and capabilities.
    fn info(&self) -> &DeviceInfo;

    /// Reads `buf.len()` bytes at `offset`.
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a>;

    /// Writes `buf` at `offset`.
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a>;

    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<'_>;

    /// Tells the device the range is no longer needed; it reads back as zeroes afterwards.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_>;

    /// Makes the range read back as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_>;

    /// Describes allocation from `offset` on: at least one extent, none past `offset + len`.
    /// The default reports the whole range as allocated data.
    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(std::future::ready(Ok(vec![Extent {
            len,
            hole: false,
            zero: false,
        }])))
    }
}

/// Checks that `[offset, offset + len)` lies inside the device and respects its alignment
/// and maximum request size. Frontends call it before submitting a request.
pub fn check_range(info: &DeviceInfo, offset: u64, len: u64) -> IoResult<()> {
    let end = offset.checked_add(len).ok_or(IoError::OutOfRange {
        offset,
        len,
        size: info.size,
    })?;
    if end > info.size {
        return Err(IoError::OutOfRange {
            offset,
            len,
            size: info.size,
        });
    }
    let align = u64::from(info.alignment.max(1));
    if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
        return Err(IoError::Unaligned {
            offset,
            len,
            alignment: info.alignment,
        });
    }
    Ok(())
}

/// Parses a size such as `1G`, `512M`, `64KiB`, `4096` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "invalid size {text:?}: expected a number such as 1G or 4096"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|e| format!("invalid size {text:?}: {e}"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("invalid size {text:?}: unknown unit {other:?}")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(size: u64, alignment: u32) -> DeviceInfo {
        DeviceInfo {
            size,
            block_size: 512,
            alignment,
            optimal_io_size: 4096,
            max_io_size: 1 << 20,
            read_only: false,
            can_discard: true,
            fast_zero: true,
            volatile_cache: false,
        }
    }

    #[test]
    fn range_checks() {
        let i = info(8192, 1);
        assert!(check_range(&i, 0, 8192).is_ok());
        assert!(check_range(&i, 8191, 1).is_ok());
        assert!(matches!(
            check_range(&i, 8192, 1),
            Err(IoError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(&i, u64::MAX, 2),
            Err(IoError::OutOfRange { .. })
        ));
        let i = info(8192, 512);
        assert!(matches!(
            check_range(&i, 1, 512),
            Err(IoError::Unaligned { .. })
        ));
        assert!(check_range(&i, 512, 1024).is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
