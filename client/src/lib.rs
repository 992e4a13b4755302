//! The Curve-rs client library (seed 001).
//!
//! ```text
//!  mds    MdsClient: a list of MDS addresses; follows NOT_LEADER to the leader, fails over
//!         on transport errors, retries until a deadline
//! ```

pub mod mds;

pub use mds::{MdsClient, MdsError};
