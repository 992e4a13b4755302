//! `curve bench`: a bdevperf-like harness. Jobs keep a queue depth of operations in flight
//! against a target through a driver, and report IOPS, bandwidth, latency percentiles and a
//! histogram, as text or JSON.
//!
//! ```text
//!  workload  Workload, Generator (sequential / random / zipf offsets, rw mix), verify patterns
//!  engine    Driver -> Engine per job: submit(tag, op), reap() -> completions in any order
//!  drivers   nbd (own NBD client, multi-conn), nebd (libnebd -> part2), client (curve-client)
//!  runner    threads per job, progress line, merge
//!  stats     Recorder -> Summary (text / JSON)
//! ```

pub mod drivers;
pub mod engine;
pub mod runner;
pub mod stats;
pub mod workload;

pub use runner::{Spec, run};
pub use stats::Summary;
pub use workload::Workload;
