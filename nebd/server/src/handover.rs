//! The wire of a live upgrade: how the running nebd-server (the old one) hands its sockets,
//! devices and sessions to a new one over a Unix socket, descriptors passed with SCM_RIGHTS.
//! Two phases, so that the pause holds only what must happen while I/O waits:
//!
//! ```text
//!  new ── {"op":"takeover"}\n ──────────────────────────────────> old   (control socket)
//!      <── Preview: u32 len + JSON (version, the MDS sessions) ──  old holds its exports
//!  new opens every volume of the metafile (cluster volumes continue the sessions)
//!      ── Ready ──────────────────────────────────────────────────>
//!      <── Offer: u32 len + JSON, then blobs (u64 len + bytes), ─  old pauses every frontend
//!          then the descriptors in batches (1 byte + SCM_RIGHTS)
//!  new adopts everything, paused (nothing read from any consumer yet)
//!      ── Prepared (u32 len + JSON) ─────────────────────────────>
//!      ── or Abort {reason} / EOF / nothing in time ─────────────>  old kills the new one
//!                                                                    and resumes serving
//!      <── Commit ───────────────────────────────────────────────  old will never serve again
//!  new serves
//!      ── Serving {pause} ───────────────────────────────────────>  old exits (status 0)
//!  new reads EOF: the old one is gone; ublk devices are recovered now
//! ```
//!
//! The JSON names descriptors and blobs by their index in the message. This module is the
//! encoding only: [`crate::upgrade`] decides what to pause and adopt.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

/// Bumped when the offer changes incompatibly: a new binary refuses an offer it cannot read
/// (and the old one resumes).
pub const VERSION: u32 = 3;
/// Descriptors per sendmsg (the kernel allows 253).
const FDS_PER_MESSAGE: usize = 200;
/// Largest JSON message accepted.
const MAX_JSON: usize = 64 << 20;
/// Largest blob (a connection's unconsumed bytes: at most one request and its payload plus
/// a read buffer).
const MAX_BLOB: u64 = 64 << 20;

/// What the new process needs before the pause: enough to open every volume.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Preview {
    /// [`VERSION`].
    pub version: u32,
    /// The old process.
    pub old_pid: u32,
    /// Sessions of the cluster volumes open, by path.
    pub sessions: Vec<(String, curve_client::SessionState)>,
}

/// Reads a [`Preview`], refusing another version.
pub fn recv_preview(sock: &mut UnixStream) -> io::Result<Preview> {
    let p: Preview = read_json(sock)?;
    if p.version != VERSION {
        return Err(bad(format!(
            "hand-over version {} (this binary speaks {VERSION})",
            p.version
        )));
    }
    Ok(p)
}

/// Everything the old process hands over.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Offer {
    /// [`VERSION`].
    pub version: u32,
    /// The old process.
    pub old_pid: u32,
    /// When the old process paused its frontends (µs since the Unix epoch).
    pub paused_at_us: u64,
    /// The run directory's lock (the pid file, flock'ed).
    pub lock: usize,
    /// The control socket's listener.
    pub control: usize,
    /// The part1 socket's listener.
    pub part1: usize,
    /// NBD listeners: address, descriptor, exports on it.
    pub nbd_listeners: Vec<(String, usize, Vec<String>)>,
    /// NBD connections in transmission.
    pub nbd_connections: Vec<NbdConnection>,
    /// Kernel NBD devices: export, the connections we served (descriptor, blob).
    pub nbd_devices: Vec<(String, Vec<(usize, usize)>)>,
    /// vhost-user-blk exports: name, frozen state, descriptors (in `Frozen::fds` order).
    pub vhost: Vec<(String, curve_vhost_user_blk::FrozenState, Vec<usize>)>,
    /// Descriptors that follow.
    pub fds: usize,
    /// Blobs that follow.
    pub blobs: usize,
}

/// One NBD connection, parked.
#[derive(Debug, Serialize, Deserialize)]
pub struct NbdConnection {
    /// Export.
    pub export: String,
    /// Socket (descriptor index).
    pub fd: usize,
    /// TCP, else Unix.
    pub tcp: bool,
    /// Structured replies.
    pub structured: bool,
    /// base:allocation.
    pub block_status: bool,
    /// Unconsumed bytes (blob index).
    pub leftover: usize,
}

/// The new process's answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// Every volume is open: the old one may pause and send the offer.
    Ready,
    /// Everything adopted, nothing served yet: the old one may commit.
    Prepared {
        /// The new process.
        pid: u32,
    },
    /// Serving since the commit.
    Serving {
        /// From the old one's pause to serving here, µs.
        pause_us: u64,
    },
    /// Something could not be adopted: the old one resumes.
    Abort {
        /// Why.
        reason: String,
    },
}

