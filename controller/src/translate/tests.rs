use weft_config::load_yaml;
use weft_core::proto::istio::workload::address;

use super::*;
use crate::model::Change;
use crate::xds::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

const TD: &str = "cluster.local";
const CLUSTER: &str = "c1";

fn model(yaml: &str) -> Model {
    let mut model = Model::default();
    for doc in load_yaml(yaml, "test.yaml") {
        model.apply(Change::Upsert(Box::new(doc.result.unwrap().object)));
    }
    model
}

fn pod<'a>(model: &'a Model, ns: &str, name: &str) -> &'a Pod {
    model.pods().find(|p| p.metadata.namespace == ns && p.metadata.name == name).unwrap()
}

fn svc<'a>(model: &'a Model, ns: &str, name: &str) -> &'a KubeService {
    model
        .objects()
        .find_map(|o| match o {
            Object::Service(s) if s.metadata.namespace == ns && s.metadata.name == name => Some(s),
            _ => None,
        })
        .unwrap()
}

fn policies(yaml: &str) -> Vec<Option<Authorization>> {
    load_yaml(yaml, "test.yaml")
        .into_iter()
        .map(|doc| match doc.result.unwrap().object {
            Object::AuthorizationPolicy(p) => authorization(&p),
            other => panic!("not a policy: {other:?}"),
        })
        .collect()
}

fn wp(ns: &str, name: &str) -> Option<GatewayAddress> {
    Some(GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: ns.into(),
            hostname: format!("{name}.{ns}.svc.cluster.local"),
        })),
        hbone_mtls_port: 15008,
    })
}

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: shop-wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, version: v2}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.0.1.5, podIPs: [{ip: 10.0.1.5}, {ip: "fd00::5"}], phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: shop, labels: {app: batch, istio.io/dataplane-mode: none}}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.6, phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {app: web}}
spec: {nodeName: node-b, serviceAccountName: old}
status: {podIP: 10.0.2.7, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: unscheduled, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}, {port: 443}, {port: 9090, targetPort: metrics}]
---
apiVersion: v1
kind: Service
metadata: {name: all, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: None, selector: {}}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: legacy, labels: {istio.io/use-waypoint: db-wp, istio.io/use-waypoint-namespace: infra}}
spec: {clusterIP: 10.96.0.20, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: legacy}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: shop-wp, namespace: shop, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: db-wp, namespace: infra}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: shop}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: shop}
spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}
"#;

#[test]
fn workloads_in_and_out_of_the_mesh() {
    let m = model(MESH);
    let web = workload(&m, pod(&m, "shop", "web-1"), TD, CLUSTER).unwrap();
    assert_eq!(web.uid, "c1//Pod/shop/web-1");
    assert_eq!((web.name.as_str(), web.namespace.as_str()), ("web-1", "shop"));
    assert_eq!(web.addresses, vec![vec![10, 0, 1, 5], "fd00::5".parse::<IpAddr>().map(ip_bytes).unwrap()]);
    assert_eq!(web.tunnel_protocol, TunnelProtocol::Hbone as i32);
    assert_eq!((web.trust_domain.as_str(), web.service_account.as_str()), (TD, "web"));
    assert_eq!(web.node, "node-a");
    assert_eq!((web.canonical_name.as_str(), web.canonical_revision.as_str()), ("web", "v2"));
    assert_eq!(web.workload_type, WorkloadType::Pod as i32);
    assert_eq!(web.status, WorkloadStatus::Healthy as i32);
    assert_eq!(web.cluster_id, CLUSTER);
    assert_eq!(web.network, "");
    assert_eq!(web.waypoint, wp("shop", "shop-wp"));

    // Opted out: plaintext, no waypoint, not running.
    let batch = workload(&m, pod(&m, "shop", "batch"), TD, CLUSTER).unwrap();
    assert_eq!(batch.tunnel_protocol, TunnelProtocol::None as i32);
    assert_eq!(batch.waypoint, None);
    assert_eq!(batch.status, WorkloadStatus::Unhealthy as i32);
    assert_eq!(batch.service_account, "default");

    // Namespace not enrolled: still sent, as NONE.
    let old = workload(&m, pod(&m, "legacy", "old"), TD, CLUSTER).unwrap();
    assert_eq!(old.tunnel_protocol, TunnelProtocol::None as i32);
    assert_eq!(old.canonical_name, "web");

    // No IP yet: nothing to route to.
    assert_eq!(workload(&m, pod(&m, "shop", "unscheduled"), TD, CLUSTER), None);
}

