use crate::proto::istio::security::{Action as A, Match as M, Scope as S};

use super::*;
use crate::testing::resources::*;

const WEB: &str = "10.0.1.5";

fn id(ns: &str, sa: &str) -> Option<Identity> {
    Some(Identity::new("cluster.local", ns, sa).unwrap())
}

fn conn(src_identity: Option<Identity>, src_ip: &str, port: u16) -> Connection {
    Connection { src_identity, src_ip: ip(src_ip), dst: SocketAddr::new(ip(WEB), port) }
}

/// A policy in `shop` (or `istio-system` for GLOBAL) with one group of one clause of `matches`.
fn one_rule(name: &str, scope: S, action: A, matches: Vec<M>) -> Authorization {
    let ns = if scope == S::Global { "istio-system" } else { "shop" };
    policy(ns, name, scope, action, vec![vec![matches]])
}

fn principals(values: &[&str]) -> M {
    M { principals: values.iter().map(|v| exact(v)).collect(), ..Default::default() }
}

fn namespaces(values: &[&str]) -> M {
    M { namespaces: values.iter().map(|v| exact(v)).collect(), ..Default::default() }
}

/// The controller's conversion of a STRICT PeerAuthentication.
fn strict(ns: &str, scope: S) -> Authorization {
    let m = M { not_principals: vec![presence()], ..Default::default() };
    policy(ns, "converted_peer_authentication_default", scope, A::Deny, vec![vec![vec![m]]])
}

fn allow() -> Verdict {
    Verdict::Allow
}

fn denied_by(policy: &str) -> Verdict {
    Verdict::Deny { policy: Some(policy.into()), reason: format!("DENY policy {policy} matched") }
}

/// Denied because no ALLOW policy matched (the reason is checked separately).
fn not_allowed() -> Verdict {
    Verdict::Deny { policy: None, reason: String::new() }
}

