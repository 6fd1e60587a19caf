//! What Weft writes for a waypoint Gateway, as pure functions of the Gateway: the ServiceAccount,
//! Deployment and Service (server-side apply bodies holding only the fields Weft owns; the
//! replica count is left to whoever scales it) and the Gateway's status. No API calls here.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::ResourceExt;
use serde_json::{json, Value};

use super::WaypointOptions;

/// The class of Gateways that are waypoints (Istio's).
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// The label naming the Gateway on everything made for it, and on the waypoint's pods (the model
/// and the CA know waypoint pods by it).
pub const GATEWAY_NAME_LABEL: &str = crate::model::GATEWAY_NAME_LABEL;
/// Istio's own label for the same.
pub const ISTIO_GATEWAY_NAME_LABEL: &str = "istio.io/gateway-name";
/// Marks the objects Weft made (and may delete when their Gateway is gone).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "weft-controller";
/// Waypoint pods are never captured by ztunnel (as in Istio).
const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// HBONE, Prometheus metrics, readiness: Istio's ports.
pub const HBONE_PORT: u16 = 15008;
pub const METRICS_PORT: u16 = 15020;
pub const READINESS_PORT: u16 = 15021;
/// Where the projected token (audience istio-ca) is mounted in the waypoint container.
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const TOKEN_FILE: &str = "istio-token";
/// Where the mesh root is mounted (the waypoint's default XDS_ROOT_CA is its root-cert.pem), from
/// the ConfigMap the controller publishes in every namespace, as istiod does.
const ROOT_CERT_DIR: &str = "/var/run/secrets/istio";
pub const ROOT_CERT_CONFIGMAP: &str = "istio-ca-root-cert";
/// The Gateway status conditions Weft writes.
const CONDITION_TYPES: [&str; 2] = ["Accepted", "Programmed"];

/// A Gateway API Gateway, as much of it as waypoints need (converted where it enters).
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: i64,
    pub class: String,
    /// It has a deletion timestamp.
    pub deleting: bool,
    /// Its `status` as the API server holds it (`Null` when none).
    pub status: Value,
}

impl GatewayInfo {
    /// The Gateway an API object describes; `None` without a name, namespace or uid (never so
    /// for objects from the API server).
    pub fn from_object(object: &DynamicObject) -> Option<GatewayInfo> {
        let namespace = object.namespace()?;
        let name = object.metadata.name.clone()?;
        let uid = object.metadata.uid.clone()?;
        let class = object.data.pointer("/spec/gatewayClassName").and_then(Value::as_str).unwrap_or_default();
        Some(GatewayInfo {
            namespace,
            name,
            uid,
            generation: object.metadata.generation.unwrap_or_default(),
            class: class.to_owned(),
            deleting: object.metadata.deletion_timestamp.is_some(),
            status: object.data.get("status").cloned().unwrap_or(Value::Null),
        })
    }

    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    pub fn is_waypoint(&self) -> bool {
        self.class == WAYPOINT_CLASS
    }

    /// The waypoint Service's DNS name.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// Where Gateways are served (v1).
pub fn gateway_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GATEWAY_GROUP, "v1", "Gateway"), "gateways")
}

fn labels(gateway: &GatewayInfo) -> Value {
    json!({
        GATEWAY_NAME_LABEL: gateway.name,
        ISTIO_GATEWAY_NAME_LABEL: gateway.name,
        MANAGED_BY_LABEL: MANAGED_BY_VALUE,
    })
}

/// Metadata of everything made for `gateway`: its name, our labels, the Gateway as controller.
/// (No `blockOwnerDeletion`: setting it needs update on gateways/finalizers where the
/// OwnerReferencesPermissionEnforcement admission plugin runs, and Weft deletes them itself.)
fn metadata(gateway: &GatewayInfo) -> Value {
    json!({
        "name": gateway.name,
        "namespace": gateway.namespace,
        "labels": labels(gateway),
        "ownerReferences": [{
            "apiVersion": GATEWAY_API_VERSION,
            "kind": "Gateway",
            "name": gateway.name,
            "uid": gateway.uid,
            "controller": true,
        }],
    })
}

