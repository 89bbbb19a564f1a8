//! vCPU configuration (CPUID, MSRs, FPU, LAPIC, boot registers) and the
//! vCPU run loop, one thread per vCPU.
//!
//! Stopping: [`VmState::request_stop`] sets a flag, then every vCPU thread is
//! sent [`kick_signal`]. Its handler sets `kvm_run.immediate_exit` of the
//! thread's own vCPU, so a signal that lands just before `KVM_RUN` still
//! makes it return `EINTR` at once; the loop then sees the flag.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::{self, BootEntry};
use crate::devices::bus::DeviceManager;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset line, `reboot=k`).
    Reset,
    /// KVM_EXIT_SYSTEM_EVENT of type shutdown or reset.
    Shutdown,
    /// KVM_EXIT_SYSTEM_EVENT of type crash (`KVM_SYSTEM_EVENT_CRASH`), or
    /// any other system event type this VMM does not know.
    GuestCrash {
        /// `kvm_run.system_event.type`.
        kind: u32,
    },
    /// The VMM was asked to stop (SIGTERM/SIGINT).
    Stopped,
    /// KVM_EXIT_SHUTDOWN without a prior reset request: a triple fault.
    TripleFault,
    /// KVM_EXIT_INTERNAL_ERROR (suberror 1 = emulation failure).
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// Any other exit the VMM cannot continue from, or a KVM_RUN error.
    Unexpected(String),
    /// The guest of a template VM asked for its snapshot
    /// (`crate::snapshot::REQUEST_PORT`); the VM stops so that it can be
    /// written. Becomes [`ExitReason::Snapshotted`] once it is.
    SnapshotRequested,
    /// The template was written (`crate::snapshot`).
    Snapshotted,
}

impl ExitReason {
    /// Process exit status (docs/contracts.md): 0 for reboot/shutdown/stop,
    /// 2 for guest crashes and KVM failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::Shutdown | ExitReason::Stopped | ExitReason::Snapshotted => 0,
            _ => 2,
        }
    }
}

/// State shared by all vCPUs of a VM.
#[derive(Debug, Default)]
pub struct VmState {
    /// Set by the i8042 when the guest pulses the reset line.
    pub reset_requested: Arc<AtomicBool>,
    stop: AtomicBool,
    /// Whether the guest's snapshot request is honoured (a template VM).
    pub template: AtomicBool,
}

