//! The drivers: NBD (our own client), nebd (part1), client (the client library), vhost-user
//! (a userspace virtio-blk front-end).

pub mod client;
pub mod nbd;
pub mod nebd;
pub mod vhost_user;
