//! The ublk frontend: a volume served as `/dev/ublkbN` through the kernel's `ublk_drv`, on
//! [`libublk`], with user recovery so that a restarted part2 takes the same device over.
//!
//! ```text
//!   application -> /dev/ublkbN -> blk-mq -> ublk_drv ==(io_uring uring_cmd, per queue)==>
//!     queue thread (queue.rs: a QueueSource on the frontends' one queue loop)
//!       -> request.rs (descriptor -> typed request) -> BlockDevice -> COMMIT_AND_FETCH
//!   control (ctrl.rs): ADD_DEV / SET_PARAMS / START_DEV, START/END_USER_RECOVERY, STOP/DEL_DEV
//! ```
//!
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`: when the
//! serving process dies the kernel quiesces the device (I/O waits, nothing fails) and a new
//! process recovers it ([`UblkExport::recover`]); the requests the dead one held are reissued.
//! Linux 6.15 adds `UBLK_U_CMD_QUIESCE_DEV`, which lets a live server hand a device over
//! without dying first; on 6.12 a planned restart goes through the same recovery.

mod ctrl;
pub mod fuzzing;
mod queue;
pub mod request;

pub use ctrl::{
    CONTROL_DEVICE, Error, MAX_IO_BYTES, MAX_QUEUE_DEPTH, MAX_QUEUES, Options, UblkExport,
    block_path, check,
};

/// A libublk error in words (its own Display hides the errno).
pub(crate) fn describe(e: &libublk::UblkError) -> String {
    match e {
        libublk::UblkError::OtherError(r) | libublk::UblkError::UringIOError(r) => {
            std::io::Error::from_raw_os_error(r.abs()).to_string()
        }
        libublk::UblkError::IOError(e) => e.to_string(),
        other => other.to_string(),
    }
}
