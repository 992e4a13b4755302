//! The control protocol between the `curve` CLI and nebd-server: one JSON object per line
//! on the Unix socket `<run-dir>/control.sock`, one response line per request.
//!
//! ```text
//! -> {"op":"add_export","name":"vol0","volume":"mem:1G","frontend":{"type":"nbd","address":"unix:/run/curve/nbd.sock"},"read_only":false}
//! <- {"ok":true,"exports":[{"name":"vol0",...,"uri":"nbd+unix:///vol0?socket=/run/curve/nbd.sock"}]}
//! -> {"op":"list_exports"}
//! -> {"op":"remove_export","name":"vol0"}
//! <- {"ok":false,"error":"no export named \"vol0\""}
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The run directory when none is given.
pub const DEFAULT_RUN_DIR: &str = "/run/curve";

/// File name of the control socket inside the run directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// File name of the lock + pid file inside the run directory.
pub const PID_FILE: &str = "nebd-server.pid";
/// Longest request line accepted.
pub const MAX_LINE: usize = 1 << 20;

/// Path of the control socket of the server using `run_dir`.
pub fn control_socket(run_dir: &Path) -> PathBuf {
    run_dir.join(CONTROL_SOCKET)
}

/// Default `io_timeout` of a kernel NBD device, in seconds.
pub const DEFAULT_IO_TIMEOUT: u32 = 30;
/// Default `reattach_timeout` of a kernel NBD device, in seconds.
pub const DEFAULT_REATTACH_TIMEOUT: u32 = 120;

fn default_io_timeout() -> u32 {
    DEFAULT_IO_TIMEOUT
}

fn default_reattach_timeout() -> u32 {
    DEFAULT_REATTACH_TIMEOUT
}

/// How an export reaches its consumers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frontend {
    /// NBD at `unix:PATH` or `tcp:HOST:PORT`.
    Nbd {
        /// Listen address.
        address: String,
    },
    /// vhost-user-blk on a Unix socket (QEMU: `-chardev socket,path=PATH`).
    VhostUserBlk {
        /// Socket path.
        path: String,
        /// Queues offered.
        queues: u16,
    },
    /// A ublk block device `/dev/ublkbN` (kernel `ublk_drv`).
    Ublk {
        /// Hardware queues (one thread each).
        queues: u16,
        /// Requests in flight per queue.
        queue_depth: u16,
        /// The device number N, once created: a restarted part2 recovers this device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_id: Option<u32>,
    },
    /// A kernel NBD device `/dev/nbdN` that part2 attaches through netlink and serves over
    /// socket pairs.
    NbdDevice {
        /// `/dev/nbdN` asked for (none: the first free one); the device in use once attached.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
        /// Connections (socket pairs).
        connections: u16,
        /// Seconds after which the kernel resends a request (0: never).
        #[serde(default = "default_io_timeout")]
        io_timeout: u32,
        /// Seconds the kernel holds I/O while no part2 serves the device.
        #[serde(default = "default_reattach_timeout")]
        reattach_timeout: u32,
        /// Backend identifier given to the kernel (`/sys/block/nbdN/backend`): a restarted
        /// part2 takes back only devices that carry it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cookie: Option<String>,
    },
}

impl Frontend {
    /// Its `type` tag: `nbd`, `vhost_user_blk`, `ublk` or `nbd_device`.
    pub fn kind(&self) -> &'static str {
        match self {
            Frontend::Nbd { .. } => "nbd",
            Frontend::VhostUserBlk { .. } => "vhost_user_blk",
            Frontend::Ublk { .. } => "ublk",
            Frontend::NbdDevice { .. } => "nbd_device",
        }
    }
}

/// An export as requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSpec {
    /// Unique name (also the NBD export name).
    pub name: String,
    /// Volume specification, e.g. `mem:1G` or `file:/path`.
    pub volume: String,
    /// Frontend.
    pub frontend: Frontend,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
}

