//! The Metafile Manager: what part2 must find again after a restart (the files part1 opened,
//! with their fds, and the exports), persisted in `<run-dir>/nebd-server.meta`.
//!
//! ```text
//! {"version":1,"files":[{"fd":1,"name":"file:/vol.img"}],"exports":[{...ExportSpec...}]}
//! crc32:1a2b3c4d
//! ```
//!
//! Written to a temporary file, fsynced, renamed over the old one and the directory fsynced,
//! so a crash leaves either the old or the new state. A file whose checksum does not match is
//! refused with a clear error rather than silently replaced.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::control::ExportSpec;

/// File name of the metafile inside the run directory.
pub const METAFILE: &str = "nebd-server.meta";

/// A file part1 opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Handle part1 uses.
    pub fd: u32,
    /// Volume specification it was opened with.
    pub name: String,
}

/// Everything the metafile holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Format version (1).
    #[serde(default = "version")]
    pub version: u32,
    /// Open files, by fd.
    #[serde(default)]
    pub files: Vec<FileRecord>,
    /// Exports, in creation order.
    #[serde(default)]
    pub exports: Vec<ExportSpec>,
}

fn version() -> u32 {
    1
}

/// Why the metafile cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MetafileError {
    /// It could not be read.
    #[error("cannot read metafile {path}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Its content is damaged.
    #[error(
        "metafile {path} is corrupt ({reason}); move it away to start without the previous state"
    )]
    Corrupt {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Encodes a state with its checksum line.
pub fn encode(state: &MetaState) -> Vec<u8> {
    let mut body = serde_json::to_vec(state).expect("state serialises");
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(format!("\ncrc32:{crc:08x}\n").as_bytes());
    body
}

/// Decodes and verifies a metafile's bytes.
pub fn decode(bytes: &[u8]) -> Result<MetaState, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let text = text
        .strip_suffix('\n')
        .ok_or("truncated (no final newline)")?;
    let (body, crc_line) = text.rsplit_once('\n').ok_or("no checksum line")?;
    let want = crc_line
        .strip_prefix("crc32:")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or("malformed checksum line")?;
    let got = crc32fast::hash(body.as_bytes());
    if got != want {
        return Err(format!("checksum {got:08x} does not match {want:08x}"));
    }
    let state: MetaState = serde_json::from_str(body).map_err(|e| format!("bad JSON: {e}"))?;
    if state.version != 1 {
        return Err(format!("unknown version {}", state.version));
    }
    Ok(state)
}

/// The metafile of one run directory, with the state last written.
#[derive(Debug)]
pub struct Metafile {
    path: PathBuf,
    state: Mutex<MetaState>,
}

impl Metafile {
    /// Loads the metafile of `run_dir`; a missing one is an empty state.
    pub fn open(run_dir: &Path) -> Result<Self, MetafileError> {
        let path = run_dir.join(METAFILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => decode(&bytes).map_err(|reason| MetafileError::Corrupt {
                path: path.clone(),
                reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => MetaState {
                version: 1,
                ..Default::default()
            },
            Err(source) => return Err(MetafileError::Read { path, source }),
        };
        Ok(Metafile {
            path,
            state: Mutex::new(state),
        })
    }

    /// The state as loaded or last updated.
    pub fn state(&self) -> MetaState {
        self.state.lock().clone()
    }

    /// Changes the state and persists it before returning.
    pub fn update(&self, f: impl FnOnce(&mut MetaState)) -> std::io::Result<()> {
        let mut state = self.state.lock();
        let mut next = state.clone();
        f(&mut next);
        if next == *state {
            return Ok(());
        }
        write_atomically(&self.path, &encode(&next))?;
        *state = next;
        Ok(())
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("meta.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Frontend;

    fn sample() -> MetaState {
        MetaState {
            version: 1,
            files: vec![FileRecord {
                fd: 3,
                name: "file:/x".into(),
            }],
            exports: vec![ExportSpec {
                name: "v".into(),
                volume: "mem:1024".into(),
                frontend: Frontend::Nbd {
                    address: "unix:/s".into(),
                },
                read_only: false,
            }],
        }
    }

    #[test]
    fn roundtrip_and_corruption() {
        let s = sample();
        let bytes = encode(&s);
        assert_eq!(decode(&bytes), Ok(s));
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        assert!(decode(&bad).unwrap_err().contains("checksum"));
        assert!(decode(&bytes[..bytes.len() - 3]).is_err());
        assert!(decode(b"").is_err());
    }

    #[test]
    fn persists_and_refuses_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metafile::open(dir.path()).unwrap();
        assert!(m.state().files.is_empty());
        m.update(|s| *s = sample()).unwrap();
        assert_eq!(Metafile::open(dir.path()).unwrap().state(), sample());
        std::fs::write(
            dir.path().join(METAFILE),
            b"{\"version\":1}\ncrc32:00000000\n",
        )
        .unwrap();
        let e = Metafile::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("move it away"), "{e}");
    }
}