impl VmState {
    /// Asks every vCPU loop to return (they must also be kicked).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {cpu}: {what}: {source}")]
    Kvm {
        /// vCPU index.
        cpu: u8,
        /// Which step.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MTRRdefType: MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The boot MSR values (index, value).
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

/// Configures vCPU `id` of `count`: normalized CPUID, boot MSRs, FPU, LAPIC
/// LINT0 = ExtINT / LINT1 = NMI, and, for the boot vCPU 0, the registers of
/// `entry` (application processors wait for INIT/SIPI in KVM).
pub fn configure(vcpu: &VcpuFd, id: u8, count: u8, supported: &CpuId, entry: BootEntry) -> Result<(), Error> {
    let kvm = |what| move |source| Error::Kvm { cpu: id, what, source };
    set_cpuid(vcpu, id, count, supported)?;

    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Kvm {
        cpu: id,
        what: "building MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if written != entries.len() {
        log::warn!(
            "vCPU {id}: KVM accepted {written} of {} boot MSRs (first refused: {:#x})",
            entries.len(),
            entries[written].index
        );
    }

    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;

    if id == 0 {
        let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        boot::boot_sregs(&mut sregs, entry);
        vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot::boot_regs(entry)).map_err(kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// Gives vCPU `id` of `count` the normalized CPUID (`crate::cpuid`), as at
/// boot; a template's vCPUs get it before their saved state. Returns it.
pub fn set_cpuid(vcpu: &VcpuFd, id: u8, count: u8, supported: &CpuId) -> Result<CpuId, Error> {
    let mut cpuid = supported.clone();
    crate::cpuid::normalize(cpuid.as_mut_slice(), id, count);
    vcpu.set_cpuid2(&cpuid).map_err(|source| Error::Kvm { cpu: id, what: "KVM_SET_CPUID2", source })?;
    Ok(cpuid)
}

thread_local! {
    /// `kvm_run.immediate_exit` of the vCPU running on this thread.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal used to kick vCPU threads out of `KVM_RUN` (SIGRTMIN).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` points into the kvm_run mapping of the vCPU owned by this
        // thread; it is set before the run loop starts and cleared before the
        // vCPU is dropped. A byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Installs the process-wide handler of [`kick_signal`] (idempotent).
pub fn install_kick_handler() -> Result<(), std::io::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// One vCPU and what its exits are dispatched to.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    devices: Arc<DeviceManager>,
    state: Arc<VmState>,
}

const I8042_COMMAND_PORT: u16 = 0x64;

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(fd: VcpuFd, id: u8, devices: Arc<DeviceManager>, state: Arc<VmState>) -> Self {
        Vcpu { fd, id, devices, state }
    }

    /// The KVM vCPU (for a template's state, once the vCPU has stopped).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Runs the vCPU on the current thread until the VM stops; returns why.
    pub fn run(&mut self) -> ExitReason {
        let ptr: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(ptr));
        let reason = self.run_loop();
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
        reason
    }

    fn run_loop(&mut self) -> ExitReason {
        loop {
            if self.state.stop_requested() {
                return ExitReason::Stopped;
            }
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        if !self.devices.pio.read(u64::from(port), data) {
                            data.fill(0xff);
                            if port != 0x80 && port != 0xed {
                                log::debug!("vCPU {}: unhandled PIO read of port {port:#x}", self.id);
                            }
                        }
                    }
                    VcpuExit::IoOut(crate::snapshot::REQUEST_PORT, data)
                        if self.state.template.load(Ordering::Relaxed)
                            && data == crate::snapshot::REQUEST_MAGIC.to_le_bytes() =>
                    {
                        log::info!("vCPU {}: the guest asked for its snapshot", self.id);
                        return ExitReason::SnapshotRequested;
                    }
                    VcpuExit::IoOut(port, data) => {
                        if !self.devices.pio.write(u64::from(port), data) {
                            if port != 0x80 && port != 0xed {
                                log::debug!("vCPU {}: unhandled PIO write of port {port:#x}", self.id);
                            }
                        } else if port == I8042_COMMAND_PORT && self.state.reset_requested.load(Ordering::SeqCst) {
                            return ExitReason::Reset;
                        }
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        if !self.devices.mmio.read(addr, data) {
                            data.fill(0xff);
                            log::debug!("vCPU {}: unhandled MMIO read at {addr:#x}", self.id);
                        }
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        if !self.devices.mmio.write(addr, data) {
                            log::debug!("vCPU {}: unhandled MMIO write at {addr:#x}", self.id);
                        }
                    }
                    VcpuExit::Hlt => {
                        // With the in-kernel irqchip KVM handles HLT; nothing to do.
                    }
                    VcpuExit::Shutdown => {
                        return if self.state.reset_requested.load(Ordering::SeqCst) {
                            ExitReason::Reset
                        } else {
                            self.log_fatal("KVM_EXIT_SHUTDOWN without reset request (triple fault)");
                            ExitReason::TripleFault
                        };
                    }
                    VcpuExit::SystemEvent(kind, _) => {
                        return match kind {
                            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                                log::info!("vCPU {}: system event {kind} (shutdown/reset)", self.id);
                                ExitReason::Shutdown
                            }
                            _ => {
                                self.log_fatal(&format!("KVM_EXIT_SYSTEM_EVENT type {kind} (crash or unknown)"));
                                ExitReason::GuestCrash { kind }
                            }
                        };
                    }
                    VcpuExit::FailEntry(reason, cpu) => {
                        self.log_fatal(&format!("KVM_EXIT_FAIL_ENTRY reason {reason:#x} on cpu {cpu}"));
                        return ExitReason::FailEntry { reason };
                    }
                    VcpuExit::InternalError => {
                        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active union member.
                        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                        self.log_fatal(&format!("KVM_EXIT_INTERNAL_ERROR suberror {suberror}"));
                        return ExitReason::InternalError { suberror };
                    }
                    VcpuExit::Intr => {}
                    other => {
                        let what = format!("{other:?}");
                        self.log_fatal(&format!("unexpected exit {what}"));
                        return ExitReason::Unexpected(what);
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    self.log_fatal(&format!("KVM_RUN failed: {e}"));
                    return ExitReason::Unexpected(format!("KVM_RUN: {e}"));
                }
            }
        }
    }

    fn log_fatal(&self, what: &str) {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        match (regs, sregs) {
            (Ok(r), Ok(s)) => log::error!(
                "vCPU {}: {what}: rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}(base {:#x}, l={} db={})",
                self.id, r.rip, r.rsp, r.rflags, s.cr0, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base, s.cs.l, s.cs.db
            ),
            _ => log::error!("vCPU {}: {what} (registers unavailable)", self.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_modes() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0xff_u8 as std::os::raw::c_char; // vector bits kept
        regs[APIC_LVT0 + 2] = 0x1; // mask bit kept
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut regs, APIC_LVT1, APIC_MODE_NMI);
        let rd = |o: usize| u32::from_le_bytes([regs[o] as u8, regs[o + 1] as u8, regs[o + 2] as u8, regs[o + 3] as u8]);
        assert_eq!(rd(APIC_LVT0), 0x0001_07ff);
        assert_eq!(rd(APIC_LVT1), 0x400);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::Reset.exit_code(), 0);
        assert_eq!(ExitReason::Shutdown.exit_code(), 0);
        assert_eq!(ExitReason::Stopped.exit_code(), 0);
        assert_eq!(ExitReason::TripleFault.exit_code(), 2);
        assert_eq!(ExitReason::InternalError { suberror: 1 }.exit_code(), 2);
        assert_eq!(ExitReason::FailEntry { reason: 0 }.exit_code(), 2);
        assert_eq!(ExitReason::GuestCrash { kind: kvm_bindings::KVM_SYSTEM_EVENT_CRASH }.exit_code(), 2);
        assert_eq!(ExitReason::Unexpected("x".into()).exit_code(), 2);
        assert_eq!(ExitReason::SnapshotRequested.exit_code(), 2);
        assert_eq!(ExitReason::Snapshotted.exit_code(), 0);
    }

    #[test]
    fn boot_msr_set() {
        let m = boot_msrs();
        assert!(m.contains(&(MSR_IA32_MISC_ENABLE, 1)));
        assert!(m.contains(&(MSR_MTRR_DEF_TYPE, 0x806)));
        assert_eq!(m.len(), 11);
    }
}
