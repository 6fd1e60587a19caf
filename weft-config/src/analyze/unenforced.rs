//! What Weft accepts but does not enforce, or enforces with another meaning: one list, a pure
//! function of the objects, that `weft analyze` prints as warnings and the controller logs, so the
//! two never disagree. Each entry names the object and field, says what is not enforced and what
//! Weft does instead, and gives the fix when there is one. The ground truth is the controller's
//! translation (`controller/src/translate`) and ztunnel: when they change, change this list.
//!
//! Enforced today, so never listed: L4 AuthorizationPolicy at ztunnel (principals, namespaces,
//! serviceAccounts, ipBlocks, ports and their `not` forms), PeerAuthentication, and the ambient
//! labels (`istio.io/dataplane-mode`, `istio.io/use-waypoint`). Listed:
//! - kinds Weft does not implement (EnvoyFilter, Sidecar, WorkloadEntry, HTTPRoute, ...);
//! - Istio's `networking.istio.io` Gateway, a Gateway API Gateway of another class than
//!   `istio-waypoint`, and VirtualService routes bound to gateways: Weft runs no gateway proxy;
//! - ServiceEntry (not translated: its hosts are reached as passthrough TCP) and Telemetry;
//! - a mesh VirtualService or a DestinationRule whose hosts no Service bound to a waypoint
//!   serves (only a waypoint routes), a DestinationRule with a `workloadSelector` (sidecars'), TLS
//!   origination settings, a VirtualService without hosts (delegates are not followed), and a
//!   route's `corsPolicy` (the waypoint applies routes, timeouts, retries, faults, mirrors,
//!   connection pools and outlier detection, not CORS yet);
//! - AuthorizationPolicy: CUSTOM (a waypoint has no extension provider: it denies what the rules
//!   match; ztunnel ignores the policy) and AUDIT where ztunnel would enforce it (only a waypoint
//!   logs audits); a policy ztunnel enforces (selector,
//!   namespace or mesh-wide) with L7 fields (`to.operation` hosts, methods, paths,
//!   `from.source` requestPrincipals, remoteIpBlocks, any `when`) or malformed ports or ipBlocks:
//!   an ALLOW rule with them is dropped (the workloads refuse what only it allowed; with no rule
//!   left the policy allows nothing), a DENY rule is enforced without them (it denies more; left
//!   with no field it denies every connection);
//! - RequestAuthentication with a selector or none (ambient checks JWTs only in a waypoint);
//! - `targetRefs` of AuthorizationPolicy and RequestAuthentication that reach no waypoint (a
//!   Service without one, a gateway of another class, a ServiceEntry, another kind);
//! - PeerAuthentication DISABLE (enforced as PERMISSIVE) and `portLevelMtls` without a selector;
//! - a Namespace asking for sidecar injection (`istio-injection`, `istio.io/rev`) and not ambient;
//! - an ExternalName Service (not translated), cluster and pod IPs that are not IP addresses;
//! - ports that are not numbers in a policy for a waypoint (left out of its configuration).
//!
//! A Service uses a waypoint as the controller binds it: its own or its namespace's
//! `istio.io/use-waypoint`, naming a Gateway of class `istio-waypoint` that takes service traffic
//! (`istio.io/waypoint-for` `service`, the default, or `all`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use weft_core::names::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, WAYPOINT_FOR_LABEL};

use crate::decode::Object;
use crate::kube::{KubeGateway, Pod, Service, WAYPOINT_GATEWAY_CLASS};
use crate::meta::{labels_to_string, Labels, ObjectMeta, PolicyTargetReference, WorkloadSelector};
use crate::networking::{ClientTlsMode, DestinationRule, VirtualService};
use crate::security::{
    AuthorizationAction, AuthorizationPolicy, MtlsMode, PeerAuthentication, RequestAuthentication, Rule,
};

use super::{AnalyzeOptions, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL};

/// The Gateway API group of `Gateway` and `GatewayClass`.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// Labels asking Istio for sidecar injection.
const INJECTION_LABELS: [&str; 2] = ["istio-injection", "istio.io/rev"];
/// The fix of everything a gateway proxy would serve.
const NO_GATEWAY_FIX: &str =
    "expose the workloads another way, such as a Service of type LoadBalancer or NodePort";
