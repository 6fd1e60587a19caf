//! Checks a set of loaded manifests the way `istioctl analyze` does, offline: everything that
//! did not load, plus the mistakes that load fine and then break traffic. Pure: documents in,
//! findings out.
//!
//! Rules (errors unless marked):
//! - invalid YAML (line and column), unknown kind or apiVersion, missing required fields and
//!   wrong types (from the loader);
//! - unknown fields (warning);
//! - a VirtualService without hosts that no other VirtualService delegates to;
//! - a VirtualService destination subset that no DestinationRule for that host defines (Istio
//!   answers 503 for it);
//! - the weights of one route's destinations not adding up to 100 (checked when there is more
//!   than one destination or any weight is set);
//! - a host that matches no Service or ServiceEntry. Short names resolve in the object's
//!   namespace (`reviews` -> `reviews.<ns>.svc.cluster.local`); names with a dot are taken as
//!   written, as Istio does; `*.example.com` matches by suffix either way. Destination hosts are
//!   always checked; the `hosts` of a VirtualService only when it applies to the mesh (no
//!   `gateways`, or `mesh` among them): hosts of a gateway-only VirtualService are the names
//!   clients outside use, which need no Service;
//! - PeerAuthentications that conflict: two mesh-wide ones (root namespace, no selector), two
//!   namespace-wide ones in one namespace, or two with the same selector;
//! - a policy (AuthorizationPolicy, RequestAuthentication, PeerAuthentication, Telemetry) whose
//!   selector matches no Pod or workload pod template of its namespace (of any namespace, in the
//!   root namespace) - only a warning when the files hold no pod of the policy's namespace at
//!   all, as they rarely hold the root namespace's - or whose `targetRefs` name an object that
//!   is not there, or that sets both;
//! - a waypoint in use (`istio.io/use-waypoint` on a Namespace, Service, ServiceEntry, Pod or pod
//!   template; `istio.io/use-waypoint-namespace` names another namespace) with no Gateway API
//!   Gateway of class `istio-waypoint` by that name declared;
//! - the same object defined twice (warning);
//! - what Weft accepts but does not enforce as written (warnings, listed in [`unenforced`], which
//!   the controller logs too): kinds it does not implement, Istio gateways, ServiceEntry,
//!   Telemetry, routing and JWT rules without a waypoint, L7 fields in policies ztunnel enforces,
//!   CUSTOM and AUDIT, PeerAuthentication DISABLE.
//!
//! Visibility (`exportTo`) is not modeled: any DestinationRule or Service in the set counts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use super::decode::{closest, display_name, Object};
use super::kube::{KubeGateway, WAYPOINT_GATEWAY_CLASS};
use super::meta::{labels_to_string, Labels, PolicyTargetReference, WorkloadSelector};
use super::networking::{Destination, DestinationRule, VirtualService};
use super::yaml::{LoadError, LoadedDoc};

pub mod unenforced;

/// Istio's root namespace: mesh-wide policies live there.
pub const ROOT_NAMESPACE: &str = weft_core::names::ROOT_NAMESPACE;
/// The cluster's DNS suffix.
pub const DOMAIN_SUFFIX: &str = weft_core::names::DEFAULT_DOMAIN_SUFFIX;
/// Label binding a Namespace, Service or Pod to a waypoint.
pub const USE_WAYPOINT_LABEL: &str = weft_core::names::USE_WAYPOINT_LABEL;
/// Label naming the namespace of that waypoint when it is not the object's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = weft_core::names::USE_WAYPOINT_NAMESPACE_LABEL;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub file: String,
    pub line: usize,
    /// `Kind namespace/name`, empty when the document has none (invalid YAML).
    pub object: String,
    /// Path of the field (`spec.http[0].route[1].destination.subset`), empty for the whole object.
    pub field: String,
    pub message: String,
    pub suggestion: Option<String>,
}

