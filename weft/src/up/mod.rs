//! `weft up`: the local mesh from a directory of Kubernetes and Istio YAML. It reads the Pods'
//! `spec.nodeName`, builds the cluster's namespaces ([`crate::cluster`]), writes the
//! controller's watched directory (the same documents with each Pod's `status.podIP` and phase
//! filled in), and starts the controller (in node-a's namespace, like a controller pod there),
//! one ztunnel per node namespace and each Pod's command in its pod namespace, as detached
//! processes that outlive `weft up`; `weft down` stops them. It owns the state directory's
//! `config/`, `ca/`, `tokens/` and `logs/`; it holds no mesh logic and links no binary's library:
//! the mesh is what the controller and the ztunnels make of the directory.
//!
//! Its parts: `manifests` (the user's YAML, its Pods and their filled-in status), `processes`
//! (starting, watching and stopping the controller, the ztunnels and the pods' commands, and their
//! logs) and `http` (the GET of the ztunnel's endpoints); this file has the API and the state
//! directory.

mod http;
mod manifests;
mod processes;
mod waypoints;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use crate::cluster::{self, plan::DEFAULT_NODES, Cluster, ClusterError, ClusterSpec};

pub use self::http::{http_get, HttpError};
pub use self::manifests::{Manifests, PodDef};
pub use self::processes::{log_tail, ztunnel_process};

/// The trust domain of the local mesh.
pub const TRUST_DOMAIN: &str = weft_core::names::DEFAULT_TRUST_DOMAIN;
/// The controller's gRPC port (CA + xDS), as Istio's istiod.
pub const CONTROLLER_PORT: u16 = weft_core::names::XDS_TLS_PORT;
/// The node the controller runs on (the first node).
const CONTROLLER_NODE_INDEX: usize = 0;
/// ztunnel's readiness port and path.
pub const READY_PORT: u16 = weft_core::names::READINESS_PORT;
pub const METRICS_PORT: u16 = weft_core::names::METRICS_PORT;
pub const ADMIN_PORT: u16 = weft_core::names::ADMIN_PORT;
/// How long each component gets to come up.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the mesh could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: HttpError,
    },
    #[error("{0}")]
    Config(String),
    #[error("{binary} not found; build it with `cargo build --workspace` (or pass --bin-dir)")]
    MissingBinary { binary: String },
    #[error("{process} did not become ready within {timeout:?}: {reason}\nlast lines of {log}:\n{tail}")]
    NotReady { process: String, timeout: Duration, reason: String, log: String, tail: String },
    #[error("{process} exited ({status}) while starting\nlast lines of {log}:\n{tail}")]
    Exited { process: String, status: String, log: String, tail: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpError {
    let what = what.into();
    move |source| UpError::Io { what, source }
}

/// What `weft up` is asked for.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The directory of YAML (`*.yaml`, `*.yml`, read recursively).
    pub dir: PathBuf,
    pub name: String,
    /// Number of nodes: `node-a`, `node-b`, ... (at least the nodes the Pods name).
    pub nodes: usize,
    /// Where `controller`, `ztunnel` and `weft-app` are.
    pub bin_dir: PathBuf,
    pub ready_timeout: Duration,
}

impl UpOptions {
    pub fn new(dir: impl Into<PathBuf>, name: impl Into<String>, bin_dir: impl Into<PathBuf>) -> Self {
        UpOptions {
            dir: dir.into(),
            name: name.into(),
            nodes: DEFAULT_NODES.len(),
            bin_dir: bin_dir.into(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

/// The directory of the running executable (where cargo puts every binary of the workspace).
pub fn default_bin_dir() -> Result<PathBuf, UpError> {
    let exe = std::env::current_exe().map_err(io("finding the weft executable"))?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| UpError::Config(format!("{} has no parent directory", exe.display())))
}

/// The node names of a cluster of `n` nodes: `node-a`, `node-b`, ...
pub fn node_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let letter = char::from(b'a' + u8::try_from(i % 26).unwrap_or(0));
            if i < 26 {
                format!("node-{letter}")
            } else {
                format!("node-{letter}{}", i / 26)
            }
        })
        .collect()
}

/// A running local mesh: the cluster and the processes `weft up` started. Dropping it leaves
/// everything running (as `weft up` does); [`Mesh::down`] or `weft down` removes it.
#[derive(Debug)]
pub struct Mesh {
    cluster: Cluster,
    pub pods: Vec<PodDef>,
    bin_dir: PathBuf,
    ready_timeout: Duration,
    /// Process name → the `ip netns exec` child (which became the program).
    children: BTreeMap<String, Child>,
}

