//! `vmrt-agent`: the guest agent of vmrt, PID 1 of the microVM.
//!
//! As PID 1 (the initramfs's `/init`) it mounts the early filesystems, takes
//! the serial console as stdio, reads its settings from the kernel command
//! line (see [`config`]), mounts the virtio-fs shares, then serves the agent
//! API (ttrpc, `protocol/protos/agent.proto`) on vsock port `vmrt.port` and
//! the stdio streams on vsock port `vmrt.io_port`. `Shutdown` syncs,
//! unmounts and reboots the VM.
//!
//! Not as PID 1 (tests on a normal host) it does none of the PID 1 duties
//! and listens where the flags say, e.g.
//! `vmrt-agent --listen unix:///tmp/a.sock --io-listen unix:///tmp/io.sock
//! --state-dir /tmp/state`; `Shutdown` then makes it exit 0.
//!
//! With `vmrt.template` (see [`template`]) it starts as a VM template: no
//! shares mounted and no log port connected at start-up; as PID 1, once both
//! listeners are up, it asks the VMM for a snapshot (if it cannot, it reboots
//! the VM at once); then it waits for the `Restored` RPC, which does what was
//! left out. Not as PID 1 (`--cmdline vmrt.template`) it asks for no snapshot
//! but still waits for `Restored`.

mod config;
mod init;
mod io;
mod server;
mod startup;
mod template;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use vmrt_agent::container::{start_reaper, ContainerManager};

use crate::io::{ListenAddr, StreamRegistry};

/// Default directory of container bundles and state.
const DEFAULT_STATE_DIR: &str = "/run/vmrt/containers";

/// Flags, used only when not running as PID 1 (as PID 1 argv comes from
/// the kernel and is ignored).
#[derive(Parser, Debug)]
#[command(name = "vmrt-agent", version, about = "vmrt guest agent")]
struct Args {
    /// Agent API address: unix://<path> or vsock://<cid>:<port>
    /// (default vsock://-1:<vmrt.port>).
    #[arg(long)]
    listen: Option<String>,
    /// Stdio stream address: unix://<path> or vsock://<cid>:<port>
    /// (default vsock://-1:<vmrt.io_port>).
    #[arg(long)]
    io_listen: Option<String>,
    /// Directory of container bundles and state.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Kernel-command-line style settings to use instead of /proc/cmdline.
    #[arg(long)]
    cmdline: Option<String>,
    /// Log level, overriding vmrt.log (error, warn, info, debug, trace).
    #[arg(long)]
    log: Option<log::LevelFilter>,
    /// How long CreateContainer/ExecProcess wait for stdio streams, in ms.
    #[arg(long, default_value_t = server::DEFAULT_STREAM_TIMEOUT.as_millis() as u64)]
    stream_timeout_ms: u64,
}

/// Logger writing one line per record, `[<uptime s>] vmrt-agent <LEVEL>
/// <target>: <message>`, to stderr (the serial console when PID 1) and, once
/// [`connect_log_port`] succeeded, to the host's log port; while that
/// connection takes the lines, stderr gets only warnings and errors.
struct ConsoleLogger;

fn uptime() -> f64 {
    server::boottime_us() as f64 / 1e6
}