#[test]
fn workloads_list_their_services_and_policies() {
    let m = model(MESH);
    let web = workload(&m, pod(&m, "shop", "web-1"), TD, CLUSTER).unwrap();
    let ports = |list: &[(u32, u32)]| PortList {
        ports: list.iter().map(|&(service_port, target_port)| Port { service_port, target_port }).collect(),
    };
    // The empty selector of `all` selects nothing; `web` in legacy is another namespace's. The
    // pod names no container port `metrics`, so it is no endpoint of port 9090.
    assert_eq!(
        web.services,
        BTreeMap::from([("shop/web.shop.svc.cluster.local".to_owned(), ports(&[(80, 8080), (443, 443)]))])
    );
    let mut names = web.authorization_policies.clone();
    names.sort();
    let strict = "istio-system/istio_converted_static_strict";
    assert_eq!(names, [strict, "istio-system/mesh-deny", "shop/l7", "shop/ns-wide", "shop/web-only"]);

    let batch = workload(&m, pod(&m, "shop", "batch"), TD, CLUSTER).unwrap();
    assert!(batch.services.is_empty());
    let mut names = batch.authorization_policies.clone();
    names.sort();
    assert_eq!(names, [strict, "istio-system/mesh-deny", "shop/l7", "shop/ns-wide"]);

    let old = workload(&m, pod(&m, "legacy", "old"), TD, CLUSTER).unwrap();
    assert_eq!(old.authorization_policies, ["istio-system/mesh-deny", strict]);
}

/// `(service port, target port)`s of a workload's PortList.
type Pairs = &'static [(u32, u32)];

#[test]
fn named_target_ports_resolve_per_pod_from_its_container_ports() {
    let m = model(
        r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  selector: {app: api}
  ports:
  - {name: numeric, port: 80, targetPort: 8080}
  - {name: absent, port: 443}
  - {name: named, port: 9090, targetPort: metrics}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop, labels: {app: api}}
spec:
  containers: [{name: main, ports: [{name: http, containerPort: 8080}, {name: metrics, containerPort: 9100, protocol: TCP}]}]
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: shop, labels: {app: api}}
spec:
  containers: [{name: main, ports: [{name: metrics, containerPort: 9200}]}]
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: shop, labels: {app: api}}
spec:
  containers: [{name: main, ports: [{name: web, containerPort: 9100}]}]
status: {podIP: 10.0.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: shop, labels: {app: api}}
spec:
  containers:
  - {name: main, ports: [{containerPort: 8080}]}
  - {name: exporter, ports: [{name: metrics, containerPort: 9300}]}
status: {podIP: 10.0.1.4}
---
apiVersion: v1
kind: Pod
metadata: {name: e, namespace: shop, labels: {app: api}}
spec:
  containers: [{name: main, ports: [{name: metrics, containerPort: 9100, protocol: UDP}]}]
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: f, namespace: shop, labels: {app: api}}
status: {podIP: 10.0.1.6}
"#,
    );
    // The Service itself keeps 0 for the named port, as Istio's does.
    let api = service(&m, svc(&m, "shop", "api")).unwrap();
    let pairs = |ports: &[Port]| ports.iter().map(|p| (p.service_port, p.target_port)).collect::<Vec<_>>();
    assert_eq!(pairs(&api.ports), [(80, 8080), (443, 443), (9090, 0)]);

    let cases: [(&str, &str, Pairs); 6] = [
        ("names the port: resolved", "a", &[(80, 8080), (443, 443), (9090, 9100)]),
        ("names it with another number", "b", &[(80, 8080), (443, 443), (9090, 9200)]),
        ("names no port so: left out", "c", &[(80, 8080), (443, 443)]),
        ("named in its second container", "d", &[(80, 8080), (443, 443), (9090, 9300)]),
        ("named, but UDP: left out", "e", &[(80, 8080), (443, 443)]),
        ("no containers given: left out", "f", &[(80, 8080), (443, 443)]),
    ];
    for (what, name, want) in cases {
        let w = workload(&m, pod(&m, "shop", name), TD, CLUSTER).unwrap();
        let [(key, list)] = &w.services.iter().collect::<Vec<_>>()[..] else {
            panic!("{what}: {:?}", w.services)
        };
        assert_eq!(key.as_str(), "shop/api.shop.svc.cluster.local", "{what}");
        assert_eq!(pairs(&list.ports), *want, "{what}");
    }
}