/// Brings the mesh up as described in the module documentation. On failure it removes what it
/// made.
pub fn up(options: &UpOptions) -> Result<Mesh, UpError> {
    let manifests = Manifests::read(&options.dir)?;
    let waypoints = manifests.pods.iter().any(|p| p.waypoint.is_some());
    for binary in ["controller", "ztunnel"].into_iter().chain(waypoints.then_some("waypoint")) {
        let path = options.bin_dir.join(binary);
        if !path.exists() {
            return Err(UpError::MissingBinary { binary: path.display().to_string() });
        }
    }
    cluster::check_environment()?;
    cluster::destroy(&options.name)?;
    let mut needed = options.nodes;
    let mut spec = ClusterSpec::new(&options.name);
    // Enough nodes for every node a Pod names, if they follow the node-<letter> pattern.
    for pod in &manifests.pods {
        if let Some(i) = node_names(26).iter().position(|n| *n == pod.node) {
            needed = needed.max(i + 1);
        }
    }
    spec.nodes = node_names(needed);
    for pod in &manifests.pods {
        spec = spec.pod(&pod.namespace, &pod.name, &pod.node);
    }
    let plan = spec.plan().map_err(ClusterError::from)?;
    let cluster = Cluster::create(plan)?;
    let mut mesh = Mesh {
        cluster,
        pods: manifests.pods.clone(),
        bin_dir: options.bin_dir.clone(),
        ready_timeout: options.ready_timeout,
        children: BTreeMap::new(),
    };
    match mesh.start(&manifests) {
        Ok(()) => Ok(mesh),
        Err(e) => {
            if let Err(cleanup) = cluster::destroy(&options.name) {
                tracing::warn!(error = %cleanup, "removing the cluster after a failed start");
            }
            Err(e)
        }
    }
}

impl Mesh {
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn name(&self) -> &str {
        self.cluster.name()
    }

    /// The directory the controller watches: edit files here to change the mesh.
    pub fn config_dir(&self) -> PathBuf {
        config_dir(self.name())
    }

    pub fn logs_dir(&self) -> PathBuf {
        cluster::state_dir(self.name()).join("logs")
    }

    pub fn log_path(&self, process: &str) -> PathBuf {
        self.logs_dir().join(format!("{process}.log"))
    }

    /// The node's address on the link between nodes.
    pub fn node_ip(&self, node: &str) -> Result<IpAddr, UpError> {
        let plan = self.cluster.node(node)?;
        plan.link_addrs
            .first()
            .map(|c| c.addr)
            .ok_or_else(|| UpError::Config(format!("node {node} has no address")))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodDef> {
        self.pods.iter().find(|p| p.namespace == namespace && p.name == name)
    }

    /// The mesh root the proxies verify the controller's certificate against (the controller
    /// writes it on its first start).
    pub fn root_cert_path(&self) -> PathBuf {
        cluster::state_dir(self.name()).join("ca").join("root-cert.pem")
    }

    /// The node hosting the controller and its address.
    pub fn controller_addr(&self) -> Result<SocketAddr, UpError> {
        let node = &self.cluster.plan().nodes[CONTROLLER_NODE_INDEX].name;
        Ok(SocketAddr::new(self.node_ip(node)?, CONTROLLER_PORT))
    }

    fn start(&mut self, manifests: &Manifests) -> Result<(), UpError> {
        let state = cluster::state_dir(self.name());
        for dir in [self.config_dir(), self.logs_dir(), state.join("ca"), state.join("tokens")] {
            std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let mut ips = BTreeMap::new();
        for pod in &self.cluster.plan().pods {
            ips.insert((pod.namespace.clone(), pod.name.clone()), pod.ips.clone());
        }
        for (path, text) in manifests.with_pod_ips(&ips) {
            let target = self.config_dir().join(path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
            }
            std::fs::write(&target, text).map_err(io(format!("writing {}", target.display())))?;
        }
        let nodes: Vec<String> = self.cluster.plan().nodes.iter().map(|n| n.name.clone()).collect();
        for node in &nodes {
            write_token(&self.token_path(node))?;
        }
        for pod in self.pods.iter().filter(|p| p.waypoint.is_some()) {
            let gateway = pod.waypoint.as_deref().unwrap_or_default();
            let path = self.waypoint_token_path(&pod.namespace, gateway);
            write_token(&path)?;
        }
        self.start_controller()?;
        for node in &nodes {
            self.start_ztunnel(node)?;
        }
        for node in &nodes {
            self.wait_ztunnel_ready(node)?;
        }
        for pod in self.pods.clone() {
            self.start_pod(&pod)?;
        }
        for pod in self.pods.clone() {
            self.wait_pod_ready(&pod)?;
        }
        Ok(())
    }

    fn token_path(&self, node: &str) -> PathBuf {
        cluster::state_dir(self.name()).join("tokens").join(node)
    }

    /// Where the controller finds waypoint tokens: `<dir>/<namespace>/<gateway>`.
    fn waypoint_tokens_dir(&self) -> PathBuf {
        cluster::state_dir(self.name()).join("tokens").join("waypoints")
    }

    pub(super) fn waypoint_token_path(&self, namespace: &str, gateway: &str) -> PathBuf {
        self.waypoint_tokens_dir().join(namespace).join(gateway)
    }

    fn read_token(&self, node: &str) -> Result<String, UpError> {
        let path = self.token_path(node);
        std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))
    }

