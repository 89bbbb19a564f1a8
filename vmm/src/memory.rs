//! Guest RAM: anonymous host mappings aligned for huge pages.
//!
//! Each RAM range of [`crate::layout::ram_regions`] is one private anonymous
//! mapping whose host address is aligned to [`HUGE_PAGE_SIZE`] (2 MiB) and
//! advised `MADV_HUGEPAGE`. KVM maps guest memory with 2 MiB nested page
//! table entries only where the guest-physical and the host-virtual
//! addresses agree modulo 2 MiB and the host backs the range with a
//! transparent huge page; otherwise every 4 KiB page the guest touches for
//! the first time costs one nested page fault. QEMU allocates guest RAM the
//! same way. `mmap(NULL, ..)`, which vm-memory's own allocation uses, gives
//! only 4 KiB alignment, and hosts whose THP mode is `madvise` (Debian's
//! default) back nothing with huge pages unless asked.
//!
//! The mappings are handed to vm-memory as raw regions, so vm-memory does
//! not unmap them: [`RamMappings`] does, when dropped, and must therefore
//! outlive every clone of the [`GuestMemory`] built on them.

use std::ptr::NonNull;

use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};

use crate::devices::virtio::GuestMemory;

/// Alignment of every guest RAM mapping, in bytes: the x86-64 PMD size.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Host page size the ranges must be multiples of, in bytes.
const PAGE_SIZE: usize = 4096;

/// Errors allocating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A range's length is 0, not a multiple of 4 KiB, or overflows once
    /// the alignment is added.
    #[error("guest RAM range at {addr:#x} has an invalid length {len:#x}")]
    BadRange {
        /// Guest-physical start of the range.
        addr: u64,
        /// Length of the range in bytes.
        len: usize,
    },
    /// The host refused the mapping (typically ENOMEM: not enough address
    /// space or overcommit refused).
    #[error("mapping {len} bytes of guest RAM at guest address {addr:#x}: {source}")]
    Mmap {
        /// Guest-physical start of the range.
        addr: u64,
        /// Length of the range in bytes.
        len: usize,
        /// The mmap(2) error.
        source: std::io::Error,
    },
    /// vm-memory rejected the regions (overlap, or a region past the end of
    /// the guest address space).
    #[error("guest memory regions: {0}")]
    Regions(String),
}

/// Host mappings backing a [`GuestMemory`]; unmapped on drop.
///
/// Keep it alive until every clone of the guest memory is gone (devices
/// joined, vCPUs dropped): the guest memory's regions point into these
/// mappings but do not own them.
#[derive(Debug)]
pub struct RamMappings {
    maps: Vec<(NonNull<u8>, usize)>,
}

// SAFETY: the struct only records (address, length) pairs of mappings it
// owns; it never dereferences them, and munmap may run on any thread.
unsafe impl Send for RamMappings {}
// SAFETY: as above; shared references give no access to the memory.
unsafe impl Sync for RamMappings {}

impl RamMappings {
    /// Host addresses and lengths (bytes) of the mappings, in range order.
    pub fn host_ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.maps.iter().map(|(p, len)| (p.as_ptr() as usize, *len))
    }
}

impl Drop for RamMappings {
    fn drop(&mut self) {
        for (ptr, len) in self.maps.drain(..) {
            // SAFETY: (ptr, len) is a mapping `allocate` made and nothing else
            // unmaps; the owner outlives the guest memory built on it.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
        }
    }
}

/// Maps `len` bytes of zeroed anonymous private memory at a host address
/// aligned to [`HUGE_PAGE_SIZE`], advised `MADV_HUGEPAGE`.
fn map_aligned(addr: GuestAddress, len: usize) -> Result<NonNull<u8>, Error> {
    let bad = || Error::BadRange { addr: addr.0, len };
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
        return Err(bad());
    }
    let reserve = len.checked_add(HUGE_PAGE_SIZE).ok_or_else(bad)?;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks;
    // nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(Error::Mmap { addr: addr.0, len, source: std::io::Error::last_os_error() });
    }
    // Keep the aligned `len` bytes inside the reservation, give back the
    // unaligned head and the rest of the tail (both whole pages: the kernel's
    // address and `len` are page multiples).
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE_SIZE);
    let head = start - base;
    let tail = reserve - head - len;
    // SAFETY: both ranges lie inside the mapping just made and nothing
    // refers to them; madvise only changes how the kept range is backed.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
        // EINVAL on a host kernel without THP: the memory then works with
        // small pages, so the advice is best effort.
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    // start > base >= 0 and start is a multiple of 2 MiB: not null.
    Ok(NonNull::new(start as *mut u8).expect("aligned mapping address is not null"))
}

