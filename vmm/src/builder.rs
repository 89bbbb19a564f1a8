//! Builds a microVM from validated [`VmResources`] and runs it:
//! [`build_and_run`] is the one entry point.
//!
//! Order: KVM capability check → guest memory (RAM below the MMIO gap and
//! above 4 GiB) → then, side by side, [VM → memory slots → TSS/identity map →
//! in-kernel irqchip + PIT2 → devices (8250 on IRQ 4, i8042, virtio-mmio)] and
//! [payload + boot structures + MP table, on a thread of its own] → vCPUs
//! (CPUID, MSRs, FPU, LAPIC, registers) → one thread per vCPU.

use std::fs::OpenOptions;
use std::io::LineWriter;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestMemory as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::boot::{self, BootEntry};
use crate::config::{BootPayload, SerialConfig, SnapshotMode, VmResources};
use crate::devices::bus::{self, DeviceManager};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{SerialDevice, SerialOut, COM1_PORT, SERIAL_PORT_LEN};
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::{GuestMemory, Interrupt, VirtioDevice};
use crate::memory::RamMappings;
use crate::layout;
use crate::vcpu::{self, ExitReason, Vcpu, VmState};

/// Parameters the VMM always appends to the guest command line.
pub const DEFAULT_CMDLINE_SUFFIX: &str = "reboot=k panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd";

/// KVM API version this VMM is written against.
const KVM_API_VERSION: i32 = 12;

