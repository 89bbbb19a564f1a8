//! Loading the guest payload into guest memory and the boot CPU state for
//! each boot protocol:
//!
//! * **PVH** (ELF vmlinux carrying the `XEN_ELFNOTE_PHYS32_ENTRY` note;
//!   xenbits "x86/HVM direct boot ABI"): `hvm_start_info` + memory map +
//!   module list (initrd) in guest memory, 32-bit protected mode, paging off,
//!   `ebx` = start info;
//! * **Linux 64-bit boot protocol** (ELF without the note, or bzImage;
//!   Documentation/arch/x86/boot.rst): `boot_params` (zero page) with the
//!   e820 map, identity-mapped page tables for the first GiB, long mode,
//!   `rsi` = zero page;
//! * **real mode** (test payloads only): bytes copied at an address below
//!   1 MiB, CS = 0, IP = address.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::layout::*;

/// `hvm_start_info.magic` (xen/include/public/arch-x86/hvm/start_info.h).
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Loader type "undefined" in `setup_header.type_of_loader`.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// bzImage: the 64-bit entry point is 0x200 past the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Highest initrd end address when the kernel does not say (2 GiB - 1).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Boot errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or reading a payload file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// File path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// linux-loader could not load the kernel as ELF nor as bzImage.
    #[error("kernel: not a loadable ELF vmlinux or bzImage: {0}")]
    KernelLoad(loader::Error),
    /// The initrd does not fit between the kernel and the end of low RAM.
    #[error("initrd: {size} bytes do not fit in guest memory above the kernel (end {kernel_end:#x})")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
    },
    /// The command line could not be built or written.
    #[error("cmdline: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("writing boot structures into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// How the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode at `entry`, `ebx` = [`PVH_INFO_ADDR`].
    Pvh {
        /// PVH entry point (physical).
        entry: u64,
    },
    /// Linux 64-bit boot protocol at `entry`, `rsi` = [`ZERO_PAGE_ADDR`].
    Linux64 {
        /// 64-bit entry point (physical = virtual under the identity map).
        entry: u64,
    },
    /// Real mode at CS:IP = 0:`ip`.
    RealMode {
        /// Entry address (< 1 MiB).
        ip: u64,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { what, path: path.display().to_string(), source }
}

/// Loads the kernel (ELF, falling back to bzImage), the initrd and the
/// command line, and writes the boot structures of the protocol chosen
/// (PVH when the ELF has the note). `mem_size` is the guest RAM size.
pub fn load_linux<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<BootEntry, Error> {
    let mut kfile = File::open(kernel).map_err(io_err("kernel", kernel))?;
    let himem = Some(GuestAddress(HIMEM_START));
    let (res, is_elf): (KernelLoaderResult, bool) = match Elf::load(mem, None, &mut kfile, himem) {
        Ok(r) => (r, true),
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            kfile.seek(SeekFrom::Start(0)).map_err(io_err("kernel", kernel))?;
            (BzImage::load(mem, None, &mut kfile, himem).map_err(Error::KernelLoad)?, false)
        }
        Err(e) => return Err(Error::KernelLoad(e)),
    };

    let initrd_max = res
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let initrd_loc = match initrd {
        Some(path) => Some(load_initrd(mem, mem_size, path, res.kernel_end, initrd_max)?),
        None => None,
    };

    loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline).map_err(|e| Error::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline.as_cstring().map_err(|e| Error::Cmdline(e.to_string()))?.as_bytes().len();

    match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) if is_elf => {
            write_pvh_info(mem, mem_size, initrd_loc)?;
            write_gdt(mem, &gdt_protected_mode())?;
            Ok(BootEntry::Pvh { entry: entry.raw_value() })
        }
        _ => {
            let mut params = boot_params::default();
            if let Some(hdr) = res.setup_header {
                params.hdr = hdr;
            }
            params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
            params.hdr.cmdline_size = cmdline_len as u32;
            if res.setup_header.is_none() {
                params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            }
            if let Some((addr, size)) = initrd_loc {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            let map = e820_map(mem_size);
            for (i, e) in map.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry { addr: e.addr, size: e.size, type_: e.kind };
            }
            params.e820_entries = map.len() as u8;
            mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))?;
            write_gdt(mem, &gdt_long_mode())?;
            write_page_tables(mem)?;
            let entry = if is_elf {
                res.kernel_load.raw_value()
            } else {
                res.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET
            };
            Ok(BootEntry::Linux64 { entry })
        }
    }
}

/// Places the initrd page-aligned as high as possible below the end of low
/// RAM and `initrd_max`, above the kernel. Returns (address, size).
fn load_initrd<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    path: &Path,
    kernel_end: u64,
    initrd_max: u64,
) -> Result<(u64, u64), Error> {
    let mut f = File::open(path).map_err(io_err("initrd", path))?;
    let size = f.metadata().map_err(io_err("initrd", path))?.len();
    let top = low_ram_end(mem_size).min(initrd_max.saturating_add(1));
    let addr = top.checked_sub(size).map(|a| a & !0xfff).filter(|a| *a >= kernel_end.max(HIMEM_START));
    let Some(addr) = addr else {
        return Err(Error::InitrdTooBig { size, kernel_end });
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize).map_err(|e| Error::Io {
        what: "initrd",
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok((addr, size))
}

fn write_pvh_info<M: GuestMemory>(mem: &M, mem_size: u64, initrd: Option<(u64, u64)>) -> Result<(), Error> {
    let map = e820_map(mem_size);
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 };
        mem.write_obj(entry, GuestAddress(PVH_MEMMAP_ADDR + (i * std::mem::size_of_val(&entry)) as u64))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry { paddr: addr, size, ..Default::default() };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))?;
    Ok(())
}

