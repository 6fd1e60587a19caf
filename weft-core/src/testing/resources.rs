//! Builders of the controller's xDS resources (`istio.workload.Address`,
//! `istio.security.Authorization`) for tests, shaped as `controller::translate` produces them.

use std::net::IpAddr;

use crate::proto::istio::security::{
    self, string_match::MatchType, Authorization, Group, Match, Rules, StringMatch,
};
use crate::proto::istio::workload::{
    address, gateway_address, Address, GatewayAddress, NamespacedHostname, NetworkAddress, Port, PortList,
    Service, TunnelProtocol, Workload, WorkloadStatus,
};

use crate::state::ProxyState;

pub const CLUSTER: &str = "Kubernetes";

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test addresses are valid")
}

pub fn bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

pub fn uid(ns: &str, name: &str) -> String {
    format!("{CLUSTER}//Pod/{ns}/{name}")
}

pub fn hostname(ns: &str, name: &str) -> String {
    format!("{name}.{ns}.svc.cluster.local")
}

/// `ns/hostname` of the service `name`.
pub fn service_key(ns: &str, name: &str) -> String {
    format!("{ns}/{}", hostname(ns, name))
}

/// A healthy mesh pod with service account `name`.
pub fn workload(ns: &str, name: &str, addr: &str) -> Workload {
    Workload {
        uid: uid(ns, name),
        name: name.into(),
        namespace: ns.into(),
        addresses: vec![bytes(ip(addr))],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        trust_domain: "cluster.local".into(),
        service_account: name.into(),
        node: "node-a".into(),
        canonical_name: name.into(),
        canonical_revision: "latest".into(),
        workload_name: name.into(),
        status: WorkloadStatus::Healthy as i32,
        cluster_id: CLUSTER.into(),
        ..Default::default()
    }
}

/// `w` as an endpoint of service `ns/name` with `(service port, target port)`s.
pub fn endpoint_of(mut w: Workload, ns: &str, name: &str, ports: &[(u32, u32)]) -> Workload {
    let ports = ports.iter().map(|&(service_port, target_port)| Port { service_port, target_port }).collect();
    w.services.insert(service_key(ns, name), PortList { ports });
    w
}

pub fn service(ns: &str, name: &str, vip: &str, ports: &[(u32, u32)]) -> Service {
    Service {
        name: name.into(),
        namespace: ns.into(),
        hostname: hostname(ns, name),
        addresses: vec![NetworkAddress { network: String::new(), address: bytes(ip(vip)) }],
        ports: ports.iter().map(|&(service_port, target_port)| Port { service_port, target_port }).collect(),
        ..Default::default()
    }
}

/// The controller's waypoint reference: the waypoint's service by hostname, port 15008.
pub fn waypoint(ns: &str, name: &str) -> Option<GatewayAddress> {
    Some(GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: ns.into(),
            hostname: hostname(ns, name),
        })),
        hbone_mtls_port: u32::from(crate::names::HBONE_PORT),
    })
}

pub fn add_workload(state: &mut ProxyState, w: Workload) {
    let name = w.uid.clone();
    state
        .apply_address(&name, Address { r#type: Some(address::Type::Workload(w)) })
        .expect("the test workload is valid");
}

pub fn add_service(state: &mut ProxyState, s: Service) {
    let name = format!("{}/{}", s.namespace, s.hostname);
    state
        .apply_address(&name, Address { r#type: Some(address::Type::Service(s)) })
        .expect("the test service is valid");
}

pub fn add_policy(state: &mut ProxyState, a: Authorization) {
    let name = format!("{}/{}", a.namespace, a.name);
    state.apply_authorization(&name, a).expect("the test policy is valid");
}

pub fn exact(s: &str) -> StringMatch {
    StringMatch { match_type: Some(MatchType::Exact(s.into())) }
}

pub fn presence() -> StringMatch {
    StringMatch { match_type: Some(MatchType::Presence(())) }
}

/// A CIDR as the controller sends it.
pub fn cidr(s: &str) -> security::Address {
    let (addr, len) = s.split_once('/').expect("a CIDR has a slash");
    security::Address { address: bytes(ip(addr)), length: len.parse().expect("a CIDR length is a number") }
}

/// A policy with one group per entry of `groups`, each group's clauses given as lists of matches.
pub fn policy(
    ns: &str,
    name: &str,
    scope: security::Scope,
    action: security::Action,
    groups: Vec<Vec<Vec<Match>>>,
) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: scope as i32,
        action: action as i32,
        groups: groups
            .into_iter()
            .map(|clauses| Group { rules: clauses.into_iter().map(|matches| Rules { matches }).collect() })
            .collect(),
    }
}
