//! A ublk I/O descriptor (`struct ublksrv_io_desc`, written by the kernel into the queue's
//! shared command buffer) turned into a typed request, checked against the device's limits.
//! Pure: no I/O, so it is unit-tested and fuzzed apart from the queue that executes it.

/// What the kernel asked for, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into the tag's buffer.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u32,
    },
    /// Write `len` bytes at `offset` from the tag's buffer.
    Write {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u32,
        /// Durable before completion (REQ_FUA).
        fua: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Deallocate a range.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// Make a range read as zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
        /// The range may be deallocated (no REQ_NOUNMAP).
        may_unmap: bool,
        /// Durable before completion.
        fua: bool,
    },
}

/// The device as the parser checks requests against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Capacity in bytes.
    pub size: u64,
    /// Largest read or write (the tag buffer's size).
    pub max_io: u32,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
}

/// The errno a request is refused with (returned negated to the kernel).
pub type Errno = i32;

/// ublk operation codes (`UBLK_IO_OP_*`).
mod op {
    pub const READ: u32 = 0;
    pub const WRITE: u32 = 1;
    pub const FLUSH: u32 = 2;
    pub const DISCARD: u32 = 3;
    pub const WRITE_ZEROES: u32 = 5;
}
const F_FUA: u32 = 1 << 13;
const F_NOUNMAP: u32 = 1 << 15;

/// Parses one descriptor: `op_flags` (operation in the low byte, `UBLK_IO_F_*` above it),
/// the start sector and the sector count (512-byte sectors whatever the logical block size).
pub fn parse(
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    l: &Limits,
) -> Result<Request, Errno> {
    let op = op_flags & 0xff;
    let fua = op_flags & F_FUA != 0;
    if op == op::FLUSH {
        return Ok(Request::Flush);
    }
    let offset = start_sector.checked_mul(512).ok_or(libc::EINVAL)?;
    let len = u64::from(nr_sectors) * 512;
    let end = offset.checked_add(len).ok_or(libc::EINVAL)?;
    if end > l.size {
        return Err(libc::EINVAL);
    }
    let writes = matches!(op, op::WRITE | op::DISCARD | op::WRITE_ZEROES);
    if writes && l.read_only {
        return Err(libc::EROFS);
    }
    match op {
        op::READ | op::WRITE => {
            if len == 0 || len > u64::from(l.max_io) {
                return Err(libc::EINVAL);
            }
            let len = len as u32;
            Ok(if op == op::READ {
                Request::Read { offset, len }
            } else {
                Request::Write { offset, len, fua }
            })
        }
        op::DISCARD => Ok(Request::Discard { offset, len }),
        op::WRITE_ZEROES => Ok(Request::WriteZeroes {
            offset,
            len,
            may_unmap: op_flags & F_NOUNMAP == 0,
            fua,
        }),
        _ => Err(libc::EOPNOTSUPP),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        size: 1 << 20,
        max_io: 64 << 10,
        read_only: false,
    };

    #[test]
    fn operations() {
        assert_eq!(
            parse(0, 8, 8, &L),
            Ok(Request::Read {
                offset: 4096,
                len: 4096
            })
        );
        assert_eq!(
            parse(1 | F_FUA, 0, 1, &L),
            Ok(Request::Write {
                offset: 0,
                len: 512,
                fua: true
            })
        );
        assert_eq!(parse(2, u64::MAX, 0, &L), Ok(Request::Flush));
        assert_eq!(
            parse(3, 0, 2048, &L),
            Ok(Request::Discard {
                offset: 0,
                len: 1 << 20
            })
        );
        assert_eq!(
            parse(5 | F_NOUNMAP, 8, 8, &L),
            Ok(Request::WriteZeroes {
                offset: 4096,
                len: 4096,
                may_unmap: false,
                fua: false
            })
        );
    }

    #[test]
    fn refusals() {
        // Past the end, overflowing, larger than a tag buffer, empty.
        assert_eq!(parse(0, 2047, 2, &L), Err(libc::EINVAL));
        assert_eq!(parse(0, u64::MAX / 256, 8, &L), Err(libc::EINVAL));
        assert_eq!(parse(1, 0, 129, &L), Err(libc::EINVAL));
        assert_eq!(parse(0, 0, 0, &L), Err(libc::EINVAL));
        // Zone operations and WRITE_SAME are not supported.
        assert_eq!(parse(4, 0, 8, &L), Err(libc::EOPNOTSUPP));
        assert_eq!(parse(13, 0, 8, &L), Err(libc::EOPNOTSUPP));
        let ro = Limits {
            read_only: true,
            ..L
        };
        for op in [1, 3, 5] {
            assert_eq!(parse(op, 0, 8, &ro), Err(libc::EROFS), "op {op}");
        }
        assert!(parse(0, 0, 8, &ro).is_ok());
        assert_eq!(parse(2, 0, 0, &ro), Ok(Request::Flush));
    }
}
