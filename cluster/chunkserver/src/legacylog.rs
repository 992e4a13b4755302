//! The raft log format before the per-disk [`LogStream`](crate::logstream::LogStream): one log
//! per copyset, read once when a copyset opens, moved into the stream and deleted.
//!
//! ```text
//!  <copyset>/raft/log_<first index, 20 digits>   segments
//!      record: len u32 | crc32 u32 | index u64 | entry (len bytes)
//!      `len`'s top bit set: the entry is protobuf (curve.raft.Entry); clear: bincode of
//!      openraft's Entry (the oldest logs)
//!      a zero `len` ends a segment's records
//!  <copyset>/raft/free_<n>                        purged segments kept for reuse
//! ```
//!
//! Recovery is the one those logs were written for: it scans the segments up to the first
//! terminator, bad checksum, gap or decrease of the term (records a truncation cut off).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use openraft::Entry;

use crate::raft::TypeConfig;

const HEADER: u64 = 16;

/// The top bit of a record's `len`: its entry is protobuf.
pub(crate) const PROTOBUF: u32 = 1 << 31;

/// An entry from its record's payload, in the format the record's `len` names.
fn decode_record(len_field: u32, payload: bytes::Bytes) -> io::Result<Entry<TypeConfig>> {
    if len_field & PROTOBUF != 0 {
        crate::codec::decode_entry(payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    } else {
        bincode::deserialize(&payload).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bincode entry (a log written before protobuf entries): {e}"),
            )
        })
    }
}

pub(crate) fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("log_{first:020}"))
}

/// Whether `dir` holds segments of a log in this format.
pub(crate) fn present(dir: &Path) -> io::Result<bool> {
    Ok(std::fs::read_dir(dir)?.filter_map(|e| e.ok()).any(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("log_"))
    }))
}

/// Reads the log in `dir`: its entries after `purged`, in order, handed to `each` one at a
/// time (a log of any size is moved without holding it in memory).
pub(crate) fn read(
    dir: &Path,
    purged: Option<u64>,
    mut each: impl FnMut(Entry<TypeConfig>) -> io::Result<()>,
) -> io::Result<()> {
    let mut firsts: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("log_"))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    firsts.sort_unstable();
    let mut expect: Option<u64> = None;
    // Terms never decrease along a log: a record of an older term after a newer one is what
    // a truncation cut off (new records of the same size end where an old one starts).
    let mut last_term: Option<u64> = None;
    for first in firsts {
        let file = File::open(segment_path(dir, first))?;
        let size = file.metadata()?.len();
        let mut at = 0u64;
        let mut header = [0u8; HEADER as usize];
        while at + HEADER <= size {
            file.read_exact_at(&mut header, at)?;
            let len_field = u32::from_le_bytes(header[0..4].try_into().expect("4"));
            let len = len_field & !PROTOBUF;
            let crc = u32::from_le_bytes(header[4..8].try_into().expect("4"));
            let index = u64::from_le_bytes(header[8..16].try_into().expect("8"));
            if len_field == 0 || at + HEADER + u64::from(len) > size {
                break;
            }
            let mut payload = vec![0u8; len as usize];
            file.read_exact_at(&mut payload, at + HEADER)?;
            let mut h = crc32fast::Hasher::new();
            h.update(&header[8..16]);
            h.update(&payload);
            if h.finalize() != crc
                || expect.is_some_and(|e| e != index)
                || (at == 0 && index != first)
            {
                break;
            }
            // The checksum matched: a record that does not decode is not a torn write but a
            // format this version cannot read; refused, never taken for the log's end.
            let entry = decode_record(len_field, payload.into()).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "raft log {}: record {index} does not decode: {e}",
                        segment_path(dir, first).display()
                    ),
                )
            })?;
            let term = entry.log_id.leader_id.term;
            if last_term.is_some_and(|t| term < t) {
                break;
            }
            last_term = Some(term);
            expect = Some(index + 1);
            at += HEADER + u64::from(len);
            if purged.is_none_or(|p| index > p) {
                each(entry)?;
            }
        }
    }
    Ok(())
}

/// Deletes the log's segments (after its entries are durable in the stream).
pub(crate) fn remove(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)?.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let name = name.to_str().unwrap_or_default();
        if name.starts_with("log_") || name.starts_with("free_") {
            std::fs::remove_file(e.path())?;
        }
    }
    crate::chunkfilepool::sync_dir(&dir.join("raft_meta"))
}

/// Writes `entries` as a log of this format in `dir` (tests of the move into the stream):
/// records in one segment named after the first, protobuf or bincode, the rest zeroes.
#[cfg(test)]
pub(crate) fn write_for_test(dir: &Path, entries: &[Entry<TypeConfig>], protobuf: bool) {
    let mut buf = Vec::new();
    for e in entries {
        let payload = if protobuf {
            crate::codec::encode_entry(e)
        } else {
            bincode::serialize(e).unwrap()
        };
        let index = e.log_id.index;
        let mut h = crc32fast::Hasher::new();
        h.update(&index.to_le_bytes());
        h.update(&payload);
        let flag = if protobuf { PROTOBUF } else { 0 };
        buf.extend_from_slice(&(payload.len() as u32 | flag).to_le_bytes());
        buf.extend_from_slice(&h.finalize().to_le_bytes());
        buf.extend_from_slice(&index.to_le_bytes());
        buf.extend_from_slice(&payload);
    }
    buf.resize(buf.len() + (64 << 10), 0);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(segment_path(dir, entries[0].log_id.index), buf).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(segment_path(dir, entries[0].log_id.index))
        .unwrap();
    f.sync_all().unwrap();
}
