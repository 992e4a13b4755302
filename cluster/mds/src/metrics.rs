//! The MDS's Prometheus metrics (`--metrics-listen`): gRPC requests by method and status with
//! their latency (a layer on the server), and, read from the leader's state at each scrape,
//! whether this MDS leads, chunkservers by state and with a full disk, copysets healthy and
//! degraded, operators in flight and open sessions.

use std::sync::Arc;
use std::time::Instant;

use curve_metrics::{GrpcMetrics, Labels, Metrics};

use crate::mds::Role;

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_owned(), v.to_owned())]
}

/// Registers the MDS's families in `m`; returns the layer for the gRPC server.
pub fn register(m: &Metrics, role: Arc<Role>) -> GrpcMetrics {
    let grpc = GrpcMetrics::register(m, "curve_mds_grpc");
    m.counters_from(
        "curve_mds_auth_refused",
        "Requests refused by authentication, by reason (missing, bad_signature, replay, ...)",
        "reason",
        curve_auth::refusals,
    );
    let leader = m.gauge("curve_mds_leader", "1 while this MDS is the leader");
    let chunkservers = m.gauge(
        "curve_mds_chunkservers",
        "Chunkservers by state (online, unstable, offline), as the leader sees them",
    );
    let copysets = m.gauge(
        "curve_mds_copysets",
        "Copysets by health: healthy (a leader, every peer online) or degraded",
    );
    let operators = m.gauge(
        "curve_mds_operators",
        "Configuration changes (add, remove, transfer leader) in flight",
    );
    let disks_full = m.gauge(
        "curve_mds_chunkservers_disk_full",
        "Chunkservers whose data disk is below its reserve (no writes, no leaderships there)",
    );
    let sessions = m.gauge("curve_mds_sessions", "Volumes open (live sessions)");
    let files = m.gauge("curve_mds_files", "Files and directories in the namespace");
    m.on_scrape(move || {
        let Some(mds) = role.mds() else {
            leader.get_or_create(&vec![]).set(0);
            return;
        };
        leader.get_or_create(&vec![]).set(1);
        let now = Instant::now();
        let st = mds.state.lock();
        let h = st.cluster.health(now);
        for (state, n) in [
            ("online", h.online),
            ("unstable", h.unstable),
            ("offline", h.offline),
        ] {
            chunkservers
                .get_or_create(&label("state", state))
                .set(n as i64);
        }
        copysets
            .get_or_create(&label("health", "healthy"))
            .set(h.copysets_healthy as i64);
        copysets
            .get_or_create(&label("health", "degraded"))
            .set(h.copysets_degraded as i64);
        operators
            .get_or_create(&vec![])
            .set(st.cluster.operators() as i64);
        disks_full.get_or_create(&vec![]).set(
            st.cluster
                .chunkservers(now)
                .iter()
                .filter(|c| c.4.full)
                .count() as i64,
        );
        sessions
            .get_or_create(&vec![])
            .set(st.sessions.open_files(now).len() as i64);
        files.get_or_create(&vec![]).set(st.ns.len() as i64);
    });
    grpc
}
