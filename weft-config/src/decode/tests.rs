use serde_json::json;

use super::*;
use crate::networking::{ClientTlsMode, SimpleLb};
use crate::security::{AuthorizationAction, MtlsMode};
use crate::types::{IntOrString, IstioDuration, PortKey};

fn value(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).unwrap()
}

/// A body for each modeled kind, to be put under each served apiVersion.
const BODIES: &[(&str, &str, &[&str])] = &[
    (
        "networking.istio.io",
        "kind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 80\n    - destination: {host: reviews, subset: v2}\n      weight: 20\n    timeout: 1.5s\n    retries: {attempts: 3, perTryTimeout: 500ms}\n",
        ISTIO_NETWORKING,
    ),
    (
        "networking.istio.io",
        "kind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {simple: LEAST_REQUEST}\n  subsets:\n  - name: v1\n    labels: {version: v1}\n",
        ISTIO_NETWORKING,
    ),
    (
        "networking.istio.io",
        "kind: Gateway\nmetadata: {name: gw}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n",
        ISTIO_NETWORKING,
    ),
    (
        "networking.istio.io",
        "kind: ServiceEntry\nmetadata: {name: ext}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: TLS}]\n  location: MESH_EXTERNAL\n  resolution: DNS\n",
        ISTIO_NETWORKING,
    ),
    (
        "security.istio.io",
        "kind: AuthorizationPolicy\nmetadata: {name: allow}\nspec:\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]\n",
        ISTIO_SECURITY,
    ),
    (
        "security.istio.io",
        "kind: PeerAuthentication\nmetadata: {name: default}\nspec:\n  mtls: {mode: STRICT}\n",
        ISTIO_SECURITY,
    ),
    (
        "security.istio.io",
        "kind: RequestAuthentication\nmetadata: {name: jwt}\nspec:\n  jwtRules:\n  - issuer: https://issuer.example.com\n    jwksUri: https://issuer.example.com/jwks\n",
        ISTIO_SECURITY,
    ),
    (
        "telemetry.istio.io",
        "kind: Telemetry\nmetadata: {name: mesh}\nspec:\n  tracing:\n  - providers: [{name: otel}]\n    randomSamplingPercentage: 10\n",
        ISTIO_TELEMETRY,
    ),
    (
        "gateway.networking.k8s.io",
        "kind: Gateway\nmetadata: {name: waypoint}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {name: mesh, port: 15008, protocol: HBONE}\n",
        GATEWAY_API,
    ),
];

#[test]
fn every_served_version_decodes_to_the_same_value() {
    for (group, body, versions) in BODIES {
        let mut decoded = Vec::new();
        for version in *versions {
            let doc = format!("apiVersion: {group}/{version}\n{body}");
            let d = decode(value(&doc)).unwrap_or_else(|e| panic!("{group}/{version}: {e}"));
            assert!(d.warnings.is_empty(), "{group}/{version}: {:?}", d.warnings);
            assert_eq!(d.object.metadata().namespace, "default");
            decoded.push(d.object);
        }
        assert!(decoded.windows(2).all(|w| w[0] == w[1]), "{group}: versions decode differently");
        assert_eq!(served_versions(group, decoded[0].kind().split('.').next().unwrap()), Some(*versions));
    }
}

