//! The cluster keyring: 256-bit keys by id, one of them primary (it signs and seals); every key
//! in the ring verifies. Rotation without downtime: add a key on every daemon (the files are
//! reloaded within a second), make it primary everywhere, and retire the old one once the
//! tickets it sealed have expired.
//!
//! ```text
//! # Curve-rs cluster keyring ...
//! key = 1 9f0c...   (64 hex digits)
//! key = 2 51aa...
//! primary = 2
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::keys::{KeyError, fields};

/// A set of cluster keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: BTreeMap<u32, [u8; 32]>,
    primary: u32,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .field("primary", &self.primary)
            .finish()
    }
}

impl Keyring {
    /// A ring of one new random key (id 1).
    pub fn generate() -> Self {
        Keyring {
            keys: BTreeMap::from([(1, crate::random::<32>())]),
            primary: 1,
        }
    }

    /// The primary key and its id.
    pub fn primary(&self) -> (u32, &[u8; 32]) {
        (self.primary, &self.keys[&self.primary])
    }

    /// The key with id `id`.
    pub fn get(&self, id: u32) -> Option<&[u8; 32]> {
        self.keys.get(&id)
    }

    /// The key ids.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Adds a new random key (not primary); its id.
    pub fn add(&mut self) -> u32 {
        let id = self.keys.keys().next_back().copied().unwrap_or(0) + 1;
        self.keys.insert(id, crate::random::<32>());
        id
    }

    /// Makes `id` the primary key.
    pub fn promote(&mut self, id: u32) -> Result<(), String> {
        if !self.keys.contains_key(&id) {
            return Err(format!("no key {id} in the ring"));
        }
        self.primary = id;
        Ok(())
    }

    /// Removes a key that is not primary.
    pub fn retire(&mut self, id: u32) -> Result<(), String> {
        if id == self.primary {
            return Err(format!("key {id} is primary: promote another first"));
        }
        self.keys
            .remove(&id)
            .map(|_| ())
            .ok_or_else(|| format!("no key {id} in the ring"))
    }

    /// The file's text.
    pub fn to_file_text(&self) -> String {
        let mut s = String::from(
            "# Curve-rs cluster keyring: shared by the MDS and the chunkservers, secret to them.\n",
        );
        for (id, k) in &self.keys {
            s.push_str(&format!("key = {id} {}\n", crate::hex(k)));
        }
        s.push_str(&format!("primary = {}\n", self.primary));
        s
    }

    /// Parses a keyring file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = BTreeMap::new();
        let mut primary = None;
        for (k, v) in fields(text) {
            match k {
                "key" => {
                    let (id, hex) = v.split_once(' ').ok_or("key line: `key = ID HEX`")?;
                    let id: u32 = id.parse().map_err(|_| format!("bad key id {id:?}"))?;
                    let key = crate::unhex::<32>(hex).ok_or("a key is 64 hex digits")?;
                    if keys.insert(id, key).is_some() {
                        return Err(format!("key {id} twice"));
                    }
                }
                "primary" => primary = Some(v.parse::<u32>().map_err(|_| "bad primary id")?),
                _ => {}
            }
        }
        let primary = primary.ok_or("no `primary = ID` line")?;
        if !keys.contains_key(&primary) {
            return Err(format!("primary key {primary} is not in the ring"));
        }
        Ok(Keyring { keys, primary })
    }

    /// Reads a keyring file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        crate::keys::load_file(path, Self::parse)
    }
}

/// A keyring read from a file and reloaded when the file changes.
#[derive(Debug, Clone)]
pub struct SharedKeyring {
    ring: Arc<RwLock<Arc<Keyring>>>,
}

/// The cluster key of a daemon: none (authentication off) or a shared keyring.
pub type ClusterKey = Option<SharedKeyring>;

fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl SharedKeyring {
    /// A fixed ring (tests, tools).
    pub fn fixed(ring: Keyring) -> Self {
        SharedKeyring {
            ring: Arc::new(RwLock::new(Arc::new(ring))),
        }
    }

    /// Reads `path` and watches it: a changed file is reloaded within `every`; a file that no
    /// longer parses is logged and the ring in use kept.
    pub fn watch(path: &Path, every: Duration) -> Result<Self, KeyError> {
        let ring = Keyring::load(path)?;
        let shared = Self::fixed(ring);
        let weak = Arc::downgrade(&shared.ring);
        let watched: PathBuf = path.to_owned();
        let mut seen = stamp(path);
        std::thread::Builder::new()
            .name("keyring-watch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    let Some(ring) = weak.upgrade() else { return };
                    let now = stamp(&watched);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    match Keyring::load(&watched) {
                        Ok(new) => {
                            tracing::info!(ids = ?new.ids(), primary = new.primary, "cluster keyring reloaded");
                            *ring.write() = Arc::new(new);
                        }
                        Err(e) => tracing::error!(error = %e, "cluster keyring not reloaded"),
                    }
                }
            })
            .map_err(|source| KeyError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(shared)
    }

    /// The ring now.
    pub fn get(&self) -> Arc<Keyring> {
        self.ring.read().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_adds_promotes_and_retires() {
        let mut r = Keyring::generate();
        assert_eq!(r.primary().0, 1);
        let id = r.add();
        assert_eq!(id, 2);
        assert_eq!(r.primary().0, 1);
        assert!(r.retire(1).is_err());
        r.promote(2).unwrap();
        r.retire(1).unwrap();
        assert_eq!(r.ids(), vec![2]);
        assert!(r.promote(7).is_err());
        assert_eq!(Keyring::parse(&r.to_file_text()).unwrap(), r);
        for bad in [
            "",
            "key = 1 00\nprimary = 1",
            "primary = 1",
            &format!("key = 1 {}\nprimary = 2", "0".repeat(64)),
            &format!("key = 1 {k}\nkey = 1 {k}\nprimary = 1", k = "0".repeat(64)),
        ] {
            assert!(Keyring::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_watched_keyring_follows_its_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cluster.key");
        let mut r = Keyring::generate();
        crate::write_secret_file(&p, &r.to_file_text()).unwrap();
        let shared = SharedKeyring::watch(&p, Duration::from_millis(20)).unwrap();
        assert_eq!(*shared.get(), r);
        r.add();
        r.promote(2).unwrap();
        crate::replace_secret_file(&p, &r.to_file_text()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while *shared.get() != r && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(*shared.get(), r, "reloaded within 10 s");
        // A broken file keeps the ring in use.
        crate::replace_secret_file(&p, "garbage").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(*shared.get(), r);
    }
}
