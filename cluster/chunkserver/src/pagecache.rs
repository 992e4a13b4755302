//! How the chunkserver's files use the page cache: folios of at most [`PIECE`].
//!
//! ext4 (Linux 6.16 and later) caches a file in folios as large as the write that created them
//! (or the readahead that read them), up to 2 MiB; every later write into such a folio walks
//! all of its buffer heads, on the write (`ext4_block_write_begin`) and again on writeback
//! (`mpage_process_page_bufs`). A volume written once with 4 MiB writes, then written with 4K
//! random writes, spent 12% of the machine's CPU there (perf, 4K randwrite QD32 on the
//! playground). So chunk files and raft log segments are written in pieces of at most 64 KiB
//! (folios of at most 16 blocks), chunk files are read without readahead (a read caches what it
//! asked for, in small folios), and the ChunkFilePool's zeroes leave the cache once synced.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// The largest write to a cached file: the largest folio it creates.
pub const PIECE: u64 = 64 << 10;

/// Writes `buf` at `offset` in writes that do not cross a [`PIECE`] boundary.
pub fn write_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let room = PIECE - offset % PIECE;
        let n = (buf.len() as u64).min(room) as usize;
        file.write_all_at(&buf[..n], offset)?;
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// As [`write_at`], but a piece of `buf` that is all zeros punches a hole instead of being
/// written (a replica installing a snapshot image keeps the holes of the leader's chunks).
pub fn write_sparse(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let room = PIECE - offset % PIECE;
        let n = (buf.len() as u64).min(room) as usize;
        let piece = &buf[..n];
        if piece.iter().all(|b| *b == 0) {
            // SAFETY: a plain syscall on an open descriptor; it touches no memory of ours.
            let rc = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    n as libc::off_t,
                )
            };
            if rc != 0 {
                file.write_all_at(piece, offset)?;
            }
        } else {
            file.write_all_at(piece, offset)?;
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Writes `len` zeroes at `offset` (in [`PIECE`]s).
pub fn write_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = [0u8; PIECE as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(PIECE - at % PIECE);
        file.write_all_at(&zeroes[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

fn fadvise(file: &File, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: a plain syscall on an open descriptor; it touches no memory of ours.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// No readahead on `file`: reads cache what they read, in folios their size.
pub fn random_access(file: &File) -> io::Result<()> {
    fadvise(file, libc::POSIX_FADV_RANDOM)
}

/// Drops `file`'s clean cached pages (a file written and synced that nothing reads soon).
pub fn drop_cached(file: &File) -> io::Result<()> {
    fadvise(file, libc::POSIX_FADV_DONTNEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_write_what_one_write_would() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        write_zeroes(&f, 0, 400_000).unwrap();
        write_at(&f, &data, 12_345).unwrap();
        random_access(&f).unwrap();
        f.sync_data().unwrap();
        drop_cached(&f).unwrap();
        let got = std::fs::read(dir.path().join("f")).unwrap();
        assert_eq!(got.len(), 400_000);
        // Written sparse over it: the same bytes, the zero pieces holes.
        let mut sparse = data.clone();
        sparse[100_000..250_000].fill(0);
        write_sparse(&f, &sparse, 12_345).unwrap();
        f.sync_data().unwrap();
        let again = std::fs::read(dir.path().join("f")).unwrap();
        assert_eq!(&again[12_345..312_345], &sparse[..]);
        assert!(again[..12_345].iter().all(|b| *b == 0));
        use std::os::unix::fs::MetadataExt;
        let blocks = f.metadata().unwrap().blocks() * 512;
        assert!(
            blocks <= 401_408 - 2 * PIECE,
            "zero pieces are holes: {blocks}"
        );
        assert!(got[..12_345].iter().all(|b| *b == 0));
        assert_eq!(&got[12_345..312_345], &data[..]);
        assert!(got[312_345..].iter().all(|b| *b == 0));
    }
}
