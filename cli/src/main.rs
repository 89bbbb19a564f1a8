//! `vmrt` command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmrt_cli::check;

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
        /// vmrt runtime configuration.
        #[arg(long, default_value = "/etc/vmrt/config.toml")]
        config: PathBuf,
        /// containerd configuration.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        containerd_config: PathBuf,
        /// KVM device node.
        #[arg(long, default_value = "/dev/kvm")]
        kvm_device: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { json, config, containerd_config, kvm_device } => {
            let paths = check::HostPaths {
                kvm: kvm_device,
                vmrt_config: config,
                containerd_config,
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
    }
}
