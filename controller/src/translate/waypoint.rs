//! The model as each waypoint's L7 configuration (`weft.waypoint.v1.Waypoint`, documented in its
//! .proto): for every Gateway of class `istio-waypoint`, the services bound to it with the
//! VirtualService routes and DestinationRule policy that apply to them, and the
//! AuthorizationPolicies and RequestAuthentications that target the waypoint or those services.
//!
//! Istio's attachment rules, as documented for ambient mode:
//! - a Service uses the waypoint its `istio.io/use-waypoint` label names, else its namespace's;
//! - a VirtualService applies to a service when one of its `hosts` names it (short names are
//!   relative to the VirtualService's namespace; `*.suffix` wildcards match) and it is bound to
//!   the mesh (no `gateways`, or `mesh` among them); the routes of several are joined in order of
//!   creation, then namespace and name;
//! - the DestinationRule for a host is looked up in the service's namespace, then in the root
//!   namespace, then anywhere; an exact host beats a wildcard; rules with a `workloadSelector`
//!   are for sidecars and are skipped;
//! - policies attach by `targetRef(s)`: to the waypoint's Gateway (same namespace), to the
//!   `istio-waypoint` GatewayClass (root namespace: every waypoint), or to a Service.

use std::collections::BTreeMap;

use base64::Engine as _;
use tracing::warn;

use weft_config::kube::{KubeGateway, Service as KubeService, WAYPOINT_GATEWAY_CLASS};
use weft_config::meta::{ObjectMeta, PolicyTargetReference};
use weft_config::networking::{
    self as net, DestinationRule, H2UpgradePolicy, HttpRoute as IstioRoute, VirtualService,
};
use weft_config::security::{
    AuthorizationAction, AuthorizationPolicy as IstioPolicy, JwtRule as IstioJwtRule,
    RequestAuthentication as IstioRequestAuthentication, Rule as IstioRule,
};
use weft_config::types::{IstioDuration, Percent};
use weft_config::Object;
use weft_core::proto::weft::waypoint::v1::{
    self as wp, authorization_policy::Action, fault, jwt_rule, load_balancer, string_match,
};

use super::{hostname, service_waypoint, DOMAIN_SUFFIX, ROOT_NAMESPACE};
use crate::model::{Model, WaypointRef};

/// The Gateway API group of `Gateway` and `GatewayClass`.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// What waypoint translation reads, gathered from the model once per snapshot rather than
/// scanned for every waypoint and every service it serves: Services by the waypoint they use,
/// mesh-bound VirtualServices, DestinationRules for waypoints, and the policies that name targets.
pub struct L7Index<'m> {
    services: BTreeMap<WaypointRef, Vec<&'m KubeService>>,
    virtual_services: Vec<&'m VirtualService>,
    destination_rules: Vec<&'m DestinationRule>,
    policies: Vec<&'m IstioPolicy>,
    request_authentications: Vec<&'m IstioRequestAuthentication>,
}