/// What the analysis assumes about the cluster.
#[derive(Clone, Debug)]
pub struct AnalyzeOptions {
    pub root_namespace: String,
    pub domain_suffix: String,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions { root_namespace: ROOT_NAMESPACE.into(), domain_suffix: DOMAIN_SUFFIX.into() }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

impl fmt::Display for Finding {
    /// `file:line: error: Kind ns/name field: message (fix: suggestion)`.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}: {}: ", self.file, self.line, self.severity)?;
        match (self.object.is_empty(), self.field.is_empty()) {
            (false, false) => write!(f, "{} {}: ", self.object, self.field)?,
            (false, true) => write!(f, "{}: ", self.object)?,
            (true, false) => write!(f, "{}: ", self.field)?,
            (true, true) => {}
        }
        f.write_str(&self.message)?;
        if let Some(s) = &self.suggestion {
            write!(f, " (fix: {s})")?;
        }
        Ok(())
    }
}

/// Analyzes `docs` with Istio's defaults (root namespace `istio-system`, `cluster.local`).
pub fn analyze(docs: &[LoadedDoc]) -> Vec<Finding> {
    analyze_with(docs, &AnalyzeOptions::default())
}

/// Analyzes `docs`; findings come sorted by file and line.
pub fn analyze_with(docs: &[LoadedDoc], options: &AnalyzeOptions) -> Vec<Finding> {
    let mut a = Analysis { options, findings: Vec::new(), objects: Vec::new() };
    for doc in docs {
        a.loading(doc);
    }
    a.duplicates();
    a.virtual_services();
    a.peer_authentication_conflicts();
    a.policy_targets();
    a.waypoints();
    a.unenforced();
    let mut findings = a.findings;
    findings.sort_by(|x, y| (&x.file, x.line).cmp(&(&y.file, y.line)));
    findings
}

/// A decoded object and the document it came from.
struct Entry<'a> {
    doc: &'a LoadedDoc,
    object: &'a Object,
}

struct Analysis<'a> {
    options: &'a AnalyzeOptions,
    findings: Vec<Finding>,
    objects: Vec<Entry<'a>>,
}

impl<'a> Analysis<'a> {
    fn push(
        &mut self,
        severity: Severity,
        e: &Entry,
        field: &str,
        message: String,
        suggestion: Option<String>,
    ) {
        self.findings.push(Finding {
            severity,
            file: e.doc.file.clone(),
            line: e.doc.line_of(field),
            object: e.object.display_name(),
            field: field.to_owned(),
            message,
            suggestion,
        });
    }

    /// Documents that did not load, unknown fields.
    fn loading(&mut self, doc: &'a LoadedDoc) {
        let decoded = match &doc.result {
            Ok(decoded) => decoded,
            Err(LoadError::Yaml { line, column, message }) => {
                self.findings.push(Finding {
                    severity: Severity::Error,
                    file: doc.file.clone(),
                    line: *line,
                    object: String::new(),
                    field: String::new(),
                    message: format!("invalid YAML at line {line} column {column}: {message}"),
                    suggestion: Some("check the indentation (spaces, not tabs) and quoting there".into()),
                });
                return;
            }
            Err(LoadError::Decode(e)) => {
                let field = e.field().to_owned();
                self.findings.push(Finding {
                    severity: Severity::Error,
                    file: doc.file.clone(),
                    line: doc.line_of(&field),
                    object: doc.name.clone(),
                    field,
                    message: e.to_string(),
                    suggestion: e.suggestion(),
                });
                return;
            }
        };
        let entry = Entry { doc, object: &decoded.object };
        for w in &decoded.warnings {
            let suggestion = match w.did_you_mean {
                Some(known) => format!("did you mean `{known}`?"),
                None => "check its spelling and indentation against the Istio reference, or remove it".into(),
            };
            self.push(Severity::Warning, &entry, &w.field, "unknown field, ignored".into(), Some(suggestion));
        }
        if !matches!(decoded.object, Object::Ignored(_)) {
            self.objects.push(entry);
        }
    }

