//! The outbound decision: where a connection captured from a local pod goes, and how. Pure:
//! the caller (the :15001 listener) checks that the source is a pod of this node, then carries
//! out the [`Outbound`] it gets; nothing here does I/O.
//!
//! Istio ztunnel's rules:
//! - The source must be a known workload.
//! - A destination (service VIP, or workload IP) bound to a waypoint goes to the waypoint over
//!   HBONE, with the original destination as the CONNECT authority and the waypoint's identity
//!   expected; unless the source is that waypoint. A service's own waypoint counts for traffic
//!   to its VIP; a workload's for traffic to its IP (a service endpoint's waypoint does not
//!   apply to traffic that chose it through the service, as in Istio).
//! - A service VIP: the service port maps to a target port, an endpoint is picked round robin
//!   among the healthy ones (all of them with `health_policy: ALLOW_ALL`), and the connection
//!   goes over HBONE to `endpointIP:15008` with authority `endpointIP:targetPort` when the
//!   endpoint is in the mesh, else in plain TCP to `endpointIP:targetPort`.
//! - A workload IP in the mesh: HBONE to `podIP:15008`, authority the original destination.
//! - Anything else (a workload outside the mesh, an address the mesh does not know): plain TCP
//!   to the original destination.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use weft_core::identity::Identity;

use crate::state::{Protocol, ProxyState, Service, Waypoint, WaypointDestination, Workload};

/// The port ztunnels (and waypoints) accept HBONE on.
pub const HBONE_PORT: u16 = 15008;

/// What to do with an outbound connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outbound {
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
    /// The next of `n` candidates (`n > 0`) for the service `key`.
    pub fn pick(&self, key: &str, n: usize) -> usize {
        // A panic while holding the lock cannot leave a counter invalid: keep using it.
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let counter = next.entry(key.to_owned()).or_default();
        let chosen = *counter % n.max(1);
        *counter = counter.wrapping_add(1);
        chosen
    }
}

/// Decides where the connection from `source` to `original_dst` goes (see the module docs).
pub fn decide(
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
        return to_service(state, service, original_dst, rr);
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

/// An endpoint of `service` for service port `port`, round robin among the healthy ones with an
/// address and a known target port, with that target port. The endpoint's own mapping wins over
/// the service's (a named target port is 0 in the service and resolved per endpoint).
fn pick_endpoint<'s>(
    state: &'s ProxyState,
    service: &Service,
    port: u16,
    rr: &RoundRobin,
) -> Option<(&'s Arc<Workload>, u16)> {
    let key = service.key();
    let service_target = service.ports.get(&port).copied().unwrap_or(0);
    let candidates: Vec<(&Arc<Workload>, u16)> = state
        .endpoints(&key)
        .into_iter()
        .filter(|w| (w.healthy || service.allow_unhealthy) && !w.addresses.is_empty())
        .filter_map(|w| {
            let own = w.services.get(&key).and_then(|ports| ports.get(&port)).copied().unwrap_or(0);
            let target = if own != 0 { own } else { service_target };
            (target != 0).then_some((w, target))
        })
        .collect();
    if candidates.is_empty() {
        return None;
    }
    Some(candidates[rr.pick(&key, candidates.len())])
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
            let candidates: Vec<&Arc<Workload>> = state
                .endpoints(&service.key())
                .into_iter()
                .filter(|w| (w.healthy || service.allow_unhealthy) && !w.addresses.is_empty())
                .collect();
            if candidates.is_empty() {
                return Err(unavailable());
            }
            let workload = candidates[rr.pick(&service.key(), candidates.len())];
            (workload, workload.address_like(original_dst.ip()).ok_or_else(unavailable)?)
        }
        (WaypointDestination::Address(addr), None) => {
            (state.workload_by_address(&addr.network, addr.ip).ok_or_else(unavailable)?, addr.ip)
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
mod tests;