/// What Weft's waypoint does not apply yet (CORS).
const WAYPOINT_NOT_YET: &str =
    "Weft's waypoint routes, balances, applies resilience and checks policies and JWTs but does not apply this yet";

/// The fix of routing and policy that only a waypoint applies.
const BIND_WAYPOINT_FIX: &str = "bind the Service to a waypoint: label it (or its namespace) \
     istio.io/use-waypoint=<a Gateway of class istio-waypoint>";
/// The fix of request-level policy where ztunnel (connections) enforces it.
const TARGET_WAYPOINT_FIX: &str = "check requests in a waypoint instead: target the Service (or its \
     waypoint Gateway) with targetRefs in place of a selector, and bind the Service to the waypoint \
     with the istio.io/use-waypoint label; a policy ztunnel enforces can use only principals, \
     namespaces, serviceAccounts, ipBlocks and ports";

/// One thing Weft accepts and does not enforce as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotEnforced {
    /// The object's index in the slice given to [`not_enforced`].
    pub object: usize,
    /// `Kind namespace/name`.
    pub name: String,
    /// Path of the field (`spec.rules[0].to[0].operation.methods`), empty for the whole object.
    pub field: String,
    /// What is not enforced, and what Weft does instead.
    pub message: String,
    pub fix: Option<String>,
}

impl fmt::Display for NotEnforced {
    /// `Kind ns/name field: message (fix: fix)`, as `weft analyze` prints it after the position.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.name, self.message)?;
        } else {
            write!(f, "{} {}: {}", self.name, self.field, self.message)?;
        }
        if let Some(fix) = &self.fix {
            write!(f, " (fix: {fix})")?;
        }
        Ok(())
    }
}

/// Everything in `objects` that Weft accepts but does not enforce as written, in the objects'
/// order.
pub fn not_enforced(objects: &[&Object], options: &AnalyzeOptions) -> Vec<NotEnforced> {
    let mut check = Check::new(objects, options);
    for (i, object) in objects.iter().enumerate() {
        check.object(i, object);
    }
    check.out
}

/// A waypoint, `namespace/name`.
type WaypointName = String;

/// What the checks look up, gathered once.
struct Check<'a> {
    options: &'a AnalyzeOptions,
    objects: &'a [&'a Object],
    namespaces: BTreeMap<&'a str, &'a Labels>,
    services: Vec<&'a Service>,
    gateways: BTreeMap<(&'a str, &'a str), &'a KubeGateway>,
    out: Vec<NotEnforced>,
}

impl<'a> Check<'a> {
    fn new(objects: &'a [&'a Object], options: &'a AnalyzeOptions) -> Check<'a> {
        let mut check = Check {
            options,
            objects,
            namespaces: BTreeMap::new(),
            services: Vec::new(),
            gateways: BTreeMap::new(),
            out: Vec::new(),
        };
        for object in objects {
            match object {
                Object::Namespace(n) => {
                    check.namespaces.insert(&n.metadata.name, &n.metadata.labels);
                }
                Object::Service(s) => check.services.push(s),
                Object::KubeGateway(g) => {
                    check.gateways.insert((&g.metadata.namespace, &g.metadata.name), g);
                }
                _ => {}
            }
        }
        check
    }

    fn push(&mut self, i: usize, field: &str, message: String, fix: Option<&str>) {
        self.out.push(NotEnforced {
            object: i,
            name: self.objects[i].display_name(),
            field: field.to_owned(),
            message,
            fix: fix.map(str::to_owned),
        });
    }

