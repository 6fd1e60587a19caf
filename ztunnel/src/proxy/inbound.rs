//! Inbound: connections for pods of this node, over HBONE (:15008) or in plaintext (:15006),
//! and same-node connections handed over by the outbound side. One pure check
//! ([`check`]: the destination is a workload of this node, and policy allows the caller), then a
//! connect to the pod from the caller's own address.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};
use weft_core::cert_manager::CertificateSource;
use weft_core::hbone::{copy_bidirectional, ConnectInfo, Inbound, Refusal};
use weft_core::identity::Identity;

use super::socket::{self, Counted};
use super::{canonical, Ctx};
use crate::metrics::{ConnectionLabels, Reporter, ResponseFlags, SecurityPolicy};
use crate::policy::{authorize, Connection, Verdict};
use crate::state::{ProxyState, Service, Workload};

/// Why an inbound connection is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InboundRefusal {
    #[error("{0} is not a workload of this node: is the controller's view of the node current?")]
    NotLocal(IpAddr),
    #[error("the tunnel was opened to {presented} but asks for {requested}")]
    WrongDestination { presented: String, requested: String },
    #[error("denied by {}: {reason}", policy.as_deref().unwrap_or("policy"))]
    Denied { policy: Option<String>, reason: String },
}

/// The HBONE side: certificates per destination pod, and each CONNECT.
pub(super) struct Hbone<S> {
    pub(super) ctx: Arc<Ctx<S>>,
}

/// Whether `src` may reach `dst` (a workload address and port on this node `node`). For HBONE,
/// `presented` is the workload whose certificate the tunnel was opened with: the destination
/// must be that workload. Returns the destination workload.
pub fn check(
    state: &ProxyState,
    node: &str,
    presented: Option<&Workload>,
    src_identity: Option<&Identity>,
    src_ip: IpAddr,
    dst: SocketAddr,
) -> Result<Arc<Workload>, InboundRefusal> {
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let workload = local_workload(state, node, dst.ip()).ok_or(InboundRefusal::NotLocal(dst.ip()))?;
    if let Some(presented) = presented {
        if presented.uid != workload.uid {
            return Err(InboundRefusal::WrongDestination {
                presented: presented.uid.clone(),
                requested: workload.uid.clone(),
            });
        }
    }
    let connection = Connection { src_identity: src_identity.cloned(), src_ip: src_ip.to_canonical(), dst };
    match authorize(state, &connection) {
        Verdict::Allow => Ok(workload.clone()),
        Verdict::Deny { policy, reason } => Err(InboundRefusal::Denied { policy, reason }),
    }
}

/// The workload at `ip` if it runs on `node`.
pub(super) fn local_workload<'s>(state: &'s ProxyState, node: &str, ip: IpAddr) -> Option<&'s Arc<Workload>> {
    state.workload_by_ip(ip.to_canonical()).filter(|w| w.node == node)
}

/// The labels of an inbound connection as the destination reports it. The destination service
/// is guessed as Istio's ztunnel does (the tunnel carries only the pod's address): the one service
/// of the destination workload whose target port is the port connected to, if exactly one is.
pub(super) fn labels(
    state: &ProxyState,
    security: SecurityPolicy,
    src_identity: Option<&Identity>,
    src_ip: IpAddr,
    dst: Option<&Workload>,
    dst_port: u16,
) -> ConnectionLabels {
    let mut labels = ConnectionLabels::new(Reporter::Destination, security);
    if let Some(source) = state.workload_by_ip(src_ip.to_canonical()) {
        labels = labels.with_source(source);
    }
    if let Some(identity) = src_identity {
        labels = labels.with_source_principal(identity);
    }
    if let Some(dst) = dst {
        labels = labels.with_destination(dst);
        if let Some(service) = inbound_service(state, dst, dst_port) {
            labels = labels.with_destination_service(service);
        }
    }
    labels
}

/// The service a connection to `port` of `workload` was most likely sent to: the only one of its
/// services with that target port (none when there are several or none).
fn inbound_service<'s>(state: &'s ProxyState, workload: &Workload, port: u16) -> Option<&'s Arc<Service>> {
    let mut matching = workload
        .services
        .iter()
        .filter(|(_, ports)| ports.values().any(|target| *target == port))
        .filter_map(|(key, _)| state.service_by_key(key));
    let first = matching.next()?;
    matching.next().is_none().then_some(first)
}

impl<S: CertificateSource> Inbound for Hbone<S> {
    type Upstream = Counted<TcpStream>;

