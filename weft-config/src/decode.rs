//! From one manifest (a JSON/YAML value) to a typed [`Object`]: checks `apiVersion` and `kind`
//! against what Istio and Kubernetes serve, defaults the namespace, and decodes the body with
//! every unknown field reported as a warning (never silently dropped) and every wrong type or
//! missing required field reported as an error naming the field. Knows nothing of files.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::fields;
use super::kube::{KubeGateway, Namespace, Pod, Service, Workload, WorkloadDoc};
use super::meta::ObjectMeta;
use super::networking::{DestinationRule, Gateway, ServiceEntry, VirtualService};
use super::security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};
use super::telemetry::Telemetry;
use Handling::{Ignored, Model, Unsupported, Workload as Wl};

/// The namespace of a namespaced object that names none and whose caller gives no default.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A decoded manifest.
// Objects are decoded once and kept in collections of modest size; boxing the larger variants
// would save little memory and burden every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    /// The pod template of a Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob.
    Workload(Workload),
    ServiceEntry(ServiceEntry),
    VirtualService(VirtualService),
    DestinationRule(DestinationRule),
    /// `networking.istio.io` Gateway.
    Gateway(Gateway),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    RequestAuthentication(RequestAuthentication),
    Telemetry(Telemetry),
    /// `gateway.networking.k8s.io` Gateway (a waypoint when its class is `istio-waypoint`).
    KubeGateway(KubeGateway),
    /// An Istio (or Gateway API) kind that Weft does not implement: it has no effect.
    Unsupported(OtherObject),
    /// A Kubernetes kind that carries no mesh configuration (ConfigMap, Role, ...): skipped.
    Ignored(OtherObject),
}

/// An object Weft does not model: what it is and its metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OtherObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
}

/// The result of decoding one manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    pub object: Object,
    /// Fields Weft does not know, ignored.
    pub warnings: Vec<FieldWarning>,
}

/// A field that was ignored, by path (`spec.http[0].route[0].destinaton`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldWarning {
    pub field: String,
    /// The known field it most likely meant (`destination`).
    pub did_you_mean: Option<&'static str>,
}

/// Why a manifest cannot be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("a manifest must be a mapping with apiVersion, kind and metadata, not {found}")]
    NotAMapping { found: &'static str },
    #[error("unknown kind `{kind}` (apiVersion `{api_version}`)")]
    UnknownKind { api_version: String, kind: String, hint: Option<String> },
    #[error("{kind} is not served as `{api_version}`; accepted: {}", .accepted.join(", "))]
    UnknownVersion { api_version: String, kind: String, accepted: Vec<String> },
    #[error("{message}")]
    Field { field: String, message: String, hint: Option<String> },
}

impl DecodeError {
    /// The field the error is about (empty when it is about the whole manifest).
    pub fn field(&self) -> &str {
        match self {
            DecodeError::NotAMapping { .. } => "",
            DecodeError::UnknownKind { .. } => "kind",
            DecodeError::UnknownVersion { .. } => "apiVersion",
            DecodeError::Field { field, .. } => field,
        }
    }

    /// What to change, when there is something better to say than the message.
    pub fn suggestion(&self) -> Option<String> {
        match self {
            DecodeError::NotAMapping { .. } => {
                Some("start the document with apiVersion:, kind: and metadata:".into())
            }
            DecodeError::UnknownKind { hint, .. } | DecodeError::Field { hint, .. } => hint.clone(),
            DecodeError::UnknownVersion { accepted, .. } => {
                accepted.first().map(|v| format!("use apiVersion: {v}"))
            }
        }
    }
}

/// How the decoder fills in what a manifest leaves out.
#[derive(Clone, Debug, Default)]
pub struct DecodeOptions {
    /// The namespace of namespaced objects that name none (`default` when `None`), like
    /// `kubectl apply -n`.
    pub default_namespace: Option<String>,
}

/// What Weft does with a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handling {
    Model(ModelKind),
    Workload,
    Unsupported,
    Ignored,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModelKind {
    Namespace,
    Pod,
    Service,
    ServiceEntry,
    VirtualService,
    DestinationRule,
    Gateway,
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
    Telemetry,
    KubeGateway,
}

/// One kind as the API serves it.
struct KindInfo {
    group: &'static str,
    kind: &'static str,
    /// The versions served; empty means any (kinds Weft does not decode).
    versions: &'static [&'static str],
    namespaced: bool,
    handling: Handling,
}