impl<'m> L7Index<'m> {
    pub fn of(model: &'m Model) -> L7Index<'m> {
        let mut index = L7Index {
            services: BTreeMap::new(),
            virtual_services: Vec::new(),
            destination_rules: Vec::new(),
            policies: Vec::new(),
            request_authentications: Vec::new(),
        };
        for object in model.objects() {
            match object {
                Object::Service(svc) => {
                    if let Some(waypoint) = service_waypoint(model, svc) {
                        index.services.entry(waypoint).or_default().push(svc);
                    }
                }
                Object::VirtualService(vs)
                    if vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh") =>
                {
                    index.virtual_services.push(vs);
                }
                // Rules with a workloadSelector are for sidecars.
                Object::DestinationRule(dr) if dr.spec.workload_selector.is_none() => {
                    index.destination_rules.push(dr)
                }
                Object::AuthorizationPolicy(p) if !refs(&p.spec).is_empty() => index.policies.push(p),
                Object::RequestAuthentication(r) if !refs_ra(r).is_empty() => {
                    index.request_authentications.push(r)
                }
                _ => {}
            }
        }
        index.virtual_services.sort_by(|a, b| creation_order(&a.metadata, &b.metadata));
        index
    }
}

/// The L7 configuration of the waypoint `gateway` (which must be of class `istio-waypoint`).
pub fn waypoint(model: &Model, gateway: &KubeGateway, trust_domain: &str) -> wp::Waypoint {
    waypoint_indexed(&L7Index::of(model), gateway, trust_domain)
}

/// [`waypoint`] with the model's [`L7Index`] computed once (by the snapshot, for every waypoint).
pub fn waypoint_indexed(index: &L7Index<'_>, gateway: &KubeGateway, trust_domain: &str) -> wp::Waypoint {
    let meta = &gateway.metadata;
    let this = WaypointRef { namespace: meta.namespace.clone(), name: meta.name.clone() };
    let targets_waypoint = |refs: Vec<&PolicyTargetReference>, policy_ns: &str| {
        refs.iter().any(|r| {
            (r.kind == "Gateway" && r.name == meta.name && policy_ns == meta.namespace)
                || (r.kind == "GatewayClass"
                    && r.name == WAYPOINT_GATEWAY_CLASS
                    && policy_ns == ROOT_NAMESPACE)
        })
    };
    let mut out = wp::Waypoint {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        // Istio runs a waypoint under a service account named after its Gateway.
        identity: format!("spiffe://{trust_domain}/ns/{}/sa/{}", meta.namespace, meta.name),
        ..Default::default()
    };
    out.policies = index
        .policies
        .iter()
        .filter(|p| targets_waypoint(refs(&p.spec), &p.metadata.namespace))
        .map(|p| policy(p))
        .collect();
    out.request_authentications = index
        .request_authentications
        .iter()
        .filter(|r| targets_waypoint(refs_ra(r), &r.metadata.namespace))
        .map(|r| request_authentication(r))
        .collect();
    let services = index.services.get(&this).map_or(&[][..], Vec::as_slice);
    out.services = services.iter().map(|svc| service(index, svc)).collect();
    out
}

/// A Service port's protocol as Istio selects it: `appProtocol`, else the name's prefix before
/// the first `-` (case-insensitive). HTTP and HTTP/2 (with gRPC) are served as HTTP; the other
/// protocols Istio names are TCP to a waypoint; anything else declares nothing.
fn port_protocol(app_protocol: Option<&str>, name: Option<&str>) -> wp::PortProtocol {
    let given = match app_protocol.filter(|a| !a.is_empty()) {
        Some(app) => app.to_owned(),
        None => name.unwrap_or_default().split('-').next().unwrap_or_default().to_owned(),
    };
    match given.to_ascii_lowercase().as_str() {
        "http" | "http1" | "kubernetes.io/h1" => wp::PortProtocol::Http,
        "http2" | "grpc" | "grpc-web" | "kubernetes.io/h2c" => wp::PortProtocol::Http2,
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/ws" | "kubernetes.io/wss" => {
            wp::PortProtocol::Tcp
        }
        _ => wp::PortProtocol::Unspecified,
    }
}

/// One bound service with what applies to it.
fn service(index: &L7Index<'_>, svc: &KubeService) -> wp::Service {
    let meta = &svc.metadata;
    let host = hostname(&meta.name, &meta.namespace);
    let targets_service = |refs: Vec<&PolicyTargetReference>, policy_ns: &str| {
        policy_ns == meta.namespace
            && refs.iter().any(|r| {
                r.kind == "Service" && (r.group.is_empty() || r.group == "core") && r.name == meta.name
            })
    };
    let mut out = wp::Service {
        hostname: host.clone(),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        ports: svc.spec.ports.iter().map(|p| u32::from(p.port)).collect(),
        protocols: svc
            .spec
            .ports
            .iter()
            .filter_map(|p| {
                let declared = port_protocol(p.app_protocol.as_deref(), p.name.as_deref());
                (declared != wp::PortProtocol::Unspecified).then_some((u32::from(p.port), declared as i32))
            })
            .collect(),
        ..Default::default()
    };
    out.policies = index
        .policies
        .iter()
        .filter(|p| targets_service(refs(&p.spec), &p.metadata.namespace))
        .map(|p| policy(p))
        .collect();
    out.request_authentications = index
        .request_authentications
        .iter()
        .filter(|r| targets_service(refs_ra(r), &r.metadata.namespace))
        .map(|r| request_authentication(r))
        .collect();
    // Already mesh-bound and in creation order.
    for vs in index.virtual_services.iter().filter(|vs| names_host(vs, &host)) {
        let vs_name = format!("{}/{}", vs.metadata.namespace, vs.metadata.name);
        out.http_routes.extend(vs.spec.http.iter().map(|r| http_route(r, &vs.metadata.namespace, &vs_name)));
        out.virtual_services.push(vs_name);
    }
    if let Some(dr) = destination_rule(index, &host, &meta.namespace) {
        out.destination_rule = format!("{}/{}", dr.metadata.namespace, dr.metadata.name);
        let base = dr.spec.traffic_policy.as_ref();
        out.traffic_policy = base.map(traffic_policy);
        out.subsets = dr
            .spec
            .subsets
            .iter()
            .map(|s| wp::Subset {
                name: s.name.clone(),
                labels: s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                traffic_policy: merged(base, s.traffic_policy.as_ref()).as_ref().map(traffic_policy),
            })
            .collect();
    }
    out
}