    fn duplicates(&mut self) {
        let mut seen: BTreeMap<String, &LoadedDoc> = BTreeMap::new();
        let mut found = Vec::new();
        for e in &self.objects {
            let key = e.object.display_name();
            match seen.get(&key) {
                Some(first) => found.push((e.doc, e.object, format!("{}:{}", first.file, first.line))),
                None => {
                    seen.insert(key, e.doc);
                }
            }
        }
        for (doc, object, first) in found {
            let e = Entry { doc, object };
            self.push(
                Severity::Warning,
                &e,
                "",
                format!("defined again (first at {first}); the last one applied wins"),
                Some("keep one definition".into()),
            );
        }
    }

    // ---- hosts --------------------------------------------------------------------------

    /// `reviews` -> `reviews.<ns>.svc.<suffix>`; names with a dot, IPs and `*` as written.
    fn resolve(&self, host: &str, namespace: &str) -> String {
        if host == "*" || host.contains('.') || host.parse::<IpAddr>().is_ok() {
            host.to_owned()
        } else {
            format!("{host}.{namespace}.svc.{}", self.options.domain_suffix)
        }
    }

    /// Every host a Service or ServiceEntry provides (fully qualified).
    fn known_hosts(&self) -> Vec<String> {
        let mut hosts = Vec::new();
        for e in &self.objects {
            match e.object {
                Object::Service(s) => hosts.push(format!(
                    "{}.{}.svc.{}",
                    s.metadata.name, s.metadata.namespace, self.options.domain_suffix
                )),
                Object::ServiceEntry(se) => {
                    hosts.extend(se.spec.hosts.iter().map(|h| self.resolve(h, &se.metadata.namespace)))
                }
                _ => {}
            }
        }
        hosts
    }

    fn host_finding(&mut self, e: &Entry, field: &str, host: &str, resolved: &str, known: &[String]) {
        let namespace = &e.object.metadata().namespace;
        let shown = if host == resolved { format!("`{host}`") } else { format!("`{host}` ({resolved})") };
        let suffix = format!(".svc.{}", self.options.domain_suffix);
        let suggestion = if let Some((name, ns)) = host.split_once('.').filter(|(_, ns)| !ns.contains('.')) {
            // `name.namespace`: Istio does not expand it.
            let fqdn = format!("{name}.{ns}{suffix}");
            if known.contains(&fqdn) {
                Some(format!("write the full name {fqdn}: Istio takes names with a dot as written"))
            } else {
                None
            }
        } else {
            None
        };
        let suggestion = suggestion.or_else(|| {
            let local: Vec<&str> = known
                .iter()
                .filter_map(|k| k.strip_suffix(&suffix)?.strip_suffix(&format!(".{namespace}")))
                .collect();
            closest(host, local.into_iter()).map(|c| format!("did you mean `{c}`?"))
        });
        let suggestion = suggestion.or_else(|| {
            Some(format!(
                "create the Service{}, or a ServiceEntry for a host outside the cluster",
                if host.contains('.') { "" } else { " in this namespace" }
            ))
        });
        self.push(
            Severity::Error,
            e,
            field,
            format!("host {shown} matches no Service or ServiceEntry"),
            suggestion,
        );
    }

    // ---- VirtualService -----------------------------------------------------------------

    fn virtual_services(&mut self) {
        let known = self.known_hosts();
        let objects = std::mem::take(&mut self.objects);
        let delegated: BTreeSet<(String, String)> = objects
            .iter()
            .filter_map(|e| match e.object {
                Object::VirtualService(vs) => Some(vs),
                _ => None,
            })
            .flat_map(|vs| {
                vs.spec.http.iter().filter_map(|r| r.delegate.as_ref()).map(|d| {
                    (d.namespace.clone().unwrap_or_else(|| vs.metadata.namespace.clone()), d.name.clone())
                })
            })
            .collect();
        let rules: Vec<&DestinationRule> = objects
            .iter()
            .filter_map(|e| match e.object {
                Object::DestinationRule(dr) => Some(dr),
                _ => None,
            })
            .collect();
        for e in &objects {
            let Object::VirtualService(vs) = e.object else { continue };
            let ns = &vs.metadata.namespace;
            if vs.spec.hosts.is_empty() && !delegated.contains(&(ns.clone(), vs.metadata.name.clone())) {
                self.push(
                    Severity::Error,
                    e,
                    "spec.hosts",
                    "missing required field (only a delegate VirtualService may omit it, and none delegates to this one)".into(),
                    Some("list the hosts this VirtualService routes, e.g. hosts: [reviews]".into()),
                );
            }
            if vs.spec.applies_to_mesh() {
                for (i, host) in vs.spec.hosts.iter().enumerate() {
                    let resolved = self.resolve(host, ns);
                    if host != "*" && !known_host(&resolved, &known) {
                        self.host_finding(e, &format!("spec.hosts[{i}]"), host, &resolved, &known);
                    }
                }
            }
            for (field, destination) in destinations(vs) {
                let resolved = self.resolve(&destination.host, ns);
                if destination.host.parse::<IpAddr>().is_err() && !known_host(&resolved, &known) {
                    self.host_finding(e, &format!("{field}.host"), &destination.host, &resolved, &known);
                }
                if let Some(subset) = &destination.subset {
                    self.subset(e, &format!("{field}.subset"), subset, &resolved, &rules);
                }
            }
            self.weights(e, vs);
        }
        self.objects = objects;
    }

