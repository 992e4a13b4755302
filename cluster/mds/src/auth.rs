//! Who is asking: the MDS side of authentication (auth is on when the MDS has a cluster
//! keyring). Users sign every request with their key (`curve-auth` header, checked against
//! the public key the MDS stores, the clock and the replay guard); chunkservers sign theirs
//! with the cluster key (`curve-peer`). `root` is an admin only when signed with the admin key
//! given to the MDS (`--admin-key-file`); a request's `owner` field is believed only from an
//! admin.

use std::collections::BTreeMap;
use std::time::Duration;

use curve_auth::{AuthError, Credential, ReplayGuard, SharedKeyring, Ticket};
use prost::Message;

/// The MDS's authentication settings.
#[derive(Debug)]
pub struct Auth {
    /// The cluster keyring (tickets, grants, peer credentials).
    pub ring: SharedKeyring,
    /// The admin's name (`root`) and public key.
    pub admin: (String, [u8; 32]),
    /// How long a ticket works (clients renew it with every session refresh).
    pub ticket_ttl: Duration,
    replay: ReplayGuard,
}

/// Users and their public keys (store keys `u/NAME`).
pub type Users = BTreeMap<String, [u8; 32]>;

/// Store key of a user.
pub fn user_key(name: &str) -> Vec<u8> {
    format!("u/{name}").into_bytes()
}

/// The users recorded in the store.
pub fn load_users(pairs: &[(Vec<u8>, Vec<u8>)]) -> Users {
    pairs
        .iter()
        .filter_map(|(k, v)| {
            let name = std::str::from_utf8(k).ok()?.strip_prefix("u/")?;
            Some((name.to_string(), v.as_slice().try_into().ok()?))
        })
        .collect()
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Auth is off: anyone, believed as they say.
    Anyone,
    /// A user, admin or not.
    User {
        /// The name.
        name: String,
        /// Root with the admin key.
        admin: bool,
    },
    /// A daemon of the cluster (the cluster key).
    Cluster,
}

impl Caller {
    /// The owner a request acts as: its `owner` field is believed from an admin (or with auth
    /// off); a user acts as themself (an empty field or their own name).
    pub fn owner(&self, requested: &str) -> Result<String, AuthError> {
        match self {
            Caller::Anyone => Ok(requested.to_string()),
            Caller::User { name, admin } => {
                if requested.is_empty() || requested == name {
                    Ok(name.clone())
                } else if *admin {
                    Ok(requested.to_string())
                } else {
                    Err(AuthError::Forbidden(format!(
                        "signed by {name}, not by the owner {requested}"
                    )))
                }
            }
            Caller::Cluster => Err(AuthError::Forbidden(
                "the cluster key does not act as a user".into(),
            )),
        }
    }

    /// Only an admin.
    pub fn admin(&self) -> Result<(), AuthError> {
        match self {
            Caller::Anyone | Caller::User { admin: true, .. } => Ok(()),
            _ => Err(AuthError::Forbidden(
                "only an admin (root with the admin key) may do this".into(),
            )),
        }
    }

    /// Only a daemon of the cluster.
    pub fn cluster(&self) -> Result<(), AuthError> {
        match self {
            Caller::Anyone | Caller::Cluster => Ok(()),
            _ => Err(AuthError::Forbidden(
                "only daemons of the cluster (the cluster key) may do this".into(),
            )),
        }
    }
}

impl Auth {
    /// Settings from a keyring and the admin's public key.
    pub fn new(ring: SharedKeyring, admin: (String, [u8; 32]), ticket_ttl: Duration) -> Self {
        Auth {
            ring,
            admin,
            ticket_ttl,
            replay: ReplayGuard::default(),
        }
    }

    /// Checks a request's credential; `users` are the known users.
    pub fn caller<T: Message>(
        &self,
        users: &Users,
        req: &tonic::Request<T>,
        method: &str,
    ) -> Result<Caller, AuthError> {
        let now = curve_auth::now_ms();
        if let Some(h) = req.metadata().get(curve_auth::PEER_HEADER) {
            let h = h
                .to_str()
                .map_err(|_| AuthError::Malformed("not ASCII".into()))?;
            curve_auth::verify_peer(
                &self.ring.get(),
                Some(h),
                method,
                &req.get_ref().encode_to_vec(),
                now,
            )?;
            return Ok(Caller::Cluster);
        }
        let c = Credential::of(req)?.ok_or(AuthError::Missing)?;
        let (public, admin) = if c.user == self.admin.0 {
            (self.admin.1, true)
        } else {
            (
                *users
                    .get(&c.user)
                    .ok_or_else(|| AuthError::UnknownUser(c.user.clone()))?,
                false,
            )
        };
        c.verify(&public, method, &req.get_ref().encode_to_vec(), now)?;
        self.replay.check(&c, now)?;
        Ok(Caller::User {
            name: c.user,
            admin,
        })
    }