const ISTIO_NETWORKING: &[&str] = &["v1", "v1beta1", "v1alpha3"];
const ISTIO_SECURITY: &[&str] = &["v1", "v1beta1"];
const ISTIO_TELEMETRY: &[&str] = &["v1", "v1alpha1"];
const GATEWAY_API: &[&str] = &["v1", "v1beta1"];
const V1: &[&str] = &["v1"];
const ANY: &[&str] = &[];

const fn kind(
    group: &'static str,
    kind: &'static str,
    versions: &'static [&'static str],
    namespaced: bool,
    handling: Handling,
) -> KindInfo {
    KindInfo { group, kind, versions, namespaced, handling }
}

/// Every kind Weft recognizes. Anything else is an unknown kind.
const KINDS: &[KindInfo] = &[
    kind("", "Namespace", V1, false, Model(ModelKind::Namespace)),
    kind("", "Pod", V1, true, Model(ModelKind::Pod)),
    kind("", "Service", V1, true, Model(ModelKind::Service)),
    kind("networking.istio.io", "VirtualService", ISTIO_NETWORKING, true, Model(ModelKind::VirtualService)),
    kind("networking.istio.io", "DestinationRule", ISTIO_NETWORKING, true, Model(ModelKind::DestinationRule)),
    kind("networking.istio.io", "Gateway", ISTIO_NETWORKING, true, Model(ModelKind::Gateway)),
    kind("networking.istio.io", "ServiceEntry", ISTIO_NETWORKING, true, Model(ModelKind::ServiceEntry)),
    kind(
        "security.istio.io",
        "AuthorizationPolicy",
        ISTIO_SECURITY,
        true,
        Model(ModelKind::AuthorizationPolicy),
    ),
    kind(
        "security.istio.io",
        "PeerAuthentication",
        ISTIO_SECURITY,
        true,
        Model(ModelKind::PeerAuthentication),
    ),
    kind(
        "security.istio.io",
        "RequestAuthentication",
        ISTIO_SECURITY,
        true,
        Model(ModelKind::RequestAuthentication),
    ),
    kind("telemetry.istio.io", "Telemetry", ISTIO_TELEMETRY, true, Model(ModelKind::Telemetry)),
    kind("gateway.networking.k8s.io", "Gateway", GATEWAY_API, true, Model(ModelKind::KubeGateway)),
    // Pod templates.
    kind("apps", "Deployment", V1, true, Wl),
    kind("apps", "StatefulSet", V1, true, Wl),
    kind("apps", "DaemonSet", V1, true, Wl),
    kind("apps", "ReplicaSet", V1, true, Wl),
    kind("batch", "Job", V1, true, Wl),
    kind("batch", "CronJob", V1, true, Wl),
    // Istio and Gateway API kinds Weft does not implement.
    kind("networking.istio.io", "EnvoyFilter", ANY, true, Unsupported),
    kind("networking.istio.io", "Sidecar", ANY, true, Unsupported),
    kind("networking.istio.io", "WorkloadEntry", ANY, true, Unsupported),
    kind("networking.istio.io", "WorkloadGroup", ANY, true, Unsupported),
    kind("networking.istio.io", "ProxyConfig", ANY, true, Unsupported),
    kind("extensions.istio.io", "WasmPlugin", ANY, true, Unsupported),
    kind("install.istio.io", "IstioOperator", ANY, true, Unsupported),
    kind("gateway.networking.k8s.io", "GatewayClass", ANY, false, Unsupported),
    kind("gateway.networking.k8s.io", "HTTPRoute", ANY, true, Unsupported),
    kind("gateway.networking.k8s.io", "GRPCRoute", ANY, true, Unsupported),
    kind("gateway.networking.k8s.io", "TCPRoute", ANY, true, Unsupported),
    kind("gateway.networking.k8s.io", "TLSRoute", ANY, true, Unsupported),
    kind("gateway.networking.k8s.io", "UDPRoute", ANY, true, Unsupported),
    kind("gateway.networking.k8s.io", "ReferenceGrant", ANY, true, Unsupported),
    kind("gateway.networking.k8s.io", "BackendTLSPolicy", ANY, true, Unsupported),
    // Kubernetes kinds that carry no mesh configuration.
    kind("", "ServiceAccount", ANY, true, Ignored),
    kind("", "ConfigMap", ANY, true, Ignored),
    kind("", "Secret", ANY, true, Ignored),
    kind("", "Endpoints", ANY, true, Ignored),
    kind("", "PersistentVolumeClaim", ANY, true, Ignored),
    kind("", "PersistentVolume", ANY, false, Ignored),
    kind("", "LimitRange", ANY, true, Ignored),
    kind("", "ResourceQuota", ANY, true, Ignored),
    kind("discovery.k8s.io", "EndpointSlice", ANY, true, Ignored),
    kind("rbac.authorization.k8s.io", "Role", ANY, true, Ignored),
    kind("rbac.authorization.k8s.io", "RoleBinding", ANY, true, Ignored),
    kind("rbac.authorization.k8s.io", "ClusterRole", ANY, false, Ignored),
    kind("rbac.authorization.k8s.io", "ClusterRoleBinding", ANY, false, Ignored),
    kind("networking.k8s.io", "NetworkPolicy", ANY, true, Ignored),
    kind("networking.k8s.io", "Ingress", ANY, true, Ignored),
    kind("networking.k8s.io", "IngressClass", ANY, false, Ignored),
    kind("policy", "PodDisruptionBudget", ANY, true, Ignored),
    kind("autoscaling", "HorizontalPodAutoscaler", ANY, true, Ignored),
    kind("apiextensions.k8s.io", "CustomResourceDefinition", ANY, false, Ignored),
    kind("admissionregistration.k8s.io", "MutatingWebhookConfiguration", ANY, false, Ignored),
    kind("admissionregistration.k8s.io", "ValidatingWebhookConfiguration", ANY, false, Ignored),
    kind("scheduling.k8s.io", "PriorityClass", ANY, false, Ignored),
    kind("storage.k8s.io", "StorageClass", ANY, false, Ignored),
];

