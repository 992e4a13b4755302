//! The scheduler's decisions (pure: the cluster as seen -> configuration changes to make).
//!
//! ```text
//!  recovery        a copyset with an offline peer gets a new peer on a healthy chunkserver
//!                  (another zone when one is free), then the dead peer is removed
//!  disk full       the same for a peer whose data disk is full, a few copysets at a time
//!                  and only where another chunkserver has room: the removed replica is
//!                  deleted there (see `Cluster::removable`), which gives its space back
//!  copyset balance a chunkserver with fewer copysets than others (one that joined) takes a
//!                  copyset from the most loaded one: add there, then remove the extra peer
//!  leader balance  leadership moves from chunkservers leading more to ones leading fewer
//! ```
//! One change per copyset at a time: copysets with an operator in flight are skipped.

use std::collections::{BTreeMap, HashSet};

/// How a chunkserver is doing, by the age of its last heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Heartbeats arrive.
    Online,
    /// Late: no decision is taken on it either way.
    Unstable,
    /// Gone for longer than the offline timeout: its replicas are rebuilt elsewhere.
    Offline,
}

/// A chunkserver as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct CsView {
    /// Id.
    pub id: u32,
    /// Zone.
    pub zone: String,
    /// Pool id.
    pub pool: u32,
    /// Liveness.
    pub state: Liveness,
    /// Its data disk is full: it takes no new copyset and no leadership, and its replicas
    /// move to chunkservers with room.
    pub full: bool,
    /// Its data disk is nearly full: it takes no new copyset (so that replicas moved off a
    /// full disk do not come straight back once it has room again).
    pub crowded: bool,
}

/// A copyset as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct CopysetView {
    /// Pool id.
    pub pool: u32,
    /// Copyset id.
    pub id: u32,
    /// Peers.
    pub peers: Vec<u32>,
    /// Leader, if known.
    pub leader: Option<u32>,
    /// Configuration epoch.
    pub epoch: u64,
    /// No client I/O lately: its leadership may move for balance.
    pub quiet: bool,
}

/// A configuration change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Add a peer (created empty on that chunkserver first).
    AddPeer(u32),
    /// Remove a peer.
    RemovePeer(u32),
    /// Move the leadership to a peer.
    TransferLeader(u32),
}

/// Why a change is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A replica is lost or extra.
    Recovery,
    /// Spreading copysets over chunkservers.
    CopysetBalance,
    /// Spreading leaders over chunkservers.
    LeaderBalance,
    /// Moving a replica off a full disk (counts as a balance change: a few at a time).
    DiskFull,
}

/// A decision: a change to one copyset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Pool id.
    pub pool: u32,
    /// Copyset id.
    pub copyset: u32,
    /// The change.
    pub change: Change,
    /// Why.
    pub reason: Reason,
    /// The copyset's epoch when decided.
    pub epoch: u64,
}

/// Knobs of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Replicas per copyset.
    pub replicas: usize,
    /// Balance changes in flight at most (recovery is not limited).
    pub max_balance_ops: usize,
    /// Whether copysets and leaders are balanced at all.
    pub balance: bool,
}

