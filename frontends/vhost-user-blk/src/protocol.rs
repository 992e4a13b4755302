//! The vhost-user wire format (front-end -> back-end messages and replies): headers, the
//! payloads we act on, parsed by pure functions, and message I/O with file descriptors.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Requests (front-end to back-end).
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
}

/// Header flags.
pub const VERSION: u32 = 0x1;
/// The message is a reply.
pub const REPLY: u32 = 0x4;
/// The front-end wants an acknowledgement (REPLY_ACK).
pub const NEED_REPLY: u32 = 0x8;

/// Largest payload we accept.
pub const MAX_PAYLOAD: usize = 4096;
/// Most file descriptors in one message.
pub const MAX_FDS: usize = 8;

/// Why a message is refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The connection failed or closed.
    #[error("vhost-user socket: {0}")]
    Io(#[from] io::Error),
    /// A malformed message.
    #[error("bad vhost-user message: {0}")]
    Bad(String),
}

/// A received message.
#[derive(Debug)]
pub struct Message {
    /// Request code.
    pub request: u32,
    /// Header flags.
    pub flags: u32,
    /// Payload.
    pub payload: Vec<u8>,
    /// Descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

fn u32_at(p: &[u8], at: usize) -> Result<u32, ProtoError> {
    p.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
        .ok_or_else(|| ProtoError::Bad(format!("payload of {} bytes, need {}", p.len(), at + 4)))
}

fn u64_at(p: &[u8], at: usize) -> Result<u64, ProtoError> {
    p.get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
        .ok_or_else(|| ProtoError::Bad(format!("payload of {} bytes, need {}", p.len(), at + 8)))
}

/// A u64 payload.
pub fn parse_u64(p: &[u8]) -> Result<u64, ProtoError> {
    u64_at(p, 0)
}

/// `vhost_vring_state`: (index, num).
pub fn parse_state(p: &[u8]) -> Result<(u32, u32), ProtoError> {
    Ok((u32_at(p, 0)?, u32_at(p, 4)?))
}

/// `vhost_vring_addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringAddr {
    /// Queue index.
    pub index: u32,
    /// Flags (logging).
    pub flags: u32,
    /// Descriptor table, front-end address.
    pub desc: u64,
    /// Used ring, front-end address.
    pub used: u64,
    /// Available ring, front-end address.
    pub avail: u64,
}

/// Parses `vhost_vring_addr`.
pub fn parse_addr(p: &[u8]) -> Result<VringAddr, ProtoError> {
    Ok(VringAddr {
        index: u32_at(p, 0)?,
        flags: u32_at(p, 4)?,
        desc: u64_at(p, 8)?,
        used: u64_at(p, 16)?,
        avail: u64_at(p, 24)?,
    })
}

/// One region of the memory table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Size.
    pub size: u64,
    /// Front-end virtual address (what ring addresses use).
    pub uaddr: u64,
    /// Offset in the file descriptor.
    pub offset: u64,
}

/// Parses `VhostUserMemory` (the regions; one fd per region comes with the message).
pub fn parse_mem_table(p: &[u8]) -> Result<Vec<MemRegion>, ProtoError> {
    let n = u32_at(p, 0)? as usize;
    if n == 0 || n > MAX_FDS {
        return Err(ProtoError::Bad(format!("{n} memory regions")));
    }
    (0..n)
        .map(|i| {
            let at = 8 + 32 * i;
            let r = MemRegion {
                gpa: u64_at(p, at)?,
                size: u64_at(p, at + 8)?,
                uaddr: u64_at(p, at + 16)?,
                offset: u64_at(p, at + 24)?,
            };
            if r.size == 0
                || r.gpa.checked_add(r.size).is_none()
                || r.uaddr.checked_add(r.size).is_none()
            {
                return Err(ProtoError::Bad(format!("memory region {r:?}")));
            }
            Ok(r)
        })
        .collect()
}

/// `VhostUserInflight`: (mmap size, mmap offset, queues, queue size).
pub fn parse_inflight(p: &[u8]) -> Result<(u64, u64, u16, u16), ProtoError> {
    let q = p
        .get(16..20)
        .ok_or_else(|| ProtoError::Bad("short inflight payload".into()))?;
    Ok((
        u64_at(p, 0)?,
        u64_at(p, 8)?,
        u16::from_le_bytes([q[0], q[1]]),
        u16::from_le_bytes([q[2], q[3]]),
    ))
}

