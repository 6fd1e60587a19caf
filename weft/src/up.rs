//! `weft up`: the local mesh from a directory of Kubernetes and Istio YAML. It reads the Pods'
//! `spec.nodeName`, builds the cluster's namespaces ([`crate::cluster`]), writes the
//! controller's watched directory (the same documents with each Pod's `status.podIP` and phase
//! filled in), and starts the controller (in node-a's namespace, like a controller pod there),
//! one ztunnel per node namespace and each Pod's command in its pod namespace, as detached
//! processes that outlive `weft up`; `weft down` stops them. It owns the state directory's
//! `config/`, `ca/`, `tokens/` and `logs/`; it holds no mesh logic and links no binary's library:
//! the mesh is what the controller and the ztunnels make of the directory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use weft_core::config::{load_yaml, Object};

use crate::cluster::{self, plan::DEFAULT_NODES, Cluster, ClusterError, ClusterSpec};

/// The trust domain of the local mesh.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The controller's gRPC port (CA + xDS), as Istio's istiod.
pub const CONTROLLER_PORT: u16 = 15012;
/// The node the controller runs on (the first node).
const CONTROLLER_NODE_INDEX: usize = 0;
/// ztunnel's readiness port and path.
pub const READY_PORT: u16 = 15021;
pub const METRICS_PORT: u16 = 15020;
pub const ADMIN_PORT: u16 = 15000;
/// The label that enrolls a namespace (or pod) in the ambient mesh.
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// How long each component gets to come up.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of a log shown when a process fails to come up.
const LOG_TAIL_LINES: usize = 30;

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

/// A Pod of the manifests: where it runs and what it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDef {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    /// `containers[0].command` + `args`; empty when the pod runs nothing.
    pub command: Vec<String>,
    /// `containers[0].env` entries with a literal `value`.
    pub env: Vec<(String, String)>,
    /// Whether its namespace (or the pod) enrolls it in the ambient mesh as the manifests stand.
    pub ambient: bool,
}

impl PodDef {
    /// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
    pub fn identity(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}", self.namespace, self.service_account)
    }

    /// The log and process name of the pod's command.
    pub fn process_name(&self) -> String {
        format!("pod-{}-{}", self.namespace, self.name)
    }
}

/// The manifests of a directory: each file's documents (as JSON values) and the Pods.
#[derive(Debug, Clone)]
pub struct Manifests {
    /// Path relative to the directory → its documents (`kind: List` expanded).
    pub files: Vec<(PathBuf, Vec<Value>)>,
    pub pods: Vec<PodDef>,
}

impl Manifests {
    /// Reads every `*.yaml`/`*.yml` under `dir`; an invalid document, or a Pod without
    /// `spec.nodeName`, is an error naming it.
    pub fn read(dir: &Path) -> Result<Manifests, UpError> {
        let mut paths = Vec::new();
        collect_yaml(dir, &mut paths)?;
        if paths.is_empty() {
            return Err(UpError::Config(format!("{} holds no *.yaml or *.yml file", dir.display())));
        }
        paths.sort();
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for path in &paths {
            let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
            let shown = path.display().to_string();
            for doc in load_yaml(&text, &shown) {
                if let Err(e) = &doc.result {
                    errors.push(format!("{}:{}: {}: {e}", doc.file, doc.line, doc.name));
                }
            }
            let mut docs = Vec::new();
            for de in serde_yaml::Deserializer::from_str(&text) {
                match Value::deserialize(de) {
                    Ok(Value::Null) => {}
                    Ok(value) => expand_list(value, &mut docs),
                    Err(e) => errors.push(format!("{shown}: {e}")),
                }
            }
            let relative = path.strip_prefix(dir).unwrap_or(path).to_path_buf();
            files.push((relative, docs));
        }
        if !errors.is_empty() {
            return Err(UpError::Config(errors.join("\n")));
        }
        let pods = pods_of(&files)?;
        Ok(Manifests { files, pods })
    }