/// The old process's decision after Prepared.
#[derive(Debug, Serialize, Deserialize)]
pub struct Commit {
    /// Serve (the old process will not serve again).
    pub serve: bool,
}

/// Descriptors and blobs of an offer being built.
#[derive(Debug, Default)]
pub struct Attachments {
    /// Descriptors, in index order.
    pub fds: Vec<OwnedFd>,
    /// Blobs, in index order.
    pub blobs: Vec<Vec<u8>>,
}

impl Attachments {
    /// Adds a descriptor; returns its index.
    pub fn fd(&mut self, fd: OwnedFd) -> usize {
        self.fds.push(fd);
        self.fds.len() - 1
    }

    /// Adds a blob; returns its index.
    pub fn blob(&mut self, b: Vec<u8>) -> usize {
        self.blobs.push(b);
        self.blobs.len() - 1
    }
}

/// What was received: descriptors can be taken once each.
#[derive(Debug, Default)]
pub struct Received {
    fds: Vec<Option<OwnedFd>>,
    blobs: Vec<Option<Vec<u8>>>,
}

impl Received {
    /// Takes descriptor `i`.
    pub fn fd(&mut self, i: usize) -> io::Result<OwnedFd> {
        self.fds
            .get_mut(i)
            .and_then(Option::take)
            .ok_or_else(|| bad(format!("descriptor {i} missing or used twice")))
    }

    /// Takes blob `i`.
    pub fn blob(&mut self, i: usize) -> io::Result<Vec<u8>> {
        self.blobs
            .get_mut(i)
            .and_then(Option::take)
            .ok_or_else(|| bad(format!("blob {i} missing or used twice")))
    }
}

fn bad(m: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m)
}

/// Writes a length-prefixed JSON message.
pub fn write_json<T: Serialize>(sock: &mut UnixStream, v: &T) -> io::Result<()> {
    let body = serde_json::to_vec(v)?;
    sock.write_all(&(body.len() as u32).to_be_bytes())?;
    sock.write_all(&body)
}

/// Reads a length-prefixed JSON message.
pub fn read_json<T: for<'de> Deserialize<'de>>(sock: &mut UnixStream) -> io::Result<T> {
    let mut len = [0u8; 4];
    sock.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_JSON {
        return Err(bad(format!("message of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| bad(format!("bad message: {e}")))
}

/// Sends `offer` with its attachments (their counts are filled in).
pub fn send_offer(sock: &mut UnixStream, offer: &mut Offer, att: &Attachments) -> io::Result<()> {
    offer.fds = att.fds.len();
    offer.blobs = att.blobs.len();
    write_json(sock, offer)?;
    for b in &att.blobs {
        sock.write_all(&(b.len() as u64).to_be_bytes())?;
        sock.write_all(b)?;
    }
    for batch in att.fds.chunks(FDS_PER_MESSAGE) {
        send_fds(sock, batch)?;
    }
    Ok(())
}

/// Receives an offer and its attachments.
pub fn recv_offer(sock: &mut UnixStream) -> io::Result<(Offer, Received)> {
    let offer: Offer = read_json(sock)?;
    if offer.version != VERSION {
        return Err(bad(format!(
            "offer version {} (this binary reads {VERSION})",
            offer.version
        )));
    }
    let mut rec = Received::default();
    for _ in 0..offer.blobs {
        let mut len = [0u8; 8];
        sock.read_exact(&mut len)?;
        let len = u64::from_be_bytes(len);
        if len > MAX_BLOB {
            return Err(bad(format!("blob of {len} bytes")));
        }
        let mut b = vec![0u8; len as usize];
        sock.read_exact(&mut b)?;
        rec.blobs.push(Some(b));
    }
    while rec.fds.len() < offer.fds {
        let want = (offer.fds - rec.fds.len()).min(FDS_PER_MESSAGE);
        for fd in recv_fds(sock, want)? {
            rec.fds.push(Some(fd));
        }
    }
    Ok((offer, rec))
}

/// A one-byte message with room for `fds` descriptors of SCM_RIGHTS: the buffers a `msghdr`
/// of either direction points into.
struct FdFrame {
    byte: [u8; 1],
    iov: libc::iovec,
    cbuf: Vec<u64>,
    space: usize,
}

impl FdFrame {
    fn new(byte: u8, fds: usize) -> Box<Self> {
        // SAFETY: CMSG_SPACE is a pure computation on a length.
        let space = unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<i32>()) as u32) } as usize;
        let mut f = Box::new(FdFrame {
            byte: [byte],
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 1,
            },
            cbuf: vec![0u64; space.div_ceil(8)],
            space,
        });
        // The frame is boxed: the iovec points into it for as long as it lives.
        f.iov.iov_base = f.byte.as_mut_ptr().cast();
        f
    }

    /// A `msghdr` over the frame's buffers (valid while the frame is not moved or dropped).
    fn msg(&mut self) -> libc::msghdr {
        // SAFETY: an all-zero msghdr is valid; its pointers are set below to live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut self.iov;
        msg.msg_iovlen = 1;
        msg.msg_control = self.cbuf.as_mut_ptr().cast();
        msg.msg_controllen = self.space as _;
        msg
    }
}

