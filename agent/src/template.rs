//! VM templates, the guest agent's part (`vmrt.template`, docs/contracts.md).
//!
//! A template VM boots the kernel and the agent as usual, except that the
//! agent leaves out what belongs to one sandbox: it does not mount the
//! virtio-fs shares (`vmrt.share`) nor connect the log port
//! (`vmrt.log_port`). Once its API and stdio listeners are up it asks the VMM
//! for a snapshot ([`request_snapshot`]): the template's VMM freezes the VM on
//! that request, writes the snapshot and exits; every VM restored from the
//! snapshot resumes right after the request, in the same agent.
//!
//! A resumed agent then waits for the `Restored` RPC
//! (`protocol/protos/agent.proto`), which brings what the template could not
//! know or must not share with its other clones ([`Restorer::restore`]): the
//! host's wall clock, fresh entropy for the kernel's CRNG (every clone starts
//! with the template's pool), the shares and the log connection. Until then
//! the server refuses every container and process call.

use std::time::Duration;

use crate::config::Share;
use crate::init::{self, InitError};

/// x86 I/O port the guest writes [`REQUEST_MAGIC`] to (a 32-bit `out`) to ask
/// the VMM for a snapshot. Must match `vmm::snapshot::REQUEST_PORT`.
pub const REQUEST_PORT: u16 = 0x5e0;

/// Value of the 32-bit snapshot request written to [`REQUEST_PORT`]: `"SNAP"`
/// as little-endian bytes. Must match `vmm::snapshot::REQUEST_MAGIC`.
pub const REQUEST_MAGIC: u32 = 0x5041_4e53;

/// Fewest entropy bytes `Restored` accepts (128 bits: a full CRNG seed).
pub const MIN_ENTROPY_BYTES: usize = 16;

/// Most entropy bytes `Restored` accepts.
pub const MAX_ENTROPY_BYTES: usize = 512;

/// The guest's random device, whose ioctls feed and reseed the kernel's pool.
const URANDOM: &str = "/dev/urandom";

/// `RNDADDENTROPY` (linux/random.h): `_IOW('R', 0x03, int[2])`; its argument
/// is a `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`.
const RNDADDENTROPY: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>());

/// `RNDRESEEDCRNG` (linux/random.h): `_IO('R', 0x07)`, no argument.
const RNDRESEEDCRNG: nix::sys::ioctl::ioctl_num_type = nix::request_code_none!(b'R', 0x07);

/// A failed template step: the snapshot request, or a check or step of
/// `Restored`.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// `ioperm(2)` refused access to [`REQUEST_PORT`]: EPERM without
    /// CAP_SYS_RAWIO, ENOSYS from a kernel built without
    /// `CONFIG_X86_IOPL_IOPERM` (which the guest kernel needs for templates).
    #[error("ioperm({REQUEST_PORT:#x}, 4): {errno}{hint}", errno = .0, hint = ioperm_hint(*.0))]
    Ioperm(nix::Error),
    /// Port I/O is x86 only.
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    #[error("snapshot requests need x86 port I/O")]
    Unsupported,
    /// `Restored.entropy` is shorter than [`MIN_ENTROPY_BYTES`] or longer
    /// than [`MAX_ENTROPY_BYTES`].
    #[error("entropy: {0} bytes, expected {MIN_ENTROPY_BYTES}..={MAX_ENTROPY_BYTES}")]
    EntropyLength(usize),
    /// `Restored.realtime_ns` is before the Unix epoch.
    #[error("realtime_ns {0}: before the Unix epoch")]
    NegativeRealtime(i64),
    /// `clock_settime(CLOCK_REALTIME)` failed.
    #[error("clock_settime(CLOCK_REALTIME): {0}")]
    SetClock(nix::Error),
    /// Opening [`URANDOM`] failed.
    #[error("open {URANDOM}: {0}")]
    OpenUrandom(std::io::Error),
    /// The `RNDADDENTROPY` ioctl failed.
    #[error("ioctl RNDADDENTROPY on {URANDOM}: {0}")]
    AddEntropy(nix::Error),
    /// The `RNDRESEEDCRNG` ioctl failed.
    #[error("ioctl RNDRESEEDCRNG on {URANDOM}: {0}")]
    Reseed(nix::Error),
    /// Shares that did not mount (the others are mounted and stay so).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Mounts(Vec<InitError>),
}

