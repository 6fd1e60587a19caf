//! Table tests of the pure parts of the data path: the outbound plan and the inbound check.

use std::net::SocketAddr;

use weft_core::proto::istio::security::{Action, Match, Scope};
use weft_core::proto::istio::workload::TunnelProtocol;

use super::outbound::{route, Plan, RouteError};
use super::{check_inbound, InboundRefusal};
use crate::outbound::{OutboundError, RoundRobin};
use crate::state::ProxyState;
use crate::test_support::*;

const NODE: &str = "node-a";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// node-a: client 10.0.1.1, web-1 10.0.1.5 (endpoint of web), legacy 10.0.1.7 (not in the mesh).
/// node-b: web-2 10.0.2.5, remote 10.0.2.9 (calls node-a). Service web 10.96.0.10:80 -> 8080
/// with web-1 only; service empty 10.96.0.30 without endpoints.
fn mesh() -> ProxyState {
    let mut state = ProxyState::new("");
    add_workload(&mut state, workload("shop", "client", "10.0.1.1"));
    add_workload(
        &mut state,
        endpoint_of(workload("shop", "web-1", "10.0.1.5"), "shop", "web", &[(80, 8080)]),
    );
    let mut legacy = workload("shop", "legacy", "10.0.1.7");
    legacy.tunnel_protocol = TunnelProtocol::None as i32;
    add_workload(&mut state, legacy);
    for (name, addr) in [("web-2", "10.0.2.5"), ("remote", "10.0.2.9")] {
        let mut w = workload("shop", name, addr);
        w.node = "node-b".into();
        add_workload(&mut state, w);
    }
    add_service(&mut state, service("shop", "web", "10.96.0.10", &[(80, 8080)]));
    add_service(&mut state, service("shop", "empty", "10.96.0.30", &[(80, 80)]));
    state
}

/// What a plan boils down to, for the table.
fn summary(plan: Result<Plan, RouteError>) -> String {
    match plan {
        Ok(Plan::Tunnel { tunnel, waypoint, .. }) => {
            format!("tunnel {} {} waypoint={waypoint}", tunnel.connect_to, tunnel.authority)
        }
        Ok(Plan::SameNode { to, destination, .. }) => format!("same-node {to} {}", destination.name),
        Ok(Plan::Passthrough { to, .. }) => format!("passthrough {to}"),
        Err(RouteError::NotLocalSource(ip)) => format!("not local {ip}"),
        Err(RouteError::Decide(OutboundError::NoHealthyEndpoint { .. })) => "no endpoint".into(),
        Err(RouteError::Decide(e)) => format!("error {e}"),
    }
}

#[test]
fn outbound_plans() {
    let state = mesh();
    let rr = RoundRobin::default();
    let cases = [
        ("10.0.1.1", "10.0.2.5:8080", "tunnel 10.0.2.5:15008 10.0.2.5:8080 waypoint=false"),
        ("10.0.1.1", "10.0.1.5:8080", "same-node 10.0.1.5:8080 web-1"),
        ("10.0.1.1", "10.96.0.10:80", "same-node 10.0.1.5:8080 web-1"),
        ("10.0.1.1", "10.0.1.7:80", "passthrough 10.0.1.7:80"),
        ("10.0.1.1", "93.184.216.34:443", "passthrough 93.184.216.34:443"),
        ("10.0.1.1", "10.96.0.30:80", "no endpoint"),
        // IPv4-mapped addresses, as a dual-stack listener reports them.
        ("::ffff:10.0.1.1", "[::ffff:10.0.2.5]:8080", "tunnel 10.0.2.5:15008 10.0.2.5:8080 waypoint=false"),
        ("10.0.2.9", "10.0.1.5:8080", "not local 10.0.2.9"),
        ("10.9.9.9", "10.0.1.5:8080", "not local 10.9.9.9"),
    ];
    for (source, dst, want) in cases {
        let got = summary(route(&state, NODE, ip(source), sa(dst), &rr));
        assert_eq!(got, want, "{source} -> {dst}");
    }
}

#[test]
fn inbound_checks() {
    let mut state = mesh();
    add_policy(&mut state, policy("istio-system", "strict", Scope::Global, Action::Deny, strict_groups()));
    let web1 = state.workload_by_ip(ip("10.0.1.5")).cloned();
    let client = state.workload_by_ip(ip("10.0.1.1")).cloned();
    let remote = Some(crate::state::DEFAULT_TRUST_DOMAIN)
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
        let got = match check_inbound(&state, NODE, presented, identity, ip("10.0.2.9"), sa(dst)) {
            Ok(w) => format!("ok {}", w.name),
            Err(InboundRefusal::Denied { .. }) => "denied".into(),
            Err(InboundRefusal::WrongDestination { .. }) => "wrong destination".into(),
            Err(InboundRefusal::NotLocal(ip)) => format!("not local {ip}"),
        };
        assert_eq!(got, want, "{presented:?} {identity:?} {dst}");
    }
}

/// STRICT as the controller converts it: deny callers without an identity.
fn strict_groups() -> Vec<Vec<Vec<Match>>> {
    vec![vec![vec![Match { not_principals: vec![presence()], ..Default::default() }]]]
}
