//! The vhost-user driver: a userspace virtio-blk front-end speaking vhost-user to a backend
//! socket (ours or qemu-storage-daemon's), as QEMU would: features and protocol features,
//! config space, the guest memory as a shared memfd, split virtqueues (one per job), kick and
//! call eventfds. Each request is a chain of three descriptors (header, data, status) in
//! the slot of its tag.
//!
//! ```text
//!  memfd (mapped here, "guest physical" 0..len):
//!   per queue: [desc table][avail ring][used ring][slot 0: data | hdr | status]...[slot QD-1]
//! ```

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex};

use crate::engine::{Completion, Driver, Engine};
use crate::workload::Op;

mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
}

const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;
const BLK_F_SIZE_MAX: u64 = 1 << 1;
const BLK_F_SEG_MAX: u64 = 1 << 2;
const BLK_F_BLK_SIZE: u64 = 1 << 6;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_F_MQ: u64 = 1 << 12;
const BLK_F_DISCARD: u64 = 1 << 13;
const BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const PF_MQ: u64 = 1 << 0;
const PF_CONFIG: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

fn os(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// The shared guest memory.
#[derive(Debug)]
struct Memory {
    base: *mut u8,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping lives as long as Memory; each queue touches only its own part, and the
// rings shared with the backend are accessed with volatile reads/writes and fences.
unsafe impl Send for Memory {}
// SAFETY: as above.
unsafe impl Sync for Memory {}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: unmapping the region we mapped, once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Layout of one queue's part of the memory.
#[derive(Debug, Clone, Copy)]
struct Layout {
    num: u16,
    desc: usize,
    avail: usize,
    used: usize,
    slots: usize,
    slot_size: usize,
    block: usize,
}

impl Layout {
    fn new(start: usize, qd: usize, block: usize) -> Self {
        let num = (qd * 3).next_power_of_two().clamp(8, 32768) as u16;
        let n = usize::from(num);
        let desc = start;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        let slots = (used + 6 + 8 * n).next_multiple_of(4096);
        let slot_size = (block + 32).next_multiple_of(4096);
        Layout {
            num,
            desc,
            avail,
            used,
            slots,
            slot_size,
            block,
        }
    }

    fn end(&self, qd: usize) -> usize {
        self.slots + qd * self.slot_size
    }

    fn data(&self, tag: usize) -> usize {
        self.slots + tag * self.slot_size
    }
    fn hdr(&self, tag: usize) -> usize {
        self.data(tag) + self.block
    }
    fn status(&self, tag: usize) -> usize {
        self.hdr(tag) + 16
    }
}

struct Conn {
    path: String,
    sock: Mutex<Option<UnixStream>>,
    mem: Memory,
    mem_fd: OwnedFd,
    capacity: std::sync::atomic::AtomicU64,
    features: u64,
    protocol_features: u64,
    layouts: Vec<Layout>,
    kicks: Vec<OwnedFd>,
    calls: Vec<OwnedFd>,
    /// The back-end's inflight buffer (kept to hand back after a reconnect).
    inflight: Mutex<Option<(OwnedFd, Vec<u8>)>>,
    closing: std::sync::atomic::AtomicBool,
    /// Reconnections so far.
    reconnects: AtomicUsize,
}

fn send(sock: &mut UnixStream, request: u32, payload: &[u8], fds: &[RawFd]) -> Result<(), String> {
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes()); // version 1
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    if fds.is_empty() {
        return sock.write_all(&msg).map_err(|e| e.to_string());
    }
    let mut iov = libc::iovec {
        iov_base: msg.as_mut_ptr().cast(),
        iov_len: msg.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the sendmsg call.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = space;
    // SAFETY: the control buffer is CMSG_SPACE bytes for fds.len() descriptors, so the first
    // header and its data fit.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&mh);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
    }
    // SAFETY: sendmsg on our socket with the message built above.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, 0) };
    if n as usize != msg.len() {
        return Err(os("sendmsg"));
    }
    Ok(())
}

fn recv(sock: &mut UnixStream, request: u32) -> Result<Vec<u8>, String> {
    let mut h = [0u8; 12];
    sock.read_exact(&mut h)
        .map_err(|e| format!("vhost-user reply: {e}"))?;
    let got = u32::from_le_bytes(h[..4].try_into().expect("4"));
    let size = u32::from_le_bytes(h[8..12].try_into().expect("4")) as usize;
    if got != request || size > 4096 {
        return Err(format!(
            "vhost-user: reply {got} of {size} bytes to request {request}"
        ));
    }
    let mut p = vec![0u8; size];
    sock.read_exact(&mut p).map_err(|e| e.to_string())?;
    Ok(p)
}

fn get_u64(sock: &mut UnixStream, request: u32) -> Result<u64, String> {
    send(sock, request, &[], &[])?;
    let p = recv(sock, request)?;
    Ok(u64::from_le_bytes(
        p.get(..8).ok_or("short reply")?.try_into().expect("8"),
    ))
}

fn state(index: u32, num: u32) -> Vec<u8> {
    let mut v = index.to_le_bytes().to_vec();
    v.extend_from_slice(&num.to_le_bytes());
    v
}

fn eventfd() -> Result<OwnedFd, String> {
    // SAFETY: eventfd creates a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(os("eventfd"));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const PF_INFLIGHT: u64 = 1 << 12;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;

fn recv_fd(sock: &mut UnixStream, request: u32) -> Result<(Vec<u8>, OwnedFd), String> {
    let mut h = [0u8; 12];
    let mut iov = libc::iovec {
        iov_base: h.as_mut_ptr().cast(),
        iov_len: 12,
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(4) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = space;
    // SAFETY: recvmsg into our buffers.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
    if n != 12 {
        return Err(os("recvmsg"));
    }
    // SAFETY: reading the one descriptor the kernel put in the control buffer, if any.
    let fd = unsafe {
        let c = libc::CMSG_FIRSTHDR(&mh);
        if c.is_null() || (*c).cmsg_type != libc::SCM_RIGHTS {
            return Err("a reply without its descriptor".into());
        }
        OwnedFd::from_raw_fd(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>()))
    };
    let got = u32::from_le_bytes(h[..4].try_into().expect("4"));
    let size = u32::from_le_bytes(h[8..12].try_into().expect("4")) as usize;
    if got != request || size > 4096 {
        return Err(format!("reply {got} to request {request}"));
    }
    let mut p = vec![0u8; size];
    sock.read_exact(&mut p).map_err(|e| e.to_string())?;
    Ok((p, fd))
}

impl Conn {
    fn connect(path: &str, queues: usize, qd: usize, block: usize) -> Result<Arc<Self>, String> {
        let mut sock = UnixStream::connect(path).map_err(|e| format!("{path}: {e}"))?;
        let s = &mut sock;
        let offered = get_u64(s, req::GET_FEATURES)?;
        let mut pf = 0;
        if offered & F_PROTOCOL_FEATURES != 0 {
            pf = get_u64(s, req::GET_PROTOCOL_FEATURES)? & (PF_MQ | PF_CONFIG | PF_INFLIGHT);
        }
        let wanted = F_VERSION_1
            | F_PROTOCOL_FEATURES
            | BLK_F_SIZE_MAX
            | BLK_F_SEG_MAX
            | BLK_F_BLK_SIZE
            | BLK_F_FLUSH
            | BLK_F_MQ
            | BLK_F_DISCARD
            | BLK_F_WRITE_ZEROES;
        let features = offered & wanted;
        // The memory: every queue's rings and slots.
        let mut layouts = Vec::new();
        let mut at = 0;
        for _ in 0..queues.max(1) {
            let l = Layout::new(at, qd, block);
            at = l.end(qd);
            layouts.push(l);
        }
        let len = at;
        let name = std::ffi::CString::new("curve-bench-vhost").expect("no NUL");
        // SAFETY: memfd_create with a valid name creates a descriptor we own.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizing the memfd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) } != 0 {
            return Err(os("ftruncate"));
        }
        // SAFETY: a shared mapping of the whole memfd; unmapped in Memory::drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let mem_fd = fd.try_clone().map_err(|e| e.to_string())?;
        let mem = Memory {
            base: base.cast::<u8>(),
            len,
            _fd: fd,
        };
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for _ in &layouts {
            kicks.push(eventfd()?);
            calls.push(eventfd()?);
        }
        let conn = Arc::new(Conn {
            path: path.to_string(),
            sock: Mutex::new(None),
            mem,
            mem_fd,
            capacity: Default::default(),
            features,
            protocol_features: pf,
            layouts,
            kicks,
            calls,
            inflight: Mutex::new(None),
            closing: std::sync::atomic::AtomicBool::new(false),
            reconnects: AtomicUsize::new(0),
        });
        let capacity = conn.handshake(&mut sock, true)?;
        conn.capacity.store(capacity, Ordering::SeqCst);
        *conn.sock.lock().map_err(|e| e.to_string())? = Some(sock);
        let weak = Arc::downgrade(&conn);
        std::thread::spawn(move || monitor(weak));
        Ok(conn)
    }

    /// Sets the back-end up for our memory and queues (again after a reconnect: the same
    /// memory, eventfds and inflight buffer; the rings resume at their used index).
    fn handshake(&self, s: &mut UnixStream, first: bool) -> Result<u64, String> {
        if !first {
            get_u64(s, req::GET_FEATURES)?;
            if self.features & F_PROTOCOL_FEATURES != 0 {
                get_u64(s, req::GET_PROTOCOL_FEATURES)?;
            }
        }
        let pf = self.protocol_features;
        if self.features & F_PROTOCOL_FEATURES != 0 {
            send(s, req::SET_PROTOCOL_FEATURES, &pf.to_le_bytes(), &[])?;
        }
        let queues = self.layouts.len();
        if pf & PF_MQ != 0 {
            let max = get_u64(s, req::GET_QUEUE_NUM)? as usize;
            if queues > max {
                return Err(format!(
                    "{queues} jobs need as many queues; the backend has {max}"
                ));
            }
        } else if queues > 1 {
            return Err("the backend has one queue: use one job".into());
        }
        let mut capacity = 0;
        if pf & PF_CONFIG != 0 {
            let mut p = Vec::new();
            p.extend_from_slice(&0u32.to_le_bytes());
            p.extend_from_slice(&60u32.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            p.extend_from_slice(&[0u8; 60]);
            send(s, req::GET_CONFIG, &p, &[])?;
            let r = recv(s, req::GET_CONFIG)?;
            let cfg = r.get(12..).ok_or("short config")?;
            capacity =
                u64::from_le_bytes(cfg.get(..8).ok_or("short config")?.try_into().expect("8"))
                    * 512;
        }
        send(s, req::SET_OWNER, &[], &[])?;
        send(s, req::SET_FEATURES, &self.features.to_le_bytes(), &[])?;
        if pf & PF_INFLIGHT != 0 {
            let mut infl = self.inflight.lock().map_err(|e| e.to_string())?;
            if infl.is_none() {
                let num = self.layouts[0].num;
                let mut q = 0u64.to_le_bytes().to_vec();
                q.extend_from_slice(&0u64.to_le_bytes());
                q.extend_from_slice(&(queues as u16).to_le_bytes());
                q.extend_from_slice(&num.to_le_bytes());
                // The C struct (two u64, two u16) is 24 bytes with its tail padding: QEMU sends
                // that, and back-ends built on the vhost crate check the size.
                q.extend_from_slice(&[0u8; 4]);
                send(s, GET_INFLIGHT_FD, &q, &[])?;
                let (payload, fd) = recv_fd(s, GET_INFLIGHT_FD)?;
                *infl = Some((fd, payload));
            }
            let (fd, payload) = infl.as_ref().expect("set above");
            send(s, SET_INFLIGHT_FD, payload, &[fd.as_raw_fd()])?;
        }
        let base = self.mem.base;
        let mut p = Vec::new();
        p.extend_from_slice(&1u32.to_le_bytes()); // regions
        p.extend_from_slice(&0u32.to_le_bytes()); // padding
        p.extend_from_slice(&0u64.to_le_bytes()); // guest physical address
        p.extend_from_slice(&(self.mem.len as u64).to_le_bytes());
        p.extend_from_slice(&(base as u64).to_le_bytes()); // our ("user") address
        p.extend_from_slice(&0u64.to_le_bytes()); // mmap offset
        send(s, req::SET_MEM_TABLE, &p, &[self.mem_fd.as_raw_fd()])?;
        for (i, l) in self.layouts.iter().enumerate() {
            // Resume where the used ring is (what QEMU does): the back-end replays what its
            // predecessor had in flight from the inflight buffer.
            // SAFETY: the used index of this queue, inside the mapping.
            let used = unsafe { std::ptr::read_volatile(base.add(l.used + 2).cast::<u16>()) };
            let i = i as u32;
            send(s, req::SET_VRING_NUM, &state(i, u32::from(l.num)), &[])?;
            send(s, req::SET_VRING_BASE, &state(i, u32::from(used)), &[])?;
            let mut a = Vec::new();
            a.extend_from_slice(&i.to_le_bytes());
            a.extend_from_slice(&0u32.to_le_bytes());
            for off in [l.desc, l.used, l.avail] {
                a.extend_from_slice(&(base as u64 + off as u64).to_le_bytes());
            }
            a.extend_from_slice(&0u64.to_le_bytes());
            send(s, req::SET_VRING_ADDR, &a, &[])?;
            let call = self.calls[i as usize].as_raw_fd();
            send(s, req::SET_VRING_CALL, &u64::from(i).to_le_bytes(), &[call])?;
            let kick = self.kicks[i as usize].as_raw_fd();
            send(s, req::SET_VRING_KICK, &u64::from(i).to_le_bytes(), &[kick])?;
            if self.features & F_PROTOCOL_FEATURES != 0 {
                send(s, req::SET_VRING_ENABLE, &state(i, 1), &[])?;
            }
            if !first {
                // Whatever was added while the back-end was away.
                let one = 1u64.to_le_bytes();
                // SAFETY: writing 8 bytes to our kick eventfd.
                unsafe { libc::write(kick, one.as_ptr().cast(), 8) };
            }
        }
        Ok(capacity)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        if let Ok(Some(s)) = self.sock.lock().map(|mut g| g.take()) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Watches the control socket; when the back-end goes away (a crash, an upgrade), reconnects
/// to the same path and sets it up again, as QEMU's `reconnect` does.
fn monitor(conn: std::sync::Weak<Conn>) {
    loop {
        let Some(c) = conn.upgrade() else { return };
        let reader = match c
            .sock
            .lock()
            .ok()
            .and_then(|g| g.as_ref().and_then(|s| s.try_clone().ok()))
        {
            Some(r) => r,
            None => return,
        };
        drop(c);
        let mut b = [0u8; 1];
        // Blocks until EOF or error (the back-end sends nothing unasked).
        let _ = (&reader).read(&mut b);
        loop {
            let Some(c) = conn.upgrade() else { return };
            if c.closing.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            let Ok(mut s) = UnixStream::connect(&c.path) else {
                continue;
            };
            match c.handshake(&mut s, false) {
                Ok(_) => {
                    c.reconnects.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut g) = c.sock.lock() {
                        *g = Some(s);
                    }
                    break;
                }
                Err(_) => continue,
            }
        }
    }
}

/// Connects to a vhost-user-blk backend; jobs are its queues.
pub struct VhostUserDriver {
    socket: String,
    queues: usize,
    qd: usize,
    block: usize,
    conn: Mutex<Option<Arc<Conn>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for VhostUserDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDriver")
            .field("socket", &self.socket)
            .finish()
    }
}

impl VhostUserDriver {
    /// A driver for `jobs` queues of `qd` requests of up to `block` bytes.
    pub fn new(socket: &str, jobs: usize, qd: usize, block: usize) -> Self {
        VhostUserDriver {
            socket: socket.into(),
            queues: jobs.max(1),
            qd: qd.max(1),
            block,
            conn: Mutex::new(None),
            next: AtomicUsize::new(0),
        }
    }
}

struct Queue {
    conn: Arc<Conn>,
    index: usize,
    l: Layout,
    avail_idx: u16,
    used_idx: u16,
    unkicked: bool,
    inflight: Vec<Option<Op>>,
}

impl Driver for VhostUserDriver {
    fn reconnects(&self) -> Option<u64> {
        let c = self.conn.lock().ok()?;
        Some(
            c.as_ref()
                .map_or(0, |c| c.reconnects.load(Ordering::SeqCst) as u64),
        )
    }

    fn open(&self) -> Result<Box<dyn Engine>, String> {
        let conn = {
            let mut c = self.conn.lock().map_err(|e| e.to_string())?;
            match c.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let n = Conn::connect(&self.socket, self.queues, self.qd, self.block)?;
                    *c = Some(n.clone());
                    n
                }
            }
        };
        let index = self.next.fetch_add(1, Ordering::SeqCst);
        let l = *conn.layouts.get(index).ok_or("more jobs than queues")?;
        Ok(Box::new(Queue {
            conn,
            index,
            l,
            avail_idx: 0,
            used_idx: 0,
            unkicked: false,
            inflight: vec![None; self.qd],
        }))
    }
}

