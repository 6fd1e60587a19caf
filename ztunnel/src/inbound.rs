//! The inbound decision: whether a connection for a pod of this node may proceed (the
//! destination is a workload of this node, the tunnel was opened to it, it came through the
//! destination's own waypoint when it has one, and its policy allows the caller), and the labels
//! the destination side reports it with. Pure: the listeners ([`crate::proxy`]) and the
//! same-node branch of [`crate::outbound::route`] act on it, and [`recheck`] says which open
//! connections a policy update now forbids.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use weft_core::authz::{authorize, Connection, Verdict};
use weft_core::hbone::Forwarded;
use weft_core::identity::Identity;
use weft_core::state::{ProxyState, Service, Waypoint, WaypointDestination, Workload};
use weft_core::telemetry::{ConnectionLabels, Reporter, SecurityPolicy};

/// The reason a connection that skipped its destination's own waypoint is denied with (it opens
/// the [`InboundRefusal::Denied`] reason, so logs and tests can tell it from other denials).
pub const BYPASSED_WAYPOINT: &str = "bypassed waypoint";

/// Why an inbound connection is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InboundRefusal {
    #[error("{0} is not a workload of this node: is the controller's view of the node current?")]
    NotLocal(IpAddr),
    #[error("the tunnel was opened to {presented} but asks for {requested}")]
    WrongDestination { presented: String, requested: String },
    #[error("denied by {}: {reason}", policy.as_deref().unwrap_or("policy"))]
    Denied { policy: Option<String>, reason: String },
    #[error("`forwarded` claims the source {claimed}, which is not a workload of {identity}: a header may not widen what the certificate proves")]
    ForgedSource { claimed: IpAddr, identity: String },
}

/// What an inbound connection was admitted with: the inputs of [`check`] that hold for the
/// connection's whole life, kept to check it again after a policy update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// The peer's identity (HBONE, same node); `None` for a plaintext caller.
    pub src_identity: Option<Identity>,
    /// The client's address as settled at open ([`hbone_source`], or the plaintext peer).
    pub src_ip: IpAddr,
    /// The pod address and port connected to.
    pub dst: SocketAddr,
}

impl InboundRefusal {
    /// Whether authorization policy refuses: a [`InboundRefusal::Denied`] other than Weft's
    /// own waypoint enforcement ([`BYPASSED_WAYPOINT`]).
    pub fn is_policy_denial(&self) -> bool {
        matches!(self, InboundRefusal::Denied { reason, .. } if !reason.starts_with(BYPASSED_WAYPOINT))
    }
}

/// Whether a connection admitted with `admitted` must now be closed: [`check`] again against
/// the current `state`, with what was known at open. Only an authorization policy's denial
/// closes it ([`InboundRefusal::is_policy_denial`]). Every other refusal leaves it open:
/// - the destination gone from the state, moved, or no longer in the mesh ([`InboundRefusal::NotLocal`]):
///   removal is not a policy, the pod's own connections end with the pod, and a pod leaving
///   the mesh keeps its open connections as Istio's ztunnel does (so does a state briefly
///   without it while the controller resyncs);
/// - a waypoint attached since ([`BYPASSED_WAYPOINT`]): routing changed, not authorization;
///   new connections go through the waypoint, open ones finish where they were admitted.
///   Such a refusal masks what authorization would say, so a DENY written together with a
///   new waypoint closes nothing: the waypoint enforces it on new connections.
///
/// The tunnel's destination (`presented`) was settled at open and is not checked again.
pub fn recheck(state: &ProxyState, node: &str, admitted: &Admitted) -> Option<InboundRefusal> {
    let Admitted { src_identity, src_ip, dst } = admitted;
    check(state, node, None, src_identity.as_ref(), *src_ip, *dst)
        .err()
        .filter(InboundRefusal::is_policy_denial)
}