#[test]
fn services_with_addresses_ports_and_waypoints() {
    let m = model(MESH);
    let web = service(&m, svc(&m, "shop", "web")).unwrap();
    assert_eq!(web.hostname, "web.shop.svc.cluster.local");
    assert_eq!(web.addresses, [NetworkAddress { network: String::new(), address: vec![10, 96, 0, 10] }]);
    assert_eq!(
        web.ports.iter().map(|p| (p.service_port, p.target_port)).collect::<Vec<_>>(),
        [(80, 8080), (443, 443), (9090, 0)]
    );
    assert!(web.subject_alt_names.is_empty());
    assert_eq!(web.waypoint, wp("shop", "shop-wp"), "from the namespace");

    let all = service(&m, svc(&m, "shop", "all")).unwrap();
    assert!(all.addresses.is_empty(), "headless");
    assert_eq!(all.waypoint, None, "opted out of the namespace's waypoint");

    let db = service(&m, svc(&m, "legacy", "db")).unwrap();
    assert_eq!(db.waypoint, wp("infra", "db-wp"));
    assert_eq!(service(&m, svc(&m, "legacy", "ext")), None);
}

/// `istio.io/waypoint-for` on the Gateway decides what a `use-waypoint` binds, as in Istio: a
/// Service's waypoint only for `service` (the default) and `all`, a pod's only for `workload` and
/// `all`, nothing for `none`; nothing either when the Gateway is missing or not a waypoint.
#[test]
fn waypoint_for_decides_what_is_bound() {
    let bound = |gateway: &str| {
        let yaml = format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, namespace: shop, labels: {{app: web}}}}
spec: {{nodeName: node-a}}
status: {{podIP: 10.0.1.5, phase: Running}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec: {{clusterIP: 10.96.0.10, selector: {{app: web}}, ports: [{{port: 80}}]}}
{gateway}"#
        );
        let m = model(&yaml);
        let pod_wp = workload(&m, pod(&m, "shop", "web-1"), TD, CLUSTER).unwrap().waypoint;
        let svc_wp = service(&m, svc(&m, "shop", "web")).unwrap().waypoint;
        (svc_wp.is_some(), pod_wp.is_some())
    };
    let gateway = |labels: &str, class: &str| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {{name: wp, namespace: shop, labels: {{{labels}}}}}\n\
             spec: {{gatewayClassName: {class}, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n"
        )
    };
    // (Gateway, (Service bound, pod bound))
    let cases: &[(String, (bool, bool))] = &[
        (gateway("", "istio-waypoint"), (true, false)),
        (gateway("istio.io/waypoint-for: service", "istio-waypoint"), (true, false)),
        (gateway("istio.io/waypoint-for: workload", "istio-waypoint"), (false, true)),
        (gateway("istio.io/waypoint-for: all", "istio-waypoint"), (true, true)),
        (gateway("istio.io/waypoint-for: none", "istio-waypoint"), (false, false)),
        // An unknown value is the default, as Istio reads it.
        (gateway("istio.io/waypoint-for: pods", "istio-waypoint"), (true, false)),
        // A Gateway of another class is no waypoint; a missing one binds nothing.
        (gateway("istio.io/waypoint-for: all", "istio"), (false, false)),
        (String::new(), (false, false)),
    ];
    for (gateway, want) in cases {
        assert_eq!(bound(gateway), *want, "{gateway}");
    }
}

