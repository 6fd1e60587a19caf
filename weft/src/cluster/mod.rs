//! The local cluster's kernel networking: network namespaces standing in for nodes and pods,
//! the veths and routes between them, and their teardown. It owns only namespaces named
//! `weft-<cluster>-*`, the state directory `/run/weft/<cluster>` and the eBPF pin directory
//! `/sys/fs/bpf/weft/<cluster>` (removed on destroy); it must never change the root namespace's
//! interfaces, addresses, routes or rules. It starts no mesh component: the controller and the
//! ztunnels are started by its caller, inside the namespaces it names.
//!
//! - [`ClusterSpec`] → [`Plan`] (pure, [`plan`]): every name and address.
//! - [`Cluster::create`] builds the plan with the `ip` command (blocking; from async code call it
//!   in `spawn_blocking`), [`destroy`] removes a cluster by name only, so it works after a crash.
//! - [`in_netns`], [`command_in`], [`spawn_in`] run code and processes inside a namespace.
//!
//! Layout (two nodes, IPv4; more nodes hang their `eth0` off a bridge in
//! `weft-<cluster>-fabric`; dual stack adds the `fd..` addresses of [`plan`]):
//!
//! ```text
//!  pod netns                node netns weft-c-node-a              node netns weft-c-node-b
//!  eth0 10.10.1.2/32 ──veth── wf1a2b3c4d (proxy_arp)   eth0 172.30.0.1/24 ──veth── eth0 172.30.0.2/24
//!  default via 169.254.1.1    lo: 169.254.1.1/32 (scope link), ip_forward=1
//!                             10.10.1.2/32 dev wf1a2b3c4d; 10.10.2.0/24 via 172.30.0.2
//! ```

mod netns;
pub mod plan;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weft_core::names;

pub use netns::{command_in, in_netns, ip, ip_in, list_netns, netns_path, spawn_in, sysctl_in};
pub use plan::{Addressing, Cidr, ClusterSpec, FabricPlan, NodePlan, Plan, PlanError, PodPlan, PodSpec};

/// Where each cluster's state directory lives (`<STATE_ROOT>/<cluster>/cluster.json`).
pub const STATE_ROOT: &str = "/run/weft";
/// Where eBPF objects of a cluster are pinned (`<BPF_PIN_ROOT>/<cluster>`); removed on destroy.
pub const BPF_PIN_ROOT: &str = "/sys/fs/bpf/weft";
/// How long processes left in a namespace get between SIGTERM and SIGKILL on destroy.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long [`destroy`] waits for the kernel to free the cluster's eBPF programs.
const PROGRAMS_UNLOAD: Duration = Duration::from_secs(10);

/// Why a cluster could not be built, found or removed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("could not run `{command}` (is iproute2 installed and are we root?): {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] weft_core::netns::NetnsError),
    #[error("state file {path}: {source}")]
    State {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cluster {cluster:?} has no node {node:?}")]
    NoSuchNode { cluster: String, node: String },
    #[error("cluster {cluster:?} has no pod {namespace}/{name}")]
    NoSuchPod { cluster: String, namespace: String, name: String },
    #[error("the local cluster cannot run here: {0}")]
    Unavailable(String),
    #[error(
        "eBPF programs of the cluster still loaded {} s after its namespaces and pins went (does a process hold them?): ids {ids:?}",
        PROGRAMS_UNLOAD.as_secs()
    )]
    ProgramsLoaded { ids: Vec<u32> },
}

/// A cluster whose namespaces exist. Dropping it leaves them in place: call
/// [`Cluster::destroy`] (or [`destroy`] by name, e.g. from another process).
#[derive(Debug, Clone)]
pub struct Cluster {
    plan: Plan,
}

/// What the state file records: the plan, and which namespaces were made so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub plan: Plan,
    pub namespaces: Vec<String>,
    /// False while `create` runs (or if it died half-way).
    pub complete: bool,
}

impl Cluster {
    /// Builds the plan's namespaces, links, addresses and routes, after removing whatever a
    /// cluster of the same name left behind. On failure it removes what it made and returns the
    /// first error (naming the command and its stderr).
    pub fn create(plan: Plan) -> Result<Cluster, ClusterError> {
        check_environment()?;
        destroy(&plan.cluster)?;
        let mut state = State { plan, namespaces: Vec::new(), complete: false };
        match build(&mut state) {
            Ok(()) => {
                state.complete = true;
                write_state(&state)?;
                tracing::info!(cluster = %state.plan.cluster, "cluster created");
                Ok(Cluster { plan: state.plan })
            }
            Err(e) => {
                tracing::warn!(cluster = %state.plan.cluster, error = %e, "creating the cluster failed; cleaning up");
                if let Err(cleanup) = destroy(&state.plan.cluster) {
                    tracing::warn!(error = %cleanup, "cleaning up after a failed create");
                }
                Err(e)
            }
        }
    }

