//! Sessions: who has a volume open. Opens are exclusive; a session lives while its lease is
//! refreshed; a lapsed session lets another client open (with a higher epoch, which fences
//! the old writer on the chunkservers).
//!
//! ```text
//!  o/<file id>     SessionRecord (json): persisted so a new leader MDS honours open volumes
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::store::Op;

/// A session, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRecord {
    /// Session id.
    pub id: String,
    /// Who opened.
    pub client: String,
}

/// Why a session operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// Open by another live session.
    Occupied(String),
    /// Unknown session or lease lapsed.
    Expired,
}

#[derive(Debug)]
struct Live {
    rec: SessionRecord,
    expires: Instant,
    /// The snapshot sequence number the client said its writes carry (in memory: after a
    /// restart of the MDS, the next refresh says it again).
    snap: u64,
}

/// The open volumes.
#[derive(Debug)]
pub struct Sessions {
    by_file: HashMap<u64, Live>,
    lease: Duration,
}

fn key(file: u64) -> Vec<u8> {
    format!("o/{file:016x}").into_bytes()
}

impl Sessions {
    /// Sessions from the store's pairs; each gets a full lease from `now`.
    pub fn load(pairs: &[(Vec<u8>, Vec<u8>)], lease: Duration, now: Instant) -> Self {
        let mut by_file = HashMap::new();
        for (k, v) in pairs {
            let Some(file) = std::str::from_utf8(k)
                .ok()
                .and_then(|k| k.strip_prefix("o/"))
                .and_then(|f| u64::from_str_radix(f, 16).ok())
            else {
                continue;
            };
            if let Ok(rec) = serde_json::from_slice(v) {
                by_file.insert(
                    file,
                    Live {
                        rec,
                        expires: now + lease,
                        snap: 0,
                    },
                );
            }
        }
        Sessions { by_file, lease }
    }

    /// The lease length.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Opens `file` for `client`.
    pub fn open(
        &mut self,
        file: u64,
        client: &str,
        now: Instant,
    ) -> Result<(String, Vec<Op>), SessionError> {
        // A live session blocks other clients; the same client (a restarted process with
        // the same identity) takes its session over, with a new epoch.
        if let Some(l) = self.by_file.get(&file)
            && l.expires > now
            && l.rec.client != client
        {
            return Err(SessionError::Occupied(l.rec.client.clone()));
        }
        let rec = SessionRecord {
            id: format!("{:032x}", rand::random::<u128>()),
            client: client.to_string(),
        };
        let ops = vec![Op::Put(
            key(file),
            serde_json::to_vec(&rec).expect("serialises"),
        )];
        let id = rec.id.clone();
        self.by_file.insert(
            file,
            Live {
                rec,
                expires: now + self.lease,
                snap: 0,
            },
        );
        Ok((id, ops))
    }

    /// Extends the lease of a live session.
    pub fn refresh(&mut self, file: u64, session: &str, now: Instant) -> Result<(), SessionError> {
        self.refresh_at(file, session, now, 0)
    }

    /// As [`Sessions::refresh`], recording that the client's writes carry snapshot sequence
    /// number `snap`.
    pub fn refresh_at(
        &mut self,
        file: u64,
        session: &str,
        now: Instant,
        snap: u64,
    ) -> Result<(), SessionError> {
        match self.by_file.get_mut(&file) {
            Some(l) if l.rec.id == session && l.expires > now => {
                l.expires = now + self.lease;
                l.snap = l.snap.max(snap);
                Ok(())
            }
            _ => Err(SessionError::Expired),
        }
    }

    /// Whether the writer of `file` (if any) writes with snapshot `seq` or newer: no live
    /// session, or one that said so.
    pub fn took_snapshot(&self, file: u64, seq: u64, now: Instant) -> bool {
        self.by_file
            .get(&file)
            .is_none_or(|l| l.expires <= now || l.snap >= seq)
    }

    /// Ends a session.
    pub fn close(&mut self, file: u64, session: &str) -> Result<Vec<Op>, SessionError> {
        match self.by_file.get(&file) {
            Some(l) if l.rec.id == session => {
                self.by_file.remove(&file);
                Ok(vec![Op::Delete(key(file))])
            }
            _ => Err(SessionError::Expired),
        }
    }

    /// Whether `file` is open by a live session.
    pub fn is_open(&self, file: u64, now: Instant) -> bool {
        self.by_file.get(&file).is_some_and(|l| l.expires > now)
    }

    /// The files open by a live session.
    pub fn open_files(&self, now: Instant) -> Vec<u64> {
        self.by_file
            .iter()
            .filter(|(_, l)| l.expires > now)
            .map(|(f, _)| *f)
            .collect()
    }

    /// Forgets the session of a purged file.
    pub fn forget(&mut self, file: u64) -> Vec<Op> {
        match self.by_file.remove(&file) {
            Some(_) => vec![Op::Delete(key(file))],
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_open_lease_and_takeover() {
        let t0 = Instant::now();
        let lease = Duration::from_secs(10);
        let mut s = Sessions::load(&[], lease, t0);
        let (a, ops) = s.open(7, "host-a", t0).unwrap();
        assert_eq!(
            s.open(7, "host-b", t0),
            Err(SessionError::Occupied("host-a".into()))
        );
        s.refresh(7, &a, t0 + Duration::from_secs(9)).unwrap();
        assert_eq!(s.refresh(7, "forged", t0), Err(SessionError::Expired));
        // Still live 18 s in thanks to the refresh; lapsed at 20.
        assert!(s.open(7, "host-b", t0 + Duration::from_secs(18)).is_err());
        let (b, _) = s.open(7, "host-b", t0 + Duration::from_secs(20)).unwrap();
        // host-b restarted: it takes its own session over at once.
        let (b2, _) = s.open(7, "host-b", t0 + Duration::from_secs(21)).unwrap();
        assert_ne!(b, b2);
        assert_eq!(
            s.refresh(7, &b, t0 + Duration::from_secs(21)),
            Err(SessionError::Expired)
        );
        let b = b2;
        assert_ne!(a, b);
        assert_eq!(
            s.refresh(7, &a, t0 + Duration::from_secs(20)),
            Err(SessionError::Expired)
        );
        assert_eq!(s.close(7, &a), Err(SessionError::Expired));
        s.close(7, &b).unwrap();
        assert!(!s.is_open(7, t0));
        // Persisted sessions come back with a fresh lease.
        let pairs: Vec<_> = ops
            .into_iter()
            .filter_map(|o| match o {
                Op::Put(k, v) => Some((k, v)),
                Op::Delete(_) => None,
            })
            .collect();
        let s = Sessions::load(&pairs, lease, t0 + Duration::from_secs(100));
        assert!(s.is_open(7, t0 + Duration::from_secs(105)));
    }
}