    /// A sealed ticket for a session of `volume` at `epoch`.
    pub fn ticket(&self, volume: u64, epoch: u64) -> Vec<u8> {
        self.ticket_for(volume, epoch, false, false)
    }

    /// A sealed ticket of `volume` at `epoch`: read-only (snapshots, a clone's source), and
    /// allowed to fill a clone's chunks (a flatten).
    pub fn ticket_for(&self, volume: u64, epoch: u64, read_only: bool, fill: bool) -> Vec<u8> {
        Ticket {
            volume,
            epoch,
            expiry_ms: curve_auth::now_ms() + self.ticket_ttl.as_millis() as u64,
            read_only,
            fill,
        }
        .seal(&self.ring.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        body: curve_proto::mds::PathRequest,
        cred: Option<Credential>,
    ) -> tonic::Request<curve_proto::mds::PathRequest> {
        let mut r = tonic::Request::new(body);
        if let Some(c) = cred {
            c.attach(&mut r);
        }
        r
    }

    #[test]
    fn callers_are_who_their_keys_say_and_owners_are_not_believed() {
        let root = curve_auth::UserKey::generate("root");
        let alice = curve_auth::UserKey::generate("alice");
        let ring = curve_auth::Keyring::generate();
        let auth = Auth::new(
            SharedKeyring::fixed(ring.clone()),
            ("root".into(), root.public()),
            Duration::from_secs(60),
        );
        let users = Users::from([("alice".to_string(), alice.public())]);
        let body = curve_proto::mds::PathRequest {
            path: "/v".into(),
            owner: String::new(),
        };
        let sig = |k: &curve_auth::UserKey| k.sign("StatFile", &body.encode_to_vec());
        let c = auth
            .caller(
                &users,
                &request(body.clone(), Some(sig(&alice))),
                "StatFile",
            )
            .unwrap();
        assert_eq!(
            c,
            Caller::User {
                name: "alice".into(),
                admin: false
            }
        );
        assert_eq!(c.owner("").unwrap(), "alice");
        assert!(c.owner("bob").is_err());
        assert!(c.admin().is_err() && c.cluster().is_err());
        let r = auth
            .caller(&users, &request(body.clone(), Some(sig(&root))), "StatFile")
            .unwrap();
        assert_eq!(r.owner("bob").unwrap(), "bob");
        r.admin().unwrap();
        // No credential, a replay, another method, a user signing as root, an unknown user.
        assert_eq!(
            auth.caller(&users, &request(body.clone(), None), "StatFile"),
            Err(AuthError::Missing)
        );
        let once = sig(&alice);
        auth.caller(
            &users,
            &request(body.clone(), Some(once.clone())),
            "StatFile",
        )
        .unwrap();
        assert_eq!(
            auth.caller(&users, &request(body.clone(), Some(once)), "StatFile"),
            Err(AuthError::Replay)
        );
        assert_eq!(
            auth.caller(
                &users,
                &request(body.clone(), Some(sig(&alice))),
                "DeleteFile"
            ),
            Err(AuthError::BadSignature)
        );
        let fake_root = curve_auth::UserKey::generate("root");
        assert_eq!(
            auth.caller(
                &users,
                &request(body.clone(), Some(sig(&fake_root))),
                "StatFile"
            ),
            Err(AuthError::BadSignature)
        );
        let bob = curve_auth::UserKey::generate("bob");
        assert!(matches!(
            auth.caller(&users, &request(body.clone(), Some(sig(&bob))), "StatFile"),
            Err(AuthError::UnknownUser(_))
        ));
        // The cluster key.
        let mut r = request(body.clone(), None);
        r.metadata_mut().insert(
            curve_auth::PEER_HEADER,
            curve_auth::peer_credential(&ring, "Heartbeat", &body.encode_to_vec())
                .parse()
                .unwrap(),
        );
        let c = auth.caller(&users, &r, "Heartbeat").unwrap();
        assert_eq!(c, Caller::Cluster);
        assert!(c.owner("").is_err());
        assert!(auth.caller(&users, &r, "Register").is_err());
        assert_eq!(Caller::Anyone.owner("x").unwrap(), "x");
    }
}