    fn object(&mut self, i: usize, object: &'a Object) {
        match object {
            Object::Unsupported(o) => self.push(
                i,
                "",
                format!("{} ({}) is not supported by Weft; it has no effect", o.kind, o.api_version),
                None,
            ),
            Object::Gateway(_) => self.push(
                i,
                "",
                "Istio Gateway is not enforced: Weft runs no ingress or egress gateway, so nothing listens for \
                 its servers"
                    .into(),
                Some(NO_GATEWAY_FIX),
            ),
            Object::ServiceEntry(_) => self.push(
                i,
                "",
                "ServiceEntry is not enforced: ztunnels learn no address for its hosts, so connections to them \
                 pass through as plain TCP, without its resolution, endpoints or ports"
                    .into(),
                Some("for workloads in the cluster use a Kubernetes Service; hosts outside it are reached without one"),
            ),
            Object::Telemetry(_) => self.push(
                i,
                "",
                "Telemetry is not enforced: Weft's proxies export their built-in Istio metrics whatever it says, \
                 and take no access log, tracing or metric settings from it"
                    .into(),
                None,
            ),
            Object::KubeGateway(g) => self.kube_gateway(i, g),
            Object::VirtualService(vs) => self.virtual_service(i, vs),
            Object::DestinationRule(dr) => self.destination_rule(i, dr),
            Object::AuthorizationPolicy(p) => self.authorization_policy(i, p),
            Object::RequestAuthentication(r) => self.request_authentication(i, r),
            Object::PeerAuthentication(pa) => self.peer_authentication(i, pa),
            Object::Namespace(n) => self.namespace(i, &n.metadata),
            Object::Service(svc) => self.service(i, svc),
            Object::Pod(pod) => self.pod(i, pod),
            _ => {}
        }
    }

    // ---- waypoints and services ---------------------------------------------------------

    /// The waypoint named by one object's labels: `None` when they name none, `Some(None)` for
    /// an explicit `none` (as the controller reads them).
    fn waypoint_label(labels: &Labels, namespace: &str) -> Option<Option<WaypointName>> {
        let name = labels.get(USE_WAYPOINT_LABEL)?;
        if name == "none" || name.is_empty() {
            return Some(None);
        }
        let ns = labels.get(USE_WAYPOINT_NAMESPACE_LABEL).map_or(namespace, String::as_str);
        Some(Some(format!("{ns}/{name}")))
    }

    /// A Service's waypoint: its own label, else its namespace's; only a declared waypoint that
    /// takes service traffic (`istio.io/waypoint-for` `service`, the default, or `all`), as the
    /// controller binds them.
    fn service_waypoint(&self, svc: &Service) -> Option<WaypointName> {
        let ns = svc.metadata.namespace.as_str();
        let waypoint = Self::waypoint_label(&svc.metadata.labels, ns).unwrap_or_else(|| {
            self.namespaces.get(ns).and_then(|labels| Self::waypoint_label(labels, ns)).flatten()
        })?;
        let (wp_ns, wp_name) = waypoint.split_once('/')?;
        let gateway = self.gateways.get(&(wp_ns, wp_name)).filter(|g| g.is_waypoint())?;
        let takes_services = !matches!(
            gateway.metadata.labels.get(WAYPOINT_FOR_LABEL).map(String::as_str),
            Some("workload" | "none")
        );
        takes_services.then_some(waypoint)
    }

    /// `reviews` -> `reviews.<ns>.svc.<suffix>`; `*` and names with a dot as written (as the
    /// waypoint translation reads hosts).
    fn qualify(&self, host: &str, namespace: &str) -> String {
        if host == "*" || host.contains('.') {
            host.to_owned()
        } else {
            format!("{host}.{namespace}.svc.{}", self.options.domain_suffix)
        }
    }

    /// The waypoints of the Services a (qualified) host pattern names.
    fn waypoints_of_host(&self, pattern: &str) -> BTreeSet<WaypointName> {
        self.services
            .iter()
            .filter(|svc| {
                let m = &svc.metadata;
                let fqdn = format!("{}.{}.svc.{}", m.name, m.namespace, self.options.domain_suffix);
                match pattern.strip_prefix('*') {
                    Some(suffix) => fqdn.ends_with(suffix),
                    None => pattern == fqdn,
                }
            })
            .filter_map(|svc| self.service_waypoint(svc))
            .collect()
    }

    fn kube_gateway(&mut self, i: usize, g: &KubeGateway) {
        if !g.is_waypoint() {
            let class = &g.spec.gateway_class_name;
            self.push(
                i,
                "spec.gatewayClassName",
                format!(
                    "a Gateway of class {class} is not enforced: Weft runs no gateway proxy (it uses Gateways \
                     of class {WAYPOINT_GATEWAY_CLASS} only, as waypoints)"
                ),
                Some(NO_GATEWAY_FIX),
            );
        }
    }