/// Istio's order for merging several configs of one host: oldest first, then by namespace and name.
fn creation_order(a: &ObjectMeta, b: &ObjectMeta) -> std::cmp::Ordering {
    let key = |m: &ObjectMeta| {
        (m.creation_timestamp.clone().unwrap_or_default(), m.namespace.clone(), m.name.clone())
    };
    key(a).cmp(&key(b))
}

/// Whether one of the VirtualService's hosts names `host` (a service FQDN).
fn names_host(vs: &VirtualService, host: &str) -> bool {
    vs.spec.hosts.iter().any(|h| host_matches(&qualify(h, &vs.metadata.namespace), host))
}

/// A host as a fully qualified name: a short name (no dot) is in `namespace`; `*` and names with
/// dots are kept.
pub(crate) fn qualify(host: &str, namespace: &str) -> String {
    if host == "*" || host.contains('.') {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.svc.{DOMAIN_SUFFIX}")
    }
}

/// Whether the (qualified) `pattern` matches the service FQDN `host`: equal, `*`, or `*.suffix`.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.ends_with(suffix),
        None => pattern == host,
    }
}

/// The DestinationRule for `host`: the service's namespace first, then the root namespace, then
/// any; within each an exact host beats a wildcard, then creation order.
fn destination_rule<'m>(index: &L7Index<'m>, host: &str, service_ns: &str) -> Option<&'m DestinationRule> {
    let mut candidates: Vec<(u8, bool, &DestinationRule)> = index
        .destination_rules
        .iter()
        .copied()
        .filter_map(|dr| {
            let pattern = qualify(&dr.spec.host, &dr.metadata.namespace);
            host_matches(&pattern, host).then(|| {
                let ns = &dr.metadata.namespace;
                let rank = if ns == service_ns {
                    0
                } else if ns == ROOT_NAMESPACE {
                    1
                } else {
                    2
                };
                (rank, pattern.starts_with('*'), dr)
            })
        })
        .collect();
    candidates.sort_by(|a, b| {
        (a.0, a.1).cmp(&(b.0, b.1)).then_with(|| creation_order(&a.2.metadata, &b.2.metadata))
    });
    candidates.first().map(|c| c.2)
}