    /// The cluster of this name as its state file describes it (e.g. for `weft` commands run
    /// after `weft up`).
    pub fn load(cluster: &str) -> Result<Cluster, ClusterError> {
        plan::check_cluster_name(cluster)?;
        let path = state_dir(cluster).join("cluster.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ClusterError::Io { what: format!("reading {}", path.display()), source })?;
        let state: State = serde_json::from_str(&text)
            .map_err(|source| ClusterError::State { path: path.display().to_string(), source })?;
        Ok(Cluster { plan: state.plan })
    }

    pub fn name(&self) -> &str {
        &self.plan.cluster
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn node(&self, node: &str) -> Result<&NodePlan, ClusterError> {
        self.plan
            .node(node)
            .ok_or_else(|| ClusterError::NoSuchNode { cluster: self.plan.cluster.clone(), node: node.into() })
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Result<&PodPlan, ClusterError> {
        self.plan.pod(namespace, name).ok_or_else(|| ClusterError::NoSuchPod {
            cluster: self.plan.cluster.clone(),
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    /// The network namespace of `node`.
    pub fn node_netns(&self, node: &str) -> Result<&str, ClusterError> {
        Ok(&self.node(node)?.netns)
    }

    /// The network namespace of pod `namespace/name`.
    pub fn pod_netns(&self, namespace: &str, name: &str) -> Result<&str, ClusterError> {
        Ok(&self.pod(namespace, name)?.netns)
    }

    /// The pod's first address (IPv4 today).
    pub fn pod_ip(&self, namespace: &str, name: &str) -> Result<IpAddr, ClusterError> {
        let pod = self.pod(namespace, name)?;
        pod.ips.first().copied().ok_or_else(|| ClusterError::NoSuchPod {
            cluster: self.plan.cluster.clone(),
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    /// Adds a pod to the running cluster on `node` (its namespace, veth, addresses and routes),
    /// without touching the others, and records it in the state file.
    pub fn add_pod(&mut self, namespace: &str, name: &str, node: &str) -> Result<PodPlan, ClusterError> {
        let pod = self.plan.add_pod(namespace, name, node)?;
        let node_plan = self.node(node)?.clone();
        let made = (|| {
            ip(&["netns", "add", &pod.netns])?;
            ip_in(&pod.netns, &["link", "set", "lo", "up"])?;
            if self.plan.gateways.iter().any(IpAddr::is_ipv6) {
                sysctl_in(
                    &pod.netns,
                    &["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"],
                )?;
            }
            build_pod(&self.plan, &node_plan, &pod)?;
            sysctl_in(&node_plan.netns, &[&format!("net.ipv4.conf.{}.proxy_arp=1", pod.host_veth)])
        })();
        if let Err(e) = made {
            let _ = ip(&["netns", "del", &pod.netns]);
            self.plan.remove_pod(namespace, name);
            return Err(e);
        }
        self.save()?;
        Ok(pod)
    }

    /// Stops what runs in a pod added with [`Cluster::add_pod`] (or planned at creation) and
    /// removes its namespace (and so its veth and routes) and its record.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Result<(), ClusterError> {
        let Some(pod) = self.plan.remove_pod(namespace, name) else { return Ok(()) };
        netns::stop_processes_in(&pod.netns, STOP_GRACE)?;
        ip(&["netns", "del", &pod.netns])?;
        self.save()
    }

    /// Writes the plan to the state file, every namespace it names made.
    fn save(&self) -> Result<(), ClusterError> {
        write_state(&State { plan: self.plan.clone(), namespaces: self.plan.netns_names(), complete: true })
    }

    /// Removes the cluster: see [`destroy`].
    pub fn destroy(self) -> Result<(), ClusterError> {
        destroy(&self.plan.cluster)
    }
}

/// Removes everything of cluster `cluster`, knowing only its name: stops the processes inside
/// its namespaces, deletes every namespace named `weft-<cluster>-*` (and so every interface,
/// address and route in them), the eBPF pin directory and the state directory. Idempotent:
/// removing a cluster that is not there succeeds. Every step is tried; the first error is
/// returned.
pub fn destroy(cluster: &str) -> Result<(), ClusterError> {
    plan::check_cluster_name(cluster)?;
    let prefix = plan::netns_prefix(cluster);
    let mut first_error = None;
    let mut keep = |r: Result<(), ClusterError>| {
        if let Err(e) = r {
            tracing::warn!(error = %e, "destroying the cluster");
            first_error.get_or_insert(e);
        }
    };
    // Read before the pins go, to wait for the kernel to free the programs below.
    let programs = ebpf::pinned_program_ids(&bpf_pin_dir(cluster));
    for ns in list_netns()?.into_iter().filter(|n| n.starts_with(&prefix)) {
        keep(netns::stop_processes_in(&ns, STOP_GRACE));
        let deleted = ip(&["netns", "del", &ns]).map(drop);
        // Gone in the meantime (another destroy) is fine.
        keep(deleted.or_else(|e| if netns_path(&ns).exists() { Err(e) } else { Ok(()) }));
    }
    keep(remove_dir_if_present(&bpf_pin_dir(cluster)));
    keep(remove_dir_if_present(&state_dir(cluster)));
    // The namespaces' interfaces, and the tc filters on them, are freed by the kernel after
    // `ip netns del` returns; `weft down` returns once nothing of the cluster is left.
    keep(ebpf::wait_unloaded(&programs, PROGRAMS_UNLOAD).map_err(|ids| ClusterError::ProgramsLoaded { ids }));
    match first_error {
        None => {
            tracing::info!(cluster, "cluster destroyed");
            Ok(())
        }
        Some(e) => Err(e),
    }
}

/// The cluster's state directory, `/run/weft/<cluster>`.
pub fn state_dir(cluster: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(cluster)
}

/// Where the cluster's eBPF objects are pinned, `/sys/fs/bpf/weft/<cluster>`.
pub fn bpf_pin_dir(cluster: &str) -> PathBuf {
    Path::new(BPF_PIN_ROOT).join(cluster)
}

/// Where a node's ztunnel should pin its eBPF objects (`ebpf::CaptureConfig::pin_dir`):
/// `/sys/fs/bpf/weft/<cluster>/<node>`, so that [`destroy`] removes them with the cluster.
/// Node and cluster names carry no dot, which bpffs refuses.
pub fn node_bpf_pin_dir(cluster: &str, node: &str) -> PathBuf {
    bpf_pin_dir(cluster).join(node)
}

/// Whether this process can build clusters: root, and a working `ip netns`.
pub fn check_environment() -> Result<(), ClusterError> {
    match weft_core::netns::unavailable() {
        None => Ok(()),
        Some(why) => Err(ClusterError::Unavailable(why)),
    }
}

fn remove_dir_if_present(dir: &Path) -> Result<(), ClusterError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ClusterError::Io { what: format!("removing {}", dir.display()), source }),
    }
}

fn write_state(state: &State) -> Result<(), ClusterError> {
    let dir = state_dir(&state.plan.cluster);
    let io = |what: String| move |source| ClusterError::Io { what, source };
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let path = dir.join("cluster.json");
    let text = serde_json::to_string_pretty(state)
        .map_err(|source| ClusterError::State { path: path.display().to_string(), source })?;
    // Write then rename, so a reader never sees half a file.
    let tmp = dir.join("cluster.json.tmp");
    std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("renaming {}", tmp.display())))
}

/// Makes every namespace, then the links between nodes, then the pods.
fn build(state: &mut State) -> Result<(), ClusterError> {
    write_state(state)?;
    let dual_stack = state.plan.gateways.iter().any(IpAddr::is_ipv6);
    for ns in state.plan.netns_names() {
        ip(&["netns", "add", &ns])?;
        state.namespaces.push(ns.clone());
        ip_in(&ns, &["link", "set", "lo", "up"])?;
        if dual_stack {
            // Interfaces made from now on skip duplicate address detection, so IPv6 works at
            // once instead of after a second or two.
            sysctl_in(&ns, &["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])?;
        }
    }
    write_state(state)?;
    let plan = &state.plan;

    // The links between nodes: one veth for two nodes, else a bridge in the fabric namespace.
    match (&plan.fabric, plan.nodes.as_slice()) {
        (None, [a, b]) => {
            ip_in(
                &a.netns,
                &["link", "add", &a.uplink, "type", "veth", "peer", "name", &b.uplink, "netns", &b.netns],
            )?;
        }
        (Some(fabric), nodes) => {
            let f = &fabric.netns;
            ip_in(f, &["link", "add", &fabric.bridge, "type", "bridge"])?;
            ip_in(f, &["link", "set", &fabric.bridge, "up"])?;
            for (node, port) in nodes.iter().zip(&fabric.ports) {
                ip_in(
                    f,
                    &[
                        "link",
                        "add",
                        port,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        &node.uplink,
                        "netns",
                        &node.netns,
                    ],
                )?;
                ip_in(f, &["link", "set", port, "master", &fabric.bridge])?;
                ip_in(f, &["link", "set", port, "up"])?;
            }
        }
        (None, _) => unreachable_layout()?,
    }

    for node in &plan.nodes {
        let ns = &node.netns;
        for addr in &node.link_addrs {
            add_addr(ns, *addr, &node.uplink)?;
        }
        ip_in(ns, &["link", "set", &node.uplink, "up"])?;
        for gateway in plan.gateways.iter().filter(|g| g.is_ipv4()) {
            // The pods' next hop: link scope, so the node never picks it as a source address.
            let gateway = Cidr::host(*gateway).to_string();
            ip_in(ns, &["addr", "add", &gateway, "dev", "lo", "scope", "link"])?;
        }
        // Istio's probe source, for the node's own health checks of its pods (the capture lets
        // node traffic from it through to the pods): link scope, never picked as a source.
        let probe = Cidr::host(names::PROBE_SOURCE_V4.into()).to_string();
        ip_in(ns, &["addr", "add", &probe, "dev", "lo", "scope", "link"])?;
        if dual_stack {
            let probe = Cidr::host(names::PROBE_SOURCE_V6.into()).to_string();
            ip_in(ns, &["addr", "add", &probe, "dev", "lo", "scope", "link", "nodad"])?;
        }
        for other in plan.nodes.iter().filter(|o| o.name != node.name) {
            for (cidr, via) in other.pod_cidrs.iter().zip(&other.link_addrs) {
                let (cidr, via) = (cidr.to_string(), via.addr.to_string());
                ip_in(ns, &["route", "add", &cidr, "via", &via, "dev", &node.uplink])?;
            }
        }
        let mut sysctls = vec!["net.ipv4.ip_forward=1".to_string()];
        if dual_stack {
            sysctls.push("net.ipv6.conf.all.forwarding=1".into());
        }
        for pod in plan.pods_on(&node.name) {
            build_pod(plan, node, pod)?;
            sysctls.push(format!("net.ipv4.conf.{}.proxy_arp=1", pod.host_veth));
        }
        sysctl_in(ns, &sysctls.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(())
}

fn build_pod(plan: &Plan, node: &NodePlan, pod: &PodPlan) -> Result<(), ClusterError> {
    let (node_ns, pod_ns) = (&node.netns, &pod.netns);
    ip_in(
        node_ns,
        &["link", "add", &pod.host_veth, "type", "veth", "peer", "name", &pod.iface, "netns", pod_ns],
    )?;
    for ip in &pod.ips {
        add_addr(pod_ns, Cidr::host(*ip), &pod.iface)?;
    }
    ip_in(pod_ns, &["link", "set", &pod.iface, "up"])?;
    for gateway in &plan.gateways {
        let gw = gateway.to_string();
        if gateway.is_ipv4() {
            ip_in(pod_ns, &["route", "add", &gw, "dev", &pod.iface, "scope", "link"])?;
            ip_in(pod_ns, &["route", "add", "default", "via", &gw, "dev", &pod.iface])?;
        } else {
            ip_in(pod_ns, &["-6", "route", "add", "default", "via", &gw, "dev", &pod.iface])?;
        }
    }
    ip_in(node_ns, &["link", "set", &pod.host_veth, "up"])?;
    for gateway in plan.gateways.iter().filter(|g| g.is_ipv6()) {
        // IPv6 has no proxy ARP: the host veth itself holds the link-local next hop.
        add_addr(node_ns, Cidr { addr: *gateway, prefix_len: 64 }, &pod.host_veth)?;
    }
    for ip in &pod.ips {
        ip_in(node_ns, &["route", "add", &Cidr::host(*ip).to_string(), "dev", &pod.host_veth])?;
    }
    Ok(())
}

/// `ip addr add`; IPv6 addresses skip duplicate address detection (`nodad`).
fn add_addr(netns: &str, addr: Cidr, dev: &str) -> Result<(), ClusterError> {
    let text = addr.to_string();
    let mut args = vec!["addr", "add", text.as_str(), "dev", dev];
    if addr.addr.is_ipv6() {
        args.push("nodad");
    }
    ip_in(netns, &args).map(drop)
}

/// The plan puts a fabric in every cluster that does not have exactly two nodes.
fn unreachable_layout() -> Result<(), ClusterError> {
    Err(ClusterError::Plan(PlanError::Addressing(
        "a cluster without a fabric must have exactly two nodes".into(),
    )))
}
