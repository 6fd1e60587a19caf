//! Outbound (:15001): a connection a pod of this node made, captured with its original
//! destination as the local address. [`crate::outbound::route`] (pure) says where it goes; this
//! carries the plan out: an HBONE tunnel, a same-node connection, or plain TCP from the pod's own
//! address.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};
use weft_core::cert_manager::CertificateSource;
use weft_core::hbone::{new_traceparent, ConnectRequest, Forwarded};
use weft_core::telemetry::ResponseFlags;

use super::socket::{self, Counted};
use super::{canonical, copy, copy_inbound, tunnel_flags, Ctx};
use crate::inbound::Admitted;
use crate::outbound::{route, Carry, Plan, Refused};

/// Serves one captured outbound connection.
pub(super) async fn handle<S: CertificateSource>(ctx: Arc<Ctx<S>>, client: TcpStream, peer: SocketAddr) {
    let dst = match client.local_addr() {
        Ok(addr) => canonical(addr),
        Err(e) => return debug!(error = %e, "connection gone before it was handled"),
    };
    let state = ctx.state();
    let plan = route(&state, &ctx.node, peer.ip(), dst, &ctx.rr);
    let Plan { source, carry, labels } = match plan {
        Ok(plan) => plan,
        Err(Refused { error, source, denied }) => {
            info!(%dst, reason = %error, "outbound connection refused");
            if let Some((labels, flags)) = source.map(|b| *b) {
                ctx.metrics.connection_opened(labels).set_response_flags(flags);
            }
            if let Some(labels) = denied {
                ctx.metrics.denied(*labels);
            }
            return socket::reset(client);
        }
    };
    let (to, inbound_labels, registered) = match carry {
        Carry::Tunnel { tunnel, baggage, .. } => {
            drop(state);
            let mut guard = ctx.metrics.connection_opened(labels);
            let Some(certificate) = ctx.certificate(&source.identity, &dst.to_string()).await else {
                guard.set_response_flags(ResponseFlags::Connect);
                return socket::reset(client);
            };
            // Istio's client: the outer connection from the pod's own address (the server
            // identifies the source by it), `for=` the pod's address and `host=` the Service
            // called by VIP, a new trace id per connection.
            let traceparent = new_traceparent();
            let request = ConnectRequest {
                certificate,
                expected: tunnel.expected_identities.clone(),
                source_ip: Some(peer.ip()),
                hbone_addr: tunnel.connect_to,
                authority: tunnel.authority,
                forwarded: Forwarded {
                    for_addr: Some(peer),
                    host: tunnel.service.as_ref().map(|s| s.hostname.clone()),
                },
                baggage: Some(baggage),
                traceparent: Some(traceparent.clone()),
            };
            return match ctx.pool.connect(request).await {
                Ok(stream) => {
                    debug!(%dst, via = %tunnel.connect_to, authority = %tunnel.authority, %traceparent,
                        "HBONE tunnel opened");
                    copy(client, Counted::new(stream, guard), dst).await;
                }
                Err(e) => {
                    warn!(%dst, via = %tunnel.connect_to, error = %e, %traceparent, "HBONE tunnel failed");
                    guard.set_response_flags(tunnel_flags(&e));
                    socket::reset(client);
                }
            };
        }
        Carry::SameNode { to, inbound_labels, .. } => {
            // Inbound to a pod of this node: re-checked after policy updates like HBONE's.
            let admitted =
                Admitted { src_identity: Some(source.identity.clone()), src_ip: peer.ip(), dst: to };
            (to, Some(*inbound_labels), Some(ctx.connections.register(admitted, &state)))
        }
        Carry::Passthrough { to } => (to, None, None),
    };
    drop(state);
    if ctx.loops_back(to) {
        info!(%dst, %to, "outbound connection to ztunnel's own port refused");
        return socket::reset(client);
    }
    let mut guards: Vec<_> =
        std::iter::once(labels).chain(inbound_labels).map(|l| ctx.metrics.connection_opened(l)).collect();
    let timeout = ctx.options.connect_timeout;
    match socket::connect(Some(peer.ip()), to, ctx.options.transparent, timeout).await {
        Ok(upstream) => {
            let mut guards = guards.into_iter();
            let Some(first) = guards.next() else { return };
            let upstream = guards.fold(Counted::new(upstream, first), Counted::also);
            match registered {
                Some(registered) => copy_inbound(client, upstream, to, registered).await,
                None => copy(client, upstream, to).await,
            }
        }
        Err(e) => {
            warn!(%dst, %to, error = %e, "outbound connect failed");
            guards.iter_mut().for_each(|g| g.set_response_flags(ResponseFlags::Connect));
            socket::reset(client);
        }
    }
}
