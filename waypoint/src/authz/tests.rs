//! Table tests of the L7 authorization decisions: policies converted from the proto (and the
//! errors that name a bad field), each source, operation and `when` match, Istio's path
//! normalization cases, the CUSTOM → DENY → ALLOW order and AUDIT, and random paths that must
//! never panic the normaliser. Pure: no I/O, no listener; requests are built in memory.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue};
use serde_json::{json, Value};
use weft_core::identity::Identity;
use weft_core::proto::weft::waypoint::v1::{self as wp, authorization_policy::Action as WpAction};

use super::*;

/// A request the tests shape, and from which they borrow a [`Request`].
#[derive(Clone)]
struct Req {
    identity: Option<Identity>,
    source_ip: IpAddr,
    remote_ip: IpAddr,
    destination: SocketAddr,
    host: String,
    method: String,
    path: String,
    headers: HeaderMap,
    sni: Option<String>,
    jwt: Option<Jwt>,
}

#[derive(Clone)]
struct Jwt {
    principal: String,
    audiences: Vec<String>,
    presenter: Option<String>,
    claims: Value,
}

impl Req {
    /// `GET /` to reviews:9080 from bookinfo/productpage over mTLS, without JWT.
    fn get(path: &str) -> Req {
        Req {
            identity: Some(Identity::new("cluster.local", "bookinfo", "productpage").unwrap()),
            source_ip: "10.0.0.5".parse().unwrap(),
            remote_ip: "10.0.0.5".parse().unwrap(),
            destination: "10.96.0.10:9080".parse().unwrap(),
            host: "reviews.bookinfo.svc.cluster.local:9080".into(),
            method: "GET".into(),
            path: path.into(),
            headers: HeaderMap::new(),
            sni: None,
            jwt: None,
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Req)) -> Req {
        f(&mut self);
        self
    }

    fn jwt(self, iss: &str, sub: &str, claims: Value) -> Req {
        let mut payload = json!({"iss": iss, "sub": sub});
        if let (Some(p), Value::Object(extra)) = (payload.as_object_mut(), claims) {
            p.extend(extra);
        }
        let audiences = match payload.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(list)) => list.iter().filter_map(|a| a.as_str().map(String::from)).collect(),
            _ => Vec::new(),
        };
        let presenter = payload.get("azp").and_then(Value::as_str).map(String::from);
        self.with(|r| {
            r.jwt = Some(Jwt { principal: format!("{iss}/{sub}"), audiences, presenter, claims: payload })
        })
    }

    fn request(&self) -> Request<'_> {
        Request {
            source_identity: self.identity.as_ref(),
            source_ip: self.source_ip,
            remote_ip: self.remote_ip,
            destination: self.destination,
            host: &self.host,
            method: &self.method,
            path: &self.path,
            headers: &self.headers,
            sni: self.sni.as_deref(),
            auth: self.jwt.as_ref().map(|j| Auth {
                principal: &j.principal,
                audiences: &j.audiences,
                presenter: j.presenter.as_deref(),
                claims: &j.claims,
            }),
        }
    }
}

fn s(list: &[&str]) -> Vec<String> {
    list.iter().map(|v| (*v).to_owned()).collect()
}

fn proto(name: &str, action: WpAction, rules: Vec<wp::Rule>) -> wp::AuthorizationPolicy {
    wp::AuthorizationPolicy {
        name: name.into(),
        namespace: "bookinfo".into(),
        action: action as i32,
        rules,
        provider: String::new(),
    }
}

fn policy(name: &str, action: WpAction, rules: Vec<wp::Rule>) -> Policy {
    Policy::try_from(&proto(name, action, rules)).unwrap()
}

fn from(source: wp::Source) -> wp::Rule {
    wp::Rule { from: vec![source], ..Default::default() }
}

fn to(operation: wp::Operation) -> wp::Rule {
    wp::Rule { to: vec![operation], ..Default::default() }
}

fn when(key: &str, values: &[&str], not_values: &[&str]) -> wp::Rule {
    wp::Rule {
        when: vec![wp::Condition { key: key.into(), values: s(values), not_values: s(not_values) }],
        ..Default::default()
    }
}

