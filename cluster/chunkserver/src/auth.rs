//! The chunkserver's checks (auth on: a cluster keyring): every chunk request carries the
//! MDS's ticket for a volume and its grant of the chunk to that volume; the volume and the
//! epoch are the ticket's, never the request's. Each volume has an epoch floor, the highest
//! epoch seen in a valid ticket or pushed by the MDS in heartbeat replies (volumes reopened
//! since): a ticket of an older session stops working.

use std::collections::HashMap;

use curve_auth::{AuthError, SharedKeyring, Ticket};
use curve_proto::chunk::ChunkStatus;
use parking_lot::RwLock;

/// Ticket and grant checks of one chunkserver.
#[derive(Debug)]
pub struct ChunkAuth {
    /// The cluster keyring.
    pub ring: SharedKeyring,
    floors: RwLock<HashMap<u64, u64>>,
}

/// What a checked request may do: the ticket's volume and epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    /// The volume.
    pub volume: u64,
    /// The epoch.
    pub epoch: u64,
}

impl ChunkAuth {
    /// Checks with `ring`.
    pub fn new(ring: SharedKeyring) -> Self {
        ChunkAuth {
            ring,
            floors: RwLock::default(),
        }
    }

    /// Checks a request's ticket and grant for `chunk` (`write`: a ticket that allows writes).
    pub fn check(
        &self,
        ticket: &[u8],
        grant: &[u8],
        chunk: u64,
        write: bool,
        method: &str,
    ) -> Result<Allowed, ChunkStatus> {
        self.check_as(ticket, grant, chunk, write, false, method)
    }

    /// As [`Self::check`] for a fill of a clone chunk (`fill`): a writer's ticket or a
    /// read-only one that allows fills (a flatten's).
    pub fn check_as(
        &self,
        ticket: &[u8],
        grant: &[u8],
        chunk: u64,
        write: bool,
        fill: bool,
        method: &str,
    ) -> Result<Allowed, ChunkStatus> {
        self.allowed(ticket, grant, chunk, write, fill)
            .map_err(|e| {
                curve_auth::refused(&e, method);
                match e {
                    AuthError::Expired => ChunkStatus::TicketExpired,
                    AuthError::StaleEpoch(_) => ChunkStatus::EpochTooOld,
                    _ => ChunkStatus::AuthFailed,
                }
            })
    }

    fn allowed(
        &self,
        ticket: &[u8],
        grant: &[u8],
        chunk: u64,
        write: bool,
        fill: bool,
    ) -> Result<Allowed, AuthError> {
        let ring = self.ring.get();
        let t = Ticket::open(ticket, &ring, curve_auth::now_ms())?;
        if write && t.read_only {
            return Err(AuthError::ReadOnly);
        }
        if fill && t.read_only && !t.fill {
            return Err(AuthError::ReadOnly);
        }
        curve_auth::check_grant(grant, &ring, t.volume, chunk)?;
        let floor = self.floors.read().get(&t.volume).copied().unwrap_or(0);
        if t.epoch < floor {
            // The volume was reopened since: the client sees EPOCH_TOO_OLD, as a fenced writer.
            return Err(AuthError::StaleEpoch(t.epoch));
        }
        if t.epoch > floor {
            self.raise(&[(t.volume, t.epoch)]);
        }
        Ok(Allowed {
            volume: t.volume,
            epoch: t.epoch,
        })
    }

    /// Raises the epoch floors of volumes (from tickets, or from the MDS).
    pub fn raise(&self, epochs: &[(u64, u64)]) {
        let mut f = self.floors.write();
        for &(v, e) in epochs {
            let x = f.entry(v).or_insert(0);
            *x = (*x).max(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_grants_and_epoch_floors() {
        let ring = curve_auth::Keyring::generate();
        let a = ChunkAuth::new(SharedKeyring::fixed(ring.clone()));
        let t = |volume, epoch, expiry_ms, read_only| {
            Ticket {
                volume,
                epoch,
                expiry_ms,
                read_only,
                fill: false,
            }
            .seal(&ring)
        };
        let far = curve_auth::now_ms() + 60_000;
        let g = curve_auth::grant(&ring, 5, 100);
        assert_eq!(
            a.check(&t(5, 2, far, false), &g, 100, true, "w"),
            Ok(Allowed {
                volume: 5,
                epoch: 2
            })
        );
        // Another chunk, another volume's ticket, no ticket, no grant, expired, read-only.
        assert_eq!(
            a.check(&t(5, 2, far, false), &g, 101, true, "w"),
            Err(ChunkStatus::AuthFailed)
        );
        assert_eq!(
            a.check(&t(6, 9, far, false), &g, 100, true, "w"),
            Err(ChunkStatus::AuthFailed)
        );
        assert_eq!(
            a.check(&[], &g, 100, true, "w"),
            Err(ChunkStatus::AuthFailed)
        );
        assert_eq!(
            a.check(&t(5, 2, far, false), &[], 100, true, "w"),
            Err(ChunkStatus::AuthFailed)
        );
        assert_eq!(
            a.check(&t(5, 2, 1, false), &g, 100, true, "w"),
            Err(ChunkStatus::TicketExpired)
        );
        assert_eq!(
            a.check(&t(5, 2, far, true), &g, 100, true, "w"),
            Err(ChunkStatus::AuthFailed)
        );
        assert!(a.check(&t(5, 2, far, true), &g, 100, false, "r").is_ok());
        // A newer session's ticket raises the floor: the older one stops working.
        a.check(&t(5, 3, far, false), &g, 100, true, "w").unwrap();
        assert_eq!(
            a.check(&t(5, 2, far, false), &g, 100, false, "r"),
            Err(ChunkStatus::EpochTooOld)
        );
        // The MDS's push does the same before the new session wrote here.
        a.raise(&[(5, 7)]);
        assert_eq!(
            a.check(&t(5, 3, far, false), &g, 100, true, "w"),
            Err(ChunkStatus::EpochTooOld)
        );
        assert!(a.check(&t(5, 7, far, false), &g, 100, true, "w").is_ok());
    }
}