/// The source address of an HBONE stream, Istio's way: the outer connection's peer address
/// (Istio's and Weft's ztunnels open HBONE from the source pod's own address). A `forwarded:
/// for=` is believed only from a waypoint of the destination (its peer identity is the
/// waypoint's): a waypoint carries the original client's address. From anyone else, a claim of
/// the peer's own address, or of another workload of the peer's identity, changes nothing (the
/// peer address stands); a claim of any other address is refused: the header is the peer's word,
/// and it may not widen what the certificate and the network prove.
pub fn hbone_source(
    state: &ProxyState,
    identity: &Identity,
    peer: SocketAddr,
    forwarded: &Forwarded,
    destination: &Workload,
) -> Result<SocketAddr, InboundRefusal> {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let Some(claimed) = forwarded.for_addr else {
        return Ok(peer);
    };
    let claimed = SocketAddr::new(claimed.ip().to_canonical(), claimed.port());
    // Every stream of Istio's and Weft's clients claims the peer's own address: settle that
    // without looking for waypoints.
    if claimed.ip() == peer.ip() {
        return Ok(peer);
    }
    if is_waypoint_of(state, identity, destination) {
        return Ok(claimed);
    }
    match state.workload_by_ip(claimed.ip()) {
        Some(w) if w.identity == *identity => Ok(peer),
        _ => Err(InboundRefusal::ForgedSource { claimed: claimed.ip(), identity: identity.to_string() }),
    }
}

/// Whether `identity` is that of a waypoint serving `destination` (its own, or one of its
/// services').
fn is_waypoint_of(state: &ProxyState, identity: &Identity, destination: &Workload) -> bool {
    let services = destination.services.keys().filter_map(|key| state.service_by_key(key));
    let waypoints = destination.waypoint.iter().chain(services.filter_map(|s| s.waypoint.as_ref()));
    waypoints.into_iter().any(|waypoint| is_waypoint(state, identity, waypoint))
}

/// Whether `identity` is that of `waypoint`: of the pods of the waypoint's service, or of the
/// workload at its address. A waypoint the proxy does not know has no identity.
fn is_waypoint(state: &ProxyState, identity: &Identity, waypoint: &Waypoint) -> bool {
    match &waypoint.destination {
        WaypointDestination::Service(key) => state.endpoints(key).iter().any(|w| w.identity == *identity),
        WaypointDestination::Address(addr) => match state.service_by_address(&addr.network, addr.ip) {
            Some(service) => state.endpoints(&service.key()).iter().any(|w| w.identity == *identity),
            None => {
                state.workload_by_address(&addr.network, addr.ip).is_some_and(|w| w.identity == *identity)
            }
        },
    }
}

/// Weft's waypoint enforcement (Istio leaves it to policy): a destination with its own waypoint
/// (`istio.io/waypoint-for: workload` or `all`) is reached only through it, so only the
/// waypoint's identity may connect; anyone else (another workload's HBONE straight to this node,
/// a plaintext caller) skipped it and is denied with [`BYPASSED_WAYPOINT`]. A service's waypoint
/// does not count: as in Istio, traffic to the pod's own address may go direct then.
fn bypassed_waypoint(
    state: &ProxyState,
    src_identity: Option<&Identity>,
    src_ip: IpAddr,
    destination: &Workload,
) -> Option<InboundRefusal> {
    let waypoint = destination.waypoint.as_ref()?;
    if src_identity.is_some_and(|identity| is_waypoint(state, identity, waypoint)) {
        return None;
    }
    let waypoint = match &waypoint.destination {
        WaypointDestination::Service(key) => key.clone(),
        WaypointDestination::Address(addr) => match state.service_by_address(&addr.network, addr.ip) {
            Some(service) => service.key(),
            None => match state.workload_by_address(&addr.network, addr.ip) {
                Some(w) => format!("{}/{} ({})", w.namespace, w.name, addr.ip),
                None => addr.ip.to_string(),
            },
        },
    };
    let source = match src_identity {
        Some(identity) => format!("{identity} at {src_ip}"),
        None => format!("plaintext client {src_ip}"),
    };
    Some(InboundRefusal::Denied {
        policy: None,
        reason: format!(
            "{BYPASSED_WAYPOINT} {waypoint}: {source} is not the waypoint of {}/{}, which is reached only through it",
            destination.namespace, destination.name
        ),
    })
}

/// Whether `src` may reach `dst` (a workload address and port on this node `node`). For HBONE,
/// `presented` is the workload whose certificate the tunnel was opened with: the destination
/// must be that workload. A destination with its own waypoint admits only that waypoint (see
/// [`bypassed_waypoint`]); then its policy decides. Returns the destination workload.
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
    if let Some(refusal) = bypassed_waypoint(state, src_identity, src_ip.to_canonical(), workload) {
        return Err(refusal);
    }
    let connection = Connection { src_identity: src_identity.cloned(), src_ip: src_ip.to_canonical(), dst };
    match authorize(state, &connection) {
        Verdict::Allow => Ok(workload.clone()),
        Verdict::Deny { policy, reason } => Err(InboundRefusal::Denied { policy, reason }),
    }
}

