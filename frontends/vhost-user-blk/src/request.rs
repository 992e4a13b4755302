//! Descriptor chains into typed virtio-blk requests (pure: descriptors and a reader of guest
//! memory in, a request or the status to answer out). Malformed chains never reach the
//! device: they get VIRTIO_BLK_S_IOERR (or UNSUPP for unknown types) and the queue goes on.

/// `VIRTQ_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: device-writable.
pub const F_WRITE: u16 = 2;

/// Request types.
pub mod t {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status bytes.
pub mod s {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Flags.
    pub flags: u16,
}

/// A buffer in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Guest physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
}

/// What the device is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Read into `segs` from `offset`.
    Read {
        /// Byte offset.
        offset: u64,
    },
    /// Write `segs` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
    },
    /// Flush.
    Flush,
    /// Write the device id into `segs`.
    GetId,
    /// Discard ranges.
    Discard(Vec<(u64, u64)>),
    /// Zero ranges (`unmap` allowed).
    WriteZeroes(Vec<(u64, u64, bool)>),
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: Kind,
    /// Data buffers (device-readable for writes, device-writable for reads and GET_ID).
    pub segs: Vec<Seg>,
    /// Where the status byte goes.
    pub status: u64,
}

/// Limits the device enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Most data bytes in one request.
    pub max_bytes: u64,
    /// Most data segments.
    pub max_segs: usize,
    /// Most bytes one discard or write-zeroes range covers (max_discard_sectors and
    /// max_write_zeroes_sectors of the config space).
    pub max_zero_bytes: u64,
    /// Writes refused.
    pub read_only: bool,
}

/// A refused chain: answer `status` at `status_addr` if there is one, with nothing written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Where the status byte goes (None: the chain has no usable status descriptor).
    pub status_addr: Option<u64>,
    /// The status.
    pub status: u8,
}

