//! VM templates: the state and memory of a booted VM, written once when its
//! guest asks and read back by every VM that starts from it instead of
//! booting (Firecracker's snapshot restore, Kata's VM templating).
//!
//! A template VM (`snapshot.mode = "template"`) boots as usual. When its
//! guest writes [`REQUEST_MAGIC`] to I/O port [`REQUEST_PORT`] with a 32-bit
//! `out` (the vmrt agent does, once its listeners are up and before it
//! touches the shares or the host), the vCPU leaves the run loop, the other
//! vCPUs are stopped, each vCPU re-enters `KVM_RUN` once with
//! `immediate_exit` so that KVM completes the exit it was in (the `out`
//! instruction retires), and the VMM writes:
//!
//! * [`MEMORY_FILE`]: guest RAM, the ranges of [`crate::layout::ram_regions`]
//!   one after the other, with all-zero 4 KiB pages left as holes;
//! * [`STATE_FILE`]: [`VmSnapshot`] as JSON, written last (through a
//!   temporary name and `rename`), so its presence means the template is
//!   complete.
//!
//! A restoring VM (`snapshot.mode = "restore"`) creates the same VM and
//! devices, reads the data extents of [`MEMORY_FILE`] into fresh guest RAM,
//! sets the VM state (irqchip, PIT, kvmclock) and each vCPU's state, and the
//! transports re-activate their devices with the queues the driver had set
//! up. The guest resumes right after its `out`. Nothing a guest controls is
//! trusted here beyond the guest itself: the files are the VMM's own, and a
//! template that does not match the configured machine is refused with
//! [`Error::Mismatch`].
//!
//! What a template cannot carry: open vsock connections and FUSE sessions
//! (the agent requests the snapshot before it has any), the wall clock (the
//! guest's `CLOCK_REALTIME` resumes where the template stopped; the agent
//! sets it when the shim calls `Restored`), and the guest's entropy pool,
//! which every clone starts with (the agent reseeds it, also in `Restored`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, GuestMemoryRegion};

use crate::devices::virtio::GuestMemory;

/// I/O port a template's guest writes [`REQUEST_MAGIC`] to (32-bit `out`) to
/// have its VM written as a template. Must match the agent's constant
/// (`agent/src/template.rs`). Ignored unless the VM is a template.
pub const REQUEST_PORT: u16 = 0x5e0;
/// The value of a snapshot request: "SNAP" in little endian.
pub const REQUEST_MAGIC: u32 = 0x5041_4e53;
/// The template's state, JSON ([`VmSnapshot`]).
pub const STATE_FILE: &str = "state.json";
/// The template's guest RAM (sparse).
pub const MEMORY_FILE: &str = "memory";
/// Version of [`VmSnapshot`]; a template of another version is refused.
pub const FORMAT_VERSION: u32 = 1;