/// What to add to an ioperm error: the kernel option it needs on ENOSYS.
fn ioperm_hint(e: nix::Error) -> &'static str {
    if e == nix::Error::ENOSYS {
        " (the guest kernel needs CONFIG_X86_IOPL_IOPERM=y)"
    } else {
        ""
    }
}

/// Asks the VMM for a snapshot of the VM: `ioperm(REQUEST_PORT, 4, 1)`, then
/// a 32-bit `out` of [`REQUEST_MAGIC`] to [`REQUEST_PORT`], then the port
/// access is dropped again. In a template's VMM the `out` never completes
/// (the VM is frozen, written to disk and the VMM exits); in a VM restored
/// from that snapshot it returns at once, and so does this function.
///
/// Only as PID 1 inside the guest: needs CAP_SYS_RAWIO, and on a host the
/// port belongs to real hardware. Call it when nothing of the agent is in the
/// middle of vsock I/O.
///
/// # Errors
/// [`TemplateError::Ioperm`] (nothing was written), or
/// [`TemplateError::Unsupported`] off x86.
pub fn request_snapshot() -> Result<(), TemplateError> {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        let port = libc::c_ulong::from(REQUEST_PORT);
        // SAFETY: ioperm only changes this thread's I/O permission bitmap.
        if unsafe { libc::ioperm(port, 4, 1) } != 0 {
            return Err(TemplateError::Ioperm(nix::Error::last()));
        }
        // SAFETY: a 32-bit OUT to the ports this thread was just allowed; no
        // guest device sits there, the VMM handles it. No `nomem`: every
        // store before it is done before the VM is frozen, as the compiler
        // sees it too.
        unsafe {
            std::arch::asm!(
                "out dx, eax",
                in("dx") REQUEST_PORT,
                in("eax") REQUEST_MAGIC,
                options(nostack, preserves_flags)
            );
        }
        // SAFETY: as above.
        unsafe { libc::ioperm(port, 4, 0) };
        Ok(())
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    {
        Err(TemplateError::Unsupported)
    }
}

/// The template VM's snapshot point, as PID 1: logs "template: snapshot
/// requested", calls [`request_snapshot`] and, in a VM restored from the
/// snapshot, logs "template: resumed".
///
/// # Errors
/// The request could not be made ([`request_snapshot`]'s error, logged here).
/// No `Restored` will ever come then (the VM was not snapshotted, so no clone
/// exists): the caller reboots the VM at once, the template's VMM exits 0
/// without a snapshot, and the shim reports the template as incomplete
/// instead of waiting out its timeout.
pub fn snapshot_point() -> Result<(), TemplateError> {
    log::info!("template: snapshot requested");
    match request_snapshot() {
        Ok(()) => {
            log::info!("template: resumed");
            Ok(())
        }
        Err(e) => {
            log::error!("template: no snapshot: {e}; rebooting the template VM");
            Err(e)
        }
    }
}

/// The checked arguments of `Restored`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreInput {
    /// The host's wall clock: time since the Unix epoch.
    pub realtime: Duration,
    /// Random bytes from the host, [`MIN_ENTROPY_BYTES`]..=[`MAX_ENTROPY_BYTES`].
    pub entropy: Vec<u8>,
}

/// Checks `Restored`'s arguments: `realtime_ns` (ns since the Unix epoch) not
/// negative, `entropy` [`MIN_ENTROPY_BYTES`]..=[`MAX_ENTROPY_BYTES`] bytes.
///
/// # Errors
/// [`TemplateError::EntropyLength`], [`TemplateError::NegativeRealtime`]
/// (the entropy is checked first).
pub fn validate_restored(realtime_ns: i64, entropy: &[u8]) -> Result<RestoreInput, TemplateError> {
    if !(MIN_ENTROPY_BYTES..=MAX_ENTROPY_BYTES).contains(&entropy.len()) {
        return Err(TemplateError::EntropyLength(entropy.len()));
    }
    let ns =
        u64::try_from(realtime_ns).map_err(|_| TemplateError::NegativeRealtime(realtime_ns))?;
    Ok(RestoreInput {
        realtime: Duration::from_nanos(ns),
        entropy: entropy.to_vec(),
    })
}

