//! Authentication and authorization of Curve-rs: who may ask the MDS what, and who may touch
//! which chunk.
//!
//! ```text
//!  user key (ed25519, DIR/keys/NAME.key, 0600) ── signs every MDS request ─┐ curve-auth header:
//!                                                  (method, time, nonce,   │ user.time.nonce.sig
//!                                                   blake3 of the body)    ▼
//!  MDS: users' public keys in its store; checks the signature, the clock skew, the nonce (replay)
//!   │ OpenFile / RefreshSession ── Ticket {volume, epoch, expiry, read-only} MAC'd with the
//!   │ GetOrAllocateSegment     ── Grant  {volume, chunk}                    cluster key
//!   ▼
//!  client ── ChunkRequest {ticket, grant} ──► chunkserver: both MACs, expiry, the volume's epoch
//!                                             floor; epoch and volume taken from the ticket
//!  MDS ⇄ chunkservers ⇄ chunkservers: curve-peer header, a MAC with the cluster key
//! ```
//!
//! The cluster keyring (`cluster.key`) is shared by the MDS and the chunkservers; it holds
//! several keys so that a new one can be added everywhere, then made primary (the one that
//! signs), then the old one retired, without downtime ([`SharedKeyring`] reloads on change).

mod keyring;
mod keys;
mod sign;
mod ticket;
pub mod tls;

pub use keyring::{ClusterKey, Keyring, SharedKeyring};
pub use keys::{KeyError, UserKey, key_from_env, public_from_file, valid_user_name};
pub use sign::{
    Credential, MAX_SKEW_MS, PEER_HEADER, ReplayGuard, USER_HEADER, check_peer, check_peer_over,
    now_ms, peer_credential, peer_request, peer_request_over, user_request, verify_peer,
};
pub use ticket::{GRANT_LEN, TICKET_LEN, Ticket, check_grant, grant};

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a request was refused. Stable labels (`reason` in the daemons' metrics).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential where one is required.
    #[error("no credential: the request is not signed (give --key-file or CURVE_KEY_FILE)")]
    Missing,
    /// A credential that does not parse.
    #[error("malformed credential: {0}")]
    Malformed(String),
    /// A user the MDS does not know.
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    /// A key id not in the keyring.
    #[error("unknown cluster key id {0}")]
    UnknownKey(u32),
    /// The signature or MAC does not match.
    #[error("bad signature")]
    BadSignature,
    /// The request's clock is too far from ours.
    #[error("request time {0} ms away from the server's clock (more than 30 s)")]
    Skew(i64),
    /// A nonce seen before.
    #[error("replayed request")]
    Replay,
    /// A ticket past its expiry.
    #[error("ticket expired")]
    Expired,
    /// A ticket of a session older than the volume's current one (reopened since).
    #[error("ticket of epoch {0}: the volume was reopened since")]
    StaleEpoch(u64),
    /// A ticket or grant of another volume or chunk.
    #[error("{0}")]
    WrongVolume(String),
    /// A write with a read-only ticket.
    #[error("read-only ticket")]
    ReadOnly,
    /// An operation only an admin (root with root's key) or the cluster may do.
    #[error("{0}")]
    Forbidden(String),
}

impl AuthError {
    /// The metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::UnknownUser(_) => "unknown_user",
            AuthError::UnknownKey(_) => "unknown_key",
            AuthError::BadSignature => "bad_signature",
            AuthError::Skew(_) => "clock_skew",
            AuthError::Replay => "replay",
            AuthError::Expired => "expired",
            AuthError::StaleEpoch(_) => "stale_epoch",
            AuthError::WrongVolume(_) => "wrong_volume",
            AuthError::ReadOnly => "read_only",
            AuthError::Forbidden(_) => "forbidden",
        }
    }
}

const REASONS: [&str; 12] = [
    "missing",
    "malformed",
    "unknown_user",
    "unknown_key",
    "bad_signature",
    "clock_skew",
    "replay",
    "expired",
    "stale_epoch",
    "wrong_volume",
    "read_only",
    "forbidden",
];

static REFUSED: [AtomicU64; 12] = [const { AtomicU64::new(0) }; 12];

