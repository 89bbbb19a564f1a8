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
//! not unmap them: [`RamMappings`] does, when dropped, for each region no
//! clone of the [`GuestMemory`] still refers to (one still in use is left
//! mapped, never unmapped under its user).

use std::ptr::NonNull;
use std::sync::Arc;

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

/// One guest RAM mapping: the region vm-memory uses (shared with every
/// clone of the guest memory) and the host range to unmap.
#[derive(Debug)]
struct Mapping {
    region: Arc<GuestRegionMmap>,
    ptr: NonNull<u8>,
    len: usize,
    /// The whole reservation `ptr` lies in (guest range plus its
    /// inaccessible head and tail), unmapped together.
    reservation: (usize, usize),
}

/// Host mappings backing a [`GuestMemory`]; unmapped on drop.
///
/// Drop it after the guest memory's users (vCPUs, devices and their
/// workers): a region that a clone of the guest memory still refers to at
/// that point is left mapped (and a warning logged) rather than unmapped
/// under its user.
#[derive(Debug)]
pub struct RamMappings {
    maps: Vec<Mapping>,
}

// SAFETY: `ptr` is only ever passed to munmap, which may run on any thread;
// the region is Send + Sync itself.
unsafe impl Send for RamMappings {}
// SAFETY: as above; shared references give no access through `ptr`.
unsafe impl Sync for RamMappings {}

impl RamMappings {
    /// Host addresses and lengths (bytes) of the mappings, in range order.
    pub fn host_ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.maps.iter().map(|m| (m.ptr.as_ptr() as usize, m.len))
    }
}

impl Drop for RamMappings {
    fn drop(&mut self) {
        for m in self.maps.drain(..) {
            // Only this struct holds the region: no guest memory refers to the
            // range any more, and none can be made from it (cloning needs a
            // reference to an existing holder).
            if Arc::strong_count(&m.region) == 1 {
                drop(m.region);
                // SAFETY: the reservation is a mapping `allocate` made, nothing
                // else unmaps it, and its only region was just dropped.
                unsafe { libc::munmap(m.reservation.0 as *mut libc::c_void, m.reservation.1) };
            } else {
                log::warn!(
                    "guest RAM at host {:p} ({} bytes) still in use at teardown: left mapped",
                    m.ptr,
                    m.len
                );
                // The other holders keep the region alive; the range stays
                // mapped until the process exits.
            }
        }
    }
}