    fn subset(&mut self, e: &Entry, field: &str, subset: &str, host: &str, rules: &[&DestinationRule]) {
        let resolved = |dr: &DestinationRule| self.resolve(&dr.spec.host, &dr.metadata.namespace);
        // Istio uses the most specific rule: an exact host first, else a wildcard one.
        let exact: Vec<&DestinationRule> = rules.iter().copied().filter(|dr| resolved(dr) == host).collect();
        let matching = if exact.is_empty() {
            rules.iter().copied().filter(|dr| hosts_match(&resolved(dr), host)).collect()
        } else {
            exact
        };
        if matching.iter().any(|dr| dr.spec.subsets.iter().any(|s| s.name == subset)) {
            return;
        }
        let Some(dr) = matching.first() else {
            self.push(
                Severity::Error,
                e,
                field,
                format!(
                    "subset `{subset}` of host {host} is not defined: no DestinationRule for that host \
                     (requests routed to it fail with 503)"
                ),
                Some(format!(
                    "add a DestinationRule with host: {host} and a subset named {subset} selecting its pods' labels"
                )),
            );
            return;
        };
        let names: Vec<&str> =
            matching.iter().flat_map(|dr| dr.spec.subsets.iter().map(|s| s.name.as_str())).collect();
        let rule = display_name("DestinationRule", &dr.metadata.namespace, &dr.metadata.name);
        let defined =
            if names.is_empty() { "no subsets".to_owned() } else { format!("subsets {}", names.join(", ")) };
        let suggestion = match closest(subset, names.iter().copied()) {
            Some(c) => format!("did you mean `{c}`? Otherwise add subset {subset} to {rule}"),
            None => format!("add a subset named {subset} to {rule}"),
        };
        self.push(
            Severity::Error,
            e,
            field,
            format!("subset `{subset}` is not defined by {rule} (it has {defined}); requests routed to it fail with 503"),
            Some(suggestion),
        );
    }

    fn weights(&mut self, e: &Entry, vs: &VirtualService) {
        let http = vs.spec.http.iter().enumerate().map(|(i, r)| {
            (format!("spec.http[{i}].route"), r.route.iter().map(|d| d.weight).collect::<Vec<_>>())
        });
        let tcp = vs.spec.tcp.iter().enumerate().map(|(i, r)| {
            (format!("spec.tcp[{i}].route"), r.route.iter().map(|d| d.weight).collect::<Vec<_>>())
        });
        let tls = vs.spec.tls.iter().enumerate().map(|(i, r)| {
            (format!("spec.tls[{i}].route"), r.route.iter().map(|d| d.weight).collect::<Vec<_>>())
        });
        let routes: Vec<(String, Vec<Option<i32>>)> = http.chain(tcp).chain(tls).collect();
        for (field, weights) in routes {
            if weights.len() < 2 && weights.iter().all(Option::is_none) {
                continue;
            }
            let sum: i64 = weights.iter().map(|w| i64::from(w.unwrap_or(0))).sum();
            let negative = weights.iter().any(|w| w.is_some_and(|w| w < 0));
            if sum != 100 || negative {
                let listed: Vec<String> =
                    weights.iter().map(|w| w.map_or("unset".to_owned(), |w| w.to_string())).collect();
                self.push(
                    Severity::Error,
                    e,
                    &field,
                    format!("destination weights ({}) add up to {sum}, not 100", listed.join(", ")),
                    Some("give every destination a weight from 0 to 100, together 100".into()),
                );
            }
        }
    }