/// Granularity of the zero-page holes in [`MEMORY_FILE`], bytes.
const PAGE: usize = 4096;
/// Largest [`STATE_FILE`] read, bytes (one vCPU takes about 20 KiB).
pub const MAX_STATE_LEN: u64 = 8 << 20;
/// `IA32_TSC`.
const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`: the LAPIC timer's deadline in TSC-deadline mode.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Errors writing or reading a template.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which step (and vCPU).
        what: String,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// Reading or writing a template file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// Which step.
        what: &'static str,
        /// The file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// [`STATE_FILE`] is not a [`VmSnapshot`] of this version.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The template describes another machine than the one configured.
    #[error("template does not match this VM: {0}")]
    Mismatch(String),
    /// Guest memory could not be read or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The VM could not be brought to a point where it can be saved.
    #[error("the VM cannot be saved now: {0}")]
    Incomplete(String),
}

fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    let what = what.into();
    move |source| Error::Kvm { what, source }
}

/// Deserializers that refuse a KVM struct whose byte array is not exactly
/// the struct's size: kvm-bindings' own `Deserialize` pads a short array
/// with zeros (and cuts a long one), which would restore, say, a truncated
/// XSAVE area as zeros without a word.
mod exact {
    use serde::de::IntoDeserializer as _;
    use serde::{Deserialize, Deserializer};

    fn one<'de, E: serde::de::Error, T: Deserialize<'de>>(bytes: Vec<u8>) -> Result<T, E> {
        let want = std::mem::size_of::<T>();
        if bytes.len() != want {
            return Err(E::custom(format!(
                "{}: {} bytes, expected {want}",
                std::any::type_name::<T>(),
                bytes.len()
            )));
        }
        let d: serde::de::value::BytesDeserializer<'_, E> = bytes.as_slice().into_deserializer();
        // The struct's own visitor copies exactly `want` bytes from these.
        T::deserialize(d).map_err(|e: E| E::custom(e.to_string()))
    }

    /// One KVM struct, as exactly `size_of::<T>()` bytes.
    pub fn deserialize<'de, D: Deserializer<'de>, T: for<'a> Deserialize<'a>>(d: D) -> Result<T, D::Error> {
        one::<D::Error, T>(Vec::<u8>::deserialize(d)?)
    }

    /// A list of KVM structs, each as exactly `size_of::<T>()` bytes.
    pub fn vec<'de, D: Deserializer<'de>, T: for<'a> Deserialize<'a>>(d: D) -> Result<Vec<T>, D::Error> {
        Vec::<Vec<u8>>::deserialize(d)?.into_iter().map(one::<D::Error, T>).collect()
    }

    #[cfg(test)]
    pub(super) fn check<T: for<'a> Deserialize<'a>>(bytes: Vec<u8>) -> Result<T, serde::de::value::Error> {
        one::<serde::de::value::Error, T>(bytes)
    }
}

/// State of one vCPU (KVM's x86 vCPU state ioctls).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    #[serde(deserialize_with = "exact::deserialize")]
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    #[serde(deserialize_with = "exact::deserialize")]
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (legacy 4 KiB `KVM_GET_XSAVE` area).
    #[serde(deserialize_with = "exact::deserialize")]
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    #[serde(deserialize_with = "exact::deserialize")]
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    #[serde(deserialize_with = "exact::deserialize")]
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    #[serde(deserialize_with = "exact::deserialize")]
    pub lapic: kvm_lapic_state,
    /// Every MSR of `KVM_GET_MSR_INDEX_LIST` that KVM could read, in that
    /// order (TSC, TSC deadline, kvmclock, syscall MSRs, ...).
    #[serde(deserialize_with = "exact::vec")]
    pub msrs: Vec<kvm_msr_entry>,
    /// Runnable, halted or waiting for INIT/SIPI.
    #[serde(deserialize_with = "exact::deserialize")]
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    #[serde(deserialize_with = "exact::deserialize")]
    pub events: kvm_vcpu_events,
}

/// State of the UART (vm-superio's `SerialState`, field for field).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// State of the i8042 controller's registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct I8042Snapshot {
    pub ctr: u8,
    pub outp: u8,
    pub port_b: u8,
    pub status: u8,
    pub out_buf: Option<u8>,
    pub pending_cmd: Option<u8>,
}

/// Configuration of one virtqueue as the driver wrote it (virtio 1.2
/// §4.2.2). The ring positions are not saved: a template is taken with no
/// request in flight, so the device resumes at the used ring's `idx`, read
/// from guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc, guest-physical.
    pub desc_table: u64,
    /// QueueDriver (available ring), guest-physical.
    pub avail_ring: u64,
    /// QueueDevice (used ring), guest-physical.
    pub used_ring: u64,
}

/// Register file of one virtio-mmio transport.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct TransportSnapshot {
    /// DeviceID; a restore refuses a transport whose device differs.
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    /// Whether the device had been activated (DRIVER_OK accepted).
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
}

/// Everything of a template but its memory ([`STATE_FILE`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Guest RAM in bytes (the configured `memory_mib`).
    pub memory_bytes: u64,
    /// The TSC frequency of the template's vCPUs (`KVM_GET_TSC_KHZ`), kHz,
    /// if KVM reports it: the guest calibrated its clocks against it.
    pub tsc_khz: Option<u32>,
    /// The CPUID vCPU 0 of the template was given (`KVM_SET_CPUID2`): the
    /// guest kernel chose its code paths by it, so a restore on a host that
    /// offers other features is refused.
    #[serde(deserialize_with = "exact::vec")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Per vCPU, index = vCPU id.
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    #[serde(deserialize_with = "exact::vec")]
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    #[serde(deserialize_with = "exact::deserialize")]
    pub pit: kvm_pit_state2,
    /// kvmclock (`KVM_GET_CLOCK`).
    #[serde(deserialize_with = "exact::deserialize")]
    pub clock: kvm_clock_data,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The i8042.
    pub i8042: I8042Snapshot,
    /// virtio-mmio transports in slot order.
    pub transports: Vec<TransportSnapshot>,
}

/// The MSRs KVM can save for a vCPU: `KVM_GET_MSR_INDEX_LIST`.
pub fn msr_index_list(system: &Kvm) -> Result<Vec<u32>, Error> {
    Ok(system.get_msr_index_list().map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?.as_slice().to_vec())
}

/// Reads every MSR of `indices` KVM lets this vCPU read, skipping the
/// others (`KVM_GET_MSRS` stops at the first one it cannot read).
fn read_msrs(vcpu: &VcpuFd, id: usize, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> =
            rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::Format {
            path: "<msrs>".into(),
            reason: format!("MSR list of {} entries: {e:?}", entries.len()),
        })?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm(format!("vCPU {id}: KVM_GET_MSRS")))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        if n < rest.len() {
            log::debug!("vCPU {id}: MSR {:#x} not readable; not saved", rest[n]);
            rest = &rest[n + 1..];
        } else {
            break;
        }
    }
    Ok(out)
}

/// Saves a stopped vCPU. Call [`complete_pending_exit`] first.
pub fn save_vcpu(vcpu: &VcpuFd, id: usize, msr_indices: &[u32]) -> Result<VcpuState, Error> {
    let k = |what: &str| kvm(format!("vCPU {id}: {what}"));
    // Tell a kvmclock guest that it was stopped (its watchdogs must not
    // count the time on disk); EINVAL when the guest has no kvmclock yet.
    let _ = vcpu.kvmclock_ctrl();
    Ok(VcpuState {
        mp_state: vcpu.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(k("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(k("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(k("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(k("KVM_GET_XCRS"))?,
        debugregs: vcpu.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(k("KVM_GET_LAPIC"))?,
        msrs: fix_zero_tsc_deadline(read_msrs(vcpu, id, msr_indices)?),
        events: vcpu.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// A TSC deadline of 0 reads the same for "timer disarmed" and "timer fired,
/// interrupt not yet delivered"; restored as 0, the second would leave the
/// vCPU without its next timer interrupt. Firecracker sets it to the TSC, so
/// that an armed timer fires at once after the restore, and so does this.
fn fix_zero_tsc_deadline(mut msrs: Vec<kvm_msr_entry>) -> Vec<kvm_msr_entry> {
    let tsc = msrs.iter().find(|m| m.index == MSR_IA32_TSC).map(|m| m.data);
    if let (Some(tsc), Some(deadline)) = (tsc, msrs.iter_mut().find(|m| m.index == MSR_IA32_TSC_DEADLINE)) {
        if deadline.data == 0 {
            deadline.data = tsc;
        }
    }
    msrs
}

/// The MSRs in the order they are restored: the TSC deadline last, after the
/// TSC it is compared with (and after the LAPIC, restored before the MSRs).
fn restore_order(msrs: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let (deadline, mut rest): (Vec<_>, Vec<_>) = msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    rest.extend(deadline);
    rest
}

/// Re-enters `KVM_RUN` once with `immediate_exit` set, so that KVM completes
/// the I/O or MMIO exit the vCPU left the run loop with (KVM API: "userspace
/// can re-enter the guest ... with the immediate_exit field set to complete
/// pending operations without allowing any further instructions to be
/// executed"). Returns at once with `EINTR`, the expected outcome. Any exit
/// instead means the completion needs userspace again (an instruction KVM
/// emulates in several parts): the vCPU would be saved in the middle of it,
/// so that is an error.
pub fn complete_pending_exit(vcpu: &mut VcpuFd, id: usize) -> Result<(), Error> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|exit| format!("{exit:?}")).map_err(|e| e.errno());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(libc::EINTR) => Ok(()),
        Ok(exit) => Err(Error::Incomplete(format!("vCPU {id}: completing its last exit gave another exit: {exit}"))),
        Err(errno) => {
            Err(Error::Kvm { what: format!("vCPU {id}: KVM_RUN (immediate exit)"), source: kvm_ioctls::Error::new(errno) })
        }
    }
}

/// Restores a vCPU created and given its CPUID as at boot, in the order
/// Firecracker uses: MP state, registers, FPU, debug registers, LAPIC, then
/// the MSRs (the TSC deadline needs the LAPIC's timer mode), then events.
/// An MSR KVM refuses to write is skipped with a warning.
pub fn restore_vcpu(vcpu: &VcpuFd, id: usize, s: &VcpuState) -> Result<(), Error> {
    let k = |what: &str| kvm(format!("vCPU {id}: {what}"));
    vcpu.set_mp_state(s.mp_state).map_err(k("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(k("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(k("KVM_SET_SREGS"))?;
    // SAFETY: `kvm_xsave` is the legacy 4 KiB area KVM_GET_XSAVE filled on
    // this kind of host; KVM reads exactly that size from it.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(k("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(k("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs).map_err(k("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(k("KVM_SET_LAPIC"))?;
    let ordered = restore_order(&s.msrs);
    let mut rest: &[kvm_msr_entry] = &ordered;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|e| Error::Format {
            path: "<msrs>".into(),
            reason: format!("MSR list of {} entries: {e:?}", rest.len()),
        })?;
        let n = vcpu.set_msrs(&msrs).map_err(k("KVM_SET_MSRS"))?;
        if n < rest.len() {
            log::warn!("vCPU {id}: KVM refused to restore MSR {:#x}; skipped", rest[n].index);
            rest = &rest[n + 1..];
        } else {
            break;
        }
    }
    vcpu.set_vcpu_events(&s.events).map_err(k("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

const IRQCHIPS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

/// Saves the VM-wide state: irqchips, PIT, kvmclock.
pub fn save_vm(vm: &VmFd) -> Result<(Vec<kvm_irqchip>, kvm_pit_state2, kvm_clock_data), Error> {
    let mut chips = Vec::with_capacity(IRQCHIPS.len());
    for chip_id in IRQCHIPS {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        vm.get_irqchip(&mut chip).map_err(kvm(format!("KVM_GET_IRQCHIP {chip_id}")))?;
        chips.push(chip);
    }
    let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    Ok((chips, pit, clock))
}

/// Restores the VM-wide state of [`save_vm`] into a VM with an in-kernel
/// irqchip and PIT. The kvmclock is set to the saved value alone (no
/// realtime or host TSC), so guest time resumes where the template stopped.
pub fn restore_vm(vm: &VmFd, s: &VmSnapshot) -> Result<(), Error> {
    if s.irqchips.len() != IRQCHIPS.len() || s.irqchips.iter().zip(IRQCHIPS).any(|(c, id)| c.chip_id != id) {
        return Err(Error::Mismatch("irqchips are not PIC master, PIC slave, IOAPIC".into()));
    }
    for chip in &s.irqchips {
        vm.set_irqchip(chip).map_err(kvm(format!("KVM_SET_IRQCHIP {}", chip.chip_id)))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data { clock: s.clock.clock, ..Default::default() };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { what, path: path.display().to_string(), source }
}

/// Opens `path` for reading if it is a regular file, not through a symlink,
/// and at most `max_len` bytes; a FIFO or device is refused without
/// blocking on it.
fn open_regular(path: &Path, max_len: Option<u64>) -> Result<(File, u64), Error> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("opening", path))?;
    let meta = file.metadata().map_err(io_err("reading the metadata of", path))?;
    if !meta.file_type().is_file() {
        return Err(Error::Format { path: path.display().to_string(), reason: "not a regular file".into() });
    }
    if let Some(max) = max_len.filter(|&m| meta.len() > m) {
        return Err(Error::Format { path: path.display().to_string(), reason: format!("{} bytes, at most {max}", meta.len()) });
    }
    Ok((file, meta.len()))
}

/// Creates `path` for writing, mode 0600 (guest memory and state are the
/// guest's secrets), failing if anything is already there.
fn create_private(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("creating", path))
}

/// Writes guest RAM to `path` (created), region after region, leaving
/// all-zero pages as holes. Returns the bytes of data written.
pub fn write_memory(mem: &GuestMemory, path: &Path) -> Result<u64, Error> {
    let mut file = create_private(path)?;
    let mut file_offset = 0u64;
    let mut written = 0u64;
    let mut page = vec![0u8; PAGE];
    for region in mem.iter() {
        let len = region.len();
        let base = region.start_addr();
        let mut off = 0u64;
        while off < len {
            let n = PAGE.min((len - off) as usize);
            mem.read_slice(&mut page[..n], GuestAddress(base.0 + off))
                .map_err(|e| Error::Memory(format!("reading {:#x}: {e}", base.0 + off)))?;
            if page[..n].iter().any(|&b| b != 0) {
                file.seek(SeekFrom::Start(file_offset + off)).map_err(io_err("seeking in", path))?;
                file.write_all(&page[..n]).map_err(io_err("writing", path))?;
                written += n as u64;
            }
            off += n as u64;
        }
        file_offset += len;
    }
    file.set_len(file_offset).map_err(io_err("sizing", path))?;
    file.sync_all().map_err(io_err("syncing", path))?;
    Ok(written)
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA`/`SEEK_HOLE`; `None` at ENXIO
/// (no data at or after `offset`).
fn seek_data_hole(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek(2) on a descriptor we own; it only moves the offset.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    Ok(Some(r as u64))
}

