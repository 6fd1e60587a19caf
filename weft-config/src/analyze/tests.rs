use super::*;
use crate::yaml::load_yaml;

/// Services, pods and a waypoint most cases build on.
const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: default, labels: {app: reviews, version: v1}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews-v2, namespace: default}
spec:
  template:
    metadata: {labels: {app: reviews, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: default}
spec:
  hosts: ["*.example.com"]
  ports: [{number: 443, name: tls, protocol: TLS}]
"#;

fn findings(extra: &str) -> Vec<Finding> {
    let mut docs = load_yaml(BASE, "base.yaml");
    docs.extend(load_yaml(extra, "case.yaml"));
    analyze(&docs)
}

/// The errors of [`findings`] (the base holds things Weft does not enforce, which warn).
fn errors(extra: &str) -> Vec<Finding> {
    findings(extra).into_iter().filter(|f| f.severity == Severity::Error).collect()
}

/// What [`unenforced::not_enforced`] says of these documents, as `Kind ns/name field: message`.
fn unenforced_of(docs: &[crate::yaml::LoadedDoc]) -> Vec<String> {
    let objects: Vec<&Object> = docs
        .iter()
        .filter_map(|d| d.result.as_ref().ok())
        .map(|d| &d.object)
        .filter(|o| !matches!(o, Object::Ignored(_)))
        .collect();
    unenforced::not_enforced(&objects, &AnalyzeOptions::default()).iter().map(ToString::to_string).collect()
}

/// A finding as `not_enforced` renders it (without the file and line).
fn without_position(f: &Finding) -> String {
    let shown = f.to_string();
    let prefix = format!("{}:{}: {}: ", f.file, f.line, f.severity);
    shown.strip_prefix(&prefix).unwrap_or(&shown).to_owned()
}

/// No errors, and no warning but what Weft does not enforce (the base's ServiceEntry,
/// DestinationRule and waypoint, and some of the good configurations below, which are Istio's
/// and valid).
#[test]
fn the_base_and_good_configurations_have_no_findings_but_what_is_not_enforced() {
    let good = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews.default.svc.cluster.local, subset: v2}, weight: 20}
    timeout: 10s
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: external}
spec:
  hosts: [api.example.com]
  tls:
  - match: [{port: 443, sniHosts: [api.example.com]}]
    route: [{destination: {host: api.example.com}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ingress}
spec:
  hosts: [bookinfo.example.org]
  gateways: [bookinfo-gateway]
  http: [{route: [{destination: {host: ratings, port: {number: 9080}}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/productpage]}}], to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-policy}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: default}}
"#;
    let mut docs = load_yaml(BASE, "base.yaml");
    docs.extend(load_yaml(good, "case.yaml"));
    let unenforced = unenforced_of(&docs);
    let found = analyze(&docs);
    let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert!(!unenforced.is_empty());
    assert_eq!(found.len(), unenforced.len(), "{shown:#?}");
    for f in &found {
        assert_eq!(f.severity, Severity::Warning, "{f}");
        assert!(unenforced.contains(&without_position(f)), "{f}\nnot in {unenforced:#?}");
    }
}

