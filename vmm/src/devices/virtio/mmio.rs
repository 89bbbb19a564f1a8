//! virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).
//!
//! [`MmioTransport`] is the register file of one device window (0x1000
//! bytes): feature negotiation, the device status state machine
//! (§2.1, §3.1.1), virtqueue configuration and the device configuration
//! space at 0x100. Once the driver sets DRIVER_OK with every virtqueue ready
//! and inside guest memory, the device is activated with the queues, their
//! ioeventfds and the interrupt line.
//!
//! All register values come from a hostile guest: unknown offsets,
//! misaligned or non-32-bit register accesses, out-of-range queue indices and
//! out-of-order status writes are ignored (reads return all-ones) and logged
//! at debug level; nothing here panics.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, GuestMemory, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::bus::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// virtio-mmio version 2 (non-legacy).
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the driver ("VMRT" is not registered; 0 is fine).
pub const VENDOR_ID: u32 = 0;

/// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    #![allow(missing_docs)]
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Size of the MMIO window of one device.
pub const MMIO_WINDOW: u64 = 0x1000;

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A queue max size is zero, above 32768 or not a power of two.
    #[error("virtio-mmio: invalid max size {0} for a virtqueue")]
    QueueSize(u16),
    /// Creating an eventfd failed.
    #[error("virtio-mmio: eventfd: {0}")]
    EventFd(std::io::Error),
}

