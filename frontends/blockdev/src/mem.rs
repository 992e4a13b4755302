//! `mem:<size>`: a RAM device, preallocated at creation.
//!
//! The memory is one anonymous mapping populated up front, so the data path never faults.
//! Concurrent requests from different queues are kept sound by a reader-writer lock per
//! 1 MiB stripe (uncontended: two atomic operations); a request spanning stripes takes
//! them in ascending order.

use std::ptr::NonNull;

use parking_lot::RwLock;

use crate::{
    BlockDevice, DeviceInfo, IoError, IoFuture, IoResult, WriteFlags, ZeroFlags, check_range,
};

const STRIPE_SHIFT: u32 = 20;

/// A RAM-backed block device.
pub struct MemDevice {
    base: NonNull<u8>,
    info: DeviceInfo,
    stripes: Box<[RwLock<()>]>,
}

// SAFETY: the mapping is owned by the device; all access goes through the stripe locks.
unsafe impl Send for MemDevice {}
// SAFETY: as above: shared access is serialised per stripe by the locks.
unsafe impl Sync for MemDevice {}

impl std::fmt::Debug for MemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemDevice")
            .field("size", &self.info.size)
            .finish()
    }
}

impl MemDevice {
    /// Allocates and populates `size` bytes of zeroed RAM.
    pub fn new(size: u64) -> IoResult<Self> {
        if size == 0 {
            return Err(IoError::Backend("a mem device needs a size above 0".into()));
        }
        let len = usize::try_from(size).map_err(|_| IoError::NoSpace)?;
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(IoError::Os(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<u8>()).expect("mmap returned a null mapping");
        let nstripes = size.div_ceil(1 << STRIPE_SHIFT) as usize;
        Ok(MemDevice {
            base,
            info: DeviceInfo {
                size,
                block_size: 512,
                alignment: 1,
                optimal_io_size: 4096,
                max_io_size: 32 << 20,
                read_only: false,
                can_discard: true,
                fast_zero: true,
                volatile_cache: false,
            },
            stripes: (0..nstripes).map(|_| RwLock::new(())).collect(),
        })
    }

    fn stripes_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<usize> {
        let first = (offset >> STRIPE_SHIFT) as usize;
        let last = ((offset + len.max(1) - 1) >> STRIPE_SHIFT) as usize;
        first..=last
    }

    /// Runs `f` holding the stripes of the range, shared or exclusive. The common case of a
    /// request inside one stripe allocates nothing.
    fn locked<R>(&self, offset: u64, len: u64, exclusive: bool, f: impl FnOnce() -> R) -> R {
        let range = self.stripes_of(offset, len);
        if range.start() == range.end() {
            let lock = &self.stripes[*range.start()];
            return if exclusive {
                let _g = lock.write();
                f()
            } else {
                let _g = lock.read();
                f()
            };
        }
        let locks = &self.stripes[range];
        if exclusive {
            let _g: Vec<_> = locks.iter().map(|l| l.write()).collect();
            f()
        } else {
            let _g: Vec<_> = locks.iter().map(|l| l.read()).collect();
            f()
        }
    }

    fn copy_out(&self, offset: u64, buf: &mut [u8]) -> IoResult<()> {
        check_range(&self.info, offset, buf.len() as u64)?;
        // SAFETY: the range is inside the mapping (checked above) and no writer holds any of
        // its stripes while we hold their read locks.
        self.locked(offset, buf.len() as u64, false, || unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        });
        Ok(())
    }

    fn modify(&self, offset: u64, len: u64, f: impl FnOnce(*mut u8)) -> IoResult<()> {
        check_range(&self.info, offset, len)?;
        // SAFETY: offset is inside the mapping (checked above).
        let dst = unsafe { self.base.as_ptr().add(offset as usize) };
        self.locked(offset, len, true, || f(dst));
        Ok(())
    }

    fn copy_in(&self, offset: u64, buf: &[u8]) -> IoResult<()> {
        self.modify(offset, buf.len() as u64, |dst| {
            // SAFETY: dst..dst+len is inside the mapping and exclusively locked by `modify`.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, buf.len()) }
        })
    }

    fn zero(&self, offset: u64, len: u64) -> IoResult<()> {
        self.modify(offset, len, |dst| {
            // SAFETY: dst..dst+len is inside the mapping and exclusively locked by `modify`.
            unsafe { std::ptr::write_bytes(dst, 0, len as usize) }
        })
    }
}

impl Drop for MemDevice {
    fn drop(&mut self) {
        // SAFETY: base/size describe the mapping created in `new`, unmapped exactly once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.info.size as usize) };
    }
}

impl BlockDevice for MemDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(std::future::ready(self.copy_out(offset, buf)))
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], _flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(std::future::ready(self.copy_in(offset, buf)))
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(std::future::ready(self.zero(offset, len)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> IoFuture<'_> {
        Box::pin(std::future::ready(self.zero(offset, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    #[test]
    fn write_read_zero() {
        let dev = MemDevice::new(4 << 20).unwrap();
        let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        // Spans three stripes.
        block_on(dev.write(512 * 1024, &data, WriteFlags::default())).unwrap();
        let mut back = vec![0u8; data.len()];
        block_on(dev.read(512 * 1024, &mut back)).unwrap();
        assert_eq!(back, data);
        block_on(dev.write_zeroes(512 * 1024, 4096, ZeroFlags::default())).unwrap();
        block_on(dev.discard(512 * 1024 + 4096, 100)).unwrap();
        block_on(dev.read(512 * 1024, &mut back)).unwrap();
        assert!(back[..4196].iter().all(|&b| b == 0));
        assert_eq!(back[4196..], data[4196..]);
    }

    #[test]
    fn out_of_range() {
        let dev = MemDevice::new(8192).unwrap();
        let mut buf = [0u8; 16];
        let err = block_on(dev.read(8190, &mut buf)).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
        assert!(MemDevice::new(0).is_err());
    }
}
