//! The bodies of the fuzz targets (`fuzz/`), also driven with random input by unit tests.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use crate::memory::{MemRegion, Memory};
use crate::request::{Desc, Limits, Request, parse};
use crate::virtq::Vring;

/// Guest memory of `bytes` (zero-padded to 64 KiB) at guest physical and front-end address
/// 0, in a memfd as QEMU's would be.
pub fn guest_memory(bytes: &[u8]) -> Arc<Memory> {
    const SIZE: usize = 64 << 10;
    // SAFETY: memfd_create with a static name.
    let fd = unsafe { libc::memfd_create(c"curve-fuzz-guest".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd was just created and is owned by nobody else.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let mut content = bytes[..bytes.len().min(SIZE)].to_vec();
    content.resize(SIZE, 0);
    file.write_all(&content).expect("memfd write");
    let region = MemRegion {
        gpa: 0,
        size: SIZE as u64,
        uaddr: 0,
        offset: 0,
    };
    Arc::new(Memory::map(&[region], vec![file]).expect("map"))
}

/// A 16-entry ring (descriptors at 0, avail ring at 0x100, used ring at 0x200) in guest memory
/// made of `data`: every available head is walked (direct chains and indirect tables anywhere
/// in memory) and parsed, as a queue worker does.
pub fn rings(data: &[u8]) {
    let mem = guest_memory(data);
    let Some(mut ring) = Vring::new(mem.clone(), 16, 0, 0x100, 0x200, 0, false) else {
        return;
    };
    let limits = Limits {
        capacity: 1 << 20,
        block_size: 512,
        max_bytes: 1 << 18,
        max_segs: 126,
        max_zero_bytes: 1 << 20,
        read_only: false,
    };
    let mut taken = 0;
    while let Some((head, chain)) = ring.pop() {
        // The replay walk (a head named by the inflight buffer) of the same head: bounded too.
        if let Some(replayed) = ring.chain(head) {
            assert!(replayed.len() <= crate::virtq::MAX_INDIRECT as usize);
        }
        if let Some(chain) = chain {
            assert!(chain.len() <= crate::virtq::MAX_INDIRECT as usize);
            if let Ok(r) = parse(&chain, &limits, |a, l| mem.read(a, l)) {
                let total: u64 = r.segs.iter().map(|s| u64::from(s.len)).sum();
                assert!(total <= limits.max_bytes && r.segs.len() <= limits.max_segs);
            }
        }
        ring.push_used(head, 0);
        taken += 1;
        assert!(taken <= 16, "no more heads than the ring holds");
    }
}

/// Chains and guest memory from `data` through [`parse`].
pub fn chains(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8);
    if rest.len() < n * 14 {
        return;
    }
    let (descs, memory) = rest.split_at(n * 14);
    let chain: Vec<Desc> = descs
        .chunks(14)
        .map(|c| Desc {
            addr: u64::from_le_bytes(c[..8].try_into().expect("8")) % 0x10000,
            len: u32::from_le_bytes(c[8..12].try_into().expect("4")) % 0x20000,
            flags: u16::from_le_bytes([c[12], c[13]]),
        })
        .collect();
    let limits = Limits {
        capacity: 1 << 20,
        block_size: 512,
        max_bytes: 1 << 18,
        max_segs: 8,
        max_zero_bytes: 1 << 20,
        read_only: false,
    };
    let read = |addr: u64, len: usize| {
        let a = addr as usize;
        memory.get(a..a.checked_add(len)?).map(<[u8]>::to_vec)
    };
    if let Ok(Request { segs, .. }) = parse(&chain, &limits, read) {
        let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
        assert!(total <= limits.max_bytes && segs.len() <= limits.max_segs);
    }
}

/// `data` as a stream of vhost-user messages from a front-end, through the `vhost` crate's
/// request handler into our back-end (over a socket pair, without descriptors): no panic,
/// and the handler ends when the stream does.
pub fn messages(data: &[u8]) {
    use std::io::Write as _;
    let Ok((mut ours, theirs)) = std::os::unix::net::UnixStream::pair() else {
        return;
    };
    // Answers go to a socket nobody reads: bounded by the input, far below its buffer.
    let _ = ours.write_all(&data[..data.len().min(64 << 10)]);
    let _ = ours.shutdown(std::net::Shutdown::Write);
    let device: Arc<dyn curve_blockdev::BlockDevice> =
        Arc::new(curve_blockdev::MemDevice::new(1 << 20).expect("mem device"));
    let opts = crate::backend::Options {
        queues: 2,
        read_only: false,
        serial: "fuzz".into(),
    };
    let backend = Arc::new(std::sync::Mutex::new(crate::backend::Backend::new(
        device, opts,
    )));
    let mut handler = vhost::vhost_user::BackendReqHandler::from_stream(theirs, backend.clone());
    for _ in 0..4096 {
        match handler.handle_request() {
            Ok(()) => {}
            Err(
                vhost::vhost_user::Error::Disconnected
                | vhost::vhost_user::Error::PartialMessage
                | vhost::vhost_user::Error::SocketBroken(_)
                | vhost::vhost_user::Error::SocketError(_),
            ) => break,
            Err(_) => {}
        }
    }
    backend.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    #[test]
    fn random_input() {
        let mut rng = rand::rng();
        for _ in 0..20_000 {
            let n = rng.random_range(0..256);
            let v: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            super::chains(&v);
            super::messages(&v);
        }
        for _ in 0..2_000 {
            // Rings whose avail index and descriptors are random, often indirect.
            let mut v: Vec<u8> = (0..0x300).map(|_| rng.random()).collect();
            v[0x102] = rng.random_range(0..20);
            v[0x103] = 0;
            super::rings(&v);
        }
    }
}
