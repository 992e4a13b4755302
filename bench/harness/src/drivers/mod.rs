//! The drivers: NBD (our own client), nebd (part1), client (the client library).

pub mod client;
pub mod nbd;
pub mod nebd;
