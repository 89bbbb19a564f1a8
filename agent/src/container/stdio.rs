//! Process stdio plumbing: fd hygiene for the streams handed to libcontainer,
//! the console socket that receives a container's pty master, and the copy
//! threads between the pty master and the stdio streams.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

use super::Error;

/// Re-numbers `fd` to a descriptor >= 3 with close-on-exec set. libcontainer
/// `dup2`s the stdio fds onto 0..2 in the container process and then closes
/// the originals; an original that already is 0..2 would be clobbered or
/// closed there (the agent, PID 1, may run without fds 0..2).
pub fn dup_high(fd: OwnedFd) -> Result<OwnedFd, Error> {
    let new = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
        .map_err(|e| Error::Internal(format!("dup stdio fd: {e}")))?;
    // SAFETY: fcntl returned a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

static SOCKET_SEQ: AtomicU64 = AtomicU64::new(0);

/// A listening Unix socket that libcontainer connects to (`--console-socket`)
/// to hand over the pty master of a terminal process. Removed on drop.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Binds a fresh socket in `dir` (short name: sun_path holds 108 bytes).
    pub fn bind(dir: &Path) -> Result<Self, Error> {
        let n = SOCKET_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("tty{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::Internal(format!("bind console socket {}: {e}", path.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Internal(format!("console socket: {e}")))?;
        Ok(Self { listener, path })
    }

    /// Path to give libcontainer.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts libcontainer's connection and receives the pty master
    /// (SCM_RIGHTS). libcontainer sent it before the process reported ready,
    /// so this normally returns at once; gives up after `timeout`.
    pub fn receive_master(&self, timeout: Duration) -> Result<OwnedFd, Error> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(Error::Internal(format!("console socket accept: {e}"))),
            }
        };
        stream
            .set_nonblocking(false)
            .and_then(|_| stream.set_read_timeout(Some(timeout)))
            .map_err(|e| Error::Internal(format!("console socket: {e}")))?;
        let mut buf = [0u8; 256];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| Error::Internal(format!("console socket recvmsg: {e}")))?;
        let mut fds = Vec::new();
        for c in msg
            .cmsgs()
            .map_err(|e| Error::Internal(format!("console socket cmsg: {e}")))?
        {
            if let ControlMessageOwned::ScmRights(r) = c {
                fds.extend(r);
            }
        }
        let mut owned: Vec<OwnedFd> = fds
            .into_iter()
            // SAFETY: descriptors just received via SCM_RIGHTS are ours.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if owned.is_empty() {
            return Err(Error::Internal(
                "console socket: no pty master received".into(),
            ));
        }
        Ok(owned.swap_remove(0))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A process's pseudo-terminal as seen by the agent: the pty master plus two
/// copy threads (stdin stream → master, master → stdout stream). The stdout
/// stream is closed once the master reports EIO, i.e. every process holding
/// the terminal exited and the output was drained.
pub struct Terminal {
    master: Arc<OwnedFd>,
    /// Write end of a pipe polled by the input thread; dropping it stops input.
    stop_input: Mutex<Option<OwnedFd>>,
}

fn write_all(fd: &impl AsFd, mut buf: &[u8]) -> nix::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(0) => return Err(nix::errno::Errno::EPIPE),
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Terminal {
    /// Starts copying between `master` and the streams.
    pub fn start(
        master: OwnedFd,
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
    ) -> Result<Self, Error> {
        let master = Arc::new(master);
        let (stop_r, stop_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::Internal(format!("pipe: {e}")))?;

        let m = master.clone();
        std::thread::Builder::new()
            .name("vmrt-pty-out".into())
            .spawn(move || {
                let mut buf = [0u8; 16384];
                let mut out = stdout;
                loop {
                    match nix::unistd::read(m.as_raw_fd(), &mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if let Some(o) = &out {
                                if write_all(o, &buf[..n]).is_err() {
                                    // Peer gone: keep draining so the process does not block.
                                    out = None;
                                }
                            }
                        }
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(_) => break, // EIO: all slave ends closed
                    }
                }
                drop(out);
            })
            .map_err(|e| Error::Internal(format!("spawn pty thread: {e}")))?;

        if let Some(input) = stdin {
            let m = master.clone();
            std::thread::Builder::new()
                .name("vmrt-pty-in".into())
                .spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        let mut fds = [
                            libc::pollfd {
                                fd: input.as_raw_fd(),
                                events: libc::POLLIN,
                                revents: 0,
                            },
                            libc::pollfd {
                                fd: stop_r.as_raw_fd(),
                                events: libc::POLLIN,
                                revents: 0,
                            },
                        ];
                        // SAFETY: fds is a valid array of 2 pollfd structs.
                        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                        if r < 0 {
                            if nix::errno::Errno::last() == nix::errno::Errno::EINTR {
                                continue;
                            }
                            break;
                        }
                        if fds[1].revents != 0 {
                            // close_stdin: end-of-file for the line discipline.
                            let _ = write_all(&*m, &[4u8]);
                            break;
                        }
                        if fds[0].revents != 0 {
                            match nix::unistd::read(input.as_raw_fd(), &mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if write_all(&*m, &buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => {}
                                Err(_) => break,
                            }
                        }
                    }
                })
                .map_err(|e| Error::Internal(format!("spawn pty thread: {e}")))?;
        }
        Ok(Self {
            master,
            stop_input: Mutex::new(Some(stop_w)),
        })
    }

    /// Sets the terminal window size (TIOCSWINSZ on the master; the kernel
    /// sends SIGWINCH to the foreground process group).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), Error> {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct from a valid pointer.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r < 0 {
            return Err(Error::Internal(format!(
                "TIOCSWINSZ: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Stops forwarding input and sends end-of-file (VEOF, ^D) to the terminal.
    pub fn close_stdin(&self) {
        self.stop_input
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.close_stdin();
    }
}
