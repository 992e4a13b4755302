//! The part1 <-> part2 wire protocol: fixed little-endian headers, an optional payload,
//! parsed and encoded by pure functions (fuzzed with random input in the unit tests).
//!
//! ```text
//! request  (40 bytes + payload)
//!   0  magic   u32  "NEBQ"       16 id      u64  echoed in the response
//!   4  op      u8                24 offset  u64  (RESIZE: the new size)
//!   5  flags   u8   (FUA)        32 length  u64  bytes to read / write / discard
//!   6  rsv     u16  0
//!   8  fd      u32
//!  12  payload u32  bytes that follow: WRITE data, OPEN name, HEARTBEAT fds (u32 each)
//!
//! response (24 bytes + payload)
//!   0  magic   u32  "NEBR"       16 payload u32  READ data, OPEN/GET_INFO: FileInfo (16 bytes)
//!   4  status  i32  0 or -errno  20 rsv     u32  0
//!   8  id      u64
//! ```
//!
//! Framing never depends on the op: a peer always skips exactly `payload` bytes, so an unknown
//! op or a refused request gets an error response and the stream stays in sync.

/// Magic of a request ("NEBQ").
pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"NEBQ");
/// Magic of a response ("NEBR").
pub const RESPONSE_MAGIC: u32 = u32::from_le_bytes(*b"NEBR");
/// Request header size.
pub const REQUEST_LEN: usize = 40;
/// Response header size.
pub const RESPONSE_LEN: usize = 24;
/// Largest payload either side accepts (a larger one ends the connection).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Request flag: write through (force unit access).
pub const FLAG_FUA: u8 = 1;

/// Operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Open a volume by name (payload: UTF-8 name); answers a [`FileInfo`].
    Open = 1,
    /// Close `fd`.
    Close = 2,
    /// Read `length` bytes at `offset`.
    Read = 3,
    /// Write the payload at `offset`.
    Write = 4,
    /// Discard `length` bytes at `offset`.
    Discard = 5,
    /// Make completed writes durable.
    Flush = 6,
    /// Size and block size of `fd`; answers a [`FileInfo`].
    GetInfo = 7,
    /// Grow the volume to `offset` bytes.
    Resize = 8,
    /// part1 is alive and holds the fds of the payload (u32 each).
    Heartbeat = 9,
}

impl Op {
    /// The op of a wire value.
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Open,
            2 => Op::Close,
            3 => Op::Read,
            4 => Op::Write,
            5 => Op::Discard,
            6 => Op::Flush,
            7 => Op::GetInfo,
            8 => Op::Resize,
            9 => Op::Heartbeat,
            _ => return None,
        })
    }
}

/// A request header as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Operation (raw: unknown values are answered with EINVAL, not a disconnect).
    pub op: u8,
    /// Flags.
    pub flags: u8,
    /// File handle from OPEN.
    pub fd: u32,
    /// Payload length.
    pub payload: u32,
    /// Request id.
    pub id: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u64,
}

/// A response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// 0 or a negative errno.
    pub status: i32,
    /// Id of the request.
    pub id: u64,
    /// Payload length.
    pub payload: u32,
}

/// What OPEN and GET_INFO answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// File handle.
    pub fd: u32,
    /// Logical block size.
    pub block_size: u32,
    /// Size in bytes.
    pub size: u64,
}

/// Size of an encoded [`FileInfo`].
pub const FILE_INFO_LEN: usize = 16;

/// Why bytes did not parse. Any of these ends the connection: framing is lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Wrong magic.
    #[error("bad magic {0:#x}")]
    BadMagic(u32),
    /// Payload over [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes is too large")]
    TooLarge(u32),
    /// A payload that does not have the structure its op requires.
    #[error("malformed payload")]
    Malformed,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses a request header; `Ok(None)` when fewer than [`REQUEST_LEN`] bytes are given.
pub fn parse_request(b: &[u8]) -> Result<Option<RequestHeader>, FrameError> {
    let Some(b) = b.get(..REQUEST_LEN) else {
        return Ok(None);
    };
    let magic = u32_at(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let payload = u32_at(b, 12);
    if payload > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(payload));
    }
    Ok(Some(RequestHeader {
        op: b[4],
        flags: b[5],
        fd: u32_at(b, 8),
        payload,
        id: u64_at(b, 16),
        offset: u64_at(b, 24),
        length: u64_at(b, 32),
    }))
}

/// Appends a request header.
pub fn encode_request(out: &mut Vec<u8>, h: &RequestHeader) {
    out.extend_from_slice(&REQUEST_MAGIC.to_le_bytes());
    out.push(h.op);
    out.push(h.flags);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&h.fd.to_le_bytes());
    out.extend_from_slice(&h.payload.to_le_bytes());
    out.extend_from_slice(&h.id.to_le_bytes());
    out.extend_from_slice(&h.offset.to_le_bytes());
    out.extend_from_slice(&h.length.to_le_bytes());
}

