//! The model as Istio's workload API: pure functions from [`Model`] objects to the `Workload`,
//! `Service` and `Authorization` messages a ztunnel consumes, with Istio's naming and semantics,
//! and [`snapshot`] gathering them for the xDS server. No I/O and no knowledge of how resources
//! are served or who receives them (that is [`crate::xds`]'s business).
//!
//! Every proxy receives every `Address` and `Authorization` ([`MeshView`]), as Istio sends them: a
//! ztunnel routes to workloads and services on every node, so it needs remote ones too. A
//! waypoint's L7 configuration ([`waypoint`]) goes to that waypoint alone.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use tracing::warn;
use weft_config::kube::{Pod, Service as KubeService, ServicePort};
use weft_config::meta::Labels;
use weft_config::security::{parse_ip_block, parse_port, AuthorizationAction, AuthorizationPolicy, Rule};
use weft_config::types::IntOrString;
use weft_config::Object;
use weft_core::proto::istio::security::{
    self, string_match::MatchType, Authorization, Group, Match, Rules, ServiceAccountMatch, StringMatch,
};
use weft_core::proto::istio::workload::{
    address, gateway_address, Address, GatewayAddress, NamespacedHostname, NetworkAddress, NetworkMode, Port,
    PortList, Service, TunnelProtocol, Workload, WorkloadStatus, WorkloadType,
};

pub mod mtls;
pub mod waypoint;

use crate::model::{Model, WaypointFor, WaypointRef, NONE, USE_WAYPOINT, USE_WAYPOINT_NAMESPACE};
use crate::xds::{NodeInfo, Snapshot, View, XdsResource, WAYPOINT_NAME_KEY, WAYPOINT_TYPE_URL};

/// Istio's root namespace: policies there without a selector apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = weft_core::names::ROOT_NAMESPACE;
/// The cluster id Istio uses when none is configured.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// The cluster's DNS domain, the suffix of service hostnames.
pub const DOMAIN_SUFFIX: &str = weft_core::names::DEFAULT_DOMAIN_SUFFIX;
/// The port a waypoint accepts HBONE on.
pub const HBONE_PORT: u32 = weft_core::names::HBONE_PORT as u32;

/// Labels a workload's canonical name is read from, first present wins (else the pod's name).
const CANONICAL_NAME_LABELS: [&str; 3] = ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"];
/// Labels a workload's canonical revision is read from, first present wins (else `latest`).
const CANONICAL_REVISION_LABELS: [&str; 3] =
    ["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"];

/// Who gets what (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct MeshView;

/// The view the controller serves.
pub fn view() -> MeshView {
    MeshView
}

impl View for MeshView {
    fn select<'s>(&self, snapshot: &'s Snapshot, node: &NodeInfo, type_url: &str) -> Vec<&'s XdsResource> {
        if type_url != WAYPOINT_TYPE_URL {
            return snapshot.resources(type_url).collect();
        }
        let Some(name) = node.metadata.get(WAYPOINT_NAME_KEY) else { return Vec::new() };
        let own = format!("{}/{name}", node.pod_namespace);
        snapshot.get(type_url, &own).into_iter().collect()
    }
}