/// (manifest, severity, field, message substring)
type Case = (&'static str, Severity, &'static str, &'static str);

const CASES: &[Case] = &[
    // Subset not defined by the host's DestinationRule.
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews, subset: v3}}]}]\n",
        Severity::Error,
        "spec.http[0].route[0].destination.subset",
        "subset `v3` is not defined by DestinationRule default/reviews (it has subsets v1, v2); requests routed to it fail with 503",
    ),
    // Subset of a host that has no DestinationRule at all.
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [ratings]\n  http: [{route: [{destination: {host: ratings, subset: v1}}]}]\n",
        Severity::Error,
        "spec.http[0].route[0].destination.subset",
        "no DestinationRule for that host",
    ),
    // Weights.
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 80}\n    - {destination: {host: reviews, subset: v2}, weight: 30}\n",
        Severity::Error,
        "spec.http[0].route",
        "destination weights (80, 30) add up to 110, not 100",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  tcp:\n  - route:\n    - {destination: {host: reviews}}\n    - {destination: {host: ratings}}\n",
        Severity::Error,
        "spec.tcp[0].route",
        "destination weights (unset, unset) add up to 0, not 100",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews}, weight: 50}]}]\n",
        Severity::Error,
        "spec.http[0].route",
        "add up to 50, not 100",
    ),
    // Hosts.
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviewz]\n  http: [{route: [{destination: {host: reviews}}]}]\n",
        Severity::Error,
        "spec.hosts[0]",
        "host `reviewz` (reviewz.default.svc.cluster.local) matches no Service or ServiceEntry",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews.default}}]}]\n",
        Severity::Error,
        "spec.http[0].route[0].destination.host",
        "host `reviews.default` matches no Service or ServiceEntry",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: other}\nspec:\n  hosts: [reviews.default.svc.cluster.local]\n  http: [{route: [{destination: {host: reviews}}]}]\n",
        Severity::Error,
        "spec.http[0].route[0].destination.host",
        "(reviews.other.svc.cluster.local) matches no Service",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [api.example.org]\n  tcp: [{route: [{destination: {host: api.example.com}}]}]\n",
        Severity::Error,
        "spec.hosts[0]",
        "host `api.example.org` matches no Service or ServiceEntry",
    ),
    // A VirtualService without hosts that nothing delegates to.
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  http: [{route: [{destination: {host: reviews}}]}]\n",
        Severity::Error,
        "spec.hosts",
        "missing required field",
    ),
    // PeerAuthentication conflicts.
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: b, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n",
        Severity::Error,
        "",
        "conflicts with PeerAuthentication istio-system/a (case.yaml:1): both are mesh-wide",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: b}\n",
        Severity::Error,
        "",
        "both are namespace-wide (no selector) in namespace default",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {selector: {matchLabels: {app: reviews}}, mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: b}\nspec: {selector: {matchLabels: {app: reviews}}, mtls: {mode: DISABLE}}\n",
        Severity::Error,
        "",
        "both are for the same selector app=reviews in namespace default",
    ),
    // Selectors and targetRefs.
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {selector: {matchLabels: {app: reviewz}}}\n",
        Severity::Error,
        "spec.selector.matchLabels",
        "selector app=reviewz matches none of the 2 pods and workloads in namespace default",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: empty}\nspec: {selector: {matchLabels: {app: x}}}\n",
        Severity::Warning,
        "spec.selector.matchLabels",
        "no Pod or workload of namespace empty is in the analyzed files",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: nope}}\n  jwtRules: [{issuer: me}]\n",
        Severity::Error,
        "spec.selector.matchLabels",
        "matches none of the 2 pods",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRefs: [{kind: Service, group: '', name: reviewz}]\n",
        Severity::Error,
        "spec.targetRefs[0]",
        "targets Service default/reviewz, which is not in the analyzed files",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  targetRefs: [{kind: Service, name: reviews}]\n",
        Severity::Error,
        "spec.selector",
        "selector and targetRefs are both set",
    ),
    // Waypoints.
    (
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/use-waypoint: waypoint}}\n",
        Severity::Error,
        "metadata.labels.istio.io/use-waypoint",
        "uses waypoint shop/waypoint, which is not declared",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, labels: {istio.io/use-waypoint: wp}}\nspec: {ports: [{port: 80}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp}\nspec: {gatewayClassName: istio}\n",
        Severity::Error,
        "metadata.labels.istio.io/use-waypoint",
        "that Gateway has class `istio`, not `istio-waypoint`",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop, labels: {istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: infra}}\n",
        Severity::Error,
        "metadata.labels.istio.io/use-waypoint",
        "uses waypoint infra/waypoint, which is not declared",
    ),
    // Loading problems become findings too.
    (
        "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: f}\n",
        Severity::Warning,
        "",
        "EnvoyFilter (networking.istio.io/v1alpha3) is not supported by Weft",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destinaton: {host: reviews}, destination: {host: reviews}}]}]\n",
        Severity::Warning,
        "spec.http[0].route[0].destinaton",
        "unknown field, ignored",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {subsets: []}\n",
        Severity::Error,
        "spec.host",
        "missing required field",
    ),
    ("kind: [\n", Severity::Error, "", "invalid YAML at line 2 column 1"),
    (
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        Severity::Warning,
        "",
        "defined again (first at case.yaml:1)",
    ),
];