/// One byte carrying `fds` as SCM_RIGHTS.
fn send_fds(sock: &UnixStream, fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut frame = FdFrame::new(b'F', raw.len());
    let msg = frame.msg();
    // SAFETY: msg_control points at room for one header and `raw`; the first header is filled
    // in place and the descriptors copied after it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(raw.as_slice()) as u32) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
    }
    // SAFETY: sendmsg with the message built above; the socket is ours.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one byte carrying up to `max` descriptors.
fn recv_fds(sock: &UnixStream, max: usize) -> io::Result<Vec<OwnedFd>> {
    let mut frame = FdFrame::new(0, max);
    let mut msg = frame.msg();
    // SAFETY: recvmsg into the frame's buffers.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(bad("descriptors truncated".into()));
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `cbuf`; each SCM_RIGHTS
    // payload is an array of fresh descriptors we now own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c).cast::<i32>();
                for k in 0..payload / std::mem::size_of::<i32>() {
                    fds.push(OwnedFd::from_raw_fd(p.add(k).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if frame.byte[0] != b'F' {
        return Err(bad("not a descriptor message".into()));
    }
    Ok(fds)
}

/// Body of the `handover_offer` fuzz target: `data` arrives as an offer (and, after it, an
/// answer) from a peer; anything may be refused, nothing may panic or allocate without bound.
pub fn fuzz_offer(data: &[u8]) {
    let Ok((mut a, mut b)) = UnixStream::pair() else {
        return;
    };
    let owned = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = a.write_all(&owned);
    });
    let _ = b.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    if let Ok((offer, mut rec)) = recv_offer(&mut b) {
        for i in 0..offer.fds.min(4) {
            let _ = rec.fd(i);
        }
        let _ = read_json::<Answer>(&mut b);
    }
    let _ = writer.join();
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    #[test]
    fn an_offer_with_many_descriptors_and_blobs_goes_through() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut att = Attachments::default();
        let mut files = Vec::new();
        for i in 0..450u32 {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&i.to_le_bytes()).unwrap();
            files.push(f.try_clone().unwrap());
            att.fd(OwnedFd::from(f));
        }
        att.blob(vec![7u8; 100_000]);
        att.blob(Vec::new());
        let mut offer = Offer {
            version: VERSION,
            old_pid: 1,
            control: 3,
            ..Default::default()
        };
        let t = std::thread::spawn(move || {
            send_offer(&mut a, &mut offer, &att).unwrap();
            a
        });
        let (got, mut rec) = recv_offer(&mut b).unwrap();
        let _a = t.join().unwrap();
        assert_eq!((got.fds, got.blobs, got.control), (450, 2, 3));
        assert_eq!(rec.blob(0).unwrap(), vec![7u8; 100_000]);
        assert!(rec.blob(1).unwrap().is_empty());
        assert!(rec.blob(1).is_err(), "a blob is taken once");
        for i in [0usize, 199, 200, 449] {
            let mut f = std::fs::File::from(rec.fd(i).unwrap());
            f.rewind().unwrap();
            let mut v = [0u8; 4];
            f.read_exact(&mut v).unwrap();
            assert_eq!(u32::from_le_bytes(v) as usize, i, "descriptor {i}");
        }
        assert!(rec.fd(0).is_err());
    }

    #[test]
    fn random_offers_are_refused_without_panicking() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let good = {
            let mut v = Vec::new();
            let body = serde_json::to_vec(&Offer {
                version: VERSION,
                blobs: 1,
                ..Default::default()
            })
            .unwrap();
            v.extend_from_slice(&(body.len() as u32).to_be_bytes());
            v.extend_from_slice(&body);
            v.extend_from_slice(&3u64.to_be_bytes());
            v.extend_from_slice(b"abc");
            v
        };
        fuzz_offer(&good);
        for _ in 0..300 {
            let mut v = good.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % v.len();
                v[i] = next() as u8;
            }
            v.truncate((next() as usize) % (v.len() + 1));
            fuzz_offer(&v);
        }
    }

    #[test]
    fn a_truncated_or_foreign_offer_is_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write_json(
            &mut a,
            &Offer {
                version: VERSION + 1,
                ..Default::default()
            },
        )
        .unwrap();
        let e = recv_offer(&mut b).unwrap_err();
        assert!(e.to_string().contains("version"), "{e}");
        a.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert!(recv_offer(&mut b).is_err());
        drop(a);
        assert!(recv_offer(&mut b).is_err(), "EOF");
    }
}
