//! The outbound decision: where a connection captured from a pod of this node goes, how, and
//! with which labels. One pure [`route`] returns one [`Plan`] (HBONE to another node or a
//! waypoint, same-node delivery with the destination's inbound verdict already taken, or
//! passthrough) or a [`Refused`] saying why; the :15001 listener ([`crate::proxy`]) carries it
//! out and does all the I/O.
//!
//! Istio ztunnel's rules:
//! - The source must be a known workload of this node.
//! - A destination (service VIP, or workload IP) bound to a waypoint goes to the waypoint over
//!   HBONE, with the original destination as the CONNECT authority and the waypoint's identity
//!   expected; unless the source is that waypoint. A service's own waypoint counts for traffic
//!   to its VIP; a workload's for traffic to its IP, and (unlike Istio, which sends a service's
//!   traffic straight to the endpoint it picked) for traffic that picked it through a service
//!   without a waypoint: Weft's destination ztunnel refuses connections that skip a workload's
//!   own waypoint ([`crate::inbound`]), so they must go through it.
//! - A service VIP: the service port maps to a target port, an endpoint is picked round robin
//!   among the service's endpoint candidates ([`ProxyState::endpoint_candidates`]), and the
//!   connection goes over HBONE to `endpointIP:15008` with authority `endpointIP:targetPort` when
//!   the endpoint is in the mesh, else in plain TCP to `endpointIP:targetPort`.
//! - A workload IP in the mesh: HBONE to `podIP:15008`, authority the original destination.
//! - A mesh destination on this node is delivered in process (nothing listens on a captured
//!   pod's :15008), after the destination's inbound check.
//! - Anything else (a workload outside the mesh, an address the mesh does not know): plain TCP
//!   to the original destination.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use weft_core::identity::Identity;
use weft_core::names::HBONE_PORT;
use weft_core::state::{Protocol, ProxyState, Service, Waypoint, WaypointDestination, Workload};
use weft_core::telemetry::{ConnectionLabels, Reporter, ResponseFlags, SecurityPolicy};

use crate::inbound::{self, local_workload, InboundRefusal};

/// How an outbound connection is carried, with the labels its source side reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub source: Arc<Workload>,
    pub carry: Carry,
    /// The source side's metric labels.
    pub labels: ConnectionLabels,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Carry {
    /// HBONE to another node's ztunnel, or to a waypoint (`waypoint`), with the `baggage` that
    /// names the source.
    Tunnel { tunnel: Tunnel, waypoint: bool, baggage: String },
    /// The destination is a mesh pod of this node and its inbound policy allows the source: a
    /// connection from the source pod's address goes straight to `to`, counted by both sides.
    SameNode { to: SocketAddr, destination: Arc<Workload>, inbound_labels: Box<ConnectionLabels> },
    /// Plain TCP from the source pod's address to `to` (a destination outside the mesh).
    Passthrough { to: SocketAddr },
}

/// An outbound connection that is not carried: why, and what to count.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub error: RouteError,
    /// The source-side metric and the flag it closes with (none for an unknown source).
    pub source: Option<Box<(ConnectionLabels, ResponseFlags)>>,
    /// The destination-side metric of a same-node policy refusal.
    pub denied: Option<Box<ConnectionLabels>>,
}

/// Why an outbound connection is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("source {0} is not a workload of this node; only this node's pods are proxied")]
    NotLocalSource(IpAddr),
    #[error(transparent)]
    Destination(#[from] OutboundError),
    #[error("same-node destination refused: {0}")]
    SameNode(InboundRefusal),
}

/// Where an outbound connection goes, before the same-node and labelling steps of [`route`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outbound {
    /// HBONE straight to the destination workload's node.
    Hbone(Tunnel),
    /// HBONE to the destination's waypoint.
    ToWaypoint(Tunnel),
    /// Plain TCP to `to`: the destination is not in the mesh. `destination` is the workload when
    /// the mesh knows it (for metrics).
    Passthrough { to: SocketAddr, destination: Option<Arc<Workload>>, service: Option<Arc<Service>> },
}