/// The virtio-mmio register file of one device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`, creating one virtqueue and one ioeventfd per entry of
    /// [`VirtioDevice::queue_max_sizes`]; `interrupt` is the device's IRQ line.
    pub fn new(mem: GuestMemory, device: Box<dyn VirtioDevice>, interrupt: Arc<Interrupt>) -> Result<Self, Error> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|_| Error::QueueSize(max))?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The per-queue notification eventfds, index = queue number: register
    /// each with KVM as an ioeventfd on `base + QueueNotify`, datamatch = index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt line (register its irqfd with KVM).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The register file, for a template. Call with the VM stopped; the
    /// device must have no request in flight (see [`Self::restore`]).
    pub fn snapshot(&self) -> crate::snapshot::TransportSnapshot {
        crate::snapshot::TransportSnapshot {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues: self
                .queues
                .iter()
                .map(|q| crate::snapshot::QueueSnapshot {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                })
                .collect(),
        }
    }

    /// Sets the register file of a fresh transport from a template (guest
    /// memory already restored) and, if the device was active, activates it
    /// with the driver's queues. Each queue resumes at its used ring's `idx`
    /// in guest memory, for both the next available and the next used
    /// entry: a template is taken with no request in flight.
    ///
    /// Errors: another device type or queue count, a queue KVM's guest
    /// memory does not hold, or a device that fails to activate.
    pub fn restore(&mut self, s: &crate::snapshot::TransportSnapshot) -> Result<(), String> {
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(format!(
                "device type {} with {} queue(s) in the template, {} with {} here",
                s.device_type,
                s.queues.len(),
                self.device.device_type(),
                self.queues.len()
            ));
        }
        if s.acked_features & !self.device.features() != 0 {
            return Err(format!("acked features {:#x} not offered here", s.acked_features));
        }
        for (i, (q, qs)) in self.queues.iter_mut().zip(&s.queues).enumerate() {
            if qs.size > q.max_size() {
                return Err(format!("queue {i}: size {} above the maximum {}", qs.size, q.max_size()));
            }
            q.set_size(qs.size);
            q.set_desc_table_address(Some(qs.desc_table as u32), Some((qs.desc_table >> 32) as u32));
            q.set_avail_ring_address(Some(qs.avail_ring as u32), Some((qs.avail_ring >> 32) as u32));
            q.set_used_ring_address(Some(qs.used_ring as u32), Some((qs.used_ring >> 32) as u32));
            q.set_ready(qs.ready);
            if qs.ready {
                if !q.is_valid(&self.mem) {
                    return Err(format!("queue {i} is not inside guest memory"));
                }
                let used = q
                    .used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                    .map_err(|e| format!("queue {i}: used ring: {e}"))?;
                q.set_next_used(used.0);
                q.set_next_avail(used.0);
            }
        }
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.interrupt.ack(u32::MAX);
        self.interrupt.set_status(s.interrupt_status);
        if s.activated {
            self.activate();
            if !self.activated {
                return Err(format!("device type {} did not activate", s.device_type));
            }
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue configuration may change only between FEATURES_OK and DRIVER_OK,
    /// while the selected queue is not ready.
    fn queue_config_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED) == status::FEATURES_OK
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length and base of -1 (§4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of write-only/unknown register {offset:#x}");
                u32::MAX
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
                    log::debug!("virtio-mmio: DriverFeatures write in status {:#x} ignored", self.status);
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
                    sel => log::debug!("virtio-mmio: DriverFeatures word {sel} ignored"),
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => {
                // Normally handled in KVM by the ioeventfd; this path only runs without it.
                match self.queue_evts.get(v as usize) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            log::warn!("virtio-mmio: queue {v} notify: {e}");
                        }
                    }
                    None => log::debug!("virtio-mmio: notify of non-existent queue {v}"),
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            reg::SHM_SEL => {}
            _ => log::debug!("virtio-mmio: write to read-only/unknown register {offset:#x} ignored"),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if !self.queue_config_allowed() {
            log::debug!("virtio-mmio: queue register {offset:#x} write in status {:#x} ignored", self.status);
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            log::debug!("virtio-mmio: queue register {offset:#x} write for non-existent queue {sel}");
            return;
        };
        if offset == reg::QUEUE_READY {
            q.set_ready(v == 1);
            return;
        }
        if q.ready() {
            log::debug!("virtio-mmio: queue {sel} reconfigured while ready: ignored");
            return;
        }
        match offset {
            reg::QUEUE_NUM => match u16::try_from(v) {
                Ok(size) => q.set_size(size),
                Err(_) => log::debug!("virtio-mmio: queue size {v} out of range"),
            },
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    /// Status state machine (virtio 1.2 §3.1.1): bits are only ever added,
    /// in order ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK; 0 resets.
    fn write_status(&mut self, v: u32) {
        use status::*;
        if v == 0 {
            self.reset();
            return;
        }
        if self.status & DEVICE_NEEDS_RESET != 0 {
            // Only FAILED or a reset are meaningful now.
            self.status |= v & FAILED;
            return;
        }
        if v & self.status != self.status {
            log::debug!("virtio-mmio: status {v:#x} clears bits of {:#x}: ignored", self.status);
            return;
        }
        let new = v & !self.status;
        if new & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        let allowed = match new {
            ACKNOWLEDGE => self.status == 0,
            DRIVER => self.status == ACKNOWLEDGE,
            FEATURES_OK => self.status == ACKNOWLEDGE | DRIVER,
            DRIVER_OK => self.status == ACKNOWLEDGE | DRIVER | FEATURES_OK,
            _ => false,
        };
        if !allowed {
            log::debug!("virtio-mmio: status transition {:#x} -> {v:#x} ignored", self.status);
            return;
        }
        match new {
            FEATURES_OK => {
                let offered = self.device.features();
                if self.acked_features & !offered != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                    // Leave FEATURES_OK clear: the driver reads it back and fails (§3.1.1 step 6).
                    log::warn!(
                        "virtio-mmio: driver acked features {:#x} not within offered {offered:#x} (VERSION_1 required)",
                        self.acked_features
                    );
                    return;
                }
                self.status |= FEATURES_OK;
            }
            DRIVER_OK => {
                self.status |= DRIVER_OK;
                self.activate();
            }
            _ => self.status |= new,
        }
    }

    fn activate(&mut self) {
        let mem = &self.mem;
        if let Some(i) = self.queues.iter().position(|q| !q.is_valid(mem)) {
            log::warn!("virtio-mmio: queue {i} not ready or outside guest memory at DRIVER_OK");
            self.set_needs_reset();
            return;
        }
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for (q, evt) in self.queues.iter_mut().zip(&self.queue_evts) {
            q.set_event_idx(event_idx);
            let copy = match Queue::try_from(q.state()) {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("virtio-mmio: queue state invalid: {e}");
                    self.set_needs_reset();
                    return;
                }
            };
            let evt = match evt.try_clone() {
                Ok(e) => e,
                Err(e) => {
                    log::error!("virtio-mmio: cloning queue eventfd: {e}");
                    self.set_needs_reset();
                    return;
                }
            };
            queues.push(copy);
            evts.push(evt);
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts: evts,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.activated = true;
                log::debug!("virtio-mmio: device type {} activated", self.device.device_type());
            }
            Err(e) => {
                log::warn!("virtio-mmio: device type {} failed to activate: {e}", self.device.device_type());
                self.set_needs_reset();
            }
        }
    }

    fn set_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    fn reset(&mut self) {
        if self.activated {
            if !self.device.reset() {
                log::warn!("virtio-mmio: device type {} cannot be reset", self.device.device_type());
                self.status = status::DEVICE_NEEDS_RESET;
                return;
            }
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            if offset < MMIO_WINDOW && offset + data.len() as u64 <= MMIO_WINDOW {
                self.device.read_config(offset - reg::CONFIG, data);
            } else {
                data.fill(0xff);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!("virtio-mmio: {}-byte read at {offset:#x} ignored", data.len());
            data.fill(0xff);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if offset < MMIO_WINDOW && offset + data.len() as u64 <= MMIO_WINDOW {
                self.device.write_config(offset - reg::CONFIG, data);
                // Any device-visible change bumps the generation (§2.5.1 / §4.2.2).
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("virtio-mmio: {}-byte write at {offset:#x} ignored", data.len());
            return;
        };
        if offset % 4 != 0 {
            log::debug!("virtio-mmio: misaligned write at {offset:#x} ignored");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// A minimal device: the transport is what is under test.
    struct TestDevice {
        config: Vec<u8>,
        activations: Arc<Mutex<Vec<(usize, u64)>>>,
        /// (next_avail, next_used) of each queue at the last activation.
        positions: Arc<Mutex<Vec<(u16, u16)>>>,
        fail_activate: bool,
        resettable: bool,
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 3 | VIRTIO_RING_F_EVENT_IDX
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = *self.config.get(offset as usize + i).unwrap_or(&0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Backend("test".into()));
            }
            assert!(ctx.queues.iter().all(|q| q.ready()));
            assert_eq!(ctx.queue_evts.len(), ctx.queues.len());
            self.activations.lock().unwrap().push((ctx.queues.len(), ctx.acked_features));
            *self.positions.lock().unwrap() = ctx.queues.iter().map(|q| (q.next_avail(), q.next_used())).collect();
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resettable
        }
    }

    struct Fixture {
        t: MmioTransport,
        activations: Arc<Mutex<Vec<(usize, u64)>>>,
    }

    fn fixture_with(fail_activate: bool, resettable: bool) -> Fixture {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let activations = Arc::new(Mutex::new(vec![]));
        let dev = TestDevice {
            config: vec![1, 2, 3, 4, 5, 6, 7, 8],
            activations: activations.clone(),
            positions: Default::default(),
            fail_activate,
            resettable,
        };
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        Fixture { t: MmioTransport::new(mem, Box::new(dev), irq).unwrap(), activations }
    }

    fn fixture() -> Fixture {
        fixture_with(false, true)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, features as u32);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, idx: u32, base: u64) {
        w(t, reg::QUEUE_SEL, idx);
        w(t, reg::QUEUE_NUM, 8);
        w(t, reg::QUEUE_DESC_LOW, base as u32);
        w(t, reg::QUEUE_DESC_HIGH, 0);
        w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, reg::QUEUE_DRIVER_HIGH, 0);
        w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, reg::QUEUE_DEVICE_HIGH, 0);
        w(t, reg::QUEUE_READY, 1);
    }

    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn a_template_restores_the_registers_and_activates_at_the_used_index() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        setup_queue(&mut f.t, 0, 0x10000);
        setup_queue(&mut f.t, 1, 0x20000);
        w(&mut f.t, reg::STATUS, ALL);
        assert!(f.t.is_activated());
        f.t.interrupt().signal_used_queue();
        // The device used 5 buffers of queue 1 (used ring idx at +2).
        vm_memory::Bytes::write_obj(&f.t.mem, 5u16, GuestAddress(0x22002)).unwrap();
        let snap = f.t.snapshot();
        assert_eq!(snap.status, ALL);
        assert_eq!(snap.queues[1].used_ring, 0x22000);

        // A fresh transport over the same memory, as in a restored VM.
        let positions = Arc::new(Mutex::new(vec![]));
        let dev = TestDevice {
            config: vec![0; 8],
            activations: Default::default(),
            positions: positions.clone(),
            fail_activate: false,
            resettable: true,
        };
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(f.t.mem.clone(), Box::new(dev), irq).unwrap();
        t.restore(&snap).unwrap();
        assert!(t.is_activated());
        assert_eq!(t.snapshot(), snap);
        assert_eq!(*positions.lock().unwrap(), vec![(0, 0), (5, 5)]);
        assert_eq!(r(&mut t, reg::STATUS), ALL);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), crate::devices::virtio::VIRTIO_MMIO_INT_VRING);

        // Another device, an unknown feature or a queue outside memory is refused.
        let other = |edit: &dyn Fn(&mut crate::snapshot::TransportSnapshot)| {
            let mut s = snap.clone();
            edit(&mut s);
            let mut t = fixture().t;
            t.restore(&s)
        };
        assert!(other(&|s| s.device_type = 19).is_err());
        assert!(other(&|s| s.acked_features |= 1 << 40).is_err());
        assert!(other(&|s| s.queues[0].desc_table = 1 << 40).is_err());
        assert!(other(&|s| s.queues[0].size = 64).is_err());
    }

    #[test]
    fn identification_registers() {
        let mut f = fixture();
        let t = &mut f.t;
        assert_eq!(r(t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(t, reg::VERSION), 2);
        assert_eq!(r(t, reg::DEVICE_ID), 42);
        assert_eq!(r(t, reg::VENDOR_ID), 0);
        w(t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(t, reg::DEVICE_FEATURES), 1 << 3 | 1 << 29);
        w(t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(t, reg::DEVICE_FEATURES), 1);
        w(t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(t, reg::DEVICE_FEATURES), 0);
        assert_eq!(r(t, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(t, reg::SHM_LEN_HIGH), u32::MAX);
        w(t, reg::QUEUE_SEL, 0);
        assert_eq!(r(t, reg::QUEUE_NUM_MAX), 16);
        w(t, reg::QUEUE_SEL, 1);
        assert_eq!(r(t, reg::QUEUE_NUM_MAX), 8);
        w(t, reg::QUEUE_SEL, 2);
        assert_eq!(r(t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(r(t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn full_negotiation_activates() {
        let mut f = fixture();
        let t = &mut f.t;
        let feats = VIRTIO_F_VERSION_1 | 1 << 3;
        negotiate(t, feats);
        assert_eq!(r(t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        setup_queue(t, 0, 0x10000);
        setup_queue(t, 1, 0x20000);
        w(t, reg::QUEUE_SEL, 1);
        assert_eq!(r(t, reg::QUEUE_READY), 1);
        w(t, reg::STATUS, ALL);
        assert_eq!(r(t, reg::STATUS), ALL);
        assert!(t.is_activated());
        assert_eq!(*f.activations.lock().unwrap(), vec![(2, feats)]);
        // Queue registers are frozen after DRIVER_OK.
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_READY, 0);
        assert_eq!(r(t, reg::QUEUE_READY), 1);
    }

    #[test]
    fn features_ok_refused_for_unoffered_or_missing_version1() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1 | 1 << 4);
        assert_eq!(r(&mut f.t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        let mut f = fixture();
        negotiate(&mut f.t, 1 << 3);
        assert_eq!(r(&mut f.t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // DRIVER_OK without FEATURES_OK is ignored too.
        w(&mut f.t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert!(!f.t.is_activated());
        assert!(f.activations.lock().unwrap().is_empty());
    }

    #[test]
    fn out_of_order_status_ignored() {
        let mut f = fixture();
        let t = &mut f.t;
        w(t, reg::STATUS, status::DRIVER);
        assert_eq!(r(t, reg::STATUS), 0);
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(r(t, reg::STATUS), status::ACKNOWLEDGE);
        w(t, reg::STATUS, ALL);
        assert_eq!(r(t, reg::STATUS), status::ACKNOWLEDGE);
        // Features cannot be written before DRIVER.
        w(t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.acked_features(), 0);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // Clearing a bit without a full reset is ignored.
        w(t, reg::STATUS, status::DRIVER);
        assert_eq!(r(t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FAILED);
        assert_ne!(r(t, reg::STATUS) & status::FAILED, 0);
    }

    #[test]
    fn queue_config_only_between_features_ok_and_driver_ok() {
        let mut f = fixture();
        let t = &mut f.t;
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_READY, 1);
        assert_eq!(r(t, reg::QUEUE_READY), 0, "before FEATURES_OK");
        negotiate(t, VIRTIO_F_VERSION_1);
        // Non-existent queue: writes ignored, no panic.
        w(t, reg::QUEUE_SEL, 0xffff_ffff);
        w(t, reg::QUEUE_NUM, 4);
        w(t, reg::QUEUE_READY, 1);
        assert_eq!(r(t, reg::QUEUE_READY), 0);
        // Invalid sizes are refused by the queue (activation then fails).
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_NUM, 0x1_0000);
        w(t, reg::QUEUE_NUM, 3);
        w(t, reg::QUEUE_NUM, 32);
    }

    #[test]
    fn queue_outside_guest_memory_is_not_activated() {
        let mut f = fixture();
        let t = &mut f.t;
        negotiate(t, VIRTIO_F_VERSION_1);
        setup_queue(t, 0, 0x10000);
        // Queue 1 rings beyond the 1 MiB of guest memory.
        setup_queue(t, 1, 0xff000);
        w(t, reg::STATUS, ALL);
        assert!(!t.is_activated());
        assert_ne!(r(t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(f.activations.lock().unwrap().is_empty());
        // Config change interrupt raised.
        assert_ne!(r(t, reg::INTERRUPT_STATUS) & 2, 0);
        // Reset recovers.
        w(t, reg::STATUS, 0);
        assert_eq!(r(t, reg::STATUS), 0);
        assert_eq!(r(t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_not_ready_is_not_activated() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut f.t, 0, 0x10000);
        w(&mut f.t, reg::STATUS, ALL);
        assert!(!f.t.is_activated());
        assert_ne!(f.t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn activation_failure_sets_needs_reset() {
        let mut f = fixture_with(true, true);
        negotiate(&mut f.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut f.t, 0, 0x10000);
        setup_queue(&mut f.t, 1, 0x20000);
        w(&mut f.t, reg::STATUS, ALL);
        assert!(!f.t.is_activated());
        assert_ne!(f.t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_after_activation() {
        let mut f = fixture();
        negotiate(&mut f.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut f.t, 0, 0x10000);
        setup_queue(&mut f.t, 1, 0x20000);
        w(&mut f.t, reg::STATUS, ALL);
        assert!(f.t.is_activated());
        w(&mut f.t, reg::STATUS, 0);
        assert_eq!(f.t.status(), 0);
        assert!(!f.t.is_activated());
        w(&mut f.t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut f.t, reg::QUEUE_READY), 0);
        assert_eq!(f.t.acked_features(), 0);
        // Unresettable device: NEEDS_RESET, stays activated.
        let mut f = fixture_with(false, false);
        negotiate(&mut f.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut f.t, 0, 0x10000);
        setup_queue(&mut f.t, 1, 0x20000);
        w(&mut f.t, reg::STATUS, ALL);
        w(&mut f.t, reg::STATUS, 0);
        assert_eq!(f.t.status(), status::DEVICE_NEEDS_RESET);
        w(&mut f.t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(f.t.status(), status::DEVICE_NEEDS_RESET);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut f = fixture();
        f.t.interrupt().signal_used_queue();
        f.t.interrupt().signal_config_change();
        assert_eq!(r(&mut f.t, reg::INTERRUPT_STATUS), 3);
        w(&mut f.t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut f.t, reg::INTERRUPT_STATUS), 2);
        assert!(f.t.interrupt().irqfd().read().unwrap() >= 2);
    }

    #[test]
    fn queue_notify_without_ioeventfd() {
        let mut f = fixture();
        w(&mut f.t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(f.t.queue_evts()[1].read().unwrap(), 1);
        assert!(f.t.queue_evts()[0].read().is_err(), "queue 0 not notified");
        w(&mut f.t, reg::QUEUE_NOTIFY, 99);
    }

    #[test]
    fn config_space_any_width() {
        let mut f = fixture();
        let t = &mut f.t;
        let mut b = [0u8; 1];
        t.read(0x102, &mut b);
        assert_eq!(b, [3]);
        let mut d = [0u8; 2];
        t.read(0x106, &mut d);
        assert_eq!(d, [7, 8]);
        t.read(0x107, &mut d);
        assert_eq!(d, [8, 0], "past the device config reads 0");
        let gen = r(t, reg::CONFIG_GENERATION);
        t.write(0x100, &[9]);
        t.read(0x100, &mut b);
        assert_eq!(b, [9]);
        assert_ne!(r(t, reg::CONFIG_GENERATION), gen);
        // Past the window.
        let mut q = [0u8; 4];
        t.read(0xffe, &mut q);
        assert_eq!(q, [0xff; 4]);
        t.write(0xffe, &[1, 2, 3, 4]);
    }

    #[test]
    fn misaligned_and_bad_width_register_access() {
        let mut f = fixture();
        let t = &mut f.t;
        let mut b = [0u8; 1];
        t.read(reg::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0xff]);
        let mut d = [0u8; 4];
        t.read(reg::MAGIC_VALUE + 1, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut e = [0u8; 8];
        t.read(reg::MAGIC_VALUE, &mut e);
        assert_eq!(e, [0xff; 8]);
        t.write(reg::STATUS + 2, &1u32.to_le_bytes());
        t.write(reg::STATUS, &[1]);
        t.write(reg::STATUS, &[1, 0]);
        assert_eq!(t.status(), 0);
        // Unknown register offsets.
        assert_eq!(r(t, 0x0c0), u32::MAX);
        assert_eq!(r(t, reg::QUEUE_NOTIFY), u32::MAX, "write-only");
        w(t, reg::MAGIC_VALUE, 0);
        assert_eq!(r(t, reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    }

    proptest::proptest! {
        /// Any sequence of guest accesses keeps the transport consistent and never panics.
        #[test]
        fn random_accesses_never_panic(ops in proptest::collection::vec((0u64..0x1100, 0u32.., 0usize..4, proptest::bool::ANY), 0..200)) {
            let mut f = fixture();
            for (off, val, width, write) in ops {
                let len = [1usize, 2, 4, 8][width];
                if write {
                    let bytes = (u64::from(val) | u64::from(val) << 32).to_le_bytes();
                    f.t.write(off, &bytes[..len]);
                } else {
                    let mut d = vec![0u8; len];
                    f.t.read(off, &mut d);
                }
                let s = f.t.status();
                proptest::prop_assert!(s & status::DRIVER_OK == 0 || s & status::FEATURES_OK != 0 || s & status::DEVICE_NEEDS_RESET != 0);
                proptest::prop_assert_eq!(f.t.acked_features() & !(VIRTIO_F_VERSION_1 | 1 << 3 | VIRTIO_RING_F_EVENT_IDX) != 0 && s & status::FEATURES_OK != 0, false);
            }
        }
    }
}