impl log::Log for ConsoleLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format!(
            "[{:12.6}] vmrt-agent {:<5} {}: {}\n",
            uptime(),
            record.level(),
            record.target(),
            record.args()
        );
        // One write(2) per line so concurrent lines do not interleave, and no
        // lock: libcontainer logs from children it forks off this
        // multithreaded process, where a lock held by another thread at fork
        // time would never be released.
        // With the host's log connection taking the lines, the serial console
        // gets only warnings and errors: every console byte is a port I/O exit
        // to the VMM, and the host has the full log already.
        let vsock = LOG_VSOCK_FD.load(std::sync::atomic::Ordering::Relaxed);
        let mut to_console = vsock < 0 || record.level() <= log::Level::Warn;
        if vsock >= 0 {
            // SAFETY: writes from a live buffer to a file descriptor; a closed or
            // invalid fd only makes write fail. The fd is non-blocking: a host
            // that does not read gets EAGAIN, the agent never stalls.
            let n = unsafe { libc::write(vsock, line.as_ptr().cast(), line.len()) };
            if n != line.len() as isize {
                // Not (wholly) taken: the console gets the line. A connection
                // that failed for good (reset, closed) is not used again.
                to_console = true;
                let errno = std::io::Error::last_os_error().raw_os_error();
                if n < 0 && !matches!(errno, Some(libc::EAGAIN) | Some(libc::EINTR)) {
                    let _ = LOG_VSOCK_FD.compare_exchange(
                        vsock,
                        -1,
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
            }
        }
        let console = LOG_FD.load(std::sync::atomic::Ordering::Relaxed);
        if to_console && console >= 0 {
            // SAFETY: as above; the console fd blocks, so the line is kept.
            let _ = unsafe { libc::write(console, line.as_ptr().cast(), line.len()) };
        }
    }

    fn flush(&self) {}
}

/// Where log lines go: stderr until [`pin_log_fd`] moves them to a private
/// close-on-exec duplicate. Container processes get the agent's children's
/// fds 0-2 as their stdio, so a log line written to fd 2 by a forked child
/// would land in the container's stderr stream.
static LOG_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(2);

/// The guest-initiated vsock connection to the host's `vmrt.log_port`, or -1.
/// While it takes the lines, info and debug lines go there only, not to the
/// console. Set to -1 (the fd is left open) when a write fails for good and
/// by [`log_to_console_only`].
static LOG_VSOCK_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Logs to the console only from now on. Called before the PID 1 shutdown:
/// the VM resets right after, before the VMM would forward what is still
/// queued on the vsock connection.
fn log_to_console_only() {
    LOG_VSOCK_FD.store(-1, std::sync::atomic::Ordering::Relaxed);
}

/// Connects to host (CID 2) vsock port `port` and logs there from now on (see
/// [`ConsoleLogger`]). The VMM's hybrid vsock forwards the connection to
/// `<uds>_<port>` on the host; when nobody listens there the connection is
/// reset and the console keeps getting the whole log.
fn connect_log_port(port: u32) -> Result<(), nix::Error> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(sock.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_HOST, port))?;
    nix::fcntl::fcntl(
        sock.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    // Out of the low descriptors, like the console's log fd (see pin_log_fd).
    let high = nix::fcntl::fcntl(sock.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(LOG_FD_MIN))?;
    drop(sock);
    vmrt_agent::container::keep_log_fd_in_helpers(high);
    LOG_VSOCK_FD.store(high, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Start-up's handling of `vmrt.log_port`: [`connect_log_port`], and when
/// that fails a warning, the console keeps the whole log.
fn connect_log_port_or_warn(port: u32) {
    if let Err(e) = connect_log_port(port) {
        log::warn!("vmrt.log_port={port}: no host listener ({e}); logging to the console only");
    }
}

/// Lowest descriptor number [`pin_log_fd`] uses.
const LOG_FD_MIN: libc::c_int = 900;

/// Duplicates the current stderr (the console) to a close-on-exec fd numbered
/// [`LOG_FD_MIN`] or above and logs there from now on. The high number keeps
/// it clear of the low descriptors a forked child opens after libcontainer's
/// close_range, so a late log line cannot land in one of them.
fn pin_log_fd() {
    // SAFETY: F_DUPFD_CLOEXEC duplicates fd 2 into a new descriptor we own.
    let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, LOG_FD_MIN) };
    if fd >= 0 {
        vmrt_agent::container::keep_log_fd_in_helpers(fd);
        LOG_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
    }
}

static LOGGER: ConsoleLogger = ConsoleLogger;