#[test]
fn istio_authorization_semantics() {
    let frontend = || id("shop", "frontend");
    let other_ns = || id("other", "frontend");
    let cases: Vec<(&str, Vec<Authorization>, Connection, Verdict)> = vec![
        ("no policy allows", vec![], conn(None, "10.0.9.9", 80), allow()),
        (
            "DENY a principal",
            vec![one_rule(
                "deny-fe",
                S::Namespace,
                A::Deny,
                vec![principals(&["cluster.local/ns/shop/sa/frontend"])],
            )],
            conn(frontend(), "10.0.2.1", 80),
            denied_by("shop/deny-fe"),
        ),
        (
            "DENY a principal leaves others",
            vec![one_rule(
                "deny-fe",
                S::Namespace,
                A::Deny,
                vec![principals(&["cluster.local/ns/shop/sa/frontend"])],
            )],
            conn(id("shop", "backend"), "10.0.2.1", 80),
            allow(),
        ),
        (
            "principal written with spiffe:// still matches",
            vec![one_rule(
                "deny-fe",
                S::Namespace,
                A::Deny,
                vec![principals(&["spiffe://cluster.local/ns/shop/sa/frontend"])],
            )],
            conn(frontend(), "10.0.2.1", 80),
            denied_by("shop/deny-fe"),
        ),
        (
            "ALLOW one namespace: that namespace passes",
            vec![one_rule("allow-shop", S::Namespace, A::Allow, vec![namespaces(&["shop"])])],
            conn(frontend(), "10.0.2.1", 80),
            allow(),
        ),
        (
            "ALLOW one namespace shuts out another",
            vec![one_rule("allow-shop", S::Namespace, A::Allow, vec![namespaces(&["shop"])])],
            conn(other_ns(), "10.0.2.1", 80),
            not_allowed(),
        ),
        (
            "ALLOW one namespace shuts out plaintext",
            vec![one_rule("allow-shop", S::Namespace, A::Allow, vec![namespaces(&["shop"])])],
            conn(None, "10.0.2.1", 80),
            not_allowed(),
        ),
        (
            "ALLOW without rules allows nothing",
            vec![policy("shop", "allow-nothing", S::Namespace, A::Allow, vec![])],
            conn(frontend(), "10.0.2.1", 80),
            not_allowed(),
        ),
        (
            "ALLOW with an empty rule allows everything",
            vec![policy("shop", "allow-all", S::Namespace, A::Allow, vec![vec![]])],
            conn(None, "10.0.2.1", 80),
            allow(),
        ),
        (
            "a clause without matches matches everything",
            vec![policy("shop", "empty-clause", S::Namespace, A::Deny, vec![vec![vec![]]])],
            conn(None, "10.0.2.1", 80),
            denied_by("shop/empty-clause"),
        ),
        (
            "a match without fields matches nothing",
            vec![one_rule("empty-match", S::Namespace, A::Deny, vec![M::default()])],
            conn(None, "10.0.2.1", 80),
            allow(),
        ),
        (
            "DENY without rules denies nothing",
            vec![policy("shop", "deny-nothing", S::Namespace, A::Deny, vec![])],
            conn(None, "10.0.2.1", 80),
            allow(),
        ),
        (
            "notPrincipals: others are denied",
            vec![one_rule(
                "only-fe",
                S::Namespace,
                A::Deny,
                vec![M {
                    not_principals: vec![exact("cluster.local/ns/shop/sa/frontend")],
                    ..Default::default()
                }],
            )],
            conn(id("shop", "backend"), "10.0.2.1", 80),
            denied_by("shop/only-fe"),
        ),
        (
            "notPrincipals: the named one passes",
            vec![one_rule(
                "only-fe",
                S::Namespace,
                A::Deny,
                vec![M {
                    not_principals: vec![exact("cluster.local/ns/shop/sa/frontend")],
                    ..Default::default()
                }],
            )],
            conn(frontend(), "10.0.2.1", 80),
            allow(),
        ),
        (
            "prefix and suffix principals",
            vec![one_rule(
                "allow-some",
                S::Namespace,
                A::Allow,
                vec![M {
                    principals: vec![
                        StringMatch::Prefix("cluster.local/ns/other/".into()).into_proto(),
                        StringMatch::Suffix("/sa/frontend".into()).into_proto(),
                    ],
                    ..Default::default()
                }],
            )],
            conn(id("other", "x"), "10.0.2.1", 80),
            allow(),
        ),
        (
            "serviceAccounts match namespace and account",
            vec![one_rule(
                "allow-sa",
                S::Namespace,
                A::Allow,
                vec![M {
                    service_accounts: vec![ProtoSaMatch {
                        namespace: "other".into(),
                        service_account: "frontend".into(),
                    }],
                    ..Default::default()
                }],
            )],
            conn(id("shop", "frontend"), "10.0.2.1", 80),
            not_allowed(),
        ),
        (
            "ipBlocks: inside the CIDR is denied",
            vec![one_rule(
                "deny-net",
                S::Namespace,
                A::Deny,
                vec![M { source_ips: vec![cidr("10.0.2.0/24")], ..Default::default() }],
            )],
            conn(frontend(), "10.0.2.77", 80),
            denied_by("shop/deny-net"),
        ),
        (
            "ipBlocks: outside the CIDR passes",
            vec![one_rule(
                "deny-net",
                S::Namespace,
                A::Deny,
                vec![M { source_ips: vec![cidr("10.0.2.0/24")], ..Default::default() }],
            )],
            conn(frontend(), "10.0.3.1", 80),
            allow(),
        ),
        (
            "ipBlocks with notIpBlocks carve a hole",
            vec![one_rule(
                "allow-net",
                S::Namespace,
                A::Allow,
                vec![M {
                    source_ips: vec![cidr("10.0.0.0/16")],
                    not_source_ips: vec![cidr("10.0.2.7/32")],
                    ..Default::default()
                }],
            )],
            conn(frontend(), "10.0.2.7", 80),
            not_allowed(),
        ),
        (
            "ipBlocks in IPv6, source IPv4-mapped does not match an IPv6 net",
            vec![one_rule(
                "allow-v6",
                S::Namespace,
                A::Allow,
                vec![M { source_ips: vec![cidr("fd00::/8")], ..Default::default() }],
            )],
            conn(frontend(), "::ffff:10.0.2.7", 80),
            not_allowed(),
        ),
        (
            "ports: a listed port is allowed",
            vec![one_rule(
                "allow-80",
                S::Namespace,
                A::Allow,
                vec![M { destination_ports: vec![80, 443], ..Default::default() }],
            )],
            conn(frontend(), "10.0.2.1", 443),
            allow(),
        ),
        (
            "ports: another port is not",
            vec![one_rule(
                "allow-80",
                S::Namespace,
                A::Allow,
                vec![M { destination_ports: vec![80, 443], ..Default::default() }],
            )],
            conn(frontend(), "10.0.2.1", 8080),
            not_allowed(),
        ),
        (
            "notPorts",
            vec![one_rule(
                "deny-not-80",
                S::Namespace,
                A::Deny,
                vec![M { not_destination_ports: vec![80], ..Default::default() }],
            )],
            conn(frontend(), "10.0.2.1", 22),
            denied_by("shop/deny-not-80"),
        ),
        (
            "clauses AND: from shop and to port 80 (port differs)",
            vec![policy(
                "shop",
                "from-and-to",
                S::Namespace,
                A::Allow,
                vec![vec![
                    vec![M { destination_ports: vec![80], ..Default::default() }],
                    vec![namespaces(&["shop"])],
                ]],
            )],
            conn(frontend(), "10.0.2.1", 81),
            not_allowed(),
        ),
        (
            "matches OR within a clause",
            vec![one_rule(
                "either",
                S::Namespace,
                A::Allow,
                vec![namespaces(&["nope"]), namespaces(&["shop"])],
            )],
            conn(frontend(), "10.0.2.1", 80),
            allow(),
        ),
        (
            "fields AND within a match",
            vec![one_rule(
                "both",
                S::Namespace,
                A::Allow,
                vec![M {
                    namespaces: vec![exact("shop")],
                    destination_ports: vec![80],
                    ..Default::default()
                }],
            )],
            conn(frontend(), "10.0.2.1", 81),
            not_allowed(),
        ),
        (
            "groups OR",
            vec![policy(
                "shop",
                "any-group",
                S::Namespace,
                A::Allow,
                vec![vec![vec![namespaces(&["nope"])]], vec![vec![namespaces(&["shop"])]]],
            )],
            conn(frontend(), "10.0.2.1", 80),
            allow(),
        ),
        (
            "DENY wins over a matching ALLOW",
            vec![
                one_rule("allow-shop", S::Namespace, A::Allow, vec![namespaces(&["shop"])]),
                one_rule(
                    "deny-fe",
                    S::Namespace,
                    A::Deny,
                    vec![principals(&["cluster.local/ns/shop/sa/frontend"])],
                ),
            ],
            conn(frontend(), "10.0.2.1", 80),
            denied_by("shop/deny-fe"),
        ),
        (
            "one matching ALLOW among several suffices",
            vec![
                one_rule("allow-a", S::Namespace, A::Allow, vec![namespaces(&["a"])]),
                one_rule("allow-shop", S::Namespace, A::Allow, vec![namespaces(&["shop"])]),
            ],
            conn(frontend(), "10.0.2.1", 80),
            allow(),
        ),
        (
            "STRICT refuses plaintext",
            vec![strict("shop", S::Namespace)],
            conn(None, "10.0.2.1", 80),
            denied_by("shop/converted_peer_authentication_default"),
        ),
        ("STRICT allows mTLS", vec![strict("shop", S::Namespace)], conn(frontend(), "10.0.2.1", 80), allow()),
        (
            "mesh-wide STRICT (GLOBAL) refuses plaintext",
            vec![strict("istio-system", S::Global)],
            conn(None, "10.0.2.1", 80),
            denied_by("istio-system/converted_peer_authentication_default"),
        ),
        (
            "NAMESPACE scope of another namespace does not apply",
            vec![policy("other", "deny-all", S::Namespace, A::Deny, vec![vec![]])],
            conn(frontend(), "10.0.2.1", 80),
            allow(),
        ),
        (
            "GLOBAL scope applies to every namespace",
            vec![policy("istio-system", "deny-all", S::Global, A::Deny, vec![vec![]])],
            conn(frontend(), "10.0.2.1", 80),
            denied_by("istio-system/deny-all"),
        ),
        (
            "WORKLOAD_SELECTOR applies to the workloads listing it",
            vec![policy("shop", "selected", S::WorkloadSelector, A::Deny, vec![vec![]])],
            conn(frontend(), "10.0.2.1", 80),
            denied_by("shop/selected"),
        ),
        (
            "WORKLOAD_SELECTOR does not apply to others",
            vec![policy("shop", "unselected", S::WorkloadSelector, A::Deny, vec![vec![]])],
            conn(frontend(), "10.0.2.1", 80),
            allow(),
        ),
        (
            "an ALLOW of another namespace does not make this workload allow-listed",
            vec![
                one_rule("allow-x", S::Namespace, A::Allow, vec![namespaces(&["x"])]).with_namespace("other")
            ],
            conn(frontend(), "10.0.2.1", 80),
            allow(),
        ),
    ];
    for (what, policies, conn, want) in cases {
        let mut state = ProxyState::new("");
        let mut web = workload("shop", "web", WEB);
        web.authorization_policies = vec!["shop/selected".into()];
        add_workload(&mut state, web);
        for p in policies {
            add_policy(&mut state, p);
        }
        let got = authorize(&state, &conn);
        match (&want, &got) {
            (Verdict::Deny { policy: None, .. }, Verdict::Deny { policy: None, reason }) => {
                assert!(reason.starts_with("no ALLOW policy of workload"), "{what}: {reason}");
            }
            _ => assert_eq!(got, want, "{what}"),
        }
    }
}

