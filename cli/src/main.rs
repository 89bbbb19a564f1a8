//! `vmrt` command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmrt_cli::{agent, check};

#[derive(Parser)]
#[command(name = "vmrt", version, about = "vmrt: virtualized container runtime tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tell whether this host can run vmrt sandboxes; exit 0 only when it can.
    Check {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// vmrt runtime configuration [default: $VMRT_CONFIG, else
        /// /etc/vmrt/config.toml, as the shim reads it].
        #[arg(long)]
        config: Option<PathBuf>,
        /// containerd configuration.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        containerd_config: PathBuf,
        /// KVM device node.
        #[arg(long, default_value = "/dev/kvm")]
        kvm_device: PathBuf,
        /// procfs, where a running containerd's PATH is read (for tests).
        #[arg(long, default_value = "/proc", hide = true)]
        proc_dir: PathBuf,
    },
    /// Talk to a sandbox's guest agent through the VMM's hybrid vsock socket.
    Agent {
        /// The VMM's hybrid vsock Unix socket (`<sandbox dir>/vsock.sock`).
        #[arg(long)]
        uds: PathBuf,
        /// How long to keep dialing until the agent answers, milliseconds.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
        #[command(subcommand)]
        op: AgentOp,
    },
}

#[derive(Subcommand)]
enum AgentOp {
    /// Wait until the agent answers Health; exit 0 then.
    Health,
    /// Print the agent's version and how long the first RPC took (JSON).
    Version,
    /// Sequential requests on one connection, then concurrent connections (JSON).
    Stress {
        /// Sequential Version requests on one connection.
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        /// Concurrent connections, each answering Health.
        #[arg(long, default_value_t = 50)]
        connections: usize,
    },
}

fn agent_main(uds: PathBuf, timeout_ms: u64, op: AgentOp) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let timeout = std::time::Duration::from_millis(timeout_ms);
    rt.block_on(async {
        match op {
            AgentOp::Health => {
                let r = agent::version(&uds, timeout).await?;
                println!("agent serving (first RPC after {} ms)", r.first_rpc_ms);
            }
            AgentOp::Version => println!("{}", serde_json::to_string_pretty(&agent::version(&uds, timeout).await?)?),
            AgentOp::Stress { requests, connections } => {
                let r = agent::stress(&uds, timeout, requests, connections).await?;
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
        }
        Ok(())
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { json, config, containerd_config, kvm_device, proc_dir } => {
            let paths = check::HostPaths {
                kvm: kvm_device,
                vmrt_config: config,
                containerd_config,
                proc: proc_dir,
                ..Default::default()
            };
            let report = check::run(&paths);
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
            } else {
                print!("{}", check::render(&report));
            }
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Agent { uds, timeout_ms, op } => match agent_main(uds, timeout_ms, op) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmrt agent: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
