//! Generic netlink messages of the kernel's NBD driver (`linux/nbd-netlink.h`): pure encoders
//! and a parser of what the kernel answers (fuzzed: `fuzz_targets/nbd_netlink.rs`). The
//! socket that carries them is in [`crate::kernel`].
//!
//! ```text
//!  nlmsghdr   len u32 | type u16 (family id) | flags u16 | seq u32 | port u32
//!  genlmsghdr cmd u8 | version u8 | reserved u16
//!  nlattr...  len u16 | type u16 | payload, padded to 4 bytes (nested: type | NLA_F_NESTED)
//! ```

/// `NLMSG_ERROR`: an error, or with errno 0 an acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 4;
/// `NLA_F_NESTED`.
pub const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
/// Header lengths.
pub const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;

/// The generic netlink controller (resolves family names to ids).
pub mod ctrl {
    /// `GENL_ID_CTRL`.
    pub const ID: u16 = 0x10;
    /// `CTRL_CMD_GETFAMILY`.
    pub const CMD_GETFAMILY: u8 = 3;
    /// `CTRL_ATTR_FAMILY_ID` (u16).
    pub const ATTR_FAMILY_ID: u16 = 1;
    /// `CTRL_ATTR_FAMILY_NAME` (string).
    pub const ATTR_FAMILY_NAME: u16 = 2;
}

/// The `nbd` family: commands and attributes.
pub mod nbd {
    /// Family name.
    pub const FAMILY: &str = "nbd";
    /// `NBD_GENL_VERSION`.
    pub const VERSION: u8 = 1;
    /// `NBD_CMD_CONNECT`.
    pub const CMD_CONNECT: u8 = 1;
    /// `NBD_CMD_DISCONNECT`.
    pub const CMD_DISCONNECT: u8 = 2;
    /// `NBD_CMD_RECONFIGURE`.
    pub const CMD_RECONFIGURE: u8 = 3;
    /// `NBD_ATTR_INDEX` (u32).
    pub const ATTR_INDEX: u16 = 1;
    /// `NBD_ATTR_SIZE_BYTES` (u64).
    pub const ATTR_SIZE_BYTES: u16 = 2;
    /// `NBD_ATTR_BLOCK_SIZE_BYTES` (u64).
    pub const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
    /// `NBD_ATTR_TIMEOUT` (u64 seconds): a request older than this is resent.
    pub const ATTR_TIMEOUT: u16 = 4;
    /// `NBD_ATTR_SERVER_FLAGS` (u64): the export's transmission flags.
    pub const ATTR_SERVER_FLAGS: u16 = 5;
    /// `NBD_ATTR_CLIENT_FLAGS` (u64).
    pub const ATTR_CLIENT_FLAGS: u16 = 6;
    /// `NBD_ATTR_SOCKETS` (nested `NBD_SOCK_ITEM`s).
    pub const ATTR_SOCKETS: u16 = 7;
    /// `NBD_ATTR_DEAD_CONN_TIMEOUT` (u64 seconds): how long I/O waits for a reconfigure
    /// once every connection is dead.
    pub const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
    /// `NBD_ATTR_BACKEND_IDENTIFIER` (string, `/sys/block/nbdN/backend`).
    pub const ATTR_BACKEND_IDENTIFIER: u16 = 10;
    /// `NBD_SOCK_ITEM` (nested).
    pub const SOCK_ITEM: u16 = 1;
    /// `NBD_SOCK_FD` (u32).
    pub const SOCK_FD: u16 = 1;
}

/// Builds one generic netlink request.
#[derive(Debug)]
pub struct Request {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Request {
    /// A request of `family` (`nlmsg_type`) carrying `cmd`, asking for an acknowledgement.
    pub fn new(family: u16, cmd: u8, version: u8, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Request {
            buf,
            nests: Vec::new(),
        }
    }

    fn attr(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = u16::try_from(NLA_HDRLEN + payload.len()).expect("attribute fits");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// A u32 attribute.
    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// A u64 attribute.
    pub fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn string(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v)
    }