#[test]
fn unknown_destination_is_denied() {
    let state = ProxyState::new("");
    let got = authorize(&state, &conn(id("shop", "frontend"), "10.0.2.1", 80));
    assert_eq!(
        got,
        Verdict::Deny {
            policy: None,
            reason: "destination 10.0.1.5 is not a known workload on network \"\"".into()
        }
    );
}

#[test]
fn not_allowed_reason_names_the_policies_checked() {
    let mut state = ProxyState::new("");
    add_workload(&mut state, workload("shop", "web", WEB));
    add_policy(&mut state, one_rule("allow-a", S::Namespace, A::Allow, vec![namespaces(&["a"])]));
    let got = authorize(&state, &conn(None, "10.0.2.1", 80));
    assert_eq!(
        got,
        Verdict::Deny {
            policy: None,
            reason: format!(
                "no ALLOW policy of workload {} matched (checked shop/allow-a)",
                uid("shop", "web")
            )
        }
    );
}

#[test]
fn cidrs_contain_what_they_should() {
    let cases = [
        ("10.0.0.0/8", "10.255.1.1", true),
        ("10.0.0.0/8", "11.0.0.0", false),
        ("0.0.0.0/0", "192.168.1.1", true),
        ("0.0.0.0/0", "fd00::1", false),
        ("10.1.2.3/32", "10.1.2.3", true),
        ("10.1.2.3/32", "10.1.2.4", false),
        ("10.1.2.3/31", "10.1.2.2", true),
        ("fd00::/16", "fd00:1::1", true),
        ("fd00::/16", "fd01::1", false),
        ("::/0", "fd01::1", true),
        ("fd00::1/128", "fd00::1", true),
        ("::ffff:10.0.0.0/104", "10.0.0.9", true),
    ];
    for (net, addr, want) in cases {
        let cidr = Cidr::from_proto(&cidr(net)).unwrap();
        assert_eq!(cidr.contains(ip(addr)), want, "{net} contains {addr}");
    }
}

impl StringMatch {
    fn into_proto(self) -> ProtoStringMatch {
        let match_type = match self {
            StringMatch::Exact(s) => MatchType::Exact(s),
            StringMatch::Prefix(s) => MatchType::Prefix(s),
            StringMatch::Suffix(s) => MatchType::Suffix(s),
            StringMatch::Presence => MatchType::Presence(()),
        };
        ProtoStringMatch { match_type: Some(match_type) }
    }
}

trait WithNamespace {
    fn with_namespace(self, ns: &str) -> Self;
}

impl WithNamespace for Authorization {
    fn with_namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.into();
        self
    }
}