/// An HBONE tunnel to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// Where to connect: the endpoint's or the waypoint's IP, port 15008.
    pub connect_to: SocketAddr,
    /// The CONNECT `:authority`: the workload address and port the far side should reach.
    pub authority: SocketAddr,
    /// The identities the peer's certificate may present (any one of them).
    pub expected_identities: Vec<Identity>,
    /// The destination workload, when one is known (not for a service behind a waypoint).
    pub destination: Option<Arc<Workload>>,
    /// The service the connection was addressed to, if any.
    pub service: Option<Arc<Service>>,
}

/// Why an outbound connection cannot be carried; each is refused (closed) by the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutboundError {
    #[error("source {0} is not a known workload: has the controller sent this node's pods?")]
    UnknownSource(IpAddr),
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyEndpoint { service: String, port: u16 },
    #[error("service {service} has no port {port}")]
    UnknownServicePort { service: String, port: u16 },
    #[error("waypoint {waypoint} of {destination} is not known or has no healthy endpoint")]
    WaypointUnavailable { waypoint: String, destination: String },
}

/// Round-robin positions, one per service, shared by all connections of the proxy.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: Mutex<HashMap<String, usize>>,
}

impl RoundRobin {
    /// The next of `n` candidates for the service `key` (0 when there are none).
    pub fn pick(&self, key: &str, n: usize) -> usize {
        // A panic while holding the lock cannot leave a counter invalid: keep using it.
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let counter = next.entry(key.to_owned()).or_default();
        let chosen = *counter % n.max(1);
        *counter = counter.wrapping_add(1);
        chosen
    }
}

/// Where the connection from `source_ip` (which must be a pod of `node`) to `original_dst` goes
/// (see the module docs).
pub fn route(
    state: &ProxyState,
    node: &str,
    source_ip: IpAddr,
    original_dst: SocketAddr,
    rr: &RoundRobin,
) -> Result<Plan, Refused> {
    let source_ip = source_ip.to_canonical();
    let original_dst = SocketAddr::new(original_dst.ip().to_canonical(), original_dst.port());
    let Some(source) = local_workload(state, node, source_ip).cloned() else {
        return Err(Refused { error: RouteError::NotLocalSource(source_ip), source: None, denied: None });
    };
    let outbound = match decide(state, source_ip, original_dst, rr) {
        Ok(outbound) => outbound,
        Err(e) => {
            let mut labels =
                ConnectionLabels::new(Reporter::Source, SecurityPolicy::Unknown).with_source(&source);
            if let OutboundError::NoHealthyEndpoint { service, .. }
            | OutboundError::UnknownServicePort { service, .. } = &e
            {
                if let Some(service) = state.service_by_key(service) {
                    labels = labels.with_destination_service(service);
                }
            }
            return Err(Refused {
                error: e.into(),
                source: Some(Box::new((labels, ResponseFlags::Connect))),
                denied: None,
            });
        }
    };
    let (tunnel, waypoint) = match outbound {
        Outbound::Passthrough { to, destination, service } => {
            // Istio's ztunnel labels plaintext `unknown`.
            let labels =
                source_labels(&source, SecurityPolicy::Unknown, destination.as_deref(), service.as_deref());
            return Ok(Plan { source, carry: Carry::Passthrough { to }, labels });
        }
        Outbound::Hbone(tunnel) => (tunnel, false),
        // A waypoint listens in its own pod (it is not captured): always dial it.
        Outbound::ToWaypoint(tunnel) => (tunnel, true),
    };
    let labels = source_labels(
        &source,
        SecurityPolicy::MutualTls,
        tunnel.destination.as_deref(),
        tunnel.service.as_deref(),
    )
    .with_source_principal(&source.identity);
    let same_node = local_workload(state, node, tunnel.connect_to.ip())
        .filter(|w| w.protocol == Protocol::Hbone && !waypoint);
    let Some(destination) = same_node.cloned() else {
        let baggage = baggage(&source);
        return Ok(Plan { source, carry: Carry::Tunnel { tunnel, waypoint, baggage }, labels });
    };
    let to = tunnel.authority;
    let mut inbound_labels = inbound::labels(
        state,
        SecurityPolicy::MutualTls,
        Some(&source.identity),
        source_ip,
        Some(&destination),
        to.port(),
        None,
    );
    if let Some(service) = &tunnel.service {
        inbound_labels = inbound_labels.with_destination_service(service);
    }
    match inbound::check(state, node, None, Some(&source.identity), source_ip, to) {
        Ok(_) => {
            let inbound_labels = Box::new(inbound_labels);
            Ok(Plan { source, carry: Carry::SameNode { to, destination, inbound_labels }, labels })
        }
        Err(refusal @ InboundRefusal::Denied { .. }) => Err(Refused {
            error: RouteError::SameNode(refusal),
            source: Some(Box::new((labels, ResponseFlags::Deny))),
            denied: Some(Box::new(inbound_labels)),
        }),
        Err(refusal) => Err(Refused {
            error: RouteError::SameNode(refusal),
            source: Some(Box::new((labels, ResponseFlags::Connect))),
            denied: None,
        }),
    }
}