/// Piece size of the parallel memory read, bytes: one huge page, so that two
/// readers never fault in the same one.
const READ_PIECE: u64 = 2 << 20;
/// Most threads reading a template's memory.
const MAX_READERS: usize = 4;

/// One piece of a data extent: `len` bytes at `file_offset` go to `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    addr: GuestAddress,
    file_offset: u64,
    len: u64,
}

/// The data extents of `file` (`size` bytes, laid out as [`write_memory`]
/// writes guest RAM) as pieces of at most [`READ_PIECE`] bytes that do not
/// cross a [`READ_PIECE`] boundary of guest-physical memory.
fn data_pieces(mem: &GuestMemory, file: &File, size: u64, path: &Path) -> Result<Vec<Piece>, Error> {
    let mut pieces = Vec::new();
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let (start, end) = (file_offset, file_offset + region.len());
        let mut pos = start;
        while pos < end {
            let Some(data) = seek_data_hole(file, pos, libc::SEEK_DATA).map_err(io_err("SEEK_DATA in", path))? else {
                break;
            };
            if data >= end {
                break;
            }
            let hole = seek_data_hole(file, data, libc::SEEK_HOLE).map_err(io_err("SEEK_HOLE in", path))?.unwrap_or(size);
            let hole = hole.min(end);
            let mut at = data;
            while at < hole {
                let addr = region.start_addr().0 + (at - start);
                let len = (READ_PIECE - addr % READ_PIECE).min(hole - at);
                pieces.push(Piece { addr: GuestAddress(addr), file_offset: at, len });
                at += len;
            }
            pos = hole;
        }
        file_offset = end;
    }
    Ok(pieces)
}

