//! Validation of transmission requests: a request header in, a typed [`Command`] or the
//! NBD error the spec prescribes out. Pure; the connection executes what comes out.

use crate::proto::{RequestHeader, cflag, cmd, errno};

/// What a connection may accept, fixed at the end of negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Offsets and lengths must be multiples of this.
    pub min_block: u32,
    /// Largest read or write payload.
    pub max_block: u32,
    /// Writes, trims and write-zeroes are refused with EPERM.
    pub read_only: bool,
    /// `base:allocation` was negotiated, so NBD_CMD_BLOCK_STATUS is allowed.
    pub block_status: bool,
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// NBD_CMD_READ.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// NBD_CMD_WRITE; `len` payload bytes follow the header.
    Write {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Force unit access.
        fua: bool,
        /// NBD_CMD_FLAG_NO_HOLE: zeroes must be written, not punched.
        no_hole: bool,
        /// NBD_CMD_FLAG_FAST_ZERO: fail fast rather than write slowly.
        fast: bool,
    },
    /// NBD_CMD_BLOCK_STATUS on `base:allocation`.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// NBD_CMD_FLAG_REQ_ONE: answer with a single extent.
        req_one: bool,
    },
    /// NBD_CMD_CACHE (a hint; nothing to do for our backends).
    Cache,
    /// NBD_CMD_DISC.
    Disconnect,
}

/// Why a request is refused: the NBD error and a message for structured replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// NBD error value.
    pub error: u32,
    /// Human-readable reason.
    pub message: &'static str,
}

fn refuse(error: u32, message: &'static str) -> Refusal {
    Refusal { error, message }
}

/// Validates a request header against the connection's limits.
pub fn validate(h: &RequestHeader, l: &Limits) -> Result<Command, Refusal> {
    // NBD_CMD_DISC is never answered, whatever its flags.
    if h.kind == cmd::DISC {
        return Ok(Command::Disconnect);
    }
    let allowed = match h.kind {
        cmd::READ => cflag::FUA | cflag::DF,
        cmd::WRITE | cmd::TRIM => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cflag::REQ_ONE | cflag::FUA,
        cmd::FLUSH | cmd::DISC | cmd::CACHE => cflag::FUA,
        _ => return Err(refuse(errno::EINVAL, "unknown command")),
    };
    if h.flags & !allowed != 0 {
        return Err(refuse(errno::EINVAL, "flag not valid for this command"));
    }
    let fua = h.flags & cflag::FUA != 0;
    if h.kind == cmd::FLUSH {
        return Ok(Command::Flush);
    }
    let modifies = matches!(h.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if modifies && l.read_only {
        return Err(refuse(errno::EPERM, "the export is read-only"));
    }
    if h.kind == cmd::BLOCK_STATUS && !l.block_status {
        return Err(refuse(errno::EINVAL, "base:allocation was not negotiated"));
    }
    if h.len == 0 {
        return Err(refuse(errno::EINVAL, "zero-length request"));
    }
    if matches!(h.kind, cmd::READ | cmd::WRITE) && h.len > l.max_block {
        return Err(refuse(
            errno::EINVAL,
            "request larger than the maximum block size",
        ));
    }
    let end = h.offset.checked_add(u64::from(h.len));
    if end.is_none_or(|end| end > l.size) {
        let error = if matches!(h.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        return Err(refuse(error, "request past the end of the export"));
    }
    let align = u64::from(l.min_block.max(1));
    if !h.offset.is_multiple_of(align) || u64::from(h.len) % align != 0 {
        return Err(refuse(
            errno::EINVAL,
            "request not aligned to the minimum block size",
        ));
    }
    let (offset, len) = (h.offset, h.len);
    Ok(match h.kind {
        cmd::READ => Command::Read { offset, len },
        cmd::WRITE => Command::Write { offset, len, fua },
        cmd::TRIM => Command::Trim { offset, len, fua },
        cmd::WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: h.flags & cflag::NO_HOLE != 0,
            fast: h.flags & cflag::FAST_ZERO != 0,
        },
        cmd::BLOCK_STATUS => Command::BlockStatus {
            offset,
            len,
            req_one: h.flags & cflag::REQ_ONE != 0,
        },
        _ => Command::Cache,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        size: 1 << 20,
        min_block: 1,
        max_block: 1 << 16,
        read_only: false,
        block_status: true,
    };

    fn h(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 1,
            offset,
            len,
        }
    }

    #[test]
    fn accepts_valid() {
        assert_eq!(
            validate(&h(cmd::READ, 0, 0, 4096), &L),
            Ok(Command::Read {
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(
            validate(
                &h(
                    cmd::WRITE_ZEROES,
                    cflag::NO_HOLE | cflag::FAST_ZERO,
                    0,
                    1 << 20
                ),
                &L
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: false,
                no_hole: true,
                fast: true
            })
        );
        assert_eq!(validate(&h(cmd::FLUSH, 0, 0, 0), &L), Ok(Command::Flush));
        assert_eq!(
            validate(&h(cmd::DISC, 0xffff, 0, 0), &L),
            Ok(Command::Disconnect)
        );
    }

    #[test]
    fn refuses_invalid() {
        let e = |r: Result<Command, Refusal>| r.unwrap_err().error;
        assert_eq!(
            e(validate(&h(cmd::READ, 0, (1 << 20) - 1, 2), &L)),
            errno::EINVAL
        );
        assert_eq!(
            e(validate(&h(cmd::WRITE, 0, 1 << 20, 1), &L)),
            errno::ENOSPC
        );
        assert_eq!(
            e(validate(&h(cmd::WRITE, 0, u64::MAX, 1), &L)),
            errno::ENOSPC
        );
        assert_eq!(e(validate(&h(cmd::READ, 0, 0, 1 << 17), &L)), errno::EINVAL);
        assert_eq!(e(validate(&h(cmd::READ, 0, 0, 0), &L)), errno::EINVAL);
        assert_eq!(e(validate(&h(99, 0, 0, 1), &L)), errno::EINVAL);
        assert_eq!(
            e(validate(&h(cmd::READ, cflag::NO_HOLE, 0, 1), &L)),
            errno::EINVAL
        );
        let ro = Limits {
            read_only: true,
            block_status: false,
            min_block: 512,
            ..L
        };
        assert_eq!(e(validate(&h(cmd::TRIM, 0, 0, 512), &ro)), errno::EPERM);
        assert_eq!(
            e(validate(&h(cmd::BLOCK_STATUS, 0, 0, 512), &ro)),
            errno::EINVAL
        );
        assert_eq!(e(validate(&h(cmd::READ, 0, 1, 512), &ro)), errno::EINVAL);
    }
}
