//! Errors of the seam, with the errno a frontend reports for each.

/// Result of a block-device operation.
pub type IoResult<T> = Result<T, IoError>;

/// Why a block-device operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The range ends past the end of the device.
    #[error("range {offset}+{len} is outside the device of {size} bytes")]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the device.
        size: u64,
    },
    /// Offset or length is not a multiple of the device's alignment.
    #[error("range {offset}+{len} is not aligned to {alignment} bytes")]
    Unaligned {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Required alignment.
        alignment: u32,
    },
    /// A modification of a read-only device.
    #[error("the device is read-only")]
    ReadOnly,
    /// The device cannot do this (or cannot do it fast, when fast was required).
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    /// The backend has no space left.
    #[error("no space left on the backend")]
    NoSpace,
    /// An error from the operating system.
    #[error("I/O error")]
    Os(#[from] std::io::Error),
    /// A backend-specific failure, already described.
    #[error("{0}")]
    Backend(String),
}

impl IoError {
    /// The errno to report to the consumer.
    pub fn errno(&self) -> i32 {
        match self {
            IoError::OutOfRange { .. } | IoError::Unaligned { .. } => libc::EINVAL,
            IoError::ReadOnly => libc::EPERM,
            IoError::NotSupported(_) => libc::ENOTSUP,
            IoError::NoSpace => libc::ENOSPC,
            IoError::Os(e) => e.raw_os_error().unwrap_or(libc::EIO),
            IoError::Backend(_) => libc::EIO,
        }
    }
}