/// Allocates guest RAM for `ranges` (guest address, length in bytes; see
/// [`crate::layout::ram_regions`]): one 2 MiB-aligned, `MADV_HUGEPAGE`
/// mapping per range. Returns the guest memory and the mappings' owner.
///
/// Errors: [`Error::BadRange`] for an empty range, [`Error::Mmap`] when the
/// host refuses the memory, [`Error::Regions`] for overlapping ranges.
pub fn allocate(ranges: &[(GuestAddress, usize)]) -> Result<(GuestMemory, RamMappings), Error> {
    let mut owner = RamMappings { maps: Vec::with_capacity(ranges.len()) };
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        let ptr = map_aligned(addr, len)?;
        owner.maps.push((ptr, len));
        // SAFETY: `ptr` is a live read-write private mapping of `len` bytes,
        // unmapped only by `owner`, which the caller keeps alive as long as
        // the guest memory (documented on RamMappings).
        let region = unsafe {
            MmapRegion::build_raw(
                ptr.as_ptr(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| Error::Regions(e.to_string()))?;
        let region = GuestRegionMmap::new(region, addr).ok_or_else(|| {
            Error::Regions(format!("region at {:#x} of {len:#x} bytes passes the end of the guest address space", addr.0))
        })?;
        regions.push(region);
    }
    let mem = GuestMemory::from_regions(regions).map_err(|e| Error::Regions(e.to_string()))?;
    Ok((mem, owner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory as _, GuestMemoryRegion};

    /// VmFlags of the /proc/self/smaps entry that starts at host address
    /// `start`, or None when no mapping starts there.
    fn vm_flags(start: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_entry = false;
        for line in smaps.lines() {
            // Entry headers look like "7f12a0000000-7f12a0600000 rw-p ...".
            let first = line.split(' ').next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-') {
                if let (Ok(lo), Ok(_)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                    in_entry = lo == start;
                    continue;
                }
            }
            if let (true, Some(flags)) = (in_entry, line.strip_prefix("VmFlags:")) {
                return Some(flags.trim().to_string());
            }
        }
        None
    }

    #[test]
    fn guest_ram_is_aligned_advised_zeroed_and_unmapped_on_drop() {
        let ranges = [(GuestAddress(0), 6 << 20), (GuestAddress(1 << 32), 2 << 20)];
        let (mem, owner) = allocate(&ranges).unwrap();
        let hosts: Vec<(usize, usize)> = owner.host_ranges().collect();
        assert_eq!(hosts.len(), 2);
        for (region, &(host, len)) in mem.iter().zip(&hosts) {
            assert_eq!(host % HUGE_PAGE_SIZE, 0, "host address {host:#x} not 2 MiB aligned");
            assert_eq!(region.as_ptr() as usize, host);
            assert_eq!(region.len() as usize, len);
            let flags = vm_flags(host).expect("mapping listed in smaps");
            // "hg": MADV_HUGEPAGE; absent only on a host kernel without THP.
            if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
                assert!(flags.split(' ').any(|f| f == "hg"), "VmFlags {flags}");
            }
        }
        // Zeroed, writable, and guest addresses map to the right region.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0);
        mem.write_obj(0xfeed_u64, GuestAddress((1 << 32) + 8)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress((1 << 32) + 8)).unwrap(), 0xfeed);
        assert!(mem.read_obj::<u64>(GuestAddress(6 << 20)).is_err(), "gap is not RAM");
        drop(mem);
        drop(owner);
        for (host, _) in hosts {
            assert_eq!(vm_flags(host), None, "mapping at {host:#x} still there after drop");
        }
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(matches!(allocate(&[(GuestAddress(0), 0)]), Err(Error::BadRange { .. })));
        assert!(matches!(allocate(&[(GuestAddress(0), 4097)]), Err(Error::BadRange { .. })));
        assert!(matches!(allocate(&[(GuestAddress(0), usize::MAX - 4095)]), Err(Error::BadRange { .. })));
        let overlap = [(GuestAddress(0), 4 << 20), (GuestAddress(2 << 20), 4 << 20)];
        assert!(matches!(allocate(&overlap), Err(Error::Regions(_))));
    }
}
