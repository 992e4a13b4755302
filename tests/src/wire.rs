//! A delay line for the netns bed (this kernel has no netem): a host's link is taken off the
//! bridge and joined to it again through this process, which holds every frame for a set time
//! each way before passing it on. The host end stays the veth it had; the bridge end becomes a
//! TAP device; frames are read from the veth's root end with a packet socket and written to the
//! TAP, and read from the TAP and sent on the veth. Both carry a virtio-net header
//! (`PACKET_VNET_HDR`, `IFF_VNET_HDR`), so segmentation offload passes through as it is.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// A GSO frame is at most 64 KiB; its virtio-net header is 10 bytes.
const FRAME: usize = 70 << 10;

/// A running delay line between a veth end and a TAP device.
#[derive(Debug)]
pub struct Wire {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn check(r: libc::c_int, what: &str) -> libc::c_int {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

/// A TAP device named `name` in this process's namespace (deleted when the fd closes).
fn tap(name: &str) -> OwnedFd {
    assert!(name.len() < libc::IFNAMSIZ, "interface name {name}");
    let path = c"/dev/net/tun";
    // SAFETY: a valid C string; the fd is owned below.
    let fd = check(
        unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) },
        "open /dev/net/tun",
    );
    // SAFETY: `fd` was just opened and is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: the name, then the flags (the rest of its 40 bytes unused here).
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads (and writes back) a struct ifreq of 40 bytes.
    check(
        unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) },
        "TUNSETIFF",
    );
    fd
}

/// A packet socket taking every frame `ifname` receives (not those it sends), with virtio-net
/// headers.
fn packet_socket(ifname: &str) -> OwnedFd {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call; the fd is owned below.
    let fd = check(
        unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                all.into(),
            )
        },
        "socket(AF_PACKET)",
    );
    // SAFETY: `fd` was just opened and is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    for opt in [PACKET_VNET_HDR, PACKET_IGNORE_OUTGOING] {
        let one: libc::c_int = 1;
        // SAFETY: an int option of the right size.
        check(
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    opt,
                    (&one as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            },
            "setsockopt(SOL_PACKET)",
        );
    }
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index != 0, "no interface {ifname}");
    // SAFETY: zeroed sockaddr_ll is valid; the fields are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = all;
    sll.sll_ifindex = index as i32;
    // SAFETY: a sockaddr_ll of its own size.
    check(
        unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        },
        "bind(AF_PACKET)",
    );
    fd
}

/// Waits up to 50 ms for `fd` to be readable.
fn readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd.
    unsafe { libc::poll(&mut p, 1, 50) > 0 }
}

impl Wire {
    /// Joins `veth` (a root-namespace link, off any bridge) to a new TAP device `tap_name`
    /// (to be put on the bridge by the caller), each frame held `delay` each way.
    pub fn start(veth: &str, tap_name: &str, delay: Duration) -> Self {
        let tap = Arc::new(tap(tap_name));
        let sock = Arc::new(packet_socket(veth));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (from, to) in [(sock.clone(), tap.clone()), (tap, sock)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; FRAME];
                while !s.load(Ordering::Relaxed) {
                    if !readable(from.as_raw_fd()) {
                        continue;
                    }
                    // SAFETY: reads into `buf`, of its length.
                    let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), FRAME) };
                    if n < 0 {
                        match std::io::Error::last_os_error().kind() {
                            std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => {
                                continue;
                            }
                            _ => return, // the device went away
                        }
                    }
                    if tx
                        .send((Instant::now() + delay, buf[..n as usize].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let (due, frame) = match rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(f) => f,
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    };
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    // SAFETY: writes `frame`, of its length. A frame the other side refuses is
                    // lost, as on a wire.
                    unsafe { libc::write(to.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
                }
            }));
        }
        Wire { stop, threads }
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
