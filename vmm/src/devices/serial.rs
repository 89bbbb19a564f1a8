//! 8250/16550 UART (COM1 at port 0x3f8, IRQ 4) using vm-superio's `Serial`.
//!
//! The interrupt line is an eventfd registered with KVM as an irqfd, so the
//! device raises IRQ 4 without the vCPU thread calling into KVM. Guest input
//! is not supported (the console is output only).

use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of UART registers (ports 0x3f8..=0x3ff).
pub const SERIAL_PORT_LEN: u64 = 8;

/// An eventfd as a vm-superio interrupt trigger.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Console output writer.
pub type SerialOut = Box<dyn Write + Send>;

/// The UART as a port I/O bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOut>,
}

impl SerialDevice {
    /// UART raising `irq_evt` and writing transmitted bytes to `out`.
    pub fn new(irq_evt: EventFd, out: SerialOut) -> Self {
        SerialDevice { serial: Serial::new(EventFdTrigger(irq_evt), out) }
    }

    /// UART restored from a template's register state (vm-superio's
    /// `Serial::from_state`). Errors: an input buffer above the FIFO size.
    pub fn from_snapshot(
        irq_evt: EventFd,
        out: SerialOut,
        s: &crate::snapshot::SerialSnapshot,
    ) -> Result<Self, String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        Serial::from_state(&state, EventFdTrigger(irq_evt), vm_superio::serial::NoEvents, out)
            .map(|serial| SerialDevice { serial })
            .map_err(|e| format!("serial state: {e:?}"))
    }

    /// The UART's registers, for a template.
    pub fn snapshot(&self) -> crate::snapshot::SerialSnapshot {
        let s = self.serial.state();
        crate::snapshot::SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Flushes buffered console output.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= SERIAL_PORT_LEN {
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= SERIAL_PORT_LEN {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            log::warn!("serial: write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_interrupts() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let mut s = SerialDevice::new(evt.try_clone().unwrap(), Box::new(out.clone()));
        // Enable THR-empty interrupt (IER bit 1), then send bytes.
        s.write(1, &[0x02]);
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert!(evt.read().unwrap() >= 1);
        // Its registers survive a template.
        let st = s.snapshot();
        assert_eq!(st.interrupt_enable, 0x02);
        let r = SerialDevice::from_snapshot(evt.try_clone().unwrap(), Box::new(out.clone()), &st).unwrap();
        assert_eq!(r.snapshot(), st);
        // Bad sizes are ignored / read all-ones.
        s.write(0, &[b'x', b'y']);
        let mut d = [0u8; 2];
        s.read(5, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        // LSR reports transmitter empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x60, 0);
    }
}
