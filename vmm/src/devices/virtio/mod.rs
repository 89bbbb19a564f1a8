//! Virtio devices and the virtio-mmio transport (virtio 1.2 §4.2).
//!
//! A device implements [`VirtioDevice`]; the transport (`mmio.rs`) owns the
//! register file, negotiates features, builds the virtqueues from what the
//! driver wrote and calls [`VirtioDevice::activate`] once the driver sets
//! DRIVER_OK. From then on the device runs its own worker thread, woken by the
//! per-queue ioeventfds, and notifies the driver through [`Interrupt`].

pub mod fs;
pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// `VIRTIO_F_VERSION_1` (virtio 1.2 §6): the only transport feature every
/// device offers; legacy devices are not supported.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// `VIRTIO_RING_F_EVENT_IDX` (virtio 1.2 §2.7.10, §6): `used_event` and
/// `avail_event` suppress notifications in both directions.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bit: a used buffer was added to a virtqueue (virtio 1.2 §4.2.2, InterruptStatus).
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// Interrupt status bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// Interrupt line of one virtio-mmio device: the InterruptStatus register plus
/// the irqfd that KVM turns into the device's GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// Wraps `irqfd`, an eventfd registered with KVM for the device's GSI.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt { status: AtomicU32::new(0), irqfd }
    }

    /// Tells the driver a virtqueue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.signal(VIRTIO_MMIO_INT_VRING);
    }

    /// Tells the driver the device configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::error!("virtio: failed to signal irqfd: {e}");
        }
    }

    /// Current InterruptStatus register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets InterruptStatus bits without signalling (a template's restore:
    /// the interrupt controller's state comes with it).
    pub fn set_status(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    /// InterruptACK register write: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd, for registration with KVM.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Everything a device needs to start processing its virtqueues.
pub struct ActivateContext {
    /// Guest memory; descriptor addresses are resolved against it.
    pub mem: GuestMemory,
    /// The virtqueues the driver configured, index = queue number.
    pub queues: Vec<virtio_queue::Queue>,
    /// One ioeventfd per queue, signalled by KVM when the driver writes
    /// QueueNotify with that queue's index.
    pub queue_evts: Vec<EventFd>,
    /// Interrupt line towards the driver.
    pub interrupt: Arc<Interrupt>,
    /// Features the driver acknowledged (a subset of [`VirtioDevice::features`]).
    pub acked_features: u64,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured fewer or more queues than the device has.
    #[error("expected {expected} virtqueues, driver configured {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the driver made ready.
        got: usize,
    },
    /// The device's worker or backend failed to start.
    #[error("device backend: {0}")]
    Backend(String),
}

/// A virtio device behind the virtio-mmio transport.
///
/// Implementations keep their queue processing in plain functions over
/// [`virtio_queue::Queue`] and [`GuestMemory`] so that it runs in unit tests on
/// mock guest memory without KVM.
pub trait VirtioDevice: Send {
    /// Device ID (virtio 1.2 §5): 19 = vsock, 26 = file system.
    fn device_type(&self) -> u32;
    /// Maximum size of each virtqueue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver, including [`VIRTIO_F_VERSION_1`].
    fn features(&self) -> u64;
    /// Reads the device configuration space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; writes past its end are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: it takes ownership of the queues and their eventfds
    /// and processes them on its own thread until reset or VMM exit.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Driver wrote 0 to Status: stop processing and drop the queues. Returns
    /// false when the device cannot be reset (the transport then marks it
    /// DEVICE_NEEDS_RESET per virtio 1.2 §2.1.2).
    fn reset(&mut self) -> bool {
        false
    }
}