/// KVM capabilities the VMM needs, with the name reported when missing.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Hlt, "KVM_CAP_HLT"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Errors building or running the VM (all map to exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// Wrong KVM API version.
    #[error("KVM API version {0}, need {KVM_API_VERSION}")]
    KvmApiVersion(i32),
    /// A required KVM capability is missing.
    #[error("KVM capability {0} is not available")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("allocating guest memory: {0}")]
    GuestMemory(String),
    /// Serial output could not be opened.
    #[error("serial.path {path}: {source}")]
    SerialOutput {
        /// File path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Creating an eventfd or a thread failed.
    #[error("{what}: {source}")]
    Io {
        /// Which step.
        what: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Device bus conflict.
    #[error(transparent)]
    Bus(#[from] bus::Error),
    /// A virtio device could not be created.
    #[error("virtio device {what}: {reason}")]
    VirtioDevice {
        /// Which device.
        what: String,
        /// Why.
        reason: String,
    },
    /// Loading the payload failed.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// Writing the MP table failed.
    #[error(transparent)]
    MpTable(#[from] crate::mptable::Error),
    /// Configuring a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// Building the kernel command line failed.
    #[error("cmdline: {0}")]
    Cmdline(String),
    /// Reading a template failed, or it does not fit this VM.
    #[error("restoring the template: {0}")]
    Restore(#[from] crate::snapshot::Error),
    /// A device's template state does not fit the device.
    #[error("restoring the template: {what}: {reason}")]
    RestoreDevice {
        /// Which device.
        what: String,
        /// Why.
        reason: String,
    },
}

/// A vCPU thread's line to [`Vm::run`]: the reason it stopped the VM, a
/// wake-up of the waiter, then a stop request to the other vCPUs. A thread
/// that unwinds from a panic without reporting reports
/// [`ExitReason::Unexpected`] when the notice is dropped, so the VM stops
/// instead of running on without that vCPU.
struct VcpuExitNotice {
    id: u8,
    tx: mpsc::Sender<(u8, ExitReason)>,
    wake: EventFd,
    state: Arc<VmState>,
    reported: bool,
}

impl VcpuExitNotice {
    fn report(&mut self, reason: ExitReason) {
        // Report before asking the others to stop: a vCPU that leaves
        // KVM_RUN because of that request reports `Stopped`, which must never
        // overtake the real cause.
        let _ = self.tx.send((self.id, reason));
        let _ = self.wake.write(1);
        self.state.request_stop();
        self.reported = true;
    }
}

impl Drop for VcpuExitNotice {
    fn drop(&mut self) {
        if !self.reported {
            self.report(ExitReason::Unexpected(format!("vCPU {} thread panicked", self.id)));
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

/// The eventfd the termination handler writes to, or -1 before
/// [`install_termination_handlers`] made it. It is never closed (the handler
/// may hold its number at any time) and never read: once written it stays
/// readable, as TERMINATE stays set, and wakes every [`Vm::run`] at once
/// instead of at a poll.
static TERMINATE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn handle_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATE.store(true, Ordering::SeqCst);
    let fd = TERMINATE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: __errno_location and write(2) are async-signal-safe; errno
        // is saved and restored for the interrupted code. The write reads 8
        // bytes from a live local into an eventfd that is never closed. A
        // failure (a saturated counter) needs no handling: the eventfd is
        // readable then anyway.
        unsafe {
            let errno = *libc::__errno_location();
            let _ = libc::write(fd, (&one as *const u64).cast(), 8);
            *libc::__errno_location() = errno;
        }
    }
}

/// Installs SIGTERM/SIGINT handlers that make a running [`build_and_run`]
/// stop the vCPUs and return [`ExitReason::Stopped`]. For the binary's main.
///
/// Errors: creating the eventfd the handlers write to, or registering them.
pub fn install_termination_handlers() -> Result<(), std::io::Error> {
    if TERMINATE_FD.load(Ordering::SeqCst) < 0 {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        TERMINATE_FD.store(std::os::fd::AsRawFd::as_raw_fd(&evt), Ordering::SeqCst);
        // Kept open for the life of the process (see TERMINATE_FD).
        std::mem::forget(evt);
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, handle_terminate)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// Blocks until `wake` (a vCPU's notice) or the termination eventfd (when the
/// handlers are installed) is readable, and resets `wake`. Returns at once on
/// EINTR; the caller looks at what changed either way.
fn wait_for_stop(wake: &EventFd) -> std::io::Result<()> {
    let terminate = TERMINATE_FD.load(Ordering::SeqCst);
    let mut fds = [
        libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(wake), events: libc::POLLIN, revents: 0 },
        // A negative fd is ignored by poll(2).
        libc::pollfd { fd: terminate, events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: poll(2) on an array of two initialized pollfd structs we own.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
    }
    if fds[0].revents & libc::POLLIN != 0 {
        wake.read()?;
    }
    Ok(())
}

/// Checks the KVM API version and every capability in [`REQUIRED_CAPS`].
pub fn check_kvm(kvm: &Kvm) -> Result<(), Error> {
    let v = kvm.get_api_version();
    if v != KVM_API_VERSION {
        return Err(Error::KvmApiVersion(v));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(Error::MissingCap(name));
        }
    }
    Ok(())
}

/// Builds the VM described by `resources`, runs it until the guest resets,
/// shuts down or crashes, or the process is told to stop, and returns why.
///
/// Errors: anything that prevents the guest from starting ([`Error`]);
/// guest-side failures are an `Ok` [`ExitReason`] with a non-zero exit code.
pub fn build_and_run(resources: VmResources) -> Result<ExitReason, Error> {
    let vm = Vm::build(&resources)?;
    vm.run()
}

/// A built, not yet running VM.
struct Vm {
    kvm: Kvm,
    vm_fd: VmFd,
    /// Guest memory: must outlive the VM's memory slots and the vCPUs.
    mem: GuestMemory,
    vcpus: Vec<Vcpu>,
    state: Arc<VmState>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// Where to write the template when the guest asks (a template VM).
    template_dir: Option<std::path::PathBuf>,
    /// The host mappings under `_mem`. Last, so it is dropped after every
    /// holder of guest memory above it (vCPUs, devices and their workers).
    _ram: RamMappings,
}

/// What [`Vm::create_vm`] makes: the VM without its payload and vCPUs.
struct VmParts {
    kvm: Kvm,
    vm_fd: VmFd,
    state: Arc<VmState>,
    devices: DeviceManager,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

fn serial_output(cfg: &SerialConfig) -> Result<SerialOut, Error> {
    Ok(match cfg {
        SerialConfig::Stdout => Box::new(LineWriter::new(std::io::stdout())),
        SerialConfig::None => Box::new(std::io::sink()),
        SerialConfig::File { path } => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::SerialOutput { path: path.display().to_string(), source })?;
            Box::new(LineWriter::new(f))
        }
    })
}

/// The CPUID every vCPU's is made from: KVM's supported CPUID with the
/// TSC-deadline timer announced when KVM has it (`crate::cpuid`).
fn supported_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId, Error> {
    let mut supported =
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        crate::cpuid::enable_tsc_deadline(supported.as_mut_slice());
    }
    Ok(supported)
}

/// What [`Vm::build`]'s loader thread put into guest memory.
#[derive(Clone, Copy)]
enum Loaded {
    /// A boot payload, entered here.
    Boot(BootEntry),
    /// A template's memory, this many bytes of data.
    Template(u64),
}

/// The virtio device types [`create_virtio_devices`] makes for `resources`,
/// in slot order (what a template must have been taken with).
fn virtio_device_types(resources: &VmResources) -> Vec<u32> {
    use crate::devices::virtio::{fs::VIRTIO_ID_FS, vsock::device::VIRTIO_ID_VSOCK};
    let vsock = resources.vsock().map(|_| VIRTIO_ID_VSOCK);
    vsock.into_iter().chain(resources.shares().iter().map(|_| VIRTIO_ID_FS)).collect()
}

/// How many virtio devices [`create_virtio_devices`] makes for `resources`: the
/// vsock device if configured, then one virtio-fs device per share.
fn virtio_count(resources: &VmResources) -> usize {
    usize::from(resources.vsock().is_some()) + resources.shares().len()
}

/// Writes the boot payload into guest memory: for Linux the kernel, initrd, command
/// line (the user's, [`DEFAULT_CMDLINE_SUFFIX`] and one `virtio_mmio.device=` per
/// device slot) and MP table; for a real-mode payload its bytes.
///
/// Errors: unreadable or malformed kernel or initrd, command line too long, payload
/// outside guest memory.
fn load_payload(mem: &GuestMemory, resources: &VmResources) -> Result<BootEntry, Error> {
    Ok(match resources.boot() {
        BootPayload::Linux { kernel, initrd, cmdline: user } => {
            let c = |e: linux_loader::cmdline::Error| Error::Cmdline(e.to_string());
            let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(c)?;
            if !user.trim().is_empty() {
                cmdline.insert_str(user.trim()).map_err(c)?;
            }
            cmdline.insert_str(DEFAULT_CMDLINE_SUFFIX).map_err(c)?;
            for index in 0..virtio_count(resources) {
                let (base, irq) = layout::virtio_slot(index);
                cmdline.insert_str(format!("virtio_mmio.device=4K@{base:#x}:{irq}")).map_err(c)?;
            }
            log::info!("kernel command line: {}", cmdline.as_cstring().map_err(c)?.to_string_lossy());
            let e = boot::load_linux(mem, resources.memory_bytes(), kernel, initrd.as_deref(), &cmdline)?;
            crate::mptable::setup(mem, resources.vcpus())?;
            e
        }
        BootPayload::RealMode { bytes, addr } => boot::load_real_mode(mem, bytes, *addr)?,
    })
}

fn create_virtio_devices(resources: &VmResources) -> Result<Vec<(String, Box<dyn VirtioDevice>)>, Error> {
    let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    if let Some(v) = resources.vsock() {
        let dev = crate::devices::virtio::vsock::Vsock::new(v.guest_cid, &v.uds_path).map_err(|e| {
            Error::VirtioDevice { what: format!("vsock (cid {})", v.guest_cid), reason: e.to_string() }
        })?;
        devices.push(("vsock".into(), Box::new(dev)));
    }
    for s in resources.shares() {
        use crate::config::CacheMode;
        use crate::devices::virtio::fs;
        let cache = match s.cache {
            CacheMode::Never => fs::CachePolicy::Never,
            CacheMode::Auto => fs::CachePolicy::Auto,
            CacheMode::Always => fs::CachePolicy::Always,
        };
        let dev = fs::Fs::new(&s.tag, &s.path, cache)
            .map_err(|e| Error::VirtioDevice { what: format!("virtio-fs '{}'", s.tag), reason: e.to_string() })?;
        devices.push((format!("virtio-fs '{}'", s.tag), Box::new(dev)));
    }
    Ok(devices)
}

impl Vm {
    /// Creates the VM (KVM fd, memory slots over `mem`, irqchip, PIT) and its
    /// devices: the serial port, the i8042 and one virtio-mmio transport per device,
    /// in the order [`virtio_count`] counts them.
    fn create_vm(
        kvm: Kvm,
        resources: &VmResources,
        mem: &GuestMemory,
        template: Option<&crate::snapshot::VmSnapshot>,
    ) -> Result<VmParts, Error> {
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;

        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mmap of `memory_size` bytes owned by
            // `ram`, which `Vm` keeps until after the vCPU threads are joined.
            unsafe { vm_fd.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        vm_fd.set_tss_address(layout::KVM_TSS_ADDR as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        // Legacy devices.
        let state = Arc::new(VmState::default());
        let mut devices = DeviceManager::default();
        let io = |what| move |source| Error::Io { what, source };
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io("serial eventfd"))?;
        vm_fd.register_irqfd(&serial_evt, layout::SERIAL_IRQ).map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let out = serial_output(resources.serial())?;
        let serial = match template {
            None => SerialDevice::new(serial_evt, out),
            Some(t) => SerialDevice::from_snapshot(serial_evt, out, &t.serial)
                .map_err(|reason| Error::RestoreDevice { what: "serial".into(), reason })?,
        };
        let serial = Arc::new(Mutex::new(serial));
        devices.pio.insert(u64::from(COM1_PORT), SERIAL_PORT_LEN, serial.clone())?;
        let mut i8042 = I8042::new(state.reset_requested.clone());
        if let Some(t) = template {
            i8042.restore(&t.i8042);
        }
        let i8042 = Arc::new(Mutex::new(i8042));
        devices.pio.insert(u64::from(I8042_BASE), I8042_LEN, i8042.clone())?;

        // virtio-mmio devices.
        let mut virtio = Vec::new();
        for (index, (name, dev)) in create_virtio_devices(resources)?.into_iter().enumerate() {
            let (base, irq) = layout::virtio_slot(index);
            let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io("virtio irq eventfd"))?;
            vm_fd.register_irqfd(&irq_evt, irq).map_err(kvm_err("KVM_IRQFD (virtio)"))?;
            let transport = MmioTransport::new(mem.clone(), dev, Arc::new(Interrupt::new(irq_evt)))
                .map_err(|e| Error::VirtioDevice { what: name.clone(), reason: e.to_string() })?;
            for (q, evt) in transport.queue_evts().iter().enumerate() {
                vm_fd
                    .register_ioevent(evt, &IoEventAddress::Mmio(base + mmio::reg::QUEUE_NOTIFY), q as u32)
                    .map_err(kvm_err("KVM_IOEVENTFD"))?;
            }
            let transport = Arc::new(Mutex::new(transport));
            devices.mmio.insert(base, layout::VIRTIO_MMIO_SIZE, transport.clone())?;
            virtio.push(transport);
            log::info!("{name}: virtio-mmio at {base:#x}, IRQ {irq}");
        }

        debug_assert_eq!(virtio.len(), virtio_count(resources));
        Ok(VmParts { kvm, vm_fd, state, devices, serial, i8042, virtio })
    }

    fn build(resources: &VmResources) -> Result<Vm, Error> {
        let started = Instant::now();
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        check_kvm(&kvm)?;
        let restore_dir = resources.snapshot().filter(|s| s.mode == SnapshotMode::Restore).map(|s| s.dir.as_path());
        let template_dir = resources.snapshot().filter(|s| s.mode == SnapshotMode::Template).map(|s| s.dir.clone());
        let template = match restore_dir {
            Some(dir) => Some(crate::snapshot::read_state(
                dir,
                usize::from(resources.vcpus()),
                resources.memory_bytes(),
                &virtio_device_types(resources),
            )?),
            None => None,
        };
        // Guest memory.
        let mem_size = resources.memory_bytes();
        // On an error return below, the vCPUs and devices made after this
        // (the holders of `mem`) are dropped before `ram` unmaps the memory.
        let (mem, ram) =
            crate::memory::allocate(&layout::ram_regions(mem_size)).map_err(|e| Error::GuestMemory(e.to_string()))?;
        // The payload (or a template's memory) is read into guest memory on a
        // thread of its own while this one creates the VM and its devices:
        // both are slow where page faults and ioctls are (nested
        // virtualization), and neither needs the other until the vCPUs.
        let (loaded, built) = std::thread::scope(|s| {
            let loader = std::thread::Builder::new()
                .name("payload".into())
                .spawn_scoped(s, || {
                    let t = Instant::now();
                    let loaded = match restore_dir {
                        Some(dir) => crate::snapshot::read_memory(&mem, &dir.join(crate::snapshot::MEMORY_FILE))
                            .map(Loaded::Template)
                            .map_err(Error::from),
                        None => load_payload(&mem, resources).map(Loaded::Boot),
                    };
                    loaded.map(|l| (l, t.elapsed()))
                })
                .map_err(|source| Error::Io { what: "spawning the payload loader thread", source });
            let built = Self::create_vm(kvm, resources, &mem, template.as_ref());
            let loaded = match loader {
                Ok(h) => h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(e) => Err(e),
            };
            (loaded, built)
        });
        let VmParts { kvm, vm_fd, state, devices, serial, i8042, virtio } = built?;
        let (loaded, load_time) = loaded?;
        match loaded {
            Loaded::Boot(BootEntry::Pvh { entry }) => log::info!("booting via PVH entry at {entry:#x}"),
            Loaded::Boot(BootEntry::Linux64 { entry }) => log::info!("booting via 64-bit boot protocol at {entry:#x}"),
            Loaded::Boot(BootEntry::RealMode { ip }) => log::info!("starting real-mode payload at {ip:#x}"),
            Loaded::Template(bytes) => log::info!(
                "resuming the template in {} ({} KiB of guest memory read)",
                restore_dir.map(|d| d.display().to_string()).unwrap_or_default(),
                bytes >> 10
            ),
        }
        if let Some(t) = &template {
            crate::snapshot::restore_vm(&vm_fd, t)?;
        }

        // vCPUs.
        let supported = supported_cpuid(&kvm)?;
        let devices = Arc::new(devices);
        let count = resources.vcpus();
        let mut vcpus = Vec::with_capacity(usize::from(count));
        for id in 0..count {
            let fd = vm_fd.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            match (&template, loaded) {
                (Some(t), _) => {
                    let cpuid = vcpu::set_cpuid(&fd, id, count, &supported)?;
                    if id == 0 {
                        crate::snapshot::check_host(t, cpuid.as_slice(), fd.get_tsc_khz().ok())?;
                    }
                    crate::snapshot::restore_vcpu(&fd, usize::from(id), &t.vcpus[usize::from(id)])?;
                }
                (None, Loaded::Boot(entry)) => vcpu::configure(&fd, id, count, &supported, entry)?,
                (None, Loaded::Template(_)) => unreachable!("template memory is only read with a template"),
            }
            vcpus.push(Vcpu::new(fd, id, devices.clone(), state.clone()));
        }
        // The transports read their queues' positions from guest memory,
        // which is complete now.
        if let Some(t) = &template {
            for (slot, (transport, saved)) in virtio.iter().zip(&t.transports).enumerate() {
                transport
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .restore(saved)
                    .map_err(|reason| Error::RestoreDevice { what: format!("virtio-mmio slot {slot}"), reason })?;
            }
        }
        state.template.store(template_dir.is_some(), Ordering::SeqCst);
        log::info!(
            "VM built in {:.1} ms ({} in {:.1} ms alongside)",
            started.elapsed().as_secs_f64() * 1e3,
            if template.is_some() { "template memory read" } else { "payload loaded" },
            load_time.as_secs_f64() * 1e3
        );
        Ok(Vm { kvm, vm_fd, mem, vcpus, state, serial, i8042, virtio, template_dir, _ram: ram })
    }

    /// Writes the template of a VM whose vCPUs have all stopped (their
    /// threads joined): completes each vCPU's pending exit, then saves the
    /// vCPUs, the VM, the devices and guest memory into `dir`
    /// (`crate::snapshot`). Device workers keep running: the guest asks only
    /// when no request is in flight and the host sends it nothing.
    fn write_template(&self, vcpus: &mut [Vcpu], dir: &std::path::Path) -> Result<(), crate::snapshot::Error> {
        use crate::snapshot;
        let t = Instant::now();
        for (id, v) in vcpus.iter_mut().enumerate() {
            snapshot::complete_pending_exit(v.fd_mut(), id)?;
        }
        let msr_indices = snapshot::msr_index_list(&self.kvm)?;
        let mut states = Vec::with_capacity(vcpus.len());
        for (id, v) in vcpus.iter_mut().enumerate() {
            states.push(snapshot::save_vcpu(v.fd_mut(), id, &msr_indices)?);
        }
        let (irqchips, pit, clock) = snapshot::save_vm(&self.vm_fd)?;
        let lock = |m: &Arc<Mutex<MmioTransport>>| m.lock().unwrap_or_else(|p| p.into_inner()).snapshot();
        // vCPU 0's CPUID as it was set (KVM_GET_CPUID2 would show KVM's
        // run-time updates, such as OSXSAVE, which a new vCPU has not yet).
        let mut cpuid = supported_cpuid(&self.kvm)
            .map_err(|e| snapshot::Error::Incomplete(format!("vCPU 0's CPUID: {e}")))?;
        crate::cpuid::normalize(cpuid.as_mut_slice(), 0, vcpus.len() as u8);
        let cpuid = cpuid.as_slice().to_vec();
        let vcpu0 = vcpus.first_mut().map(|v| v.fd_mut());
        let saved = snapshot::VmSnapshot {
            version: snapshot::FORMAT_VERSION,
            memory_bytes: self.mem.iter().map(|r| r.len()).sum(),
            tsc_khz: vcpu0.and_then(|fd| fd.get_tsc_khz().ok()),
            cpuid,
            vcpus: states,
            irqchips,
            pit,
            clock,
            serial: self.serial.lock().unwrap_or_else(|p| p.into_inner()).snapshot(),
            i8042: self.i8042.lock().unwrap_or_else(|p| p.into_inner()).snapshot(),
            transports: self.virtio.iter().map(lock).collect(),
        };
        let bytes = snapshot::write_memory(&self.mem, &dir.join(snapshot::MEMORY_FILE))?;
        snapshot::write_state(dir, &saved)?;
        log::info!(
            "template written to {} in {:.1} ms ({} KiB of guest memory, {} vCPU(s), {} MSRs each)",
            dir.display(),
            t.elapsed().as_secs_f64() * 1e3,
            bytes >> 10,
            saved.vcpus.len(),
            saved.vcpus.first().map_or(0, |v| v.msrs.len())
        );
        Ok(())
    }

    fn run(mut self) -> Result<ExitReason, Error> {
        let vcpu_count = self.vcpus.len();
        vcpu::install_kick_handler().map_err(|source| Error::Io { what: "vCPU kick signal handler", source })?;
        let (tx, rx) = mpsc::channel::<(u8, ExitReason)>();
        // Wakes the wait below when a vCPU stopped the VM (the termination
        // handler has an eventfd of its own, TERMINATE_FD).
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Io { what: "run eventfd", source })?;
        // Every notice before the first thread, so that a failure here leaves
        // no vCPU running.
        let mut notices = Vec::with_capacity(self.vcpus.len());
        for id in 0..self.vcpus.len() {
            notices.push(VcpuExitNotice {
                id: id as u8,
                tx: tx.clone(),
                wake: wake.try_clone().map_err(|source| Error::Io { what: "run eventfd", source })?,
                state: self.state.clone(),
                reported: false,
            });
        }
        drop(tx);
        let mut threads: Vec<JoinHandle<Vcpu>> = Vec::new();
        for (id, (mut vcpu, mut notice)) in std::mem::take(&mut self.vcpus).into_iter().zip(notices).enumerate() {
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let reason = vcpu.run();
                    notice.report(reason);
                    vcpu
                })
                .map_err(|source| Error::Io { what: "spawning vCPU thread", source })?;
            threads.push(t);
        }

        let mut poll_failed = false;
        let mut reason = loop {
            match rx.try_recv() {
                Ok((id, reason)) => {
                    log::info!("vCPU {id} stopped the VM: {reason:?}");
                    break reason;
                }
                Err(mpsc::TryRecvError::Disconnected) => break ExitReason::Unexpected("vCPU threads vanished".into()),
                Err(mpsc::TryRecvError::Empty) => {}
            }
            if TERMINATE.load(Ordering::SeqCst) {
                log::info!("termination signal received: stopping vCPUs");
                break ExitReason::Stopped;
            }
            // Blocks until a vCPU or the handler writes (both set their state
            // before they write, so the checks above see it next round).
            if let Err(e) = wait_for_stop(&wake) {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    if !poll_failed {
                        log::warn!("waiting for the vCPUs: {e}; polling every 20 ms instead");
                        poll_failed = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };

        // Stop every vCPU: flag, then kick until each thread has left KVM_RUN.
        self.state.request_stop();
        let sig = vcpu::kick_signal();
        let mut stopped = Vec::with_capacity(threads.len());
        for t in threads {
            while !t.is_finished() {
                let _ = t.kill(sig);
                std::thread::sleep(Duration::from_millis(2));
            }
            // A thread that panicked has reported `Unexpected`.
            if let Ok(v) = t.join() {
                stopped.push(v);
            }
        }
        // Two vCPUs can stop the VM at the same moment for different causes
        // (one resets while another triple-faults): the failure wins.
        for (id, other) in rx.try_iter() {
            if other.exit_code() > reason.exit_code() {
                log::info!("vCPU {id} also stopped the VM: {other:?}, which takes precedence");
                reason = other;
            }
        }
        if reason == ExitReason::SnapshotRequested && TERMINATE.load(Ordering::SeqCst) {
            log::info!("termination signal received with the snapshot request: no template written");
            reason = ExitReason::Stopped;
        }
        if reason == ExitReason::SnapshotRequested {
            reason = match &self.template_dir {
                Some(dir) if stopped.len() == vcpu_count => {
                    match self.write_template(&mut stopped, dir) {
                        Ok(()) => ExitReason::Snapshotted,
                        Err(e) => {
                            log::error!("writing the template: {e}");
                            ExitReason::Unexpected(format!("writing the template: {e}"))
                        }
                    }
                }
                _ => ExitReason::Unexpected("snapshot requested, but a vCPU thread was lost".into()),
            };
        }
        self.serial.lock().unwrap_or_else(|p| p.into_inner()).flush();
        Ok(reason)
    }
}