    // ---- VirtualService and DestinationRule ---------------------------------------------

    fn virtual_service(&mut self, i: usize, vs: &VirtualService) {
        let gateways: Vec<&str> =
            vs.spec.gateways.iter().map(String::as_str).filter(|g| *g != "mesh").collect();
        if !gateways.is_empty() {
            self.push(
                i,
                "spec.gateways",
                format!(
                    "routes for gateway {} are not enforced: Weft runs no gateway proxy",
                    gateways.join(", ")
                ),
                Some(NO_GATEWAY_FIX),
            );
        }
        if !vs.spec.applies_to_mesh() {
            return;
        }
        if vs.spec.hosts.is_empty() {
            self.push(
                i,
                "spec.hosts",
                "a VirtualService without hosts (a delegate) is not enforced: Weft does not follow delegate"
                    .into(),
                Some("merge its routes into the VirtualService that delegates to it"),
            );
            return;
        }
        let ns = &vs.metadata.namespace;
        let waypoints: BTreeSet<WaypointName> =
            vs.spec.hosts.iter().flat_map(|h| self.waypoints_of_host(&self.qualify(h, ns))).collect();
        if waypoints.is_empty() {
            self.push(
                i,
                "spec.hosts",
                "mesh routes apply only in a waypoint, and no Service among its hosts uses one: not enforced; \
                 ztunnel forwards each connection to the destination it was addressed to"
                    .into(),
                Some(BIND_WAYPOINT_FIX),
            );
            return;
        }
        // The waypoint applies routes, timeouts, retries, faults and mirrors; not CORS.
        for (j, route) in vs.spec.http.iter().enumerate() {
            if route.cors_policy.is_some() {
                self.push(
                    i,
                    &format!("spec.http[{j}].corsPolicy"),
                    format!("{WAYPOINT_NOT_YET}: not enforced"),
                    None,
                );
            }
        }
        for (field, routes) in [("spec.tcp", vs.spec.tcp.len()), ("spec.tls", vs.spec.tls.len())] {
            if routes > 0 {
                self.push(
                    i,
                    field,
                    "TCP and TLS routes are not translated for a waypoint (only spec.http routes are): not enforced"
                        .into(),
                    None,
                );
            }
        }
    }

    fn destination_rule(&mut self, i: usize, dr: &DestinationRule) {
        let tls = dr
            .spec
            .traffic_policy
            .iter()
            .map(|p| ("spec.trafficPolicy.tls.mode".to_owned(), p))
            .chain(dr.spec.subsets.iter().enumerate().filter_map(|(j, s)| {
                Some((format!("spec.subsets[{j}].trafficPolicy.tls.mode"), s.traffic_policy.as_ref()?))
            }))
            .filter_map(|(field, p)| Some((field, p.tls.as_ref()?.mode)))
            .filter(|(_, mode)| *mode != ClientTlsMode::IstioMutual);
        for (field, mode) in tls.collect::<Vec<_>>() {
            self.push(
                i,
                &field,
                format!(
                    "TLS mode {} is not enforced: Weft originates no TLS; connections leave as the application \
                     opened them (between mesh workloads, inside Weft's mutual TLS)",
                    tls_mode_name(mode)
                ),
                None,
            );
        }
        if dr.spec.workload_selector.is_some() {
            self.push(
                i,
                "spec.workloadSelector",
                "a DestinationRule with a workloadSelector is for sidecars, which Weft does not have: not enforced"
                    .into(),
                Some("remove workloadSelector to have the host's waypoint apply it"),
            );
            return;
        }
        let waypoints = self.waypoints_of_host(&self.qualify(&dr.spec.host, &dr.metadata.namespace));
        if waypoints.is_empty() {
            self.push(
                i,
                "spec.host",
                format!(
                    "traffic policy and subsets apply only in a waypoint, and no Service matching host {} uses \
                     one: not enforced; ztunnel balances connections over all the host's endpoints",
                    dr.spec.host
                ),
                Some(BIND_WAYPOINT_FIX),
            );
        }
    }