/// Everything the model yields for proxies: one `Address` per pod with an IP and per Service,
/// one `Authorization` per L4-expressible ALLOW/DENY policy, one `Waypoint` per waypoint Gateway. The snapshot's version is a digest of
/// its resources' names and versions, so the same model always gives the same version.
pub fn snapshot(model: &Model, trust_domain: &str, cluster_id: &str) -> Snapshot {
    let index = Index::of(model);
    let l7 = waypoint::L7Index::of(model);
    let mut resources = Vec::new();
    for object in model.objects() {
        let resource = match object {
            Object::Pod(pod) => match workload_indexed(model, &index, pod, trust_domain, cluster_id) {
                Some(w) => XdsResource::address(&Address { r#type: Some(address::Type::Workload(w)) }),
                None => continue,
            },
            Object::Service(svc) => match service(model, svc) {
                Some(s) => XdsResource::address(&Address { r#type: Some(address::Type::Service(s)) }),
                None => continue,
            },
            Object::AuthorizationPolicy(policy) => match authorization(policy) {
                Some(a) => XdsResource::authorization(&a),
                None => continue,
            },
            Object::KubeGateway(gw) if gw.is_waypoint() => {
                Ok(XdsResource::waypoint(&waypoint::waypoint_indexed(&l7, gw, trust_domain)))
            }
            _ => continue,
        };
        match resource {
            Ok(resource) => resources.push(resource),
            Err(e) => warn!(error = %e, "resource left out of the xDS snapshot"),
        }
    }
    for policy in index.mtls.authorizations(model) {
        match XdsResource::authorization(&policy) {
            Ok(resource) => resources.push(resource),
            Err(e) => warn!(error = %e, "resource left out of the xDS snapshot"),
        }
    }
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for r in &resources {
        digest.update(r.type_url().as_bytes());
        digest.update(r.name().as_bytes());
        digest.update(r.version().as_bytes());
    }
    let version: String = digest.finish().as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    resources.into_iter().fold(Snapshot::new(version), Snapshot::with)
}

/// The `Workload` of a pod with at least one IP, in the mesh or not (a ztunnel needs to know
/// non-mesh pods too, to send them plaintext: `tunnel_protocol` NONE).
///
/// Its `services` give each selecting Service's ports with the target port resolved for this pod
/// ([`workload_ports`]): a named `targetPort` becomes the number of the pod's container port of
/// that name, and a port the pod does not name is left out, so the pod is no endpoint of it.
///
/// Simplification against Istio: `workload_name` is the pod's name (Istio derives the owning
/// Deployment's).
pub fn workload(model: &Model, pod: &Pod, trust_domain: &str, cluster_id: &str) -> Option<Workload> {
    workload_indexed(model, &Index::of(model), pod, trust_domain, cluster_id)
}

/// [`workload`] with the model's [`Index`] computed once (by [`snapshot`], for every pod).
fn workload_indexed(
    model: &Model,
    index: &Index<'_>,
    pod: &Pod,
    trust_domain: &str,
    cluster_id: &str,
) -> Option<Workload> {
    let meta = &pod.metadata;
    let addresses: Vec<Vec<u8>> = pod
        .ips()
        .into_iter()
        // One that is not an IP is left out (`weft_config::not_enforced` reports it).
        .filter_map(|ip| ip.parse::<IpAddr>().ok().map(ip_bytes))
        .collect();
    if addresses.is_empty() {
        return None;
    }
    let in_mesh = model.in_mesh(pod);
    let labels = &meta.labels;
    let first_label =
        |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).filter(|v| !v.is_empty()).cloned();
    Some(Workload {
        uid: format!("{cluster_id}//Pod/{}/{}", meta.namespace, meta.name),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        addresses,
        network: String::new(),
        tunnel_protocol: if in_mesh { TunnelProtocol::Hbone } else { TunnelProtocol::None } as i32,
        trust_domain: trust_domain.to_owned(),
        service_account: pod.service_account().to_owned(),
        waypoint: workload_waypoint(model, pod).filter(|_| in_mesh).map(|wp| gateway(&wp)),
        node: pod.spec.node_name.clone().unwrap_or_default(),
        canonical_name: first_label(&CANONICAL_NAME_LABELS).unwrap_or_else(|| meta.name.clone()),
        canonical_revision: first_label(&CANONICAL_REVISION_LABELS).unwrap_or_else(|| "latest".to_owned()),
        workload_type: WorkloadType::Pod as i32,
        workload_name: meta.name.clone(),
        services: services_of(index, pod),
        authorization_policies: policies_of(index, pod),
        status: if pod.status.phase.as_deref() == Some("Running") {
            WorkloadStatus::Healthy
        } else {
            WorkloadStatus::Unhealthy
        } as i32,
        cluster_id: cluster_id.to_owned(),
        network_mode: if pod.spec.host_network { NetworkMode::HostNetwork } else { NetworkMode::Standard }
            as i32,
        ..Default::default()
    })
}

/// The `Service` of a Kubernetes Service (not of an `ExternalName` one, which has no addresses
/// and no endpoints). Headless Services are kept, without addresses. Its waypoint comes from its
/// own `istio.io/use-waypoint` label, else its namespace's.
pub fn service(model: &Model, svc: &KubeService) -> Option<Service> {
    if svc.spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let meta = &svc.metadata;
    let addresses = svc
        .cluster_ips()
        .into_iter()
        // One that is not an IP is left out (`weft_config::not_enforced` reports it).
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| NetworkAddress { network: String::new(), address: ip_bytes(ip) })
        .collect();
    Some(Service {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        hostname: hostname(&meta.name, &meta.namespace),
        addresses,
        ports: service_ports(svc),
        subject_alt_names: Vec::new(),
        waypoint: service_waypoint(model, svc).map(|wp| gateway(&wp)),
        ..Default::default()
    })
}

/// The ztunnel form of an AuthorizationPolicy, or `None` when ztunnel cannot enforce it: AUDIT
/// and CUSTOM actions, and policies bound by `targetRef(s)` (a waypoint's).
///
/// Rules with L7 fields (methods, paths, hosts, request principals, remote IPs, `when`) fail
/// closed, as Istio converts them: an ALLOW rule is dropped (it allows nothing), a DENY rule is
/// enforced without them ([`Rule::without_l7`]: it denies more). Nothing is logged here: what
/// that means for each policy is said once by `weft_config::not_enforced`, which the controller
/// logs ([`crate::unenforced`]) and `weft analyze` prints.
pub fn authorization(policy: &AuthorizationPolicy) -> Option<Authorization> {
    convert(policy).ok()
}

/// [`authorization`], saying why a policy is not for ztunnel.
fn convert(policy: &AuthorizationPolicy) -> Result<Authorization, String> {
    let meta = &policy.metadata;
    let spec = &policy.spec;
    let action = match spec.action {
        AuthorizationAction::Allow => security::Action::Allow,
        AuthorizationAction::Deny => security::Action::Deny,
        AuthorizationAction::Audit | AuthorizationAction::Custom => {
            return Err("AUDIT and CUSTOM actions are not enforced by ztunnel".to_owned())
        }
    };
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return Err("a policy with targetRef(s) is enforced by the waypoint it targets".to_owned());
    }
    let scope = match (&spec.selector, meta.namespace.as_str()) {
        (Some(_), _) => security::Scope::WorkloadSelector,
        (None, ROOT_NAMESPACE) => security::Scope::Global,
        (None, _) => security::Scope::Namespace,
    };
    // An ALLOW rule ztunnel cannot evaluate (L7 fields, malformed ports or CIDRs) is dropped; a
    // DENY rule loses its L7 fields, and one still malformed denies everything in scope (a group
    // without rules matches every connection).
    let mut groups = Vec::new();
    for rule in &spec.rules {
        match (group(rule, &meta.namespace), action) {
            (Ok(group), _) => groups.push(group),
            (Err(_), security::Action::Allow) => {}
            (Err(_), _) => groups.push(group(&rule.without_l7(), &meta.namespace).unwrap_or_default()),
        }
    }
    Ok(Authorization {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        scope: scope as i32,
        action: action as i32,
        groups,
    })
}

/// One rule as Istio converts it: the `to` matches and the `from` matches each become one `Rules`
/// (their matches OR'd), and the group requires both (an empty rule: no `Rules`, matches all).
/// An error when the rule has L7 fields or a malformed port or CIDR.
fn group(rule: &Rule, namespace: &str) -> Result<Group, String> {
    if let Some(field) = rule.l7_fields().first() {
        return Err(format!("{field} is L7 (a waypoint's)"));
    }
    let mut to = Vec::new();
    for t in &rule.to {
        let op = &t.operation;
        to.push(Match {
            destination_ports: ports(&op.ports)?,
            not_destination_ports: ports(&op.not_ports)?,
            ..Default::default()
        });
    }
    let mut from = Vec::new();
    for f in &rule.from {
        let s = &f.source;
        from.push(Match {
            namespaces: string_matches(&s.namespaces, false),
            not_namespaces: string_matches(&s.not_namespaces, false),
            service_accounts: service_accounts(&s.service_accounts, namespace),
            not_service_accounts: service_accounts(&s.not_service_accounts, namespace),
            principals: string_matches(&s.principals, true),
            not_principals: string_matches(&s.not_principals, true),
            source_ips: ip_blocks(&s.ip_blocks)?,
            not_source_ips: ip_blocks(&s.not_ip_blocks)?,
            ..Default::default()
        });
    }
    let rules = [to, from].into_iter().filter(|m| !m.is_empty()).map(|matches| Rules { matches }).collect();
    Ok(Group { rules })
}

/// Istio's string forms: `*` is presence, `*x` a suffix, `x*` a prefix, else exact. Principals
/// lose a leading `spiffe://`: ztunnel compares them with identities written without it.
fn string_matches(values: &[String], principal: bool) -> Vec<StringMatch> {
    values
        .iter()
        .map(|v| {
            let v = if principal { v.strip_prefix("spiffe://").unwrap_or(v) } else { v.as_str() };
            let match_type = if v == "*" {
                MatchType::Presence(())
            } else if let Some(suffix) = v.strip_prefix('*') {
                MatchType::Suffix(suffix.to_owned())
            } else if let Some(prefix) = v.strip_suffix('*') {
                MatchType::Prefix(prefix.to_owned())
            } else {
                MatchType::Exact(v.to_owned())
            };
            StringMatch { match_type: Some(match_type) }
        })
        .collect()
}

/// `serviceAccounts` entries: `ns/sa`, or `sa` in the policy's namespace.
fn service_accounts(values: &[String], namespace: &str) -> Vec<ServiceAccountMatch> {
    values
        .iter()
        .map(|v| {
            let (ns, sa) = v.split_once('/').unwrap_or((namespace, v));
            ServiceAccountMatch { namespace: ns.to_owned(), service_account: sa.to_owned() }
        })
        .collect()
}

/// CIDRs (or single IPs) as address plus prefix length.
fn ip_blocks(values: &[String]) -> Result<Vec<security::Address>, String> {
    values
        .iter()
        .map(|v| match parse_ip_block(v) {
            Some((ip, length)) => Ok(security::Address { address: ip_bytes(ip), length: u32::from(length) }),
            None => Err(format!("ipBlock {v:?} is not an IP or CIDR")),
        })
        .collect()
}

fn ports(values: &[String]) -> Result<Vec<u32>, String> {
    values
        .iter()
        .map(|p| parse_port(p).map(u32::from).ok_or_else(|| format!("port {p:?} is not a port number")))
        .collect()
}

/// What [`workload`] looks up for each pod, grouped by namespace once per model rather than
/// found by scanning every object for every pod: the Services with a non-empty selector, and the
/// AuthorizationPolicies ztunnel enforces, each in the model's order.
struct Index<'m> {
    services: HashMap<&'m str, Vec<&'m KubeService>>,
    policies: HashMap<&'m str, Vec<&'m AuthorizationPolicy>>,
    mtls: mtls::PeerAuthentications<'m>,
}

