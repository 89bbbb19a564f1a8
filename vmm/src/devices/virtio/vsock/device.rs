//! [`Vsock`]: the virtio-vsock device (virtio 1.2 §5.10) behind the
//! virtio-mmio transport.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_handler::{Worker, NUM_QUEUES};
use super::muxer::{Muxer, MuxerError};
use super::packet::VSOCK_HOST_CID;
use crate::devices::virtio::{
    ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Device ID of virtio-vsock (virtio 1.2 §5.10.1).
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size of each of the three virtqueues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

/// Errors creating a [`Vsock`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// CIDs 0, 1 and 2 are reserved (§5.10.4) and Linux limits CIDs to 32 bits
    /// (`0xffffffff` = `VMADDR_CID_ANY`).
    #[error("invalid guest CID {0}: must be in 3..=0xfffffffe")]
    InvalidCid(u64),
    /// Setting up the host-side Unix listener failed.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
}

struct Running {
    kill_evt: EventFd,
    handle: JoinHandle<Muxer>,
}

/// The virtio-vsock device. Created with its host-side Unix listener already
/// bound (host clients may connect before the guest driver is up; they are
/// served once the device is activated); removes the socket file on drop.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// The muxer while the device is not running (its worker owns it otherwise).
    muxer: Option<Muxer>,
    running: Option<Running>,
    /// The device was reset after an activation: tell the driver with a
    /// transport-reset event on the next activation.
    reset_pending: bool,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("running", &self.running.is_some())
            .finish()
    }
}

impl Vsock {
    /// Creates the device for guest CID `guest_cid`, listening for host
    /// clients on the Unix socket `uds_path` (a stale socket file is removed).
    ///
    /// Errors: [`Error::InvalidCid`] for a reserved or over-32-bit CID,
    /// [`Error::Muxer`] when the socket cannot be set up.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, Error> {
        if guest_cid <= VSOCK_HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(Error::InvalidCid(guest_cid));
        }
        let muxer = Muxer::new(guest_cid, uds_path)?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            muxer: Some(muxer),
            running: None,
            reset_pending: false,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host-side listener path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Stops the worker thread (if any) and takes its muxer back.
    fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.kill_evt.write(1);
            match r.handle.join() {
                Ok(m) => self.muxer = Some(m),
                Err(_) => log::error!("vsock: worker thread panicked"),
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    /// `VIRTIO_F_VERSION_1` and `VIRTIO_RING_F_EVENT_IDX` (notification suppression
    /// in both directions, virtio 1.2 §2.7.10); no vsock feature bits (§5.10.3).
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    /// Configuration space (§5.10.4): `le64 guest_cid` at offset 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| cfg.get(o).copied())
                .unwrap_or(0);
        }
    }

    /// The configuration space is read-only for the driver; writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "vsock: ignoring config write of {} bytes at {offset}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != NUM_QUEUES || ctx.queue_evts.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: ctx.queues.len().min(ctx.queue_evts.len()),
            });
        }
        self.stop();
        let muxer = self
            .muxer
            .take()
            .ok_or_else(|| ActivateError::Backend("vsock muxer lost (worker panicked)".into()))?;
        let kill_evt = match EventFd::new(EFD_NONBLOCK) {
            Ok(e) => e,
            Err(e) => {
                self.muxer = Some(muxer);
                return Err(ActivateError::Backend(format!("kill eventfd: {e}")));
            }
        };
        let worker_kill = match kill_evt.try_clone() {
            Ok(e) => e,
            Err(e) => {
                self.muxer = Some(muxer);
                return Err(ActivateError::Backend(format!("kill eventfd: {e}")));
            }
        };
        let worker = Worker {
            mem: ctx.mem,
            queues: ctx.queues,
            queue_evts: ctx.queue_evts,
            interrupt: ctx.interrupt,
            muxer,
            kill_evt: worker_kill,
            reset_pending: std::mem::take(&mut self.reset_pending),
        };
        let handle = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || worker.run())
            .map_err(|e| ActivateError::Backend(format!("spawning vsock worker: {e}")))?;
        self.running = Some(Running { kill_evt, handle });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let was_running = self.running.is_some();
        self.stop();
        match self.muxer.as_mut() {
            Some(m) => {
                m.reset();
                self.reset_pending |= was_running;
                true
            }
            None => false,
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop();
        // Dropping the muxer closes every socket and removes `uds_path`.
    }
}
