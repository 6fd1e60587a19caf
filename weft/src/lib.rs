//! Weft's command line. It starts Weft's binaries as processes and talks to them over their
//! APIs; it links no binary's library. Today it has the foundation demo; the local cluster
//! (`up`/`down`), `analyze` and `waypoint` commands come with their issues.

mod demo;

use std::path::PathBuf;

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
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Demo { bin_dir } => runtime.block_on(demo::run(bin_dir)),
    }
}
