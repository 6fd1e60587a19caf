//! The local cluster's plan: every namespace, interface and address, computed from the cluster
//! name, its nodes and its pods. Pure: no syscalls, no commands; the same input gives the same
//! plan (pods are numbered in (namespace, name) order, not input order).
//!
//! Addressing (IPv4 always; IPv6 beside it when the spec asks for dual stack; every list of
//! addresses is per family, IPv4 first):
//! - node `i` (0-based): netns `weft-<cluster>-<node>`, uplink `eth0` with `172.30.0.<i+1>/24`
//!   (`fd30::<i+1>/64`), pod CIDR `10.10.<i+1>.0/24` (`fd10:10:0:<i+1>::/64`); two nodes share
//!   one veth, one or more than two hang off a bridge `br0` in `weft-<cluster>-fabric`.
//! - pod: netns `weft-<cluster>-pod-<namespace>-<name>`, `eth0` with a /32 (/128) from its
//!   node's CIDR (`.2` upwards; `.1` stays free for the node), on-link default route via
//!   `169.254.1.1`, which the node holds (link scope, on `lo`) and answers ARP for (IPv6: via
//!   `fe80::1`, held by the pod's host veth).
//! - the pod's veth on the node is `wf<8 hex digits>` (FNV-1a of cluster, namespace, name).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Names of the nodes when none are given.
pub const DEFAULT_NODES: [&str; 2] = ["node-a", "node-b"];
/// Every cluster namespace's name starts with this, then the cluster name and a `-`.
pub const NETNS_PREFIX: &str = "weft-";
/// Longest cluster name: keeps namespace names short enough to type.
pub const MAX_CLUSTER_NAME: usize = 16;
/// The node's uplink interface inside its namespace, and the pod's interface inside its own.
pub const UPLINK: &str = "eth0";
/// The pod's interface inside its namespace.
pub const POD_IFACE: &str = "eth0";
/// The bridge in the fabric namespace (clusters of one or more than two nodes).
pub const FABRIC_BRIDGE: &str = "br0";
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;
/// Longest file name, and so network namespace name (`/run/netns/<name>`).
const MAX_NETNS_NAME: usize = 255;

/// What the cluster should hold: its name, nodes and pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// `[a-z0-9]`, 1 to 16 characters (no `-`: it separates the parts of namespace names).
    pub name: String,
    /// Node names, DNS labels; order decides their addresses.
    pub nodes: Vec<String>,
    pub pods: Vec<PodSpec>,
    /// IPv4 ranges.
    pub addressing: Addressing,
    /// IPv6 ranges for dual stack (off by default; [`Addressing::default_v6`] is a choice).
    pub ipv6: Option<Addressing>,
}

/// A pod to place on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub node: String,
}

/// The address ranges the plan carves up. The defaults are the documented ones; they only ever
/// live inside the cluster's namespaces, so they cannot clash with the host's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addressing {
    /// The network between nodes; node `i` gets host `i + 1`.
    pub node_link: Cidr,
    /// Split into one `pod_prefix_len` CIDR per node; node `i` gets subnet `i + 1`.
    pub pod_supernet: Cidr,
    pub pod_prefix_len: u8,
    /// The pods' next hop. IPv4: an address every node holds on `lo` (link scope) and answers
    /// ARP for. IPv6: a link-local address every pod's host veth holds.
    pub gateway: IpAddr,
}

/// An address with a prefix length, IPv4 or IPv6; written `10.10.1.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// Every name and address of a cluster. Serialized into the cluster's state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub cluster: String,
    /// `weft-<cluster>-`: every namespace of the cluster, and only those, starts with it.
    pub netns_prefix: String,
    /// The pods' next hop per address family (IPv4 first), as in [`Addressing::gateway`].
    pub gateways: Vec<IpAddr>,
    pub nodes: Vec<NodePlan>,
    /// Sorted by (node order, namespace, name).
    pub pods: Vec<PodPlan>,
    /// The bridge namespace, for clusters of one or more than two nodes.
    pub fabric: Option<FabricPlan>,
}