/// Reads the data extents of [`write_memory`]'s file at `path` into guest
/// RAM (holes stay the fresh mapping's zeros), on up to [`MAX_READERS`]
/// threads taking 2 MiB pieces in turn: the cost is mostly the host's page
/// faults on fresh guest RAM, which proceed in parallel. The file must be
/// exactly as long as guest RAM. Returns the bytes read.
pub fn read_memory(mem: &GuestMemory, path: &Path) -> Result<u64, Error> {
    let (file, size) = open_regular(path, None)?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    if size != total {
        return Err(Error::Mismatch(format!("{} holds {size} bytes of guest RAM, this VM has {total}", path.display())));
    }
    let pieces = data_pieces(mem, &file, size, path)?;
    let readers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_READERS);
    let read_some = |first: usize, file: &mut File| -> Result<u64, Error> {
        let mut read = 0;
        for p in pieces.iter().skip(first).step_by(readers) {
            file.seek(SeekFrom::Start(p.file_offset)).map_err(io_err("seeking in", path))?;
            mem.read_exact_volatile_from(p.addr, file, p.len as usize)
                .map_err(|e| Error::Memory(format!("reading {} into {:#x}: {e}", path.display(), p.addr.0)))?;
            read += p.len;
        }
        Ok(read)
    };
    std::thread::scope(|s| {
        let others: Vec<_> = (1..readers)
            .map(|first| {
                s.spawn(move || {
                    let (mut own, _) = open_regular(path, None)?;
                    read_some(first, &mut own)
                })
            })
            .collect();
        let mut file = file;
        let mut read = read_some(0, &mut file)?;
        for t in others {
            read += t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        }
        Ok(read)
    })
}

