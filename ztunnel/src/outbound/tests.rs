use weft_core::proto::istio::workload::{
    gateway_address, load_balancing, GatewayAddress, LoadBalancing, NetworkAddress, TunnelProtocol,
    WorkloadStatus,
};

use weft_core::testing::resources::*;

use super::*;

const CLIENT: &str = "10.0.1.1";
const WAYPOINT_POD: &str = "10.0.1.99";

/// A mesh with: a client; service `web` (80 -> 8080) with two healthy endpoints and an unhealthy
/// one; a legacy service whose endpoint is outside the mesh; a service without endpoints; a
/// waypoint `shop-wp` (service + pod); `reviews` (a service bound to the waypoint) and `ratings`
/// (a pod bound to it); `named`, whose target port is named and resolved per endpoint (named-1
/// names it 9090; named-2 and named-3 do not name it).
fn mesh() -> ProxyState {
    let mut state = ProxyState::new("");
    add_workload(&mut state, workload("shop", "client", CLIENT));
    add_service(&mut state, service("shop", "web", "10.96.0.10", &[(80, 8080)]));
    for (name, addr) in [("web-1", "10.0.1.5"), ("web-2", "10.0.2.5")] {
        add_workload(&mut state, endpoint_of(workload("shop", name, addr), "shop", "web", &[(80, 8080)]));
    }
    let mut sick = endpoint_of(workload("shop", "web-3", "10.0.2.6"), "shop", "web", &[(80, 8080)]);
    sick.status = WorkloadStatus::Unhealthy as i32;
    add_workload(&mut state, sick);

    add_service(&mut state, service("legacy", "old", "10.96.0.20", &[(80, 8080)]));
    let mut old = endpoint_of(workload("legacy", "old", "10.0.3.7"), "legacy", "old", &[(80, 8080)]);
    old.tunnel_protocol = TunnelProtocol::None as i32;
    add_workload(&mut state, old);

    add_service(&mut state, service("shop", "empty", "10.96.0.30", &[(80, 80)]));

    add_service(&mut state, service("shop", "shop-wp", "10.96.0.99", &[(15008, 15008)]));
    let wp_pod = endpoint_of(workload("shop", "shop-wp", WAYPOINT_POD), "shop", "shop-wp", &[(15008, 15008)]);
    add_workload(&mut state, wp_pod);

    let mut reviews = service("shop", "reviews", "10.96.0.40", &[(80, 9080)]);
    reviews.waypoint = waypoint("shop", "shop-wp");
    add_service(&mut state, reviews);
    add_workload(
        &mut state,
        endpoint_of(workload("shop", "reviews", "10.0.1.40"), "shop", "reviews", &[(80, 9080)]),
    );

    // A pod with its own waypoint (waypoint-for: workload), behind a service without one.
    add_service(&mut state, service("shop", "ratings", "10.96.0.45", &[(80, 9080)]));
    let mut ratings = endpoint_of(workload("shop", "ratings", "10.0.1.50"), "shop", "ratings", &[(80, 9080)]);
    ratings.waypoint = waypoint("shop", "shop-wp");
    add_workload(&mut state, ratings);

    add_service(&mut state, service("shop", "named", "10.96.0.50", &[(80, 0)]));
    add_workload(
        &mut state,
        endpoint_of(workload("shop", "named-1", "10.0.1.60"), "shop", "named", &[(80, 9090)]),
    );
    // Selected by the service, but its pod names no container port so: the controller leaves
    // the port out of its mapping. Never picked.
    add_workload(&mut state, endpoint_of(workload("shop", "named-2", "10.0.1.61"), "shop", "named", &[]));
    // The port mapped to 0 (unresolved): never picked either.
    add_workload(
        &mut state,
        endpoint_of(workload("shop", "named-3", "10.0.1.62"), "shop", "named", &[(80, 0)]),
    );

    add_workload(&mut state, workload("shop", "lonely", "10.0.1.70"));
    let mut lost = workload("shop", "lost", "10.0.1.71");
    lost.waypoint = waypoint("shop", "missing-wp");
    add_workload(&mut state, lost);
    state
}

