//! User keys: an ed25519 key pair per user. The secret stays in the user's key file; the MDS
//! stores only the public key (a one-way function of the secret), so its store is no key.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey};

use crate::sign::Credential;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a key file of this kind.
    #[error("{path}: {why}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Whether `name` may name a user: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A user's key: the name and the ed25519 signing key.
#[derive(Clone)]
pub struct UserKey {
    /// The user.
    pub user: String,
    signing: SigningKey,
}

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserKey")
            .field("user", &self.user)
            .field("public", &crate::hex(&self.public()))
            .finish_non_exhaustive()
    }
}

/// `key = value` lines of a key file (`#` comments).
pub(crate) fn fields(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
}

impl UserKey {
    /// A new random key for `user`.
    pub fn generate(user: &str) -> Self {
        UserKey {
            user: user.to_string(),
            signing: SigningKey::from_bytes(&crate::random::<32>()),
        }
    }

    /// The public key the MDS records for the user.
    pub fn public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The key file's text.
    pub fn to_file_text(&self) -> String {
        format!(
            "# Curve-rs user key. Keep it secret: whoever reads it acts as {user}.\n\
             user = {user}\nsecret = {secret}\npublic = {public}\n",
            user = self.user,
            secret = crate::hex(self.signing.as_bytes()),
            public = crate::hex(&self.public()),
        )
    }

    /// Parses a key file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (mut user, mut secret) = (None, None);
        for (k, v) in fields(text) {
            match k {
                "user" => user = Some(v.to_string()),
                "secret" => {
                    secret = Some(crate::unhex::<32>(v).ok_or("secret is not 64 hex digits")?)
                }
                _ => {}
            }
        }
        let user = user.ok_or("no `user = NAME` line")?;
        if !valid_user_name(&user) {
            return Err(format!("bad user name {user:?}"));
        }
        let secret = secret.ok_or("no `secret = HEX` line (a public key file cannot sign)")?;
        Ok(UserKey {
            user,
            signing: SigningKey::from_bytes(&secret),
        })
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        load_file(path, Self::parse)
    }

    /// Writes a new key file (0600, never over an existing file).
    pub fn save_new(&self, path: &Path) -> std::io::Result<()> {
        crate::write_secret_file(path, &self.to_file_text())
    }

    /// Signs a request to `method` with body `body`.
    pub fn sign(&self, method: &str, body: &[u8]) -> Credential {
        let time_ms = crate::now_ms();
        let nonce = u64::from_le_bytes(crate::random::<8>());
        let msg = Credential::message(method, &self.user, time_ms, nonce, body);
        Credential {
            user: self.user.clone(),
            time_ms,
            nonce,
            sig: self.signing.sign(&msg).to_bytes(),
        }
    }
}

/// Reads `path` and parses it with `parse`, naming the file in either error.
pub(crate) fn load_file<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|why| KeyError::Format {
        path: path.to_owned(),
        why,
    })
}

/// The public key in a key file (`public = HEX`, or derived from `secret`), with the user.
pub fn public_from_file(path: &Path) -> Result<(String, [u8; 32]), KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })?;
    if let Ok(k) = UserKey::parse(&text) {
        return Ok((k.user.clone(), k.public()));
    }
    let bad = |why: &str| KeyError::Format {
        path: path.to_owned(),
        why: why.into(),
    };
    let (mut user, mut public) = (None, None);
    for (k, v) in fields(&text) {
        match k {
            "user" => user = Some(v.to_string()),
            "public" => public = crate::unhex::<32>(v),
            _ => {}
        }
    }
    Ok((
        user.ok_or_else(|| bad("no `user = NAME` line"))?,
        public.ok_or_else(|| bad("no `public = HEX` line"))?,
    ))
}

/// The key a client uses: `--key-file PATH` when given, else `$CURVE_KEY_FILE`, else none.
pub fn key_from_env(flag: Option<&Path>) -> Result<Option<UserKey>, KeyError> {
    let path = match flag {
        Some(p) => Some(p.to_owned()),
        None => std::env::var_os("CURVE_KEY_FILE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
    };
    path.map(|p| UserKey::load(&p)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let k = UserKey::generate("alice");
        let p = d.path().join("alice.key");
        k.save_new(&p).unwrap();
        let back = UserKey::load(&p).unwrap();
        assert_eq!(back.user, "alice");
        assert_eq!(back.public(), k.public());
        assert_eq!(public_from_file(&p).unwrap(), ("alice".into(), k.public()));
        // A public-only file names the key but cannot sign.
        let pubfile = d.path().join("alice.pub");
        std::fs::write(
            &pubfile,
            format!("user = alice\npublic = {}\n", crate::hex(&k.public())),
        )
        .unwrap();
        assert_eq!(public_from_file(&pubfile).unwrap().1, k.public());
        assert!(
            UserKey::load(&pubfile)
                .unwrap_err()
                .to_string()
                .contains("cannot sign")
        );
        for bad in ["", "user = a b\nsecret = 00", "user = x\nsecret = 1234"] {
            assert!(UserKey::parse(bad).is_err(), "{bad:?}");
        }
        assert!(UserKey::load(&d.path().join("missing")).is_err());
        assert!(valid_user_name("root") && valid_user_name("a-b_9"));
        assert!(
            !valid_user_name("") && !valid_user_name("a/b") && !valid_user_name(&"x".repeat(65))
        );
    }
}
