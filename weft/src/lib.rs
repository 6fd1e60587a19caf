//! Weft's command line. It starts Weft's binaries as processes and talks to them over their
//! APIs; it links no binary's library. It has the local mesh ([`up`]: `weft up`, `weft down`),
//! its demo (`weft demo`), `analyze`, the local cluster's namespaces ([`cluster`]) and the pods'
//! sample workload ([`app`]); and, against a Kubernetes cluster ([`k8s`]), `waypoint apply` and
//! the pre-flight `check`.

mod analyze;
pub mod app;
pub mod cluster;
pub mod demo;
pub mod k8s;
pub mod up;

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
    /// Brings up the shipped example (examples/demo) as a local two-node mesh, sends traffic
    /// between its pods with curl (allowed, denied, through a service), prints the identities,
    /// replies and metrics it saw, and tears the mesh down. Exits 1 when something is not as
    /// expected.
    Demo {
        /// Directory holding controller, ztunnel and weft-app (default: next to this one).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// The example's YAML directory (default: examples/demo of the repository).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the mesh running at the end instead of removing it (`weft down` removes it).
        #[arg(long)]
        keep: bool,
        /// The cluster's name (a-z, 0-9).
        #[arg(long, default_value = demo::DEMO_CLUSTER)]
        name: String,
    },
    /// Brings up a local mesh as root: network namespaces for nodes and pods (as the Pods'
    /// spec.nodeName place them), the controller watching a copy of DIR (with pod IPs filled in)
    /// under /run/weft/NAME/config, a ztunnel per node, and each Pod's command. The processes
    /// keep running after this returns; `weft down` removes everything.
    Up {
        /// Directory of Kubernetes and Istio YAML (Namespaces, Pods, Services, policies).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// The cluster's name (a-z, 0-9).
        #[arg(long, default_value = "weft")]
        name: String,
        /// Number of nodes (node-a, node-b, ...).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Directory holding controller, ztunnel and weft-app (default: next to this binary).
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
    /// Waypoints on a Kubernetes cluster.
    Waypoint {
        #[command(subcommand)]
        command: WaypointCommand,
    },
    /// Pre-flight checks before installing Weft: this node's kernel (5.10+; which capture attach mode it gets), bpffs at
    /// /sys/fs/bpf, the capabilities ztunnel needs, BPF tc support; the API server and the CRDs
    /// Weft reads. Each failure says how to fix it; exits 1 when any check fails.
    Check {
        /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Only the cluster checks (run the node checks on a node).
        #[arg(long)]
        cluster_only: bool,
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

#[derive(Debug, clap::Subcommand)]
pub enum WaypointCommand {
    /// Writes a waypoint Gateway (class istio-waypoint, HBONE on 15008) in a namespace and labels
    /// the namespace `istio.io/use-waypoint=NAME`, like `istioctl waypoint apply
    /// --enroll-namespace`. The controller then runs the waypoint's Deployment and Service.
    Apply {
        /// The namespace.
        #[arg(long, short = 'n')]
        namespace: String,
        /// The waypoint's (Gateway's) name.
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster).
        #[arg(long, conflicts_with = "local")]
        kubeconfig: Option<PathBuf>,
        /// Apply it to the running local mesh of this name (`weft up --name`) instead: `weft`
        /// runs the waypoint pod, as the controller's Deployment does on Kubernetes.
        #[arg(long)]
        local: Option<String>,
        /// Where the workspace's binaries are (with --local; default: beside `weft`).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Unbinds a namespace of the running local mesh from its waypoint and removes the waypoint
    /// (its Gateway, pod and Service).
    Delete {
        #[arg(long, short = 'n')]
        namespace: String,
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// The local mesh's name (`weft up --name`).
        #[arg(long, default_value = "weft")]
        local: String,
    },
}

/// Runs `future` on a runtime of its own (the commands that talk to Kubernetes).
fn block_on<T>(future: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(future))
}

/// Runs the command; the exit code says whether it found problems.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    weft_core::telemetry::init_tracing(weft_core::telemetry::LogFormat::Plain, "warn");
    match cli.command {
        Command::Demo { bin_dir, dir, keep, name } => {
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => up::default_bin_dir()?,
            };
            demo::run(&bin_dir, dir, keep, &name)
        }
        Command::Up { dir, name, nodes, bin_dir } => {
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => up::default_bin_dir()?,
            };
            let mut options = up::UpOptions::new(dir, name, bin_dir);
            options.nodes = nodes;
            let mesh = up::up(&options)?;
            print!("{}", mesh.summary());
            Ok(ExitCode::SUCCESS)
        }
        Command::Analyze { paths, namespace } => {
            analyze::run(&paths, namespace, &mut std::io::stdout().lock())
        }
        Command::Waypoint {
            command: WaypointCommand::Apply { namespace, name, local: Some(local), bin_dir, .. },
        } => {
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => up::default_bin_dir()?,
            };
            up::Mesh::attach(&local, bin_dir)?.apply_waypoint(&namespace, &name)?;
            println!("waypoint {namespace}/{name} is running in {local}; namespace {namespace} uses it");
            Ok(ExitCode::SUCCESS)
        }
        Command::Waypoint { command: WaypointCommand::Delete { namespace, name, local } } => {
            up::Mesh::attach(&local, up::default_bin_dir()?)?.delete_waypoint(&namespace, &name)?;
            println!("waypoint {namespace}/{name} removed from {local}; namespace {namespace} goes direct");
            Ok(ExitCode::SUCCESS)
        }
        Command::Waypoint { command: WaypointCommand::Apply { namespace, name, kubeconfig, .. } } => {
            let message = block_on(async {
                let client = k8s::client(kubeconfig.as_deref()).await?;
                k8s::waypoint_apply(client, &namespace, &name).await
            })??;
            print!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { kubeconfig, cluster_only } => {
            let checks = block_on(k8s::run_checks(kubeconfig, cluster_only))?;
            print!("{}", k8s::report(&checks));
            Ok(if checks.iter().all(|c| c.ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Down { name } => {
            cluster::destroy(&name)?;
            println!("cluster {name} removed");
            Ok(ExitCode::SUCCESS)
        }
    }
}