/// Builds a GDT descriptor from flags (type/S/DPL/P in bits 0..8, AVL/L/DB/G
/// in bits 12..16), base and 20-bit limit (Intel SDM Vol. 3A §3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// The `kvm_segment` KVM needs for descriptor `entry` at GDT index `index`.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// GDT for long mode: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub fn gdt_long_mode() -> [u64; 4] {
    [0, gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)]
}

/// GDT for 32-bit protected mode: null, flat code (0x08), flat data (0x10), TSS (0x18).
pub fn gdt_protected_mode() -> [u64; 4] {
    [0, gdt_entry(0xc09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x008b, 0, 0x67)]
}

fn write_gdt<M: GuestMemory>(mem: &M, gdt: &[u64; 4]) -> Result<(), Error> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages (PML4 → PDPT → PD).
fn write_page_tables<M: GuestMemory>(mem: &M) -> Result<(), Error> {
    mem.write_obj(PDPTE_ADDR | 0x03, GuestAddress(PML4_ADDR))?;
    mem.write_obj(PDE_ADDR | 0x03, GuestAddress(PDPTE_ADDR))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_ADDR + i * 8))?;
    }
    Ok(())
}

/// Copies a real-mode payload to `addr`.
pub fn load_real_mode<M: GuestMemory>(mem: &M, bytes: &[u8], addr: u64) -> Result<BootEntry, Error> {
    mem.write_slice(bytes, GuestAddress(addr))?;
    Ok(BootEntry::RealMode { ip: addr })
}

/// General-purpose registers of the boot vCPU for `entry`.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        BootEntry::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = PVH_INFO_ADDR;
        }
        BootEntry::Linux64 { entry } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_ADDR;
        }
        BootEntry::RealMode { ip } => {
            regs.rip = ip;
            regs.rsp = 0;
        }
    }
    regs
}

/// Adjusts `sregs` (as read from the fresh vCPU) for `entry`.
pub fn boot_sregs(sregs: &mut kvm_sregs, entry: BootEntry) {
    let gdt = match entry {
        BootEntry::Pvh { .. } => gdt_protected_mode(),
        BootEntry::Linux64 { .. } => gdt_long_mode(),
        BootEntry::RealMode { .. } => {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            return;
        }
    };
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        _ => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_segments() {
        let code64 = segment_from_gdt(gdt_long_mode()[1], 1);
        assert_eq!((code64.l, code64.db, code64.present, code64.s, code64.type_), (1, 0, 1, 1, 0xb));
        assert_eq!((code64.selector, code64.base, code64.limit, code64.g), (8, 0, 0xffff_ffff, 1));
        let code32 = segment_from_gdt(gdt_protected_mode()[1], 1);
        assert_eq!((code32.l, code32.db, code32.limit), (0, 1, 0xffff_ffff));
        let data = segment_from_gdt(gdt_long_mode()[2], 2);
        assert_eq!((data.type_, data.selector, data.unusable), (3, 0x10, 0));
        let tss = segment_from_gdt(gdt_protected_mode()[3], 3);
        assert_eq!((tss.type_, tss.s, tss.limit, tss.selector), (0xb, 0, 0x67, 0x18));
        assert_eq!(gdt_entry(0xc093, 0x1234_5678, 0xfffff) >> 56, 0x12);
        assert_eq!(segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xfffff), 2).base, 0x1234_5678);
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn long_mode_state() {
        let mut s = kvm_sregs::default();
        boot_sregs(&mut s, BootEntry::Linux64 { entry: 0x100_0000 });
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
        let r = boot_regs(BootEntry::Linux64 { entry: 0x100_0000 });
        assert_eq!((r.rip, r.rsi, r.rsp, r.rflags), (0x100_0000, ZERO_PAGE_ADDR, BOOT_STACK_POINTER, 2));
        let mut s = kvm_sregs::default();
        boot_sregs(&mut s, BootEntry::Pvh { entry: 0x100_0000 });
        assert_eq!((s.cr0 & X86_CR0_PG, s.cr4, s.efer, s.cs.db), (0, 0, 0, 1));
        assert_eq!(boot_regs(BootEntry::Pvh { entry: 5 }).rbx, PVH_INFO_ADDR);
    }

    #[test]
    fn page_tables_identity_map() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PML4_ADDR)).unwrap(), PDPTE_ADDR | 3);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PDE_ADDR + 8 * 5)).unwrap(), (5 << 21) | 0x83);
    }

    #[test]
    fn pvh_info_contents() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write_pvh_info(&mem, 64 << 20, Some((0x300_0000, 0x1234))).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!({ info.magic }, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(({ info.memmap_entries }, { info.nr_modules }), (3, 1));
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!(({ m.paddr }, { m.size }), (0x300_0000, 0x1234));
        let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_ADDR + 48)).unwrap();
        assert_eq!(({ e.addr }, { e.type_ }), (HIMEM_START, E820_RAM));
    }

    #[test]
    fn initrd_placed_high_and_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("initrd");
        std::fs::write(&p, vec![0xabu8; 10_000]).unwrap();
        let mem_size = 64u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        let (addr, size) = load_initrd(&mem, mem_size, &p, 0x200_0000, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= mem_size && addr + size > mem_size - 8192);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(addr + 9_999)).unwrap(), 0xab);
        // Does not fit above a kernel ending near the top.
        assert!(matches!(
            load_initrd(&mem, mem_size, &p, mem_size - 4096, DEFAULT_INITRD_ADDR_MAX),
            Err(Error::InitrdTooBig { .. })
        ));
    }
}