impl Object {
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::Workload(o) => &o.metadata,
            Object::ServiceEntry(o) => &o.metadata,
            Object::VirtualService(o) => &o.metadata,
            Object::DestinationRule(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
            Object::RequestAuthentication(o) => &o.metadata,
            Object::Telemetry(o) => &o.metadata,
            Object::KubeGateway(o) => &o.metadata,
            Object::Unsupported(o) | Object::Ignored(o) => &o.metadata,
        }
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Namespace(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::Workload(o) => &mut o.metadata,
            Object::ServiceEntry(o) => &mut o.metadata,
            Object::VirtualService(o) => &mut o.metadata,
            Object::DestinationRule(o) => &mut o.metadata,
            Object::Gateway(o) => &mut o.metadata,
            Object::AuthorizationPolicy(o) => &mut o.metadata,
            Object::PeerAuthentication(o) => &mut o.metadata,
            Object::RequestAuthentication(o) => &mut o.metadata,
            Object::Telemetry(o) => &mut o.metadata,
            Object::KubeGateway(o) => &mut o.metadata,
            Object::Unsupported(o) | Object::Ignored(o) => &mut o.metadata,
        }
    }

    /// The kind as people write it; the Gateway API Gateway is `Gateway.gateway.networking.k8s.io`
    /// to tell it from Istio's.
    pub fn kind(&self) -> &str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::Service(_) => "Service",
            Object::Workload(w) => &w.kind,
            Object::ServiceEntry(_) => "ServiceEntry",
            Object::VirtualService(_) => "VirtualService",
            Object::DestinationRule(_) => "DestinationRule",
            Object::Gateway(_) => "Gateway",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Object::PeerAuthentication(_) => "PeerAuthentication",
            Object::RequestAuthentication(_) => "RequestAuthentication",
            Object::Telemetry(_) => "Telemetry",
            Object::KubeGateway(_) => KUBE_GATEWAY,
            Object::Unsupported(o) | Object::Ignored(o) => &o.kind,
        }
    }

    /// `Kind namespace/name` (or `Kind name` for cluster-scoped kinds), for messages.
    pub fn display_name(&self) -> String {
        display_name(self.kind(), &self.metadata().namespace, &self.metadata().name)
    }
}

/// How messages name the Gateway API Gateway.
pub const KUBE_GATEWAY: &str = "Gateway.gateway.networking.k8s.io";

/// `Kind namespace/name`, or `Kind name` without a namespace.
pub fn display_name(kind: &str, namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {namespace}/{name}")
    }
}

/// The versions of `group/kind` that Weft accepts (`None` for a kind it does not know or does
/// not decode). Versions are bare (`v1beta1`).
pub fn served_versions(group: &str, kind: &str) -> Option<&'static [&'static str]> {
    KINDS.iter().find(|k| k.group == group && k.kind == kind && !k.versions.is_empty()).map(|k| k.versions)
}

/// Decodes one manifest; namespaced objects without a namespace get `default`.
pub fn decode(value: Value) -> Result<Decoded, DecodeError> {
    decode_with(value, &DecodeOptions::default())
}

