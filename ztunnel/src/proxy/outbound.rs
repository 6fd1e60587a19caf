//! Outbound (:15001): a connection a pod of this node made, captured with its original
//! destination as the local address. [`route`] (pure) says where it goes: HBONE to the
//! destination's node or its waypoint, in-process to a mesh pod of this node (no tunnel: nothing
//! listens on a captured pod's :15008), or plain TCP from the pod's own address.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};
use weft_core::cert_manager::CertificateSource;
use weft_core::hbone::{ClientError, ConnectRequest};

use super::inbound::{self, check, local_workload, InboundRefusal};
use super::socket::{self, Counted};
use super::{canonical, Ctx};
use crate::metrics::{ConnectionLabels, Reporter, ResponseFlags, SecurityPolicy};
use crate::outbound::{decide, Outbound, OutboundError, RoundRobin, Tunnel};
use crate::state::{Protocol, ProxyState, Service, Workload};

/// How an outbound connection is carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// HBONE to another node's ztunnel, or to a waypoint (`waypoint`).
    Tunnel { source: Arc<Workload>, tunnel: Tunnel, waypoint: bool },
    /// The destination is a mesh pod of this node: the inbound checks run in-process, then a
    /// connection from the source pod's address goes straight to `to`.
    SameNode {
        source: Arc<Workload>,
        to: SocketAddr,
        destination: Arc<Workload>,
        service: Option<Arc<Service>>,
    },
    /// Plain TCP from the source pod's address to `to` (a destination outside the mesh).
    Passthrough {
        source: Arc<Workload>,
        to: SocketAddr,
        destination: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
}

/// Why an outbound connection is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("source {0} is not a workload of this node; only this node's pods are proxied")]
    NotLocalSource(IpAddr),
    #[error(transparent)]
    Decide(#[from] OutboundError),
}

/// What to do with one connection, decided under the state lock.
enum Step {
    Refuse {
        reason: String,
        /// The source-side metric, with the flag it closes with (none for an unknown source).
        source: Option<Box<(ConnectionLabels, ResponseFlags)>>,
        /// The destination-side metric of a same-node policy refusal.
        denied: Option<Box<ConnectionLabels>>,
    },
    Tunnel {
        identity: weft_core::identity::Identity,
        tunnel: Tunnel,
        baggage: String,
        labels: Box<ConnectionLabels>,
    },
    Connect {
        to: SocketAddr,
        labels: Vec<ConnectionLabels>,
    },
}

/// Where the connection from `source_ip` (which must be a pod of `node`) to `original_dst` goes.
pub fn route(
    state: &ProxyState,
    node: &str,
    source_ip: IpAddr,
    original_dst: SocketAddr,
    rr: &RoundRobin,
) -> Result<Plan, RouteError> {
    let source_ip = source_ip.to_canonical();
    let original_dst = canonical(original_dst);
    let source =
        local_workload(state, node, source_ip).cloned().ok_or(RouteError::NotLocalSource(source_ip))?;
    Ok(match decide(state, source_ip, original_dst, rr)? {
        Outbound::Hbone(tunnel) => {
            let same_node = local_workload(state, node, tunnel.connect_to.ip())
                .filter(|w| w.protocol == Protocol::Hbone)
                .cloned();
            match same_node {
                Some(destination) => Plan::SameNode {
                    source,
                    to: tunnel.authority,
                    destination,
                    service: tunnel.service.clone(),
                },
                None => Plan::Tunnel { source, tunnel, waypoint: false },
            }
        }
        // A waypoint listens in its own pod (it is not captured): always dial it.
        Outbound::ToWaypoint(tunnel) => Plan::Tunnel { source, tunnel, waypoint: true },
        Outbound::Passthrough { to, destination, service } => {
            Plan::Passthrough { source, to, destination, service }
        }
    })
}

