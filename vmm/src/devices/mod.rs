//! Emulated devices: the port I/O / MMIO buses, the 8250 UART, a minimal
//! i8042 and the virtio devices behind the virtio-mmio transport.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