#[test]
fn snapshot_holds_addresses_and_policies() {
    let m = model(MESH);
    let snap = snapshot(&m, TD, CLUSTER);
    let names = |t| snap.resources(t).map(|r| r.name().to_owned()).collect::<Vec<_>>();
    assert_eq!(
        names(ADDRESS_TYPE_URL),
        [
            "c1//Pod/legacy/old",
            "c1//Pod/shop/batch",
            "c1//Pod/shop/web-1",
            "legacy/db.legacy.svc.cluster.local",
            "shop/all.shop.svc.cluster.local",
            "shop/web.shop.svc.cluster.local",
        ]
    );
    // The mesh-wide STRICT PeerAuthentication arrives converted; the L7 policy is sent, failing
    // closed.
    assert_eq!(
        names(AUTHORIZATION_TYPE_URL),
        [
            "istio-system/istio_converted_static_strict",
            "istio-system/mesh-deny",
            "shop/l7",
            "shop/ns-wide",
            "shop/web-only"
        ]
    );
    assert_eq!(snapshot(&m, TD, CLUSTER), snap, "deterministic, version included");
    let web = snap.get(ADDRESS_TYPE_URL, "c1//Pod/shop/web-1").unwrap();
    let decoded = <Address as prost::Message>::decode(web.body().value.as_slice()).unwrap();
    assert!(matches!(decoded.r#type, Some(address::Type::Workload(w)) if w.name == "web-1"));
    assert!(web.answers_to("/10.0.1.5"));
}

#[test]
fn a_permissive_peer_authentication_changes_nothing() {
    let permissive = model(&MESH.replace("mode: STRICT", "mode: PERMISSIVE"));
    let names = |m: &Model| {
        snapshot(m, TD, CLUSTER)
            .resources(AUTHORIZATION_TYPE_URL)
            .map(|r| r.name().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&permissive), ["istio-system/mesh-deny", "shop/l7", "shop/ns-wide", "shop/web-only"]);
}

fn exact(s: &str) -> StringMatch {
    StringMatch { match_type: Some(MatchType::Exact(s.into())) }
}

#[test]
fn policy_table() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: none, namespace: shop}
spec: {action: ALLOW}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: all, namespace: shop}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh, namespace: istio-system}
spec: {action: DENY, rules: [{to: [{operation: {ports: ["22"], notPorts: ["80"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sel, namespace: istio-system}
spec: {selector: {matchLabels: {app: web}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: from, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["spiffe://cluster.local/ns/shop/sa/web", "cluster.local/ns/a/*", "*/sa/b", "*"]
        notPrincipals: ["cluster.local/ns/shop/sa/evil"]
        namespaces: [shop]
        notNamespaces: [evil]
        ipBlocks: [10.0.0.0/8, "fd00::1"]
        notIpBlocks: [10.1.0.0/16]
        serviceAccounts: [web, other/db]
    - source: {namespaces: [ops]}
    to: [{operation: {ports: ["8080"]}}]
"#;
    let got = policies(yaml);
    let none = got[0].as_ref().unwrap();
    assert_eq!(none.action, security::Action::Allow as i32);
    assert_eq!(none.scope, security::Scope::Namespace as i32);
    assert!(none.groups.is_empty(), "ALLOW without rules allows nothing");

    let all = got[1].as_ref().unwrap();
    assert_eq!(all.groups, [Group { rules: vec![] }], "one empty rule allows all");

    let mesh = got[2].as_ref().unwrap();
    assert_eq!((mesh.scope, mesh.action), (security::Scope::Global as i32, security::Action::Deny as i32));
    assert_eq!(
        mesh.groups,
        [Group {
            rules: vec![Rules {
                matches: vec![Match {
                    destination_ports: vec![22],
                    not_destination_ports: vec![80],
                    ..Default::default()
                }]
            }]
        }]
    );

    assert_eq!(got[3].as_ref().unwrap().scope, security::Scope::WorkloadSelector as i32);

    let from = got[4].as_ref().unwrap();
    assert_eq!((from.name.as_str(), from.namespace.as_str()), ("from", "shop"));
    let [group] = &from.groups[..] else { panic!("one group: {:?}", from.groups) };
    let [to, sources] = &group.rules[..] else { panic!("to and from: {:?}", group.rules) };
    assert_eq!(to.matches, [Match { destination_ports: vec![8080], ..Default::default() }]);
    let [first, second] = &sources.matches[..] else { panic!("two sources") };
    assert_eq!(
        first.principals,
        [
            exact("cluster.local/ns/shop/sa/web"),
            StringMatch { match_type: Some(MatchType::Prefix("cluster.local/ns/a/".into())) },
            StringMatch { match_type: Some(MatchType::Suffix("/sa/b".into())) },
            StringMatch { match_type: Some(MatchType::Presence(())) },
        ]
    );
    assert_eq!(first.not_principals, [exact("cluster.local/ns/shop/sa/evil")]);
    assert_eq!(
        (first.namespaces.as_slice(), first.not_namespaces.as_slice()),
        (&[exact("shop")][..], &[exact("evil")][..])
    );
    let fd01 = "fd00::1".parse::<IpAddr>().map(ip_bytes).unwrap();
    assert_eq!(
        first.source_ips,
        [
            security::Address { address: vec![10, 0, 0, 0], length: 8 },
            security::Address { address: fd01, length: 128 },
        ]
    );
    assert_eq!(first.not_source_ips, [security::Address { address: vec![10, 1, 0, 0], length: 16 }]);
    assert_eq!(
        first.service_accounts,
        [
            ServiceAccountMatch { namespace: "shop".into(), service_account: "web".into() },
            ServiceAccountMatch { namespace: "other".into(), service_account: "db".into() },
        ]
    );
    assert_eq!(second, &Match { namespaces: vec![exact("ops")], ..Default::default() });
}

#[test]
fn rules_ztunnel_cannot_evaluate_fail_closed_and_waypoint_policies_are_left_out() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: methods, namespace: shop}
spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: when, namespace: shop}
spec: {rules: [{when: [{key: "request.headers[x]", values: ["1"]}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: shop}
spec: {targetRefs: [{kind: Service, group: "", name: web}], rules: [{to: [{operation: {methods: [GET], paths: [/api/*]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-cidr, namespace: shop}
spec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}
"#;
    let got = policies(yaml);
    let (allow, deny) = (security::Action::Allow as i32, security::Action::Deny as i32);
    // ALLOW rules with L7 parts (or a malformed CIDR) are dropped: the policy allows nothing.
    for (i, name) in [(0, "methods"), (2, "when"), (5, "bad-cidr")] {
        let policy = got[i].as_ref().unwrap_or_else(|| panic!("{name} is sent"));
        assert_eq!((policy.name.as_str(), policy.action, policy.groups.len()), (name, allow, 0));
    }
    // A DENY rule loses its L7 parts: here nothing is left, so it denies every caller (a group
    // without rules matches every connection).
    let jwt = got[1].as_ref().unwrap();
    assert_eq!(jwt.action, deny);
    assert_eq!(jwt.groups.len(), 1);
    assert!(jwt.groups[0].rules.is_empty(), "{jwt:?}");
    // Policies for a waypoint (targetRefs), L7 ALLOW rules included, are not ztunnel's (Istio's
    // split: the waypoint checks them, ztunnel does not turn them into deny-all); nor is AUDIT.
    assert_eq!((got[3].is_none(), got[4].is_none()), (true, true));
}

/// DENY rules with L7 fields, as ztunnel's engine (weft-core's) then decides: each denies every
/// connection its remaining L4 fields match, and one left with none denies every connection.
#[test]
fn deny_rules_with_l7_fields_fail_closed_at_ztunnel() {
    use weft_core::authz::{Connection, Policy};
    let deny = |rules: &str| {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {{action: DENY, rules: {rules}}}\n"
        );
        let authorization = policies(&yaml).remove(0).expect("a DENY policy is sent");
        Policy::try_from(authorization).unwrap()
    };
    let caller = weft_core::Identity::new(TD, "shop", "web").unwrap();
    let conn = |port: u16| Connection {
        src_identity: Some(caller.clone()),
        src_ip: "10.0.0.1".parse().unwrap(),
        dst: std::net::SocketAddr::new("10.0.0.2".parse().unwrap(), port),
    };
    // (rules, denies port 80, denies port 8080)
    let cases = [
        (r#"[{to: [{operation: {paths: [/admin]}}]}]"#, true, true),
        (r#"[{to: [{operation: {ports: ["8080"], methods: [POST]}}]}]"#, false, true),
        (
            r#"[{from: [{source: {requestPrincipals: ["*"]}}], to: [{operation: {ports: ["80"]}}]}]"#,
            true,
            false,
        ),
        (r#"[{when: [{key: "request.headers[x]", values: ["1"]}]}]"#, true, true),
        (r#"[{to: [{operation: {paths: [/a]}}, {operation: {ports: ["22"]}}]}]"#, true, true),
        (r#"[{from: [{source: {namespaces: [other]}}], to: [{operation: {paths: [/a]}}]}]"#, false, false),
        (r#"[{to: [{operation: {ports: [http], methods: [GET]}}]}]"#, true, true),
    ];
    for (rules, port_80, port_8080) in cases {
        let policy = deny(rules);
        assert_eq!((policy.matches(&conn(80)), policy.matches(&conn(8080))), (port_80, port_8080), "{rules}");
    }
}

#[test]
fn v1_and_v1beta1_give_the_same_policy() {
    let body = r#"
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {notPrincipals: ["cluster.local/ns/shop/sa/web"]}}], to: [{operation: {ports: ["80"]}}]}]
"#;
    let v1 = policies(&format!("apiVersion: security.istio.io/v1{body}"));
    let v1beta1 = policies(&format!("apiVersion: security.istio.io/v1beta1{body}"));
    assert!(v1[0].is_some());
    assert_eq!(v1, v1beta1);
}

/// Mesh STRICT, `shop` PERMISSIVE (overrides the mesh), `web` pods STRICT with port 8080
/// PERMISSIVE, `db` pods UNSET with port 5432 STRICT (inherit PERMISSIVE from the namespace),
/// `legacy` inherits the mesh's STRICT; an older workload policy wins over a newer one.
#[test]
fn peer_authentication_precedence_and_port_levels() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: lax, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {"8080": {mode: PERMISSIVE}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-newer, namespace: shop, creationTimestamp: "2026-02-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: shop}
spec: {selector: {matchLabels: {app: db}}, portLevelMtls: {"5432": {mode: STRICT}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: cache, namespace: shop}
spec: {selector: {matchLabels: {app: cache}}, mtls: {mode: STRICT}}
"#;
    let pods = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: cache, namespace: shop, labels: {app: cache}}
status: {podIP: 10.0.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: shop}
status: {podIP: 10.0.1.4}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
status: {podIP: 10.0.2.1}
"#;
    let m = model(&format!("{yaml}---{pods}"));
    let listed =
        |ns: &str, name: &str| workload(&m, pod(&m, ns, name), TD, CLUSTER).unwrap().authorization_policies;
    let strict = "istio-system/istio_converted_static_strict";
    assert_eq!(listed("shop", "web"), ["shop/converted_peer_authentication_web"]);
    assert_eq!(listed("shop", "db"), ["shop/converted_peer_authentication_db"]);
    assert_eq!(listed("shop", "cache"), [strict]);
    assert!(listed("shop", "other").is_empty(), "the namespace's PERMISSIVE overrides the mesh");
    assert_eq!(listed("legacy", "old"), [strict]);

    let snap = snapshot(&m, TD, CLUSTER);
    let policy = |name: &str| {
        let r = snap.get(AUTHORIZATION_TYPE_URL, name).unwrap_or_else(|| panic!("no {name}"));
        <Authorization as prost::Message>::decode(r.body().value.as_slice()).unwrap()
    };
    let no_identity = || Match {
        not_principals: vec![StringMatch { match_type: Some(MatchType::Presence(())) }],
        ..Default::default()
    };
    let deny =
        |rules: Vec<Rules>| (security::Scope::WorkloadSelector as i32, security::Action::Deny as i32, rules);
    let shape = |a: Authorization| {
        (a.scope, a.action, a.groups.into_iter().flat_map(|g| g.rules).collect::<Vec<_>>())
    };
    assert_eq!(shape(policy(strict)), deny(vec![Rules { matches: vec![no_identity()] }]));
    // STRICT except 8080: plaintext AND not to 8080.
    assert_eq!(
        shape(policy("shop/converted_peer_authentication_web")),
        deny(vec![
            Rules { matches: vec![no_identity()] },
            Rules { matches: vec![Match { not_destination_ports: vec![8080], ..Default::default() }] },
        ])
    );
    // PERMISSIVE except 5432: plaintext to 5432.
    assert_eq!(
        shape(policy("shop/converted_peer_authentication_db")),
        deny(vec![Rules { matches: vec![Match { destination_ports: vec![5432], ..no_identity() }] }])
    );
    let names: Vec<_> = snap.resources(AUTHORIZATION_TYPE_URL).map(|r| r.name().to_owned()).collect();
    assert_eq!(names.len(), 3, "only listed policies are sent: {names:?}");
}
