//! The guest's memory, mapped from the regions of SET_MEM_TABLE: translation of guest
//! physical addresses (descriptors) and front-end virtual addresses (ring addresses) to
//! pointers here, always checked against the region bounds.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::protocol::{MemRegion, ProtoError};

#[derive(Debug)]
struct Mapped {
    region: MemRegion,
    /// Where the region's first byte (`mmap_offset` into the descriptor) is mapped.
    base: *mut u8,
    /// The whole mapping: from offset 0 of the descriptor, `len` bytes.
    map: *mut u8,
    len: usize,
}

/// The mapped regions.
#[derive(Debug)]
pub struct GuestMemory {
    maps: Vec<Mapped>,
}

// SAFETY: the mappings live as long as GuestMemory; access to guest memory goes through raw
// pointers whose use (volatile ring accesses, buffers of one request) the callers order.
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        for m in &self.maps {
            // SAFETY: unmapping what we mapped (the mapping's start, not the region's), once.
            unsafe { libc::munmap(m.map.cast(), m.len) };
        }
    }
}

impl GuestMemory {
    /// Maps `regions`, one descriptor each.
    pub fn map(regions: &[MemRegion], fds: &[OwnedFd]) -> Result<Self, ProtoError> {
        if regions.len() != fds.len() {
            return Err(ProtoError::Bad(format!(
                "{} regions with {} descriptors",
                regions.len(),
                fds.len()
            )));
        }
        let mut maps = Vec::new();
        for (r, fd) in regions.iter().zip(fds) {
            let len = r
                .size
                .checked_add(r.offset)
                .filter(|l| *l <= isize::MAX as u64)
                .ok_or_else(|| ProtoError::Bad(format!("region {r:?}")))?
                as usize;
            // SAFETY: a shared mapping of the descriptor the front-end sent; unmapped on drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(ProtoError::Io(std::io::Error::last_os_error()));
            }
            maps.push(Mapped {
                region: *r,
                // SAFETY: offset is within the mapping of len = offset + size bytes.
                base: unsafe { p.cast::<u8>().add(r.offset as usize) },
                map: p.cast(),
                len,
            });
        }
        Ok(GuestMemory { maps })
    }

    /// A pointer to `[gpa, gpa + len)`, which must lie inside one region.
    pub fn gpa(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        self.maps.iter().find_map(|m| {
            let off = gpa.checked_sub(m.region.gpa)?;
            (off.checked_add(len)? <= m.region.size)
                // SAFETY: off + len is within the region's mapped size.
                .then(|| unsafe { m.base.add(off as usize) })
        })
    }

    /// A pointer to front-end virtual address `ua` (`len` bytes).
    pub fn uaddr(&self, ua: u64, len: u64) -> Option<*mut u8> {
        self.maps.iter().find_map(|m| {
            let off = ua.checked_sub(m.region.uaddr)?;
            (off.checked_add(len)? <= m.region.size)
                // SAFETY: off + len is within the region's mapped size.
                .then(|| unsafe { m.base.add(off as usize) })
        })
    }

    /// Copies guest memory out (None outside the regions).
    pub fn read(&self, gpa: u64, len: usize) -> Option<Vec<u8>> {
        let p = self.gpa(gpa, len as u64)?;
        let mut v = vec![0u8; len];
        // SAFETY: p is valid for len bytes (checked by gpa()).
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        Some(v)
    }

    /// Copies into guest memory (false outside the regions).
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        match self.gpa(gpa, data.len() as u64) {
            Some(p) => {
                // SAFETY: p is valid for data.len() bytes (checked by gpa()).
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    fn memfd(name: &std::ffi::CStr, len: u64) -> OwnedFd {
        // SAFETY: memfd_create with a valid name; the fd is owned from here on.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is not owned elsewhere.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
        fd
    }

    fn mappings_of(name: &str) -> usize {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.contains(name))
            .count()
    }

    /// QEMU's regions start at an `mmap_offset` into their descriptor (q35 splits RAM around
    /// the PCI hole): translation starts there, and dropping the table unmaps exactly what was
    /// mapped (unmapping from the region's start once took the heap with it).
    #[test]
    fn regions_at_an_offset_translate_and_unmap_whole() {
        let fd = memfd(c"curve-mem-offset-test", 4 * 4096);
        let region = MemRegion {
            gpa: 0x10_0000,
            size: 2 * 4096,
            uaddr: 0x7f00_0000_0000,
            offset: 2 * 4096,
        };
        let mem = GuestMemory::map(&[region], &[fd.try_clone().unwrap()]).unwrap();
        assert!(mem.write(0x10_0000 + 4096, b"hello"));
        assert_eq!(mem.read(0x10_0000 + 4096, 5).unwrap(), b"hello");
        assert!(
            mem.gpa(0x10_0000 + 2 * 4096 - 1, 2).is_none(),
            "past the region"
        );
        assert!(mem.uaddr(0x7f00_0000_0000 + 4096, 5).is_some());
        let mut file = vec![0u8; 5];
        // SAFETY: pread into our own buffer from our own fd.
        let n = unsafe { libc::pread(fd.as_raw_fd(), file.as_mut_ptr().cast(), 5, 3 * 4096) };
        assert_eq!(n, 5);
        assert_eq!(
            file, b"hello",
            "gpa 0x101000 is offset 2 pages + 1 page into the fd"
        );
        assert_eq!(mappings_of("curve-mem-offset-test"), 1);
        drop(mem);
        assert_eq!(
            mappings_of("curve-mem-offset-test"),
            0,
            "the whole mapping is gone"
        );
    }
}