    // ---- policies -----------------------------------------------------------------------

    fn authorization_policy(&mut self, i: usize, p: &AuthorizationPolicy) {
        let spec = &p.spec;
        let refs = target_refs(spec.target_ref.as_ref(), &spec.target_refs);
        if !refs.is_empty() {
            // A waypoint applies it (ALLOW, DENY, AUDIT and CUSTOM), when the refs reach one.
            if self.targets(i, &p.metadata, &refs) {
                self.waypoint_ports(i, &spec.rules);
                if spec.action == AuthorizationAction::Custom {
                    let provider =
                        spec.provider.as_ref().map(|x| format!(" {:?}", x.name)).unwrap_or_default();
                    self.push(
                        i,
                        "spec.provider",
                        format!(
                            "action CUSTOM: Weft's waypoint has no extension provider{provider} to call, so it \
                             denies (403) every request the policy's rules match"
                        ),
                        Some("express the decision as ALLOW or DENY rules"),
                    );
                }
            }
            return;
        }
        match spec.action {
            AuthorizationAction::Custom => {
                let provider =
                    spec.provider.as_ref().map(|x| format!(" by provider {}", x.name)).unwrap_or_default();
                self.push(
                    i,
                    "spec.action",
                    format!(
                        "action CUSTOM (external authorization{provider}) is not enforced by ztunnel: Weft calls \
                         no external authorizer, so connections are not checked by it"
                    ),
                    Some("express the decision as ALLOW or DENY rules"),
                );
            }
            AuthorizationAction::Audit => {
                self.push(
                    i,
                    "spec.action",
                    "action AUDIT is not enforced by ztunnel: only a waypoint logs audited requests (AUDIT never \
                     allows or denies)"
                        .into(),
                    Some("target the Service (or its waypoint Gateway) with targetRefs in place of a selector"),
                );
            }
            AuthorizationAction::Allow | AuthorizationAction::Deny => self.ztunnel_rules(i, p),
        }
    }

    fn request_authentication(&mut self, i: usize, r: &RequestAuthentication) {
        let refs = target_refs(r.spec.target_ref.as_ref(), &r.spec.target_refs);
        if !refs.is_empty() {
            // Checked in the waypoints the refs reach (`targets` reports those that reach none).
            self.targets(i, &r.metadata, &refs);
            return;
        }
        let (field, which) = match &r.spec.selector {
            Some(_) => ("spec.selector", "with a selector"),
            None => ("", "without targetRefs"),
        };
        self.push(
            i,
            field,
            format!(
                "a RequestAuthentication {which} is for sidecars; in ambient mode only a waypoint checks JWTs: \
                 not enforced (tokens are not validated, and requests with invalid tokens are not refused)"
            ),
            Some(
                "target the Service (or its waypoint Gateway) with targetRefs in place of a selector, and bind the \
                 Service to the waypoint with the istio.io/use-waypoint label",
            ),
        );
    }

    /// A policy bound by `targetRefs`: applied in the waypoints they reach, nowhere else.
    /// Returns whether any target is a waypoint.
    fn targets(&mut self, i: usize, meta: &ObjectMeta, refs: &[(String, &PolicyTargetReference)]) -> bool {
        let mut reaches_waypoint = false;
        for (field, r) in refs {
            match self.target(meta, r) {
                Target::Waypoint => reaches_waypoint = true,
                Target::Nowhere(why, fix) => self.push(i, field, format!("{why}: not enforced"), fix),
                Target::Missing => {}
            }
        }
        reaches_waypoint
    }

    /// Ports that are not numbers, which the waypoint translation leaves out.
    fn waypoint_ports(&mut self, i: usize, rules: &[Rule]) {
        let bad: Vec<(String, String)> = rules
            .iter()
            .enumerate()
            .flat_map(|(r, rule)| {
                rule.malformed_l4().into_iter().map(move |(f, why)| (format!("rules[{r}].{f}"), why))
            })
            .filter(|(f, _)| f.contains(".operation."))
            .collect();
        let Some((first, _)) = bad.first() else { return };
        let listed = bad.iter().map(|(f, why)| format!("{f} ({why})")).collect::<Vec<_>>().join(", ");
        self.push(
            i,
            &format!("spec.{first}"),
            format!(
                "{listed} left out of the waypoint's configuration: a port condition that held only these \
                 matches every port there"
            ),
            Some("write ports as numbers (1-65535)"),
        );
    }