#[test]
fn each_rule_reports_its_finding() {
    for (manifest, severity, field, message) in CASES {
        let found = findings(manifest);
        let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert!(
            found.iter().any(|f| f.severity == *severity && f.field == *field && f.message.contains(message)),
            "{manifest}\nwanted {severity} {field:?}: {message}\ngot {shown:#?}"
        );
        // The case adds findings of its own only: the base's stay what they are alone.
        let base: Vec<String> =
            analyze(&load_yaml(BASE, "base.yaml")).iter().map(ToString::to_string).collect();
        assert!(found.iter().all(|f| f.file == "case.yaml" || base.contains(&f.to_string())), "{shown:#?}");
    }
}

#[test]
fn findings_point_at_the_field_line_and_print_in_one_line() {
    let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: v9\n";
    let found = errors(text);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].line, 10);
    assert_eq!(
        found[0].to_string(),
        "case.yaml:10: error: VirtualService default/r spec.http[0].route[0].destination.subset: subset `v9` is not \
         defined by DestinationRule default/reviews (it has subsets v1, v2); requests routed to it fail with 503 \
         (fix: add a subset named v9 to DestinationRule default/reviews)"
    );
    let found = errors("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - name: http\n    port: eighty\n");
    assert_eq!(found[0].line, 7);
    assert_eq!(found[0].object, "Service default/s");
}

#[test]
fn suggestions_name_the_likely_fix() {
    let typo = errors(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews, subset: v22}}]}]\n",
    );
    assert_eq!(
        typo[0].suggestion.as_deref(),
        Some("add a subset named v22 to DestinationRule default/reviews")
    );
    let short = errors(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: x}\nspec:\n  hosts: [reviews.default.svc.cluster.local]\n  http: [{route: [{destination: {host: reviews.default}}]}]\n",
    );
    assert_eq!(
        short[0].suggestion.as_deref(),
        Some(
            "write the full name reviews.default.svc.cluster.local: Istio takes names with a dot as written"
        )
    );
    let host = errors(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [ratingz]\n  http: [{route: [{destination: {host: ratings}}]}]\n",
    );
    assert_eq!(host[0].suggestion.as_deref(), Some("did you mean `ratings`?"));
}

#[test]
fn hosts_match_wildcards_both_ways() {
    let cases = [
        ("a.example.com", "a.example.com", true),
        ("*.example.com", "a.example.com", true),
        ("a.example.com", "*.example.com", true),
        ("*.example.com", "*.b.example.com", true),
        ("*", "anything", true),
        ("example.com", "*.example.com", false),
        ("a.example.org", "*.example.com", false),
        ("a.example.com", "b.example.com", false),
    ];
    for (a, b, want) in cases {
        assert_eq!(hosts_match(a, b), want, "{a} vs {b}");
    }
}

/// (manifest, object, field, message substring, fix substring; "" for no fix)
type Unenforced = (&'static str, &'static str, &'static str, &'static str, &'static str);

/// A Service bound to the base's waypoint, for the cases that need one.
const BOUND: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: bound, labels: {istio.io/use-waypoint: waypoint}}\nspec: {selector: {app: reviews}, ports: [{port: 80}]}\n---\n";

