//! The guest's memory, mapped from the regions of SET_MEM_TABLE with `vm-memory`
//! (`GuestMemoryMmap`: bounds-checked, volatile access to memory the guest may change at any
//! time), plus what vm-memory does not know: the front-end's virtual addresses of the regions,
//! in which SET_VRING_ADDR gives the rings.

use std::fs::File;

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};

use crate::Error;

/// One region as the front-end described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Front-end (QEMU) virtual address.
    pub uaddr: u64,
    /// Offset of the region in its descriptor.
    pub offset: u64,
}

/// The mapped regions.
#[derive(Debug)]
pub struct Memory {
    mem: GuestMemoryMmap<()>,
    regions: Vec<MemRegion>,
}

impl Memory {
    /// Maps `regions`, one file each.
    pub fn map(regions: &[MemRegion], files: Vec<File>) -> Result<Self, Error> {
        if regions.len() != files.len() {
            return Err(Error::Bad(format!(
                "{} regions with {} descriptors",
                regions.len(),
                files.len()
            )));
        }
        let mut mapped = Vec::with_capacity(regions.len());
        for (r, file) in regions.iter().zip(files) {
            let size = usize::try_from(r.size)
                .ok()
                .filter(|s| *s > 0 && r.offset.checked_add(r.size).is_some())
                .ok_or_else(|| Error::Bad(format!("region {r:?}")))?;
            let map = MmapRegion::from_file(FileOffset::new(file, r.offset), size)
                .map_err(|e| Error::Bad(format!("cannot map region {r:?}: {e}")))?;
            let region = GuestRegionMmap::new(map, GuestAddress(r.gpa))
                .ok_or_else(|| Error::Bad(format!("region {r:?} overflows")))?;
            mapped.push(region);
        }
        mapped.sort_by_key(vm_memory::GuestMemoryRegion::start_addr);
        let mem = GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| Error::Bad(format!("memory table: {e}")))?;
        Ok(Memory {
            mem,
            regions: regions.to_vec(),
        })
    }

    /// The regions as the front-end described them.
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions
    }

    /// A duplicate of each region's descriptor, in the order of [`regions`](Self::regions)
    /// (to map the same memory in another process).
    pub fn files(&self) -> Result<Vec<File>, Error> {
        use vm_memory::GuestMemoryRegion;
        self.regions
            .iter()
            .map(|r| {
                let m = self
                    .mem
                    .iter()
                    .find(|m| m.start_addr().0 == r.gpa)
                    .and_then(|m| m.file_offset())
                    .ok_or_else(|| Error::Bad(format!("region {r:?} has no file")))?;
                Ok(m.file().try_clone()?)
            })
            .collect()
    }

    /// The guest memory, for virtio-queue.
    pub fn guest(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// The guest physical address of front-end virtual address `ua` (`len` bytes, inside one
    /// region).
    pub fn uaddr_to_gpa(&self, ua: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = ua.checked_sub(r.uaddr)?;
            (off.checked_add(len)? <= r.size).then(|| r.gpa + off)
        })
    }

    /// Copies guest memory out (None outside guest memory).
    pub fn read(&self, gpa: u64, len: usize) -> Option<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_into(gpa, &mut v).then_some(v)
    }

    /// Copies guest memory into `buf` (false outside guest memory).
    pub fn read_into(&self, gpa: u64, buf: &mut [u8]) -> bool {
        // One region (every buffer of a request, in practice): one lookup and a memcpy.
        match self.mem.get_slice(GuestAddress(gpa), buf.len()) {
            Ok(s) => s.copy_to(buf) == buf.len(),
            Err(_) => self.mem.read_slice(buf, GuestAddress(gpa)).is_ok(),
        }
    }

    /// Copies into guest memory (false outside guest memory).
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        match self.mem.get_slice(GuestAddress(gpa), data.len()) {
            Ok(s) => {
                s.copy_from(data);
                true
            }
            Err(_) => self.mem.write_slice(data, GuestAddress(gpa)).is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom};

    use super::*;

    pub(crate) fn memfd(name: &std::ffi::CStr, len: u64) -> File {
        // SAFETY: memfd_create with a valid name; the fd is owned from here on.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is not owned elsewhere.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn mappings_of(name: &str) -> usize {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.contains(name))
            .count()
    }

    /// QEMU's regions start at an `mmap_offset` into their descriptor (q35 splits RAM around
    /// the PCI hole): translation starts there, and dropping the table unmaps what was mapped.
    #[test]
    fn regions_at_an_offset_translate_and_unmap() {
        let mut fd = memfd(c"curve-mem-offset-test", 4 * 4096);
        let region = MemRegion {
            gpa: 0x10_0000,
            size: 2 * 4096,
            uaddr: 0x7f00_0000_0000,
            offset: 2 * 4096,
        };
        let mem = Memory::map(&[region], vec![fd.try_clone().unwrap()]).unwrap();
        assert!(mem.write(0x10_0000 + 4096, b"hello"));
        assert_eq!(mem.read(0x10_0000 + 4096, 5).unwrap(), b"hello");
        assert!(
            mem.read(0x10_0000 + 2 * 4096 - 1, 2).is_none(),
            "past the region"
        );
        assert_eq!(
            mem.uaddr_to_gpa(0x7f00_0000_0000 + 4096, 5),
            Some(0x10_0000 + 4096)
        );
        assert_eq!(mem.uaddr_to_gpa(0x7f00_0000_0000 + 2 * 4096 - 1, 2), None);
        let mut file = vec![0u8; 5];
        fd.seek(SeekFrom::Start(3 * 4096)).unwrap();
        fd.read_exact(&mut file).unwrap();
        assert_eq!(
            file, b"hello",
            "gpa 0x101000 is offset 2 pages + 1 page into the fd"
        );
        assert_eq!(mappings_of("curve-mem-offset-test"), 1);
        drop(mem);
        assert_eq!(mappings_of("curve-mem-offset-test"), 0, "unmapped");
    }
}