/// One node: a namespace with an uplink to the other nodes and a veth per pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub name: String,
    pub netns: String,
    /// The uplink's name inside the node namespace (`eth0`).
    pub uplink: String,
    /// The uplink's addresses, one per family (IPv4 first), e.g. `172.30.0.1/24`.
    pub link_addrs: Vec<Cidr>,
    /// The node's pod CIDRs, one per family (IPv4 first), e.g. `10.10.1.0/24`.
    pub pod_cidrs: Vec<Cidr>,
}

/// One pod: a namespace whose `eth0` is a veth to its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPlan {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub netns: String,
    /// The pod's addresses, one per family (IPv4 first; each a /32 or /128 on `iface`).
    pub ips: Vec<IpAddr>,
    /// The pod's interface inside its namespace (`eth0`).
    pub iface: String,
    /// The veth's end in the node namespace: where the node routes the pod's IPs, and where
    /// tc programs attach.
    pub host_veth: String,
}

/// The bridge joining the nodes' uplinks when there are not exactly two nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FabricPlan {
    pub netns: String,
    pub bridge: String,
    /// The bridge port of each node's uplink, in node order.
    pub ports: Vec<String>,
}

/// Why a spec has no plan.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "cluster name {0:?} is not allowed: use 1 to {MAX_CLUSTER_NAME} characters of a-z and 0-9 \
         ('-' would make `weft down` of one cluster match another's namespaces)"
    )]
    ClusterName(String),
    #[error("{what} name {name:?} is not a DNS label (1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-')")]
    NotDnsLabel { what: &'static str, name: String },
    #[error("node name {0:?} is reserved: it would clash with the cluster's fabric or pod namespace names")]
    ReservedNodeName(String),
    #[error("a cluster needs at least one node")]
    NoNodes,
    #[error("node {0:?} is listed twice")]
    DuplicateNode(String),
    #[error("pod {namespace}/{name} is placed on node {node:?}, which is not one of the cluster's nodes ({known})")]
    UnknownNode { namespace: String, name: String, node: String, known: String },
    #[error("pod {namespace}/{name} is listed twice")]
    DuplicatePod { namespace: String, name: String },
    #[error("pods {first} and {second} would share the network namespace {netns:?}; rename one")]
    NetnsClash { first: String, second: String, netns: String },
    #[error("network namespace name {0:?} is longer than {MAX_NETNS_NAME} characters")]
    NetnsTooLong(String),
    #[error("node {node:?} has {pods} pods but its pod CIDR {cidr} holds only {capacity}")]
    TooManyPods { node: String, pods: usize, cidr: Cidr, capacity: u128 },
    #[error("{nodes} nodes do not fit: the node link {link} and pod supernet {supernet} (split into /{prefix_len}) hold at most {capacity}")]
    TooManyNodes { nodes: usize, link: Cidr, supernet: Cidr, prefix_len: u8, capacity: u128 },
    #[error("addressing: {0}")]
    Addressing(String),
    #[error("could not give every veth of node {0:?} a distinct name")]
    VethNames(String),
}

/// A CIDR string that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an address/prefix-length (e.g. 10.10.0.0/16 or fd00::/48)")]
pub struct CidrParseError(String);

impl ClusterSpec {
    /// A cluster with the default nodes and no pods.
    pub fn new(name: impl Into<String>) -> Self {
        ClusterSpec {
            name: name.into(),
            nodes: DEFAULT_NODES.iter().map(|n| n.to_string()).collect(),
            pods: Vec::new(),
            addressing: Addressing::default(),
            ipv6: None,
        }
    }

    /// Adds a pod (builder style).
    pub fn pod(mut self, namespace: &str, name: &str, node: &str) -> Self {
        self.pods.push(PodSpec { name: name.into(), namespace: namespace.into(), node: node.into() });
        self
    }