/// The workload at `ip` if it runs on `node`.
pub fn local_workload<'s>(state: &'s ProxyState, node: &str, ip: IpAddr) -> Option<&'s Arc<Workload>> {
    state.workload_by_ip(ip.to_canonical()).filter(|w| w.node == node)
}

/// The labels of an inbound connection as the destination reports it. The destination service
/// is found as Istio's ztunnel does (the tunnel carries only the pod's address): the service the
/// client's `forwarded: host=` names, when the destination is one of its endpoints (a peer's word
/// that can only choose among the destination's own services); else the one service of the
/// destination workload whose target port is the port connected to, if exactly one is.
pub fn labels(
    state: &ProxyState,
    security: SecurityPolicy,
    src_identity: Option<&Identity>,
    src_ip: IpAddr,
    dst: Option<&Workload>,
    dst_port: u16,
    host: Option<&str>,
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
        let named = host.and_then(|host| {
            dst.services.keys().filter_map(|key| state.service_by_key(key)).find(|s| s.hostname == host)
        });
        if let Some(service) = named.or_else(|| inbound_service(state, dst, dst_port)) {
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use weft_core::proto::istio::security::{Action, Match, Scope};
    use weft_core::testing::resources::*;

    use super::*;
    use crate::outbound::tests::node_mesh;

    const NODE: &str = "node-a";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn inbound_checks() {
        let mut state = node_mesh();
        add_policy(
            &mut state,
            policy("istio-system", "strict", Scope::Global, Action::Deny, strict_groups()),
        );
        let web1 = state.workload_by_ip(ip("10.0.1.5")).cloned();
        let client = state.workload_by_ip(ip("10.0.1.1")).cloned();
        let remote = Some(weft_core::names::DEFAULT_TRUST_DOMAIN)
            .map(|td| weft_core::identity::Identity::new(td, "shop", "remote").unwrap());

        // (presented, identity, destination) -> outcome
        let cases: [(_, _, &str, &str); 6] = [
            (web1.as_deref(), remote.as_ref(), "10.0.1.5:8080", "ok web-1"),
            (None, remote.as_ref(), "10.0.1.5:8080", "ok web-1"),
            (None, None, "10.0.1.5:8080", "denied"),
            (client.as_deref(), remote.as_ref(), "10.0.1.5:8080", "wrong destination"),
            (None, remote.as_ref(), "10.0.2.5:8080", "not local 10.0.2.5"),
            (None, remote.as_ref(), "[::ffff:10.0.1.5]:8080", "ok web-1"),
        ];
        for (presented, identity, dst, want) in cases {
            let got = match check(&state, NODE, presented, identity, ip("10.0.2.9"), sa(dst)) {
                Ok(w) => format!("ok {}", w.name),
                Err(InboundRefusal::Denied { .. }) => "denied".into(),
                Err(InboundRefusal::WrongDestination { .. }) => "wrong destination".into(),
                Err(InboundRefusal::NotLocal(ip)) => format!("not local {ip}"),
                Err(InboundRefusal::ForgedSource { .. }) => "forged".into(),
            };
            assert_eq!(got, want, "{presented:?} {identity:?} {dst}");
        }
    }

    #[test]
    fn the_source_is_the_peer_address_and_forwarded_is_believed_only_from_the_destinations_waypoint() {
        let mut state = node_mesh();
        let web1 = state.workload_by_ip(ip("10.0.1.5")).cloned().unwrap();
        let remote = weft_core::testing::identity("shop", "remote");
        // 10.0.2.9 is shop/remote's own pod; 10.0.1.1 another workload's.
        let peer = sa("10.0.2.9:40000");
        // The waypoint of web-1: its own pod, bound by address.
        let waypoint_identity = weft_core::testing::identity("shop", "waypoint");
        add_workload(&mut state, workload("shop", "waypoint", "10.0.1.200"));
        let mut bound = (*web1).clone();
        bound.waypoint = Some(weft_core::state::Waypoint {
            destination: WaypointDestination::Address(weft_core::state::NetworkIp {
                network: String::new(),
                ip: ip("10.0.1.200"),
            }),
            port: 15008,
        });
        let for_ = |a: &str| Forwarded { for_addr: Some(sa(a)), host: None };
        // (identity, claimed, destination bound to the waypoint) -> source, or the refused claim
        type Case<'a> = (&'a Identity, Option<&'a str>, bool, Result<&'a str, &'a str>);
        let cases: [Case; 8] = [
            (&remote, None, false, Ok("10.0.2.9:40000")),
            (&remote, Some("10.0.2.9:41000"), false, Ok("10.0.2.9:40000")),
            (&remote, Some("[::ffff:10.0.2.9]:41000"), false, Ok("10.0.2.9:40000")),
            // Another workload's address, and one the mesh does not know: refused.
            (&remote, Some("10.0.1.1:4444"), false, Err("10.0.1.1")),
            (&remote, Some("8.8.8.8:53"), false, Err("8.8.8.8")),
            // The destination's waypoint carries the original client.
            (&waypoint_identity, Some("10.0.1.1:4444"), true, Ok("10.0.1.1:4444")),
            // A waypoint that is not the destination's is anyone else.
            (&waypoint_identity, Some("10.0.1.1:4444"), false, Err("10.0.1.1")),
            // Not the waypoint's identity, even to a bound destination.
            (&remote, Some("10.0.1.1:4444"), true, Err("10.0.1.1")),
        ];
        for (identity, claimed, to_bound, want) in cases {
            let forwarded = claimed.map(for_).unwrap_or_default();
            let destination = if to_bound { &bound } else { &*web1 };
            let got = hbone_source(&state, identity, peer, &forwarded, destination);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, sa(want), "{claimed:?}"),
                (Err(InboundRefusal::ForgedSource { claimed: c, .. }), Err(want)) => assert_eq!(c, ip(want)),
                (got, want) => panic!("{identity} {claimed:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_destination_with_its_own_waypoint_admits_only_that_waypoint() {
        let mut state = node_mesh();
        // Waypoints `wp` (service and pod) and `wp2` (another destination's).
        for (name, vip, pod) in [("wp", "10.96.0.99", "10.0.1.99"), ("wp2", "10.96.0.98", "10.0.1.98")] {
            add_service(&mut state, service("shop", name, vip, &[(15008, 15008)]));
            add_workload(
                &mut state,
                endpoint_of(workload("shop", name, pod), "shop", name, &[(15008, 15008)]),
            );
        }
        // `bound`: a service whose own waypoint is `wp` (waypoint-for: service).
        let mut bound = service("shop", "bound", "10.96.0.60", &[(80, 8080)]);
        bound.waypoint = waypoint("shop", "wp");
        add_service(&mut state, bound);
        let by_address = Some(weft_core::proto::istio::workload::GatewayAddress {
            destination: Some(weft_core::proto::istio::workload::gateway_address::Destination::Address(
                weft_core::proto::istio::workload::NetworkAddress {
                    network: String::new(),
                    address: bytes(ip("10.0.1.99")),
                },
            )),
            hbone_mtls_port: 15008,
        });
        // (name, address, own waypoint, endpoint of `bound`)
        let pods = [
            ("pinned", "10.0.1.50", waypoint("shop", "wp"), false),
            ("pinned-by-address", "10.0.1.51", by_address, false),
            ("service-only", "10.0.1.52", None, true),
            ("all", "10.0.1.53", waypoint("shop", "wp"), true),
            ("lost", "10.0.1.54", waypoint("shop", "missing-wp"), false),
        ];
        for (name, addr, waypoint, in_bound) in pods {
            let mut w = workload("shop", name, addr);
            w.waypoint = waypoint;
            if in_bound {
                w = endpoint_of(w, "shop", "bound", &[(80, 8080)]);
            }
            add_workload(&mut state, w);
        }
        let wp = weft_core::testing::identity("shop", "wp");
        let wp2 = weft_core::testing::identity("shop", "wp2");
        let client = weft_core::testing::identity("shop", "client");

        // (destination, peer identity; none: plaintext) -> outcome
        let cases: [(&str, Option<&Identity>, &str); 15] = [
            ("10.0.1.50:8080", Some(&wp), "ok"),
            ("10.0.1.50:8080", Some(&client), "bypassed"),
            ("10.0.1.50:8080", None, "bypassed"),
            // Another destination's waypoint is anyone else.
            ("10.0.1.50:8080", Some(&wp2), "bypassed"),
            ("10.0.1.51:8080", Some(&wp), "ok"),
            ("10.0.1.51:8080", Some(&client), "bypassed"),
            ("10.0.1.51:8080", None, "bypassed"),
            // Only a service's waypoint: the pod's own address may be reached directly.
            ("10.0.1.52:8080", Some(&client), "ok"),
            ("10.0.1.52:8080", None, "ok"),
            ("10.0.1.52:8080", Some(&wp), "ok"),
            // waypoint-for: all (its own and its service's).
            ("10.0.1.53:8080", Some(&wp), "ok"),
            ("10.0.1.53:8080", Some(&client), "bypassed"),
            // A waypoint this proxy does not know: nobody is it (fail closed).
            ("10.0.1.54:8080", Some(&client), "bypassed"),
            // No waypoint at all.
            ("10.0.1.5:8080", Some(&client), "ok"),
            ("10.0.1.5:8080", None, "ok"),
        ];
        for (dst, identity, want) in cases {
            let got = match check(&state, NODE, None, identity, ip("10.0.2.9"), sa(dst)) {
                Ok(_) => "ok".to_string(),
                Err(InboundRefusal::Denied { policy: None, reason })
                    if reason.starts_with(BYPASSED_WAYPOINT) =>
                {
                    "bypassed".into()
                }
                Err(e) => e.to_string(),
            };
            assert_eq!(got, want, "{dst} {identity:?}");
        }

        // The refusal names the source, the destination and the waypoint.
        let refusal =
            check(&state, NODE, None, Some(&client), ip("10.0.2.9"), sa("10.0.1.50:8080")).unwrap_err();
        let text = refusal.to_string();
        for part in [
            "spiffe://cluster.local/ns/shop/sa/client",
            "10.0.2.9",
            "shop/pinned",
            "shop/wp.shop.svc.cluster.local",
        ] {
            assert!(text.contains(part), "{part} not in {text:?}");
        }
        let refusal = check(&state, NODE, None, None, ip("10.0.2.9"), sa("10.0.1.51:8080")).unwrap_err();
        let text = refusal.to_string();
        for part in ["plaintext client 10.0.2.9", "shop/pinned-by-address", "shop/wp (10.0.1.99)"] {
            assert!(text.contains(part), "{part} not in {text:?}");
        }
    }

    #[test]
    fn the_destination_service_is_the_one_host_names_when_the_pod_serves_it() {
        let mut state = node_mesh();
        // web-1 also backs `admin`, on another port; `empty` it does not back.
        let mut web1 = workload("shop", "web-1", "10.0.1.5");
        web1 = endpoint_of(endpoint_of(web1, "shop", "web", &[(80, 8080)]), "shop", "admin", &[(9090, 9090)]);
        add_workload(&mut state, web1);
        add_service(&mut state, service("shop", "admin", "10.96.0.40", &[(9090, 9090)]));
        let web1 = state.workload_by_ip(ip("10.0.1.5")).cloned().unwrap();
        let service_of = |port: u16, host: Option<&str>| {
            labels(&state, SecurityPolicy::MutualTls, None, ip("10.0.2.9"), Some(&web1), port, host)
                .destination_service
        };
        // (port, host=) -> destination_service
        let cases = [
            (8080, None, "web.shop.svc.cluster.local"),
            (8080, Some("admin.shop.svc.cluster.local"), "admin.shop.svc.cluster.local"),
            // A service the pod does not back: ignored, the guess stands.
            (8080, Some("empty.shop.svc.cluster.local"), "web.shop.svc.cluster.local"),
            (9090, None, "admin.shop.svc.cluster.local"),
            (7000, None, "unknown"),
        ];
        for (port, host, want) in cases {
            assert_eq!(service_of(port, host), want, "{port} {host:?}");
        }
    }

    #[test]
    fn a_recheck_closes_only_what_authorization_now_denies() {
        let good = weft_core::testing::identity("shop", "good");
        let bad = weft_core::testing::identity("shop", "bad");
        let admitted = |identity: Option<&Identity>, dst: &str| Admitted {
            src_identity: identity.cloned(),
            src_ip: ip("10.0.2.9"),
            dst: sa(dst),
        };
        let deny_bad =
            Match { principals: vec![exact("cluster.local/ns/shop/sa/bad")], ..Default::default() };
        let allow_other = Match { namespaces: vec![exact("other")], ..Default::default() };
        // The state after the update.
        let updated = |change: &dyn Fn(&mut ProxyState)| {
            let mut state = node_mesh();
            change(&mut state);
            state
        };
        let unchanged = updated(&|_| {});
        let denied = updated(&|s| {
            add_policy(
                s,
                policy("shop", "no-bad", Scope::Namespace, Action::Deny, vec![vec![vec![deny_bad.clone()]]]),
            )
        });
        let allow_only_other = updated(&|s| {
            add_policy(
                s,
                policy(
                    "shop",
                    "other",
                    Scope::Namespace,
                    Action::Allow,
                    vec![vec![vec![allow_other.clone()]]],
                ),
            )
        });
        let strict = updated(&|s| {
            add_policy(s, policy("istio-system", "strict", Scope::Global, Action::Deny, strict_groups()))
        });
        // web-1 gone from the state, or rescheduled elsewhere, with the DENY in force.
        let gone = updated(&|s| {
            add_policy(
                s,
                policy("shop", "no-bad", Scope::Namespace, Action::Deny, vec![vec![vec![deny_bad.clone()]]]),
            );
            assert!(s.remove_address(&uid("shop", "web-1")));
        });
        let moved = updated(&|s| {
            add_policy(
                s,
                policy("shop", "no-bad", Scope::Namespace, Action::Deny, vec![vec![vec![deny_bad.clone()]]]),
            );
            let mut w = endpoint_of(workload("shop", "web-1", "10.0.1.5"), "shop", "web", &[(80, 8080)]);
            w.node = "node-b".into();
            add_workload(s, w);
        });
        // web-1 now has its own waypoint, which the caller is not.
        let waypointed = updated(&|s| {
            add_service(s, service("shop", "wp", "10.96.0.99", &[(15008, 15008)]));
            let mut w = workload("shop", "web-1", "10.0.1.5");
            w.waypoint = waypoint("shop", "wp");
            add_workload(s, w);
        });

        // (state after the update, admitted) -> closed with (policy, reason start), or kept
        type Case<'a> = (&'a str, &'a ProxyState, Admitted, Option<(Option<&'a str>, &'a str)>);
        let cases: [Case; 12] = [
            ("unchanged", &unchanged, admitted(Some(&bad), "10.0.1.5:8080"), None),
            ("unchanged plaintext", &unchanged, admitted(None, "10.0.1.5:8080"), None),
            (
                "DENY bad",
                &denied,
                admitted(Some(&bad), "10.0.1.5:8080"),
                Some((Some("shop/no-bad"), "DENY policy")),
            ),
            (
                "DENY bad, mapped",
                &denied,
                admitted(Some(&bad), "[::ffff:10.0.1.5]:8080"),
                Some((Some("shop/no-bad"), "DENY")),
            ),
            ("DENY bad spares good", &denied, admitted(Some(&good), "10.0.1.5:8080"), None),
            ("DENY bad spares plaintext", &denied, admitted(None, "10.0.1.5:8080"), None),
            (
                "ALLOW other only",
                &allow_only_other,
                admitted(Some(&good), "10.0.1.5:8080"),
                Some((None, "no ALLOW policy")),
            ),
            ("STRICT", &strict, admitted(None, "10.0.1.5:8080"), Some((Some("istio-system/strict"), "DENY"))),
            ("STRICT spares mTLS", &strict, admitted(Some(&good), "10.0.1.5:8080"), None),
            ("destination gone", &gone, admitted(Some(&bad), "10.0.1.5:8080"), None),
            ("destination moved", &moved, admitted(Some(&bad), "10.0.1.5:8080"), None),
            ("waypoint attached", &waypointed, admitted(Some(&bad), "10.0.1.5:8080"), None),
        ];
        for (name, state, admitted, want) in cases {
            let got = recheck(state, NODE, &admitted);
            match (got, want) {
                (None, None) => {}
                (Some(InboundRefusal::Denied { policy, reason }), Some((want_policy, want_reason))) => {
                    assert_eq!(policy.as_deref(), want_policy, "{name}");
                    assert!(reason.starts_with(want_reason), "{name}: {reason}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
        // The waypoint case is a denial at open, just not one a recheck acts on.
        assert!(matches!(
            check(&waypointed, NODE, None, Some(&bad), ip("10.0.2.9"), sa("10.0.1.5:8080")),
            Err(InboundRefusal::Denied { .. })
        ));
    }

    /// STRICT as the controller converts it: deny callers without an identity.
    fn strict_groups() -> Vec<Vec<Vec<Match>>> {
        vec![vec![vec![Match { not_principals: vec![presence()], ..Default::default() }]]]
    }
}