    /// What `weft up` prints: nodes, pods, mesh membership, logs, how to change and stop it.
    pub fn summary(&self) -> String {
        let name = self.name();
        let plan = self.cluster.plan();
        let mut out = String::new();
        let _ = writeln!(out, "Local mesh {name:?} is up.");
        let _ = writeln!(out, "  nodes:");
        for (i, node) in plan.nodes.iter().enumerate() {
            let ip = node.link_addrs.first().map(|c| c.addr.to_string()).unwrap_or_default();
            let pods = node.pod_cidrs.first().map(|c| c.to_string()).unwrap_or_default();
            let controller = if i == CONTROLLER_NODE_INDEX {
                format!(", controller on {ip}:{CONTROLLER_PORT}")
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "    {:<8} {ip:<12} pods {pods:<14} netns {}  ztunnel{controller}",
                node.name, node.netns
            );
        }
        let _ = writeln!(out, "  pods:");
        for pod in &plan.pods {
            let def = self.pod(&pod.namespace, &pod.name);
            let ips: Vec<String> = pod.ips.iter().map(IpAddr::to_string).collect();
            let mesh = match def {
                Some(d) if d.ambient => format!("ambient, {}", d.identity()),
                _ => "not in the mesh".into(),
            };
            let _ = writeln!(
                out,
                "    {:<24} {:<8} {:<12} {mesh}",
                format!("{}/{}", pod.namespace, pod.name),
                pod.node,
                ips.join(",")
            );
        }
        let _ = writeln!(out, "  logs:    {}/<process>.log", self.logs_dir().display());
        let _ = writeln!(
            out,
            "  config:  {} (the controller applies edits within a second)",
            self.config_dir().display()
        );
        let _ = writeln!(
            out,
            "  try:     ip netns exec {} curl http://<pod ip>:8080/",
            plan.pods.first().map(|p| p.netns.as_str()).unwrap_or("<pod netns>")
        );
        let down = if name == "weft" { "weft down".to_string() } else { format!("weft down --name {name}") };
        let _ = writeln!(out, "  stop:    {down}");
        out
    }

    /// Stops everything and removes the cluster (`weft down`).
    pub fn down(mut self) -> Result<(), UpError> {
        let result = cluster::destroy(self.name());
        for (_, mut child) in std::mem::take(&mut self.children) {
            let _ = child.kill();
            let _ = child.wait();
        }
        result.map_err(UpError::from)
    }
}

/// The controller's watched directory of cluster `name`.
pub fn config_dir(name: &str) -> PathBuf {
    cluster::state_dir(name).join("config")
}

/// Writes a new random token to `path` (readable by root only).
pub(super) fn write_token(path: &Path) -> Result<(), UpError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    let token = random_token()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("writing {}", path.display())))?;
    file.write_all(token.as_bytes()).map_err(io(format!("writing {}", path.display())))
}

/// 32 hex digits from the kernel's random source.
fn random_token() -> Result<String, UpError> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io("reading /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn node_names_follow_letters() {
        assert_eq!(node_names(3), ["node-a", "node-b", "node-c"]);
    }
}
