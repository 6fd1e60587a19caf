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

#[test]
fn the_base_and_good_configurations_have_no_findings() {
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
    let found = findings(good);
    assert!(found.is_empty(), "{:#?}", found.iter().map(ToString::to_string).collect::<Vec<_>>());
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
        assert!(found.iter().all(|f| f.file == "case.yaml"), "{shown:#?}");
    }
}

#[test]
fn findings_point_at_the_field_line_and_print_in_one_line() {
    let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: v9\n";
    let found = findings(text);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].line, 10);
    assert_eq!(
        found[0].to_string(),
        "case.yaml:10: error: VirtualService default/r spec.http[0].route[0].destination.subset: subset `v9` is not \
         defined by DestinationRule default/reviews (it has subsets v1, v2); requests routed to it fail with 503 \
         (fix: add a subset named v9 to DestinationRule default/reviews)"
    );
    let found = findings("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - name: http\n    port: eighty\n");
    assert_eq!(found[0].line, 7);
    assert_eq!(found[0].object, "Service default/s");
}

#[test]
fn suggestions_name_the_likely_fix() {
    let typo = findings(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews, subset: v22}}]}]\n",
    );
    assert_eq!(
        typo[0].suggestion.as_deref(),
        Some("add a subset named v22 to DestinationRule default/reviews")
    );
    let short = findings(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: x}\nspec:\n  hosts: [reviews.default.svc.cluster.local]\n  http: [{route: [{destination: {host: reviews.default}}]}]\n",
    );
    assert_eq!(
        short[0].suggestion.as_deref(),
        Some(
            "write the full name reviews.default.svc.cluster.local: Istio takes names with a dot as written"
        )
    );
    let host = findings(
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