    /// Where one target reference takes a policy, as the waypoint translation attaches it.
    fn target(&self, meta: &ObjectMeta, r: &PolicyTargetReference) -> Target {
        let ns = meta.namespace.as_str();
        if !r.namespace.is_empty() && r.namespace != ns {
            return Target::Missing; // An error of its own (`policy_targets`).
        }
        match (r.kind.as_str(), r.group.as_str()) {
            ("Gateway", GATEWAY_GROUP) => match self.gateways.get(&(ns, r.name.as_str())) {
                None => Target::Missing,
                Some(g) if g.is_waypoint() => Target::Waypoint,
                Some(g) => Target::Nowhere(
                    format!(
                        "targets Gateway {ns}/{} of class {}, and Weft runs no gateway proxy",
                        r.name, g.spec.gateway_class_name
                    ),
                    Some(NO_GATEWAY_FIX),
                ),
            },
            ("GatewayClass", GATEWAY_GROUP) if r.name == WAYPOINT_GATEWAY_CLASS => {
                if ns == self.options.root_namespace {
                    Target::Waypoint
                } else {
                    Target::Nowhere(
                        format!(
                            "targets GatewayClass {WAYPOINT_GATEWAY_CLASS}, which applies only to policies in the \
                             root namespace {}",
                            self.options.root_namespace
                        ),
                        Some("move the policy to the root namespace, or target one waypoint Gateway"),
                    )
                }
            }
            ("GatewayClass", GATEWAY_GROUP) => Target::Nowhere(
                format!("targets GatewayClass {}, and Weft runs no gateway proxy", r.name),
                Some(NO_GATEWAY_FIX),
            ),
            ("Gateway" | "GatewayClass", group) => Target::Nowhere(
                format!("targets a {} of group {group:?}; Weft reads only group {GATEWAY_GROUP} for it", r.kind),
                Some("set group: gateway.networking.k8s.io"),
            ),
            ("Service", "" | "core") => {
                let svc = self.services.iter().find(|s| s.metadata.namespace == ns && s.metadata.name == r.name);
                match svc.map(|s| self.service_waypoint(s)) {
                    None => Target::Missing,
                    Some(Some(_)) => Target::Waypoint,
                    Some(None) => Target::Nowhere(
                        format!("targets Service {ns}/{}, which uses no waypoint (only a waypoint applies it)", r.name),
                        Some(BIND_WAYPOINT_FIX),
                    ),
                }
            }
            ("ServiceEntry", _) => Target::Nowhere(
                format!("targets ServiceEntry {ns}/{}, and ServiceEntries are not translated", r.name),
                None,
            ),
            (kind, _) => Target::Nowhere(
                format!(
                    "targets a {kind}; Weft applies targetRefs to waypoint Gateways, the {WAYPOINT_GATEWAY_CLASS} \
                     GatewayClass and Services only"
                ),
                None,
            ),
        }
    }