/// Sets CLOCK_REALTIME to `since_epoch` (needs CAP_SYS_TIME).
///
/// # Errors
/// [`TemplateError::SetClock`] with the errno.
pub fn set_realtime(since_epoch: Duration) -> Result<(), TemplateError> {
    let ts = libc::timespec {
        tv_sec: since_epoch.as_secs() as libc::time_t,
        tv_nsec: since_epoch.subsec_nanos() as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec we pass and nothing else.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(TemplateError::SetClock(nix::Error::last()));
    }
    Ok(())
}

/// `struct rand_pool_info` with `bytes` as its buffer, in 32-bit words (the
/// ioctl's layout): `entropy_count` = 8 bits per byte, `buf_size` = bytes.
fn rand_pool_info(bytes: &[u8]) -> Vec<u32> {
    let mut words = vec![0u32; 2 + bytes.len().div_ceil(4)];
    words[0] = (bytes.len() * 8) as u32;
    words[1] = bytes.len() as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        words[2 + i] = u32::from_ne_bytes(w);
    }
    words
}

/// Mixes `bytes` into the kernel's entropy pool, credited as 8 bits per byte
/// (`RNDADDENTROPY` on `/dev/urandom`), then reseeds the CRNG from it
/// (`RNDRESEEDCRNG`). Needs CAP_SYS_ADMIN.
///
/// # Errors
/// [`TemplateError::OpenUrandom`], [`TemplateError::AddEntropy`],
/// [`TemplateError::Reseed`].
pub fn add_entropy(bytes: &[u8]) -> Result<(), TemplateError> {
    use std::os::fd::AsRawFd;
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(URANDOM)
        .map_err(TemplateError::OpenUrandom)?;
    let info = rand_pool_info(bytes);
    // SAFETY: `info` is a rand_pool_info whose buffer holds buf_size bytes;
    // the kernel only reads it.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(TemplateError::AddEntropy(nix::Error::last()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(TemplateError::Reseed(nix::Error::last()));
    }
    Ok(())
}

/// What [`Restorer::restore`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// The clock was set, the CRNG reseeded and the shares mounted (false
    /// when not PID 1, where those steps are skipped).
    pub guest: bool,
    /// Shares mounted, this call and earlier failed ones together.
    pub shares: usize,
}

/// Connects the log port as a booted agent does at start-up (a failure is
/// logged as a warning, not returned).
pub type ConnectLog = Box<dyn FnOnce() + Send>;

/// The steps of `Restored` for one agent, in order: clock, entropy, shares,
/// log port. Holds what a retry after a failure must not do twice: shares
/// already mounted are skipped, and the log port is connected once.
pub struct Restorer {
    pid1: bool,
    shares: Vec<Share>,
    mounted: Vec<bool>,
    connect_log: Option<ConnectLog>,
}

impl Restorer {
    /// Steps for an agent that is PID 1 in the guest or not (`pid1`; when
    /// not, clock, entropy and shares are skipped), with the shares
    /// (`vmrt.share`) start-up deferred and `connect_log` for a
    /// `vmrt.log_port` it deferred.
    pub fn new(pid1: bool, shares: Vec<Share>, connect_log: Option<ConnectLog>) -> Self {
        let mounted = vec![false; shares.len()];
        Restorer {
            pid1,
            shares,
            mounted,
            connect_log,
        }
    }

