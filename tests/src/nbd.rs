//! A small, strict, blocking NBD client for tests that need to send exactly the bytes they
//! choose (bad input, protocol corners). Real consumers (nbdinfo, qemu-io, fio) do the rest.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use curve_nbd::proto::{self, RequestHeader, opt, rep};

/// One reply to an option: its type and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    /// NBD_REP_* value.
    pub kind: u32,
    /// Payload.
    pub data: Vec<u8>,
}

/// A reply to a transmission request (simple, or the final structured chunk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Cookie of the request.
    pub cookie: u64,
    /// NBD error (0 = success).
    pub error: u32,
    /// Read data, if any.
    pub data: Vec<u8>,
}

/// A connection to an NBD server.
#[derive(Debug)]
pub struct Client {
    /// The socket, for tests that write raw bytes.
    pub sock: UnixStream,
    structured: bool,
}

impl Client {
    /// Connects and reads the greeting; sends client flags (fixed newstyle, no zeroes).
    pub fn connect(path: &Path) -> io::Result<Self> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut c = Client {
            sock,
            structured: false,
        };
        let mut greeting = [0u8; proto::GREETING_LEN];
        c.sock.read_exact(&mut greeting)?;
        assert_eq!(&greeting[..8], &proto::NBDMAGIC.to_be_bytes());
        c.sock
            .write_all(&(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes())?;
        Ok(c)
    }

    /// Sends an option with a raw payload.
    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.sock.write_all(&b)
    }

    /// Reads one option reply.
    pub fn read_option_reply(&mut self) -> io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.sock.read_exact(&mut h)?;
        assert_eq!(&h[..8], &proto::OPTION_REPLY_MAGIC.to_be_bytes());
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
        let mut data = vec![0u8; len];
        self.sock.read_exact(&mut data)?;
        Ok(OptReply { kind, data })
    }

    /// Reads option replies up to and including the final one (ACK or an error).
    pub fn read_option_replies(&mut self) -> io::Result<Vec<OptReply>> {
        let mut v = Vec::new();
        loop {
            let r = self.read_option_reply()?;
            let last = r.kind == rep::ACK || r.kind & (1 << 31) != 0;
            v.push(r);
            if last {
                return Ok(v);
            }
        }
    }

    /// Negotiates structured replies.
    pub fn structured_replies(&mut self) -> io::Result<()> {
        self.send_option(opt::STRUCTURED_REPLY, &[])?;
        let r = self.read_option_reply()?;
        assert_eq!(r.kind, rep::ACK);
        self.structured = true;
        Ok(())
    }

    /// NBD_OPT_GO for `name`; returns (size, transmission flags) or the error reply type.
    pub fn go(&mut self, name: &str) -> io::Result<Result<(u64, u16), u32>> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        // One information request: NBD_INFO_BLOCK_SIZE (so that exports with an alignment,
        // like cluster volumes, accept us).
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        self.send_option(opt::GO, &d)?;
        let mut export = None;
        for r in self.read_option_replies()? {
            if r.kind & (1 << 31) != 0 {
                return Ok(Err(r.kind));
            }
            if r.kind == rep::INFO && r.data[..2] == [0, 0] {
                let size = u64::from_be_bytes(r.data[2..10].try_into().expect("8"));
                let flags = u16::from_be_bytes(r.data[10..12].try_into().expect("2"));
                export = Some((size, flags));
            }
        }
        Ok(Ok(export.expect("NBD_INFO_EXPORT is always sent")))
    }

    /// Connects and enters transmission on `name`.
    pub fn open(path: &Path, name: &str, structured: bool) -> io::Result<(Self, u64, u16)> {
        let mut c = Client::connect(path)?;
        if structured {
            c.structured_replies()?;
        }
        let (size, flags) = c.go(name)?.expect("export exists");
        Ok((c, size, flags))
    }

    /// Sends a request (and its payload).
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut b = Vec::with_capacity(28 + payload.len());
        proto::encode_request(
            &mut b,
            &RequestHeader {
                flags,
                kind,
                cookie,
                offset,
                len,
            },
        );
        b.extend_from_slice(payload);
        self.sock.write_all(&b)
    }

    /// Reads the reply to a request; `read_len` is the data length of a successful read.
    pub fn reply(&mut self, read_len: usize) -> io::Result<Reply> {
        let mut magic = [0u8; 4];
        self.sock.read_exact(&mut magic)?;
        match u32::from_be_bytes(magic) {
            proto::SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.sock.read_exact(&mut h)?;
                let error = u32::from_be_bytes(h[..4].try_into().expect("4"));
                let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
                let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
                self.sock.read_exact(&mut data)?;
                Ok(Reply {
                    cookie,
                    error,
                    data,
                })
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.sock.read_exact(&mut h)?;
                let kind = u16::from_be_bytes(h[2..4].try_into().expect("2"));
                let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
                let len = u32::from_be_bytes(h[12..16].try_into().expect("4")) as usize;
                let mut payload = vec![0u8; len];
                self.sock.read_exact(&mut payload)?;
                let (error, data) = match kind {
                    proto::reply::OFFSET_DATA => (0, payload[8..].to_vec()),
                    proto::reply::ERROR => (
                        u32::from_be_bytes(payload[..4].try_into().expect("4")),
                        Vec::new(),
                    ),
                    _ => (0, payload),
                };
                Ok(Reply {
                    cookie,
                    error,
                    data,
                })
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad reply magic {other:#x}"),
            )),
        }
    }

    /// Whether the server closed the connection (reads EOF or a reset within the timeout).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.sock.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        }
    }
}
