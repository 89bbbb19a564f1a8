//! `vmrt-vmm`: boots one microVM and exits with its fate
//! (docs/contracts.md, "vmrt-vmm"): 0 on guest reboot/shutdown or
//! SIGTERM/SIGINT, 1 on bad configuration or boot failure, 2 on triple fault
//! or KVM internal/emulation/entry failure.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use vmm::config::{SerialConfig, VmConfig, VmResources};

/// Command line. Either `--config FILE` or `--kernel` (with the other flags).
#[derive(Parser, Debug)]
#[command(name = "vmrt-vmm", version, about = "vmrt microVM monitor")]
struct Args {
    /// JSON configuration file (docs/contracts.md); excludes the other flags.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "memory_mib", "serial"])]
    config: Option<PathBuf>,
    /// Kernel image (ELF vmlinux or bzImage).
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Console output: stdout, none or file:PATH.
    #[arg(long, default_value = "stdout")]
    serial: String,
}

fn resources(args: Args) -> anyhow::Result<VmResources> {
    let config = match args.config {
        Some(path) => VmConfig::from_file(&path)?,
        None => VmConfig {
            vcpus: args.vcpus,
            memory_mib: args.memory_mib,
            kernel: args.kernel.context("--kernel is required without --config")?,
            initrd: args.initrd,
            cmdline: args.cmdline,
            serial: args.serial.parse::<SerialConfig>()?,
            vsock: None,
            shares: Vec::new(),
            snapshot: None,
        },
    };
    Ok(VmResources::from_config(config)?)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as virtiofsd does: the
/// virtio-fs passthrough holds one `O_PATH` descriptor per inode the guest keeps
/// cached (with `cache = auto`, every dentry looked up in the last second and
/// still in the guest's dcache), so the usual soft limit of 1024 is small.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            log::warn!(
                "raising RLIMIT_NOFILE from {} to {}: {}",
                lim.rlim_cur,
                lim.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
}

fn run() -> anyhow::Result<i32> {
    let resources = resources(Args::parse())?;
    raise_nofile_limit();
    vmm::builder::install_termination_handlers().context("installing signal handlers")?;
    let start = std::time::Instant::now();
    let reason = vmm::build_and_run(resources)?;
    let code = reason.exit_code();
    log::info!("VM exited after {:.3}s: {reason:?} (exit status {code})", start.elapsed().as_secs_f64());
    Ok(code)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run() {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}