fn http_route(route: &IstioRoute, namespace: &str, vs_name: &str) -> wp::HttpRoute {
    let single = route.route.len() == 1;
    wp::HttpRoute {
        name: route.name.clone().unwrap_or_default(),
        virtual_service: vs_name.to_owned(),
        matches: route.match_.iter().map(http_match).collect(),
        destinations: route
            .route
            .iter()
            .map(|d| wp::WeightedDestination {
                destination: Some(destination(&d.destination, namespace)),
                // A lone destination takes every request whatever its weight says.
                weight: if single { 100 } else { d.weight.and_then(|w| u32::try_from(w).ok()).unwrap_or(0) },
                headers: d.headers.as_ref().map(headers),
            })
            .collect(),
        redirect: route.redirect.as_ref().map(|r| wp::Redirect {
            uri: r.uri.clone().unwrap_or_default(),
            authority: r.authority.clone().unwrap_or_default(),
            port: r.port.unwrap_or(0),
            scheme: r.scheme.clone().unwrap_or_default(),
            redirect_code: r.redirect_code.unwrap_or(301),
        }),
        direct_response: route.direct_response.as_ref().map(|d| wp::DirectResponse {
            status: d.status,
            body: match &d.body {
                None => Vec::new(),
                Some(net::HttpBody::String(s)) => s.clone().into_bytes(),
                Some(net::HttpBody::Bytes(b)) => {
                    base64::engine::general_purpose::STANDARD.decode(b).unwrap_or_else(|e| {
                        warn!(
                            virtual_service = vs_name,
                            "directResponse body.bytes is not base64 ({e}); sent empty"
                        );
                        Vec::new()
                    })
                }
            },
        }),
        rewrite: route.rewrite.as_ref().map(|r| wp::Rewrite {
            uri: r.uri.clone().unwrap_or_default(),
            authority: r.authority.clone().unwrap_or_default(),
            uri_regex: r.uri_regex_rewrite.as_ref().map(|x| x.match_.clone()).unwrap_or_default(),
            uri_regex_replacement: r
                .uri_regex_rewrite
                .as_ref()
                .map(|x| x.rewrite.clone())
                .unwrap_or_default(),
        }),
        timeout: route.timeout.as_ref().map(duration),
        retries: route.retries.as_ref().map(|r| wp::Retries {
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            per_try_timeout: r.per_try_timeout.as_ref().map(duration),
            retry_on: r
                .retry_on
                .as_deref()
                .map(|s| s.split(',').map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect())
                .unwrap_or_default(),
            backoff: r.backoff.as_ref().map(duration),
            retry_remote_localities: r.retry_remote_localities.unwrap_or(false),
        }),
        fault: route.fault.as_ref().map(|f| wp::Fault {
            delay: f.delay.as_ref().map(|d| fault::Delay {
                fixed_delay: d.fixed_delay.as_ref().map(duration),
                percentage: percent(d.percentage.as_ref(), d.percent),
            }),
            abort: f.abort.as_ref().map(|a| fault::Abort {
                http_status: a.http_status.and_then(|s| u32::try_from(s).ok()).unwrap_or(0),
                percentage: percent(a.percentage.as_ref(), None),
                grpc_status: a.grpc_status.clone().unwrap_or_default(),
            }),
        }),
        mirrors: mirrors(route, namespace),
        headers: route.headers.as_ref().map(headers),
    }
}

/// `mirrors`, plus the older single `mirror` with `mirrorPercentage` (or the older still
/// `mirror_percent`); a mirror without a percentage mirrors every request.
fn mirrors(route: &IstioRoute, namespace: &str) -> Vec<wp::Mirror> {
    let mut out: Vec<wp::Mirror> = route
        .mirrors
        .iter()
        .map(|m| wp::Mirror {
            destination: Some(destination(&m.destination, namespace)),
            percentage: m.percentage.as_ref().map_or(100.0, |p| p.value),
        })
        .collect();
    if let Some(m) = &route.mirror {
        let percentage = match (&route.mirror_percentage, route.mirror_percent) {
            (Some(p), _) => p.value,
            (None, Some(p)) => f64::from(p),
            (None, None) => 100.0,
        };
        out.push(wp::Mirror { destination: Some(destination(m, namespace)), percentage });
    }
    out
}

/// A fault's share: `percentage`, else the deprecated integer `percent`, else every request.
fn percent(percentage: Option<&Percent>, legacy: Option<i32>) -> f64 {
    match (percentage, legacy) {
        (Some(p), _) => p.value,
        (None, Some(p)) => f64::from(p),
        (None, None) => 100.0,
    }
}