/// The waypoint's own ServiceAccount (its identity: `spiffe://<td>/ns/<ns>/sa/<name>`).
pub fn service_account(gateway: &GatewayInfo) -> Value {
    json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(gateway) })
}

/// The waypoint Deployment, running Weft's `waypoint` binary (image [`WaypointOptions::image`])
/// much as Istio's waypoint template runs its proxy: the flags mirror ztunnel's (`--xds-address`
/// and `--ca-address`, both the controller's URL, `ALT_XDS_HOSTNAME` when its host is not the
/// certificate's name, `--token-file` the projected istio-ca token, the mesh root from the
/// `istio-ca-root-cert` ConfigMap);
/// the pod's identity in the environment (`WAYPOINT_NAME`, `POD_NAME`, `POD_NAMESPACE`,
/// `INSTANCE_IP`, `SERVICE_ACCOUNT`, `NODE_NAME`); Istio's ports, probes (a fast startup probe,
/// then readiness every 15 s), resources and Prometheus annotations (the path is Weft's
/// `/metrics`, where Istio's Envoy serves `/stats/prometheus`). `replicas` is not set: one on
/// creation, then whoever scales it owns it.
pub fn deployment(gateway: &GatewayInfo, options: &WaypointOptions) -> Value {
    let field =
        |name: &str, path: &str| json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": path } } });
    let value = |name: &str, value: &str| json!({ "name": name, "value": value });
    let token_path = format!("{TOKEN_DIR}/{TOKEN_FILE}");
    let mut env = vec![
        value("WAYPOINT_NAME", &gateway.name),
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("INSTANCE_IP", "status.podIP"),
        field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field("NODE_NAME", "spec.nodeName"),
    ];
    if let Some(name) = &options.controller_server_name {
        env.push(value("ALT_XDS_HOSTNAME", name));
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(gateway),
        "spec": {
            "selector": { "matchLabels": { GATEWAY_NAME_LABEL: gateway.name } },
            "template": {
                "metadata": {
                    "labels": {
                        GATEWAY_NAME_LABEL: gateway.name,
                        ISTIO_GATEWAY_NAME_LABEL: gateway.name,
                        DATAPLANE_MODE_LABEL: "none",
                    },
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": METRICS_PORT.to_string(),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": gateway.name,
                    // The waypoint talks to the controller only, with its projected istio-ca token.
                    "automountServiceAccountToken": false,
                    "containers": [{
                        "name": "waypoint",
                        "image": options.image,
                        "args": [
                            "--xds-address", options.controller_address,
                            "--ca-address", options.controller_address,
                            "--token-file", token_path,
                        ],
                        "env": env,
                        "ports": [
                            { "name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP" },
                            { "name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP" },
                            { "name": "status-port", "containerPort": READINESS_PORT, "protocol": "TCP" },
                        ],
                        // Istio's: up to 30 s to start, checked every second; then every 15 s.
                        "startupProbe": {
                            "httpGet": { "path": "/healthz/ready", "port": READINESS_PORT, "scheme": "HTTP" },
                            "initialDelaySeconds": 1,
                            "periodSeconds": 1,
                            "timeoutSeconds": 1,
                            "failureThreshold": 30,
                        },
                        "readinessProbe": {
                            "httpGet": { "path": "/healthz/ready", "port": READINESS_PORT, "scheme": "HTTP" },
                            "periodSeconds": 15,
                            "timeoutSeconds": 1,
                            "failureThreshold": 4,
                        },
                        "resources": {
                            "requests": { "cpu": "100m", "memory": "128Mi" },
                            "limits": { "cpu": "2", "memory": "1Gi" },
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "runAsUser": 1337,
                            "runAsGroup": 1337,
                            "capabilities": { "drop": ["ALL"] },
                        },
                        "volumeMounts": [
                            { "name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": true },
                            { "name": "istiod-ca-cert", "mountPath": ROOT_CERT_DIR, "readOnly": true },
                        ],
                    }],
                    "volumes": [{
                        "name": "istiod-ca-cert",
                        "configMap": { "name": ROOT_CERT_CONFIGMAP },
                    }, {
                        "name": "istio-token",
                        "projected": {
                            "sources": [{
                                "serviceAccountToken": {
                                    "audience": crate::ca::TOKEN_AUDIENCE,
                                    "expirationSeconds": 43200,
                                    "path": TOKEN_FILE,
                                },
                            }],
                        },
                    }],
                },
            },
        },
    })
}