    /// Opens a nested attribute; close it with [`Request::end_nested`].
    pub fn begin_nested(&mut self, ty: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Closes the innermost nested attribute.
    pub fn end_nested(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("a nested attribute is open");
        let len = u16::try_from(self.buf.len() - start).expect("nested attribute fits");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The message, its length filled in.
    pub fn finish(&mut self) -> &[u8] {
        assert!(self.nests.is_empty(), "unclosed nested attribute");
        let len = u32::try_from(self.buf.len()).expect("message fits");
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        &self.buf
    }
}

/// One message of what the kernel answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `NLMSG_ERROR` with errno 0: the request with `seq` succeeded.
    Ack {
        /// Sequence number of the request.
        seq: u32,
    },
    /// `NLMSG_ERROR`: the request with `seq` failed with this (positive) errno.
    Error {
        /// Sequence number of the request.
        seq: u32,
        /// errno.
        errno: i32,
    },
    /// A generic netlink message: its command and attributes.
    Message {
        /// Sequence number it answers.
        seq: u32,
        /// `nlmsg_type` (the family).
        family: u16,
        /// Command.
        cmd: u8,
        /// The attributes, to walk with [`attrs`].
        attrs: &'a [u8],
    },
    /// `NLMSG_DONE` or another control message.
    Other {
        /// Sequence number.
        seq: u32,
    },
}

/// What is wrong with a netlink datagram.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// A length points outside the buffer or below a header.
    #[error("netlink: bad length {len} at offset {at}")]
    Length {
        /// Offset of the header.
        at: usize,
        /// The length it gives.
        len: usize,
    },
}

/// Splits a datagram from the kernel into its messages.
pub fn parse(mut buf: &[u8]) -> Result<Vec<Reply<'_>>, Malformed> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(Malformed::Length { at, len });
        }
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes"));
        let body = &buf[NLMSG_HDRLEN..len];
        out.push(match ty {
            NLMSG_ERROR => {
                let Some(code) = body.first_chunk::<4>() else {
                    return Err(Malformed::Length { at, len });
                };
                match i32::from_ne_bytes(*code) {
                    0 => Reply::Ack { seq },
                    e => Reply::Error {
                        seq,
                        errno: e.saturating_neg(),
                    },
                }
            }
            t if t < 0x10 => Reply::Other { seq },
            family => {
                if body.len() < GENL_HDRLEN {
                    return Err(Malformed::Length { at, len });
                }
                Reply::Message {
                    seq,
                    family,
                    cmd: body[0],
                    attrs: &body[GENL_HDRLEN..],
                }
            }
        });
        let step = align4(len).min(buf.len());
        buf = &buf[step..];
        at += step;
    }
    Ok(out)
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// Walks attributes: `(type without flags, payload)`; stops at the first malformed one.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLA_HDRLEN {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            buf = &[];
            return None;
        }
        let payload = &buf[NLA_HDRLEN..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, payload))
    })
}

/// The u32 attribute `ty`, if present and well formed.
pub fn attr_u32(attrs_buf: &[u8], ty: u16) -> Option<u32> {
    attrs(attrs_buf)
        .find(|(t, _)| *t == ty)
        .and_then(|(_, p)| Some(u32::from_ne_bytes(*p.first_chunk::<4>()?)))
}

/// The u16 attribute `ty`, if present and well formed.
pub fn attr_u16(attrs_buf: &[u8], ty: u16) -> Option<u16> {
    attrs(attrs_buf)
        .find(|(t, _)| *t == ty)
        .and_then(|(_, p)| Some(u16::from_ne_bytes(*p.first_chunk::<2>()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_request_layout() {
        let mut r = Request::new(0x20, nbd::CMD_CONNECT, nbd::VERSION, 7);
        r.u32(nbd::ATTR_INDEX, 3)
            .u64(nbd::ATTR_SIZE_BYTES, 1 << 30)
            .string(nbd::ATTR_BACKEND_IDENTIFIER, "ab")
            .begin_nested(nbd::ATTR_SOCKETS)
            .begin_nested(nbd::SOCK_ITEM)
            .u32(nbd::SOCK_FD, 9)
            .end_nested()
            .end_nested();
        let m = r.finish().to_vec();
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x20);
        assert_eq!(&m[16..18], &[nbd::CMD_CONNECT, nbd::VERSION]);
        let a: Vec<_> = attrs(&m[20..]).collect();
        assert_eq!(a.len(), 4);
        assert_eq!(a[0], (nbd::ATTR_INDEX, &3u32.to_ne_bytes()[..]));
        assert_eq!(a[2], (nbd::ATTR_BACKEND_IDENTIFIER, &b"ab\0"[..]));
        assert_eq!(a[3].0, nbd::ATTR_SOCKETS);
        let items: Vec<_> = attrs(a[3].1).collect();
        assert_eq!(items.len(), 1);
        assert_eq!(attr_u32(items[0].1, nbd::SOCK_FD), Some(9));
        // Everything is 4-byte aligned.
        assert_eq!(m.len() % 4, 0);
    }

    #[test]
    fn replies() {
        let mut dgram = Vec::new();
        // A genl message with NBD_ATTR_INDEX = 5.
        let mut msg = Request::new(0x21, nbd::CMD_CONNECT, 1, 4);
        msg.u32(nbd::ATTR_INDEX, 5);
        dgram.extend_from_slice(msg.finish());
        // An ack and an error.
        for errno in [0i32, -16] {
            let mut e = Vec::new();
            e.extend_from_slice(&36u32.to_ne_bytes());
            e.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            e.extend_from_slice(&0u16.to_ne_bytes());
            e.extend_from_slice(&4u32.to_ne_bytes());
            e.extend_from_slice(&0u32.to_ne_bytes());
            e.extend_from_slice(&errno.to_ne_bytes());
            e.extend_from_slice(&[0u8; 16]);
            dgram.extend_from_slice(&e);
        }
        let r = parse(&dgram).unwrap();
        assert_eq!(r.len(), 3);
        let Reply::Message { cmd, attrs, .. } = &r[0] else {
            panic!("{r:?}")
        };
        assert_eq!(*cmd, nbd::CMD_CONNECT);
        assert_eq!(attr_u32(attrs, nbd::ATTR_INDEX), Some(5));
        assert_eq!(r[1], Reply::Ack { seq: 4 });
        assert_eq!(r[2], Reply::Error { seq: 4, errno: 16 });
        // Truncated: an error, not a panic.
        assert!(parse(&dgram[..20]).is_err());
        assert!(parse(&[0u8; 3]).unwrap().is_empty());
    }
}
