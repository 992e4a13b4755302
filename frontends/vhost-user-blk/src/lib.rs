//! The vhost-user-blk frontend: QEMU guests (and any vhost-user front-end, such as
//! `curve bench --driver vhost-user`) attach a block device of part2 as a virtio-blk disk.
//!
//! ```text
//!  protocol  vhost-user messages: pure payload parsers, message I/O with descriptors
//!  memory    guest memory regions mapped from SET_MEM_TABLE, bounds-checked translation
//!  virtq     split virtqueue from the device side: pop heads, chains, used ring, event idx
//!  request   descriptor chain -> typed virtio-blk request (pure; malformed -> IOERR/UNSUPP)
//!  backend   Server (socket, one front-end at a time), control loop, a worker per queue
//!  inflight  the shared inflight buffer: requests taken and not yet used, replayed in order
//!            by a restarted back-end
//!  fuzzing   bodies of the fuzz targets (fuzz/: vhost_chains, vhost_messages)
//! ```

pub mod backend;
pub mod fuzzing;
pub mod inflight;
pub mod memory;
pub mod protocol;
pub mod request;
pub mod virtq;

pub use backend::{Options, Server};