/// Decodes one manifest with the given defaults.
pub fn decode_with(value: Value, options: &DecodeOptions) -> Result<Decoded, DecodeError> {
    let Value::Object(mut map) = value else {
        return Err(DecodeError::NotAMapping { found: type_name(&value) });
    };
    let api_version = take_string(&mut map, "apiVersion")?;
    let kind_name = take_string(&mut map, "kind")?;
    let (group, version) = match api_version.rsplit_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version.as_str()),
    };
    let info = lookup(&api_version, group, &kind_name)?;
    if !info.versions.is_empty() && !info.versions.contains(&version) {
        return Err(DecodeError::UnknownVersion {
            api_version: api_version.clone(),
            kind: kind_name.clone(),
            accepted: info.versions.iter().map(|v| join_api_version(info.group, v)).collect(),
        });
    }
    let value = Value::Object(map);
    let mut warnings = Vec::new();
    let mut object = match info.handling {
        Model(model) => decode_model(model, value, &mut warnings)?,
        Wl => {
            // Only the pod template matters; the rest of a workload is not mesh configuration.
            let doc: WorkloadDoc = typed(value, None)?;
            Object::Workload(doc.into_workload(info.kind))
        }
        Unsupported | Ignored => {
            let other = OtherObject { api_version, kind: kind_name, metadata: lenient_metadata(&value) };
            if info.handling == Unsupported {
                Object::Unsupported(other)
            } else {
                Object::Ignored(other)
            }
        }
    };
    let metadata = object.metadata_mut();
    if metadata.name.is_empty() {
        return Err(DecodeError::Field {
            field: "metadata.name".into(),
            message: "missing required field".into(),
            hint: None,
        });
    }
    if info.namespaced {
        if metadata.namespace.is_empty() {
            metadata.namespace =
                options.default_namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        }
    } else {
        metadata.namespace.clear();
    }
    Ok(Decoded { object, warnings })
}

fn decode_model(
    model: ModelKind,
    value: Value,
    warnings: &mut Vec<FieldWarning>,
) -> Result<Object, DecodeError> {
    let w = Some(warnings);
    Ok(match model {
        ModelKind::Namespace => Object::Namespace(typed(value, w)?),
        ModelKind::Pod => Object::Pod(typed(value, w)?),
        ModelKind::Service => Object::Service(typed(value, w)?),
        ModelKind::ServiceEntry => Object::ServiceEntry(typed(value, w)?),
        ModelKind::VirtualService => Object::VirtualService(typed(value, w)?),
        ModelKind::DestinationRule => Object::DestinationRule(typed(value, w)?),
        ModelKind::Gateway => Object::Gateway(typed(value, w)?),
        ModelKind::AuthorizationPolicy => Object::AuthorizationPolicy(typed(value, w)?),
        ModelKind::PeerAuthentication => Object::PeerAuthentication(typed(value, w)?),
        ModelKind::RequestAuthentication => Object::RequestAuthentication(typed(value, w)?),
        ModelKind::Telemetry => Object::Telemetry(typed(value, w)?),
        ModelKind::KubeGateway => Object::KubeGateway(typed(value, w)?),
    })
}

/// Finds the kind, or says what is wrong with `kind`/`apiVersion`.
fn lookup(api_version: &str, group: &str, kind_name: &str) -> Result<&'static KindInfo, DecodeError> {
    if let Some(info) = KINDS.iter().find(|k| k.group == group && k.kind == kind_name) {
        return Ok(info);
    }
    let unknown = |hint: Option<String>| DecodeError::UnknownKind {
        api_version: api_version.to_owned(),
        kind: kind_name.to_owned(),
        hint,
    };
    // The kind exists in another group: the apiVersion is wrong.
    let elsewhere: Vec<&KindInfo> = KINDS.iter().filter(|k| k.kind == kind_name).collect();
    if !elsewhere.is_empty() {
        let served: Vec<String> = elsewhere
            .iter()
            .flat_map(|k| {
                let versions: &[&str] = if k.versions.is_empty() { &["<version>"] } else { k.versions };
                versions.iter().map(move |v| join_api_version(k.group, v))
            })
            .collect();
        return Err(unknown(Some(format!("{kind_name} is served as {}", served.join(", ")))));
    }
    // A misspelled kind: suggest the closest known one.
    let known = KINDS.iter().map(|k| k.kind);
    let hint = closest(kind_name, known).map(|k| format!("did you mean kind: {k}?"));
    Err(unknown(hint.or_else(|| {
        Some("Weft reads Kubernetes Namespaces, Pods, Services and workloads, Istio's networking, security and telemetry kinds, and Gateway API Gateways".into())
    })))
}

