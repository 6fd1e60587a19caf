use crate::proto::istio::security::{Action as ProtoAction, Scope as ProtoScope};

use super::*;
use crate::testing::resources::*;

fn wl_address(w: ProtoWorkload) -> Address {
    Address { r#type: Some(address::Type::Workload(w)) }
}

fn svc_address(s: ProtoService) -> Address {
    Address { r#type: Some(address::Type::Service(s)) }
}

#[test]
fn indexes_workloads_by_uid_and_ip_and_services_by_vip_and_key() {
    let mut state = ProxyState::new("");
    let mut web = endpoint_of(workload("shop", "web", "10.0.1.5"), "shop", "web", &[(80, 8080)]);
    web.addresses.push(bytes(ip("fd00::5")));
    add_workload(&mut state, web);
    add_service(&mut state, service("shop", "web", "10.96.0.10", &[(80, 8080)]));

    let w = state.workload_by_uid(&uid("shop", "web")).unwrap();
    assert_eq!(w.addresses, vec![ip("10.0.1.5"), ip("fd00::5")]);
    assert_eq!(w.identity.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(w.protocol, Protocol::Hbone);
    assert!(w.healthy);
    assert_eq!(state.workload_by_ip(ip("fd00::5")).unwrap().uid, uid("shop", "web"));
    // IPv4-mapped IPv6 finds the IPv4 workload.
    assert_eq!(state.workload_by_ip(ip("::ffff:10.0.1.5")).unwrap().uid, uid("shop", "web"));
    assert!(state.workload_by_address("other-network", ip("10.0.1.5")).is_none());

    let s = state.service_by_vip(ip("10.96.0.10")).unwrap();
    assert_eq!(s.key(), service_key("shop", "web"));
    assert_eq!(s.ports, BTreeMap::from([(80, 8080)]));
    assert_eq!(state.service_by_key(&service_key("shop", "web")).unwrap().name, "web");
    let endpoints: Vec<_> =
        state.endpoints(&service_key("shop", "web")).iter().map(|w| w.uid.clone()).collect();
    assert_eq!(endpoints, vec![uid("shop", "web")]);
}

#[test]
fn defaults_trust_domain_and_service_account_as_istio() {
    let mut state = ProxyState::new("");
    let mut w = workload("shop", "web", "10.0.1.5");
    w.trust_domain.clear();
    w.service_account.clear();
    add_workload(&mut state, w);
    let w = state.workload_by_ip(ip("10.0.1.5")).unwrap();
    assert_eq!(w.identity.to_string(), "spiffe://cluster.local/ns/shop/sa/default");
}

#[test]
fn replacing_a_workload_moves_its_indexes() {
    let mut state = ProxyState::new("");
    add_workload(&mut state, endpoint_of(workload("shop", "web", "10.0.1.5"), "shop", "web", &[(80, 80)]));
    // Same uid, new IP, now an endpoint of another service.
    add_workload(&mut state, endpoint_of(workload("shop", "web", "10.0.1.9"), "shop", "api", &[(80, 80)]));
    assert!(state.workload_by_ip(ip("10.0.1.5")).is_none());
    assert!(state.workload_by_ip(ip("10.0.1.9")).is_some());
    assert!(state.endpoints(&service_key("shop", "web")).is_empty());
    assert_eq!(state.endpoints(&service_key("shop", "api")).len(), 1);
}

#[test]
fn removal_by_name_works_for_workloads_services_and_policies() {
    let mut state = ProxyState::new("");
    add_workload(&mut state, endpoint_of(workload("shop", "web", "10.0.1.5"), "shop", "web", &[(80, 80)]));
    add_service(&mut state, service("shop", "web", "10.96.0.10", &[(80, 80)]));
    add_policy(&mut state, policy("shop", "p", ProtoScope::Namespace, ProtoAction::Deny, vec![vec![]]));

    assert!(state.remove_address(&service_key("shop", "web")));
    assert!(state.service_by_vip(ip("10.96.0.10")).is_none());
    assert!(state.workload_by_ip(ip("10.0.1.5")).is_some(), "removing the service keeps its endpoints");

    assert!(state.remove_address(&uid("shop", "web")));
    assert!(state.workload_by_ip(ip("10.0.1.5")).is_none());
    assert!(state.endpoints(&service_key("shop", "web")).is_empty());
    assert!(!state.remove_address(&uid("shop", "web")), "already gone");

    let w = workload("shop", "other", "10.0.1.6");
    add_workload(&mut state, w.clone());
    let w = state.workload_by_uid(&uid("shop", "other")).unwrap().clone();
    assert_eq!(state.policies_for(&w).len(), 1);
    assert!(state.remove_authorization("shop/p"));
    assert!(state.policies_for(&w).is_empty());
    assert!(!state.remove_authorization("shop/p"));
}

#[test]
fn removing_an_old_owner_of_an_ip_keeps_the_new_owner() {
    let mut state = ProxyState::new("");
    add_workload(&mut state, workload("shop", "old", "10.0.1.5"));
    add_workload(&mut state, workload("shop", "new", "10.0.1.5"));
    state.remove_address(&uid("shop", "old"));
    assert_eq!(state.workload_by_ip(ip("10.0.1.5")).unwrap().uid, uid("shop", "new"));
}

#[test]
fn refuses_bad_resources_with_the_field_and_keeps_the_state() {
    let good = workload("shop", "web", "10.0.1.5");
    let name = uid("shop", "web");
    let mut bad_port = endpoint_of(good.clone(), "shop", "web", &[(80, 70000)]);
    bad_port.uid = name.clone();
    let cases: Vec<(&str, Address, &str)> = vec![
        (
            "address length",
            wl_address(ProtoWorkload { addresses: vec![vec![10, 0, 1]], ..good.clone() }),
            "field `addresses[0]`: an IP address is 4 or 16 bytes, not 3",
        ),
        (
            "uid is not the name",
            wl_address(ProtoWorkload { uid: "other".into(), ..good.clone() }),
            "field `uid`: \"other\" is not the resource name",
        ),
        (
            "tunnel protocol",
            wl_address(ProtoWorkload { tunnel_protocol: 7, ..good.clone() }),
            "field `tunnel_protocol`: unknown value 7",
        ),
        (
            "namespace",
            wl_address(ProtoWorkload { namespace: "Bad_NS".into(), ..good.clone() }),
            "field `trust_domain/namespace/service_account`",
        ),
        ("target port", wl_address(bad_port), "target_port`: 70000 is not a port number"),
        (
            "waypoint without destination",
            wl_address(ProtoWorkload {
                waypoint: Some(GatewayAddress { destination: None, hbone_mtls_port: 15008 }),
                ..good.clone()
            }),
            "field `waypoint.destination`",
        ),
        ("empty address", Address { r#type: None }, "neither a workload nor a service"),
    ];
    for (what, address, message) in cases {
        let mut state = ProxyState::new("");
        add_workload(&mut state, good.clone());
        let err = state.apply_address(&name, address).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&format!("{name:?}")), "{what}: {text}");
        assert!(text.contains(message), "{what}: {text}");
        let kept = state.workload_by_ip(ip("10.0.1.5")).unwrap();
        assert_eq!(kept.uid, name, "{what}: the previous version stays");
    }

    let mut state = ProxyState::new("");
    let mut s = service("shop", "web", "10.96.0.10", &[(80, 80)]);
    s.addresses[0].address = vec![1, 2];
    let err = state.apply_address(&service_key("shop", "web"), svc_address(s)).unwrap_err();
    assert!(err
        .to_string()
        .contains("service \"shop/web.shop.svc.cluster.local\": field `addresses[0].address`"));
    let s = service("shop", "web", "10.96.0.10", &[(80, 80)]);
    let err = state.apply_address("shop/web", svc_address(s)).unwrap_err();
    assert!(err.to_string().contains("is not the resource name"), "{err}");
    assert!(state.config_dump().services.is_empty());

    let mut p = policy("shop", "p", ProtoScope::Namespace, ProtoAction::Allow, vec![vec![vec![]]]);
    p.groups[0].rules[0].matches.push(Default::default());
    p.groups[0].rules[0].matches[0].source_ips.push(cidr("10.0.0.0/33"));
    let err = state.apply_authorization("shop/p", p).unwrap_err();
    assert_eq!(
        err.to_string(),
        "authorization \"shop/p\": field `groups[0].rules[0].matches[0].source_ips[0]`: prefix length 33 is longer \
         than 32 for 10.0.0.0; the resource was ignored, check the controller that sent it"
    );
    assert!(state.policy("shop/p").is_none());
}

#[test]
fn policies_for_a_workload_by_scope() {
    let mut state = ProxyState::new("");
    let deny = ProtoAction::Deny;
    add_policy(&mut state, policy("istio-system", "mesh", ProtoScope::Global, deny, vec![]));
    add_policy(&mut state, policy("shop", "ns", ProtoScope::Namespace, deny, vec![]));
    add_policy(&mut state, policy("other", "ns", ProtoScope::Namespace, deny, vec![]));
    add_policy(&mut state, policy("shop", "selected", ProtoScope::WorkloadSelector, deny, vec![]));
    add_policy(&mut state, policy("shop", "not-selected", ProtoScope::WorkloadSelector, deny, vec![]));
    let mut w = workload("shop", "web", "10.0.1.5");
    // As the controller lists them: selected ones, plus namespace and global ones again.
    w.authorization_policies = vec![
        "istio-system/mesh".into(),
        "shop/ns".into(),
        "shop/selected".into(),
        "shop/not-yet-sent".into(),
    ];
    add_workload(&mut state, w);
    let w = state.workload_by_ip(ip("10.0.1.5")).unwrap().clone();
    let keys: Vec<String> = state.policies_for(&w).iter().map(|p| p.key()).collect();
    assert_eq!(keys, vec!["istio-system/mesh", "shop/ns", "shop/selected"]);
}

#[test]
fn config_dump_lists_everything_sorted() {
    let mut state = ProxyState::new("");
    add_workload(&mut state, endpoint_of(workload("shop", "web", "10.0.1.5"), "shop", "web", &[(80, 8080)]));
    add_workload(&mut state, workload("shop", "api", "10.0.1.6"));
    add_service(&mut state, service("shop", "web", "10.96.0.10", &[(80, 8080)]));
    let mut p = policy("shop", "p", ProtoScope::Namespace, ProtoAction::Allow, vec![vec![vec![]]]);
    p.groups[0].rules[0].matches.push(Default::default());
    p.groups[0].rules[0].matches[0].source_ips.push(cidr("10.0.0.0/8"));
    add_policy(&mut state, p);

    let dump = serde_json::to_value(state.config_dump()).unwrap();
    assert_eq!(dump["workloads"][0]["uid"], uid("shop", "api"));
    assert_eq!(dump["workloads"][1]["identity"], "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(dump["workloads"][1]["addresses"][0], "10.0.1.5");
    assert_eq!(dump["workloads"][1]["services"]["shop/web.shop.svc.cluster.local"]["80"], 8080);
    assert_eq!(dump["services"][0]["hostname"], "web.shop.svc.cluster.local");
    assert_eq!(dump["services"][0]["endpoints"][0], uid("shop", "web"));
    assert_eq!(dump["policies"][0]["action"], "Allow");
    assert_eq!(dump["policies"][0]["groups"][0]["clauses"][0]["matches"][0]["source_ips"][0], "10.0.0.0/8");
}

/// `(service port, target port)`s of an endpoint's mapping.
type Mapping = &'static [(u32, u32)];
/// `(workload name, target port)`s of the candidates, by uid.
type Candidates = &'static [(&'static str, u16)];

#[test]
fn endpoint_candidates_resolve_the_target_port_per_endpoint() {
    let mut state = ProxyState::new("");
    // Port 80's target port is named (0 in the service); 443's is 8443.
    add_service(&mut state, service("shop", "named", "10.96.0.50", &[(80, 0), (443, 8443)]));
    let endpoints: [(&str, &str, Mapping); 5] = [
        // Names the port 8080, and another pod 9090: each is reached on its own number.
        ("http-8080", "10.0.1.1", &[(80, 8080), (443, 8443)]),
        ("http-9090", "10.0.1.2", &[(80, 9090), (443, 8443)]),
        // Names no port so: the controller leaves 80 out of its mapping.
        ("web", "10.0.1.3", &[(443, 8443)]),
        // No mapping at all for the service's ports.
        ("bare", "10.0.1.4", &[]),
        // 80 mapped to 0 (unresolved, as an older controller sent it).
        ("zero", "10.0.1.5", &[(80, 0), (443, 8443)]),
    ];
    for (name, addr, ports) in endpoints {
        add_workload(&mut state, endpoint_of(workload("shop", name, addr), "shop", "named", ports));
    }
    let service = state.service_by_key(&service_key("shop", "named")).unwrap().clone();
    let cases: [(&str, Option<u16>, Candidates); 4] = [
        (
            "named target port: only the endpoints whose mapping resolves it, on their own number",
            Some(80),
            &[("http-8080", 8080), ("http-9090", 9090)],
        ),
        (
            "numeric target port: an endpoint without a mapping falls back to the service's",
            Some(443),
            &[("bare", 8443), ("http-8080", 8443), ("http-9090", 8443), ("web", 8443), ("zero", 8443)],
        ),
        ("a port the service does not have", Some(81), &[]),
        (
            "any port (a waypoint's pods): every endpoint, target port 0",
            None,
            &[("bare", 0), ("http-8080", 0), ("http-9090", 0), ("web", 0), ("zero", 0)],
        ),
    ];
    for (what, port, want) in cases {
        let got: Vec<(String, u16)> = state
            .endpoint_candidates(&service, port)
            .into_iter()
            .map(|e| (e.workload.name.clone(), e.target_port))
            .collect();
        let want: Vec<(String, u16)> = want.iter().map(|&(n, p)| (n.to_owned(), p)).collect();
        assert_eq!(got, want, "{what}");
    }
}