/// Parses a response header; `Ok(None)` when fewer than [`RESPONSE_LEN`] bytes are given.
pub fn parse_response(b: &[u8]) -> Result<Option<ResponseHeader>, FrameError> {
    let Some(b) = b.get(..RESPONSE_LEN) else {
        return Ok(None);
    };
    let magic = u32_at(b, 0);
    if magic != RESPONSE_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let payload = u32_at(b, 16);
    if payload > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(payload));
    }
    Ok(Some(ResponseHeader {
        status: u32_at(b, 4) as i32,
        id: u64_at(b, 8),
        payload,
    }))
}

/// Encodes a response header.
pub fn encode_response(h: &ResponseHeader) -> [u8; RESPONSE_LEN] {
    let mut b = [0u8; RESPONSE_LEN];
    b[0..4].copy_from_slice(&RESPONSE_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&h.status.to_le_bytes());
    b[8..16].copy_from_slice(&h.id.to_le_bytes());
    b[16..20].copy_from_slice(&h.payload.to_le_bytes());
    b
}

/// Encodes a [`FileInfo`] payload.
pub fn encode_file_info(i: &FileInfo) -> [u8; FILE_INFO_LEN] {
    let mut b = [0u8; FILE_INFO_LEN];
    b[0..4].copy_from_slice(&i.fd.to_le_bytes());
    b[4..8].copy_from_slice(&i.block_size.to_le_bytes());
    b[8..16].copy_from_slice(&i.size.to_le_bytes());
    b
}

/// Parses a [`FileInfo`] payload.
pub fn parse_file_info(b: &[u8]) -> Result<FileInfo, FrameError> {
    if b.len() != FILE_INFO_LEN {
        return Err(FrameError::Malformed);
    }
    Ok(FileInfo {
        fd: u32_at(b, 0),
        block_size: u32_at(b, 4),
        size: u64_at(b, 8),
    })
}

/// Parses a HEARTBEAT payload: a list of u32 fds.
pub fn parse_fds(b: &[u8]) -> Result<Vec<u32>, FrameError> {
    if !b.len().is_multiple_of(4) {
        return Err(FrameError::Malformed);
    }
    Ok(b.chunks_exact(4).map(|c| u32_at(c, 0)).collect())
}

/// Encodes a HEARTBEAT payload.
pub fn encode_fds(fds: &[u32]) -> Vec<u8> {
    fds.iter().flat_map(|fd| fd.to_le_bytes()).collect()
}

/// The fuzz target's body (`fuzz/`): arbitrary bytes never panic the parsers, and what
/// parses respects the limits.
pub fn fuzz_frames(data: &[u8]) {
    let _ = parse_response(data);
    let _ = parse_file_info(data);
    let _ = parse_fds(data);
    let mut rest = data;
    while let Ok(Some(h)) = parse_request(rest) {
        assert!(h.payload <= MAX_PAYLOAD);
        let skip = (REQUEST_LEN + h.payload as usize).min(rest.len());
        rest = &rest[skip..];
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn roundtrips() {
        let h = RequestHeader {
            op: Op::Write as u8,
            flags: FLAG_FUA,
            fd: 3,
            payload: 4096,
            id: 99,
            offset: 1 << 40,
            length: 4096,
        };
        let mut b = Vec::new();
        encode_request(&mut b, &h);
        assert_eq!(b.len(), REQUEST_LEN);
        assert_eq!(parse_request(&b), Ok(Some(h)));
        assert_eq!(parse_request(&b[..39]), Ok(None));
        let r = ResponseHeader {
            status: -22,
            id: 99,
            payload: 0,
        };
        assert_eq!(parse_response(&encode_response(&r)), Ok(Some(r)));
        let i = FileInfo {
            fd: 1,
            block_size: 4096,
            size: 1 << 30,
        };
        assert_eq!(parse_file_info(&encode_file_info(&i)), Ok(i));
        assert_eq!(parse_fds(&encode_fds(&[1, 2, 3])), Ok(vec![1, 2, 3]));
        assert_eq!(parse_fds(&[1, 2]), Err(FrameError::Malformed));
        assert_eq!(Op::from_u8(9), Some(Op::Heartbeat));
        assert_eq!(Op::from_u8(0), None);
    }

    #[test]
    fn bad_frames() {
        let mut b = Vec::new();
        encode_request(
            &mut b,
            &RequestHeader {
                op: 1,
                flags: 0,
                fd: 0,
                payload: MAX_PAYLOAD + 1,
                id: 0,
                offset: 0,
                length: 0,
            },
        );
        assert_eq!(
            parse_request(&b),
            Err(FrameError::TooLarge(MAX_PAYLOAD + 1))
        );
        b[0] = b'X';
        assert!(matches!(parse_request(&b), Err(FrameError::BadMagic(_))));
    }

    #[test]
    fn random_input() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..50_000 {
            let len = rng.random_range(0..64);
            let mut d: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if d.len() >= 4 && rng.random_bool(0.5) {
                d[..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
            }
            fuzz_frames(&d);
        }
    }
}
