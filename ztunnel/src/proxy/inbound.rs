//! Inbound: connections for pods of this node, over HBONE (:15008) or in plaintext (:15006).
//! [`crate::inbound::check`] (pure) decides; this connects to the pod from the caller's own
//! address and copies, until the connection ends or a policy update denies it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};
use weft_core::cert_manager::CertificateSource;
use weft_core::hbone::{forward, ConnectInfo, H2Stream, Inbound, Refusal};
use weft_core::telemetry::{ResponseFlags, SecurityPolicy};

use super::connections::Registered;
use super::socket::{self, Counted};
use super::{canonical, closed_by_policy, copy_inbound, Ctx};
use crate::inbound::{check, hbone_source, labels, local_workload, Admitted, InboundRefusal};

/// The HBONE side: certificates per destination pod, and each CONNECT.
pub(super) struct Hbone<S> {
    pub(super) ctx: Arc<Ctx<S>>,
}

/// An accepted CONNECT: the pod connected to, counted into the metrics, and registered for
/// re-checks.
pub(super) struct ToPod {
    upstream: Counted<TcpStream>,
    authority: SocketAddr,
    registered: Registered,
}

impl<S: CertificateSource> Inbound for Hbone<S> {
    type Accepted = ToPod;

    async fn tls_config(&self, local: SocketAddr) -> Result<Arc<rustls::ServerConfig>, String> {
        let ctx = &self.ctx;
        let identity = match local_workload(&ctx.state(), &ctx.node, local.ip()) {
            Some(w) => w.identity.clone(),
            None => {
                let reason = format!("{} is not a workload of node {}", local.ip(), ctx.node);
                info!(%local, "HBONE connection refused: {reason}");
                return Err(reason);
            }
        };
        match ctx.certificate(&identity, &local.to_string()).await {
            Some(cert) => Ok(cert.server_config()),
            None => Err(format!("no certificate of {identity} within {:?}", ctx.options.connect_timeout)),
        }
    }

    async fn accept(&self, info: ConnectInfo) -> Result<ToPod, Refusal> {
        let ctx = &self.ctx;
        let authority = canonical(info.authority);
        let identity = &info.peer_identity;
        let state = ctx.state();
        // The source is the outer connection's peer (or, from the destination's waypoint, the
        // client it forwards); an unknown destination is refused by `check` below.
        let peer = canonical(info.peer_addr);
        let source = match local_workload(&state, &ctx.node, authority.ip()) {
            Some(destination) => hbone_source(&state, identity, peer, &info.forwarded, destination),
            None => Ok(peer),
        };
        let client = match source {
            Ok(client) => client,
            Err(refusal) => {
                warn!(%peer, %identity, %authority, %refusal, traceparent = info.traceparent.as_deref(),
                    "HBONE connection refused");
                return Err(Refusal::bad_request(refusal.to_string()));
            }
        };
        let (checked, labels) = {
            let presented = local_workload(&state, &ctx.node, info.local_addr.ip());
            let checked =
                check(&state, &ctx.node, presented.map(|w| &**w), Some(identity), client.ip(), authority);
            let dst = checked.as_ref().ok().map(|w| &**w).or(presented.map(|w| &**w));
            let labels = labels(
                &state,
                SecurityPolicy::MutualTls,
                Some(identity),
                client.ip(),
                dst,
                authority.port(),
                info.forwarded.host.as_deref(),
            );
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
        let admitted = Admitted { src_identity: Some(identity.clone()), src_ip: client.ip(), dst: authority };
        let registered = ctx.connections.register(admitted, &state);
        drop(state);
        let mut guard = ctx.metrics.connection_opened(labels);
        let timeout = ctx.options.connect_timeout;
        match socket::connect(Some(client.ip()), authority, ctx.options.transparent, timeout).await {
            Ok(stream) => {
                debug!(%client, %authority, workload = %workload.uid, "HBONE connection to the pod opened");
                Ok(ToPod { upstream: Counted::new(stream, guard), authority, registered })
            }
            Err(e) => {
                warn!(%client, %authority, error = %e, "cannot connect to the pod; answering 503");
                guard.set_response_flags(ResponseFlags::Connect);
                Err(Refusal::unavailable(format!("connect {authority}: {e}")))
            }
        }
    }

    /// Copies until the stream ends, or until a policy update denies it: then the stream is
    /// reset (dropped unfinished) and the pod's side closed.
    async fn serve(&self, to_pod: ToPod, tunnel: H2Stream) {
        let ToPod { mut upstream, authority, mut registered } = to_pod;
        let closed = tokio::select! {
            () = forward(tunnel, &mut upstream, authority) => return,
            closed = registered.closed() => closed,
        };
        closed_by_policy(&mut upstream, &closed);
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
    let state = ctx.state();
    let (checked, labels) = {
        let checked = check(&state, &ctx.node, None, None, peer.ip(), dst);
        let dst_workload = local_workload(&state, &ctx.node, dst.ip()).cloned();
        let labels = labels(
            &state,
            SecurityPolicy::Unknown,
            None,
            peer.ip(),
            dst_workload.as_deref(),
            dst.port(),
            None,
        );
        (checked, labels)
    };
    if let Err(refusal) = checked {
        info!(%peer, %dst, %refusal, "plaintext connection refused");
        if matches!(refusal, InboundRefusal::Denied { .. }) {
            ctx.metrics.denied(labels);
        }
        return socket::reset(client);
    }
    if ctx.loops_back(dst) {
        info!(%dst, "plaintext connection to ztunnel's own port refused");
        return socket::reset(client);
    }
    let admitted = Admitted { src_identity: None, src_ip: peer.ip(), dst };
    let registered = ctx.connections.register(admitted, &state);
    drop(state);
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
    copy_inbound(client, Counted::new(upstream, guard), dst, registered).await;
}
