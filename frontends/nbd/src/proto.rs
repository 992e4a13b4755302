//! The NBD wire format: constants, typed values, and pure parsers and encoders.
//!
//! Nothing here does I/O. Parsers take a byte slice and return a typed value or a
//! [`ProtoError`]; encoders append to a `Vec<u8>`. The server feeds them bytes it read and
//! writes the bytes they produce; the fuzz targets feed them arbitrary bytes.
//!
//! Reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

/// "NBDMAGIC", first word of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second word of the greeting and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flags (server): the 124 zero bytes after NBD_OPT_EXPORT_NAME may be skipped.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flags.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Option codes.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Info types of NBD_OPT_INFO / NBD_OPT_GO.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command flags.
pub mod cflag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Structured reply chunk types.
pub mod reply {
    pub const FLAG_DONE: u16 = 1;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// NBD error values (as on the wire; equal to Linux errno values).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Block status flags of the `base:allocation` context.
pub const STATE_HOLE: u32 = 1;
/// Block status flags of the `base:allocation` context.
pub const STATE_ZERO: u32 = 2;

/// The one metadata context we offer.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Size of the greeting the server sends first.
pub const GREETING_LEN: usize = 18;
/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Largest option payload we accept; longer ones end the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name or metadata query we accept.
pub const MAX_STRING_LEN: u32 = 4096;

/// Why bytes did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A magic number is wrong: the peer does not speak NBD, or framing is lost.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// An option's payload is larger than [`MAX_OPTION_LEN`].
    #[error("option payload of {0} bytes is too large")]
    OptionTooLarge(u32),
    /// The client set flags we do not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// The option payload does not match its declared structure.
    #[error("malformed option payload: {0}")]
    Malformed(&'static str),
}

/// The server greeting of fixed newstyle negotiation.
pub fn encode_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
}

/// Parses the client's 4-byte flags answering the greeting.
pub fn parse_client_flags(b: [u8; 4]) -> Result<u32, ProtoError> {
    let flags = u32::from_be_bytes(b);
    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(flags)
}

/// An option header: which option and how many payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code.
    pub option: u32,
    /// Payload length.
    pub len: u32,
}

/// Parses an option header.
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    let option = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLarge(len));
    }
    Ok(OptionHeader { option, len })
}

/// A negotiation option, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdOption {
    /// NBD_OPT_EXPORT_NAME: the old way to pick an export and start transmission.
    ExportName(String),
    /// NBD_OPT_ABORT.
    Abort,
    /// NBD_OPT_LIST.
    List,
    /// NBD_OPT_STARTTLS.
    StartTls,
    /// NBD_OPT_INFO (`go == false`) or NBD_OPT_GO.
    Info {
        /// Whether this is NBD_OPT_GO.
        go: bool,
        /// Export name.
        name: String,
        /// Info types the client asked for.
        requests: Vec<u16>,
    },
    /// NBD_OPT_STRUCTURED_REPLY.
    StructuredReply,
    /// NBD_OPT_LIST_META_CONTEXT (`set == false`) or NBD_OPT_SET_META_CONTEXT.
    MetaContext {
        /// Whether this is NBD_OPT_SET_META_CONTEXT.
        set: bool,
        /// Export name.
        export: String,
        /// Context queries.
        queries: Vec<String>,
    },
    /// Any option we do not implement.
    Unknown(u32),
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.b.len() < n {
            return Err(ProtoError::Malformed(what));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn string(&mut self, what: &'static str) -> Result<String, ProtoError> {
        let len = self.u32(what)?;
        if len > MAX_STRING_LEN {
            return Err(ProtoError::Malformed("string too long"));
        }
        let b = self.take(len as usize, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Malformed("string is not UTF-8"))
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed("trailing bytes"))
        }
    }
}

/// Parses an option payload into a typed option.
pub fn parse_option(option: u32, data: &[u8]) -> Result<NbdOption, ProtoError> {
    let mut r = Reader { b: data };
    let parsed = match option {
        opt::EXPORT_NAME => {
            if data.len() > MAX_STRING_LEN as usize {
                return Err(ProtoError::Malformed("export name too long"));
            }
            let name = String::from_utf8(data.to_vec())
                .map_err(|_| ProtoError::Malformed("export name is not UTF-8"))?;
            return Ok(NbdOption::ExportName(name));
        }
        opt::ABORT => NbdOption::Abort,
        opt::LIST => NbdOption::List,
        opt::STARTTLS => NbdOption::StartTls,
        opt::STRUCTURED_REPLY => NbdOption::StructuredReply,
        opt::INFO | opt::GO => {
            let name = r.string("export name")?;
            let n = r.u16("number of info requests")?;
            let requests = (0..n)
                .map(|_| r.u16("info request"))
                .collect::<Result<_, _>>()?;
            NbdOption::Info {
                go: option == opt::GO,
                name,
                requests,
            }
        }
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            let export = r.string("export name")?;
            let n = r.u32("number of queries")?;
            if n as usize > data.len() / 4 {
                return Err(ProtoError::Malformed("number of queries"));
            }
            let queries = (0..n)
                .map(|_| r.string("query"))
                .collect::<Result<_, _>>()?;
            NbdOption::MetaContext {
                set: option == opt::SET_META_CONTEXT,
                export,
                queries,
            }
        }
        other => return Ok(NbdOption::Unknown(other)),
    };
    r.end()?;
    Ok(parsed)
}