/// Counts a refusal (and logs it): what the daemons export as `auth_refused_total{reason}`.
pub fn refused(e: &AuthError, what: &str) {
    let i = REASONS
        .iter()
        .position(|r| *r == e.reason())
        .expect("every reason listed");
    REFUSED[i].fetch_add(1, Ordering::Relaxed);
    tracing::warn!(reason = e.reason(), error = %e, what, "request refused");
}

/// Refusals so far, by reason.
pub fn refusals() -> Vec<(&'static str, u64)> {
    REASONS
        .iter()
        .zip(REFUSED.iter())
        .map(|(r, c)| (*r, c.load(Ordering::Relaxed)))
        .collect()
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Parses hex of exactly `N` bytes.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() != N * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Random bytes from the OS generator.
pub fn random<const N: usize>() -> [u8; N] {
    use rand::RngCore;
    // ThreadRng: a CSPRNG seeded from the OS.
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

/// Writes a new secret file: created 0600 (never readable by others, not even for a moment),
/// refusing to replace an existing file.
pub fn write_secret_file(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Replaces a secret file atomically (a 0600 temporary renamed over it).
pub fn replace_secret_file(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    write_secret_file(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_round_trips_and_refuses_bad_input() {
        let b = super::random::<32>();
        assert_eq!(super::unhex::<32>(&super::hex(&b)), Some(b));
        assert_eq!(super::unhex::<2>("abc"), None);
        assert_eq!(super::unhex::<2>("zzzz"), None);
        assert_eq!(super::unhex::<2>("éa"), None);
    }

    #[test]
    fn secret_files_are_0600_and_never_replaced_by_create() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        super::write_secret_file(&p, "x").unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(super::write_secret_file(&p, "y").is_err());
        super::replace_secret_file(&p, "z").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "z");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

#[cfg(test)]
mod cost {
    /// What authentication adds to one 4 KiB write, in CPU time: the chunkserver opening the
    /// ticket and checking the grant; the leader signing an AppendEntries of that write and a
    /// follower verifying it (twice: two followers); a user signing an MDS request and the MDS
    /// verifying it (not per I/O: opens, refreshes, segment allocations).
    /// `cargo test -p curve-auth --release --lib -- --ignored --nocapture auth_cost`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn auth_cost() {
        use std::time::Instant;
        let ring = crate::Keyring::generate();
        let now = crate::now_ms();
        let ticket = crate::Ticket {
            volume: 7,
            epoch: 3,
            expiry_ms: now + 60_000,
            read_only: false,
            fill: false,
        }
        .seal(&ring);
        let grant = crate::grant(&ring, 7, 100);
        let n = 200_000;
        let t = Instant::now();
        for _ in 0..n {
            let t = crate::Ticket::open(std::hint::black_box(&ticket), &ring, now).unwrap();
            crate::check_grant(&grant, &ring, t.volume, 100).unwrap();
        }
        let chunk = t.elapsed().as_nanos() as f64 / n as f64;
        let payload = vec![0x5au8; 4096 + 200];
        let n = 50_000;
        let t = Instant::now();
        for _ in 0..n {
            let h = crate::peer_credential(&ring, "AppendEntries/1/2", &payload);
            crate::verify_peer(&ring, Some(&h), "AppendEntries/1/2", &payload, now).unwrap();
        }
        let raft = t.elapsed().as_nanos() as f64 / n as f64;
        let key = crate::UserKey::generate("alice");
        let body = vec![1u8; 64];
        let n = 2_000;
        let t = Instant::now();
        for _ in 0..n {
            let c = key.sign("OpenFile", &body);
            c.verify(&key.public(), "OpenFile", &body, now).unwrap();
        }
        let mds = t.elapsed().as_nanos() as f64 / n as f64;
        println!(
            "ticket + grant check: {chunk:.0} ns per chunk request\n\
             raft MAC (sign + verify, 4 KiB entry): {raft:.0} ns per AppendEntries and follower\n\
             user signature (sign + verify): {:.1} µs per MDS request\n\
             per 4 KiB write (one check, two followers): {:.1} µs",
            mds / 1000.0,
            (chunk + 2.0 * raft) / 1000.0
        );
    }
}
