//! NEBD part2 (`nebd-server`): the daemon that holds volumes open and serves them to their
//! consumers through frontends, and that can be restarted without them seeing errors.
//!
//! ```text
//!   curve CLI ──control.sock (JSON lines)──> daemon ──> ExportManager
//!                                                          │ VolumeSpec::open (File Manager)
//!                                                          v
//!                                   Arc<dyn BlockDevice> ──> frontends (NBD ...)
//! ```

pub use nebd_control as control;
pub mod daemon;
pub mod exports;
pub mod files;
pub mod handover;
pub mod metafile;
pub mod metered;
pub mod part1;
pub mod upgrade;
pub mod volume;