/// Decides the next changes. `busy` holds the copysets with a change in flight,
/// `balance_in_flight` how many of those are balance changes.
pub fn schedule(
    chunkservers: &[CsView],
    copysets: &[CopysetView],
    busy: &HashSet<(u32, u32)>,
    balance_in_flight: usize,
    opts: &Options,
) -> Vec<Decision> {
    let cs: BTreeMap<u32, &CsView> = chunkservers.iter().map(|c| (c.id, c)).collect();
    let state = |id: u32| cs.get(&id).map(|c| c.state).unwrap_or(Liveness::Offline);
    let mut load: BTreeMap<u32, usize> = chunkservers
        .iter()
        .filter(|c| c.state == Liveness::Online && !c.full)
        .map(|c| (c.id, 0))
        .collect();
    let mut leaders = load.clone();
    let full = |id: u32| cs.get(&id).is_some_and(|c| c.full);
    let mut full_budget = opts.max_balance_ops.saturating_sub(balance_in_flight);
    for c in copysets {
        for p in &c.peers {
            if let Some(n) = load.get_mut(p) {
                *n += 1;
            }
        }
        if let Some(n) = c.leader.and_then(|l| leaders.get_mut(&l)) {
            *n += 1;
        }
    }
    let mut out = Vec::new();
    let decide = |c: &CopysetView, change, reason| Decision {
        pool: c.pool,
        copyset: c.id,
        change,
        reason,
        epoch: c.epoch,
    };
    // Recovery first, for every copyset that needs it.
    for c in copysets {
        if busy.contains(&(c.pool, c.id)) {
            continue;
        }
        let Some(leader) = c.leader.filter(|l| state(*l) == Liveness::Online) else {
            continue; // whoever leads must execute the change
        };
        let offline: Vec<u32> = c
            .peers
            .iter()
            .copied()
            .filter(|p| state(*p) == Liveness::Offline)
            .collect();
        if c.peers.len() > opts.replicas {
            // The dead first, then one on a full disk; else the peer whose removal leaves the
            // most zones, then the most loaded (never the leader: it executes the change).
            let zones_without = |p: u32| {
                c.peers
                    .iter()
                    .filter(|q| **q != p)
                    .filter_map(|q| cs.get(q).map(|v| v.zone.as_str()))
                    .collect::<HashSet<_>>()
                    .len()
            };
            let on_full_disk = c.peers.iter().copied().find(|p| *p != leader && full(*p));
            let victim = offline.first().copied().or(on_full_disk).or_else(|| {
                c.peers
                    .iter()
                    .copied()
                    .filter(|p| *p != leader)
                    .max_by_key(|p| {
                        (
                            zones_without(*p),
                            load.get(p).copied().unwrap_or(usize::MAX),
                            *p,
                        )
                    })
            });
            if let Some(v) = victim {
                if let Some(n) = load.get_mut(&v) {
                    *n -= 1;
                }
                out.push(decide(c, Change::RemovePeer(v), Reason::Recovery));
            }
            continue;
        }
        if offline.is_empty() && c.peers.len() == opts.replicas {
            // A replica on a full disk moves where there is room (its leadership is gone
            // already: a full chunkserver hands it over).
            if let Some(f) = c.peers.iter().copied().find(|p| *p != leader && full(*p))
                && full_budget > 0
                && let Some(t) = target(c, &cs, &load, Some(f))
                && cs.get(&t).is_some_and(|v| !v.crowded)
            {
                full_budget -= 1;
                *load.get_mut(&t).expect("online") += 1;
                out.push(decide(c, Change::AddPeer(t), Reason::DiskFull));
            }
            continue;
        }
        if let Some(t) = target(c, &cs, &load, None) {
            *load.get_mut(&t).expect("online") += 1;
            out.push(decide(c, Change::AddPeer(t), Reason::Recovery));
        }
    }
    if !opts.balance || !out.is_empty() {
        return out;
    }
    let mut budget = opts.max_balance_ops.saturating_sub(balance_in_flight);
    // Copyset balance takes no chunkserver that is nearly full as a target.
    let roomy: BTreeMap<u32, usize> = load
        .iter()
        .filter(|(id, _)| cs.get(id).is_some_and(|c| !c.crowded))
        .map(|(id, n)| (*id, *n))
        .collect();
    // Copyset balance: the least loaded online chunkserver takes one copyset of the most
    // loaded one (of its pool).
    let free = |c: &CopysetView| !busy.contains(&(c.pool, c.id));
    if budget > 0
        && let (Some((&min_cs, &min)), Some((&max_cs, &max))) = (
            roomy.iter().min_by_key(|(id, n)| (**n, **id)),
            load.iter().max_by_key(|(id, n)| (**n, u32::MAX - **id)),
        )
        && max > min + 1
    {
        let candidate = copysets.iter().find(|c| {
            free(c)
                && c.peers.contains(&max_cs)
                && !c.peers.contains(&min_cs)
                && cs.get(&min_cs).is_some_and(|m| m.pool == c.pool)
                && c.peers.len() == opts.replicas
                && c.leader.is_some_and(|l| state(l) == Liveness::Online)
                && target(c, &cs, &load, Some(max_cs)) == Some(min_cs)
        });
        if let Some(c) = candidate {
            out.push(decide(c, Change::AddPeer(min_cs), Reason::CopysetBalance));
            budget -= 1;
        }
    }
    // Leader balance.
    if budget > 0
        && let (Some((&min_cs, &min)), Some((&max_cs, &max))) = (
            leaders.iter().min_by_key(|(id, n)| (**n, **id)),
            leaders.iter().max_by_key(|(id, n)| (**n, u32::MAX - **id)),
        )
        && max > min + 1
    {
        let candidate = copysets.iter().find(|c| {
            free(c)
                && c.quiet
                && c.leader == Some(max_cs)
                && c.peers.contains(&min_cs)
                && out.iter().all(|d| d.copyset != c.id || d.pool != c.pool)
        });
        if let Some(c) = candidate {
            out.push(decide(
                c,
                Change::TransferLeader(min_cs),
                Reason::LeaderBalance,
            ));
        }
    }
    out
}

