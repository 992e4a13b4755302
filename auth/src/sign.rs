//! Signed requests. A user signs (method, user, time, nonce, blake3 of the request's protobuf
//! body) with ed25519; the MDS verifies with the user's public key, refuses a time more than
//! [`MAX_SKEW_MS`] from its clock and a nonce it has seen within that window. Daemons of the
//! cluster (MDS, chunkservers) sign their requests to each other with a MAC under the cluster
//! key's primary key (`curve-peer` header).

use std::collections::{HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signature, VerifyingKey};
use parking_lot::Mutex;

use crate::AuthError;
use crate::keyring::Keyring;

/// gRPC metadata header carrying a user's credential.
pub const USER_HEADER: &str = "curve-auth";
/// gRPC metadata header carrying a cluster daemon's credential.
pub const PEER_HEADER: &str = "curve-peer";
/// How far a request's clock may be from the server's.
pub const MAX_SKEW_MS: u64 = 30_000;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn check_time(time_ms: u64, now: u64) -> Result<(), AuthError> {
    let d = now as i64 - time_ms as i64;
    if d.unsigned_abs() > MAX_SKEW_MS {
        return Err(AuthError::Skew(d));
    }
    Ok(())
}

/// A user's signature of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Who signs.
    pub user: String,
    /// When (ms since the epoch).
    pub time_ms: u64,
    /// Random, once per request.
    pub nonce: u64,
    /// ed25519 signature of [`Credential::message`].
    pub sig: [u8; 64],
}

impl Credential {
    /// The bytes signed.
    pub fn message(method: &str, user: &str, time_ms: u64, nonce: u64, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(64 + method.len() + user.len());
        m.extend_from_slice(b"curve-rs user v1\0");
        m.extend_from_slice(method.as_bytes());
        m.push(0);
        m.extend_from_slice(user.as_bytes());
        m.push(0);
        m.extend_from_slice(&time_ms.to_le_bytes());
        m.extend_from_slice(&nonce.to_le_bytes());
        m.extend_from_slice(blake3::hash(body).as_bytes());
        m
    }

    /// The header value: `user.time.nonce.signature`.
    pub fn to_header(&self) -> String {
        format!(
            "{}.{}.{:016x}.{}",
            self.user,
            self.time_ms,
            self.nonce,
            crate::hex(&self.sig)
        )
    }

    /// Parses a header value.
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        let bad = || AuthError::Malformed("expected user.time.nonce.signature".into());
        let mut it = s.split('.');
        let (Some(user), Some(time), Some(nonce), Some(sig), None) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad());
        };
        if !crate::valid_user_name(user) || nonce.len() != 16 {
            return Err(bad());
        }
        Ok(Credential {
            user: user.to_string(),
            time_ms: time.parse().map_err(|_| bad())?,
            nonce: u64::from_str_radix(nonce, 16).map_err(|_| bad())?,
            sig: crate::unhex::<64>(sig).ok_or_else(bad)?,
        })
    }

    /// Attaches the credential to a request.
    pub fn attach<T>(&self, req: &mut tonic::Request<T>) {
        if let Ok(v) = self.to_header().parse() {
            req.metadata_mut().insert(USER_HEADER, v);
        }
    }

    /// The credential of a request, if it carries one.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Option<Self>, AuthError> {
        match req.metadata().get(USER_HEADER) {
            None => Ok(None),
            Some(v) => Self::parse(
                v.to_str()
                    .map_err(|_| AuthError::Malformed("not ASCII".into()))?,
            )
            .map(Some),
        }
    }

    /// Checks the signature with `public` and the time against `now`.
    pub fn verify(
        &self,
        public: &[u8; 32],
        method: &str,
        body: &[u8],
        now: u64,
    ) -> Result<(), AuthError> {
        let key = VerifyingKey::from_bytes(public).map_err(|_| AuthError::BadSignature)?;
        let msg = Self::message(method, &self.user, self.time_ms, self.nonce, body);
        key.verify_strict(&msg, &Signature::from_bytes(&self.sig))
            .map_err(|_| AuthError::BadSignature)?;
        check_time(self.time_ms, now)
    }
}

/// Nonces seen within the skew window: a request replayed inside the window is refused, one
/// replayed after it is refused for its time.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    inner: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    set: HashMap<(String, u64), u64>,
    order: VecDeque<(u64, String, u64)>,
}