#[test]
fn fields_decode_to_typed_values() {
    let d = decode(value(BODIES[0].1.replace("kind:", "apiVersion: networking.istio.io/v1\nkind:").as_str()))
        .unwrap();
    let Object::VirtualService(vs) = d.object else { panic!("not a VirtualService") };
    let route = &vs.spec.http[0];
    assert_eq!(route.route[1].destination.subset.as_deref(), Some("v2"));
    assert_eq!(route.route[0].weight, Some(80));
    assert_eq!(route.timeout, Some(IstioDuration(std::time::Duration::from_millis(1500))));
    assert_eq!(route.retries.as_ref().unwrap().attempts, 3);

    let dr = decode(value(
        r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: r, namespace: shop}
spec:
  host: r
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    tls: {mode: ISTIO_MUTUAL}
    connectionPool:
      tcp: {maxConnections: 1, connectTimeout: 30ms}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}
"#,
    ))
    .unwrap();
    let Object::DestinationRule(dr) = dr.object else { panic!("not a DestinationRule") };
    assert_eq!(dr.metadata.namespace, "shop");
    let policy = dr.spec.traffic_policy.unwrap();
    assert_eq!(policy.load_balancer.unwrap().simple, Some(SimpleLb::RoundRobin));
    assert_eq!(policy.tls.unwrap().mode, ClientTlsMode::IstioMutual);
    assert_eq!(policy.connection_pool.unwrap().tcp.unwrap().max_connections, Some(1));
    let od = policy.outlier_detection.unwrap();
    assert_eq!(od.consecutive_5xx_errors, Some(1));
    assert_eq!(od.base_ejection_time, Some(IstioDuration(std::time::Duration::from_secs(180))));

    let pa = decode(value(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n\
         spec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    5432: {mode: PERMISSIVE}\n",
    ))
    .unwrap();
    let Object::PeerAuthentication(pa) = pa.object else { panic!("not a PeerAuthentication") };
    assert_eq!(pa.spec.mtls.unwrap().mode, MtlsMode::Strict);
    assert_eq!(pa.spec.port_level_mtls[&PortKey(5432)].mode, MtlsMode::Permissive);

    let ap = decode(value(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all}\n",
    ))
    .unwrap();
    let Object::AuthorizationPolicy(ap) = ap.object else { panic!("not an AuthorizationPolicy") };
    assert_eq!(ap.spec.action, AuthorizationAction::Allow);
    assert!(ap.spec.rules.is_empty());

    let svc = decode(value(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.0.0.1
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, appProtocol: http}
  - {port: 9090, targetPort: 9091}
  sessionAffinity: None
"#,
    ))
    .unwrap();
    assert!(svc.warnings.is_empty(), "{:?}", svc.warnings);
    let Object::Service(svc) = svc.object else { panic!("not a Service") };
    assert_eq!(svc.spec.ports[0].target_port, Some(IntOrString::String("http".into())));
    assert_eq!(svc.spec.ports[1].target_port, Some(IntOrString::Int(9091)));
    assert_eq!(svc.cluster_ips(), vec!["10.0.0.1"]);

    let pod = decode(value(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop, uid: u1, labels: {app: web}}\n\
         spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, image: i, ports: \
         [{name: http, containerPort: 8080, hostPort: 80}, {name: dns, containerPort: 53, protocol: UDP}]}]}\n\
         status: {phase: Running, podIP: 10.1.0.5, podIPs: [{ip: 10.1.0.5}, {ip: 'fd00::5'}]}\n",
    ))
    .unwrap();
    assert!(pod.warnings.is_empty(), "{:?}", pod.warnings);
    let Object::Pod(pod) = pod.object else { panic!("not a Pod") };
    assert_eq!(pod.ips(), vec!["10.1.0.5", "fd00::5"]);
    assert_eq!(pod.service_account(), "web");
    assert_eq!(pod.spec.node_name.as_deref(), Some("node-a"));
    assert_eq!(pod.status.phase.as_deref(), Some("Running"));
    assert_eq!(pod.container_port("http"), Some(8080));
    assert_eq!(pod.container_port("dns"), None, "a UDP port serves no named TCP target port");
    assert_eq!(pod.container_port("web"), None);
}

#[test]
fn namespaces_default_as_the_caller_says_and_cluster_scoped_kinds_have_none() {
    let vs = || {
        value("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a]}")
    };
    assert_eq!(decode(vs()).unwrap().object.metadata().namespace, "default");
    let options = DecodeOptions { default_namespace: Some("shop".into()) };
    assert_eq!(decode_with(vs(), &options).unwrap().object.metadata().namespace, "shop");
    let ns = value("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, namespace: x, labels: {istio.io/dataplane-mode: ambient}}");
    let d = decode_with(ns, &options).unwrap();
    assert_eq!(d.object.metadata().namespace, "");
    assert_eq!(d.object.display_name(), "Namespace shop");
}

#[test]
fn unknown_fields_are_warnings_naming_their_path() {
    let d = decode(value(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, labelz: {}}\n\
         spec:\n  hosts: [r]\n  http:\n  - route:\n    - destinaton: {host: r}\n      destination: {host: r}\n",
    ))
    .unwrap();
    let fields: Vec<(&str, Option<&str>)> =
        d.warnings.iter().map(|w| (w.field.as_str(), w.did_you_mean)).collect();
    assert_eq!(
        fields,
        vec![("metadata.labelz", Some("labels")), ("spec.http[0].route[0].destinaton", Some("destination"))]
    );
    let d = decode(value(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n\
         spec:\n  hosts: [r]\n  http:\n  - retries: {attempts: 2, per_try_timeout: 1s}\n    frobnicate: true\n",
    ))
    .unwrap();
    let fields: Vec<(&str, Option<&str>)> =
        d.warnings.iter().map(|w| (w.field.as_str(), w.did_you_mean)).collect();
    assert_eq!(
        fields,
        vec![
            ("spec.http[0].frobnicate", None),
            ("spec.http[0].retries.per_try_timeout", Some("perTryTimeout"))
        ]
    );
}