fn sa(name: &str) -> Identity {
    Identity::new("cluster.local", "shop", name).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// What a decision says, without the workload and service records (checked separately).
#[derive(Debug, PartialEq, Eq)]
enum Want {
    Hbone { connect_to: &'static str, authority: &'static str, expected: Vec<Identity> },
    ToWaypoint { connect_to: &'static str, authority: &'static str, expected: Vec<Identity> },
    Passthrough { to: &'static str },
    Error(OutboundError),
}

fn summary(decision: Result<Outbound, OutboundError>) -> Want {
    let leak = |s: SocketAddr| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
    match decision {
        Ok(Outbound::Hbone(t)) => Want::Hbone {
            connect_to: leak(t.connect_to),
            authority: leak(t.authority),
            expected: t.expected_identities,
        },
        Ok(Outbound::ToWaypoint(t)) => Want::ToWaypoint {
            connect_to: leak(t.connect_to),
            authority: leak(t.authority),
            expected: t.expected_identities,
        },
        Ok(Outbound::Passthrough { to, .. }) => Want::Passthrough { to: leak(to) },
        Err(e) => Want::Error(e),
    }
}

#[test]
fn decides_each_branch() {
    let cases: Vec<(&str, &str, &str, Want)> = vec![
        (
            "unknown source",
            "10.0.9.9",
            "10.0.1.5:8080",
            Want::Error(OutboundError::UnknownSource(ip("10.0.9.9"))),
        ),
        (
            "pod IP in the mesh: HBONE to the pod",
            CLIENT,
            "10.0.1.5:8080",
            Want::Hbone {
                connect_to: "10.0.1.5:15008",
                authority: "10.0.1.5:8080",
                expected: vec![sa("web-1")],
            },
        ),
        (
            "service VIP: HBONE to an endpoint, target port",
            CLIENT,
            "10.96.0.10:80",
            Want::Hbone {
                connect_to: "10.0.1.5:15008",
                authority: "10.0.1.5:8080",
                expected: vec![sa("web-1")],
            },
        ),
        (
            "service VIP on a port it does not have",
            CLIENT,
            "10.96.0.10:81",
            Want::Error(OutboundError::UnknownServicePort { service: service_key("shop", "web"), port: 81 }),
        ),
        (
            "service without endpoints",
            CLIENT,
            "10.96.0.30:80",
            Want::Error(OutboundError::NoHealthyEndpoint { service: service_key("shop", "empty"), port: 80 }),
        ),
        (
            "service whose endpoint is outside the mesh: plain TCP to the endpoint",
            CLIENT,
            "10.96.0.20:80",
            Want::Passthrough { to: "10.0.3.7:8080" },
        ),
        (
            "pod outside the mesh: plain TCP",
            CLIENT,
            "10.0.3.7:8080",
            Want::Passthrough { to: "10.0.3.7:8080" },
        ),
        (
            "address outside the mesh: plain TCP",
            CLIENT,
            "8.8.8.8:443",
            Want::Passthrough { to: "8.8.8.8:443" },
        ),
        (
            "service bound to a waypoint: HBONE to the waypoint, authority the VIP",
            CLIENT,
            "10.96.0.40:80",
            Want::ToWaypoint {
                connect_to: "10.0.1.99:15008",
                authority: "10.96.0.40:80",
                expected: vec![sa("shop-wp")],
            },
        ),
        (
            "pod bound to a waypoint: HBONE to the waypoint, authority the pod",
            CLIENT,
            "10.0.1.50:80",
            Want::ToWaypoint {
                connect_to: "10.0.1.99:15008",
                authority: "10.0.1.50:80",
                expected: vec![sa("shop-wp")],
            },
        ),
        (
            "service whose endpoint has its own waypoint: HBONE to that waypoint, authority the endpoint",
            CLIENT,
            "10.96.0.45:80",
            Want::ToWaypoint {
                connect_to: "10.0.1.99:15008",
                authority: "10.0.1.50:9080",
                expected: vec![sa("shop-wp")],
            },
        ),
        (
            "the waypoint itself goes to the endpoint",
            WAYPOINT_POD,
            "10.96.0.40:80",
            Want::Hbone {
                connect_to: "10.0.1.40:15008",
                authority: "10.0.1.40:9080",
                expected: vec![sa("reviews")],
            },
        ),
        (
            "the waypoint itself goes to the pod",
            WAYPOINT_POD,
            "10.0.1.50:80",
            Want::Hbone {
                connect_to: "10.0.1.50:15008",
                authority: "10.0.1.50:80",
                expected: vec![sa("ratings")],
            },
        ),
        (
            "named target port resolved per endpoint",
            CLIENT,
            "10.96.0.50:80",
            Want::Hbone {
                connect_to: "10.0.1.60:15008",
                authority: "10.0.1.60:9090",
                expected: vec![sa("named-1")],
            },
        ),
        (
            "waypoint the proxy does not know",
            CLIENT,
            "10.0.1.71:80",
            Want::Error(OutboundError::WaypointUnavailable {
                waypoint: service_key("shop", "missing-wp"),
                destination: uid("shop", "lost"),
            }),
        ),
    ];
    for (what, source, dst, want) in cases {
        let state = mesh();
        let got = summary(decide(&state, ip(source), addr(dst), &RoundRobin::default()));
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn decisions_carry_the_destination_for_metrics() {
    let state = mesh();
    let rr = RoundRobin::default();
    let Ok(Outbound::Hbone(t)) = decide(&state, ip(CLIENT), addr("10.96.0.10:80"), &rr) else { panic!() };
    assert_eq!(t.destination.unwrap().uid, uid("shop", "web-1"));
    assert_eq!(t.service.unwrap().name, "web");
    let Ok(Outbound::ToWaypoint(t)) = decide(&state, ip(CLIENT), addr("10.96.0.40:80"), &rr) else {
        panic!()
    };
    assert_eq!((t.destination, t.service.unwrap().name.as_str()), (None, "reviews"));
    let Ok(Outbound::ToWaypoint(t)) = decide(&state, ip(CLIENT), addr("10.0.1.50:80"), &rr) else { panic!() };
    assert_eq!(t.destination.unwrap().uid, uid("shop", "ratings"));
    let Ok(Outbound::Passthrough { destination, service, .. }) =
        decide(&state, ip(CLIENT), addr("10.96.0.20:80"), &rr)
    else {
        panic!()
    };
    assert_eq!(destination.unwrap().uid, uid("legacy", "old"));
    assert_eq!(service.unwrap().name, "old");
}

#[test]
fn round_robin_over_healthy_endpoints_per_service() {
    let state = mesh();
    let rr = RoundRobin::default();
    let pick = |dst: &str| match decide(&state, ip(CLIENT), addr(dst), &rr) {
        Ok(Outbound::Hbone(t)) => t.connect_to.ip().to_string(),
        other => panic!("{other:?}"),
    };
    // web-3 is unhealthy; another service's picks do not disturb web's rotation.
    let picks: Vec<String> = ["10.96.0.10:80", "10.96.0.50:80", "10.96.0.10:80", "10.96.0.10:80"]
        .iter()
        .map(|d| pick(d))
        .collect();
    assert_eq!(picks, ["10.0.1.5", "10.0.1.60", "10.0.2.5", "10.0.1.5"]);
}

#[test]
fn a_named_target_port_reaches_only_the_pods_naming_it_each_on_its_own_number() {
    let mut state = mesh();
    // A second pod naming the port, with another number, on another node.
    let mut other = endpoint_of(workload("shop", "named-4", "10.0.2.60"), "shop", "named", &[(80, 9091)]);
    other.node = "node-b".into();
    add_workload(&mut state, other);
    let rr = RoundRobin::default();
    let picks: Vec<Want> =
        (0..4).map(|_| summary(decide(&state, ip(CLIENT), addr("10.96.0.50:80"), &rr))).collect();
    // Round robin over named-1 and named-4 only, each on the number its pod gives the name.
    let named_1 = || Want::Hbone {
        connect_to: "10.0.1.60:15008",
        authority: "10.0.1.60:9090",
        expected: vec![sa("named-1")],
    };
    let named_4 = || Want::Hbone {
        connect_to: "10.0.2.60:15008",
        authority: "10.0.2.60:9091",
        expected: vec![sa("named-4")],
    };
    assert_eq!(picks, [named_1(), named_4(), named_1(), named_4()]);
}

#[test]
fn allow_all_health_policy_picks_unhealthy_endpoints() {
    let mut state = mesh();
    let mut web = service("shop", "web", "10.96.0.10", &[(80, 8080)]);
    web.load_balancing = Some(LoadBalancing {
        health_policy: load_balancing::HealthPolicy::AllowAll as i32,
        ..Default::default()
    });
    add_service(&mut state, web);
    let rr = RoundRobin::default();
    let picks: Vec<IpAddr> = (0..3)
        .map(|_| match decide(&state, ip(CLIENT), addr("10.96.0.10:80"), &rr) {
            Ok(Outbound::Hbone(t)) => t.connect_to.ip(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(picks, [ip("10.0.1.5"), ip("10.0.2.5"), ip("10.0.2.6")]);
}

#[test]
fn service_subject_alt_names_are_also_expected() {
    let mut state = mesh();
    let mut web = service("shop", "web", "10.96.0.10", &[(80, 8080)]);
    web.subject_alt_names = vec!["spiffe://cluster.local/ns/shop/sa/web-canary".into()];
    add_service(&mut state, web);
    let Ok(Outbound::Hbone(t)) = decide(&state, ip(CLIENT), addr("10.96.0.10:80"), &RoundRobin::default())
    else {
        panic!()
    };
    assert_eq!(t.expected_identities, vec![sa("web-1"), sa("web-canary")]);
}

#[test]
fn waypoint_given_by_address() {
    let cases = [
        // The waypoint service's VIP: load balanced over its pods.
        ("10.96.0.99", Some("10.0.1.99:15008")),
        // The waypoint pod's IP.
        ("10.0.1.99", Some("10.0.1.99:15008")),
        // Nothing known there: no identity to expect.
        ("10.0.8.8", None),
    ];
    for (wp_addr, want) in cases {
        let mut state = mesh();
        let mut w = workload("shop", "ratings", "10.0.1.50");
        w.waypoint = Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: String::new(),
                address: bytes(ip(wp_addr)),
            })),
            hbone_mtls_port: 0,
        });
        add_workload(&mut state, w);
        let got = decide(&state, ip(CLIENT), addr("10.0.1.50:80"), &RoundRobin::default());
        match (got, want) {
            (Ok(Outbound::ToWaypoint(t)), Some(connect_to)) => {
                assert_eq!(t.connect_to, addr(connect_to), "{wp_addr}");
                assert_eq!(t.expected_identities, vec![sa("shop-wp")], "{wp_addr}");
            }
            (Err(OutboundError::WaypointUnavailable { waypoint, .. }), None) => assert_eq!(waypoint, wp_addr),
            (got, _) => panic!("{wp_addr}: {got:?}"),
        }
        // The waypoint itself is not sent back to itself.
        let got = decide(&state, ip(WAYPOINT_POD), addr("10.0.1.50:80"), &RoundRobin::default());
        if want.is_some() {
            assert!(matches!(got, Ok(Outbound::Hbone(_))), "{wp_addr}: {got:?}");
        }
    }
}

#[test]
fn dual_stack_endpoint_is_reached_in_the_destination_family() {
    let mut state = ProxyState::new("");
    add_workload(&mut state, workload("shop", "client", CLIENT));
    let mut s = service("shop", "web", "fd00:96::10", &[(80, 8080)]);
    s.addresses.push(NetworkAddress { network: String::new(), address: bytes(ip("10.96.0.10")) });
    add_service(&mut state, s);
    let mut w = endpoint_of(workload("shop", "web-1", "10.0.1.5"), "shop", "web", &[(80, 8080)]);
    w.addresses.push(bytes(ip("fd00::5")));
    add_workload(&mut state, w);
    let rr = RoundRobin::default();
    for (dst, want) in [("[fd00:96::10]:80", "[fd00::5]:8080"), ("10.96.0.10:80", "10.0.1.5:8080")] {
        let Ok(Outbound::Hbone(t)) = decide(&state, ip(CLIENT), addr(dst), &rr) else { panic!("{dst}") };
        assert_eq!(t.authority, addr(want), "{dst}");
    }
}

/// node-a: client 10.0.1.1, web-1 10.0.1.5 (endpoint of web), legacy 10.0.1.7 (not in the mesh).
/// node-b: web-2 10.0.2.5, remote 10.0.2.9 (calls node-a). Service web 10.96.0.10:80 -> 8080
/// with web-1 only; service empty 10.96.0.30 without endpoints.
pub(crate) fn node_mesh() -> ProxyState {
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
fn plan_summary(plan: Result<Plan, Refused>) -> String {
    match plan {
        Ok(Plan { carry: Carry::Tunnel { tunnel, waypoint, .. }, .. }) => {
            format!("tunnel {} {} waypoint={waypoint}", tunnel.connect_to, tunnel.authority)
        }
        Ok(Plan { carry: Carry::SameNode { to, destination, .. }, .. }) => {
            format!("same-node {to} {}", destination.name)
        }
        Ok(Plan { carry: Carry::Passthrough { to }, .. }) => format!("passthrough {to}"),
        Err(Refused { error: RouteError::NotLocalSource(ip), .. }) => format!("not local {ip}"),
        Err(Refused { error: RouteError::Destination(OutboundError::NoHealthyEndpoint { .. }), .. }) => {
            "no endpoint".into()
        }
        Err(Refused { error, .. }) => format!("error {error}"),
    }
}

#[test]
fn outbound_plans() {
    let state = node_mesh();
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
        let got = plan_summary(route(&state, "node-a", ip(source), addr(dst), &rr));
        assert_eq!(got, want, "{source} -> {dst}");
    }
}

#[test]
fn plans_carry_their_labels_and_the_same_node_verdict() {
    use weft_core::proto::istio::security::{Action, Match, Scope};
    let mut state = node_mesh();
    let rr = RoundRobin::default();
    let plan = route(&state, "node-a", ip("10.0.1.1"), addr("10.0.2.5:8080"), &rr).unwrap();
    assert_eq!(plan.labels.destination_workload, "web-2");
    assert_eq!(plan.labels.source_principal, "spiffe://cluster.local/ns/shop/sa/client");
    let Carry::Tunnel { baggage, .. } = &plan.carry else { panic!("{plan:?}") };
    assert!(baggage.contains("k8s.namespace.name=shop"), "{baggage}");
    let plan = route(&state, "node-a", ip("10.0.1.1"), addr("10.0.1.7:80"), &rr).unwrap();
    assert_eq!(plan.labels.connection_security_policy, SecurityPolicy::Unknown);

    // A DENY for the client's principal on web-1 refuses the same-node connection, counted on
    // both sides.
    let deny = Match { principals: vec![exact("cluster.local/ns/shop/sa/client")], ..Default::default() };
    add_policy(&mut state, policy("shop", "deny", Scope::Namespace, Action::Deny, vec![vec![vec![deny]]]));
    let refused = route(&state, "node-a", ip("10.0.1.1"), addr("10.96.0.10:80"), &rr).unwrap_err();
    assert!(matches!(refused.error, RouteError::SameNode(InboundRefusal::Denied { .. })), "{refused:?}");
    let (source, flags) = *refused.source.unwrap();
    assert_eq!(
        (source.destination_service.as_str(), flags),
        ("web.shop.svc.cluster.local", ResponseFlags::Deny)
    );
    assert_eq!(refused.denied.unwrap().reporter, Reporter::Destination);
}
