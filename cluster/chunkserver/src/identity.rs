//! The chunkserver's identity: the id and token the MDS gave it at registration, persisted
//! in `<data-dir>/chunkserver.dat` with a checksum. A damaged file is refused with a clear
//! error, never silently replaced by a new registration (that would orphan the copysets on
//! this disk).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// File name of the identity inside the data directory.
pub const IDENTITY_FILE: &str = "chunkserver.dat";

/// What registration returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Chunkserver id.
    pub id: u32,
    /// Token proving it in heartbeats.
    pub token: String,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    id: u32,
    token: String,
    crc: u32,
}

fn crc(version: u32, id: u32, token: &str) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&version.to_le_bytes());
    h.update(&id.to_le_bytes());
    h.update(token.as_bytes());
    h.finalize()
}

/// Loads the identity: `Ok(None)` when the chunkserver never registered.
pub fn load(dir: &Path) -> Result<Option<Identity>, String> {
    let path = dir.join(IDENTITY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let corrupt = |why: &str| {
        format!(
            "{} is corrupt ({why}); refusing to start rather than register again as a new \
             chunkserver: restore it or remove the data directory",
            path.display()
        )
    };
    let s: Stored = serde_json::from_slice(&bytes).map_err(|_| corrupt("not JSON"))?;
    if s.version != 1 {
        return Err(corrupt("unknown version"));
    }
    if crc(s.version, s.id, &s.token) != s.crc {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(Some(Identity {
        id: s.id,
        token: s.token,
    }))
}

/// Persists the identity (tmp + fsync + rename).
pub fn save(dir: &Path, id: &Identity) -> std::io::Result<()> {
    let s = Stored {
        version: 1,
        id: id.id,
        token: id.token.clone(),
        crc: crc(1, id.id, &id.token),
    };
    let path = dir.join(IDENTITY_FILE);
    let tmp = dir.join("chunkserver.dat.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&s).expect("serialises"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    crate::chunkfilepool::sync_dir(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), Ok(None));
        let id = Identity {
            id: 3,
            token: "t0k".into(),
        };
        save(dir.path(), &id).unwrap();
        assert_eq!(load(dir.path()), Ok(Some(id)));
        let p = dir.path().join(IDENTITY_FILE);
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"id\":3", "\"id\":4");
        std::fs::write(&p, text).unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(e.contains("corrupt") && e.contains("checksum"), "{e}");
    }
}