#[test]
fn unsupported_and_ignored_kinds_are_distinct_outcomes() {
    for (api_version, kind) in [
        ("networking.istio.io/v1alpha3", "EnvoyFilter"),
        ("networking.istio.io/v1", "Sidecar"),
        ("install.istio.io/v1alpha1", "IstioOperator"),
        ("networking.istio.io/v1", "WorkloadEntry"),
        ("networking.istio.io/v1", "WorkloadGroup"),
        ("networking.istio.io/v1beta1", "ProxyConfig"),
        ("extensions.istio.io/v1alpha1", "WasmPlugin"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ] {
        let d = decode(json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}})).unwrap();
        match d.object {
            Object::Unsupported(o) => assert_eq!((o.kind.as_str(), o.metadata.name.as_str()), (kind, "x")),
            other => panic!("{kind}: {other:?}"),
        }
    }
    let d = decode(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}}))
        .unwrap();
    assert!(matches!(d.object, Object::Ignored(_)));
    let d = decode(value(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  template:\n    metadata: {labels: {app: web}}\n    spec: {serviceAccountName: web, containers: []}\n",
    ))
    .unwrap();
    assert!(d.warnings.is_empty());
    let Object::Workload(w) = d.object else { panic!("not a workload") };
    assert_eq!(w.pod_labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(w.service_account.as_deref(), Some("web"));
}

#[test]
fn errors_name_the_field_or_the_kind() {
    let cases: &[(&str, &str, &str)] = &[
        // (manifest, field, message substring)
        ("[1, 2]", "", "must be a mapping"),
        ("kind: VirtualService\nmetadata: {name: a}", "apiVersion", "missing required field"),
        ("apiVersion: networking.istio.io/v1\nmetadata: {name: a}", "kind", "missing required field"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualServce\nmetadata: {name: a}", "kind", "unknown kind `VirtualServce`"),
        ("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: a}", "kind", "unknown kind `Widget` (apiVersion `example.com/v1`)"),
        ("apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a]}", "apiVersion", "accepted: networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3"),
        ("apiVersion: security.istio.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: a}", "apiVersion", "accepted: security.istio.io/v1, security.istio.io/v1beta1"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nspec: {hosts: [a]}", "metadata", "missing required field"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {namespace: x}\nspec: {hosts: [a]}", "metadata.name", "missing required field"),
        ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\nspec: {subsets: []}", "spec.host", "missing required field"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{name: http}]}", "spec.ports[0].port", "missing required field"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: http}]}", "spec.ports[0].port", "invalid type"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: reviews}", "spec.hosts", "invalid type: string \"reviews\", expected a sequence"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a], http: [{timeout: 10}]}", "spec.http[0].timeout", "invalid type"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a], http: [{timeout: 10x}]}", "spec.http[0].timeout", "not a duration"),
        ("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {mtls: {mode: STRIC}}", "spec.mtls.mode", "unknown variant `STRIC`"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {version: 1}}", "metadata.labels.version", "invalid type: integer `1`"),
    ];
    for (manifest, field, message) in cases {
        let e = decode(value(manifest)).expect_err(manifest);
        assert_eq!(e.field(), *field, "{manifest}: {e}");
        assert!(e.to_string().contains(message), "{manifest}: {e}");
    }
    let e = decode(value("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {mtls: {mode: STRIC}}"))
        .unwrap_err();
    assert_eq!(e.suggestion().as_deref(), Some("did you mean `STRICT`?"));
    let e = decode(value("apiVersion: networking.istio.io/v1\nkind: VirtualServce\nmetadata: {name: a}"))
        .unwrap_err();
    assert_eq!(e.suggestion().as_deref(), Some("did you mean kind: VirtualService?"));
    let e = decode(value("apiVersion: v1\nkind: VirtualService\nmetadata: {name: a}")).unwrap_err();
    assert!(e.suggestion().unwrap().contains("networking.istio.io/v1beta1"), "{e:?}");
}

#[test]
fn edit_distance_and_closest() {
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(closest("destinaton", ["destination", "weight"].into_iter()), Some("destination"));
    assert_eq!(closest("zzz", ["destination", "weight"].into_iter()), None);
}