    /// Runs the steps (blocking): sets CLOCK_REALTIME ([`set_realtime`]),
    /// feeds and reseeds the CRNG ([`add_entropy`]), mounts the shares not
    /// mounted yet (each logged as a booted agent logs it; all are tried),
    /// and, once everything before succeeded, connects the log port. Stops at
    /// the first failing step; calling it again redoes the clock and the
    /// entropy and retries the shares that failed.
    ///
    /// # Errors
    /// The failing step's [`TemplateError`].
    pub fn restore(&mut self, input: &RestoreInput) -> Result<Restored, TemplateError> {
        if self.pid1 {
            set_realtime(input.realtime)?;
            add_entropy(&input.entropy)?;
            let mut failed = Vec::new();
            for (share, mounted) in self.shares.iter().zip(self.mounted.iter_mut()) {
                if *mounted {
                    continue;
                }
                match init::mount_share_logged(share) {
                    Ok(()) => *mounted = true,
                    Err(e) => failed.push(e),
                }
            }
            if !failed.is_empty() {
                return Err(TemplateError::Mounts(failed));
            }
        } else if !self.shares.is_empty() {
            log::info!("not PID 1: vmrt.share entries are not mounted");
        }
        if let Some(connect) = self.connect_log.take() {
            connect();
        }
        Ok(Restored {
            guest: self.pid1,
            shares: self.mounted.iter().filter(|m| **m).count(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_constants_match_the_vmm_contract() {
        assert_eq!(REQUEST_PORT, 0x5e0);
        assert_eq!(&REQUEST_MAGIC.to_le_bytes(), b"SNAP");
    }

    #[test]
    fn ioperm_errors_name_the_missing_kernel_option() {
        let e = TemplateError::Ioperm(nix::Error::ENOSYS);
        assert!(e.to_string().starts_with("ioperm(0x5e0, 4): ENOSYS"), "{e}");
        assert!(e.to_string().contains("CONFIG_X86_IOPL_IOPERM"), "{e}");
        let e = TemplateError::Ioperm(nix::Error::EPERM);
        assert!(!e.to_string().contains("CONFIG_"), "{e}");
    }

    #[test]
    fn ioctl_numbers_are_linux_randoms() {
        // _IOW('R', 0x03, int[2]) and _IO('R', 0x07) on x86 (linux/random.h).
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    #[test]
    fn entropy_length_is_checked() {
        for len in [0, 1, 15, 513, 4096] {
            let e = validate_restored(1, &vec![7u8; len]).unwrap_err();
            assert!(
                matches!(e, TemplateError::EntropyLength(n) if n == len),
                "{len}: {e}"
            );
            assert!(e.to_string().contains("16..=512"), "{e}");
        }
        for len in [16, 17, 256, 512] {
            let v = validate_restored(1, &vec![7u8; len]).unwrap();
            assert_eq!(v.entropy.len(), len);
        }
    }

    #[test]
    fn realtime_is_checked_and_converted() {
        let e = validate_restored(-1, &[0u8; 16]).unwrap_err();
        assert!(matches!(e, TemplateError::NegativeRealtime(-1)), "{e}");
        let e = validate_restored(i64::MIN, &[0u8; 16]).unwrap_err();
        assert!(matches!(e, TemplateError::NegativeRealtime(i64::MIN)));
        // Both wrong: the entropy is reported.
        assert!(matches!(
            validate_restored(-5, &[]),
            Err(TemplateError::EntropyLength(0))
        ));
        let v = validate_restored(1_700_000_000_123_456_789, &[1u8; 32]).unwrap();
        assert_eq!(v.realtime.as_secs(), 1_700_000_000);
        assert_eq!(v.realtime.subsec_nanos(), 123_456_789);
        assert_eq!(v.entropy, vec![1u8; 32]);
        assert_eq!(
            validate_restored(0, &[0u8; 16]).unwrap().realtime,
            Duration::ZERO
        );
        assert_eq!(
            validate_restored(i64::MAX, &[0u8; 16]).unwrap().realtime,
            Duration::from_nanos(i64::MAX as u64)
        );
    }

    #[test]
    fn rand_pool_info_layout() {
        let bytes: Vec<u8> = (1..=18).collect();
        let info = rand_pool_info(&bytes);
        assert_eq!(info.len(), 2 + 5);
        assert_eq!(info[0], 18 * 8);
        assert_eq!(info[1], 18);
        let buf: Vec<u8> = info[2..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(&buf[..18], &bytes[..]);
        assert_eq!(&buf[18..], &[0, 0]);
    }

    #[test]
    fn host_mode_restore_skips_the_guest_steps_and_connects_the_log_once() {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        let share = Share {
            tag: "t".into(),
            mount_point: "/nonexistent/vmrt-test-share".into(),
        };
        let mut r = Restorer::new(
            false,
            vec![share],
            Some(Box::new(move || {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })),
        );
        let input = validate_restored(1, &[0u8; 16]).unwrap();
        assert_eq!(
            r.restore(&input).unwrap(),
            Restored {
                guest: false,
                shares: 0
            }
        );
        r.restore(&input).unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(!std::path::Path::new("/nonexistent/vmrt-test-share").exists());
    }
}
