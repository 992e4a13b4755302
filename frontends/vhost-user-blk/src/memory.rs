//! The guest's memory, mapped from the regions of SET_MEM_TABLE: translation of guest
//! physical addresses (descriptors) and front-end virtual addresses (ring addresses) to
//! pointers here, always checked against the region bounds.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::protocol::{MemRegion, ProtoError};

#[derive(Debug)]
struct Mapped {
    region: MemRegion,
    base: *mut u8,
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
            // SAFETY: unmapping what we mapped, once.
            unsafe { libc::munmap(m.base.cast(), m.len) };
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