const UNENFORCED: &[Unenforced] = &[
    // Gateways.
    (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec: {selector: {istio: ingressgateway}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]}\n",
        "Gateway default/gw",
        "",
        "Istio Gateway is not enforced: Weft runs no ingress or egress gateway",
        "Service of type LoadBalancer or NodePort",
    ),
    (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress}\nspec: {gatewayClassName: istio}\n",
        "Gateway.gateway.networking.k8s.io default/ingress",
        "spec.gatewayClassName",
        "a Gateway of class istio is not enforced: Weft runs no gateway proxy",
        "LoadBalancer",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [shop.example.com]\n  gateways: [gw]\n  http: [{route: [{destination: {host: reviews}}]}]\n",
        "VirtualService default/r",
        "spec.gateways",
        "routes for gateway gw are not enforced: Weft runs no gateway proxy",
        "LoadBalancer",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews}}]}]\n",
        "VirtualService default/r",
        "spec.hosts",
        "mesh routes apply only in a waypoint, and no Service among its hosts uses one: not enforced",
        "istio.io/use-waypoint",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [bound]\n  tcp: [{route: [{destination: {host: bound}}]}]\n",
        "VirtualService default/r",
        "spec.tcp",
        "TCP and TLS routes are not translated for a waypoint",
        "",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: parent}\nspec:\n  hosts: [reviews]\n  http: [{delegate: {name: child}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: child}\nspec:\n  http: [{route: [{destination: {host: reviews}}]}]\n",
        "VirtualService default/child",
        "spec.hosts",
        "Weft does not follow delegate",
        "merge its routes",
    ),
    // DestinationRule.
    (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: ratings, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}\n",
        "DestinationRule default/d",
        "spec.host",
        "no Service matching host ratings uses one: not enforced; ztunnel balances connections over all the host's endpoints",
        "istio.io/use-waypoint",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: ratings, workloadSelector: {matchLabels: {app: reviews}}}\n",
        "DestinationRule default/d",
        "spec.workloadSelector",
        "is for sidecars, which Weft does not have: not enforced",
        "remove workloadSelector",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: api.example.com, trafficPolicy: {tls: {mode: SIMPLE}}}\n",
        "DestinationRule default/d",
        "spec.trafficPolicy.tls.mode",
        "TLS mode SIMPLE is not enforced: Weft originates no TLS",
        "",
    ),
    // ServiceEntry, Telemetry, RequestAuthentication.
    (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec: {hosts: [api.example.org], ports: [{number: 443, name: tls, protocol: TLS}]}\n",
        "ServiceEntry default/se",
        "",
        "ServiceEntry is not enforced: ztunnels learn no address for its hosts, so connections to them pass through as plain TCP",
        "use a Kubernetes Service",
    ),
    (
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t}\nspec: {tracing: [{providers: [{name: zipkin}]}]}\n",
        "Telemetry default/t",
        "",
        "Telemetry is not enforced: Weft's proxies export their built-in Istio metrics",
        "",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: j}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  jwtRules: [{issuer: me}]\n",
        "RequestAuthentication default/j",
        "spec.selector",
        "a RequestAuthentication with a selector is for sidecars; in ambient mode only a waypoint checks JWTs: not enforced (tokens are not validated",
        "targetRefs",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/web]}}], to: [{operation: {methods: [GET], paths: [/api]}}]}]\n",
        "AuthorizationPolicy default/p",
        "spec.rules[0].to[0].operation.methods",
        "cannot check L7 fields (rules[0].to[0].operation.methods, rules[0].to[0].operation.paths), so it drops that rule and no rule is left: the policy allows nothing, so the workloads it selects (app=reviews) will refuse every connection that no other ALLOW policy allows",
        "target the Service (or its waypoint Gateway) with targetRefs in place of a selector, and bind the Service to the waypoint with the istio.io/use-waypoint label",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - from: [{source: {namespaces: [default]}}]\n  - from: [{source: {requestPrincipals: ['*']}}]\n",
        "AuthorizationPolicy default/p",
        "spec.rules[1].from[0].source.requestPrincipals",
        "so it drops that rule: every workload of namespace default will refuse connections that only it would allow (fix",
        "targetRefs",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n",
        "AuthorizationPolicy default/p",
        "spec.rules[0].to[0].operation.paths",
        "so it enforces that rule without them and denies more than written: rules[0] has no field left and denies every connection to the workloads it selects (app=reviews)",
        "targetRefs",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: istio-system}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {ports: ['8080'], methods: [POST]}}]}]\n",
        "AuthorizationPolicy istio-system/p",
        "spec.rules[0].to[0].operation.methods",
        "denies more than written: it denies every connection its remaining fields match",
        "targetRefs",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: DENY\n  rules: [{when: [{key: source.ip, values: [10.0.0.1]}]}]\n",
        "AuthorizationPolicy default/p",
        "spec.rules[0].when",
        "rules[0] has no field left and denies every connection to every workload of namespace default",
        "targetRefs",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  rules: [{to: [{operation: {ports: [http]}}]}]\n",
        "AuthorizationPolicy default/p",
        "spec.rules[0].to[0].operation.ports[0]",
        "ztunnel cannot use rules[0].to[0].operation.ports[0] (\"http\" is not a port number), so it drops that rule",
        "write ports as numbers",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  action: DENY\n  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]\n",
        "AuthorizationPolicy default/p",
        "spec.rules[0].from[0].source.ipBlocks[0]",
        "so that rule denies every connection to the workloads it selects (app=reviews)",
        "IPs or CIDRs",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: CUSTOM\n  provider: {name: ext-authz}\n  rules: [{}]\n",
        "AuthorizationPolicy default/p",
        "spec.action",
        "action CUSTOM (external authorization by provider ext-authz) is not enforced",
        "ALLOW or DENY rules",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: AUDIT, rules: [{}]}\n",
        "AuthorizationPolicy default/p",
        "spec.action",
        "action AUDIT is not enforced by ztunnel: only a waypoint logs audited requests",
        "targetRefs",
    ),
    // AuthorizationPolicy targets.
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRefs: [{kind: Service, group: '', name: ratings}]\n",
        "AuthorizationPolicy default/p",
        "spec.targetRefs[0]",
        "targets Service default/ratings, which uses no waypoint (only a waypoint applies it): not enforced",
        "istio.io/use-waypoint",
    ),
    (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress}\nspec: {gatewayClassName: istio}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ingress}]\n",
        "AuthorizationPolicy default/p",
        "spec.targetRefs[0]",
        "targets Gateway default/ingress of class istio, and Weft runs no gateway proxy: not enforced",
        "LoadBalancer",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]\n",
        "AuthorizationPolicy default/p",
        "spec.targetRefs[0]",
        "applies only to policies in the root namespace istio-system: not enforced",
        "move the policy to the root namespace",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: external}]\n",
        "AuthorizationPolicy default/p",
        "spec.targetRefs[0]",
        "targets ServiceEntry default/external, and ServiceEntries are not translated: not enforced",
        "",
    ),
    // PeerAuthentication.
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa}\nspec: {mtls: {mode: DISABLE}}\n",
        "PeerAuthentication default/pa",
        "spec.mtls.mode",
        "DISABLE is enforced as PERMISSIVE: ztunnel accepts plaintext too",
        "write PERMISSIVE",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa}\nspec: {selector: {matchLabels: {app: reviews}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}\n",
        "PeerAuthentication default/pa",
        "spec.portLevelMtls.8080.mode",
        "DISABLE is enforced as PERMISSIVE",
        "write PERMISSIVE",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa}\nspec: {mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}\n",
        "PeerAuthentication default/pa",
        "spec.portLevelMtls",
        "portLevelMtls needs a selector; without one it is not enforced",
        "add a selector",
    ),
    // Sidecar injection.
    (
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy, labels: {istio-injection: enabled}}\n",
        "Namespace legacy",
        "metadata.labels.istio-injection",
        "istio-injection asks for sidecar injection, and Weft has no sidecars: not enforced; the pods of namespace legacy are not in the mesh",
        "label the namespace istio.io/dataplane-mode=ambient",
    ),
    // Services and pods.
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: example.com}\n",
        "Service default/ext",
        "spec.type",
        "an ExternalName Service is not translated",
        "",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: vip}\nspec: {clusterIP: 10.0.0.300, ports: [{port: 80}]}\n",
        "Service default/vip",
        "spec.clusterIP",
        "cluster IP \"10.0.0.300\" is not an IP address: ignored",
        "write an IP address",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p1, labels: {app: reviews}}\nstatus: {podIP: not-an-ip}\n",
        "Pod default/p1",
        "status.podIP",
        "pod IP \"not-an-ip\" is not an IP address: ignored",
        "leave status to Kubernetes",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRefs: [{kind: Service, group: '', name: bound}]\n  rules: [{to: [{operation: {ports: [http]}}]}]\n",
        "AuthorizationPolicy default/p",
        "spec.rules[0].to[0].operation.ports[0]",
        "rules[0].to[0].operation.ports[0] (\"http\" is not a port number) left out of the waypoint's configuration",
        "write ports as numbers",
    ),
    // Kinds Weft does not implement.
    (
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm}\nspec: {address: 10.0.0.9}\n",
        "WorkloadEntry default/vm",
        "",
        "WorkloadEntry (networking.istio.io/v1) is not supported by Weft; it has no effect",
        "",
    ),
];

