//! The Curve-rs MDS (seeds 001 and 002): the namespace of volumes and the map from their
//! logical chunks to chunk ids and copysets, the topology, sessions, chunkserver registration
//! and heartbeats, and the scheduler that keeps three healthy replicas of every copyset.
//!
//! ```text
//!            clients (MdsService)           chunkservers (HeartbeatService)
//!                   \                               /
//!                    Services ── Role: leader? ── NOT_LEADER + leader address
//!                       |
//!                      Mds: Mutex<State { Namespace, Cluster, Sessions }>   (memory)
//!                       |  ops queued in order under the lock
//!                     Writer ── group commit ──> MetaStore: EmbeddedStore (redb) | EtcdStore
//!  background (leader): create placed copysets, scheduler (+ prepare added peers), cleaner
//! ```
//!
//! Pure decisions live apart from I/O: [`topology::place_copysets`],
//! [`segment::choose_copysets`], [`scheduler::schedule`], and the in-memory
//! [`namespace::Namespace`] / [`session::Sessions`] / [`cluster::Cluster`].

pub mod auth;
pub mod cluster;
pub mod daemon;
pub mod etcd;
pub mod mds;
pub mod metrics;
pub mod namespace;
pub mod scheduler;
pub mod segment;
pub mod session;
pub mod store;
pub mod topology;