/// Maps `len` bytes of zeroed anonymous private memory at a host address
/// aligned to [`HUGE_PAGE_SIZE`], advised `MADV_HUGEPAGE`. Returns that
/// address and the reservation (address, length) it lies in.
fn map_aligned(addr: GuestAddress, len: usize) -> Result<(NonNull<u8>, (usize, usize)), Error> {
    let bad = || Error::BadRange { addr: addr.0, len };
    if len == 0 || len % PAGE_SIZE != 0 {
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
    // Use the aligned `len` bytes inside the reservation; the unaligned head
    // and the tail (whole pages: the kernel's address and `len` are page
    // multiples) stay reserved but inaccessible. Unmapping them would leave
    // holes next to guest RAM where later small mappings (thread stacks)
    // land 2 MiB-aligned and get a huge page each on a THP=always host.
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE_SIZE);
    let head = start - base;
    let tail = reserve - head - len;
    // SAFETY: both ranges lie inside the mapping just made and nothing
    // refers to them; madvise only changes how the kept range is backed.
    unsafe {
        if head > 0 {
            libc::mprotect(base as *mut libc::c_void, head, libc::PROT_NONE);
        }
        if tail > 0 {
            libc::mprotect((start + len) as *mut libc::c_void, tail, libc::PROT_NONE);
        }
        // EINVAL on a host kernel without THP: the memory then works with
        // small pages, so the advice is best effort.
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    // start >= base > 0: not null.
    Ok((NonNull::new(start as *mut u8).expect("aligned mapping address is not null"), (base, reserve)))
}

/// Allocates guest RAM for `ranges` (guest address, length in bytes; see
/// [`crate::layout::ram_regions`]): one 2 MiB-aligned, `MADV_HUGEPAGE`
/// mapping per range. Returns the guest memory and the mappings' owner
/// (see [`RamMappings`] for the order to drop them in).
///
/// Errors: [`Error::BadRange`] for an empty range, [`Error::Mmap`] when the
/// host refuses the memory, [`Error::Regions`] for overlapping ranges.
pub fn allocate(ranges: &[(GuestAddress, usize)]) -> Result<(GuestMemory, RamMappings), Error> {
    let mut owner = RamMappings { maps: Vec::with_capacity(ranges.len()) };
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        let (ptr, reservation) = map_aligned(addr, len)?;
        // Unmapped on the error paths below: nothing refers to it yet.
        let unmap = || {
            // SAFETY: the mapping map_aligned just made; no region exists on it.
            unsafe { libc::munmap(reservation.0 as *mut libc::c_void, reservation.1) };
        };
        // SAFETY: `ptr` is a live read-write private mapping of `len` bytes,
        // unmapped only by `owner` once no region built here is in use.
        let region = match unsafe {
            MmapRegion::build_raw(
                ptr.as_ptr(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        } {
            Ok(r) => r,
            Err(e) => {
                unmap();
                return Err(Error::Regions(e.to_string()));
            }
        };
        let Some(region) = GuestRegionMmap::new(region, addr) else {
            unmap();
            return Err(Error::Regions(format!(
                "region at {:#x} of {len:#x} bytes passes the end of the guest address space",
                addr.0
            )));
        };
        let region = Arc::new(region);
        owner.maps.push(Mapping { region: region.clone(), ptr, len, reservation });
        regions.push(region);
    }
    let mem = GuestMemory::from_arc_regions(regions).map_err(|e| Error::Regions(e.to_string()))?;
    Ok((mem, owner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestMemory as _, GuestMemoryRegion};

    /// The tests look mappings up by address in /proc/self/smaps: one at a
    /// time, so one test's mapping cannot reuse an address another checks.
    static SMAPS: Mutex<()> = Mutex::new(());

    /// (start, end, VmFlags) of the /proc/self/smaps entry that contains host address
    /// `addr`, or None when nothing is mapped there.
    fn mapping_at(addr: usize) -> Option<(usize, usize, String)> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut current = None;
        for line in smaps.lines() {
            // Entry headers look like "7f12a0000000-7f12a0600000 rw-p ...".
            let first = line.split(' ').next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-') {
                if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                    current = (lo <= addr && addr < hi).then_some((lo, hi));
                    continue;
                }
            }
            if let (Some((lo, hi)), Some(flags)) = (current, line.strip_prefix("VmFlags:")) {
                return Some((lo, hi, flags.trim().to_string()));
            }
        }
        None
    }

    /// Whether the host kernel has transparent huge pages (else no "hg").
    fn host_has_thp() -> bool {
        std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists()
    }

    #[test]
    fn guest_ram_is_aligned_advised_zeroed_and_unmapped_on_drop() {
        let _serial = SMAPS.lock().unwrap_or_else(|e| e.into_inner());
        let ranges = [(GuestAddress(0), 6 << 20), (GuestAddress(1 << 32), 2 << 20)];
        let (mem, owner) = allocate(&ranges).unwrap();
        let hosts: Vec<(usize, usize)> = owner.host_ranges().collect();
        assert_eq!(hosts.len(), 2);
        for (region, &(host, len)) in mem.iter().zip(&hosts) {
            assert_eq!(host % HUGE_PAGE_SIZE, 0, "host address {host:#x} not 2 MiB aligned");
            assert_eq!(region.as_ptr() as usize, host);
            assert_eq!(region.len() as usize, len);
            // Exactly the range: the unaligned head and the tail are separate
            // and inaccessible.
            let (lo, hi, flags) = mapping_at(host).expect("mapping listed in smaps");
            assert_eq!((lo, hi), (host, host + len), "mapping {lo:#x}-{hi:#x}");
            // "hg": MADV_HUGEPAGE.
            if host_has_thp() {
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
            // Only these tests make "hg" mappings, one at a time: whatever
            // may be mapped there now is not ours.
            if let Some((lo, hi, flags)) = mapping_at(host) {
                assert!(!flags.split(' ').any(|f| f == "hg"), "{lo:#x}-{hi:#x} still advised after drop: {flags}");
            }
        }
    }

    #[test]
    fn guest_ram_still_in_use_is_not_unmapped() {
        let _serial = SMAPS.lock().unwrap_or_else(|e| e.into_inner());
        let (mem, owner) = allocate(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let (host, len) = owner.host_ranges().next().unwrap();
        let clone = mem.clone();
        drop(mem);
        drop(owner);
        // A device still holding guest memory can use it.
        clone.write_obj(7u32, GuestAddress(0x100)).unwrap();
        assert_eq!(clone.read_obj::<u32>(GuestAddress(0x100)).unwrap(), 7);
        let (lo, hi, _) = mapping_at(host).expect("still mapped");
        assert_eq!((lo, hi), (host, host + len));
    }

    #[test]
    fn bad_ranges_are_refused() {
        let _serial = SMAPS.lock().unwrap_or_else(|e| e.into_inner());
        assert!(matches!(allocate(&[(GuestAddress(0), 0)]), Err(Error::BadRange { .. })));
        assert!(matches!(allocate(&[(GuestAddress(0), 4097)]), Err(Error::BadRange { .. })));
        assert!(matches!(allocate(&[(GuestAddress(0), usize::MAX - 4095)]), Err(Error::BadRange { .. })));
        let overlap = [(GuestAddress(0), 4 << 20), (GuestAddress(2 << 20), 4 << 20)];
        assert!(matches!(allocate(&overlap), Err(Error::Regions(_))));
    }
}