#[test]
fn each_thing_not_enforced_warns_once_with_what_happens_and_the_fix() {
    for (manifest, object, field, message, fix) in UNENFORCED {
        let text =
            if manifest.contains("bound") { format!("{BOUND}{manifest}") } else { manifest.to_string() };
        let found = findings(&text);
        let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
        let hits: Vec<&Finding> = found
            .iter()
            .filter(|f| f.file == "case.yaml" && f.object == *object && f.field == *field)
            .collect();
        assert_eq!(hits.len(), 1, "{manifest}\nwanted one {object} {field:?}\ngot {shown:#?}");
        let hit = hits[0];
        assert_eq!(hit.severity, Severity::Warning, "{hit}");
        let line = hit.to_string();
        assert!(line.contains(message), "{manifest}\nwanted {message}\ngot {line}");
        match *fix {
            "" => assert_eq!(hit.suggestion, None, "{line}"),
            fix => assert!(
                hit.suggestion.as_deref().is_some_and(|s| s.contains(fix)),
                "wanted fix {fix}\ngot {line}"
            ),
        }
        assert!(found.iter().all(|f| f.severity == Severity::Warning), "{shown:#?}");
    }
}

/// What the waypoint enforces (routes, load balancing and subsets, the waypoint Gateways
/// themselves) draws no warning of its own.
#[test]
fn what_a_waypoint_enforces_draws_no_warning() {
    let cases = [
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [bound]\n  http: [{route: [{destination: {host: bound}}]}]\n",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: bound, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}\n",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp2}\nspec: {gatewayClassName: istio-waypoint}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s, labels: {istio.io/use-waypoint: wp2}}\nspec: {ports: [{port: 80}]}\n",
    ];
    for manifest in cases {
        let found: Vec<String> = findings(&format!("{BOUND}{manifest}"))
            .iter()
            .filter(|f| f.file == "case.yaml")
            .map(ToString::to_string)
            .collect();
        assert!(found.is_empty(), "{manifest}\n{found:#?}");
    }
}