fn join_api_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    }
}

fn take_string(map: &mut serde_json::Map<String, Value>, key: &str) -> Result<String, DecodeError> {
    match map.remove(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        None | Some(Value::Null) | Some(Value::String(_)) => Err(DecodeError::Field {
            field: key.to_owned(),
            message: "missing required field".into(),
            hint: Some(if key == "kind" {
                "add kind: (VirtualService, DestinationRule, ...)".into()
            } else {
                "add apiVersion: (for example networking.istio.io/v1)".into()
            }),
        }),
        Some(other) => Err(DecodeError::Field {
            field: key.to_owned(),
            message: format!("expected a string, found {}", type_name(&other)),
            hint: None,
        }),
    }
}

/// Metadata of a kind Weft does not decode: only name, namespace and labels, read leniently.
fn lenient_metadata(value: &Value) -> ObjectMeta {
    let meta = value.get("metadata");
    let text = |key: &str| meta.and_then(|m| m.get(key)).and_then(Value::as_str).unwrap_or("").to_owned();
    let labels = meta
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .map(|l| l.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default();
    ObjectMeta { name: text("name"), namespace: text("namespace"), labels, ..ObjectMeta::default() }
}

/// Deserializes `T`, reporting ignored fields into `warnings` when given (else they are
/// deliberately not reported: the caller decodes only part of a foreign object).
fn typed<T: DeserializeOwned + 'static>(
    value: Value,
    warnings: Option<&mut Vec<FieldWarning>>,
) -> Result<T, DecodeError> {
    let mut ignored: Vec<String> = Vec::new();
    let result = {
        let mut callback = |path: serde_ignored::Path| ignored.push(render_ignored(&path));
        let de = serde_ignored::Deserializer::new(value, &mut callback);
        serde_path_to_error::deserialize::<_, T>(de)
    };
    match result {
        Ok(v) => {
            if let Some(warnings) = warnings {
                warnings.extend(ignored.into_iter().map(|field| {
                    let name = field.rsplit('.').next().unwrap_or(&field);
                    let did_you_mean =
                        fields::siblings::<T>(&field).and_then(|known| closest(name, known.iter().copied()));
                    FieldWarning { field, did_you_mean }
                }));
            }
            Ok(v)
        }
        Err(e) => Err(field_error(e)),
    }
}

/// Turns serde's error into one naming the field, with a hint for misspelled enum values.
fn field_error(e: serde_path_to_error::Error<serde_json::Error>) -> DecodeError {
    let path = e.path().to_string();
    let path = if path == "." { String::new() } else { path };
    let message = e.inner().to_string();
    if let Some(missing) = message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`')) {
        let field = if path.is_empty() { missing.to_owned() } else { format!("{path}.{missing}") };
        return DecodeError::Field { field, message: "missing required field".into(), hint: None };
    }
    let hint = enum_hint(&message);
    let field = if path.is_empty() { "(document)".to_owned() } else { path };
    DecodeError::Field { field, message, hint }
}

/// For "unknown variant `STRICTT`, expected one of `A`, `B`": "did you mean `STRICT`?".
fn enum_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown variant `")?;
    let (bad, expected) = rest.split_once('`')?;
    let options = expected.split('`').skip(1).step_by(2);
    let best = closest(bad, options)?;
    Some(format!("did you mean `{best}`?"))
}

/// The candidate closest to `word` by edit distance (ignoring case), if it is close enough to
/// be a likely typo (names shorter than 4 characters get no suggestion).
pub(crate) fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let word_lower = word.to_ascii_lowercase();
    let length = word.chars().count();
    // In names this short (`v3`) a near miss is more likely a different name than a typo.
    if length < 4 {
        return None;
    }
    let limit = (length / 3).max(1);
    candidates
        .map(|c| (edit_distance(&word_lower, &c.to_ascii_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance (inputs are short names; capped at 64 characters each).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().take(64).collect();
    let b: Vec<char> = b.chars().take(64).collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// `spec.http[0].route[0].destinaton` from serde_ignored's path.
fn render_ignored(path: &serde_ignored::Path) -> String {
    match path {
        serde_ignored::Path::Root => String::new(),
        serde_ignored::Path::Seq { parent, index } => format!("{}[{index}]", render_ignored(parent)),
        serde_ignored::Path::Map { parent, key } => {
            let parent = render_ignored(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => render_ignored(parent),
    }
}

pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests;