fn http_match(m: &net::HttpMatchRequest) -> wp::HttpMatch {
    let map = |m: &BTreeMap<String, net::StringMatch>| {
        m.iter().map(|(k, v)| (k.clone(), string_match(v))).collect::<BTreeMap<_, _>>()
    };
    wp::HttpMatch {
        name: m.name.clone().unwrap_or_default(),
        uri: m.uri.as_ref().map(string_match),
        scheme: m.scheme.as_ref().map(string_match),
        method: m.method.as_ref().map(string_match),
        authority: m.authority.as_ref().map(string_match),
        headers: map(&m.headers),
        without_headers: map(&m.without_headers),
        query_params: map(&m.query_params),
        port: m.port.unwrap_or(0),
        ignore_uri_case: m.ignore_uri_case,
        source_namespace: m.source_namespace.clone().unwrap_or_default(),
        source_labels: m.source_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

fn string_match(m: &net::StringMatch) -> wp::StringMatch {
    let match_type = match m {
        net::StringMatch::Exact(s) => string_match::MatchType::Exact(s.clone()),
        net::StringMatch::Prefix(s) => string_match::MatchType::Prefix(s.clone()),
        net::StringMatch::Regex(s) => string_match::MatchType::Regex(s.clone()),
    };
    wp::StringMatch { match_type: Some(match_type) }
}

fn destination(d: &net::Destination, namespace: &str) -> wp::Destination {
    wp::Destination {
        host: qualify(&d.host, namespace),
        subset: d.subset.clone().unwrap_or_default(),
        port: d.port.as_ref().map_or(0, |p| p.number),
    }
}

fn headers(h: &net::Headers) -> wp::Headers {
    let ops = |o: &net::HeaderOperations| wp::HeaderOperations {
        set: o.set.clone(),
        add: o.add.clone(),
        remove: o.remove.clone(),
    };
    wp::Headers { request: h.request.as_ref().map(ops), response: h.response.as_ref().map(ops) }
}

/// A subset's policy: each section the subset sets replaces the service's (Istio merges
/// DestinationRule sections whole, not field by field).
fn merged(
    base: Option<&net::TrafficPolicy>,
    subset: Option<&net::TrafficPolicy>,
) -> Option<net::TrafficPolicy> {
    match (base, subset) {
        (None, None) => None,
        (Some(b), None) => Some(b.clone()),
        (None, Some(s)) => Some(s.clone()),
        (Some(b), Some(s)) => {
            let mut out = b.clone();
            if s.load_balancer.is_some() {
                out.load_balancer = s.load_balancer.clone();
            }
            if s.connection_pool.is_some() {
                out.connection_pool = s.connection_pool.clone();
            }
            if s.outlier_detection.is_some() {
                out.outlier_detection = s.outlier_detection.clone();
            }
            if s.tls.is_some() {
                out.tls = s.tls.clone();
            }
            if !s.port_level_settings.is_empty() {
                out.port_level_settings = s.port_level_settings.clone();
            }
            Some(out)
        }
    }
}

fn traffic_policy(p: &net::TrafficPolicy) -> wp::TrafficPolicy {
    wp::TrafficPolicy {
        load_balancer: p.load_balancer.as_ref().map(load_balancer),
        connection_pool: p.connection_pool.as_ref().map(connection_pool),
        outlier_detection: p.outlier_detection.as_ref().map(outlier_detection),
        port_level: p
            .port_level_settings
            .iter()
            .filter_map(|pl| {
                let port = pl.port.as_ref()?.number;
                let policy = wp::TrafficPolicy {
                    load_balancer: pl.load_balancer.as_ref().map(load_balancer),
                    connection_pool: pl.connection_pool.as_ref().map(connection_pool),
                    outlier_detection: pl.outlier_detection.as_ref().map(outlier_detection),
                    port_level: BTreeMap::new(),
                };
                Some((port, policy))
            })
            .collect(),
    }
}

fn load_balancer(lb: &net::LoadBalancerSettings) -> wp::LoadBalancer {
    let simple = match lb.simple {
        None => load_balancer::Simple::Unspecified,
        Some(net::SimpleLb::LeastRequest | net::SimpleLb::LeastConn) => load_balancer::Simple::LeastRequest,
        Some(net::SimpleLb::RoundRobin) => load_balancer::Simple::RoundRobin,
        Some(net::SimpleLb::Random) => load_balancer::Simple::Random,
        Some(net::SimpleLb::Passthrough) => load_balancer::Simple::Passthrough,
        Some(net::SimpleLb::Unspecified) => load_balancer::Simple::Unspecified,
    };
    let hash = lb.consistent_hash.as_ref();
    wp::LoadBalancer {
        simple: simple as i32,
        hash_header: hash.and_then(|h| h.http_header_name.clone()).unwrap_or_default(),
        hash_cookie: hash.and_then(|h| h.http_cookie.as_ref()).map(|c| c.name.clone()).unwrap_or_default(),
        hash_source_ip: hash.and_then(|h| h.use_source_ip).unwrap_or(false),
        hash_query_parameter: hash.and_then(|h| h.http_query_parameter_name.clone()).unwrap_or_default(),
    }
}

/// Istio's connection pool; negative or absent limits are 0 (unlimited).
fn connection_pool(c: &net::ConnectionPoolSettings) -> wp::ConnectionPool {
    let n = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    let tcp = c.tcp.as_ref();
    let http = c.http.as_ref();
    wp::ConnectionPool {
        max_connections: n(tcp.and_then(|t| t.max_connections)),
        connect_timeout: tcp.and_then(|t| t.connect_timeout.as_ref()).map(duration),
        http1_max_pending_requests: n(http.and_then(|h| h.http1_max_pending_requests)),
        http2_max_requests: n(http.and_then(|h| h.http2_max_requests)),
        max_requests_per_connection: n(http.and_then(|h| h.max_requests_per_connection)),
        max_retries: n(http.and_then(|h| h.max_retries)),
        idle_timeout: http.and_then(|h| h.idle_timeout.as_ref()).map(duration),
        max_concurrent_streams: n(http.and_then(|h| h.max_concurrent_streams)),
        tcp_keepalive: tcp.and_then(|t| t.tcp_keepalive.as_ref()).map(|k| wp::TcpKeepalive {
            probes: k.probes.unwrap_or(0),
            time: k.time.as_ref().map(duration),
            interval: k.interval.as_ref().map(duration),
        }),
        max_connection_duration: tcp.and_then(|t| t.max_connection_duration.as_ref()).map(duration),
        tcp_idle_timeout: tcp.and_then(|t| t.idle_timeout.as_ref()).map(duration),
        h2_upgrade_policy: match http.and_then(|h| h.h2_upgrade_policy) {
            Some(H2UpgradePolicy::Upgrade) => wp::H2UpgradePolicy::H2UpgradeUpgrade,
            Some(H2UpgradePolicy::DoNotUpgrade) => wp::H2UpgradePolicy::H2UpgradeDoNotUpgrade,
            Some(H2UpgradePolicy::Default) | None => wp::H2UpgradePolicy::H2UpgradeDefault,
        } as i32,
        use_client_protocol: http.and_then(|h| h.use_client_protocol).unwrap_or(false),
    }
}

/// Outlier detection with Istio's defaults for what is unset: 5 consecutive 5xx errors (the
/// deprecated `consecutiveErrors` counts when `consecutive5xxErrors` is absent), gateway errors
/// off, at most 10 % ejected, 5 local-origin failures; durations stay unset (the waypoint knows
/// Istio's 10 s interval and 30 s base ejection time).
fn outlier_detection(o: &net::OutlierDetection) -> wp::OutlierDetection {
    let n = |v: Option<i32>, default: u32| v.map_or(default, |v| u32::try_from(v).unwrap_or(0));
    wp::OutlierDetection {
        consecutive_5xx_errors: o
            .consecutive_5xx_errors
            .unwrap_or_else(|| n(o.consecutive_errors, DEFAULT_CONSECUTIVE_ERRORS)),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        interval: o.interval.as_ref().map(duration),
        base_ejection_time: o.base_ejection_time.as_ref().map(duration),
        max_ejection_percent: n(o.max_ejection_percent, DEFAULT_MAX_EJECTION_PERCENT),
        min_health_percent: n(o.min_health_percent, 0),
        consecutive_local_origin_failures: o
            .consecutive_local_origin_failures
            .unwrap_or(DEFAULT_CONSECUTIVE_ERRORS),
        split_external_local_origin_errors: o.split_external_local_origin_errors.unwrap_or(false),
    }
}

/// Istio's default thresholds for outlier detection (Envoy's, which Istio keeps).
const DEFAULT_CONSECUTIVE_ERRORS: u32 = 5;
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

fn duration(d: &IstioDuration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.0.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.0.subsec_nanos()).unwrap_or(0),
    }
}