impl<'m> Index<'m> {
    fn of(model: &'m Model) -> Index<'m> {
        let mut index = Index {
            services: HashMap::new(),
            policies: HashMap::new(),
            mtls: mtls::PeerAuthentications::of(model),
        };
        for object in model.objects() {
            match object {
                Object::Service(svc) if svc.spec.selector.as_ref().is_some_and(|sel| !sel.is_empty()) => {
                    index.services.entry(svc.metadata.namespace.as_str()).or_default().push(svc);
                }
                Object::AuthorizationPolicy(p) if convert(p).is_ok() => {
                    index.policies.entry(p.metadata.namespace.as_str()).or_default().push(p);
                }
                _ => {}
            }
        }
        index
    }

    /// The entries of `map` for `namespace` (none if absent).
    fn in_namespace<'a, T>(map: &'a HashMap<&str, Vec<T>>, namespace: &str) -> &'a [T] {
        map.get(namespace).map_or(&[], Vec::as_slice)
    }
}

/// `namespace/hostname` -> ports ([`workload_ports`]), for the Services in the pod's namespace
/// whose selector matches its labels. A Service without a selector (or with an empty one) selects
/// no pod.
fn services_of(index: &Index<'_>, pod: &Pod) -> BTreeMap<String, PortList> {
    Index::in_namespace(&index.services, &pod.metadata.namespace)
        .iter()
        .filter(|svc| svc.spec.selector.as_ref().is_some_and(|sel| selects(sel, &pod.metadata.labels)))
        .map(|svc| {
            let key = format!(
                "{}/{}",
                svc.metadata.namespace,
                hostname(&svc.metadata.name, &svc.metadata.namespace)
            );
            (key, PortList { ports: workload_ports(svc, pod) })
        })
        .collect()
}

