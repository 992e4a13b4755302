//! The bodies of the fuzz targets (`fuzz/`), also driven with random input by unit tests.

use crate::protocol;
use crate::request::{Desc, Limits, Request, parse};

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

/// Payloads from `data` through the message parsers.
pub fn messages(data: &[u8]) {
    let _ = protocol::parse_u64(data);
    let _ = protocol::parse_state(data);
    let _ = protocol::parse_addr(data);
    let _ = protocol::parse_mem_table(data);
    let _ = protocol::parse_inflight(data);
    let _ = protocol::parse_config(data);
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
    }
}