    /// Turns dual stack on with [`Addressing::default_v6`] (builder style).
    pub fn dual_stack(mut self) -> Self {
        self.ipv6 = Some(Addressing::default_v6());
        self
    }

    /// The address families' ranges, IPv4 first.
    pub fn families(&self) -> Vec<&Addressing> {
        std::iter::once(&self.addressing).chain(&self.ipv6).collect()
    }

    /// Computes the plan, or says what is wrong with the spec.
    pub fn plan(&self) -> Result<Plan, PlanError> {
        Plan::new(self)
    }
}

impl Default for Addressing {
    fn default() -> Self {
        Addressing {
            node_link: Cidr { addr: IpAddr::V4(Ipv4Addr::new(172, 30, 0, 0)), prefix_len: 24 },
            pod_supernet: Cidr { addr: IpAddr::V4(Ipv4Addr::new(10, 10, 0, 0)), prefix_len: 16 },
            pod_prefix_len: 24,
            gateway: IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1)),
        }
    }
}

impl Addressing {
    /// IPv6 ranges: node link `fd30::/64`, pod CIDRs `fd10:10:0:<i+1>::/64`, gateway `fe80::1`.
    pub fn default_v6() -> Self {
        Addressing {
            node_link: Cidr { addr: IpAddr::V6(Ipv6Addr::new(0xfd30, 0, 0, 0, 0, 0, 0, 0)), prefix_len: 64 },
            pod_supernet: Cidr {
                addr: IpAddr::V6(Ipv6Addr::new(0xfd10, 0x10, 0, 0, 0, 0, 0, 0)),
                prefix_len: 48,
            },
            pod_prefix_len: 64,
            gateway: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
        }
    }
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        (prefix_len <= Self::max_len(addr)).then_some(Cidr { addr, prefix_len })
    }

    fn max_len(addr: IpAddr) -> u8 {
        match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    fn bits(self) -> u8 {
        Self::max_len(self.addr)
    }

    fn to_u128(addr: IpAddr) -> u128 {
        match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        }
    }

    fn from_u128(like: IpAddr, value: u128) -> IpAddr {
        match like {
            // The value was built below 2^32 for IPv4 (base + offset within a /0..=/32).
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX))),
            IpAddr::V6(_) => IpAddr::V6(value.into()),
        }
    }

    /// Number of addresses in the block (saturating at `u128::MAX` for a v6 /0).
    pub fn size(self) -> u128 {
        1u128.checked_shl(u32::from(self.bits() - self.prefix_len)).unwrap_or(u128::MAX)
    }

    /// The first address of the block (host bits cleared).
    pub fn network(self) -> IpAddr {
        let host_mask = self.size().wrapping_sub(1);
        Self::from_u128(self.addr, Self::to_u128(self.addr) & !host_mask)
    }

    /// The `n`th address of the block (0 is the network address), if it is inside.
    pub fn nth(self, n: u128) -> Option<IpAddr> {
        (n < self.size()).then(|| Self::from_u128(self.addr, Self::to_u128(self.network()) + n))
    }

    /// Address `n` with this block's prefix length, e.g. `172.30.0.1/24`.
    pub fn nth_with_len(self, n: u128) -> Option<Cidr> {
        self.nth(n).map(|addr| Cidr { addr, prefix_len: self.prefix_len })
    }

    /// The `index`th sub-block of length `len`, if it is inside.
    pub fn subnet(self, len: u8, index: u128) -> Option<Cidr> {
        if len < self.prefix_len || len > self.bits() {
            return None;
        }
        let count = 1u128.checked_shl(u32::from(len - self.prefix_len))?;
        let step = 1u128.checked_shl(u32::from(self.bits() - len))?;
        (index < count).then(|| Cidr {
            addr: Self::from_u128(self.addr, Self::to_u128(self.network()) + index * step),
            prefix_len: len,
        })
    }

    /// A single address: /32 or /128.
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr { addr, prefix_len: Self::max_len(addr) }
    }

    pub fn contains(self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.addr.is_ipv4()
            && Self::to_u128(addr) & !self.size().wrapping_sub(1) == Self::to_u128(self.network())
    }

    /// Usable pod addresses: `.2` to the last but one (the network address, `.1` for the
    /// node, and the v4 broadcast stay free).
    fn pod_capacity(self) -> u128 {
        self.size().saturating_sub(3)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = CidrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrParseError(s.to_string());
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        Cidr::new(addr, len).ok_or_else(bad)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Plan {
    /// Checks the spec and computes every name and address.
    pub fn new(spec: &ClusterSpec) -> Result<Plan, PlanError> {
        check_cluster_name(&spec.name)?;
        let families = spec.families();
        if !spec.addressing.pod_supernet.addr.is_ipv4()
            || spec.ipv6.as_ref().is_some_and(|a| a.pod_supernet.addr.is_ipv4())
        {
            return Err(PlanError::Addressing("`addressing` must be IPv4 and `ipv6` IPv6".into()));
        }
        for addressing in &families {
            check_addressing(addressing)?;
        }
        if spec.nodes.is_empty() {
            return Err(PlanError::NoNodes);
        }
        let prefix = netns_prefix(&spec.name);

        // Nodes, in the given order.
        for a in &families {
            let (link, supernet) = (a.node_link, a.pod_supernet);
            let subnets =
                1u128.checked_shl(u32::from(a.pod_prefix_len - supernet.prefix_len)).unwrap_or(u128::MAX);
            let capacity = link.pod_capacity().saturating_add(1).min(subnets.saturating_sub(1));
            if spec.nodes.len() as u128 > capacity {
                return Err(PlanError::TooManyNodes {
                    nodes: spec.nodes.len(),
                    link,
                    supernet,
                    prefix_len: a.pod_prefix_len,
                    capacity,
                });
            }
        }
        let mut nodes = Vec::with_capacity(spec.nodes.len());
        let mut seen = BTreeSet::new();
        for (i, name) in spec.nodes.iter().enumerate() {
            check_dns_label("node", name)?;
            if name == "fabric" || name == "pod" || name.starts_with("pod-") {
                return Err(PlanError::ReservedNodeName(name.clone()));
            }
            if !seen.insert(name.as_str()) {
                return Err(PlanError::DuplicateNode(name.clone()));
            }
            let i = i as u128;
            let too_many = || PlanError::Addressing(format!("no room for node {name}"));
            nodes.push(NodePlan {
                name: name.clone(),
                netns: checked_netns(format!("{prefix}{name}"))?,
                uplink: UPLINK.to_string(),
                link_addrs: families
                    .iter()
                    .map(|a| a.node_link.nth_with_len(i + 1))
                    .collect::<Option<_>>()
                    .ok_or_else(too_many)?,
                pod_cidrs: families
                    .iter()
                    .map(|a| a.pod_supernet.subnet(a.pod_prefix_len, i + 1))
                    .collect::<Option<_>>()
                    .ok_or_else(too_many)?,
            });
        }

        // Pods, grouped by node and ordered by (namespace, name) within a node.
        let mut by_node: BTreeMap<&str, BTreeMap<(&str, &str), &PodSpec>> = BTreeMap::new();
        let mut seen_pods = BTreeSet::new();
        for pod in &spec.pods {
            check_dns_label("namespace", &pod.namespace)?;
            check_dns_label("pod", &pod.name)?;
            if !seen.contains(pod.node.as_str()) {
                return Err(PlanError::UnknownNode {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    node: pod.node.clone(),
                    known: spec.nodes.join(", "),
                });
            }
            if !seen_pods.insert((pod.namespace.as_str(), pod.name.as_str())) {
                return Err(PlanError::DuplicatePod {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                });
            }
            by_node.entry(&pod.node).or_default().insert((&pod.namespace, &pod.name), pod);
        }
        let mut pods = Vec::with_capacity(spec.pods.len());
        let mut netns_owner: BTreeMap<String, String> = BTreeMap::new();
        for node in &nodes {
            let Some(node_pods) = by_node.get(node.name.as_str()) else { continue };
            for cidr in &node.pod_cidrs {
                if node_pods.len() as u128 > cidr.pod_capacity() {
                    return Err(PlanError::TooManyPods {
                        node: node.name.clone(),
                        pods: node_pods.len(),
                        cidr: *cidr,
                        capacity: cidr.pod_capacity(),
                    });
                }
            }
            let mut veths = BTreeSet::new();
            for (n, pod) in node_pods.values().enumerate() {
                let full = format!("{}/{}", pod.namespace, pod.name);
                let netns = checked_netns(format!("{prefix}pod-{}-{}", pod.namespace, pod.name))?;
                if let Some(first) = netns_owner.insert(netns.clone(), full.clone()) {
                    return Err(PlanError::NetnsClash { first, second: full, netns });
                }
                let ips = node
                    .pod_cidrs
                    .iter()
                    .map(|c| c.nth(n as u128 + 2))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| PlanError::Addressing(format!("no address left for pod {full}")))?;
                let host_veth = (0u32..64)
                    .map(|salt| veth_name(&format!("{}/{full}/{salt}", spec.name)))
                    .find(|name| !veths.contains(name))
                    .ok_or_else(|| PlanError::VethNames(node.name.clone()))?;
                veths.insert(host_veth.clone());
                pods.push(PodPlan {
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    node: node.name.clone(),
                    netns,
                    ips,
                    iface: POD_IFACE.to_string(),
                    host_veth,
                });
            }
        }

        let fabric = (nodes.len() != 2).then(|| FabricPlan {
            netns: format!("{prefix}fabric"),
            bridge: FABRIC_BRIDGE.to_string(),
            ports: nodes.iter().map(|n| veth_name(&format!("{}/node/{}", spec.name, n.name))).collect(),
        });
        if let Some(f) = &fabric {
            if f.ports.iter().collect::<BTreeSet<_>>().len() != f.ports.len() {
                return Err(PlanError::VethNames("fabric".into()));
            }
        }

        Ok(Plan {
            cluster: spec.name.clone(),
            netns_prefix: prefix,
            gateways: families.iter().map(|a| a.gateway).collect(),
            nodes,
            pods,
            fabric,
        })
    }

    pub fn node(&self, name: &str) -> Option<&NodePlan> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodPlan> {
        self.pods.iter().find(|p| p.namespace == namespace && p.name == name)
    }

    /// Places one more pod on `node` in a planned cluster, without moving the others: the node's
    /// first free addresses and a veth name no other pod of the node has. Returns its plan.
    pub fn add_pod(&mut self, namespace: &str, name: &str, node: &str) -> Result<PodPlan, PlanError> {
        check_dns_label("namespace", namespace)?;
        check_dns_label("pod", name)?;
        if self.pod(namespace, name).is_some() {
            return Err(PlanError::DuplicatePod { namespace: namespace.into(), name: name.into() });
        }
        let node_plan = self.node(node).ok_or_else(|| PlanError::UnknownNode {
            namespace: namespace.into(),
            name: name.into(),
            node: node.into(),
            known: self.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>().join(", "),
        })?;
        let full = format!("{namespace}/{name}");
        let netns = checked_netns(format!("{}pod-{namespace}-{name}", self.netns_prefix))?;
        if self.pods.iter().any(|p| p.netns == netns) {
            return Err(PlanError::NetnsClash { first: full.clone(), second: full, netns });
        }
        let used: BTreeSet<IpAddr> = self.pods_on(node).flat_map(|p| p.ips.iter().copied()).collect();
        let mut ips = Vec::new();
        for cidr in &node_plan.pod_cidrs {
            let ip = (2..cidr.size().min(1 << 16))
                .filter_map(|n| cidr.nth(n))
                .find(|ip| !used.contains(ip))
                .ok_or_else(|| PlanError::Addressing(format!("no address left for pod {full}")))?;
            ips.push(ip);
        }
        let veths: BTreeSet<&str> = self.pods_on(node).map(|p| p.host_veth.as_str()).collect();
        let host_veth = (0u32..64)
            .map(|salt| veth_name(&format!("{}/{full}/{salt}", self.cluster)))
            .find(|v| !veths.contains(v.as_str()))
            .ok_or_else(|| PlanError::VethNames(node.into()))?;
        let pod = PodPlan {
            name: name.into(),
            namespace: namespace.into(),
            node: node.into(),
            netns,
            ips,
            iface: POD_IFACE.to_string(),
            host_veth,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Takes a pod out of the plan; returns it, if it was there.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Option<PodPlan> {
        let i = self.pods.iter().position(|p| p.namespace == namespace && p.name == name)?;
        Some(self.pods.remove(i))
    }

    /// The pods placed on `node`.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a PodPlan> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }

    /// Every namespace the cluster consists of: fabric, nodes, pods.
    pub fn netns_names(&self) -> Vec<String> {
        self.fabric
            .iter()
            .map(|f| f.netns.clone())
            .chain(self.nodes.iter().map(|n| n.netns.clone()))
            .chain(self.pods.iter().map(|p| p.netns.clone()))
            .collect()
    }
}

impl NodePlan {
    /// The uplink's IPv4 address.
    pub fn link_ipv4(&self) -> Option<Ipv4Addr> {
        self.link_addrs.iter().find_map(|c| match c.addr {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
    }
}

impl PodPlan {
    /// The pod's IPv4 address (every pod has one).
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    }

    /// The pod's IPv6 address, when the cluster is dual stack.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
    }
}

/// `weft-<cluster>-`, after checking the cluster name.
pub fn netns_prefix(cluster: &str) -> String {
    format!("{NETNS_PREFIX}{cluster}-")
}

/// Cluster names: `[a-z0-9]{1,16}`. No `-`, so that the prefix `weft-<name>-` of one cluster
/// is never a prefix of another's namespaces.
pub fn check_cluster_name(name: &str) -> Result<(), PlanError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CLUSTER_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(PlanError::ClusterName(name.to_string()))
    }
}