    /// A policy ztunnel enforces (selector, namespace- or mesh-wide): its rules with L7 fields or
    /// malformed values, as the translation converts them.
    fn ztunnel_rules(&mut self, i: usize, p: &AuthorizationPolicy) {
        let rules = &p.spec.rules;
        let allow = p.spec.action == AuthorizationAction::Allow;
        let scope = scope(&p.metadata.namespace, p.spec.selector.as_ref(), &self.options.root_namespace);
        let l7: Vec<(usize, Vec<String>)> = rules
            .iter()
            .enumerate()
            .map(|(r, rule)| (r, rule.l7_fields().into_iter().map(|f| format!("rules[{r}].{f}")).collect()))
            .filter(|(_, fields): &(usize, Vec<String>)| !fields.is_empty())
            .collect();
        let malformed: Vec<(usize, Vec<(String, String)>)> = rules
            .iter()
            .enumerate()
            .map(|(r, rule)| {
                (
                    r,
                    rule.malformed_l4()
                        .into_iter()
                        .map(|(f, why)| (format!("rules[{r}].{f}"), why))
                        .collect(),
                )
            })
            .filter(|(_, bad): &(usize, Vec<(String, String)>)| !bad.is_empty())
            .collect();
        // With every rule dropped, an ALLOW policy allows nothing.
        let dropped: BTreeSet<usize> =
            l7.iter().map(|(r, _)| *r).chain(malformed.iter().map(|(r, _)| *r)).collect();
        let allows_nothing = allow && dropped.len() == rules.len();
        // What dropping rules does; said of the last ones dropped when none is left.
        let dropping = |them: &str, they: &str, last: bool| {
            if last && allows_nothing {
                format!(
                    "so it drops {them} and no rule is left: the policy allows nothing, so {scope} will refuse \
                     every connection that no other ALLOW policy allows"
                )
            } else {
                format!("so it drops {them}: {scope} will refuse connections that only {they} would allow")
            }
        };
        if let Some((_, fields)) = l7.first() {
            let field = format!("spec.{}", fields[0]);
            let listed = l7.iter().flat_map(|(_, f)| f.iter().cloned()).collect::<Vec<_>>().join(", ");
            let (them, they) = if l7.len() == 1 { ("that rule", "it") } else { ("those rules", "they") };
            let message = if allow {
                format!(
                    "ztunnel enforces this policy and cannot check L7 fields ({listed}), {}",
                    dropping(them, they, true)
                )
            } else {
                let everything: Vec<String> = l7
                    .iter()
                    .filter(|(r, _)| {
                        let rule: &Rule = &rules[*r];
                        let l4 = rule.without_l7();
                        l4.from.is_empty() && l4.to.is_empty()
                    })
                    .map(|(r, _)| format!("rules[{r}]"))
                    .collect();
                let effect = if everything.is_empty() {
                    if l7.len() == 1 {
                        "it denies every connection its remaining fields match".to_owned()
                    } else {
                        "they deny every connection their remaining fields match".to_owned()
                    }
                } else {
                    format!(
                        "{} {} no field left and {} every connection to {scope}",
                        everything.join(" and "),
                        if everything.len() == 1 { "has" } else { "have" },
                        if everything.len() == 1 { "denies" } else { "deny" },
                    )
                };
                format!(
                    "ztunnel enforces this policy and cannot check L7 fields ({listed}), so it enforces {them} \
                     without them and denies more than written: {effect}"
                )
            };
            self.push(i, &field, message, Some(TARGET_WAYPOINT_FIX));
        }
        if let Some((_, bad)) = malformed.first() {
            let field = format!("spec.{}", bad[0].0);
            let listed = malformed
                .iter()
                .flat_map(|(_, bad)| bad.iter().map(|(f, why)| format!("{f} ({why})")))
                .collect::<Vec<_>>()
                .join(", ");
            let (them, they) =
                if malformed.len() == 1 { ("that rule", "it") } else { ("those rules", "they") };
            let message = if allow {
                format!("ztunnel cannot use {listed}, {}", dropping(them, they, l7.is_empty()))
            } else {
                let deny = if malformed.len() == 1 { "denies" } else { "deny" };
                format!("ztunnel cannot use {listed}, so {them} {deny} every connection to {scope}")
            };
            self.push(
                i,
                &field,
                message,
                Some("write ports as numbers (1-65535) and ipBlocks as IPs or CIDRs (10.0.0.0/8)"),
            );
        }
    }

    fn peer_authentication(&mut self, i: usize, pa: &PeerAuthentication) {
        const DISABLE: &str = "DISABLE is enforced as PERMISSIVE: ztunnel accepts plaintext too, and mesh \
                               workloads still talk mutual TLS (HBONE)";
        const DISABLE_FIX: &str = "write PERMISSIVE, which means the same in ambient mode";
        if pa.spec.mtls.as_ref().is_some_and(|m| m.mode == MtlsMode::Disable) {
            self.push(i, "spec.mtls.mode", DISABLE.into(), Some(DISABLE_FIX));
        }
        if !pa.spec.port_level_mtls.is_empty() && pa.spec.selector.is_none() {
            self.push(
                i,
                "spec.portLevelMtls",
                "portLevelMtls needs a selector; without one it is not enforced".into(),
                Some("add a selector, or move these ports to a PeerAuthentication that has one"),
            );
            return;
        }
        for (port, mtls) in &pa.spec.port_level_mtls {
            if mtls.mode == MtlsMode::Disable {
                self.push(
                    i,
                    &format!("spec.portLevelMtls.{}.mode", port.0),
                    DISABLE.into(),
                    Some(DISABLE_FIX),
                );
            }
        }
    }