    async fn tls_config(&self, local: SocketAddr) -> Result<Arc<rustls::ServerConfig>, String> {
        let ctx = &self.ctx;
        let identity = {
            let state = ctx.state();
            match local_workload(&state, &ctx.node, local.ip()) {
                Some(w) => w.identity.clone(),
                None => {
                    let reason = format!("{} is not a workload of node {}", local.ip(), ctx.node);
                    info!(%local, "HBONE connection refused: {reason}");
                    return Err(reason);
                }
            }
        };
        match tokio::time::timeout(ctx.options.connect_timeout, ctx.certs.get(&identity)).await {
            Ok(Ok(cert)) => Ok(cert.server_config()),
            Ok(Err(e)) => {
                warn!(%identity, error = %e, "no certificate to present on {local}");
                Err(format!("certificate of {identity}: {e}"))
            }
            Err(_) => {
                warn!(%identity, "certificate for {local} not ready in time");
                Err(format!("certificate of {identity} not ready within {:?}", ctx.options.connect_timeout))
            }
        }
    }

    async fn connect(&self, info: ConnectInfo) -> Result<Counted<TcpStream>, Refusal> {
        let ctx = &self.ctx;
        let client = canonical(info.forwarded_for.unwrap_or(info.peer_addr));
        let authority = canonical(info.authority);
        let identity = &info.peer_identity;
        let (checked, labels) = {
            let state = ctx.state();
            let presented = local_workload(&state, &ctx.node, info.local_addr.ip());
            let checked =
                check(&state, &ctx.node, presented.map(|w| &**w), Some(identity), client.ip(), authority);
            let labels = {
                let dst = checked.as_ref().ok().map(|w| &**w).or(presented.map(|w| &**w));
                labels(&state, SecurityPolicy::MutualTls, Some(identity), client.ip(), dst, authority.port())
            };
            (checked, labels)
        };
        let workload = match checked {
            Ok(workload) => workload,
            Err(refusal @ InboundRefusal::Denied { .. }) => {
                info!(%client, %identity, %authority, %refusal, "HBONE connection denied");
                ctx.metrics.denied(labels);
                return Err(Refusal::denied(refusal.to_string()));
            }
            Err(refusal) => {
                info!(%client, %identity, %authority, %refusal, "HBONE connection refused");
                return Err(Refusal::bad_request(refusal.to_string()));
            }
        };
        let mut guard = ctx.metrics.connection_opened(labels);
        let timeout = ctx.options.connect_timeout;
        match socket::connect(Some(client.ip()), authority, ctx.options.transparent, timeout).await {
            Ok(stream) => {
                debug!(%client, %authority, workload = %workload.uid, "HBONE connection to the pod opened");
                Ok(Counted::new(stream, guard))
            }
            Err(e) => {
                warn!(%client, %authority, error = %e, "cannot connect to the pod; answering 503");
                guard.set_response_flags(ResponseFlags::Connect);
                Err(Refusal::unavailable(format!("connect {authority}: {e}")))
            }
        }
    }
}

/// A plaintext connection captured for a pod of this node (:15006).
pub(super) async fn handle_plain<S: CertificateSource>(
    ctx: Arc<Ctx<S>>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let dst = match client.local_addr() {
        Ok(addr) => canonical(addr),
        Err(e) => return debug!(error = %e, "connection gone before it was handled"),
    };
    let (checked, labels) = {
        let state = ctx.state();
        let checked = check(&state, &ctx.node, None, None, peer.ip(), dst);
        let dst_workload = local_workload(&state, &ctx.node, dst.ip()).cloned();
        let labels =
            labels(&state, SecurityPolicy::Unknown, None, peer.ip(), dst_workload.as_deref(), dst.port());
        (checked, labels)
    };
    if let Err(refusal) = checked {
        info!(%dst, %refusal, "plaintext connection refused");
        if matches!(refusal, InboundRefusal::Denied { .. }) {
            ctx.metrics.denied(labels);
        }
        return socket::reset(client);
    }
    if ctx.loops_back(dst) {
        info!(%dst, "plaintext connection to ztunnel's own port refused");
        return socket::reset(client);
    }
    let mut guard = ctx.metrics.connection_opened(labels);
    let timeout = ctx.options.connect_timeout;
    let upstream = match socket::connect(Some(peer.ip()), dst, ctx.options.transparent, timeout).await {
        Ok(upstream) => upstream,
        Err(e) => {
            warn!(%dst, error = %e, "cannot connect to the pod");
            guard.set_response_flags(ResponseFlags::Connect);
            return socket::reset(client);
        }
    };
    proxy(client, Counted::new(upstream, guard), dst).await;
}

/// Copies both ways until both sides are done, and logs the outcome.
pub(super) async fn proxy<U>(mut client: TcpStream, mut upstream: U, dst: SocketAddr)
where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = client.set_nodelay(true);
    let started = std::time::Instant::now();
    match copy_bidirectional(&mut client, &mut upstream).await {
        Ok((received, sent)) => {
            info!(%dst, received, sent, duration = ?started.elapsed(), "connection complete")
        }
        Err(e) => info!(%dst, error = %e, duration = ?started.elapsed(), "connection ended with an error"),
    }
}