fn refs(spec: &weft_config::security::AuthorizationPolicySpec) -> Vec<&PolicyTargetReference> {
    spec.target_ref.iter().chain(&spec.target_refs).filter(|r| gateway_group(r)).collect()
}

fn refs_ra(ra: &IstioRequestAuthentication) -> Vec<&PolicyTargetReference> {
    ra.spec.target_ref.iter().chain(&ra.spec.target_refs).filter(|r| gateway_group(r)).collect()
}

/// A target in the Gateway API group (Gateway, GatewayClass) or the core group (Service).
fn gateway_group(r: &PolicyTargetReference) -> bool {
    match r.kind.as_str() {
        "Gateway" | "GatewayClass" => r.group == GATEWAY_GROUP,
        _ => true,
    }
}

fn policy(p: &IstioPolicy) -> wp::AuthorizationPolicy {
    let action = match p.spec.action {
        AuthorizationAction::Allow => Action::Allow,
        AuthorizationAction::Deny => Action::Deny,
        AuthorizationAction::Audit => Action::Audit,
        AuthorizationAction::Custom => Action::Custom,
    };
    wp::AuthorizationPolicy {
        name: p.metadata.name.clone(),
        namespace: p.metadata.namespace.clone(),
        action: action as i32,
        rules: p.spec.rules.iter().map(rule).collect(),
        provider: p.spec.provider.as_ref().map(|x| x.name.clone()).unwrap_or_default(),
    }
}