    // ---- workloads and services ---------------------------------------------------------

    fn service(&mut self, i: usize, svc: &Service) {
        if svc.spec.type_.as_deref() == Some("ExternalName") {
            self.push(
                i,
                "spec.type",
                "an ExternalName Service is not translated: ztunnels learn nothing of it, and connections to \
                 the name it points to pass through as plain TCP"
                    .into(),
                None,
            );
            return;
        }
        for ip in svc.cluster_ips().into_iter().filter(|ip| ip.parse::<IpAddr>().is_err()) {
            self.push(
                i,
                "spec.clusterIP",
                format!("cluster IP {ip:?} is not an IP address: ignored, ztunnels get no address for it"),
                Some("write an IP address, or leave clusterIP to Kubernetes"),
            );
        }
    }

    fn pod(&mut self, i: usize, pod: &Pod) {
        for ip in pod.ips().into_iter().filter(|ip| ip.parse::<IpAddr>().is_err()) {
            self.push(
                i,
                "status.podIP",
                format!("pod IP {ip:?} is not an IP address: ignored, ztunnels get no address for it"),
                Some("leave status to Kubernetes (or write an IP address)"),
            );
        }
    }

    fn namespace(&mut self, i: usize, meta: &ObjectMeta) {
        let labels = &meta.labels;
        if labels.get(DATAPLANE_MODE_LABEL).is_some_and(|m| m == DATAPLANE_MODE_AMBIENT) {
            return;
        }
        let Some(label) =
            INJECTION_LABELS.into_iter().find(|l| labels.get(*l).is_some_and(|v| v != "disabled"))
        else {
            return;
        };
        self.push(
            i,
            &format!("metadata.labels.{label}"),
            format!(
                "{label} asks for sidecar injection, and Weft has no sidecars: not enforced; the pods of namespace \
                 {} are not in the mesh (no mutual TLS, no policy)",
                meta.name
            ),
            Some(&format!("label the namespace {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}")),
        );
    }
}

/// Where a target reference takes a policy.
enum Target {
    /// Into one or more waypoints.
    Waypoint,
    /// Nowhere: why, and the fix.
    Nowhere(String, Option<&'static str>),
    /// The target is not among the objects (an error of its own).
    Missing,
}

/// `targetRef` and `targetRefs`, with their fields.
fn target_refs<'p>(
    one: Option<&'p PolicyTargetReference>,
    many: &'p [PolicyTargetReference],
) -> Vec<(String, &'p PolicyTargetReference)> {
    one.map(|r| ("spec.targetRef".to_owned(), r))
        .into_iter()
        .chain(many.iter().enumerate().map(|(j, r)| (format!("spec.targetRefs[{j}]"), r)))
        .collect()
}

/// The workloads a policy ztunnel enforces applies to, for messages.
fn scope(namespace: &str, selector: Option<&WorkloadSelector>, root: &str) -> String {
    match selector.filter(|s| !s.match_labels.is_empty()) {
        Some(s) if namespace == root => {
            format!("the workloads it selects ({}, in every namespace)", labels_to_string(&s.match_labels))
        }
        Some(s) => format!("the workloads it selects ({})", labels_to_string(&s.match_labels)),
        None if namespace == root => "every workload of the mesh".to_owned(),
        None => format!("every workload of namespace {namespace}"),
    }
}

fn tls_mode_name(mode: ClientTlsMode) -> &'static str {
    match mode {
        ClientTlsMode::Disable => "DISABLE",
        ClientTlsMode::Simple => "SIMPLE",
        ClientTlsMode::Mutual => "MUTUAL",
        ClientTlsMode::IstioMutual => "ISTIO_MUTUAL",
    }
}