    // ---- PeerAuthentication -------------------------------------------------------------

    fn peer_authentication_conflicts(&mut self) {
        let root = self.options.root_namespace.clone();
        let mut first_by_scope: BTreeMap<String, &Entry> = BTreeMap::new();
        let mut conflicts = Vec::new();
        for e in &self.objects {
            let Object::PeerAuthentication(pa) = e.object else { continue };
            let ns = &pa.metadata.namespace;
            let labels = pa.spec.selector.as_ref().map(|s| &s.match_labels).filter(|l| !l.is_empty());
            let (key, scope) = match labels {
                None if *ns == root => {
                    (String::new(), format!("mesh-wide (no selector in the root namespace {root})"))
                }
                None => (ns.clone(), format!("namespace-wide (no selector) in namespace {ns}")),
                Some(labels) => (
                    format!("{ns}\u{0}{}", labels_to_string(labels)),
                    format!("for the same selector {} in namespace {ns}", labels_to_string(labels)),
                ),
            };
            match first_by_scope.get(&key) {
                Some(first) => conflicts.push((
                    e.doc,
                    e.object,
                    first.object.display_name(),
                    format!("{}:{}", first.doc.file, first.doc.line),
                    scope,
                )),
                None => {
                    first_by_scope.insert(key, e);
                }
            }
        }
        for (doc, object, first, at, scope) in conflicts {
            let e = Entry { doc, object };
            self.push(
                Severity::Error,
                &e,
                "",
                format!("conflicts with {first} ({at}): both are {scope}; Istio applies only the older one"),
                Some("keep one PeerAuthentication per scope and merge their settings".into()),
            );
        }
    }

    // ---- selectors and targetRefs -------------------------------------------------------