/// What the waypoint does not apply yet (CORS; a CUSTOM policy's provider) warns where it is
/// bound to a waypoint, once per field.
#[test]
fn what_the_waypoint_does_not_apply_yet_warns() {
    let cases = [
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRefs: [{kind: Service, group: '', name: bound}]\n  action: CUSTOM\n  provider: {name: ext}\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n", "spec.provider", "has no extension provider \"ext\""),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [bound]\n  http: [{corsPolicy: {allowOrigins: [{exact: a}]}, route: [{destination: {host: bound}}]}]\n", "spec.http[0].corsPolicy", "does not apply this yet"),
    ];
    // Resilience, L7 policies and JWTs are applied: no finding.
    for (manifest, field) in [
        ("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: j}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  jwtRules: [{issuer: me}]\n", "spec"),
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRefs: [{kind: Service, group: '', name: bound}]\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n", "spec"),
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRefs: [{kind: Service, group: '', name: bound}]\n  action: AUDIT\n  rules: [{}]\n", "spec"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [bound]\n  http: [{timeout: 1s, retries: {attempts: 3}, fault: {abort: {httpStatus: 500}}, mirror: {host: bound}, route: [{destination: {host: bound}}]}]\n", "spec.http[0]"),
        ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: bound, trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}, outlierDetection: {consecutive5xxErrors: 1}}}\n", "spec.trafficPolicy"),
    ] {
        let found = findings(&format!("{BOUND}{manifest}"));
        let hits: Vec<String> =
            found.iter().filter(|f| f.file == "case.yaml" && f.field.starts_with(field)).map(ToString::to_string).collect();
        assert!(hits.is_empty(), "{manifest}\n{hits:#?}");
    }
    for (manifest, field, message) in cases {
        let found = findings(&format!("{BOUND}{manifest}"));
        let hits: Vec<String> = found
            .iter()
            .filter(|f| f.file == "case.yaml" && f.field == field)
            .map(ToString::to_string)
            .collect();
        assert_eq!(hits.len(), 1, "{manifest}\n{hits:#?}");
        assert!(hits[0].contains(message), "{}", hits[0]);
    }
}