/// Serves one captured outbound connection.
pub(super) async fn handle<S: CertificateSource>(ctx: Arc<Ctx<S>>, client: TcpStream, peer: SocketAddr) {
    let dst = match client.local_addr() {
        Ok(addr) => canonical(addr),
        Err(e) => return debug!(error = %e, "connection gone before it was handled"),
    };
    let step = {
        let state = ctx.state();
        prepare(&state, &ctx.node, &ctx.rr, peer, dst)
    };
    match step {
        Step::Refuse { reason, source, denied } => {
            info!(%dst, %reason, "outbound connection refused");
            if let Some((labels, flags)) = source.map(|b| *b) {
                ctx.metrics.connection_opened(labels).set_response_flags(flags);
            }
            if let Some(labels) = denied {
                ctx.metrics.denied(*labels);
            }
            socket::reset(client);
        }
        Step::Connect { to, .. } if ctx.loops_back(to) => {
            info!(%dst, %to, "outbound connection to ztunnel's own port refused");
            socket::reset(client);
        }
        Step::Connect { to, labels } => {
            let mut guards: Vec<_> = labels.into_iter().map(|l| ctx.metrics.connection_opened(l)).collect();
            let timeout = ctx.options.connect_timeout;
            match socket::connect(Some(peer.ip()), to, ctx.options.transparent, timeout).await {
                Ok(upstream) => {
                    let mut guards = guards.into_iter();
                    let Some(first) = guards.next() else { return };
                    let upstream = guards.fold(Counted::new(upstream, first), Counted::also);
                    inbound::proxy(client, upstream, to).await;
                }
                Err(e) => {
                    warn!(%dst, %to, error = %e, "outbound connect failed");
                    guards.iter_mut().for_each(|g| g.set_response_flags(ResponseFlags::Connect));
                    socket::reset(client);
                }
            }
        }
        Step::Tunnel { identity, tunnel, baggage, labels } => {
            let mut guard = ctx.metrics.connection_opened(*labels);
            let timeout = ctx.options.connect_timeout;
            let certificate = match tokio::time::timeout(timeout, ctx.certs.get(&identity)).await {
                Ok(Ok(cert)) => cert,
                Ok(Err(e)) => {
                    warn!(%dst, %identity, error = %e, "no certificate for the source workload");
                    guard.set_response_flags(ResponseFlags::Connect);
                    return socket::reset(client);
                }
                Err(_) => {
                    warn!(%dst, %identity, "certificate of the source workload not ready within {timeout:?}");
                    guard.set_response_flags(ResponseFlags::Connect);
                    return socket::reset(client);
                }
            };
            let request = ConnectRequest {
                certificate,
                expected: tunnel.expected_identities.clone(),
                source_ip: None,
                hbone_addr: tunnel.connect_to,
                authority: tunnel.authority,
                forwarded_for: Some(peer),
                baggage: Some(baggage),
                traceparent: None,
            };
            match ctx.pool.connect(request).await {
                Ok(stream) => {
                    debug!(%dst, via = %tunnel.connect_to, authority = %tunnel.authority, "HBONE tunnel opened");
                    inbound::proxy(client, Counted::new(stream, guard), dst).await;
                }
                Err(e) => {
                    let flags = match &e {
                        ClientError::Status { status, .. } if *status == http::StatusCode::UNAUTHORIZED => {
                            ResponseFlags::Deny
                        }
                        _ => ResponseFlags::Connect,
                    };
                    warn!(%dst, via = %tunnel.connect_to, error = %e, "HBONE tunnel failed");
                    guard.set_response_flags(flags);
                    socket::reset(client);
                }
            }
        }
    }
}

fn prepare(state: &ProxyState, node: &str, rr: &RoundRobin, peer: SocketAddr, dst: SocketAddr) -> Step {
    let plan = match route(state, node, peer.ip(), dst, rr) {
        Ok(plan) => plan,
        Err(e @ RouteError::NotLocalSource(_)) => {
            return Step::Refuse { reason: e.to_string(), source: None, denied: None }
        }
        Err(RouteError::Decide(e)) => {
            let mut labels = ConnectionLabels::new(Reporter::Source, SecurityPolicy::Unknown);
            if let Some(source) = state.workload_by_ip(peer.ip()) {
                labels = labels.with_source(source);
            }
            if let OutboundError::NoHealthyEndpoint { service, .. }
            | OutboundError::UnknownServicePort { service, .. } = &e
            {
                if let Some(service) = state.service_by_key(service) {
                    labels = labels.with_destination_service(service);
                }
            }
            return Step::Refuse {
                reason: e.to_string(),
                source: Some(Box::new((labels, ResponseFlags::Connect))),
                denied: None,
            };
        }
    };
    match plan {
        Plan::Tunnel { source, tunnel, .. } => {
            let mut labels = ConnectionLabels::new(Reporter::Source, SecurityPolicy::MutualTls)
                .with_source(&source)
                .with_source_principal(&source.identity);
            if let Some(destination) = &tunnel.destination {
                labels = labels.with_destination(destination);
            }
            if let Some(service) = &tunnel.service {
                labels = labels.with_destination_service(service);
            }
            Step::Tunnel {
                identity: source.identity.clone(),
                baggage: baggage(&source),
                tunnel,
                labels: Box::new(labels),
            }
        }
        Plan::SameNode { source, to, destination, service } => {
            let mut outbound = ConnectionLabels::new(Reporter::Source, SecurityPolicy::MutualTls)
                .with_source(&source)
                .with_source_principal(&source.identity)
                .with_destination(&destination);
            let mut inbound = inbound::labels(
                state,
                SecurityPolicy::MutualTls,
                Some(&source.identity),
                peer.ip(),
                Some(&destination),
                to.port(),
            );
            if let Some(service) = &service {
                outbound = outbound.with_destination_service(service);
                inbound = inbound.with_destination_service(service);
            }
            match check(state, node, None, Some(&source.identity), peer.ip(), to) {
                Ok(_) => Step::Connect { to, labels: vec![outbound, inbound] },
                Err(refusal @ InboundRefusal::Denied { .. }) => Step::Refuse {
                    reason: refusal.to_string(),
                    source: Some(Box::new((outbound, ResponseFlags::Deny))),
                    denied: Some(Box::new(inbound)),
                },
                Err(refusal) => Step::Refuse {
                    reason: refusal.to_string(),
                    source: Some(Box::new((outbound, ResponseFlags::Connect))),
                    denied: None,
                },
            }
        }
        Plan::Passthrough { source, to, destination, service } => {
            // Istio's ztunnel labels plaintext `unknown`.
            let mut labels =
                ConnectionLabels::new(Reporter::Source, SecurityPolicy::Unknown).with_source(&source);
            if let Some(destination) = &destination {
                labels = labels.with_destination(destination);
            }
            if let Some(service) = &service {
                labels = labels.with_destination_service(service);
            }
            Step::Connect { to, labels: vec![labels] }
        }
    }
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