/// Encodes `VhostUserInflight` (24 bytes: the C struct is padded, and QEMU checks the size).
pub fn encode_inflight(size: u64, offset: u64, queues: u16, queue_size: u16) -> Vec<u8> {
    let mut v = size.to_le_bytes().to_vec();
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&queues.to_le_bytes());
    v.extend_from_slice(&queue_size.to_le_bytes());
    v.extend_from_slice(&[0u8; 4]);
    v
}

/// `VhostUserConfig` request: (offset, size).
pub fn parse_config(p: &[u8]) -> Result<(u32, u32), ProtoError> {
    Ok((u32_at(p, 0)?, u32_at(p, 4)?))
}

/// Reads one message (with its descriptors).
pub fn recv(sock: &UnixStream) -> Result<Message, ProtoError> {
    let mut head = [0u8; 12];
    let fds = recv_with_fds(sock, &mut head)?;
    let request = u32::from_le_bytes(head[..4].try_into().expect("4"));
    let flags = u32::from_le_bytes(head[4..8].try_into().expect("4"));
    let size = u32::from_le_bytes(head[8..12].try_into().expect("4")) as usize;
    if flags & 0x3 != VERSION {
        return Err(ProtoError::Bad(format!("version {}", flags & 0x3)));
    }
    if size > MAX_PAYLOAD {
        return Err(ProtoError::Bad(format!("payload of {size} bytes")));
    }
    let mut payload = vec![0u8; size];
    if size > 0 {
        use std::io::Read;
        (&*sock).read_exact(&mut payload)?;
    }
    Ok(Message {
        request,
        flags,
        payload,
        fds,
    })
}

fn recv_with_fds(sock: &UnixStream, head: &mut [u8; 12]) -> Result<Vec<OwnedFd>, ProtoError> {
    let mut iov = libc::iovec {
        iov_base: head.as_mut_ptr().cast(),
        iov_len: head.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = space;
    // SAFETY: recvmsg into the buffers above, on our socket.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error().into());
    }
    if n == 0 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel filled in, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    if (n as usize) < head.len() {
        use std::io::Read;
        (&*sock).read_exact(&mut head[n as usize..])?;
    }
    Ok(fds)
}

/// Sends a reply to `request`, with `fds`.
pub fn reply(
    sock: &UnixStream,
    request: u32,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), ProtoError> {
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    let mut iov = libc::iovec {
        iov_base: msg.as_mut_ptr().cast(),
        iov_len: msg.len(),
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    if !fds.is_empty() {
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = space;
        // SAFETY: the buffer holds one header for fds.len() descriptors.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    // SAFETY: sendmsg of the message built above on our socket.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
    if n as usize != msg.len() {
        return Err(io::Error::last_os_error().into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        assert_eq!(parse_state(&[1, 0, 0, 0, 0, 1, 0, 0]).unwrap(), (1, 256));
        assert!(parse_state(&[1, 0]).is_err());
        let mut a = 2u32.to_le_bytes().to_vec();
        a.extend_from_slice(&0u32.to_le_bytes());
        for v in [10u64, 30, 20, 0] {
            a.extend_from_slice(&v.to_le_bytes());
        }
        let addr = parse_addr(&a).unwrap();
        assert_eq!(
            (addr.index, addr.desc, addr.used, addr.avail),
            (2, 10, 30, 20)
        );
        let mut m = 1u32.to_le_bytes().to_vec();
        m.extend_from_slice(&0u32.to_le_bytes());
        for v in [0u64, 1 << 20, 0x7000_0000, 0] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(parse_mem_table(&m).unwrap()[0].size, 1 << 20);
        m[..4].copy_from_slice(&0u32.to_le_bytes());
        assert!(parse_mem_table(&m).is_err(), "no regions");
        m[..4].copy_from_slice(&2u32.to_le_bytes());
        assert!(parse_mem_table(&m).is_err(), "truncated");
        let i = encode_inflight(4096, 0, 2, 128);
        assert_eq!(i.len(), 24);
        assert_eq!(parse_inflight(&i).unwrap(), (4096, 0, 2, 128));
    }
}