    fn policy_targets(&mut self) {
        let objects = std::mem::take(&mut self.objects);
        for e in &objects {
            let (selector, target_ref, target_refs) = match e.object {
                Object::AuthorizationPolicy(p) => {
                    (p.spec.selector.as_ref(), p.spec.target_ref.as_ref(), &p.spec.target_refs[..])
                }
                Object::RequestAuthentication(p) => {
                    (p.spec.selector.as_ref(), p.spec.target_ref.as_ref(), &p.spec.target_refs[..])
                }
                Object::Telemetry(p) => {
                    (p.spec.selector.as_ref(), p.spec.target_ref.as_ref(), &p.spec.target_refs[..])
                }
                Object::PeerAuthentication(p) => (p.spec.selector.as_ref(), None, &[][..]),
                _ => continue,
            };
            let refs: Vec<(String, &PolicyTargetReference)> = target_ref
                .map(|r| ("spec.targetRef".to_owned(), r))
                .into_iter()
                .chain(target_refs.iter().enumerate().map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)))
                .collect();
            let selector = selector.filter(|s| !s.match_labels.is_empty());
            if selector.is_some() && !refs.is_empty() {
                self.push(
                    Severity::Error,
                    e,
                    "spec.selector",
                    "selector and targetRefs are both set; Istio accepts only one".into(),
                    Some("keep targetRefs for waypoints and gateways, selector for workloads".into()),
                );
            }
            if let Some(selector) = selector {
                self.selector(e, selector, &objects);
            }
            for (field, r) in refs {
                self.target_ref(e, &field, r, &objects);
            }
        }
        self.objects = objects;
    }

    fn selector(&mut self, e: &Entry, selector: &WorkloadSelector, objects: &[Entry]) {
        let ns = &e.object.metadata().namespace;
        let mesh_wide = *ns == self.options.root_namespace;
        let pods: Vec<&Labels> = objects
            .iter()
            .filter(|o| mesh_wide || o.object.metadata().namespace == *ns)
            .filter_map(|o| match o.object {
                Object::Pod(p) => Some(&p.metadata.labels),
                Object::Workload(w) => Some(&w.pod_labels),
                _ => None,
            })
            .collect();
        if pods.iter().any(|labels| selector.matches(labels)) {
            return;
        }
        let wanted = labels_to_string(&selector.match_labels);
        // Without any pod of the policy's own namespace in the files (typical of the root
        // namespace, whose gateways come from Istio's install), nothing can be concluded.
        let own_pods = objects.iter().any(|o| {
            o.object.metadata().namespace == *ns && matches!(o.object, Object::Pod(_) | Object::Workload(_))
        });
        if !own_pods {
            self.push(
                Severity::Warning,
                e,
                "spec.selector.matchLabels",
                format!(
                    "no Pod or workload of namespace {ns} is in the analyzed files, so selector {wanted} cannot be checked"
                ),
                Some("analyze the workloads' manifests together with the policy".into()),
            );
            return;
        }
        // Show what the pods there do have for the selector's keys.
        let mut seen: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for labels in &pods {
            for key in selector.match_labels.keys() {
                if let Some(v) = labels.get(key) {
                    seen.entry(key).or_default().insert(v);
                }
            }
        }
        let hint = if seen.is_empty() {
            "no pod there has these label keys".to_owned()
        } else {
            let have: Vec<String> = seen
                .iter()
                .map(|(k, vs)| format!("{k}: {}", vs.iter().take(6).copied().collect::<Vec<_>>().join(", ")))
                .collect();
            format!("pods there have {}", have.join("; "))
        };
        self.push(
            Severity::Error,
            e,
            "spec.selector.matchLabels",
            format!(
                "selector {wanted} matches none of the {} pods and workloads in {}, so the policy applies to nothing",
                pods.len(),
                if mesh_wide { "the mesh".to_owned() } else { format!("namespace {ns}") }
            ),
            Some(format!("fix the labels ({hint})")),
        );
    }

    fn target_ref(&mut self, e: &Entry, field: &str, r: &PolicyTargetReference, objects: &[Entry]) {
        let ns = &e.object.metadata().namespace;
        if !r.namespace.is_empty() && r.namespace != *ns {
            self.push(
                Severity::Error,
                e,
                field,
                format!(
                    "targets namespace {} but a policy may only target its own namespace {ns}",
                    r.namespace
                ),
                Some("move the policy to the target's namespace".into()),
            );
            return;
        }
        let found = objects.iter().find(|o| {
            let m = o.object.metadata();
            m.name == r.name
                && m.namespace == *ns
                && matches!(
                    (r.group.as_str(), r.kind.as_str(), o.object),
                    ("" | "core", "Service", Object::Service(_))
                        | ("networking.istio.io", "ServiceEntry", Object::ServiceEntry(_))
                        | ("gateway.networking.k8s.io", "Gateway", Object::KubeGateway(_))
                )
        });
        if r.kind == "GatewayClass" || found.is_some() {
            return;
        }
        let group = if r.group.is_empty() { String::new() } else { format!(".{}", r.group) };
        self.push(
            Severity::Error,
            e,
            field,
            format!("targets {}{group} {ns}/{}, which is not in the analyzed files", r.kind, r.name),
            Some(format!(
                "check the name, or define the {}; kinds that can be targeted: Service, ServiceEntry, Gateway",
                r.kind
            )),
        );
    }

    // ---- what is not enforced -----------------------------------------------------------

    fn unenforced(&mut self) {
        let entries = std::mem::take(&mut self.objects);
        let objects: Vec<&Object> = entries.iter().map(|e| e.object).collect();
        for n in unenforced::not_enforced(&objects, self.options) {
            self.push(Severity::Warning, &entries[n.object], &n.field, n.message, n.fix);
        }
        self.objects = entries;
    }

    // ---- waypoints ----------------------------------------------------------------------

    fn waypoints(&mut self) {
        let objects = std::mem::take(&mut self.objects);
        let gateways: Vec<&KubeGateway> = objects
            .iter()
            .filter_map(|e| match e.object {
                Object::KubeGateway(g) => Some(g),
                _ => None,
            })
            .collect();
        for e in &objects {
            let (labels, own_ns, field_prefix) = match e.object {
                Object::Namespace(n) => (&n.metadata.labels, &n.metadata.name, "metadata.labels"),
                Object::Service(s) => (&s.metadata.labels, &s.metadata.namespace, "metadata.labels"),
                Object::ServiceEntry(s) => (&s.metadata.labels, &s.metadata.namespace, "metadata.labels"),
                Object::Pod(p) => (&p.metadata.labels, &p.metadata.namespace, "metadata.labels"),
                Object::Workload(w) => {
                    (&w.pod_labels, &w.metadata.namespace, "spec.template.metadata.labels")
                }
                _ => continue,
            };
            let Some(waypoint) = labels.get(USE_WAYPOINT_LABEL) else { continue };
            if waypoint == "none" {
                continue;
            }
            let ns = labels.get(USE_WAYPOINT_NAMESPACE_LABEL).unwrap_or(own_ns);
            let field = format!("{field_prefix}.{USE_WAYPOINT_LABEL}");
            match gateways.iter().find(|g| g.metadata.name == *waypoint && g.metadata.namespace == *ns) {
                Some(g) if g.is_waypoint() => {}
                Some(g) => self.push(
                    Severity::Error,
                    e,
                    &field,
                    format!(
                        "uses waypoint {ns}/{waypoint}, but that Gateway has class `{}`, not `{WAYPOINT_GATEWAY_CLASS}`",
                        g.spec.gateway_class_name
                    ),
                    Some(format!("set gatewayClassName: {WAYPOINT_GATEWAY_CLASS} on Gateway {ns}/{waypoint}")),
                ),
                None => self.push(
                    Severity::Error,
                    e,
                    &field,
                    format!(
                        "uses waypoint {ns}/{waypoint}, which is not declared (no Gateway of class \
                         {WAYPOINT_GATEWAY_CLASS} named {waypoint} in namespace {ns})"
                    ),
                    Some(format!(
                        "declare it: a gateway.networking.k8s.io/v1 Gateway named {waypoint} in namespace {ns} \
                         with gatewayClassName: {WAYPOINT_GATEWAY_CLASS}"
                    )),
                ),
            }
        }
        self.objects = objects;
    }
}