/// `namespace/name` of the policies ztunnel enforces on `pod`: those selecting it (in its
/// namespace, or in the root namespace for every namespace), its namespace's and the mesh-wide
/// ones, in the model's order (by namespace, then name); then its PeerAuthentication's
/// ([`mtls`]). Istio lists only the selector policies
/// and ztunnel finds the others by scope; listing them as well changes nothing, as a policy's
/// verdict does not depend on how often it is found.
fn policies_of(index: &Index<'_>, pod: &Pod) -> Vec<String> {
    let ns = pod.metadata.namespace.as_str();
    let mut namespaces = vec![ns];
    if ns != ROOT_NAMESPACE {
        namespaces.push(ROOT_NAMESPACE);
        namespaces.sort_unstable();
    }
    namespaces
        .into_iter()
        .flat_map(|ns| Index::in_namespace(&index.policies, ns))
        .filter(|p| p.spec.selector.as_ref().is_none_or(|sel| sel.matches(&pod.metadata.labels)))
        .map(|p| format!("{}/{}", p.metadata.namespace, p.metadata.name))
        .chain(index.mtls.policies_of(pod))
        .collect()
}

/// A Service's ports as its `Service` resource carries them: numeric `targetPort`s as given,
/// absent ones as the port, named ones as 0 (Istio's "resolved per endpoint": each workload's
/// [`workload_ports`] gives the number).
fn service_ports(svc: &KubeService) -> Vec<Port> {
    svc.spec
        .ports
        .iter()
        .map(|p| Port {
            service_port: u32::from(p.port),
            target_port: target_port(p, |_| Some(0)).unwrap_or(0),
        })
        .collect()
}