/// Parses a chain. `read(addr, len)` reads guest memory (None outside it).
pub fn parse(
    chain: &[Desc],
    limits: &Limits,
    read: impl Fn(u64, usize) -> Option<Vec<u8>>,
) -> Result<Request, Refused> {
    let last = chain.last().copied();
    let status_addr = last
        .filter(|d| d.flags & F_WRITE != 0 && d.len >= 1)
        .and_then(|d| d.addr.checked_add(u64::from(d.len) - 1));
    let err = |status| Refused {
        status_addr,
        status,
    };
    let ioerr = err(s::IOERR);
    if chain.len() < 2 || status_addr.is_none() {
        return Err(ioerr);
    }
    // The header: the first 16 device-readable bytes.
    let h = chain[0];
    if h.flags & F_WRITE != 0 || h.len < 16 {
        return Err(ioerr);
    }
    let head = read(h.addr, 16).ok_or(ioerr)?;
    let kind = u32::from_le_bytes(head[..4].try_into().expect("4"));
    let sector = u64::from_le_bytes(head[8..16].try_into().expect("8"));
    let mut data: Vec<Desc> = chain[1..].to_vec();
    // The status byte ends the last descriptor; a longer last descriptor carries data too.
    let l = data.pop().expect("two or more");
    if l.len > 1 {
        data.push(Desc {
            len: l.len - 1,
            ..l
        });
    }
    let segs: Vec<Seg> = data
        .iter()
        .filter(|d| d.len > 0)
        .map(|d| Seg {
            addr: d.addr,
            len: d.len,
        })
        .collect();
    if segs.len() > limits.max_segs {
        return Err(ioerr);
    }
    let writable = |want: bool| data.iter().all(|d| (d.flags & F_WRITE != 0) == want);
    let bytes: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    let in_range = |offset: u64, len: u64| {
        offset
            .checked_add(len)
            .is_some_and(|e| e <= limits.capacity)
            && len <= limits.max_bytes
    };
    let offset = sector.checked_mul(512).ok_or(ioerr)?;
    let bs = u64::from(limits.block_size.max(512));
    let kind = match kind {
        t::IN | t::OUT => {
            let write = kind == t::OUT;
            if !writable(!write) || !in_range(offset, bytes) || !bytes.is_multiple_of(512) {
                return Err(ioerr);
            }
            if write && limits.read_only {
                return Err(ioerr);
            }
            if write {
                Kind::Write { offset }
            } else {
                Kind::Read { offset }
            }
        }
        t::FLUSH => Kind::Flush,
        t::GET_ID => {
            if !writable(true) || bytes == 0 || bytes > 4096.min(limits.max_bytes) {
                return Err(ioerr);
            }
            Kind::GetId
        }
        t::DISCARD | t::WRITE_ZEROES => {
            // One range per request is what the config space offers; 4 KiB of ranges at most.
            if limits.read_only
                || !writable(false)
                || !bytes.is_multiple_of(16)
                || bytes == 0
                || bytes > 4096
            {
                return Err(ioerr);
            }
            let mut raw = Vec::new();
            for sg in &segs {
                raw.extend(read(sg.addr, sg.len as usize).ok_or(ioerr)?);
            }
            let mut ranges = Vec::new();
            for r in raw.chunks(16) {
                let sector = u64::from_le_bytes(r[..8].try_into().expect("8"));
                let n = u64::from(u32::from_le_bytes(r[8..12].try_into().expect("4")));
                let flags = u32::from_le_bytes(r[12..16].try_into().expect("4"));
                let (o, len) = (sector.checked_mul(512).ok_or(ioerr)?, n * 512);
                let fits = o.checked_add(len).is_some_and(|e| e <= limits.capacity)
                    && len <= limits.max_zero_bytes;
                if !fits || !o.is_multiple_of(bs) || !len.is_multiple_of(bs) {
                    return Err(ioerr);
                }
                if flags & !1 != 0 || (kind == t::DISCARD && flags != 0) {
                    return Err(err(s::UNSUPP));
                }
                ranges.push((o, len, flags & 1 != 0));
            }
            if kind == t::DISCARD {
                Kind::Discard(ranges.into_iter().map(|(o, l, _)| (o, l)).collect())
            } else {
                Kind::WriteZeroes(ranges)
            }
        }
        _ => return Err(err(s::UNSUPP)),
    };
    let status = status_addr.expect("checked");
    let segs = match kind {
        Kind::Discard(_) | Kind::WriteZeroes(_) | Kind::Flush => Vec::new(),
        _ => segs,
    };
    Ok(Request { kind, segs, status })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        capacity: 1 << 20,
        block_size: 512,
        max_bytes: 1 << 20,
        max_segs: 4,
        max_zero_bytes: 1 << 20,
        read_only: false,
    };

    fn hdr(kind: u32, sector: u64) -> Vec<u8> {
        let mut v = kind.to_le_bytes().to_vec();
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&sector.to_le_bytes());
        v
    }

    fn mem(h: Vec<u8>) -> impl Fn(u64, usize) -> Option<Vec<u8>> {
        move |a, l| (a == 0x1000 && l == 16).then(|| h.clone())
    }

    fn d(addr: u64, len: u32, flags: u16) -> Desc {
        Desc { addr, len, flags }
    }

    #[test]
    fn reads_writes_flush_and_id() {
        let chain = [
            d(0x1000, 16, F_NEXT),
            d(0x2000, 4096, F_NEXT | F_WRITE),
            d(0x3000, 1, F_WRITE),
        ];
        let r = parse(&chain, &LIM, mem(hdr(t::IN, 8))).unwrap();
        assert_eq!(r.kind, Kind::Read { offset: 4096 });
        assert_eq!(
            r.segs,
            vec![Seg {
                addr: 0x2000,
                len: 4096
            }]
        );
        assert_eq!(r.status, 0x3000);
        let chain = [
            d(0x1000, 16, F_NEXT),
            d(0x2000, 512, F_NEXT),
            d(0x2200, 512, F_NEXT),
            d(0x3000, 1, F_WRITE),
        ];
        let r = parse(&chain, &LIM, mem(hdr(t::OUT, 0))).unwrap();
        assert_eq!(r.kind, Kind::Write { offset: 0 });
        assert_eq!(r.segs.len(), 2);
        let chain = [d(0x1000, 16, F_NEXT), d(0x3000, 1, F_WRITE)];
        assert_eq!(
            parse(&chain, &LIM, mem(hdr(t::FLUSH, 0))).unwrap().kind,
            Kind::Flush
        );
        let chain = [
            d(0x1000, 16, F_NEXT),
            d(0x2000, 20, F_NEXT | F_WRITE),
            d(0x3000, 1, F_WRITE),
        ];
        assert_eq!(
            parse(&chain, &LIM, mem(hdr(t::GET_ID, 0))).unwrap().kind,
            Kind::GetId
        );
    }

    /// A discard range is bounded by max_discard_sectors (max_zero_bytes), not by the data
    /// limit of reads and writes: Linux sends ranges up to what the config space offers.
    #[test]
    fn discard_ranges_up_to_the_discard_limit() {
        let lim = Limits {
            max_bytes: 64 << 10,
            max_zero_bytes: 512 << 10,
            ..LIM
        };
        let range = |sectors: u32| {
            let mut v = 0u64.to_le_bytes().to_vec();
            v.extend_from_slice(&sectors.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes());
            v
        };
        let chain = [
            d(0x1000, 16, F_NEXT),
            d(0x2000, 16, F_NEXT),
            d(0x3000, 1, F_WRITE),
        ];
        for (sectors, ok) in [(1024, true), (1025, false)] {
            let h = hdr(t::DISCARD, 0);
            let mem = move |a, l| match (a, l) {
                (0x1000, 16) => Some(h.clone()),
                (0x2000, 16) => Some(range(sectors)),
                _ => None,
            };
            let r = parse(&chain, &lim, mem);
            if ok {
                assert_eq!(r.unwrap().kind, Kind::Discard(vec![(0, 512 << 10)]));
            } else {
                assert_eq!(r.unwrap_err().status, s::IOERR);
            }
        }
    }

    #[test]
    fn malformed_chains_get_ioerr_or_unsupp() {
        let ok_status = Some(0x3000);
        // Past the end, wrong direction, unaligned, no header, unknown type, read-only.
        let cases: Vec<(Vec<Desc>, Vec<u8>, u8)> = vec![
            (
                vec![
                    d(0x1000, 16, F_NEXT),
                    d(0x2000, 4096, F_WRITE | F_NEXT),
                    d(0x3000, 1, F_WRITE),
                ],
                hdr(t::IN, 2047),
                s::IOERR,
            ),
            (
                vec![
                    d(0x1000, 16, F_NEXT),
                    d(0x2000, 4096, F_NEXT),
                    d(0x3000, 1, F_WRITE),
                ],
                hdr(t::IN, 0),
                s::IOERR,
            ),
            (
                vec![
                    d(0x1000, 16, F_NEXT),
                    d(0x2000, 100, F_NEXT),
                    d(0x3000, 1, F_WRITE),
                ],
                hdr(t::OUT, 0),
                s::IOERR,
            ),
            (
                vec![d(0x1000, 8, F_NEXT), d(0x3000, 1, F_WRITE)],
                hdr(t::FLUSH, 0),
                s::IOERR,
            ),
            (
                vec![d(0x1000, 16, F_NEXT), d(0x3000, 1, F_WRITE)],
                hdr(77, 0),
                s::UNSUPP,
            ),
            (
                vec![
                    d(0x1000, 16, F_NEXT),
                    d(0x2000, 4096, F_NEXT),
                    d(0x2000, 4096, F_NEXT),
                    d(0x2000, 4096, F_NEXT),
                    d(0x2000, 4096, F_NEXT),
                    d(0x2000, 4096, F_NEXT),
                    d(0x3000, 1, F_WRITE),
                ],
                hdr(t::OUT, 0),
                s::IOERR,
            ),
        ];
        for (i, (chain, h, st)) in cases.into_iter().enumerate() {
            let e = parse(&chain, &LIM, mem(h)).unwrap_err();
            assert_eq!(
                e,
                Refused {
                    status_addr: ok_status,
                    status: st
                },
                "case {i}"
            );
        }
        let ro = Limits {
            read_only: true,
            ..LIM
        };
        let chain = [
            d(0x1000, 16, F_NEXT),
            d(0x2000, 512, F_NEXT),
            d(0x3000, 1, F_WRITE),
        ];
        assert_eq!(
            parse(&chain, &ro, mem(hdr(t::OUT, 0))).unwrap_err().status,
            s::IOERR
        );
        // No writable status: nothing to answer into.
        let chain = [d(0x1000, 16, F_NEXT), d(0x3000, 1, 0)];
        assert_eq!(
            parse(&chain, &LIM, mem(hdr(t::FLUSH, 0)))
                .unwrap_err()
                .status_addr,
            None
        );
        // A header outside guest memory.
        let chain = [d(0x9000, 16, F_NEXT), d(0x3000, 1, F_WRITE)];
        assert_eq!(
            parse(&chain, &LIM, mem(hdr(t::FLUSH, 0)))
                .unwrap_err()
                .status,
            s::IOERR
        );
    }

    #[test]
    fn random_chains_never_panic() {
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..20_000 {
            let n = rng.random_range(0..6);
            let chain: Vec<Desc> = (0..n)
                .map(|_| {
                    d(
                        rng.random_range(0..0x4000),
                        rng.random_range(0..8192),
                        rng.random_range(0..4),
                    )
                })
                .collect();
            let h: Vec<u8> = (0..16).map(|_| rng.random()).collect();
            let _ = parse(&chain, &LIM, |a, l| {
                (a < 0x4000).then(|| h.iter().copied().cycle().take(l).collect())
            });
        }
    }
}