impl ReplayGuard {
    /// Records the credential's nonce; an error when it was seen.
    pub fn check(&self, c: &Credential, now: u64) -> Result<(), AuthError> {
        let mut s = self.inner.lock();
        while let Some((until, _, _)) = s.order.front() {
            if *until > now {
                break;
            }
            let (_, u, n) = s.order.pop_front().expect("front exists");
            s.set.remove(&(u, n));
        }
        let key = (c.user.clone(), c.nonce);
        if s.set.contains_key(&key) {
            return Err(AuthError::Replay);
        }
        let until = c.time_ms + 2 * MAX_SKEW_MS;
        s.set.insert(key, until);
        s.order.push_back((until, c.user.clone(), c.nonce));
        Ok(())
    }
}

fn peer_mac(key: &[u8; 32], method: &str, time_ms: u64, nonce: u64, body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"curve-rs peer v1\0");
    h.update(method.as_bytes());
    h.update(&[0]);
    h.update(&time_ms.to_le_bytes());
    h.update(&nonce.to_le_bytes());
    h.update(blake3::hash(body).as_bytes());
    *h.finalize().as_bytes()
}

/// A cluster daemon's credential for a request to `method` with `body`:
/// `keyid.time.nonce.mac` under the keyring's primary key.
pub fn peer_credential(ring: &Keyring, method: &str, body: &[u8]) -> String {
    let (id, key) = ring.primary();
    let time_ms = now_ms();
    let nonce = u64::from_le_bytes(crate::random::<8>());
    format!(
        "{id}.{time_ms}.{nonce:016x}.{}",
        crate::hex(&peer_mac(key, method, time_ms, nonce, body))
    )
}

/// Checks a cluster daemon's credential.
pub fn verify_peer(
    ring: &Keyring,
    header: Option<&str>,
    method: &str,
    body: &[u8],
    now: u64,
) -> Result<(), AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let bad = || AuthError::Malformed("expected keyid.time.nonce.mac".into());
    let mut it = header.split('.');
    let (Some(id), Some(time), Some(nonce), Some(mac), None) =
        (it.next(), it.next(), it.next(), it.next(), it.next())
    else {
        return Err(bad());
    };
    let id: u32 = id.parse().map_err(|_| bad())?;
    let time_ms: u64 = time.parse().map_err(|_| bad())?;
    if nonce.len() != 16 {
        return Err(bad());
    }
    let nonce = u64::from_str_radix(nonce, 16).map_err(|_| bad())?;
    let mac = crate::unhex::<32>(mac).ok_or_else(bad)?;
    let key = ring.get(id).ok_or(AuthError::UnknownKey(id))?;
    let want = peer_mac(key, method, time_ms, nonce, body);
    if blake3::Hash::from(want) != blake3::Hash::from(mac) {
        return Err(AuthError::BadSignature);
    }
    check_time(time_ms, now)
}

/// A request to `method` signed by the cluster (when `ring` is given; unsigned with auth off).
pub fn peer_request<T: prost::Message>(
    ring: Option<&crate::SharedKeyring>,
    method: &str,
    msg: T,
) -> tonic::Request<T> {
    let body = ring.map(|_| msg.encode_to_vec()).unwrap_or_default();
    peer_request_over(ring, method, &body, msg)
}

/// As [`peer_request`], the credential over `body` (a large message's payload, not copied
/// into an encoding of the whole message).
pub fn peer_request_over<T>(
    ring: Option<&crate::SharedKeyring>,
    method: &str,
    body: &[u8],
    msg: T,
) -> tonic::Request<T> {
    let cred = ring.map(|r| peer_credential(&r.get(), method, body));
    let mut req = tonic::Request::new(msg);
    if let Some(v) = cred.and_then(|c| c.parse().ok()) {
        req.metadata_mut().insert(PEER_HEADER, v);
    }
    req
}

/// A request to `method` signed by `key` (unsigned without a key).
pub fn user_request<T: prost::Message>(
    key: Option<&crate::UserKey>,
    method: &str,
    msg: T,
) -> tonic::Request<T> {
    let cred = key.map(|k| k.sign(method, &msg.encode_to_vec()));
    let mut req = tonic::Request::new(msg);
    if let Some(c) = cred {
        c.attach(&mut req);
    }
    req
}