/// A Service's ports as one selected pod serves them, for the pod's `Workload.services`: as
/// [`service_ports`], but a named `targetPort` resolved to the pod's TCP container port of that
/// name ([`Pod::container_port`]), and left out when the pod has none, as Istio does (and as
/// Kubernetes leaves such a pod out of the port's endpoints), so no proxy sends that port's
/// traffic to this pod.
fn workload_ports(svc: &KubeService, pod: &Pod) -> Vec<Port> {
    svc.spec
        .ports
        .iter()
        .filter_map(|p| {
            let target_port = target_port(p, |name| pod.container_port(name).map(u32::from))?;
            Some(Port { service_port: u32::from(p.port), target_port })
        })
        .collect()
}

/// The target port of `port`: the port itself when absent, the number when numeric, `named`'s
/// answer when a name (`None`: nothing serves it).
fn target_port(port: &ServicePort, named: impl FnOnce(&str) -> Option<u32>) -> Option<u32> {
    match &port.target_port {
        None => Some(u32::from(port.port)),
        Some(IntOrString::Int(n)) => Some(u32::try_from(*n).unwrap_or(0)),
        Some(IntOrString::String(name)) => named(name),
    }
}

/// The waypoint of a Service: its own `istio.io/use-waypoint` label (`none` opts out), else its
/// namespace's; only if that waypoint's Gateway exists and takes service traffic
/// (`istio.io/waypoint-for` `service`, the default, or `all`), as Istio binds them
/// ([`Model::waypoint_for`]).
pub(crate) fn service_waypoint(model: &Model, svc: &KubeService) -> Option<WaypointRef> {
    let ns = &svc.metadata.namespace;
    waypoint_label(&svc.metadata.labels, ns)
        .unwrap_or_else(|| model.namespace(ns).and_then(|n| waypoint_label(&n.metadata.labels, ns)).flatten())
        .filter(|wp| model.waypoint_for(wp).is_some_and(WaypointFor::takes_services))
}

/// The waypoint of a pod's own traffic: the pod's `istio.io/use-waypoint`, else its namespace's
/// ([`Model::pod_waypoint`]); only if that waypoint's Gateway exists and takes workload traffic
/// (`istio.io/waypoint-for` `workload` or `all`), as Istio binds them.
pub(crate) fn workload_waypoint(model: &Model, pod: &Pod) -> Option<WaypointRef> {
    model.pod_waypoint(pod).filter(|wp| model.waypoint_for(wp).is_some_and(WaypointFor::takes_workloads))
}

/// `None` when the labels name no waypoint, `Some(None)` for an explicit `none`.
fn waypoint_label(labels: &Labels, namespace: &str) -> Option<Option<WaypointRef>> {
    let name = labels.get(USE_WAYPOINT)?;
    if name == NONE || name.is_empty() {
        return Some(None);
    }
    let namespace = labels.get(USE_WAYPOINT_NAMESPACE).cloned().unwrap_or_else(|| namespace.to_owned());
    Some(Some(WaypointRef { namespace, name: name.clone() }))
}

fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn gateway(wp: &WaypointRef) -> GatewayAddress {
    GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: wp.namespace.clone(),
            hostname: hostname(&wp.name, &wp.namespace),
        })),
        hbone_mtls_port: HBONE_PORT,
    }
}

pub(crate) fn hostname(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{DOMAIN_SUFFIX}")
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod waypoint_tests;
