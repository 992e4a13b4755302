//! The Curve-rs client library (seed 001): volumes of the cluster, read and written through
//! the leaders of their copysets, located through the MDS.
//!
//! ```text
//!  mds        MdsClient: a list of MDS addresses; follows NOT_LEADER, fails over, retries
//!  volume     Volume: open (exclusive session, lease, epoch), reads and writes per chunk
//!  iotracker  IoTracker: a request split per chunk, its parts' answers, its one result
//!  retry      RetryPolicy: what to do after each attempt of a chunk request (pure)
//!  metacache  segment -> chunk ids + copysets, copyset -> peers + leader
//!  chunk      connections to chunkservers, leader discovery (GetLeader)
//!  qos        per-volume token buckets (IOPS and bandwidth, read/write/total, burst)
//!  budget     bytes in flight, per volume and per process: over them callers wait
//!  device     CurveDevice: a Volume as a curve_blockdev::BlockDevice, for every frontend
//! ```

pub mod budget;
pub mod chunk;
pub mod device;
pub mod iotracker;
pub mod mds;
pub mod metacache;
pub mod qos;
pub mod retry;
pub mod volume;

pub use device::CurveDevice;
pub use mds::{MdsClient, MdsError};
pub use volume::{ClientError, SessionState, Volume, VolumeOptions};