/// The best chunkserver to add to `c`: online, of its pool, not a peer; a zone none of the
/// staying peers is in when there is one; then the fewest copysets. `leaving` is a peer that
/// will be removed (its zone frees up).
fn target(
    c: &CopysetView,
    cs: &BTreeMap<u32, &CsView>,
    load: &BTreeMap<u32, usize>,
    leaving: Option<u32>,
) -> Option<u32> {
    let zones: HashSet<&str> = c
        .peers
        .iter()
        .filter(|p| Some(**p) != leaving)
        .filter(|p| cs.get(p).is_some_and(|v| v.state != Liveness::Offline))
        .filter_map(|p| cs.get(p).map(|v| v.zone.as_str()))
        .collect();
    load.iter()
        .filter(|(id, _)| !c.peers.contains(id))
        .filter_map(|(id, n)| cs.get(id).map(|v| (v, *n)))
        .filter(|(v, _)| v.pool == c.pool && v.state == Liveness::Online)
        .min_by_key(|(v, n)| (zones.contains(v.zone.as_str()), *n, v.id))
        .map(|(v, _)| v.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn css(spec: &[(u32, &str, Liveness)]) -> Vec<CsView> {
        spec.iter()
            .map(|(id, z, s)| CsView {
                id: *id,
                zone: z.to_string(),
                pool: 1,
                state: *s,
                full: false,
                crowded: false,
            })
            .collect()
    }

    fn cp(id: u32, peers: &[u32], leader: u32) -> CopysetView {
        CopysetView {
            pool: 1,
            id,
            peers: peers.to_vec(),
            leader: Some(leader),
            epoch: 3,
            quiet: true,
        }
    }

    const OPTS: Options = Options {
        replicas: 3,
        max_balance_ops: 2,
        balance: true,
    };
    use Liveness::*;

    #[test]
    fn an_offline_peer_is_replaced_in_another_zone_then_removed() {
        let c = css(&[
            (1, "a", Online),
            (2, "b", Online),
            (3, "c", Offline),
            (4, "a", Online),
            (5, "c", Online),
        ]);
        let d = schedule(&c, &[cp(7, &[1, 2, 3], 1)], &HashSet::new(), 0, &OPTS);
        assert_eq!(
            d,
            vec![Decision {
                pool: 1,
                copyset: 7,
                change: Change::AddPeer(5),
                reason: Reason::Recovery,
                epoch: 3
            }],
            "zone c is free again: 5, not 4"
        );
        // Once added, the dead one goes.
        let d = schedule(&c, &[cp(7, &[1, 2, 3, 5], 1)], &HashSet::new(), 0, &OPTS);
        assert_eq!(d[0].change, Change::RemovePeer(3));
        // Busy copysets wait; an offline leader waits for the election.
        let busy: HashSet<_> = [(1, 7)].into();
        assert!(schedule(&c, &[cp(7, &[1, 2, 3], 1)], &busy, 0, &OPTS).is_empty());
        assert!(schedule(&c, &[cp(7, &[1, 2, 3], 3)], &HashSet::new(), 0, &OPTS).is_empty());
    }

    #[test]
    fn unstable_is_left_alone_and_no_target_means_no_change() {
        let c = css(&[(1, "a", Online), (2, "b", Online), (3, "c", Unstable)]);
        assert!(schedule(&c, &[cp(1, &[1, 2, 3], 1)], &HashSet::new(), 0, &OPTS).is_empty());
        let c = css(&[(1, "a", Online), (2, "b", Online), (3, "c", Offline)]);
        assert!(schedule(&c, &[cp(1, &[1, 2, 3], 1)], &HashSet::new(), 0, &OPTS).is_empty());
    }

    #[test]
    fn recovery_spreads_over_targets() {
        let c = css(&[
            (1, "a", Online),
            (2, "b", Online),
            (3, "c", Offline),
            (4, "c", Online),
            (5, "c", Online),
        ]);
        let sets: Vec<_> = (1..=4).map(|i| cp(i, &[1, 2, 3], 1)).collect();
        let d = schedule(&c, &sets, &HashSet::new(), 0, &OPTS);
        let targets: Vec<_> = d.iter().map(|d| d.change).collect();
        assert_eq!(
            targets,
            vec![
                Change::AddPeer(4),
                Change::AddPeer(5),
                Change::AddPeer(4),
                Change::AddPeer(5)
            ]
        );
    }

    #[test]
    fn a_joining_chunkserver_takes_copysets_and_leaders_spread() {
        let c = css(&[
            (1, "a", Online),
            (2, "b", Online),
            (3, "c", Online),
            (4, "c", Online),
        ]);
        let sets: Vec<_> = (1..=4).map(|i| cp(i, &[1, 2, 3], 1)).collect();
        let d = schedule(&c, &sets, &HashSet::new(), 0, &OPTS);
        assert_eq!(d[0].change, Change::AddPeer(4));
        assert_eq!(d[0].reason, Reason::CopysetBalance);
        // The leader balance comes with it: 1 leads all four.
        assert_eq!(d[1].reason, Reason::LeaderBalance);
        assert!(matches!(d[1].change, Change::TransferLeader(2 | 3)));
        // The balance budget is respected.
        assert!(schedule(&c, &sets, &HashSet::new(), 2, &OPTS).is_empty());
        // Then the extra peer on zone c's loaded chunkserver (3) is removed, not the leader.
        let mut sets = sets;
        sets[d[0].copyset as usize - 1].peers.push(4);
        let d = schedule(&c, &sets, &HashSet::new(), 0, &OPTS);
        assert_eq!(d[0].change, Change::RemovePeer(3));
    }

    /// A chunkserver whose disk is full takes neither copysets nor leaderships.
    #[test]
    fn a_full_chunkserver_takes_nothing() {
        let mut c = css(&[
            (1, "a", Online),
            (2, "b", Online),
            (3, "c", Online),
            (4, "c", Online),
        ]);
        c[3].full = true;
        let sets: Vec<_> = (1..=4).map(|i| cp(i, &[1, 2, 3], 1)).collect();
        let d = schedule(&c, &sets, &HashSet::new(), 0, &OPTS);
        assert!(
            d.iter()
                .all(|d| !matches!(d.change, Change::AddPeer(4) | Change::TransferLeader(4))),
            "{d:?}"
        );
        c[1].full = true;
        c[2].full = true;
        let d = schedule(&c, &sets, &HashSet::new(), 0, &OPTS);
        assert!(
            d.iter()
                .all(|d| !matches!(d.change, Change::TransferLeader(_))),
            "no leadership goes to a full disk: {d:?}"
        );
    }

    /// Replicas on a full disk move to a chunkserver with room, a few at a time (the balance
    /// budget), then the full one is removed; with no room anywhere nothing moves, and a
    /// nearly full chunkserver takes nothing.
    #[test]
    fn replicas_move_off_a_full_disk_where_there_is_room() {
        let mut c = css(&[
            (1, "a", Online),
            (2, "b", Online),
            (3, "c", Online),
            (4, "c", Online),
        ]);
        c[2].full = true;
        let sets: Vec<_> = (1..=6).map(|i| cp(i, &[1, 2, 3], 1)).collect();
        let d = schedule(&c, &sets, &HashSet::new(), 0, &OPTS);
        assert_eq!(d.len(), OPTS.max_balance_ops, "{d:?}");
        assert!(
            d.iter()
                .all(|d| d.change == Change::AddPeer(4) && d.reason == Reason::DiskFull),
            "{d:?}"
        );
        assert!(
            schedule(&c, &sets, &HashSet::new(), OPTS.max_balance_ops, &OPTS).is_empty(),
            "the budget holds"
        );
        // Added: the full one goes, not the leader nor the new one.
        let mut sets = sets;
        sets[0].peers.push(4);
        let d = schedule(&c, &sets, &HashSet::new(), OPTS.max_balance_ops, &OPTS);
        assert_eq!(d[0].copyset, 1);
        assert_eq!(d[0].change, Change::RemovePeer(3));
        assert_eq!(d[0].reason, Reason::Recovery);
        // No room: 4 nearly full.
        c[3].crowded = true;
        let sets: Vec<_> = (1..=6).map(|i| cp(i, &[1, 2, 3], 1)).collect();
        let d = schedule(&c, &sets, &HashSet::new(), 0, &OPTS);
        assert!(
            d.iter().all(|d| !matches!(d.change, Change::AddPeer(_))),
            "{d:?}"
        );
        // A crowded chunkserver takes no copyset for balance either.
        c[2].full = false;
        let sets: Vec<_> = (1..=4).map(|i| cp(i, &[1, 2, 3], 1)).collect();
        let d = schedule(&c, &sets, &HashSet::new(), 0, &OPTS);
        assert!(d.iter().all(|d| d.change != Change::AddPeer(4)), "{d:?}");
    }

    /// Leaders move only off copysets without client I/O lately: a transfer under I/O would
    /// redirect every client of the copyset mid-stream.
    #[test]
    fn leaders_of_busy_copysets_stay() {
        let c = css(&[(1, "a", Online), (2, "b", Online), (3, "c", Online)]);
        let mut sets: Vec<_> = (1..=4).map(|i| cp(i, &[1, 2, 3], 1)).collect();
        for s in &mut sets {
            s.quiet = false;
        }
        assert!(
            schedule(&c, &sets, &HashSet::new(), 0, &OPTS).is_empty(),
            "every copyset busy: no transfer"
        );
        sets[2].quiet = true;
        let d = schedule(&c, &sets, &HashSet::new(), 0, &OPTS);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].copyset, 3, "the quiet one");
        assert_eq!(d[0].reason, Reason::LeaderBalance);
    }
}