/// The source side's labels of a connection from `source`.
fn source_labels(
    source: &Workload,
    security: SecurityPolicy,
    destination: Option<&Workload>,
    service: Option<&Service>,
) -> ConnectionLabels {
    let mut labels = ConnectionLabels::new(Reporter::Source, security).with_source(source);
    if let Some(destination) = destination {
        labels = labels.with_destination(destination);
    }
    if let Some(service) = service {
        labels = labels.with_destination_service(service);
    }
    labels
}

/// The `baggage` header Istio's ztunnel sends: who the source is, for the far side's metrics.
fn baggage(w: &Workload) -> String {
    let workload = if w.workload_name.is_empty() { &w.name } else { &w.workload_name };
    [
        ("k8s.cluster.name", &w.cluster_id),
        ("k8s.namespace.name", &w.namespace),
        ("k8s.deployment.name", workload),
        ("service.name", &w.canonical_name),
        ("service.version", &w.canonical_revision),
    ]
    .iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| format!("{k}={v}"))
    .collect::<Vec<_>>()
    .join(",")
}

/// Decides where the connection from `source` to `original_dst` goes (see the module docs).
fn decide(
    state: &ProxyState,
    source: IpAddr,
    original_dst: SocketAddr,
    rr: &RoundRobin,
) -> Result<Outbound, OutboundError> {
    let source = state.workload_by_ip(source).ok_or(OutboundError::UnknownSource(source))?;
    let dst_ip = original_dst.ip();

    if let Some(service) = state.service_by_vip(dst_ip) {
        if let Some(waypoint) = service.waypoint.as_ref().filter(|wp| !is_waypoint(state, wp, source)) {
            let tunnel = to_waypoint(state, waypoint, original_dst, rr, &service.hostname)?;
            return Ok(Outbound::ToWaypoint(Tunnel {
                destination: None,
                service: Some(service.clone()),
                ..tunnel
            }));
        }
        return to_service(state, source, service, original_dst, rr);
    }

    let Some(workload) = state.workload_by_ip(dst_ip) else {
        return Ok(Outbound::Passthrough { to: original_dst, destination: None, service: None });
    };
    if let Some(waypoint) = workload.waypoint.as_ref().filter(|wp| !is_waypoint(state, wp, source)) {
        let tunnel = to_waypoint(state, waypoint, original_dst, rr, &workload.uid)?;
        return Ok(Outbound::ToWaypoint(Tunnel { destination: Some(workload.clone()), ..tunnel }));
    }
    match workload.protocol {
        Protocol::Hbone => Ok(Outbound::Hbone(Tunnel {
            connect_to: SocketAddr::new(dst_ip, HBONE_PORT),
            authority: original_dst,
            expected_identities: vec![workload.identity.clone()],
            destination: Some(workload.clone()),
            service: None,
        })),
        Protocol::None => {
            Ok(Outbound::Passthrough { to: original_dst, destination: Some(workload.clone()), service: None })
        }
    }
}

