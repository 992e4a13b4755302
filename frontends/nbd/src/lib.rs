//! The NBD frontend: serves block devices to NBD clients (kernel `nbd-client`, qemu,
//! `nbdinfo`/`nbdcopy`, fio's `nbd` engine) over Unix sockets and TCP.
//!
//! ```text
//!  proto      wire format: constants, pure parsers and encoders      (fuzzed)
//!  negotiate  fixed-newstyle option negotiation, a pure state machine (fuzzed)
//!  request    request validation: header -> Command | NBD error     (pure)
//!  conn       transmission loop of one connection (one thread, no locks)
//!  server     listeners, export tables, connection threads
//!  netlink    generic netlink messages of the kernel's NBD driver      (fuzzed)
//!  kernel     /dev/nbdN attached by us: NBD_CMD_CONNECT / RECONFIGURE / DISCONNECT
//! ```
//!
//! Implemented: fixed newstyle with NO_ZEROES; NBD_OPT_EXPORT_NAME, ABORT, LIST, INFO, GO
//! (NBD_INFO_EXPORT, NAME, DESCRIPTION, BLOCK_SIZE), STRUCTURED_REPLY, LIST/SET_META_CONTEXT
//! (`base:allocation`); commands READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE,
//! FAST_ZERO), CACHE, BLOCK_STATUS (REQ_ONE), DISC; CAN_MULTI_CONN.

mod conn;
pub mod fuzzing;
pub mod kernel;
pub mod negotiate;
pub mod netlink;
pub mod proto;
pub mod request;
mod server;
mod stream;

pub use server::{Export, ListenAddr, MAX_BLOCK, NbdServer, ParkedConnection, Paused, ServerError};