fn main() {
    server::STARTED_AT_US.store(server::boottime_us(), std::sync::atomic::Ordering::Relaxed);
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    let pid1 = init::is_pid1();
    if pid1 {
        std::panic::set_hook(Box::new(|info| {
            log::error!("panic: {info}");
        }));
        let cgroups = init::pid1_setup();
        pin_log_fd();
        startup::mark("log fd");
        let result = run(None, Some(cgroups));
        // PID 1 must not exit (the kernel would panic): reboot instead, the
        // VMM then exits.
        if let Err(e) = result {
            log::error!("fatal: {e:#}");
        }
        log_to_console_only();
        init::shutdown_and_reboot(&[]);
    } else {
        let args = Args::parse();
        pin_log_fd();
        if let Err(e) = run(Some(args), None) {
            log::error!("fatal: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The agent proper. `pid1_cgroups` is `Some` (the cgroup v2 controllers
/// [`init::pid1_setup`] enabled) when running as PID 1.
fn run(args: Option<Args>, pid1_cgroups: Option<Vec<String>>) -> anyhow::Result<()> {
    let pid1 = pid1_cgroups.is_some();
    let parsed = match args.as_ref().and_then(|a| a.cmdline.as_deref()) {
        Some(s) => config::parse_cmdline(s),
        None => {
            let (parsed, err) = config::from_proc_cmdline();
            if let Some(e) = err {
                log::error!("reading /proc/cmdline: {e}; using defaults");
            }
            parsed
        }
    };
    let mut settings = parsed.settings;
    if let Some(level) = args.as_ref().and_then(|a| a.log) {
        settings.log_level = level;
    }
    log::set_max_level(settings.log_level);
    startup::mark("cmdline");
    // A template's log port and shares belong to its clones: Restored.
    let template = settings.template;
    if let (Some(port), false) = (settings.log_port, template) {
        connect_log_port_or_warn(port);
        startup::mark("log port");
    }
    for p in &parsed.problems {
        if p.is_warning() {
            log::warn!("{p}");
        } else {
            log::error!("{p}");
        }
    }
    log::info!(
        "vmrt-agent {} starting (pid {}, api port {}, io port {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        settings.api_port,
        settings.io_port
    );
    if let Some(enabled) = &pid1_cgroups {
        log::info!("cgroup v2 controllers enabled: {}", enabled.join(" "));
    }
    if template {
        let log_port = match settings.log_port {
            Some(_) => " and vmrt.log_port",
            None => "",
        };
        log::info!(
            "template: {} vmrt.share(s){log_port} wait for Restored",
            settings.shares.len()
        );
    }
    startup::mark("start-up log lines");
    if template {
        // Deferred to Restored (logged above).
    } else if pid1 {
        init::mount_shares(&settings.shares);
        startup::mark("virtio-fs shares");
    } else if !settings.shares.is_empty() {
        log::info!("not PID 1: vmrt.share entries are not mounted");
    }

    // Before any child is forked: the reaper collects every exit.
    start_reaper();
    startup::mark("reaper");
    if pid1 && settings.debug_console {
        match init::spawn_debug_console() {
            Ok(pid) => log::warn!("debug console: /bin/sh (pid {pid}) on /dev/console"),
            Err(e) => log::error!("{e}"),
        }
        startup::mark("debug console");
    }

    let api_addr = args
        .as_ref()
        .and_then(|a| a.listen.clone())
        .unwrap_or_else(|| format!("vsock://-1:{}", settings.api_port));
    let io_addr = args
        .as_ref()
        .and_then(|a| a.io_listen.clone())
        .unwrap_or_else(|| format!("vsock://-1:{}", settings.io_port));
    let api_addr = ListenAddr::parse(&api_addr)?;
    let io_addr = ListenAddr::parse(&io_addr)?;
    let state_dir = args
        .as_ref()
        .map(|a| a.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let stream_timeout = args
        .as_ref()
        .map(|a| Duration::from_millis(a.stream_timeout_ms))
        .unwrap_or(server::DEFAULT_STREAM_TIMEOUT);

    // One thread serves every connection: the agent's async work is I/O
    // (ttrpc, stdio relays) and everything that blocks (libcontainer, waits)
    // goes to the blocking pool. A multi-thread runtime added a worker thread
    // per vCPU at start-up (its "tokio runtime" step took 27-61 ms vs 11-15 ms
    // under the runner's nested TCG) and gives a 1-vCPU guest nothing back.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("vmrt-agent")
        .build()
        .context("building tokio runtime")?;
    startup::mark("tokio runtime");
    // The shares Shutdown quiesces and the reboot unmounts.
    let shares: Arc<[config::Share]> = settings.shares.clone().into();
    let restorer = template.then(|| {
        let connect_log = settings
            .log_port
            .map(|port| Box::new(move || connect_log_port_or_warn(port)) as template::ConnectLog);
        template::Restorer::new(pid1, settings.shares.clone(), connect_log)
    });
    runtime.block_on(async move {
        startup::mark("runtime entered");
        let registry = Arc::new(StreamRegistry::new());
        io::spawn_listener(&io_addr, registry.clone()).context("stdio stream listener")?;
        startup::mark("stdio listener");

        let manager = Arc::new(ContainerManager::new(state_dir));
        let (shutdown_tx, mut shutdown_rx) = tokio::sync::mpsc::channel(1);
        let mut service = server::AgentService::new(manager, registry, stream_timeout, shutdown_tx);
        if pid1 {
            let shares = shares.clone();
            service = service.with_quiesce(Arc::new(move || {
                let q = init::quiesce(&shares);
                if q.is_clean() {
                    Ok(())
                } else {
                    Err(q.to_string())
                }
            }));
        }
        if let Some(restorer) = restorer {
            service = service.with_template(restorer);
        }
        if let ListenAddr::Unix(path) = &api_addr {
            io::remove_stale_socket(path);
        }
        let mut ttrpc_server = server::start(&api_addr.to_ttrpc(), service)
            .await
            .with_context(|| format!("agent API server on {}", api_addr.to_ttrpc()))?;
        server::READY_AT_US.store(server::boottime_us(), std::sync::atomic::Ordering::Relaxed);
        startup::mark("API listening");
        log::debug!(
            "start-up steps on the guest clock (ms): {}",
            startup::summary()
        );
        if template {
            if pid1 {
                // Both listeners are bound and listening, and this is the
                // runtime's only thread: while it sits in the request no
                // task of the agent's runs, so none is in the middle of
                // vsock I/O when the template's VMM freezes the VM. In a
                // clone the request returns at once and the runtime goes on
                // serving (connections queued meanwhile are accepted now).
                if template::snapshot_point().is_err() {
                    // No snapshot, so no Restored will come: reboot now (as
                    // after Shutdown), so that the template's VMM exits 0
                    // without a snapshot and the shim gives up on this build
                    // at once instead of at its timeout. Nothing is mounted
                    // to unmount: a template mounts no shares before Restored.
                    log_to_console_only();
                    let _ = tokio::task::spawn_blocking(|| init::shutdown_and_reboot(&[])).await;
                }
            } else {
                log::info!("template: not PID 1, no snapshot requested; waiting for Restored");
            }
        }

        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        tokio::select! {
            _ = shutdown_rx.recv() => {
                // Let the Shutdown reply be written before going away: the
                // shim stops the VM once it has a successful reply, else it
                // waits for the reboot.
                tokio::time::sleep(Duration::from_millis(20)).await;
                if pid1 {
                    // Reboot from the blocking pool, so that this thread
                    // keeps driving the connections (a reply still being
                    // written) until the VM goes away.
                    log_to_console_only();
                    let _ = tokio::task::spawn_blocking(move || {
                        init::shutdown_and_reboot(&shares);
                    })
                    .await;
                }
            }
            _ = sigterm.recv(), if !pid1 => log::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c(), if !pid1 => log::info!("SIGINT"),
        }
        // As PID 1 the VM has rebooted above (this point is reached only if
        // the reboot did not happen): no graceful server shutdown, which
        // would wait (up to its timeout) for the shim to close its connection.
        if !pid1 {
            let _ = tokio::time::timeout(Duration::from_secs(1), ttrpc_server.shutdown()).await;
        }
        for addr in [&api_addr, &io_addr] {
            if let ListenAddr::Unix(path) = addr {
                io::remove_stale_socket(path);
            }
        }
        anyhow::Ok(())
    })?;
    if pid1 {
        // PID 1 must not return (the kernel would panic).
        log_to_console_only();
        init::shutdown_and_reboot(&settings.shares);
    }
    log::info!("exiting");
    Ok(())
}
