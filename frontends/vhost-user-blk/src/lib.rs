//! The vhost-user-blk frontend: QEMU guests (and any vhost-user front-end, such as
//! `curve bench --driver vhost-user`) attach a block device of part2 as a virtio-blk disk.
//! Built on rust-vmm: the protocol through the `vhost` crate (our own
//! `VhostUserBackendReqHandlerMut`, inflight included), guest memory through `vm-memory`,
//! split rings through `virtio-queue`.
//!
//! ```text
//!  memory    SET_MEM_TABLE regions as a vm-memory GuestMemoryMmap + front-end address table
//!  virtq     a virtio-queue Queue per ring: pop chains, used ring, event idx; the replay walk
//!  request   descriptor chain -> typed virtio-blk request (pure; malformed -> IOERR/UNSUPP)
//!  backend   Server (socket, one front-end at a time), the request handler, a worker per queue
//!  inflight  the shared inflight buffer: requests taken and not yet used, replayed in order
//!            by a restarted back-end
//!  fuzzing   bodies of the fuzz targets (fuzz/: vhost_chains, vhost_messages, vhost_rings)
//! ```

pub mod backend;
pub mod fuzzing;
pub mod inflight;
pub mod memory;
pub mod request;
pub mod virtq;

pub use backend::{Frozen, FrozenConn, FrozenQueue, FrozenState, Options, Server};

/// What the back-end refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O or system call failed.
    #[error("vhost-user back-end: {0}")]
    Io(#[from] std::io::Error),
    /// Something the front-end asked for that cannot be done.
    #[error("bad vhost-user request: {0}")]
    Bad(String),
}
