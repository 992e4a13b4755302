//! The NBD driver: our own client (fixed newstyle, OPT_GO with a block-size request, simple
//! replies), one connection per job (multi-conn), requests pipelined up to the queue depth.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use curve_nbd::proto::{self, RequestHeader, cmd, opt, rep};

use crate::engine::{Completion, Driver, Engine};
use crate::workload::Op;

/// Where the export is.
#[derive(Debug, Clone)]
pub struct NbdTarget {
    /// `unix:PATH` or `tcp:HOST:PORT`.
    pub addr: String,
    /// Export name.
    pub name: String,
}

impl NbdTarget {
    /// From `nbd+unix:///NAME?socket=PATH` or `nbd://HOST[:PORT]/NAME`.
    pub fn parse(uri: &str) -> Result<Self, String> {
        if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
            let (name, q) = rest.split_once('?').unwrap_or((rest, ""));
            let socket = q
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| format!("{uri}: no socket= in the query"))?;
            return Ok(NbdTarget {
                addr: format!("unix:{socket}"),
                name: name.to_string(),
            });
        }
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let (host, name) = rest.split_once('/').unwrap_or((rest, ""));
            let host = if host.contains(':') {
                host.to_string()
            } else {
                format!("{host}:10809")
            };
            return Ok(NbdTarget {
                addr: format!("tcp:{host}"),
                name: name.to_string(),
            });
        }
        Err(format!(
            "{uri}: expected nbd+unix:///NAME?socket=PATH or nbd://HOST[:PORT]/NAME"
        ))
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Connects to NBD exports.
#[derive(Debug, Clone)]
pub struct NbdDriver {
    /// The export.
    pub target: NbdTarget,
}

struct NbdEngine {
    r: BufReader<Box<dyn Stream>>,
    w: BufWriter<Box<dyn Stream>>,
    size: u64,
    /// tag -> read length (None for other ops).
    inflight: HashMap<u64, Option<usize>>,
}

fn io(e: std::io::Error) -> String {
    e.to_string()
}

impl Driver for NbdDriver {
    fn open(&self) -> Result<Box<dyn Engine>, String> {
        let (r, w): (Box<dyn Stream>, Box<dyn Stream>) =
            if let Some(p) = self.target.addr.strip_prefix("unix:") {
                let s = UnixStream::connect(p).map_err(|e| format!("{p}: {e}"))?;
                (Box::new(s.try_clone().map_err(io)?), Box::new(s))
            } else {
                let a = self
                    .target
                    .addr
                    .strip_prefix("tcp:")
                    .unwrap_or(&self.target.addr);
                let s = TcpStream::connect(a).map_err(|e| format!("{a}: {e}"))?;
                s.set_nodelay(true).map_err(io)?;
                (Box::new(s.try_clone().map_err(io)?), Box::new(s))
            };
        let mut e = NbdEngine {
            r: BufReader::with_capacity(1 << 20, r),
            w: BufWriter::with_capacity(1 << 20, w),
            size: 0,
            inflight: HashMap::new(),
        };
        e.negotiate(&self.target.name)?;
        Ok(Box::new(e))
    }
}

impl NbdEngine {
    fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b).map_err(io)?;
        Ok(b)
    }

    fn negotiate(&mut self, name: &str) -> Result<(), String> {
        let h = self.read_exact(18)?;
        if u64::from_be_bytes(h[..8].try_into().expect("8")) != proto::NBDMAGIC
            || u64::from_be_bytes(h[8..16].try_into().expect("8")) != proto::IHAVEOPT
        {
            return Err("not a fixed-newstyle NBD server".into());
        }
        let flags = u16::from_be_bytes([h[16], h[17]]);
        let mut client = proto::CLIENT_FIXED_NEWSTYLE;
        if flags & proto::FLAG_NO_ZEROES != 0 {
            client |= proto::CLIENT_NO_ZEROES;
        }
        self.w.write_all(&client.to_be_bytes()).map_err(io)?;
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&proto::info::BLOCK_SIZE.to_be_bytes());
        let mut o = proto::IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&opt::GO.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(&data);
        self.w.write_all(&o).map_err(io)?;
        self.w.flush().map_err(io)?;
        loop {
            let h = self.read_exact(20)?;
            let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
            if len > 1 << 20 {
                return Err("option reply too long".into());
            }
            let d = self.read_exact(len)?;
            if kind & (1 << 31) != 0 {
                return Err(format!(
                    "export {name:?} refused (reply {kind:#x}: {})",
                    String::from_utf8_lossy(&d)
                ));
            }
            if kind == rep::INFO && d.len() >= 12 && d[..2] == [0, 0] {
                self.size = u64::from_be_bytes(d[2..10].try_into().expect("8"));
            }
            if kind == rep::ACK {
                return Ok(());
            }
        }
    }
}

impl Engine for NbdEngine {
    fn size(&self) -> u64 {
        self.size
    }

    fn submit(&mut self, tag: usize, op: Op, data: &[u8]) -> Result<(), String> {
        let (kind, offset, len, read) = match op {
            Op::Read { offset, len } => (cmd::READ, offset, len, Some(len as usize)),
            Op::Write { offset, len } => (cmd::WRITE, offset, len, None),
            Op::Flush => (cmd::FLUSH, 0, 0, None),
            Op::Trim { offset, len } => (cmd::TRIM, offset, len, None),
            Op::WriteZeroes { offset, len } => (cmd::WRITE_ZEROES, offset, len, None),
        };
        let mut b = Vec::with_capacity(28);
        proto::encode_request(
            &mut b,
            &RequestHeader {
                flags: 0,
                kind,
                cookie: tag as u64,
                offset,
                len,
            },
        );
        self.w.write_all(&b).map_err(io)?;
        if kind == cmd::WRITE {
            self.w.write_all(data).map_err(io)?;
        }
        self.inflight.insert(tag as u64, read);
        Ok(())
    }

    fn reap(&mut self) -> Result<Vec<Completion>, String> {
        self.w.flush().map_err(io)?;
        let mut out = Vec::new();
        loop {
            let h = self.read_exact(16)?;
            if u32::from_be_bytes(h[..4].try_into().expect("4")) != proto::SIMPLE_REPLY_MAGIC {
                return Err("unexpected reply magic".into());
            }
            let error = u32::from_be_bytes(h[4..8].try_into().expect("4"));
            let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8"));
            let read = self
                .inflight
                .remove(&cookie)
                .ok_or_else(|| format!("reply to unknown cookie {cookie}"))?;
            let result = match (error, read) {
                (0, Some(n)) => Ok(Some(self.read_exact(n)?)),
                (0, None) => Ok(None),
                (e, _) => Err(format!("NBD error {e}")),
            };
            out.push(Completion {
                tag: cookie as usize,
                result,
            });
            // Take whatever else already arrived, without blocking.
            if self.r.buffer().len() < 16 {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let t = NbdTarget::parse("nbd+unix:///vol0?socket=/run/x.sock").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.name.as_str()),
            ("unix:/run/x.sock", "vol0")
        );
        let t = NbdTarget::parse("nbd://127.0.0.1:10900/v").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.name.as_str()),
            ("tcp:127.0.0.1:10900", "v")
        );
        assert_eq!(
            NbdTarget::parse("nbd://host/").unwrap().addr,
            "tcp:host:10809"
        );
        assert!(NbdTarget::parse("nbd+unix:///v").is_err());
        assert!(NbdTarget::parse("http://x").is_err());
    }
}