fn paths(list: &[&str]) -> wp::Operation {
    wp::Operation { paths: s(list), ..Default::default() }
}

/// `Some(key)`: denied by that policy; `None` in `Deny`: denied for want of an ALLOW match.
#[derive(Debug, PartialEq)]
enum Want {
    Allow,
    DenyBy(&'static str),
    DenyNoAllow,
}

fn check(policies: &[Policy], req: &Req) -> Want {
    let refs: Vec<&Policy> = policies.iter().collect();
    match authorize(&refs, &req.request()) {
        Decision::Allow { .. } => Want::Allow,
        Decision::Deny { policy: Some(p), .. } => Want::DenyBy(if p == "bookinfo.deny" {
            "bookinfo.deny"
        } else if p == "bookinfo.custom" {
            "bookinfo.custom"
        } else {
            "other"
        }),
        Decision::Deny { policy: None, .. } => Want::DenyNoAllow,
    }
}

fn allow(rules: Vec<wp::Rule>) -> Policy {
    policy("allow", WpAction::Allow, rules)
}

fn deny(rules: Vec<wp::Rule>) -> Policy {
    policy("deny", WpAction::Deny, rules)
}

#[test]
fn decisions() {
    let productpage =
        wp::Source { principals: s(&["cluster.local/ns/bookinfo/sa/productpage"]), ..Default::default() };
    let get = wp::Operation { methods: s(&["GET"]), ..Default::default() };
    let cases: Vec<(&str, Vec<Policy>, Req, Want)> = vec![
        ("no policies allow", vec![], Req::get("/"), Want::Allow),
        (
            "ALLOW GET by principal",
            vec![allow(vec![wp::Rule {
                from: vec![productpage.clone()],
                to: vec![get.clone()],
                when: vec![],
            }])],
            Req::get("/reviews/1"),
            Want::Allow,
        ),
        (
            "ALLOW GET by principal: POST is denied",
            vec![allow(vec![wp::Rule {
                from: vec![productpage.clone()],
                to: vec![get.clone()],
                when: vec![],
            }])],
            Req::get("/").with(|r| r.method = "POST".into()),
            Want::DenyNoAllow,
        ),
        (
            "ALLOW by principal: another service account is denied",
            vec![allow(vec![from(productpage.clone())])],
            Req::get("/")
                .with(|r| r.identity = Some(Identity::new("cluster.local", "bookinfo", "ratings").unwrap())),
            Want::DenyNoAllow,
        ),
        (
            "ALLOW by principal: plaintext is denied",
            vec![allow(vec![from(productpage.clone())])],
            Req::get("/").with(|r| r.identity = None),
            Want::DenyNoAllow,
        ),
        (
            "principal written with spiffe:// still matches",
            vec![allow(vec![from(wp::Source {
                principals: s(&["spiffe://cluster.local/ns/bookinfo/sa/productpage"]),
                ..Default::default()
            })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "principal suffix form",
            vec![allow(vec![from(wp::Source {
                principals: s(&["*/sa/productpage"]),
                ..Default::default()
            })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "notPrincipals * denies plaintext",
            vec![deny(vec![from(wp::Source { not_principals: s(&["*"]), ..Default::default() })])],
            Req::get("/").with(|r| r.identity = None),
            Want::DenyBy("bookinfo.deny"),
        ),
        (
            "notPrincipals * lets mTLS through",
            vec![deny(vec![from(wp::Source { not_principals: s(&["*"]), ..Default::default() })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "DENY by path beats ALLOW",
            vec![allow(vec![from(productpage.clone())]), deny(vec![to(paths(&["/admin*"]))])],
            Req::get("/admin/users"),
            Want::DenyBy("bookinfo.deny"),
        ),
        (
            "DENY by path: other paths allowed",
            vec![allow(vec![from(productpage.clone())]), deny(vec![to(paths(&["/admin*"]))])],
            Req::get("/public"),
            Want::Allow,
        ),
        (
            "DENY by path sees the normalized path (dot segments)",
            vec![deny(vec![to(paths(&["/admin*"]))])],
            Req::get("/public/../admin/x"),
            Want::DenyBy("bookinfo.deny"),
        ),
        (
            "DENY by path sees decoded unreserved escapes",
            vec![deny(vec![to(paths(&["/admin"]))])],
            Req::get("/%61dmin"),
            Want::DenyBy("bookinfo.deny"),
        ),
        (
            "DENY by path ignores the query",
            vec![deny(vec![to(paths(&["/admin"]))])],
            Req::get("/admin?x=1"),
            Want::DenyBy("bookinfo.deny"),
        ),
        (
            "DENY by path: case matters",
            vec![deny(vec![to(paths(&["/admin"]))])],
            Req::get("/ADMIN"),
            Want::Allow,
        ),
        (
            "DENY by path: // is not merged (Istio's default)",
            vec![deny(vec![to(paths(&["/a/b"]))])],
            Req::get("/a//b"),
            Want::Allow,
        ),
        (
            "notPaths",
            vec![allow(vec![to(wp::Operation { not_paths: s(&["/private*"]), ..Default::default() })])],
            Req::get("/private/x"),
            Want::DenyNoAllow,
        ),
        (
            "path template {*}",
            vec![allow(vec![to(paths(&["/users/{*}/profile"]))])],
            Req::get("/users/7/profile"),
            Want::Allow,
        ),
        (
            "path template {*} is one segment",
            vec![allow(vec![to(paths(&["/users/{*}/profile"]))])],
            Req::get("/users/7/8/profile"),
            Want::DenyNoAllow,
        ),
        (
            "path template {**}",
            vec![allow(vec![to(paths(&["/files/{**}"]))])],
            Req::get("/files/a/b/c.txt"),
            Want::Allow,
        ),
        (
            "a path that cannot be normalized is denied",
            vec![allow(vec![wp::Rule::default()])],
            Req::get("/a%00"),
            Want::DenyNoAllow,
        ),
        (
            "when on a header (name case-insensitive)",
            vec![allow(vec![when("request.headers[X-Tenant]", &["blue"], &[])])],
            Req::get("/").with(|r| {
                r.headers.insert("x-tenant", HeaderValue::from_static("blue"));
            }),
            Want::Allow,
        ),
        (
            "when on a header: other value",
            vec![allow(vec![when("request.headers[x-tenant]", &["blue"], &[])])],
            Req::get("/").with(|r| {
                r.headers.insert("x-tenant", HeaderValue::from_static("green"));
            }),
            Want::DenyNoAllow,
        ),
        (
            "when on a header: absent",
            vec![allow(vec![when("request.headers[x-tenant]", &["*"], &[])])],
            Req::get("/"),
            Want::DenyNoAllow,
        ),
        (
            "when on a header: * is presence, even empty",
            vec![allow(vec![when("request.headers[x-tenant]", &["*"], &[])])],
            Req::get("/").with(|r| {
                r.headers.insert("x-tenant", HeaderValue::from_static(""));
            }),
            Want::Allow,
        ),
        (
            "when on a header: repeated values are joined with ,",
            vec![allow(vec![when("request.headers[x-tenant]", &["blue,green"], &[])])],
            Req::get("/").with(|r| {
                r.headers.append("x-tenant", HeaderValue::from_static("blue"));
                r.headers.append("x-tenant", HeaderValue::from_static("green"));
            }),
            Want::Allow,
        ),
        (
            "notValues on a header: absent header holds",
            vec![deny(vec![when("request.headers[x-debug]", &[], &["off"])])],
            Req::get("/"),
            Want::DenyBy("bookinfo.deny"),
        ),
        (
            "requestPrincipals with a JWT",
            vec![allow(vec![from(wp::Source {
                request_principals: s(&["https://idp.example.com/alice"]),
                ..Default::default()
            })])],
            Req::get("/").jwt("https://idp.example.com", "alice", json!({})),
            Want::Allow,
        ),
        (
            "requestPrincipals without a JWT",
            vec![allow(vec![from(wp::Source { request_principals: s(&["*"]), ..Default::default() })])],
            Req::get("/"),
            Want::DenyNoAllow,
        ),
        (
            "requestPrincipals * with a JWT",
            vec![allow(vec![from(wp::Source { request_principals: s(&["*"]), ..Default::default() })])],
            Req::get("/").jwt("https://idp.example.com", "alice", json!({})),
            Want::Allow,
        ),
        (
            "notRequestPrincipals * denies without a JWT",
            vec![deny(vec![from(wp::Source { not_request_principals: s(&["*"]), ..Default::default() })])],
            Req::get("/"),
            Want::DenyBy("bookinfo.deny"),
        ),
        (
            "requestPrincipals issuer suffix form *x/sub",
            vec![allow(vec![from(wp::Source {
                request_principals: s(&["*.example.com/alice"]),
                ..Default::default()
            })])],
            Req::get("/").jwt("https://idp.example.com", "alice", json!({})),
            Want::Allow,
        ),
        (
            "requestPrincipals iss/x* subject prefix",
            vec![allow(vec![from(wp::Source {
                request_principals: s(&["https://idp.example.com/svc-*"]),
                ..Default::default()
            })])],
            Req::get("/").jwt("https://idp.example.com", "alice", json!({})),
            Want::DenyNoAllow,
        ),
        (
            "host exact, case-insensitive",
            vec![allow(vec![to(wp::Operation {
                hosts: s(&["Reviews.Bookinfo.svc.cluster.local:9080"]),
                ..Default::default()
            })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "host without port does not match an authority with one (Istio)",
            vec![allow(vec![to(wp::Operation {
                hosts: s(&["reviews.bookinfo.svc.cluster.local"]),
                ..Default::default()
            })])],
            Req::get("/"),
            Want::DenyNoAllow,
        ),
        (
            "host prefix form host:*",
            vec![allow(vec![to(wp::Operation {
                hosts: s(&["reviews.bookinfo.svc.cluster.local:*"]),
                ..Default::default()
            })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "host suffix form, authority in upper case",
            vec![allow(vec![to(wp::Operation {
                hosts: s(&["*.svc.cluster.local:9080"]),
                ..Default::default()
            })])],
            Req::get("/").with(|r| r.host = "REVIEWS.bookinfo.SVC.cluster.local:9080".into()),
            Want::Allow,
        ),
        (
            "notHosts",
            vec![deny(vec![to(wp::Operation { not_hosts: s(&["reviews*"]), ..Default::default() })])],
            Req::get("/").with(|r| r.host = "ratings:9080".into()),
            Want::DenyBy("bookinfo.deny"),
        ),
        (
            "notHosts: the named host passes",
            vec![deny(vec![to(wp::Operation { not_hosts: s(&["reviews*"]), ..Default::default() })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "method is case-sensitive",
            vec![allow(vec![to(wp::Operation { methods: s(&["get"]), ..Default::default() })])],
            Req::get("/"),
            Want::DenyNoAllow,
        ),
        (
            "ports: the service port",
            vec![allow(vec![to(wp::Operation { ports: vec![9080], ..Default::default() })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "notPorts",
            vec![deny(vec![to(wp::Operation { not_ports: vec![9080], ..Default::default() })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "namespaces and notNamespaces",
            vec![allow(vec![from(wp::Source {
                namespaces: s(&["book*"]),
                not_namespaces: s(&["bookstore"]),
                ..Default::default()
            })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "serviceAccounts: sa alone is in the policy's namespace",
            vec![allow(vec![from(wp::Source {
                service_accounts: s(&["productpage"]),
                ..Default::default()
            })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "serviceAccounts: ns/sa",
            vec![allow(vec![from(wp::Source {
                service_accounts: s(&["other/productpage"]),
                ..Default::default()
            })])],
            Req::get("/"),
            Want::DenyNoAllow,
        ),
        (
            "ipBlocks match the source ip",
            vec![allow(vec![from(wp::Source { ip_blocks: s(&["10.0.0.0/24"]), ..Default::default() })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "remoteIpBlocks match the remote ip, not the source",
            vec![deny(vec![from(wp::Source {
                remote_ip_blocks: s(&["203.0.113.0/24"]),
                ..Default::default()
            })])],
            Req::get("/").with(|r| r.remote_ip = "203.0.113.9".parse().unwrap()),
            Want::DenyBy("bookinfo.deny"),
        ),
        (
            "notIpBlocks",
            vec![deny(vec![from(wp::Source { not_ip_blocks: s(&["10.0.0.5"]), ..Default::default() })])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "when source.ip / destination.ip / destination.port",
            vec![allow(vec![wp::Rule {
                when: vec![
                    wp::Condition { key: "source.ip".into(), values: s(&["10.0.0.0/8"]), not_values: vec![] },
                    wp::Condition {
                        key: "destination.ip".into(),
                        values: s(&["10.96.0.10"]),
                        not_values: vec![],
                    },
                    wp::Condition {
                        key: "destination.port".into(),
                        values: s(&["9080"]),
                        not_values: vec![],
                    },
                ],
                ..Default::default()
            }])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "when remote.ip notValues",
            vec![deny(vec![when("remote.ip", &[], &["10.0.0.0/8"])])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "when source.namespace and source.principal",
            vec![allow(vec![wp::Rule {
                when: vec![
                    wp::Condition {
                        key: "source.namespace".into(),
                        values: s(&["bookinfo"]),
                        not_values: vec![],
                    },
                    wp::Condition {
                        key: "source.principal".into(),
                        values: s(&["cluster.local/ns/bookinfo/sa/*"]),
                        not_values: vec![],
                    },
                ],
                ..Default::default()
            }])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "when request.auth.principal",
            vec![allow(vec![when("request.auth.principal", &["https://idp.example.com/alice"], &[])])],
            Req::get("/").jwt("https://idp.example.com", "alice", json!({})),
            Want::Allow,
        ),
        (
            "when request.auth.audiences (list)",
            vec![allow(vec![when("request.auth.audiences", &["reviews"], &[])])],
            Req::get("/").jwt("iss", "sub", json!({"aud": ["ratings", "reviews"]})),
            Want::Allow,
        ),
        (
            "when request.auth.presenter",
            vec![allow(vec![when("request.auth.presenter", &["frontend*"], &[])])],
            Req::get("/").jwt("iss", "sub", json!({"azp": "frontend-web"})),
            Want::Allow,
        ),
        (
            "claim: string",
            vec![allow(vec![when("request.auth.claims[role]", &["admin"], &[])])],
            Req::get("/").jwt("iss", "sub", json!({"role": "admin"})),
            Want::Allow,
        ),
        (
            "claim: list, any element",
            vec![allow(vec![when("request.auth.claims[groups]", &["dev"], &[])])],
            Req::get("/").jwt("iss", "sub", json!({"groups": ["ops", "dev"]})),
            Want::Allow,
        ),
        (
            "claim: nested",
            vec![allow(vec![when("request.auth.claims[realm][roles]", &["reader"], &[])])],
            Req::get("/").jwt("iss", "sub", json!({"realm": {"roles": ["reader"]}})),
            Want::Allow,
        ),
        (
            "claim: nested, other value",
            vec![allow(vec![when("request.auth.claims[realm][roles]", &["writer"], &[])])],
            Req::get("/").jwt("iss", "sub", json!({"realm": {"roles": ["reader"]}})),
            Want::DenyNoAllow,
        ),
        (
            "claim: a number never matches",
            vec![allow(vec![when("request.auth.claims[level]", &["3"], &[])])],
            Req::get("/").jwt("iss", "sub", json!({"level": 3})),
            Want::DenyNoAllow,
        ),
        (
            "claim: without a JWT",
            vec![allow(vec![when("request.auth.claims[role]", &["admin"], &[])])],
            Req::get("/"),
            Want::DenyNoAllow,
        ),
        (
            "connection.sni: none inside HBONE",
            vec![allow(vec![when("connection.sni", &["*"], &[])])],
            Req::get("/"),
            Want::DenyNoAllow,
        ),
        (
            "connection.sni",
            vec![allow(vec![when("connection.sni", &["*.example.com"], &[])])],
            Req::get("/").with(|r| r.sni = Some("api.example.com".into())),
            Want::Allow,
        ),
        ("empty-rules ALLOW denies all", vec![allow(vec![])], Req::get("/"), Want::DenyNoAllow),
        ("empty-rules DENY denies nothing", vec![deny(vec![])], Req::get("/"), Want::Allow),
        (
            "a rule with nothing matches all",
            vec![deny(vec![wp::Rule::default()])],
            Req::get("/"),
            Want::DenyBy("bookinfo.deny"),
        ),
        (
            "one of from, one of to",
            vec![allow(vec![wp::Rule {
                from: vec![
                    wp::Source { namespaces: s(&["other"]), ..Default::default() },
                    wp::Source { namespaces: s(&["bookinfo"]), ..Default::default() },
                ],
                to: vec![paths(&["/x"]), paths(&["/"])],
                when: vec![],
            }])],
            Req::get("/"),
            Want::Allow,
        ),
        (
            "unknown when key: an ALLOW does not allow",
            vec![allow(vec![when(
                "experimental.envoy.filters.network.mysql_proxy[db.table]",
                &["[update]"],
                &[],
            )])],
            Req::get("/"),
            Want::DenyNoAllow,
        ),
        (
            "unknown when key: a DENY still denies",
            vec![deny(vec![when("source.user", &["x"], &[])])],
            Req::get("/"),
            Want::DenyBy("bookinfo.deny"),
        ),
        (
            "AUDIT never blocks",
            vec![policy("audit", WpAction::Audit, vec![wp::Rule::default()])],
            Req::get("/"),
            Want::Allow,
        ),
    ];
    for (name, policies, req, want) in cases {
        assert_eq!(check(&policies, &req), want, "{name}");
    }
}

#[test]
fn audit_is_listed_and_never_changes_the_verdict() {
    let audit = policy("audit", WpAction::Audit, vec![to(paths(&["/admin*"]))]);
    let quiet = policy("quiet", WpAction::Audit, vec![to(paths(&["/other"]))]);
    let deny = deny(vec![to(paths(&["/admin/secret"]))]);
    let policies = [&audit, &quiet, &deny];
    assert_eq!(
        authorize(&policies, &Req::get("/admin/x").request()),
        Decision::Allow { audited: vec!["bookinfo.audit".into()] }
    );
    assert_eq!(
        authorize(&policies, &Req::get("/admin/secret").request()),
        Decision::Deny {
            policy: Some("bookinfo.deny".into()),
            reason: "DENY policy bookinfo.deny matched".into(),
            audited: vec!["bookinfo.audit".into()],
        }
    );
}

#[test]
fn custom_without_provider_denies_naming_it() {
    let mut p = proto("custom", WpAction::Custom, vec![to(paths(&["/admin*"]))]);
    p.provider = "my-ext-authz".into();
    let custom = Policy::try_from(&p).unwrap();
    let allow_all = allow(vec![wp::Rule::default()]);
    let policies = [&allow_all, &custom];
    assert_eq!(
        authorize(&policies, &Req::get("/admin").request()),
        Decision::Deny {
            policy: Some("bookinfo.custom".into()),
            reason: "CUSTOM policy bookinfo.custom names extension provider \"my-ext-authz\", which is not configured"
                .into(),
            audited: vec![],
        }
    );
    assert!(authorize(&policies, &Req::get("/public").request()).is_allow());
    // CUSTOM comes before DENY.
    let deny_admin = deny(vec![to(paths(&["/admin*"]))]);
    assert!(matches!(
        authorize(&[&deny_admin, &custom], &Req::get("/admin").request()),
        Decision::Deny { policy: Some(p), .. } if p == "bookinfo.custom"
    ));
}

#[test]
fn no_allow_match_names_the_policies_checked() {
    let a = allow(vec![to(paths(&["/x"]))]);
    assert_eq!(
        authorize(&[&a], &Req::get("/y").request()),
        Decision::Deny {
            policy: None,
            reason: "no ALLOW policy matched (checked bookinfo.allow)".into(),
            audited: vec![]
        }
    );
}

#[test]
fn conversion_errors_name_the_field() {
    let cases: Vec<(&str, wp::AuthorizationPolicy, &str)> = vec![
        (
            "malformed CIDR",
            proto(
                "p",
                WpAction::Allow,
                vec![wp::Rule {
                    from: vec![
                        wp::Source { namespaces: s(&["a"]), ..Default::default() },
                        wp::Source { ip_blocks: s(&["10.0.0.1", "10.0.0.0/8", "10.0.0.0/33"]), ..Default::default() },
                    ],
                    ..Default::default()
                }],
            ),
            "rules[0].from[1].source.ipBlocks[2]: \"10.0.0.0/33\" is not a CIDR (prefix length 33 is longer than 32 for 10.0.0.0)",
        ),
        (
            "not an address",
            proto("p", WpAction::Deny, vec![when("remote.ip", &[], &["nope"])]),
            "rules[0].when[0].notValues[0]: \"nope\" is not a CIDR (\"nope\" is not an IP address)",
        ),
        (
            "port",
            proto("p", WpAction::Allow, vec![to(wp::Operation { ports: vec![70000], ..Default::default() })]),
            "rules[0].to[0].operation.ports[0]: 70000 is not a port number",
        ),
        (
            "destination.port value",
            proto("p", WpAction::Allow, vec![when("destination.port", &["http"], &[])]),
            "rules[0].when[0].values[0]: \"http\" is not a port number",
        ),
        (
            "empty source",
            proto("p", WpAction::Deny, vec![from(wp::Source::default())]),
            "rules[0].from[0].source: empty (Istio's validation refuses a source without fields)",
        ),
        (
            "empty operation",
            proto("p", WpAction::Deny, vec![to(wp::Operation::default())]),
            "rules[0].to[0].operation: empty (Istio's validation refuses an operation without fields)",
        ),
        (
            "condition without values",
            proto("p", WpAction::Deny, vec![when("source.ip", &[], &[])]),
            "rules[0].when[0]: one of values and notValues must be set",
        ),
        (
            "header key without name",
            proto("p", WpAction::Deny, vec![when("request.headers[]", &["x"], &[])]),
            "rules[0].when[0].key: \"request.headers[]\" is not request.headers[<name>]",
        ),
        (
            "claims key malformed",
            proto("p", WpAction::Deny, vec![when("request.auth.claims[a", &["x"], &[])]),
            "rules[0].when[0].key: \"request.auth.claims[a\" is not request.auth.claims[<name>]...",
        ),
        (
            "path template operator not last",
            proto("p", WpAction::Deny, vec![to(paths(&["/a/{**}/b"]))]),
            "rules[0].to[0].operation.paths[0]: \"/a/{**}/b\": {**} must be the last segment",
        ),
        (
            "CUSTOM without provider",
            proto("p", WpAction::Custom, vec![]),
            "provider: a CUSTOM policy must name an extension provider",
        ),
        (
            "unknown action",
            wp::AuthorizationPolicy { action: 9, ..proto("p", WpAction::Allow, vec![]) },
            "action: unknown value 9",
        ),
    ];
    for (name, p, want) in cases {
        assert_eq!(Policy::try_from(&p).unwrap_err(), want, "{name}");
    }
}

#[test]
fn unknown_keys_are_listed() {
    let p = policy("p", WpAction::Deny, vec![when("experimental.envoy.filters.a.b[c]", &["x"], &[])]);
    assert_eq!(p.unsupported, vec!["rules[0].when[0].key: \"experimental.envoy.filters.a.b[c]\"".to_owned()]);
    assert_eq!(p.key(), "bookinfo.p");
}

#[test]
fn request_principal_forms() {
    let cases: &[(&str, &str, &str, bool)] = &[
        ("*", "iss", "sub", true),
        ("iss/sub", "iss", "sub", true),
        ("https://a.example/sub", "https://a.example", "sub", true),
        ("https://a.example/sub", "https://b.example", "sub", false),
        ("*/sub", "anything", "sub", true),
        ("*.example/sub", "https://a.example", "sub", true),
        ("*ub", "anything", "sub", true),
        ("iss/*", "iss", "x", true),
        ("iss/s*", "iss", "sub", true),
        ("iss/s*", "other", "sub", false),
        ("is*", "iss", "anything", true),
        ("iss", "iss", "sub", false),
    ];
    for (value, iss, sub, want) in cases {
        let m = RequestPrincipalMatch::parse(value);
        assert_eq!(m.matches(Some((iss, sub))), *want, "{value} vs {iss}/{sub}");
        assert!(!m.matches(None), "{value} without JWT");
    }
}

#[test]
fn normalization() {
    let cases: &[(&str, Result<&str, ()>)] = &[
        ("/", Ok("/")),
        ("/a//b", Ok("/a//b")),
        ("/a/./b", Ok("/a/b")),
        ("/a/../b", Ok("/b")),
        ("/../a", Ok("/a")),
        ("/a/b/../../../c", Ok("/c")),
        ("/a/..", Ok("/")),
        ("/a/b/..", Ok("/a/")),
        ("/a/.", Ok("/a/")),
        ("/a/.b/..c", Ok("/a/.b/..c")),
        ("/a/%2e%2E/b", Ok("/b")),
        ("/a/%2e/b", Ok("/a/b")),
        ("/a%2Fb", Ok("/a%2Fb")),
        ("/a%2fb", Ok("/a%2fb")),
        ("/a/..%2fb", Ok("/a/..%2fb")),
        ("/a%5Cb", Ok("/a%5Cb")),
        ("/a\\b", Ok("/a/b")),
        ("/a\\..\\b", Ok("/b")),
        ("/%41", Ok("/A")),
        ("/%7e%2D%5f%30%61", Ok("/~-_0a")),
        ("/%25%20%3F", Ok("/%25%20%3F")),
        ("/A", Ok("/A")),
        ("/a", Ok("/a")),
        ("/a?x=1&y=/../z", Ok("/a")),
        ("/a?", Ok("/a")),
        ("/a b\"<>", Ok("/a%20b%22%3C%3E")),
        ("/é", Ok("/%C3%A9")),
        ("/%zz%4", Ok("/%zz%4")),
        ("/%%30%30", Ok("/%2500")),
        ("/a#frag", Err(())),
        ("/a?b#frag", Err(())),
        ("/a%00b", Err(())),
        ("/a\0b", Err(())),
        ("a/b", Err(())),
        ("", Err(())),
        ("*", Err(())),
    ];
    for (input, want) in cases {
        let got = normalize_path(input);
        match want {
            Ok(w) => assert_eq!(got.as_deref(), Ok(*w), "{input:?}"),
            Err(()) => assert!(got.is_err(), "{input:?} gave {got:?}"),
        }
    }
}

#[test]
fn normalization_never_panics_and_is_stable() {
    // A deterministic spread of inputs over the bytes that matter.
    const ALPHABET: &[u8] = b"/\\.%2eEfF05aZ?#\0 \x80\xff";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        let mut input = vec![b'/'];
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = (state % 12) as usize;
        let mut x = state;
        for _ in 0..len {
            input.push(ALPHABET[(x % ALPHABET.len() as u64) as usize]);
            x /= ALPHABET.len() as u64;
        }
        if let Ok(once) = normalize_path_bytes(&input) {
            assert!(once.starts_with('/'), "{input:?}");
            assert_eq!(normalize_path(&once), Ok(once.clone()), "not idempotent on {input:?}");
        }
    }
    for input in [&b""[..], b"%", b"/%", b"/%2", b"/.%2", b"/..%2e", b"/%%%", b"\xff\xfe"] {
        let _ = normalize_path_bytes(input);
    }
}

#[test]
fn remote_ip_from_forwarded_for() {
    let peer: IpAddr = "10.0.0.5".parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.append("x-forwarded-for", HeaderValue::from_static("203.0.113.1, 198.51.100.2"));
    headers.append("x-forwarded-for", HeaderValue::from_static("192.0.2.3"));
    let cases: &[(u32, &str)] =
        &[(0, "10.0.0.5"), (1, "192.0.2.3"), (2, "198.51.100.2"), (3, "203.0.113.1"), (4, "10.0.0.5")];
    for (n, want) in cases {
        assert_eq!(remote_ip(peer, &headers, *n), want.parse::<IpAddr>().unwrap(), "{n}");
    }
    assert_eq!(remote_ip(peer, &HeaderMap::new(), 1), peer);
}

#[test]
fn denial_constants() {
    assert_eq!(DENIED_BODY, "RBAC: access denied");
    assert_eq!((DENIED_STATUS, GRPC_PERMISSION_DENIED), (403, 7));
}
