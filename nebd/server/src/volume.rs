//! Volume specifications (`mem:1G`, `file:/path`, `file:/path?direct`) and opening them
//! as block devices: the part of part2's File Manager that knows the backends.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use curve_blockdev::{BlockDevice, FileDevice, FileOptions, IoError, MemDevice, parse_size};

/// What a volume is and where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSpec {
    /// RAM of this size, preallocated.
    Mem {
        /// Size in bytes.
        size: u64,
    },
    /// A local file or block device.
    File {
        /// Path.
        path: PathBuf,
        /// Open with O_DIRECT.
        direct: bool,
    },
}

/// Why a volume could not be parsed or opened.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The specification does not parse.
    #[error("bad volume {spec:?}: {reason}")]
    Spec {
        /// What was given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// The backend refused to open it.
    #[error("cannot open volume {spec}")]
    Open {
        /// The volume.
        spec: String,
        /// Cause.
        #[source]
        source: IoError,
    },
}

impl FromStr for VolumeSpec {
    type Err = VolumeError;
    fn from_str(s: &str) -> Result<Self, VolumeError> {
        let bad = |reason: String| VolumeError::Spec {
            spec: s.to_owned(),
            reason,
        };
        if let Some(size) = s.strip_prefix("mem:") {
            let size = parse_size(size).map_err(bad)?;
            if size == 0 {
                return Err(bad("size must be above 0".into()));
            }
            Ok(VolumeSpec::Mem { size })
        } else if let Some(path) = s.strip_prefix("file:") {
            let (path, direct) = match path.strip_suffix("?direct") {
                Some(p) => (p, true),
                None => (path, false),
            };
            if path.is_empty() {
                return Err(bad("file: needs a path".into()));
            }
            Ok(VolumeSpec::File {
                path: path.into(),
                direct,
            })
        } else {
            Err(bad(
                "expected mem:SIZE (e.g. mem:1G) or file:PATH[?direct]".into()
            ))
        }
    }
}

impl fmt::Display for VolumeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VolumeSpec::Mem { size } => write!(f, "mem:{size}"),
            VolumeSpec::File { path, direct } => {
                write!(
                    f,
                    "file:{}{}",
                    path.display(),
                    if *direct { "?direct" } else { "" }
                )
            }
        }
    }
}

impl VolumeSpec {
    /// Opens the volume.
    pub fn open(&self, read_only: bool) -> Result<Arc<dyn BlockDevice>, VolumeError> {
        let opened: Result<Arc<dyn BlockDevice>, IoError> = match self {
            VolumeSpec::Mem { size } => MemDevice::new(*size).map(|d| Arc::new(d) as _),
            VolumeSpec::File { path, direct } => FileDevice::open(
                path,
                FileOptions {
                    direct: *direct,
                    read_only,
                },
            )
            .map(|d| Arc::new(d) as _),
        };
        opened.map_err(|source| VolumeError::Open {
            spec: self.to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let v: VolumeSpec = "mem:1G".parse().unwrap();
        assert_eq!(v, VolumeSpec::Mem { size: 1 << 30 });
        assert_eq!(v.to_string(), "mem:1073741824");
        let f: VolumeSpec = "file:/tmp/a?direct".parse().unwrap();
        assert_eq!(
            f,
            VolumeSpec::File {
                path: "/tmp/a".into(),
                direct: true
            }
        );
        assert_eq!(f.to_string(), "file:/tmp/a?direct");
        for bad in ["mem:", "mem:0", "mem:1Q", "file:", "rbd:x", ""] {
            assert!(bad.parse::<VolumeSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn open_errors_are_clear() {
        let v: VolumeSpec = "file:/nonexistent/vol".parse().unwrap();
        let e = v.open(false).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vol"));
    }
}