    /// The documents for the controller: every Pod gets `status.phase: Running`, `podIP` and
    /// `podIPs` from `ips` (keyed by (namespace, name)).
    pub fn with_pod_ips(&self, ips: &BTreeMap<(String, String), Vec<IpAddr>>) -> Vec<(PathBuf, String)> {
        self.files
            .iter()
            .map(|(path, docs)| {
                let mut text = String::new();
                for doc in docs {
                    let mut doc = doc.clone();
                    if let Ok(decoded) = weft_core::config::decode(doc.clone()) {
                        if let Object::Pod(pod) = decoded.object {
                            let key = (pod.metadata.namespace.clone(), pod.metadata.name.clone());
                            if let Some(ips) = ips.get(&key) {
                                set_status(&mut doc, &pod.metadata.namespace, ips);
                            }
                        }
                    }
                    text.push_str("---\n");
                    text.push_str(&serde_yaml::to_string(&doc).unwrap_or_default());
                }
                (path.clone(), text)
            })
            .collect()
    }
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), UpError> {
    let entries = std::fs::read_dir(dir).map_err(io(format!("reading directory {}", dir.display())))?;
    for entry in entries {
        let path = entry.map_err(io(format!("reading directory {}", dir.display())))?.path();
        if path.is_dir() {
            collect_yaml(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

fn expand_list(value: Value, docs: &mut Vec<Value>) {
    if value.get("kind").and_then(Value::as_str) == Some("List") {
        if let Some(Value::Array(items)) = value.get("items") {
            docs.extend(items.iter().cloned());
            return;
        }
    }
    docs.push(value);
}

fn set_status(doc: &mut Value, namespace: &str, ips: &[IpAddr]) {
    let Value::Object(map) = doc else { return };
    if let Some(Value::Object(meta)) = map.get_mut("metadata") {
        meta.entry("namespace").or_insert_with(|| Value::String(namespace.into()));
    }
    let status = map.entry("status").or_insert_with(|| Value::Object(Default::default()));
    if !status.is_object() {
        *status = Value::Object(Default::default());
    }
    if let Value::Object(status) = status {
        status.insert("phase".into(), "Running".into());
        if let Some(first) = ips.first() {
            status.insert("podIP".into(), first.to_string().into());
        }
        let all: Vec<Value> = ips.iter().map(|ip| serde_json::json!({ "ip": ip.to_string() })).collect();
        status.insert("podIPs".into(), Value::Array(all));
    }
}

/// The Pods of the documents, with what their namespaces say about the mesh.
fn pods_of(files: &[(PathBuf, Vec<Value>)]) -> Result<Vec<PodDef>, UpError> {
    let mut ambient_namespaces = BTreeMap::new();
    let mut pods = Vec::new();
    let mut errors = Vec::new();
    for (path, docs) in files {
        for doc in docs {
            let Ok(decoded) = weft_core::config::decode(doc.clone()) else { continue };
            match decoded.object {
                Object::Namespace(ns) => {
                    let ambient =
                        ns.metadata.labels.get(DATAPLANE_MODE).map(String::as_str) == Some("ambient");
                    ambient_namespaces.insert(ns.metadata.name.clone(), ambient);
                }
                Object::Pod(pod) => {
                    let (namespace, name) = (pod.metadata.namespace.clone(), pod.metadata.name.clone());
                    let Some(node) = pod.spec.node_name.clone() else {
                        errors.push(format!(
                            "{}: Pod {namespace}/{name} has no spec.nodeName; say which node it runs on \
                             (node-a, node-b, ...)",
                            path.display()
                        ));
                        continue;
                    };
                    let container = doc.pointer("/spec/containers/0");
                    let strings = |field: &str| -> Vec<String> {
                        container
                            .and_then(|c| c.get(field))
                            .and_then(Value::as_array)
                            .map(|a| {
                                a.iter()
                                    .map(|v| v.as_str().map_or_else(|| v.to_string(), String::from))
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                    let mut command = strings("command");
                    command.extend(strings("args"));
                    let env = container
                        .and_then(|c| c.get("env"))
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|e| {
                                    Some((
                                        e.get("name")?.as_str()?.to_string(),
                                        e.get("value")?.as_str()?.to_string(),
                                    ))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let pod_mode = pod.metadata.labels.get(DATAPLANE_MODE).cloned();
                    pods.push((
                        pod_mode,
                        PodDef {
                            namespace,
                            name,
                            node,
                            service_account: pod.service_account().to_string(),
                            command,
                            env,
                            ambient: false,
                        },
                    ));
                }
                _ => {}
            }
        }
    }
    if !errors.is_empty() {
        return Err(UpError::Config(errors.join("\n")));
    }
    Ok(pods
        .into_iter()
        .map(|(mode, mut pod)| {
            pod.ambient = match mode.as_deref() {
                Some("none") => false,
                Some("ambient") => true,
                _ => ambient_namespaces.get(&pod.namespace).copied().unwrap_or(false),
            };
            pod
        })
        .collect())
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
    for binary in ["controller", "ztunnel"] {
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
            let token = random_token()?;
            let path = self.token_path(node);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(io(format!("writing {}", path.display())))?;
            file.write_all(token.as_bytes()).map_err(io(format!("writing {}", path.display())))?;
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

    fn read_token(&self, node: &str) -> Result<String, UpError> {
        let path = self.token_path(node);
        std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))
    }

    /// Starts the controller in the first node's namespace and waits until it accepts
    /// connections.
    pub fn start_controller(&mut self) -> Result<(), UpError> {
        let node = self.cluster.plan().nodes[CONTROLLER_NODE_INDEX].name.clone();
        let netns = self.cluster.node_netns(&node)?.to_string();
        let mut tokens = Vec::new();
        for n in &self.cluster.plan().nodes {
            tokens.push(format!("{}={}", n.name, self.read_token(&n.name)?));
        }
        let state = cluster::state_dir(self.name());
        let mut cmd = Command::new(self.bin_dir.join("controller"));
        cmd.arg("--config-dir")
            .arg(self.config_dir())
            .arg("--listen")
            .arg(format!("0.0.0.0:{CONTROLLER_PORT}"))
            .arg("--ca-dir")
            .arg(state.join("ca"))
            .args(["--trust-domain", TRUST_DOMAIN])
            // In the environment, not on the command line where `ps` shows it.
            .env("WEFT_NODE_TOKENS", tokens.join(","));
        self.spawn("controller", &netns, cmd, false)?;
        let addr = self.controller_addr()?;
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            let connected =
                cluster::in_netns(&netns, || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))?;
            if connected.is_ok() {
                return Ok(());
            }
            self.check_alive("controller")?;
            if Instant::now() > deadline {
                return Err(self.not_ready("controller", format!("nothing accepts connections on {addr}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The machine's cores divided among the nodes, at least one.
    fn worker_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        (cores / self.cluster.plan().nodes.len().max(1)).max(1)
    }

    /// Starts `node`'s ztunnel in the node's namespace (it does not wait for readiness: see
    /// [`Mesh::wait_ztunnel_ready`]).
    pub fn start_ztunnel(&mut self, node: &str) -> Result<(), UpError> {
        let netns = self.cluster.node_netns(node)?.to_string();
        let node_ip = self.node_ip(node)?;
        let uplink = self.cluster.node(node)?.uplink.clone();
        let mut cmd = Command::new(self.bin_dir.join("ztunnel"));
        cmd.args(["--node-name", node])
            .arg("--node-ip")
            .arg(node_ip.to_string())
            .arg("--xds-address")
            .arg(format!("http://{}", self.controller_addr()?))
            .arg("--token-file")
            .arg(self.token_path(node))
            // No --trust-domain: the ztunnel binary takes none (it serves the identities the
            // controller's workloads carry, all in the controller's trust domain).
            .arg("--pin-dir")
            .arg(cluster::node_bpf_pin_dir(self.name(), node))
            .args(["--uplink", &uplink])
            // The nodes share this machine's cores: each ztunnel gets its share, as it would
            // have its node's cores on a real cluster (more threads than cores only adds
            // cross-thread wake-ups: measured in BENCHMARKS.md, L4 mesh).
            .arg("--worker-threads")
            .arg(self.worker_threads().to_string());
        self.spawn(&ztunnel_process(node), &netns, cmd, true)
    }

    /// Waits until `node`'s ztunnel answers 200 on `/healthz/ready`.
    pub fn wait_ztunnel_ready(&mut self, node: &str) -> Result<(), UpError> {
        let process = ztunnel_process(node);
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            let last = match self.ztunnel_get(node, READY_PORT, "/healthz/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("/healthz/ready answered {status}: {}", body.trim()),
                Err(e) => format!("GET /healthz/ready: {e}"),
            };
            self.check_alive(&process)?;
            if Instant::now() > deadline {
                return Err(self.not_ready(&process, last));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET `path` from one of `node`'s ztunnel ports, from inside the node's namespace (the
    /// admin port listens on the node's loopback only). Returns the status and the body.
    pub fn ztunnel_get(&self, node: &str, port: u16, path: &str) -> Result<(u16, String), UpError> {
        let netns = self.cluster.node_netns(node)?.to_string();
        let ip = if port == ADMIN_PORT { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { self.node_ip(node)? };
        let addr = SocketAddr::new(ip, port);
        cluster::in_netns(&netns, || http_get(addr, path))?
            .map_err(|source| UpError::Http { what: format!("GET http://{addr}{path} in {netns}"), source })
    }

    fn start_pod(&mut self, pod: &PodDef) -> Result<(), UpError> {
        let Some((program, args)) = pod.command.split_first() else {
            tracing::info!(pod = %pod.process_name(), "no command; the pod only has its network namespace");
            return Ok(());
        };
        let netns = self.cluster.pod_netns(&pod.namespace, &pod.name)?.to_string();
        let program = self.resolve(program);
        let mut cmd = Command::new(program);
        cmd.args(args);
        for (k, v) in &pod.env {
            cmd.env(k, v);
        }
        cmd.env("POD_NAME", &pod.name).env("POD_NAMESPACE", &pod.namespace);
        self.spawn(&pod.process_name(), &netns, cmd, false)
    }

    /// Waits for `weft-app`'s `ready` line in its log (other programs are not waited for).
    fn wait_pod_ready(&mut self, pod: &PodDef) -> Result<(), UpError> {
        let Some(program) = pod.command.first() else { return Ok(()) };
        if Path::new(program).file_name().is_none_or(|f| f != "weft-app") {
            return Ok(());
        }
        let process = pod.process_name();
        let log = self.log_path(&process);
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().any(|l| l == "ready") {
                return Ok(());
            }
            self.check_alive(&process)?;
            if Instant::now() > deadline {
                return Err(self.not_ready(&process, "weft-app printed no `ready` line".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A bare program name is looked up in the bin dir first (`weft-app`), then on PATH.
    fn resolve(&self, program: &str) -> PathBuf {
        let local = self.bin_dir.join(program);
        if !program.contains('/') && local.exists() {
            local
        } else {
            PathBuf::from(program)
        }
    }

    /// Starts `cmd` inside `netns` as a process of its own group (so it outlives `weft up` and
    /// a Ctrl-C of it), output appended to `logs/<process>.log`.
    fn spawn(&mut self, process: &str, netns: &str, cmd: Command, keep_mounts: bool) -> Result<(), UpError> {
        let log_path = self.log_path(process);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io(format!("opening {}", log_path.display())))?;
        let mut outer = if keep_mounts {
            // Only the network namespace: `ip netns exec` would also give the process a mount
            // namespace with a fresh /sys, hiding the host's bpffs (/sys/fs/bpf). ztunnel's pins
            // would then live in a private bpffs that dies with the process, and the capture
            // with them (failing open); `weft down` could not see them either.
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", cluster::netns_path(netns).display())).arg("--");
            c
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns]);
            c
        };
        outer.arg(cmd.get_program()).args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => outer.env(key, value),
                None => outer.env_remove(key),
            };
        }
        if std::env::var_os("RUST_LOG").is_none() {
            outer.env("RUST_LOG", "info");
        }
        // Plain text in the log files.
        outer.env("NO_COLOR", "1");
        outer.stdin(Stdio::null()).stdout(log).stderr(log2).process_group(0);
        let shown = format!(
            "{} {netns} {} {}",
            if keep_mounts { "nsenter --net" } else { "ip netns exec" },
            cmd.get_program().to_string_lossy(),
            cmd.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
        );
        let child = outer.spawn().map_err(io(format!("starting `{shown}`")))?;
        tracing::info!(process, pid = child.id(), command = %shown, "started");
        if let Some(mut old) = self.children.insert(process.to_string(), child) {
            let _ = old.try_wait();
        }
        Ok(())
    }

    fn check_alive(&mut self, process: &str) -> Result<(), UpError> {
        let Some(child) = self.children.get_mut(process) else { return Ok(()) };
        match child.try_wait() {
            Ok(Some(status)) => {
                let log = self.log_path(process);
                Err(UpError::Exited {
                    process: process.into(),
                    status: status.to_string(),
                    tail: log_tail(&log),
                    log: log.display().to_string(),
                })
            }
            _ => Ok(()),
        }
    }

    fn not_ready(&self, process: &str, reason: String) -> UpError {
        let log = self.log_path(process);
        UpError::NotReady {
            process: process.into(),
            timeout: self.ready_timeout,
            reason,
            tail: log_tail(&log),
            log: log.display().to_string(),
        }
    }

    /// The pid of a process `weft up` started (`controller`, `ztunnel-<node>`,
    /// `pod-<ns>-<name>`), if it still runs.
    pub fn pid(&mut self, process: &str) -> Option<u32> {
        let child = self.children.get_mut(process)?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    /// Kills a process `weft up` started (SIGKILL, as a crash) and waits for it.
    pub fn kill(&mut self, process: &str) -> Result<(), UpError> {
        let Some(mut child) = self.children.remove(process) else {
            return Err(UpError::Config(format!("no process {process} was started")));
        };
        let _ = child.kill();
        child.wait().map_err(io(format!("waiting for {process}")))?;
        Ok(())
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

/// The process (and log) name of a node's ztunnel.
pub fn ztunnel_process(node: &str) -> String {
    format!("ztunnel-{node}")
}

/// The controller's watched directory of cluster `name`.
pub fn config_dir(name: &str) -> PathBuf {
    cluster::state_dir(name).join("config")
}

/// Why a GET of one of the ztunnel's HTTP endpoints failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connecting: {0} (does anything listen there, in this network namespace?)")]
    Connect(#[source] std::io::Error),
    #[error("setting up the connection: {0}")]
    Socket(#[source] std::io::Error),
    #[error("starting the client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{path:?} is not a valid request path: {source}")]
    Path {
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("no HTTP/1.1 response: {}", error_chain(.0))]
    Exchange(#[source] hyper::Error),
    #[error("reading the response body: {}", error_chain(.0))]
    Body(#[source] hyper::Error),
    #[error("the response body is larger than the {limit}-byte limit{}", announced_size(*.announced))]
    TooLarge { limit: usize, announced: Option<u64> },
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
}

/// hyper's errors print only their own kind ("error reading a body from connection"); what went
/// wrong is in their sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let _ = write!(text, ": {e}");
        source = e.source();
    }
    text
}

fn announced_size(announced: Option<u64>) -> String {
    announced.map(|n| format!(" (it announces {n} bytes)")).unwrap_or_default()
}

/// What one [`http_get`] may take.
#[derive(Debug, Clone, Copy)]
struct HttpLimits {
    connect: Duration,
    /// Connecting included.
    total: Duration,
    max_body: usize,
}

impl HttpLimits {
    /// A ztunnel's `/config_dump` or `/metrics` is far below 16 MiB; its endpoints answer at once.
    const DEFAULT: HttpLimits =
        HttpLimits { connect: Duration::from_secs(2), total: Duration::from_secs(10), max_body: 16 << 20 };
}

/// An HTTP/1.1 GET of `path` at `addr` (the ztunnel's admin, readiness and metrics endpoints):
/// the status and the body (invalid UTF-8 replaced). It connects from the calling thread, so
/// inside [`cluster::in_netns`] the connection is made in that namespace, then speaks HTTP with
/// hyper over it on a current-thread runtime of its own. 2 s to connect, 10 s in all, bodies up
/// to 16 MiB.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), HttpError> {
    get(addr, path, HttpLimits::DEFAULT)
}

fn get(addr: SocketAddr, path: &str, limits: HttpLimits) -> Result<(u16, String), HttpError> {
    let started = Instant::now();
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|source| HttpError::Path { path: path.into(), source })?;
    let stream = TcpStream::connect_timeout(&addr, limits.connect).map_err(HttpError::Connect)?;
    stream.set_nonblocking(true).map_err(HttpError::Socket)?;
    let left = limits.total.saturating_sub(started.elapsed());
    let exchange = async move {
        let stream = tokio::net::TcpStream::from_std(stream).map_err(HttpError::Socket)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(HttpError::Exchange)?;
        // Drives the connection while the response is read; its errors surface in the response
        // or the body. It ends with the response (Connection: close) or with the runtime.
        tokio::spawn(connection);
        let response = sender.send_request(request).await.map_err(HttpError::Exchange)?;
        let status = response.status().as_u16();
        let body = read_body(response.into_body(), limits.max_body).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    block_on_own_runtime(async move {
        tokio::time::timeout(left, exchange).await.map_err(|_| HttpError::Timeout(limits.total))?
    })?
}

/// The body, refused as soon as it (or its announced length) passes `max` bytes.
async fn read_body(mut body: Incoming, max: usize) -> Result<Vec<u8>, HttpError> {
    let limit = u64::try_from(max).unwrap_or(u64::MAX);
    let announced = body.size_hint().lower();
    if announced > limit {
        return Err(HttpError::TooLarge { limit: max, announced: Some(announced) });
    }
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(HttpError::Body)?;
        if let Ok(data) = frame.into_data() {
            if out.len().saturating_add(data.len()) > max {
                return Err(HttpError::TooLarge { limit: max, announced: None });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// Runs `future` on a current-thread runtime of its own. Such a runtime cannot be driven from a
/// thread that already runs one (tokio panics), so there it gets a thread of its own.
fn block_on_own_runtime<F>(future: F) -> Result<F::Output, HttpError>
where
    F: Future + Send,
    F::Output: Send,
{
    let run = move || {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(HttpError::Runtime)?;
        Ok(runtime.block_on(future))
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    std::thread::scope(|scope| match scope.spawn(run).join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// The last lines of a log file (or why there are none).
pub fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_LINES);
            let tail = lines[from..].join("\n");
            if tail.is_empty() {
                "(empty)".into()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read: {e})"),
    }
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
    fn pods_get_their_ips_and_namespaces_their_membership() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: cart\n  namespace: shop\nspec:\n  nodeName: node-b\n  \
             serviceAccountName: cart\n  containers:\n  - name: app\n    command: [weft-app, --http, \"8080\"]\n    \
             env:\n    - {name: GREETING, value: \"yes\"}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: old\nspec:\n  nodeName: node-a\n  containers: [{name: x}]\n",
        )
        .unwrap();
        let m = Manifests::read(dir.path()).unwrap();
        assert_eq!(m.pods.len(), 2);
        let cart = &m.pods[0];
        assert_eq!(cart.command, ["weft-app", "--http", "8080"]);
        assert_eq!(cart.env, [("GREETING".to_string(), "yes".to_string())]);
        assert!(cart.ambient);
        assert_eq!(cart.identity(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert!(!m.pods[1].ambient);
        assert_eq!(m.pods[1].namespace, "default");

        let ip: IpAddr = "10.10.2.2".parse().unwrap();
        let ips = BTreeMap::from([(("shop".to_string(), "cart".to_string()), vec![ip])]);
        let out = m.with_pod_ips(&ips);
        let docs = load_yaml(&out[0].1, "out");
        let pod = docs
            .iter()
            .find_map(|d| match &d.result.as_ref().unwrap().object {
                Object::Pod(p) if p.metadata.name == "cart" => Some(p.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(pod.status.pod_ip.as_deref(), Some("10.10.2.2"));
        assert_eq!(pod.status.phase.as_deref(), Some("Running"));
        assert_eq!(pod.ips(), ["10.10.2.2"]);
        assert_eq!(docs.len(), 3);
    }

    #[test]
    fn a_pod_without_a_node_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: lost\n  namespace: x\nspec:\n  containers: [{name: a}]\n",
        )
        .unwrap();
        let e = Manifests::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("Pod x/lost has no spec.nodeName"), "{e}");
    }

    #[test]
    fn node_names_follow_letters() {
        assert_eq!(node_names(3), ["node-a", "node-b", "node-c"]);
    }

    /// A server for one connection: it reads the request head, then writes `pieces` one by one
    /// (each its own TCP segment) and closes; with no pieces it answers nothing until the client
    /// hangs up.
    fn serve(pieces: Vec<Vec<u8>>) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_nodelay(true).unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            if pieces.is_empty() {
                let _ = stream.read(&mut byte);
            }
            for piece in pieces {
                if stream.write_all(&piece).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        addr
    }

    fn pieces(parts: &[&[u8]]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn http_get_reads_a_chunked_body_split_anywhere() {
        // "é" and "✓" are split across chunks (the old client sliced a &str there and panicked)
        // and the segments cut the chunk-size lines, their CRLFs and the characters again.
        let body = "h\u{e9}llo \u{2713}";
        let bytes = body.as_bytes();
        let mut wire = CHUNKED.to_vec();
        for chunk in [&bytes[..2], &bytes[2..7], &bytes[7..]] {
            wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let cuts =
            [CHUNKED.len() - 1, CHUNKED.len() + 1, CHUNKED.len() + 3, CHUNKED.len() + 4, wire.len() - 3];
        let mut parts = Vec::new();
        let mut from = 0;
        for cut in cuts.into_iter().chain([wire.len()]) {
            parts.push(wire[from..cut].to_vec());
            from = cut;
        }
        assert_eq!(http_get(serve(parts), "/metrics").unwrap(), (200, body.to_string()));
    }

    #[test]
    fn http_get_names_a_truncated_chunked_body() {
        let addr = serve(pieces(&[CHUNKED, b"10\r\nonly a few"]));
        let e = http_get(addr, "/").unwrap_err();
        assert!(matches!(e, HttpError::Body(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            e.starts_with("reading the response body: ")
                && e.ends_with("end of file before message length reached"),
            "{e}"
        );
    }

    #[test]
    fn http_get_refuses_chunk_sizes_it_cannot_hold() {
        let addr = serve(pieces(&[CHUNKED, b"fffffffffffffffffffff\r\nx\r\n0\r\n\r\n"]));
        let e = http_get(addr, "/").unwrap_err().to_string();
        assert!(
            e.starts_with("reading the response body: ") && e.ends_with("invalid chunk size: overflow"),
            "{e}"
        );

        // A size that parses but passes the limit: refused once the data passes it.
        let limits = HttpLimits { max_body: 1024, ..HttpLimits::DEFAULT };
        let addr = serve(pieces(&[CHUNKED, b"7fffffff\r\n", &[b'x'; 4096]]));
        let e = get(addr, "/", limits).unwrap_err();
        assert!(matches!(e, HttpError::TooLarge { limit: 1024, announced: None }), "{e:?}");
        assert_eq!(e.to_string(), "the response body is larger than the 1024-byte limit");
    }

    #[test]
    fn http_get_refuses_an_announced_body_above_16_mib_before_reading_it() {
        let addr = serve(pieces(&[b"HTTP/1.1 200 OK\r\nContent-Length: 16777217\r\n\r\n"]));
        let e = http_get(addr, "/").unwrap_err().to_string();
        assert_eq!(
            e,
            "the response body is larger than the 16777216-byte limit (it announces 16777217 bytes)"
        );
    }

    #[test]
    fn http_get_replaces_invalid_utf8() {
        let addr = serve(pieces(&[
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 6\r\n\r\n",
            b"no\xff\xfe\xc3!",
        ]));
        assert_eq!(http_get(addr, "/").unwrap(), (503, "no\u{fffd}\u{fffd}\u{fffd}!".to_string()));
    }

    #[test]
    fn http_get_says_what_is_wrong_with_the_peer() {
        let addr = serve(pieces(&[b"SSH-2.0-OpenSSH_9.6\r\n\r\n"]));
        let e = http_get(addr, "/").unwrap_err();
        assert!(matches!(e, HttpError::Exchange(_)), "{e:?}");

        let addr = serve(pieces(&[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"]));
        assert!(matches!(http_get(addr, "/").unwrap_err(), HttpError::Body(_)));

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(matches!(http_get(closed, "/").unwrap_err(), HttpError::Connect(_)));

        let e = http_get(closed, "no path").unwrap_err();
        assert!(matches!(e, HttpError::Path { .. }), "{e:?}");

        let limits = HttpLimits { total: Duration::from_millis(200), ..HttpLimits::DEFAULT };
        let e = get(serve(Vec::new()), "/", limits).unwrap_err();
        assert_eq!(e.to_string(), "no complete response within 200ms");
    }

    #[test]
    fn http_get_runs_inside_a_runtime_too() {
        let addr = serve(pieces(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(runtime.block_on(async { http_get(addr, "/") }).unwrap(), (200, "ok".to_string()));
    }
}