/// Checks the cluster's credential on a request (`Ok` with auth off).
pub fn check_peer<T: prost::Message>(
    ring: Option<&crate::SharedKeyring>,
    req: &tonic::Request<T>,
    method: &str,
) -> Result<(), AuthError> {
    if ring.is_none() {
        return Ok(());
    }
    check_peer_over(ring, req, method, &req.get_ref().encode_to_vec())
}

/// As [`check_peer`], the credential over `body` (see [`peer_request_over`]).
pub fn check_peer_over<T>(
    ring: Option<&crate::SharedKeyring>,
    req: &tonic::Request<T>,
    method: &str,
    body: &[u8],
) -> Result<(), AuthError> {
    let Some(ring) = ring else { return Ok(()) };
    let header = req
        .metadata()
        .get(PEER_HEADER)
        .map(|v| {
            v.to_str()
                .map_err(|_| AuthError::Malformed("not ASCII".into()))
        })
        .transpose()
        .inspect_err(|e| crate::refused(e, method))?;
    verify_peer(&ring.get(), header, method, body, now_ms())
        .inspect_err(|e| crate::refused(e, method))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UserKey;

    #[test]
    fn a_signature_binds_method_body_and_time_and_is_used_once() {
        let k = UserKey::generate("alice");
        let c = k.sign("OpenFile", b"body");
        let now = now_ms();
        let parsed = Credential::parse(&c.to_header()).unwrap();
        assert_eq!(parsed, c);
        parsed
            .verify(&k.public(), "OpenFile", b"body", now)
            .unwrap();
        assert_eq!(
            parsed.verify(&k.public(), "OpenFile", b"other", now),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            parsed.verify(&k.public(), "DeleteFile", b"body", now),
            Err(AuthError::BadSignature)
        );
        let other = UserKey::generate("alice");
        assert_eq!(
            parsed.verify(&other.public(), "OpenFile", b"body", now),
            Err(AuthError::BadSignature)
        );
        assert!(matches!(
            parsed.verify(&k.public(), "OpenFile", b"body", now + MAX_SKEW_MS + 1000),
            Err(AuthError::Skew(_))
        ));
        // Another user's name on the same signature.
        let mut renamed = parsed.clone();
        renamed.user = "root".into();
        assert_eq!(
            renamed.verify(&k.public(), "OpenFile", b"body", now),
            Err(AuthError::BadSignature)
        );
        let guard = ReplayGuard::default();
        guard.check(&parsed, now).unwrap();
        assert_eq!(guard.check(&parsed, now), Err(AuthError::Replay));
        guard.check(&k.sign("OpenFile", b"body"), now).unwrap();
        // Nonces are forgotten once their time is out of the window.
        guard.check(&c, now + 3 * MAX_SKEW_MS).unwrap();
        for bad in [
            "",
            "a.b.c",
            "alice.1.2.3",
            "a/b.1.0000000000000000.00",
            "alice.x.0000000000000000.00",
        ] {
            assert!(Credential::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn peer_credentials_need_a_key_of_the_ring() {
        let ring = Keyring::generate();
        let h = peer_credential(&ring, "AppendEntries", b"x");
        let now = now_ms();
        verify_peer(&ring, Some(&h), "AppendEntries", b"x", now).unwrap();
        assert_eq!(
            verify_peer(&ring, Some(&h), "Vote", b"x", now),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify_peer(&ring, Some(&h), "AppendEntries", b"y", now),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify_peer(&ring, None, "AppendEntries", b"x", now),
            Err(AuthError::Missing)
        );
        let other = Keyring::generate();
        assert!(verify_peer(&other, Some(&h), "AppendEntries", b"x", now).is_err());
        assert!(matches!(
            verify_peer(
                &ring,
                Some(&h),
                "AppendEntries",
                b"x",
                now + 10 * MAX_SKEW_MS
            ),
            Err(AuthError::Skew(_))
        ));
        for bad in [
            "",
            "1.2.3",
            "x.1.0000000000000000.00",
            "1.1.0000000000000000.zz",
        ] {
            assert!(
                verify_peer(&ring, Some(bad), "m", b"", now).is_err(),
                "{bad:?}"
            );
        }
    }
}