/// The waypoint Service: HBONE on 15008, port named `mesh` (as Istio names it).
pub fn service(gateway: &GatewayInfo) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(gateway),
        "spec": {
            "type": "ClusterIP",
            "selector": { GATEWAY_NAME_LABEL: gateway.name },
            "ports": [{ "name": "mesh", "port": HBONE_PORT, "targetPort": HBONE_PORT, "protocol": "TCP" }],
        },
    })
}

/// The Gateway status Weft wants: Accepted; Programmed once the Service has a cluster IP and the
/// Deployment at least one ready pod (`ready`, its `readyReplicas`), else not, with the reason the
/// Gateway API gives (`AddressNotAssigned`, then `NoResources`: no ready pod yet); the cluster IP
/// (else the Service's DNS name) as address. So `kubectl wait --for=condition=Programmed` (as
/// Istio's docs use it for waypoints) returns once the waypoint can answer, not before. A
/// condition whose status is unchanged keeps its `lastTransitionTime`; `now` (RFC 3339) stamps
/// the others.
pub fn status(gateway: &GatewayInfo, address: Option<&str>, ready: i32, now: &str) -> Value {
    let addresses = match address {
        Some(ip) => json!([{ "type": "IPAddress", "value": ip }]),
        None => json!([{ "type": "Hostname", "value": gateway.hostname() }]),
    };
    let accepted = ("Accepted", true, "Accepted", "weft-controller deploys this waypoint".to_owned());
    let name = &gateway.name;
    let programmed = match address {
        Some(ip) if ready > 0 => (
            "Programmed",
            true,
            "Programmed",
            format!("waypoint Service {name} has address {ip}; Deployment {name} has {ready} ready pod(s)"),
        ),
        Some(ip) => (
            "Programmed",
            false,
            "NoResources",
            format!("waypoint Service {name} has address {ip}, but Deployment {name} has no ready pod yet"),
        ),
        None => (
            "Programmed",
            false,
            "AddressNotAssigned",
            format!("waypoint Service {name} has no cluster IP yet"),
        ),
    };
    let conditions: Vec<Value> = [accepted, programmed]
        .into_iter()
        .map(|(kind, ok, reason, message)| {
            let status = if ok { "True" } else { "False" };
            let since = current_condition(&gateway.status, kind)
                .filter(|c| c.get("status").and_then(Value::as_str) == Some(status))
                .and_then(|c| c.get("lastTransitionTime").and_then(Value::as_str))
                .unwrap_or(now);
            json!({
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": gateway.generation,
                "lastTransitionTime": since,
            })
        })
        .collect();
    json!({ "addresses": addresses, "conditions": conditions })
}

fn current_condition<'a>(status: &'a Value, kind: &str) -> Option<&'a Value> {
    status.get("conditions")?.as_array()?.iter().find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

/// Whether the Gateway's `current` status differs from `desired` in what Weft writes (its
/// conditions, ignoring transition times, and the addresses).
pub fn status_differs(current: &Value, desired: &Value) -> bool {
    if current.get("addresses") != desired.get("addresses") {
        return true;
    }
    let strip = |c: &Value| {
        let mut c = c.clone();
        if let Value::Object(map) = &mut c {
            map.remove("lastTransitionTime");
        }
        c
    };
    CONDITION_TYPES.iter().any(|kind| {
        current_condition(current, kind).map(strip) != current_condition(desired, kind).map(strip)
    })
}

/// The server-side apply body that writes `status` to the Gateway's status subresource.
pub fn status_patch(gateway: &GatewayInfo, status: Value) -> Value {
    json!({
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "metadata": { "name": gateway.name, "namespace": gateway.namespace },
        "status": status,
    })
}
