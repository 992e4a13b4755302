//! Bodies of the fuzz targets (`fuzz/fuzz_targets/*`), public so that the unit tests can
//! also drive them with random input on stable Rust in every CI run.
//!
//! Each body feeds arbitrary bytes to the pure parsers and the negotiation state machine
//! and checks invariants that must hold for any input: no panic, replies well formed,
//! validated commands inside the export.

use crate::negotiate::{ExportSummary, Exports, Negotiation, Outcome};
use crate::proto;
use crate::request::{self, Command, Limits};

struct FuzzExports;

impl Exports for FuzzExports {
    type Export = ();
    fn find(&self, name: &str) -> Option<((), ExportSummary)> {
        (name == "vol" || name.is_empty()).then(|| {
            (
                (),
                ExportSummary {
                    name: "vol".into(),
                    description: "fuzz".into(),
                    size: 1 << 30,
                    flags: proto::tflag::HAS_FLAGS,
                    min_block: 1,
                    preferred_block: 4096,
                    max_block: 1 << 25,
                    refused: None,
                },
            )
        })
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("vol".into(), String::new())]
    }
}

/// Walks a stream of option headers and payloads through negotiation.
pub fn negotiation(data: &[u8]) {
    let Some((flags, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(flags) = proto::parse_client_flags(*flags) else {
        return;
    };
    let mut n = Negotiation::new(flags);
    let mut out = Vec::new();
    while let Some((header, tail)) = rest.split_first_chunk::<{ proto::OPTION_HEADER_LEN }>() {
        let Ok(h) = proto::parse_option_header(header) else {
            return;
        };
        let len = (h.len as usize).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        rest = tail;
        out.clear();
        let outcome = n.handle(h.option, payload, &FuzzExports, &mut out);
        if !matches!(outcome, Outcome::Transmit(_)) || h.option != proto::opt::EXPORT_NAME {
            // Every reply is a sequence of well-formed option replies.
            let mut b = &out[..];
            while !b.is_empty() {
                assert!(b.len() >= 20, "truncated option reply");
                assert_eq!(b[..8], proto::OPTION_REPLY_MAGIC.to_be_bytes());
                let l = u32::from_be_bytes(b[16..20].try_into().expect("4")) as usize;
                assert!(b.len() >= 20 + l, "reply shorter than its length");
                b = &b[20 + l..];
            }
        }
        if !matches!(outcome, Outcome::Continue) {
            return;
        }
    }
}

/// Parses a stream of request headers and validates them against limits taken from the
/// first bytes.
pub fn requests(data: &[u8]) {
    let Some((head, mut rest)) = data.split_first_chunk::<10>() else {
        return;
    };
    let limits = Limits {
        size: u64::from(u32::from_be_bytes(head[..4].try_into().expect("4"))) << 4,
        min_block: 1 << (head[4] % 13),
        max_block: 1 << (head[5] % 26),
        read_only: head[6] & 1 != 0,
        block_status: head[6] & 2 != 0,
    };
    while !rest.is_empty() {
        let h = match proto::parse_request(rest) {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => return,
        };
        rest = &rest[proto::REQUEST_LEN..];
        let Ok(c) = request::validate(&h, &limits) else {
            continue;
        };
        let range = match c {
            Command::Read { offset, len }
            | Command::Write { offset, len, .. }
            | Command::Trim { offset, len, .. }
            | Command::WriteZeroes { offset, len, .. }
            | Command::BlockStatus { offset, len, .. } => Some((offset, len)),
            Command::Flush | Command::Cache | Command::Disconnect => None,
        };
        if let Some((offset, len)) = range {
            assert!(len > 0 && offset + u64::from(len) <= limits.size);
            assert_eq!(offset % u64::from(limits.min_block), 0);
            assert!(
                !limits.read_only
                    || matches!(c, Command::Read { .. } | Command::BlockStatus { .. })
            );
        }
        if let Command::Write { len, .. } = c {
            rest = &rest[(len as usize).min(rest.len())..];
        }
    }
}

/// Parses a datagram as the kernel's netlink answer and walks every attribute, nested ones
/// too: no panic, every payload inside the datagram.
pub fn netlink_replies(data: &[u8]) {
    use crate::netlink::{self, Reply};
    let Ok(replies) = netlink::parse(data) else {
        return;
    };
    assert!(replies.len() <= data.len() / netlink::NLMSG_HDRLEN);
    for r in replies {
        if let Reply::Message { attrs, .. } = r {
            let mut stack = vec![attrs];
            let mut walked = 0;
            while let Some(buf) = stack.pop() {
                for (ty, payload) in netlink::attrs(buf) {
                    walked += 1;
                    assert!(payload.len() <= buf.len());
                    let _ = netlink::attr_u32(payload, ty);
                    let _ = netlink::attr_u16(payload, ty);
                    if walked < 10_000 {
                        stack.push(payload);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Random and half-valid inputs through both bodies (the fuzzer goes much further).
    #[test]
    fn bodies_hold_on_random_input() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.random_range(0..512);
            let mut data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            requests(&data);
            negotiation(&data);
            netlink_replies(&data);
            if data.len() >= 20 {
                // A plausible header: length within the datagram.
                let l = rng.random_range(16..=data.len()) as u32;
                data[..4].copy_from_slice(&l.to_ne_bytes());
                data[4..6].copy_from_slice(&rng.random_range(0u16..0x30).to_ne_bytes());
                netlink_replies(&data);
            }
            // Make it look more like the protocol so the deep paths run too.
            if data.len() > 36 {
                data[..4].copy_from_slice(&[0, 0, 0, 3]);
                data[4..12].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
                data[12..16].copy_from_slice(&rng.random_range(1u32..12).to_be_bytes());
                let l = rng.random_range(0u32..24);
                data[16..20].copy_from_slice(&l.to_be_bytes());
                negotiation(&data);
                data[10..14].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
                data[16] = rng.random_range(0..9);
                requests(&data);
            }
        }
    }
}