/// Every destination of a VirtualService with the path of its `destination` field.
fn destinations(vs: &VirtualService) -> Vec<(String, &Destination)> {
    let mut out = Vec::new();
    for (i, r) in vs.spec.http.iter().enumerate() {
        for (j, d) in r.route.iter().enumerate() {
            out.push((format!("spec.http[{i}].route[{j}].destination"), &d.destination));
        }
        if let Some(m) = &r.mirror {
            out.push((format!("spec.http[{i}].mirror"), m));
        }
        for (j, m) in r.mirrors.iter().enumerate() {
            out.push((format!("spec.http[{i}].mirrors[{j}].destination"), &m.destination));
        }
    }
    for (i, r) in vs.spec.tcp.iter().enumerate() {
        for (j, d) in r.route.iter().enumerate() {
            out.push((format!("spec.tcp[{i}].route[{j}].destination"), &d.destination));
        }
    }
    for (i, r) in vs.spec.tls.iter().enumerate() {
        for (j, d) in r.route.iter().enumerate() {
            out.push((format!("spec.tls[{i}].route[{j}].destination"), &d.destination));
        }
    }
    out
}

fn known_host(host: &str, known: &[String]) -> bool {
    known.iter().any(|k| hosts_match(host, k))
}

/// Whether two hosts can name the same thing: equal, or one is a wildcard (`*`,
/// `*.example.com`) covering the other.
pub fn hosts_match(a: &str, b: &str) -> bool {
    a == b || covers(a, b) || covers(b, a)
}

fn covers(wildcard: &str, host: &str) -> bool {
    match wildcard.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => suffix.starts_with('.') && host.len() > suffix.len() && host.ends_with(suffix),
        None => false,
    }
}

#[cfg(test)]
mod tests;