/// Writes `snapshot` as [`STATE_FILE`] in `dir`, through a temporary name
/// and `rename`, after the memory file is complete.
pub fn write_state(dir: &Path, snapshot: &VmSnapshot) -> Result<(), Error> {
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let json = serde_json::to_vec(snapshot)
        .map_err(|e| Error::Format { path: tmp.display().to_string(), reason: e.to_string() })?;
    let mut f = create_private(&tmp)?;
    f.write_all(&json).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    let dst = dir.join(STATE_FILE);
    std::fs::rename(&tmp, &dst).map_err(io_err("renaming to", &dst))?;
    Ok(())
}

/// Reads [`STATE_FILE`] from `dir` and checks that it describes a machine
/// with `vcpus` vCPUs, `memory_bytes` of RAM and the virtio devices
/// `device_types` (slot order).
///
/// Errors: unreadable file, malformed JSON or another [`FORMAT_VERSION`]
/// ([`Error::Format`]), another machine ([`Error::Mismatch`]).
pub fn read_state(dir: &Path, vcpus: usize, memory_bytes: u64, device_types: &[u32]) -> Result<VmSnapshot, Error> {
    let path = dir.join(STATE_FILE);
    let (file, len) = open_regular(&path, Some(MAX_STATE_LEN))?;
    let mut text = Vec::with_capacity(len as usize);
    file.take(MAX_STATE_LEN + 1).read_to_end(&mut text).map_err(io_err("reading", &path))?;
    let s: VmSnapshot = serde_json::from_slice(&text)
        .map_err(|e| Error::Format { path: path.display().to_string(), reason: e.to_string() })?;
    check_machine(&s, vcpus, memory_bytes, device_types)?;
    Ok(s)
}

