//! `file:<path>`: a local regular file or block device.
//!
//! I/O is positional (`pread`/`pwrite`) and runs inline in the caller's executor: with the
//! page cache (the default) it completes in microseconds. With O_DIRECT every offset, length
//! and buffer must be aligned to the logical block size, which [`DeviceInfo::alignment`]
//! advertises so that frontends refuse unaligned requests up front. Discard and
//! write-zeroes use `fallocate` (punch hole / zero range), falling back to writing zero
//! buffers where the file system cannot.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::{
    AlignedBuf, BlockDevice, DeviceInfo, Extent, IoError, IoFuture, IoResult, WriteFlags,
    ZeroFlags, check_range,
};

/// How to open a [`FileDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Bypass the page cache (O_DIRECT).
    pub direct: bool,
    /// Open read-only.
    pub read_only: bool,
}

/// A block device over a local file or block device.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    info: DeviceInfo,
    is_block_device: bool,
}

const BLKSSZGET: libc::c_ulong = 0x1268;

impl FileDevice {
    /// Opens `path`, which must exist and have a non-zero size.
    pub fn open(path: &Path, opts: FileOptions) -> IoResult<Self> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let mut file = oo.open(path)?;
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let size = file.seek(SeekFrom::End(0))?;
        if size == 0 {
            return Err(IoError::Backend(format!("{} is empty", path.display())));
        }
        let mut block_size = 512u32;
        if is_block_device {
            let mut ssz: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int through the valid pointer we pass.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut ssz) } == 0 && ssz > 0 {
                block_size = ssz as u32;
            }
        } else if opts.direct {
            block_size = 4096;
        }
        let alignment = if opts.direct { block_size } else { 1 };
        Ok(FileDevice {
            file,
            path: path.to_owned(),
            info: DeviceInfo {
                size,
                block_size,
                alignment,
                optimal_io_size: 4096.max(block_size),
                max_io_size: 32 << 20,
                read_only: opts.read_only,
                can_discard: true,
                fast_zero: !is_block_device,
                volatile_cache: true,
            },
            is_block_device,
        })
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn writable(&self, offset: u64, len: u64) -> IoResult<()> {
        if self.info.read_only {
            return Err(IoError::ReadOnly);
        }
        check_range(&self.info, offset, len)
    }

    fn do_write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> IoResult<()> {
        self.writable(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)?;
        if flags.fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: a plain syscall on our own open descriptor.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> IoResult<()> {
        let end = offset + len;
        let zeroes = AlignedBuf::new(len.min(1 << 20) as usize);
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn do_zero(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoResult<()> {
        self.writable(offset, len)?;
        if flags.fast_only && !self.info.fast_zero {
            // A block device may zero by writing; the caller asked not to wait for that.
            return Err(IoError::NotSupported("fast zeroing"));
        }
        let mode = if flags.may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => {
                if flags.fast_only {
                    return Err(IoError::NotSupported("fast zeroing"));
                }
                self.write_zero_buffers(offset, len)?;
            }
            Err(e) => return Err(e.into()),
        }
        if flags.fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn do_discard(&self, offset: u64, len: u64) -> IoResult<()> {
        self.writable(offset, len)?;
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            // Discard is advisory: a file system that cannot punch holes still succeeds,
            // but the range must read back as zeroes.
            Err(e) if is_unsupported(&e) => self.write_zero_buffers(offset, len),
            Err(e) => Err(e.into()),
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        // SAFETY: lseek on our own descriptor; only the result is used.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        (r >= 0).then_some(r as u64)
    }

    fn do_block_status(&self, offset: u64, len: u64) -> IoResult<Vec<Extent>> {
        check_range(&self.info, offset, len)?;
        let end = offset + len;
        let data = |len| Extent {
            len,
            hole: false,
            zero: false,
        };
        if self.is_block_device {
            return Ok(vec![data(len)]);
        }
        let mut extents = Vec::new();
        let mut pos = offset;
        while pos < end && extents.len() < 1024 {
            // Where does data start at or after pos? None (ENXIO): all hole to EOF.
            let data_at = self.seek(pos, libc::SEEK_DATA).unwrap_or(self.info.size);
            if data_at > pos {
                let hole_end = data_at.min(end);
                extents.push(Extent {
                    len: hole_end - pos,
                    hole: true,
                    zero: true,
                });
                pos = hole_end;
                continue;
            }
            let hole_at = self.seek(pos, libc::SEEK_HOLE).unwrap_or(self.info.size);
            let data_end = hole_at.min(end).max(pos + 1);
            extents.push(data(data_end - pos));
            pos = data_end;
        }
        Ok(extents)
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl BlockDevice for FileDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a> {
        let r = check_range(&self.info, offset, buf.len() as u64)
            .and_then(|()| Ok(self.file.read_exact_at(buf, offset)?));
        Box::pin(std::future::ready(r))
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(std::future::ready(self.do_write(offset, buf, flags)))
    }

    fn flush(&self) -> IoFuture<'_> {
        let r = if self.info.read_only {
            Ok(())
        } else {
            self.file.sync_data().map_err(IoError::from)
        };
        Box::pin(std::future::ready(r))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(std::future::ready(self.do_discard(offset, len)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        Box::pin(std::future::ready(self.do_zero(offset, len, flags)))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(std::future::ready(self.do_block_status(offset, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    fn temp_file(size: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        f
    }

    #[test]
    fn roundtrip_and_holes() {
        let f = temp_file(1 << 20);
        let dev = FileDevice::open(f.path(), FileOptions::default()).unwrap();
        assert_eq!(dev.info().size, 1 << 20);
        let st = block_on(dev.block_status(0, 1 << 20)).unwrap();
        assert!(st[0].hole && st[0].zero);
        let data = vec![0xabu8; 8192];
        block_on(dev.write(65536, &data, WriteFlags { fua: true })).unwrap();
        let mut back = vec![0u8; 8192];
        block_on(dev.read(65536, &mut back)).unwrap();
        assert_eq!(back, data);
        let st = block_on(dev.block_status(0, 1 << 20)).unwrap();
        assert_eq!(st.iter().map(|e| e.len).sum::<u64>(), 1 << 20);
        assert!(st.iter().any(|e| !e.hole));
        block_on(dev.discard(65536, 4096)).unwrap();
        block_on(dev.write_zeroes(65536 + 4096, 4096, ZeroFlags::default())).unwrap();
        block_on(dev.read(65536, &mut back)).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        block_on(dev.flush()).unwrap();
    }

    #[test]
    fn read_only_and_range() {
        let f = temp_file(4096);
        let dev = FileDevice::open(
            f.path(),
            FileOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let err = block_on(dev.write(0, &[1], WriteFlags::default())).unwrap_err();
        assert_eq!(err.errno(), libc::EPERM);
        let mut b = [0u8; 2];
        assert_eq!(
            block_on(dev.read(4095, &mut b)).unwrap_err().errno(),
            libc::EINVAL
        );
        assert!(FileDevice::open(Path::new("/nonexistent/x"), FileOptions::default()).is_err());
    }

    #[test]
    fn direct_io_is_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let Ok(dev) = FileDevice::open(
            &path,
            FileOptions {
                direct: true,
                ..Default::default()
            },
        ) else {
            // tmpfs has no O_DIRECT; nothing to check there.
            return;
        };
        assert_eq!(dev.info().alignment, 4096);
        let mut buf = AlignedBuf::new(4096);
        buf.fill(9);
        block_on(dev.write(4096, &buf, WriteFlags::default())).unwrap();
        let mut back = AlignedBuf::new(4096);
        block_on(dev.read(4096, &mut back)).unwrap();
        assert_eq!(&back[..], &buf[..]);
    }
}