/// Appends an option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A transmission request header, as sent (before validation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque handle echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length of the data (for writes: of the payload that follows).
    pub len: u32,
}

/// Parses a request header. `Ok(None)` when fewer than [`REQUEST_LEN`] bytes are given.
pub fn parse_request(b: &[u8]) -> Result<Option<RequestHeader>, ProtoError> {
    let Some(b) = b.get(..REQUEST_LEN) else {
        return Ok(None);
    };
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4"));
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(u64::from(magic)));
    }
    Ok(Some(RequestHeader {
        flags: u16::from_be_bytes(b[4..6].try_into().expect("2")),
        kind: u16::from_be_bytes(b[6..8].try_into().expect("2")),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8")),
        len: u32::from_be_bytes(b[24..28].try_into().expect("4")),
    }))
}

/// Appends a request header (used by clients and tests).
pub fn encode_request(out: &mut Vec<u8>, h: &RequestHeader) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&h.flags.to_be_bytes());
    out.extend_from_slice(&h.kind.to_be_bytes());
    out.extend_from_slice(&h.cookie.to_be_bytes());
    out.extend_from_slice(&h.offset.to_be_bytes());
    out.extend_from_slice(&h.len.to_be_bytes());
}

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// Appends a simple reply header (data, for a successful read, follows it).
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header; `len` bytes of payload follow it.
pub fn encode_structured_header(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends the header of a final NBD_REPLY_TYPE_OFFSET_DATA chunk carrying `len` bytes at
/// `offset`; the data follows it.
pub fn encode_read_chunk_header(out: &mut Vec<u8>, cookie: u64, offset: u64, len: u32) {
    encode_structured_header(out, cookie, reply::FLAG_DONE, reply::OFFSET_DATA, len + 8);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends a final NBD_REPLY_TYPE_ERROR chunk.
pub fn encode_structured_error(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    encode_structured_header(
        out,
        cookie,
        reply::FLAG_DONE,
        reply::ERROR,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Appends a final NBD_REPLY_TYPE_BLOCK_STATUS chunk: `(length, flags)` descriptors.
pub fn encode_block_status(out: &mut Vec<u8>, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    encode_structured_header(
        out,
        cookie,
        reply::FLAG_DONE,
        reply::BLOCK_STATUS,
        4 + 8 * extents.len() as u32,
    );
    out.extend_from_slice(&context.to_be_bytes());
    for (len, flags) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let h = RequestHeader {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            cookie: 0xdead_beef,
            offset: 1 << 40,
            len: 4096,
        };
        let mut b = Vec::new();
        encode_request(&mut b, &h);
        assert_eq!(parse_request(&b), Ok(Some(h)));
        assert_eq!(parse_request(&b[..27]), Ok(None));
        b[0] = 0;
        assert!(matches!(parse_request(&b), Err(ProtoError::BadMagic(_))));
    }

    fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn options() {
        let d = go_payload("vol", &[info::BLOCK_SIZE]);
        assert_eq!(
            parse_option(opt::GO, &d),
            Ok(NbdOption::Info {
                go: true,
                name: "vol".into(),
                requests: vec![info::BLOCK_SIZE]
            })
        );
        assert!(parse_option(opt::GO, &d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_option(opt::INFO, &long).is_err());
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            parse_option(opt::SET_META_CONTEXT, &d),
            Ok(NbdOption::MetaContext {
                set: true,
                export: "vol".into(),
                queries: vec![BASE_ALLOCATION.into()]
            })
        );
        // A huge declared count must not allocate.
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(opt::LIST_META_CONTEXT, &d).is_err());
        assert_eq!(parse_option(99, b"x"), Ok(NbdOption::Unknown(99)));
        assert_eq!(
            parse_option(opt::EXPORT_NAME, b"a"),
            Ok(NbdOption::ExportName("a".into()))
        );
    }

    #[test]
    fn headers() {
        let mut h = [0u8; OPTION_HEADER_LEN];
        h[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&opt::GO.to_be_bytes());
        h[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            parse_option_header(&h),
            Err(ProtoError::OptionTooLarge(_))
        ));
        h[12..16].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&h),
            Ok(OptionHeader {
                option: opt::GO,
                len: 7
            })
        );
        assert!(parse_client_flags([0, 0, 0, 3]).is_ok());
        assert!(parse_client_flags([0, 0, 0, 4]).is_err());
    }
}
