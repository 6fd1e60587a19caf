//! Table tests of the waypoint translation with Istio's own examples (request routing, canary
//! traffic shifting, circuit breaking, JWT), each in every API version Istio serves.

use weft_config::load_yaml;
use weft_core::proto::weft::waypoint::v1::{
    self as wp, authorization_policy::Action, string_match::MatchType,
};

use super::waypoint::waypoint;
use super::*;
use crate::model::Change;
use crate::xds::WAYPOINT_TYPE_URL;

const TD: &str = "cluster.local";

/// The bookinfo namespace using the waypoint `waypoint`, with two services bound to it and one
/// (`ratings`) that opts out.
const BOOKINFO: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {clusterIP: 10.96.0.10, selector: {app: reviews}, ports: [{port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: bookinfo}
spec: {clusterIP: 10.96.0.11, selector: {app: httpbin}, ports: [{port: 8000, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.12, selector: {app: ratings}, ports: [{port: 9080}]}
"#;

fn model(docs: &[&str]) -> Model {
    let mut model = Model::default();
    for yaml in docs {
        for doc in load_yaml(yaml, "test.yaml") {
            model.apply(Change::Upsert(Box::new(doc.result.unwrap().object)));
        }
    }
    model
}

/// The waypoint `bookinfo/waypoint` of a model made of BOOKINFO and `extra`.
fn bookinfo_waypoint(extra: &str) -> wp::Waypoint {
    let model = model(&[BOOKINFO, extra]);
    let gateway = model
        .objects()
        .find_map(|o| match o {
            Object::KubeGateway(g) => Some(g),
            _ => None,
        })
        .unwrap();
    waypoint(&model, gateway, TD)
}

fn service<'w>(w: &'w wp::Waypoint, name: &str) -> &'w wp::Service {
    w.services.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no service {name} in {w:#?}"))
}

fn exact(s: &str) -> Option<wp::StringMatch> {
    Some(wp::StringMatch { match_type: Some(MatchType::Exact(s.into())) })
}

fn to(host: &str, subset: &str, weight: u32) -> wp::WeightedDestination {
    wp::WeightedDestination {
        destination: Some(wp::Destination { host: host.into(), subset: subset.into(), port: 0 }),
        weight,
        headers: None,
    }
}

fn secs(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";

/// Istio's "request routing" and "traffic shifting" examples: `jason` goes to v2, everyone else
/// is split 75/25 between v1 and v3, with the subsets from the DestinationRule.
fn canary(networking: &str) -> String {
    format!(
        r#"
apiVersion: {networking}
kind: VirtualService
metadata: {{name: reviews, namespace: bookinfo}}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {{exact: jason}}
    route:
    - destination: {{host: reviews, subset: v2}}
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: 75
    - destination: {{host: reviews, subset: v3}}
      weight: 25
---
apiVersion: {networking}
kind: DestinationRule
metadata: {{name: reviews, namespace: bookinfo}}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {{simple: RANDOM}}
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
    trafficPolicy:
      loadBalancer: {{simple: ROUND_ROBIN}}
  - name: v3
    labels: {{version: v3}}
"#
    )
}

#[test]
fn canary_virtual_service_and_its_subsets_in_every_networking_version() {
    let lb = |simple: wp::load_balancer::Simple| {
        Some(wp::TrafficPolicy {
            load_balancer: Some(wp::LoadBalancer { simple: simple as i32, ..Default::default() }),
            ..Default::default()
        })
    };
    let subset = |name: &str, policy| wp::Subset {
        name: name.into(),
        labels: [("version".to_owned(), name.to_owned())].into(),
        traffic_policy: policy,
    };
    let expected = wp::Service {
        hostname: REVIEWS.into(),
        name: "reviews".into(),
        namespace: "bookinfo".into(),
        ports: vec![9080],
        http_routes: vec![
            wp::HttpRoute {
                virtual_service: "bookinfo/reviews".into(),
                matches: vec![wp::HttpMatch {
                    headers: [("end-user".to_owned(), exact("jason").unwrap())].into(),
                    ..Default::default()
                }],
                destinations: vec![to(REVIEWS, "v2", 100)],
                ..Default::default()
            },
            wp::HttpRoute {
                virtual_service: "bookinfo/reviews".into(),
                destinations: vec![to(REVIEWS, "v1", 75), to(REVIEWS, "v3", 25)],
                ..Default::default()
            },
        ],
        traffic_policy: lb(wp::load_balancer::Simple::Random),
        subsets: vec![
            subset("v1", lb(wp::load_balancer::Simple::Random)),
            subset("v2", lb(wp::load_balancer::Simple::RoundRobin)),
            subset("v3", lb(wp::load_balancer::Simple::Random)),
        ],
        virtual_services: vec!["bookinfo/reviews".into()],
        destination_rule: "bookinfo/reviews".into(),
        ..Default::default()
    };
    for version in ["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"] {
        let w = bookinfo_waypoint(&canary(version));
        assert_eq!(service(&w, "reviews"), &expected, "{version}");
        // Config for one host leaves the others alone; a service that opts out is not there.
        assert!(service(&w, "httpbin").http_routes.is_empty(), "{version}");
        assert!(!w.services.iter().any(|s| s.name == "ratings"), "{version}");
    }
}

/// Istio's circuit-breaking example.
fn circuit_breaker(networking: &str) -> String {
    format!(
        r#"
apiVersion: {networking}
kind: DestinationRule
metadata: {{name: httpbin, namespace: bookinfo}}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: 1}}
      http: {{http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}}
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"#
    )
}

#[test]
fn circuit_breaking_destination_rule_in_every_networking_version() {
    let expected = wp::TrafficPolicy {
        connection_pool: Some(wp::ConnectionPool {
            max_connections: 1,
            http1_max_pending_requests: 1,
            max_requests_per_connection: 1,
            ..Default::default()
        }),
        outlier_detection: Some(wp::OutlierDetection {
            consecutive_5xx_errors: 1,
            interval: secs(1),
            base_ejection_time: secs(180),
            max_ejection_percent: 100,
            // Istio's default, filled in.
            consecutive_local_origin_failures: 5,
            ..Default::default()
        }),
        ..Default::default()
    };
    for version in ["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"] {
        let w = bookinfo_waypoint(&circuit_breaker(version));
        let httpbin = service(&w, "httpbin");
        assert_eq!(httpbin.traffic_policy.as_ref(), Some(&expected), "{version}");
        assert_eq!(httpbin.destination_rule, "bookinfo/httpbin");
        assert!(httpbin.subsets.is_empty());
        assert_eq!(service(&w, "reviews").traffic_policy, None, "{version}");
    }
}

/// Istio's ambient JWT example: a RequestAuthentication and an AuthorizationPolicy requiring a
/// request principal, both targeting the waypoint; plus an L7 policy targeting one Service.
fn jwt(security: &str) -> String {
    format!(
        r#"
apiVersion: {security}
kind: RequestAuthentication
metadata: {{name: jwt-example, namespace: bookinfo}}
spec:
  targetRef: {{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}
  jwtRules:
  - issuer: testing@secure.istio.io
    jwksUri: https://raw.githubusercontent.com/istio/istio/release-1.24/security/tools/jwt/samples/jwks.json
    forwardOriginalToken: true
---
apiVersion: {security}
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: bookinfo}}
spec:
  targetRef: {{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}
  action: ALLOW
  rules:
  - from:
    - source: {{requestPrincipals: [testing@secure.istio.io/testing@secure.istio.io]}}
---
apiVersion: {security}
kind: AuthorizationPolicy
metadata: {{name: httpbin-get, namespace: bookinfo}}
spec:
  targetRefs: [{{kind: Service, group: "", name: httpbin}}]
  action: DENY
  rules:
  - to: [{{operation: {{methods: [POST], paths: ["/admin*"], ports: ["8080"]}}}}]
    when: [{{key: "request.headers[x-debug]", values: ["1"]}}]
---
apiVersion: {security}
kind: AuthorizationPolicy
metadata: {{name: l4-only, namespace: bookinfo}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: DENY
"#
    )
}

#[test]
fn request_authentication_and_l7_policies_in_every_security_version() {
    for version in ["security.istio.io/v1", "security.istio.io/v1beta1"] {
        let w = bookinfo_waypoint(&jwt(version));
        assert_eq!(
            w.request_authentications,
            vec![wp::RequestAuthentication {
                name: "jwt-example".into(),
                namespace: "bookinfo".into(),
                jwt_rules: vec![wp::JwtRule {
                    issuer: "testing@secure.istio.io".into(),
                    jwks_uri: "https://raw.githubusercontent.com/istio/istio/release-1.24/security/tools/jwt/samples/jwks.json".into(),
                    forward_original_token: true,
                    ..Default::default()
                }],
            }],
            "{version}"
        );
        assert_eq!(
            w.policies,
            vec![wp::AuthorizationPolicy {
                name: "require-jwt".into(),
                namespace: "bookinfo".into(),
                action: Action::Allow as i32,
                rules: vec![wp::Rule {
                    from: vec![wp::Source {
                        request_principals: vec!["testing@secure.istio.io/testing@secure.istio.io".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                provider: String::new(),
            }],
            "{version}"
        );
        // The Service-targeted policy is on that service only; the selector policy is ztunnel's.
        assert_eq!(
            service(&w, "httpbin").policies,
            vec![wp::AuthorizationPolicy {
                name: "httpbin-get".into(),
                namespace: "bookinfo".into(),
                action: Action::Deny as i32,
                rules: vec![wp::Rule {
                    to: vec![wp::Operation {
                        methods: vec!["POST".into()],
                        paths: vec!["/admin*".into()],
                        ports: vec![8080],
                        ..Default::default()
                    }],
                    when: vec![wp::Condition {
                        key: "request.headers[x-debug]".into(),
                        values: vec!["1".into()],
                        not_values: vec![],
                    }],
                    ..Default::default()
                }],
                provider: String::new(),
            }],
            "{version}"
        );
        assert!(service(&w, "reviews").policies.is_empty(), "{version}");
        assert!(w.identity.ends_with("/ns/bookinfo/sa/waypoint"), "{}", w.identity);
    }
}

#[test]
fn route_details_are_carried() {
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: bookinfo, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  hosts: [httpbin.bookinfo.svc.cluster.local]
  http:
  - name: slow
    match: [{uri: {prefix: /delay}, method: {exact: GET}, port: 8000}]
    route: [{destination: {host: httpbin, port: {number: 8000}}}]
    timeout: 500ms
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "5xx, connect-failure"}
    fault:
      delay: {fixedDelay: 7s, percentage: {value: 10}}
      abort: {httpStatus: 503, percentage: {value: 0.5}}
    mirror: {host: httpbin-shadow}
    mirrorPercentage: {value: 20}
    rewrite: {uri: /}
    headers: {request: {set: {x-env: test}}}
  - name: moved
    match: [{uri: {exact: /old}}]
    redirect: {uri: /new, redirectCode: 308}
  - name: canned
    directResponse: {status: 418, body: {string: teapot}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: older, namespace: bookinfo, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  hosts: ["*.bookinfo.svc.cluster.local"]
  gateways: [mesh]
  http: [{name: first, route: [{destination: {host: httpbin}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ingress-only, namespace: bookinfo}
spec:
  hosts: [httpbin]
  gateways: [istio-system/ingress]
  http: [{route: [{destination: {host: nowhere}}]}]
"#;
    let w = bookinfo_waypoint(vs);
    let httpbin = service(&w, "httpbin");
    // Oldest VirtualService first; the gateway-bound one is not the waypoint's.
    assert_eq!(httpbin.virtual_services, ["bookinfo/older", "bookinfo/httpbin"]);
    let names: Vec<&str> = httpbin.http_routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["first", "slow", "moved", "canned"]);
    let slow = &httpbin.http_routes[1];
    let m = &slow.matches[0];
    assert_eq!(m.uri, Some(wp::StringMatch { match_type: Some(MatchType::Prefix("/delay".into())) }));
    assert_eq!((m.method.clone(), m.port), (exact("GET"), 8000));
    assert_eq!(
        slow.destinations,
        [wp::WeightedDestination {
            destination: Some(wp::Destination {
                host: "httpbin.bookinfo.svc.cluster.local".into(),
                subset: String::new(),
                port: 8000
            }),
            weight: 100,
            headers: None,
        }]
    );
    assert_eq!(slow.timeout, Some(prost_types::Duration { seconds: 0, nanos: 500_000_000 }));
    let retries = slow.retries.as_ref().unwrap();
    assert_eq!((retries.attempts, retries.per_try_timeout), (3, secs(2)));
    assert_eq!(retries.retry_on, ["5xx", "connect-failure"]);
    let fault = slow.fault.as_ref().unwrap();
    assert_eq!(fault.delay.as_ref().map(|d| (d.fixed_delay, d.percentage)), Some((secs(7), 10.0)));
    assert_eq!(fault.abort.as_ref().map(|a| (a.http_status, a.percentage)), Some((503, 0.5)));
    assert_eq!(slow.mirrors.len(), 1);
    assert_eq!(slow.mirrors[0].percentage, 20.0);
    assert_eq!(
        slow.mirrors[0].destination.as_ref().unwrap().host,
        "httpbin-shadow.bookinfo.svc.cluster.local"
    );
    assert_eq!(slow.rewrite.as_ref().unwrap().uri, "/");
    assert_eq!(slow.headers.as_ref().unwrap().request.as_ref().unwrap().set["x-env"], "test");
    let moved = httpbin.http_routes[2].redirect.as_ref().unwrap();
    assert_eq!((moved.uri.as_str(), moved.redirect_code), ("/new", 308));
    let canned = httpbin.http_routes[3].direct_response.as_ref().unwrap();
    assert_eq!((canned.status, canned.body.as_slice()), (418, b"teapot".as_slice()));
}

#[test]
fn the_destination_rule_of_the_service_namespace_wins_and_exact_beats_wildcard() {
    let drs = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh-default, namespace: istio-system}
spec: {host: "*.svc.cluster.local", trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: wildcard, namespace: bookinfo}
spec: {host: "*.bookinfo.svc.cluster.local", trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec: {host: reviews, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: sidecar-only, namespace: bookinfo}
spec: {host: httpbin, workloadSelector: {matchLabels: {app: x}}}
"#;
    let w = bookinfo_waypoint(drs);
    assert_eq!(service(&w, "reviews").destination_rule, "bookinfo/reviews");
    assert_eq!(service(&w, "httpbin").destination_rule, "bookinfo/wildcard");
    let w = bookinfo_waypoint(drs.split("---").next().unwrap());
    assert_eq!(service(&w, "httpbin").destination_rule, "istio-system/mesh-default");
}

#[test]
fn each_waypoint_receives_only_its_own_configuration() {
    let other = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other, namespace: bookinfo}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: bookinfo}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}
"#;
    let snapshot = snapshot(&model(&[BOOKINFO, other]), TD, DEFAULT_CLUSTER_ID);
    let names: Vec<&str> = snapshot.resources(WAYPOINT_TYPE_URL).map(|r| r.name()).collect();
    assert_eq!(names, ["bookinfo/other", "bookinfo/waypoint"]);
    let node = |id: &str, waypoint: Option<&str>| {
        let mut info = NodeInfo::parse_id(id).unwrap();
        if let Some(name) = waypoint {
            info.metadata.insert(WAYPOINT_NAME_KEY.into(), name.into());
        }
        info
    };
    let selected = |info: &NodeInfo| -> Vec<String> {
        view().select(&snapshot, info, WAYPOINT_TYPE_URL).iter().map(|r| r.name().to_owned()).collect()
    };
    let waypoint_node =
        node("waypoint~10.0.0.9~waypoint-abc.bookinfo~bookinfo.svc.cluster.local", Some("waypoint"));
    assert_eq!(selected(&waypoint_node), ["bookinfo/waypoint"]);
    let ztunnel = node("ztunnel~10.0.0.2~ztunnel-x.istio-system~istio-system.svc.cluster.local", None);
    assert!(selected(&ztunnel).is_empty());
    // Every proxy still gets every address.
    assert_eq!(view().select(&snapshot, &waypoint_node, crate::xds::ADDRESS_TYPE_URL).len(), 3);
}