/// Ports that are not numbers cannot match a request: they are dropped (`weft analyze` reports
/// them, and the controller logs them: `weft_config::not_enforced`).
fn port_numbers(ports: &[String]) -> Vec<u32> {
    ports.iter().filter_map(|p| p.parse::<u16>().ok()).map(u32::from).collect()
}

fn rule(r: &IstioRule) -> wp::Rule {
    wp::Rule {
        from: r
            .from
            .iter()
            .map(|f| {
                let s = &f.source;
                wp::Source {
                    principals: s.principals.clone(),
                    not_principals: s.not_principals.clone(),
                    request_principals: s.request_principals.clone(),
                    not_request_principals: s.not_request_principals.clone(),
                    namespaces: s.namespaces.clone(),
                    not_namespaces: s.not_namespaces.clone(),
                    ip_blocks: s.ip_blocks.clone(),
                    not_ip_blocks: s.not_ip_blocks.clone(),
                    remote_ip_blocks: s.remote_ip_blocks.clone(),
                    not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
                    service_accounts: s.service_accounts.clone(),
                    not_service_accounts: s.not_service_accounts.clone(),
                }
            })
            .collect(),
        to: r
            .to
            .iter()
            .map(|t| {
                let o = &t.operation;
                wp::Operation {
                    hosts: o.hosts.clone(),
                    not_hosts: o.not_hosts.clone(),
                    ports: port_numbers(&o.ports),
                    not_ports: port_numbers(&o.not_ports),
                    methods: o.methods.clone(),
                    not_methods: o.not_methods.clone(),
                    paths: o.paths.clone(),
                    not_paths: o.not_paths.clone(),
                }
            })
            .collect(),
        when: r
            .when
            .iter()
            .map(|c| wp::Condition {
                key: c.key.clone(),
                values: c.values.clone(),
                not_values: c.not_values.clone(),
            })
            .collect(),
    }
}

fn request_authentication(r: &IstioRequestAuthentication) -> wp::RequestAuthentication {
    wp::RequestAuthentication {
        name: r.metadata.name.clone(),
        namespace: r.metadata.namespace.clone(),
        jwt_rules: r.spec.jwt_rules.iter().map(jwt_rule).collect(),
    }
}

fn jwt_rule(j: &IstioJwtRule) -> wp::JwtRule {
    wp::JwtRule {
        issuer: j.issuer.clone(),
        audiences: j.audiences.clone(),
        jwks_uri: j.jwks_uri.clone().unwrap_or_default(),
        jwks: j.jwks.clone().unwrap_or_default(),
        from_headers: j
            .from_headers
            .iter()
            .map(|h| jwt_rule::FromHeader {
                name: h.name.clone(),
                prefix: h.prefix.clone().unwrap_or_default(),
            })
            .collect(),
        from_params: j.from_params.clone(),
        from_cookies: j.from_cookies.clone(),
        output_payload_to_header: j.output_payload_to_header.clone().unwrap_or_default(),
        forward_original_token: j.forward_original_token,
        output_claim_to_headers: j
            .output_claim_to_headers
            .iter()
            .map(|c| jwt_rule::ClaimToHeader { header: c.header.clone(), claim: c.claim.clone() })
            .collect(),
        timeout: j.timeout.as_ref().map(duration),
    }
}