/// A Service's waypoint routes its traffic only when the Gateway's `istio.io/waypoint-for` takes
/// service traffic (`service`, the default, or `all`), as the controller binds it.
#[test]
fn routes_for_a_waypoint_that_takes_no_service_traffic_are_not_enforced() {
    let route = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [s]\n  http: [{route: [{destination: {host: s}}]}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s, labels: {istio.io/use-waypoint: wp2}}\nspec: {ports: [{port: 80}]}\n";
    for (waypoint_for, warned) in
        [("", false), ("service", false), ("all", false), ("workload", true), ("none", true)]
    {
        let labels = if waypoint_for.is_empty() {
            String::new()
        } else {
            format!(", labels: {{istio.io/waypoint-for: {waypoint_for}}}")
        };
        let gateway = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp2{labels}}}\nspec: {{gatewayClassName: istio-waypoint}}\n---\n"
        );
        let found = findings(&format!("{gateway}{route}"));
        let hit = found.iter().any(|f| {
            f.object == "VirtualService default/r"
                && f.message.contains("no Service among its hosts uses one")
        });
        assert_eq!(
            hit,
            warned,
            "waypoint-for {waypoint_for:?}: {:#?}",
            found.iter().map(ToString::to_string).collect::<Vec<_>>()
        );
    }
}

#[test]
fn what_weft_enforces_draws_no_warning() {
    let enforced = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client], notNamespaces: [legacy], ipBlocks: [10.0.0.0/8]}}]
    to: [{operation: {ports: ["8080"], notPorts: ["9090"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [legacy], notPrincipals: ["*"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: shop}
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}
"#;
    let found = analyze(&load_yaml(enforced, "enforced.yaml"));
    assert!(found.is_empty(), "{:#?}", found.iter().map(ToString::to_string).collect::<Vec<_>>());
}

/// `examples/unenforced`: each thing not enforced warns exactly once, naming the object, what
/// happens and the fix; the enforced objects next to them draw nothing.
#[test]
fn the_unenforced_example_warns_once_per_object_it_does_not_enforce() {
    let text = include_str!("../../../examples/unenforced/mesh.yaml");
    let found = analyze(&load_yaml(text, "mesh.yaml"));
    let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
    // (object, field, message substring, fix substring)
    let expected = [
        (
            "AuthorizationPolicy shop/product-service-authz",
            "spec.rules[0].to[0].operation.methods",
            "ztunnel enforces this policy and cannot check L7 fields (rules[0].to[0].operation.methods, \
             rules[0].to[0].operation.paths), so it drops that rule and no rule is left: the policy allows \
             nothing, so the workloads it selects (app=products) will refuse every connection that no other \
             ALLOW policy allows",
            "with targetRefs in place of a selector, and bind the Service to the waypoint with the istio.io/use-waypoint label",
        ),
        (
            "RequestAuthentication shop/products-jwt",
            "spec.selector",
            "only a waypoint checks JWTs: not enforced",
            "targetRefs",
        ),
        ("Gateway shop/shop-gateway", "", "Istio Gateway is not enforced", "LoadBalancer"),
        ("VirtualService shop/shop", "spec.gateways", "routes for gateway shop-gateway are not enforced", "LoadBalancer"),
        ("ServiceEntry shop/payments-api", "", "ServiceEntry is not enforced", "Kubernetes Service"),
        ("Telemetry istio-system/mesh-default", "", "Telemetry is not enforced", ""),
    ];
    assert_eq!(found.len(), expected.len(), "{shown:#?}");
    for (object, field, message, fix) in expected {
        let hits: Vec<&Finding> = found.iter().filter(|f| f.object == object && f.field == field).collect();
        assert_eq!(hits.len(), 1, "{object} {field:?} in {shown:#?}");
        let f = hits[0];
        assert_eq!(f.severity, Severity::Warning, "{f}");
        assert!(f.message.contains(message), "wanted {message}\ngot {f}");
        assert!(f.suggestion.as_deref().unwrap_or_default().contains(fix), "wanted fix {fix}\ngot {f}");
    }
    let clean = [
        "Namespace shop",
        "Service shop/productpage",
        "Service shop/products",
        "Deployment shop/productpage",
        "Deployment shop/products",
        "PeerAuthentication istio-system/default",
        "AuthorizationPolicy shop/products-l4",
    ];
    for object in clean {
        assert!(found.iter().all(|f| f.object != object), "{object} warns: {shown:#?}");
    }
}
