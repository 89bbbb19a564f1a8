//! x86_64 guest physical memory layout: where RAM, boot structures, the
//! 32-bit MMIO gap and the virtio-mmio devices live, and the e820 map
//! describing it to the guest.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_7000  boot_params (zero page)
//! 0x0000_0520  IDT (empty)              0x0000_8ff0  initial stack (64-bit boot)
//! 0x0000_6000  PVH hvm_start_info       0x0000_9000  PML4, PDPT, PD (0x9000..0xc000)
//! 0x0000_6040  PVH memmap               0x0002_0000  kernel command line
//! 0x0000_6400  PVH module list          0x0009_fc00  MP table (EBDA) .. 0xa0000
//! 0x0010_0000  high memory (kernel, initrd near the top of low RAM)
//! 0xc000_0000  MMIO gap: virtio-mmio at 0xd000_0000 + i*0x1000, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above the gap, if memory > 3 GiB
//! ```

use vm_memory::GuestAddress;

/// Start of the 32-bit MMIO gap (no RAM from here to 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device (docs/contracts.md).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IRQ of the first virtio-mmio device; device `i` gets `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IRQ of the 8250 serial port (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// IOAPIC base address.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (three pages, inside the gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page (one page just below the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// IDT location (limit 0: no IDT until the kernel loads one).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info` location.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map location.
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// PVH module list location (initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6400;
/// Linux `boot_params` (zero page) location.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 page table.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT page table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// Page directory (identity maps the first GiB with 2 MiB pages).
pub const PDE_ADDR: u64 = 0xb000;
/// Kernel command line location.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Capacity reserved for the command line, bytes including NUL
/// (Linux/x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of conventional memory (start of the VGA hole).
pub const LOW_MEM_END: u64 = 0xa_0000;
/// Start of high memory: where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// e820 entry type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One e820 map entry: `[addr, addr + size)` of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// RAM regions for `mem_size` bytes of guest memory: below the gap, and the
/// remainder above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (mem_size - MMIO_GAP_START) as usize),
        ]
    }
}

/// End of RAM below the gap (exclusive).
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// The e820 map for `mem_size` bytes of RAM (needs at least 1 MiB): low
/// memory up to the EBDA, the EBDA (MP table) reserved, high memory up to the
/// gap, RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: EBDA_START, kind: E820_RAM },
        E820Entry { addr: EBDA_START, size: LOW_MEM_END - EBDA_START, kind: E820_RESERVED },
        E820Entry { addr: HIMEM_START, size: low_ram_end(mem_size) - HIMEM_START, kind: E820_RAM },
    ];
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry { addr: MMIO_GAP_END, size: mem_size - MMIO_GAP_START, kind: E820_RAM });
    }
    map
}

/// MMIO window of virtio device `index`: (base address, IRQ).
pub fn virtio_slot(index: usize) -> (u64, u32) {
    (VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE, VIRTIO_IRQ_BASE + index as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(GuestAddress(0), MMIO_GAP_START as usize)]);
    }

    #[test]
    fn large_memory_skips_the_gap() {
        let mem = 8u64 << 30;
        let r = ram_regions(mem);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(1 << 32));
        assert_eq!(r[0].1 as u64 + r[1].1 as u64, mem);
        // No RAM overlaps the gap or the device windows.
        for (start, len) in r {
            let end = start.0 + len as u64;
            assert!(end <= MMIO_GAP_START || start.0 >= MMIO_GAP_END);
        }
    }

    #[test]
    fn e820_small() {
        let m = e820_map(256 << 20);
        assert_eq!(
            m,
            vec![
                E820Entry { addr: 0, size: 0x9fc00, kind: E820_RAM },
                E820Entry { addr: 0x9fc00, size: 0x400, kind: E820_RESERVED },
                E820Entry { addr: 0x100000, size: (256 << 20) - 0x100000, kind: E820_RAM },
            ]
        );
    }

    #[test]
    fn e820_large_covers_all_ram_outside_gap() {
        let mem = 4u64 << 30;
        let m = e820_map(mem);
        assert_eq!(m.len(), 4);
        assert_eq!(m[2], E820Entry { addr: HIMEM_START, size: MMIO_GAP_START - HIMEM_START, kind: E820_RAM });
        assert_eq!(m[3], E820Entry { addr: 1 << 32, size: 1 << 30, kind: E820_RAM });
        // Entries sorted and non-overlapping.
        for w in m.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
        // Every entry lies in RAM.
        let regions = ram_regions(mem);
        for e in &m {
            assert!(regions.iter().any(|(s, l)| e.addr >= s.0 && e.addr + e.size <= s.0 + *l as u64));
        }
    }

    #[test]
    fn virtio_slots_match_contract() {
        assert_eq!(virtio_slot(0), (0xd000_0000, 5));
        assert_eq!(virtio_slot(2), (0xd000_2000, 7));
        let (last, irq) = virtio_slot(crate::config::MAX_VIRTIO_DEVICES - 1);
        assert_eq!(irq, 23);
        assert!(last + VIRTIO_MMIO_SIZE <= IOAPIC_ADDR);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 8),
            (PVH_INFO_ADDR, 0x40),
            (PVH_MEMMAP_ADDR, 0x3c0),
            (PVH_MODLIST_ADDR, 0x20),
            (ZERO_PAGE_ADDR, 0x1000),
            (BOOT_STACK_POINTER - 0x800, 0x810),
            (PML4_ADDR, 0x3000),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, LOW_MEM_END - EBDA_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
    }
}