/// An export as it is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStatus {
    /// The request it was created from (volume in canonical form).
    #[serde(flatten)]
    pub spec: ExportSpec,
    /// Where consumers attach, as a URI they accept.
    pub uri: String,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Consumers attached now.
    pub connections: usize,
    /// The block device a ublk or kernel NBD export serves (`/dev/ublkbN`, `/dev/nbdN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Status of one file part1 has open, for listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStatus {
    /// Handle.
    pub fd: u32,
    /// Volume specification.
    pub name: String,
    /// Whether the volume is open now (false after a heartbeat timeout).
    pub open: bool,
}

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Open a volume and export it.
    AddExport(ExportSpec),
    /// Withdraw an export and close its volume.
    RemoveExport {
        /// Export name.
        name: String,
    },
    /// Every export.
    ListExports,
    /// Every file part1 has open.
    ListFiles,
    /// Live upgrade: start `binary` (this server's own by default) with `--takeover` and
    /// hand everything over to it; answered once the new server serves (then this one exits).
    Upgrade {
        /// The new nebd-server binary.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<String>,
        /// How long the new one may take to start and take over, ms.
        timeout_ms: u64,
    },
    /// Sent by a new nebd-server (`--takeover`): the connection turns into the hand-over
    /// wire (see nebd-server's `handover` module).
    Takeover,
}

/// What a live upgrade did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// The server that handed over (and exited).
    pub old_pid: u32,
    /// The server that serves now.
    pub new_pid: u32,
    /// From the old one's pause to the new one serving, µs.
    pub pause_us: u64,
    /// Exports handed over (ublk devices are recovered by the new one afterwards).
    pub exports: usize,
    /// NBD connections, kernel NBD connections and vhost-user front-ends handed over.
    pub connections: usize,
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Exports the request concerns (added one, or all for a listing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<ExportStatus>,
    /// Files part1 has open (for a file listing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileStatus>,
    /// What an upgrade did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeReport>,
}

impl Response {
    /// A success carrying `exports`.
    pub fn ok(exports: Vec<ExportStatus>) -> Self {
        Response {
            ok: true,
            exports,
            ..Default::default()
        }
    }

    /// A failure.
    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(message.into()),
            ..Default::default()
        }
    }
}

/// An error with its causes, for messages that go back to the CLI.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Parses one request line. The error is the message to send back.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
}

/// A blocking client of the control socket, for the CLI and tests.
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    socket: PathBuf,
}

/// Why the control socket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there.
    #[error("cannot reach nebd-server at {path} (is it running with this run dir?)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("control connection to {path} failed")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server answered something that is not a response.
    #[error("nebd-server sent a malformed response: {0}")]
    Malformed(String),
}

impl ControlClient {
    /// Connects to the server of `run_dir`.
    pub fn connect(run_dir: &Path) -> Result<Self, ClientError> {
        let socket = control_socket(run_dir);
        let stream = UnixStream::connect(&socket).map_err(|source| ClientError::Connect {
            path: socket.clone(),
            source,
        })?;
        let timeout = Some(Duration::from_secs(60));
        let _ = stream.set_read_timeout(timeout);
        let _ = stream.set_write_timeout(timeout);
        Ok(ControlClient {
            reader: BufReader::new(stream),
            socket,
        })
    }

    /// Sends a request and waits for its response.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            path: self.socket.clone(),
            source,
        };
        let mut line = serde_json::to_string(request).expect("requests serialise");
        line.push('\n');
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(io)?;
        let mut answer = String::new();
        let n = self
            .reader
            .read_line(&mut answer)
            .map_err(|source| ClientError::Io {
                path: self.socket.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Malformed("connection closed".into()));
        }
        serde_json::from_str(&answer).map_err(|e| ClientError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms() {
        let r = Request::AddExport(ExportSpec {
            name: "v".into(),
            volume: "mem:1G".into(),
            frontend: Frontend::Nbd {
                address: "unix:/x".into(),
            },
            read_only: false,
        });
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"op":"add_export","name":"v","volume":"mem:1G","frontend":{"type":"nbd","address":"unix:/x"},"read_only":false}"#
        );
        assert_eq!(parse_request(&line), Ok(r));
        assert_eq!(
            parse_request(r#"{"op":"list_exports"}"#),
            Ok(Request::ListExports)
        );
        assert!(
            parse_request("garbage")
                .unwrap_err()
                .starts_with("bad request")
        );
        assert!(parse_request(r#"{"op":"explode"}"#).is_err());
        let resp = serde_json::to_string(&Response::error("nope")).unwrap();
        assert_eq!(resp, r#"{"ok":false,"error":"nope"}"#);
    }
}