/// Checks that this host gives vCPU 0 what the template's guest saw: the
/// same CPUID (`cpuid`, as set on the new vCPU 0) and TSC frequency
/// (`tsc_khz`, `None` where KVM does not report it).
pub fn check_host(s: &VmSnapshot, cpuid: &[kvm_cpuid_entry2], tsc_khz: Option<u32>) -> Result<(), Error> {
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx);
    let mut theirs: Vec<_> = s.cpuid.iter().map(key).collect();
    let mut ours: Vec<_> = cpuid.iter().map(key).collect();
    theirs.sort_unstable();
    ours.sort_unstable();
    if theirs != ours {
        let differ = theirs.iter().filter(|e| !ours.contains(e)).map(|e| format!("{:#x}/{}", e.0, e.1)).collect::<Vec<_>>();
        return Err(Error::Mismatch(format!("the host's CPUID differs from the template's (leaves {})", differ.join(" "))));
    }
    if let (Some(a), Some(b)) = (s.tsc_khz, tsc_khz) {
        if a != b {
            return Err(Error::Mismatch(format!("TSC at {a} kHz in the template, {b} kHz here")));
        }
    }
    Ok(())
}

/// The checks of [`read_state`] on a parsed snapshot.
pub fn check_machine(s: &VmSnapshot, vcpus: usize, memory_bytes: u64, device_types: &[u32]) -> Result<(), Error> {
    if s.version != FORMAT_VERSION {
        return Err(Error::Mismatch(format!("format version {}, this VMM reads {FORMAT_VERSION}", s.version)));
    }
    if s.vcpus.len() != vcpus {
        return Err(Error::Mismatch(format!("{} vCPUs in the template, {vcpus} configured", s.vcpus.len())));
    }
    if s.memory_bytes != memory_bytes {
        return Err(Error::Mismatch(format!(
            "{} MiB of memory in the template, {} MiB configured",
            s.memory_bytes >> 20,
            memory_bytes >> 20
        )));
    }
    let theirs: Vec<u32> = s.transports.iter().map(|t| t.device_type).collect();
    if theirs != device_types {
        return Err(Error::Mismatch(format!(
            "virtio devices {theirs:?} in the template, {device_types:?} configured (device types, slot order)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(mib: usize) -> (GuestMemory, crate::memory::RamMappings) {
        crate::memory::allocate(&crate::layout::ram_regions((mib as u64) << 20)).unwrap()
    }

    #[test]
    fn memory_roundtrip_keeps_data_and_leaves_zero_pages_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MEMORY_FILE);
        let (a, _ra) = mem(64);
        a.write_slice(b"head", GuestAddress(0)).unwrap();
        a.write_slice(&[0xcc; 10000], GuestAddress(0x20_0ffe)).unwrap();
        let last = a.last_addr().0;
        a.write_slice(b"z", GuestAddress(last)).unwrap();
        let written = write_memory(&a, &path).unwrap();
        // Pages touched: 0, the four pages 0x200000..0x204000 (0x200ffe..0x20370e), and the last.
        assert_eq!(written, 6 * PAGE as u64);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 << 20);

        let (b, _rb) = mem(64);
        b.write_slice(&[7; 3], GuestAddress(0x30_0000)).unwrap(); // would survive a missing overwrite of holes
        let read = read_memory(&b, &path).unwrap();
        assert!(read >= written, "read {read} < written {written}");
        let mut buf = vec![0u8; 10004];
        b.read_slice(&mut buf, GuestAddress(0x20_0ffe)).unwrap();
        assert_eq!(&buf[..10000], &[0xcc; 10000][..]);
        assert_eq!(&buf[10000..], &[0; 4]);
        let mut head = [0u8; 4];
        b.read_slice(&mut head, GuestAddress(0)).unwrap();
        assert_eq!(&head, b"head");
        let mut z = [0u8; 1];
        b.read_slice(&mut z, GuestAddress(last)).unwrap();
        assert_eq!(&z, b"z");
    }

    #[test]
    fn data_pieces_stay_within_one_huge_page_and_cover_every_extent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MEMORY_FILE);
        let (a, _ra) = mem(64);
        // 5 MiB of data from 1 MiB on: pieces 1-2, 2-4, 4-6 MiB.
        a.write_slice(&vec![0xab; 5 << 20], GuestAddress(1 << 20)).unwrap();
        write_memory(&a, &path).unwrap();
        let (file, size) = open_regular(&path, None).unwrap();
        let pieces = data_pieces(&a, &file, size, &path).unwrap();
        let spans: Vec<(u64, u64)> = pieces.iter().map(|p| (p.addr.0 >> 20, p.len >> 20)).collect();
        assert_eq!(spans, vec![(1, 1), (2, 2), (4, 2)]);
        assert!(pieces.iter().all(|p| p.file_offset == p.addr.0));
        let (b, _rb) = mem(64);
        assert_eq!(read_memory(&b, &path).unwrap(), 5 << 20);
        let mut buf = vec![0u8; 6 << 20];
        b.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert!(buf[..1 << 20].iter().all(|&x| x == 0) && buf[1 << 20..].iter().all(|&x| x == 0xab));
    }

    #[test]
    fn memory_of_another_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MEMORY_FILE);
        let (a, _ra) = mem(64);
        write_memory(&a, &path).unwrap();
        let (b, _rb) = mem(128);
        assert!(matches!(read_memory(&b, &path), Err(Error::Mismatch(_))));
    }

    fn snapshot(vcpus: usize) -> VmSnapshot {
        VmSnapshot {
            version: FORMAT_VERSION,
            memory_bytes: 256 << 20,
            tsc_khz: Some(2_000_000),
            cpuid: vec![kvm_cpuid_entry2 { function: 1, eax: 0x800f12, ..Default::default() }],
            vcpus: (0..vcpus)
                .map(|_| VcpuState {
                    regs: kvm_regs { rip: 0x1234, ..Default::default() },
                    sregs: Default::default(),
                    xsave: Default::default(),
                    xcrs: Default::default(),
                    debugregs: Default::default(),
                    lapic: Default::default(),
                    msrs: vec![kvm_msr_entry { index: 0x10, data: 42, ..Default::default() }],
                    mp_state: Default::default(),
                    events: Default::default(),
                })
                .collect(),
            irqchips: IRQCHIPS.iter().map(|&chip_id| kvm_irqchip { chip_id, ..Default::default() }).collect(),
            pit: Default::default(),
            clock: kvm_clock_data { clock: 99, ..Default::default() },
            serial: SerialSnapshot { line_status: 0x60, ..Default::default() },
            i8042: I8042Snapshot { ctr: 0x30, ..Default::default() },
            transports: vec![
                TransportSnapshot { device_type: 19, activated: true, ..Default::default() },
                TransportSnapshot { device_type: 26, ..Default::default() },
            ],
        }
    }

    #[test]
    fn state_roundtrips_through_the_file_and_is_checked_against_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), &snapshot(2)).unwrap();
        assert!(!dir.path().join(format!("{STATE_FILE}.tmp")).exists());
        let s = read_state(dir.path(), 2, 256 << 20, &[19, 26]).unwrap();
        assert_eq!(s.vcpus[1].regs.rip, 0x1234);
        assert_eq!(s.vcpus[0].msrs[0].data, 42);
        assert_eq!(s.clock.clock, 99);
        assert_eq!(s.serial.line_status, 0x60);
        assert!(s.transports[0].activated);

        for (vcpus, mem, devs) in [(1, 256 << 20, vec![19, 26]), (2, 512 << 20, vec![19, 26]), (2, 256 << 20, vec![19])] {
            let e = read_state(dir.path(), vcpus, mem, &devs).unwrap_err();
            assert!(matches!(e, Error::Mismatch(_)), "{e}");
        }
        let mut old = snapshot(2);
        old.version = FORMAT_VERSION + 1;
        assert!(matches!(check_machine(&old, 2, 256 << 20, &[19, 26]), Err(Error::Mismatch(_))));
    }

    #[test]
    fn kvm_structs_of_another_size_are_refused_not_padded() {
        let n = std::mem::size_of::<kvm_xsave>();
        assert!(exact::check::<kvm_xsave>(vec![1; n]).is_ok());
        assert!(exact::check::<kvm_xsave>(vec![1; 100]).is_err());
        assert!(exact::check::<kvm_xsave>(vec![1; n + 1]).is_err());
        // Through the file: a truncated register block fails the whole state.
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), &snapshot(1)).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        v["vcpus"][0]["regs"].as_array_mut().unwrap().truncate(8);
        std::fs::write(dir.path().join(STATE_FILE), serde_json::to_vec(&v).unwrap()).unwrap();
        let e = read_state(dir.path(), 1, 256 << 20, &[19, 26]).unwrap_err();
        assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("kvm_regs"), "{e}");
    }

    #[test]
    fn a_zero_tsc_deadline_becomes_the_tsc_and_is_restored_last() {
        let e = |index, data| kvm_msr_entry { index, data, ..Default::default() };
        let fixed = fix_zero_tsc_deadline(vec![e(MSR_IA32_TSC_DEADLINE, 0), e(MSR_IA32_TSC, 777), e(0x174, 1)]);
        assert_eq!(fixed[0].data, 777);
        let armed = fix_zero_tsc_deadline(vec![e(MSR_IA32_TSC, 777), e(MSR_IA32_TSC_DEADLINE, 900)]);
        assert_eq!(armed[1].data, 900);
        let order: Vec<u32> = restore_order(&fixed).iter().map(|m| m.index).collect();
        assert_eq!(order, vec![MSR_IA32_TSC, 0x174, MSR_IA32_TSC_DEADLINE]);
    }

    #[test]
    fn another_host_cpuid_or_tsc_frequency_is_refused() {
        let s = snapshot(1);
        let same = s.cpuid.clone();
        assert!(check_host(&s, &same, Some(2_000_000)).is_ok());
        assert!(check_host(&s, &same, None).is_ok());
        assert!(matches!(check_host(&s, &same, Some(2_100_000)), Err(Error::Mismatch(_))));
        let mut other = same.clone();
        other[0].ecx |= 1 << 31;
        let e = check_host(&s, &other, Some(2_000_000)).unwrap_err();
        assert!(e.to_string().contains("0x1/0"), "{e}");
    }

    #[test]
    fn template_files_must_be_regular_files_and_are_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A FIFO is refused at once instead of blocking the VMM.
        let fifo = dir.path().join(STATE_FILE);
        nix_mkfifo(&fifo);
        let e = read_state(dir.path(), 1, 256 << 20, &[]).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_file(&fifo).unwrap();
        // A symlink is not followed.
        std::os::unix::fs::symlink("/dev/zero", &fifo).unwrap();
        assert!(read_state(dir.path(), 1, 256 << 20, &[]).is_err());
        std::fs::remove_file(&fifo).unwrap();
        // An oversized state file is refused before it is read.
        std::fs::File::create(&fifo).unwrap().set_len(MAX_STATE_LEN + 1).unwrap();
        let e = read_state(dir.path(), 1, 256 << 20, &[]).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        std::fs::remove_file(&fifo).unwrap();
        // Written files are 0600 and never overwrite what is there.
        write_state(dir.path(), &snapshot(1)).unwrap();
        let mode = std::fs::metadata(&fifo).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (m, _r) = mem(64);
        write_memory(&m, &dir.path().join(MEMORY_FILE)).unwrap();
        assert!(write_memory(&m, &dir.path().join(MEMORY_FILE)).is_err());
    }

    fn nix_mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo(3) with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn malformed_state_is_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{\"version\": 1").unwrap();
        assert!(matches!(read_state(dir.path(), 1, 256 << 20, &[]), Err(Error::Format { .. })));
        let e = read_state(tempfile::tempdir().unwrap().path(), 1, 256 << 20, &[]).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }
}
