//! Address buses: which device answers a port I/O or MMIO access.
//!
//! A [`Bus`] maps non-overlapping `[base, base + len)` ranges to devices. A
//! vCPU looks the exit address up and calls the device with the offset
//! inside its range. Accesses no device claims (or that straddle the end of
//! a range) are reported as unhandled; the vCPU loop then reads all-ones and
//! drops writes.

use std::sync::{Arc, Mutex};

/// A device on a [`Bus`]. `offset` is relative to the device's base;
/// `data.len()` is the access size (1, 2, 4 or 8 bytes).
pub trait BusDevice: Send {
    /// Guest read: fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Shared handle to a bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Bus errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The new range overlaps an existing one or is empty/overflows.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is invalid")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// A sorted set of device ranges.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// Empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`. Errors on overlap, zero length
    /// or address overflow.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Error::Overlap { base, len })?;
        if self.entries.iter().any(|e| base < e.base + e.len && e.base < end) {
            return Err(Error::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, device });
        Ok(())
    }

    /// Finds the device whose range fully contains `[addr, addr + size)`;
    /// returns it with the offset of `addr` in its range.
    pub fn resolve(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let e = &self.entries[idx];
        let offset = addr - e.base;
        let end = offset.checked_add(size as u64)?;
        (end <= e.len).then_some((&e.device, offset))
    }

    /// Dispatches a read; false when no device handles `addr` (`data` untouched).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; false when no device handles `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock (a panicking device thread
/// must not take the vCPUs down with it).
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

/// The port I/O and MMIO buses of one VM.
#[derive(Default)]
pub struct DeviceManager {
    /// Port I/O bus (16-bit addresses).
    pub pio: Bus,
    /// MMIO bus (guest physical addresses not backed by RAM).
    pub mmio: Bus,
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    fn rec() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder { last: vec![] }))
    }

    #[test]
    fn dispatch_and_bounds() {
        let mut bus = Bus::new();
        let a = rec();
        let b = rec();
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        bus.insert(0x200, 0x8, b.clone()).unwrap();
        let mut d = [0u8; 2];
        assert!(bus.read(0x104, &mut d));
        assert_eq!(d, [4, 4]);
        assert!(bus.write(0x207, &[9]));
        assert_eq!(b.lock().unwrap().last, vec![(7, vec![9])]);
        // Straddling the end, before the first, in a hole, after the last.
        assert!(!bus.read(0x10f, &mut d));
        assert!(!bus.write(0xff, &[1]));
        assert!(!bus.write(0x150, &[1]));
        assert!(!bus.write(0x208, &[1]));
        assert!(!bus.write(u64::MAX, &[1, 2]));
        assert!(a.lock().unwrap().last.is_empty());
    }

    #[test]
    fn rejects_overlap_and_empty() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, rec()).unwrap();
        assert!(bus.insert(0x10f, 1, rec()).is_err());
        assert!(bus.insert(0xf8, 0x10, rec()).is_err());
        assert!(bus.insert(0x300, 0, rec()).is_err());
        assert!(bus.insert(u64::MAX, 2, rec()).is_err());
        bus.insert(0x110, 1, rec()).unwrap();
        bus.insert(0x0, 0x100, rec()).unwrap();
    }
}
