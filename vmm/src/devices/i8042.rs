//! Minimal i8042 keyboard controller: enough for Linux's `reboot=k` and for
//! its probe to find a sane controller (ports 0x60..=0x64).
//!
//! * port 0x64 write 0xfe (pulse reset line): sets the VM's reset flag; the
//!   vCPU that made the access stops the VM with a reset exit;
//! * commands 0x20/0x60 (read/write controller configuration byte),
//!   0xaa (self test → 0x55), 0xab (interface test → 0x00), 0xd0/0xd1
//!   (read/write output port); others ignored;
//! * port 0x61 (system control port B, normally handled in-kernel by KVM's
//!   PIT speaker emulation) latches what is written.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::bus::BusDevice;

/// First port of the i8042 (data port).
pub const I8042_BASE: u16 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_LEN: u64 = 5;

const DATA: u64 = 0;
const PORT_B: u64 = 1;
const CMD_STATUS: u64 = 4;
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;

/// The controller.
pub struct I8042 {
    reset: Arc<AtomicBool>,
    ctr: u8,
    outp: u8,
    port_b: u8,
    status: u8,
    out_buf: Option<u8>,
    pending_cmd: Option<u8>,
}

impl I8042 {
    /// Controller that sets `reset` when the guest pulses the reset line.
    pub fn new(reset: Arc<AtomicBool>) -> Self {
        I8042 { reset, ctr: 0x30, outp: 0x01, port_b: 0, status: STATUS_SYS, out_buf: None, pending_cmd: None }
    }

    /// The registers, for a template.
    pub fn snapshot(&self) -> crate::snapshot::I8042Snapshot {
        crate::snapshot::I8042Snapshot {
            ctr: self.ctr,
            outp: self.outp,
            port_b: self.port_b,
            status: self.status,
            out_buf: self.out_buf,
            pending_cmd: self.pending_cmd,
        }
    }

    /// Sets the registers from a template.
    pub fn restore(&mut self, s: &crate::snapshot::I8042Snapshot) {
        self.ctr = s.ctr;
        self.outp = s.outp;
        self.port_b = s.port_b;
        self.status = s.status;
        self.out_buf = s.out_buf;
        self.pending_cmd = s.pending_cmd;
    }

    fn push(&mut self, b: u8) {
        self.out_buf = Some(b);
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_CMD;
        match cmd {
            0x20 => self.push(self.ctr),
            0x60 | 0xd1 => self.pending_cmd = Some(cmd),
            0xaa => self.push(0x55),
            0xab => self.push(0x00),
            0xd0 => self.push(self.outp),
            0xfe => {
                log::info!("i8042: guest requested CPU reset");
                self.reset.store(true, Ordering::SeqCst);
            }
            other => log::debug!("i8042: ignored command {other:#x}"),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if data.len() != 1 {
            return;
        }
        data[0] = match offset {
            DATA => {
                let b = self.out_buf.take().unwrap_or(0);
                b
            }
            PORT_B => self.port_b,
            CMD_STATUS => self.status | if self.out_buf.is_some() { STATUS_OBF } else { 0 },
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        let v = data[0];
        match offset {
            DATA => {
                self.status &= !STATUS_CMD;
                match self.pending_cmd.take() {
                    Some(0x60) => self.ctr = v,
                    Some(0xd1) => self.outp = v,
                    _ => log::debug!("i8042: ignored data byte {v:#x}"),
                }
            }
            PORT_B => self.port_b = v,
            CMD_STATUS => self.command(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_sets_flag() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut d = I8042::new(flag.clone());
        d.write(CMD_STATUS, &[0x20]);
        assert!(!flag.load(Ordering::SeqCst));
        d.write(CMD_STATUS, &[0xfe]);
        assert!(flag.load(Ordering::SeqCst));
    }

    #[test]
    fn ctr_and_self_test() {
        let mut d = I8042::new(Arc::new(AtomicBool::new(false)));
        assert_eq!(rd(&mut d, CMD_STATUS) & STATUS_OBF, 0);
        d.write(CMD_STATUS, &[0xaa]);
        assert_ne!(rd(&mut d, CMD_STATUS) & STATUS_OBF, 0);
        assert_eq!(rd(&mut d, DATA), 0x55);
        assert_eq!(rd(&mut d, CMD_STATUS) & STATUS_OBF, 0);
        d.write(CMD_STATUS, &[0x60]);
        d.write(DATA, &[0x47]);
        d.write(CMD_STATUS, &[0x20]);
        assert_eq!(rd(&mut d, DATA), 0x47);
        d.write(PORT_B, &[0x03]);
        assert_eq!(rd(&mut d, PORT_B), 0x03);
        // The registers survive a template.
        d.write(CMD_STATUS, &[0xaa]);
        let mut r = I8042::new(Arc::new(AtomicBool::new(false)));
        r.restore(&d.snapshot());
        assert_eq!(r.snapshot(), d.snapshot());
        assert_eq!(rd(&mut r, DATA), 0x55);
        assert_eq!(rd(&mut r, PORT_B), 0x03);
        let mut two = [0u8; 2];
        d.read(DATA, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        assert_eq!(rd(&mut d, 2), 0xff);
    }
}