/// A connection to a service VIP, sent to one of its endpoints.
fn to_service(
    state: &ProxyState,
    source: &Workload,
    service: &Arc<Service>,
    original_dst: SocketAddr,
    rr: &RoundRobin,
) -> Result<Outbound, OutboundError> {
    let key = service.key();
    let port = original_dst.port();
    if !service.ports.contains_key(&port) {
        return Err(OutboundError::UnknownServicePort { service: key, port });
    }
    let (endpoint, target_port) = pick_endpoint(state, service, port, rr)
        .ok_or_else(|| OutboundError::NoHealthyEndpoint { service: key.clone(), port })?;
    let Some(ip) = endpoint.address_like(original_dst.ip()) else {
        // Unreachable: pick_endpoint only picks endpoints with an address.
        return Err(OutboundError::NoHealthyEndpoint { service: key, port });
    };
    let authority = SocketAddr::new(ip, target_port);
    // The endpoint's own waypoint (`waypoint-for: workload|all`) takes effect through its
    // Service too (see the module docs: the endpoint refuses connections that skip it).
    if let Some(waypoint) = endpoint.waypoint.as_ref().filter(|wp| !is_waypoint(state, wp, source)) {
        let tunnel = to_waypoint(state, waypoint, authority, rr, &endpoint.uid)?;
        return Ok(Outbound::ToWaypoint(Tunnel {
            destination: Some(endpoint.clone()),
            service: Some(service.clone()),
            ..tunnel
        }));
    }
    match endpoint.protocol {
        Protocol::Hbone => {
            let mut expected_identities = vec![endpoint.identity.clone()];
            for san in &service.subject_alt_names {
                if !expected_identities.contains(san) {
                    expected_identities.push(san.clone());
                }
            }
            Ok(Outbound::Hbone(Tunnel {
                connect_to: SocketAddr::new(ip, HBONE_PORT),
                authority,
                expected_identities,
                destination: Some(endpoint.clone()),
                service: Some(service.clone()),
            }))
        }
        Protocol::None => Ok(Outbound::Passthrough {
            to: authority,
            destination: Some(endpoint.clone()),
            service: Some(service.clone()),
        }),
    }
}

/// An endpoint of `service` for service port `port`, round robin among its candidates, with the
/// target port to reach it on.
fn pick_endpoint(
    state: &ProxyState,
    service: &Service,
    port: u16,
    rr: &RoundRobin,
) -> Option<(Arc<Workload>, u16)> {
    let candidates = state.endpoint_candidates(service, Some(port));
    let chosen = candidates.get(rr.pick(&service.key(), candidates.len()))?;
    Some((Arc::clone(&chosen.workload), chosen.target_port))
}

/// Whether `source` is the waypoint `waypoint` (an endpoint of its service, or at its address).
fn is_waypoint(state: &ProxyState, waypoint: &Waypoint, source: &Workload) -> bool {
    match &waypoint.destination {
        WaypointDestination::Service(key) => source.services.contains_key(key),
        WaypointDestination::Address(addr) => match state.service_by_address(&addr.network, addr.ip) {
            Some(service) => source.services.contains_key(&service.key()),
            None => source.network == addr.network && source.addresses.contains(&addr.ip),
        },
    }
}

/// A tunnel to `waypoint` carrying a connection for `original_dst` (`destination` names it in
/// errors). A waypoint service is load balanced like any service.
fn to_waypoint(
    state: &ProxyState,
    waypoint: &Waypoint,
    original_dst: SocketAddr,
    rr: &RoundRobin,
    destination: &str,
) -> Result<Tunnel, OutboundError> {
    let (name, service) = match &waypoint.destination {
        WaypointDestination::Service(key) => (key.clone(), state.service_by_key(key)),
        WaypointDestination::Address(addr) => {
            (addr.ip.to_string(), state.service_by_address(&addr.network, addr.ip))
        }
    };
    let unavailable =
        || OutboundError::WaypointUnavailable { waypoint: name.clone(), destination: destination.to_owned() };
    // The waypoint's pod, and the address to reach it at.
    let (workload, ip) = match (&waypoint.destination, service) {
        (_, Some(service)) => {
            let candidates = state.endpoint_candidates(service, None);
            let chosen = candidates.get(rr.pick(&service.key(), candidates.len())).ok_or_else(unavailable)?;
            let ip = chosen.workload.address_like(original_dst.ip()).ok_or_else(unavailable)?;
            (Arc::clone(&chosen.workload), ip)
        }
        (WaypointDestination::Address(addr), None) => {
            (Arc::clone(state.workload_by_address(&addr.network, addr.ip).ok_or_else(unavailable)?), addr.ip)
        }
        (WaypointDestination::Service(_), None) => return Err(unavailable()),
    };
    Ok(Tunnel {
        connect_to: SocketAddr::new(ip, waypoint.port),
        authority: original_dst,
        expected_identities: vec![workload.identity.clone()],
        destination: None,
        service: None,
    })
}

#[cfg(test)]
pub(crate) mod tests;