impl Queue {
    fn ptr(&self, off: usize) -> *mut u8 {
        debug_assert!(off < self.conn.mem.len);
        // SAFETY: offsets come from the layout, inside the mapping.
        unsafe { self.conn.mem.base.add(off) }
    }

    fn write_desc(&self, i: usize, addr: usize, len: u32, flags: u16, next: u16) {
        let p = self.ptr(self.l.desc + 16 * i);
        // SAFETY: descriptor i of this queue's table, inside the mapping; the backend reads it
        // only after the avail index that publishes it.
        unsafe {
            std::ptr::write_volatile(p.cast::<u64>(), addr as u64);
            std::ptr::write_volatile(p.add(8).cast::<u32>(), len);
            std::ptr::write_volatile(p.add(12).cast::<u16>(), flags);
            std::ptr::write_volatile(p.add(14).cast::<u16>(), next);
        }
    }
}

impl Engine for Queue {
    fn size(&self) -> u64 {
        self.conn.capacity.load(Ordering::SeqCst)
    }

    fn submit(&mut self, tag: usize, op: Op, data: &[u8]) -> Result<(), String> {
        let l = self.l;
        let (kind, sector, len, write_data) = match op {
            Op::Read { offset, len } => (T_IN, offset / 512, len, false),
            Op::Write { offset, len } => (T_OUT, offset / 512, len, true),
            Op::Flush => (T_FLUSH, 0, 0, false),
            Op::Trim { offset, len } => (T_DISCARD, offset / 512, len, false),
            Op::WriteZeroes { offset, len } => (T_WRITE_ZEROES, offset / 512, len, false),
        };
        if len as usize > l.block {
            return Err("request larger than the driver's block".into());
        }
        let need = match kind {
            T_FLUSH => BLK_F_FLUSH,
            T_DISCARD => BLK_F_DISCARD,
            T_WRITE_ZEROES => BLK_F_WRITE_ZEROES,
            _ => 0,
        };
        if need != 0 && self.conn.features & need == 0 {
            return Err("the backend does not offer this request type".into());
        }
        // SAFETY: the slot's header, status and data areas belong to this tag, which the
        // backend does not touch until the chain is published.
        unsafe {
            let h = self.ptr(l.hdr(tag));
            std::ptr::write_volatile(h.cast::<u32>(), kind);
            std::ptr::write_volatile(h.add(4).cast::<u32>(), 0);
            std::ptr::write_volatile(h.add(8).cast::<u64>(), sector);
            std::ptr::write_volatile(self.ptr(l.status(tag)), 0xff);
            if write_data {
                std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr(l.data(tag)), len as usize);
            }
            if kind == T_DISCARD || kind == T_WRITE_ZEROES {
                let d = self.ptr(l.data(tag));
                std::ptr::write_volatile(d.cast::<u64>(), sector);
                std::ptr::write_volatile(d.add(8).cast::<u32>(), len / 512);
                std::ptr::write_volatile(d.add(12).cast::<u32>(), 0);
            }
        }
        let head = 3 * tag;
        let (d0, d1, d2) = (head as u16, head as u16 + 1, head as u16 + 2);
        let data_len = match kind {
            T_FLUSH => 0,
            T_DISCARD | T_WRITE_ZEROES => 16,
            _ => len,
        };
        if data_len == 0 {
            self.write_desc(head, l.hdr(tag), 16, DESC_F_NEXT, d2);
        } else {
            self.write_desc(head, l.hdr(tag), 16, DESC_F_NEXT, d1);
            let flags = DESC_F_NEXT | if kind == T_IN { DESC_F_WRITE } else { 0 };
            self.write_desc(head + 1, l.data(tag), data_len, flags, d2);
        }
        self.write_desc(head + 2, l.status(tag), 1, DESC_F_WRITE, 0);
        let n = self.l.num;
        let slot = l.avail + 4 + 2 * usize::from(self.avail_idx % n);
        // SAFETY: the avail ring entry and index of this queue.
        unsafe {
            std::ptr::write_volatile(self.ptr(slot).cast::<u16>(), d0);
            fence(Ordering::Release);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            std::ptr::write_volatile(self.ptr(l.avail + 2).cast::<u16>(), self.avail_idx);
        }
        self.inflight[tag] = Some(op);
        self.unkicked = true;
        Ok(())
    }

    fn reap(&mut self) -> Result<Vec<Completion>, String> {
        fence(Ordering::SeqCst);
        if self.unkicked {
            let one = 1u64.to_le_bytes();
            // SAFETY: writing 8 bytes to our kick eventfd.
            unsafe {
                libc::write(
                    self.conn.kicks[self.index].as_raw_fd(),
                    one.as_ptr().cast(),
                    8,
                )
            };
            self.unkicked = false;
        }
        let l = self.l;
        let mut out = Vec::new();
        loop {
            // SAFETY: the used index of this queue, written by the backend.
            let used = unsafe { std::ptr::read_volatile(self.ptr(l.used + 2).cast::<u16>()) };
            fence(Ordering::Acquire);
            while self.used_idx != used {
                let e = l.used + 4 + 8 * usize::from(self.used_idx % l.num);
                // SAFETY: a used element the backend published before the index.
                let id = unsafe { std::ptr::read_volatile(self.ptr(e).cast::<u32>()) } as usize;
                self.used_idx = self.used_idx.wrapping_add(1);
                let tag = id / 3;
                let op = self
                    .inflight
                    .get_mut(tag)
                    .and_then(Option::take)
                    .ok_or_else(|| format!("used element {id} was not in flight"))?;
                // SAFETY: the status byte of this slot, written by the backend.
                let status = unsafe { std::ptr::read_volatile(self.ptr(l.status(tag))) };
                let result = match (status, op) {
                    (0, Op::Read { len, .. }) => {
                        let mut v = vec![0u8; len as usize];
                        // SAFETY: the slot's data, filled by the backend before it used it.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                self.ptr(l.data(tag)),
                                v.as_mut_ptr(),
                                v.len(),
                            )
                        };
                        Ok(Some(v))
                    }
                    (0, _) => Ok(None),
                    (1, _) => Err("VIRTIO_BLK_S_IOERR".to_string()),
                    (2, _) => Err("VIRTIO_BLK_S_UNSUPP".to_string()),
                    (s, _) => Err(format!("status {s}")),
                };
                out.push(Completion { tag, result });
            }
            if !out.is_empty() {
                return Ok(out);
            }
            // Wait for a call (the backend may have made the shared eventfd non-blocking),
            // then drain it; check the ring again every 100 ms in any case.
            let fd = self.conn.calls[self.index].as_raw_fd();
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one descriptor we own.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let mut buf = [0u8; 8];
            // SAFETY: an 8-byte read of our call eventfd (EAGAIN when there was nothing).
            unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) };
        }
    }
}
