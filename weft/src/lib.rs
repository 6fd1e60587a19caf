//! Weft's command line. It starts Weft's binaries as processes and talks to them over their
//! APIs; it links no binary's library. Today it has the foundation demo, `analyze`, the local
//! cluster's namespaces ([`cluster`], `weft down`) and the pods' sample workload ([`app`]);
//! `up` and the `waypoint` commands come with their issues.

mod analyze;
pub mod app;
pub mod cluster;
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

/// The `weft` command.
#[derive(Debug, clap::Parser)]
#[command(name = "weft", version, about = "Weft: a sidecarless service mesh that speaks Istio's APIs.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Starts the CA, gets certificates for two workloads from it, and sends a TCP echo through
    /// an HBONE tunnel between them on loopback, printing both peers' identities.
    Demo {
        /// Directory holding the controller binary (default: next to this one).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Checks Istio and Kubernetes manifests offline: invalid YAML, unknown kinds and fields,
    /// subsets no DestinationRule defines, weights not adding up to 100, hosts without a
    /// Service, conflicting PeerAuthentications, policies that select nothing, undeclared
    /// waypoints. Prints `file:line: error|warning: ...`; exits 1 when there is an error.
    Analyze {
        /// Files or directories (read recursively for *.yaml and *.yml); `-` reads standard
        /// input. Default: the current directory.
        paths: Vec<PathBuf>,
        /// Namespace of the objects that name none (default: `default`).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Removes a local cluster: stops the processes in its network namespaces, deletes every
    /// namespace named `weft-<NAME>-*`, its state (/run/weft/NAME) and its eBPF pins
    /// (/sys/fs/bpf/weft/NAME). Succeeds when there is nothing to remove.
    Down {
        /// The cluster's name.
        #[arg(long, default_value = "weft")]
        name: String,
    },
}

/// Runs the command; the exit code says whether it found problems.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Demo { bin_dir } => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(demo::run(bin_dir))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Analyze { paths, namespace } => {
            analyze::run(&paths, namespace, &mut std::io::stdout().lock())
        }
        Command::Down { name } => {
            cluster::destroy(&name)?;
            println!("cluster {name} removed");
            Ok(ExitCode::SUCCESS)
        }
    }
}