fn check_dns_label(what: &'static str, name: &str) -> Result<(), PlanError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(PlanError::NotDnsLabel { what, name: name.to_string() })
    }
}

fn check_addressing(a: &Addressing) -> Result<(), PlanError> {
    let family = |c: Cidr| c.addr.is_ipv4();
    if family(a.node_link) != family(a.pod_supernet) || a.gateway.is_ipv4() != family(a.pod_supernet) {
        return Err(PlanError::Addressing(
            "node link, pod supernet and gateway must be of one address family".into(),
        ));
    }
    if a.pod_prefix_len < a.pod_supernet.prefix_len || a.pod_prefix_len > a.pod_supernet.bits() {
        return Err(PlanError::Addressing(format!(
            "pod prefix length /{} does not fit in the pod supernet {}",
            a.pod_prefix_len, a.pod_supernet
        )));
    }
    if let IpAddr::V6(gw) = a.gateway {
        if !gw.is_unicast_link_local() {
            return Err(PlanError::Addressing(format!("IPv6 gateway {gw} must be link-local (fe80::/10)")));
        }
    }
    if a.pod_supernet.contains(a.gateway) || a.node_link.contains(a.gateway) {
        return Err(PlanError::Addressing(format!(
            "gateway {} must lie outside the pod supernet and the node link",
            a.gateway
        )));
    }
    Ok(())
}

fn checked_netns(name: String) -> Result<String, PlanError> {
    if name.len() > MAX_NETNS_NAME {
        Err(PlanError::NetnsTooLong(name))
    } else {
        Ok(name)
    }
}

/// `wf` + 8 hex digits of the FNV-1a hash of `key`: stable across builds and Rust versions.
fn veth_name(key: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let name = format!("wf{hash:08x}");
    debug_assert!(name.len() <= MAX_IFNAME);
    name
}

#[cfg(test)]
mod tests;
