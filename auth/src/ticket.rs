//! Tickets and grants: what the MDS gives a client that opened a volume, and what chunkservers
//! check on every chunk request.
//!
//! ```text
//! ticket (62 bytes)  version 1 | key id u32 | volume u64 | epoch u64 | expiry ms u64 | flags u8
//!                    | MAC (32): blake3 keyed with the cluster key over "curve-rs ticket v1\0"
//!                      and the 30 bytes before it
//! grant  (20 bytes)  key id u32 | first 16 bytes of the MAC of (volume, chunk id)
//! ```
//!
//! A ticket is a bearer token: whoever holds it may do what it says until it expires or the
//! volume is reopened (a higher epoch). The chunkserver takes the volume and the epoch from
//! it, never from the request. A grant binds a chunk id to its volume: a ticket of one volume
//! cannot reach another volume's chunks, even ones not written yet.

use crate::AuthError;
use crate::keyring::Keyring;

/// Length of a sealed ticket.
pub const TICKET_LEN: usize = 62;
/// Length of a grant.
pub const GRANT_LEN: usize = 20;
const READ_ONLY: u8 = 1;
const FILL: u8 = 2;

/// What a ticket allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The volume.
    pub volume: u64,
    /// The epoch of the session it was issued to.
    pub epoch: u64,
    /// When it stops working (ms since the Unix epoch).
    pub expiry_ms: u64,
    /// Reads only.
    pub read_only: bool,
    /// May also fill a clone's chunks from its source (with `read_only`: a flatten's ticket,
    /// which writes nothing else).
    pub fill: bool,
}

fn ticket_mac(key: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"curve-rs ticket v1\0");
    h.update(body);
    *h.finalize().as_bytes()
}

impl Ticket {
    /// Seals the ticket with the ring's primary key.
    pub fn seal(&self, ring: &Keyring) -> Vec<u8> {
        let (id, key) = ring.primary();
        let mut b = Vec::with_capacity(TICKET_LEN);
        b.push(1);
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&self.volume.to_le_bytes());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.expiry_ms.to_le_bytes());
        b.push(if self.read_only { READ_ONLY } else { 0 } | if self.fill { FILL } else { 0 });
        let mac = ticket_mac(key, &b);
        b.extend_from_slice(&mac);
        b
    }

    /// Opens a sealed ticket: the MAC under a key of the ring, and not expired at `now`.
    pub fn open(b: &[u8], ring: &Keyring, now: u64) -> Result<Ticket, AuthError> {
        if b.is_empty() {
            return Err(AuthError::Missing);
        }
        if b.len() != TICKET_LEN || b[0] != 1 || b[29] & !(READ_ONLY | FILL) != 0 {
            return Err(AuthError::Malformed("not a ticket".into()));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let id = u32::from_le_bytes(b[1..5].try_into().expect("4 bytes"));
        let key = ring.get(id).ok_or(AuthError::UnknownKey(id))?;
        let mac: [u8; 32] = b[30..].try_into().expect("32 bytes");
        if blake3::Hash::from(ticket_mac(key, &b[..30])) != blake3::Hash::from(mac) {
            return Err(AuthError::BadSignature);
        }
        let t = Ticket {
            volume: u64_at(5),
            epoch: u64_at(13),
            expiry_ms: u64_at(21),
            read_only: b[29] & READ_ONLY != 0,
            fill: b[29] & FILL != 0,
        };
        if now >= t.expiry_ms {
            return Err(AuthError::Expired);
        }
        Ok(t)
    }
}

fn grant_mac(key: &[u8; 32], volume: u64, chunk: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"curve-rs grant v1\0");
    h.update(&volume.to_le_bytes());
    h.update(&chunk.to_le_bytes());
    *h.finalize().as_bytes()
}

/// The grant of chunk `chunk` to volume `volume`, under the ring's primary key.
pub fn grant(ring: &Keyring, volume: u64, chunk: u64) -> Vec<u8> {
    let (id, key) = ring.primary();
    let mut b = Vec::with_capacity(GRANT_LEN);
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&grant_mac(key, volume, chunk)[..16]);
    b
}

/// Checks that `b` grants chunk `chunk` to volume `volume`.
pub fn check_grant(b: &[u8], ring: &Keyring, volume: u64, chunk: u64) -> Result<(), AuthError> {
    if b.is_empty() {
        return Err(AuthError::Missing);
    }
    if b.len() != GRANT_LEN {
        return Err(AuthError::Malformed("not a grant".into()));
    }
    let id = u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
    let key = ring.get(id).ok_or(AuthError::UnknownKey(id))?;
    let want = grant_mac(key, volume, chunk);
    let mut got = [0u8; 32];
    got[..16].copy_from_slice(&b[4..]);
    let mut cut = want;
    cut[16..].fill(0);
    if blake3::Hash::from(cut) != blake3::Hash::from(got) {
        return Err(AuthError::WrongVolume(format!(
            "chunk {chunk} is not granted to volume {volume}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_open_only_under_the_ring_and_until_expiry() {
        let mut ring = Keyring::generate();
        let t = Ticket {
            volume: 7,
            epoch: 3,
            expiry_ms: 1000,
            read_only: false,
            fill: false,
        };
        let b = t.seal(&ring);
        assert_eq!(b.len(), TICKET_LEN);
        assert_eq!(Ticket::open(&b, &ring, 999), Ok(t));
        assert_eq!(Ticket::open(&b, &ring, 1000), Err(AuthError::Expired));
        assert_eq!(Ticket::open(&[], &ring, 0), Err(AuthError::Missing));
        // Any bit flipped: refused.
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0x10;
            assert!(Ticket::open(&x, &ring, 0).is_err(), "byte {i}");
        }
        assert!(Ticket::open(&b, &Keyring::generate(), 0).is_err());
        // A rotated ring still opens tickets of the old key until it is retired.
        let id = ring.add();
        ring.promote(id).unwrap();
        assert_eq!(Ticket::open(&b, &ring, 0), Ok(t));
        let ro = Ticket {
            read_only: true,
            fill: false,
            ..t
        }
        .seal(&ring);
        assert!(Ticket::open(&ro, &ring, 0).unwrap().read_only);
        ring.retire(1).unwrap();
        assert_eq!(Ticket::open(&b, &ring, 0), Err(AuthError::UnknownKey(1)));
    }

    #[test]
    fn a_grant_names_one_chunk_of_one_volume() {
        let ring = Keyring::generate();
        let g = grant(&ring, 7, 100);
        assert_eq!(g.len(), GRANT_LEN);
        check_grant(&g, &ring, 7, 100).unwrap();
        assert!(matches!(
            check_grant(&g, &ring, 8, 100),
            Err(AuthError::WrongVolume(_))
        ));
        assert!(matches!(
            check_grant(&g, &ring, 7, 101),
            Err(AuthError::WrongVolume(_))
        ));
        assert_eq!(check_grant(&[], &ring, 7, 100), Err(AuthError::Missing));
        assert!(check_grant(&g[..10], &ring, 7, 100).is_err());
        assert!(check_grant(&g, &Keyring::generate(), 7, 100).is_err());
    }
}
