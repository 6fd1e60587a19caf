//! The Kubernetes kinds the mesh reads: Namespace, Pod, Service, the pod templates of workload
//! controllers (Deployment and friends), and the Gateway API `Gateway` (waypoints). Only the
//! fields Weft uses are typed; the rest of a Pod's or Service's spec is kept opaque (Kubernetes
//! validates it, and it is no mesh configuration), so it never warns.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::meta::{Labels, ObjectMeta};
use super::types::IntOrString;

/// The Gateway API class that makes a `Gateway` an Istio waypoint.
pub const WAYPOINT_GATEWAY_CLASS: &str = weft_core::names::WAYPOINT_GATEWAY_CLASS;

/// Opaque fields kept as they came.
pub type Unmodeled = BTreeMap<String, serde_json::Value>;

/// `v1/Namespace`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<serde_json::Value>,
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

/// `v1/Pod`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Deprecated alias of `serviceAccountName`, still honoured by Kubernetes.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub host_network: bool,
    /// The pod's containers, as far as the mesh reads them: their ports, which a Service's named
    /// `targetPort` resolves against ([`Pod::container_port`]).
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(flatten)]
    pub unmodeled: Unmodeled,
}

/// One of `spec.containers`: its name and ports; the rest (image, command, ...) kept opaque.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    #[serde(flatten)]
    pub unmodeled: Unmodeled,
}

/// One of a container's `ports`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// What a Service's `targetPort` may name it by.
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(flatten)]
    pub unmodeled: Unmodeled,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default, rename = "hostIP")]
    pub host_ip: Option<String>,
    #[serde(flatten)]
    pub unmodeled: Unmodeled,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

impl Pod {
    /// The service account the pod runs as (`default` when unset).
    pub fn service_account(&self) -> &str {
        self.spec
            .service_account_name
            .as_deref()
            .or(self.spec.service_account.as_deref())
            .unwrap_or("default")
    }

    /// Every IP of the pod, `podIP` first, without duplicates.
    pub fn ips(&self) -> Vec<&str> {
        let mut ips: Vec<&str> = self.status.pod_ip.iter().map(String::as_str).collect();
        for ip in &self.status.pod_ips {
            if !ips.contains(&ip.ip.as_str()) {
                ips.push(&ip.ip);
            }
        }
        ips
    }

    /// The number of the TCP container port named `name`, the first such port of the first
    /// container that has one, as Istio resolves a Service's named `targetPort` for a pod (its
    /// `FindPortName`); `None` when no container names a TCP port so.
    pub fn container_port(&self, name: &str) -> Option<u16> {
        self.spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .find(|p| p.name.as_deref() == Some(name) && p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .map(|p| p.container_port)
    }
}

/// `v1/Service`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP` (default), `NodePort`, `LoadBalancer` or `ExternalName`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Pods with all these labels back the Service; `None` means endpoints are managed by hand.
    #[serde(default)]
    pub selector: Option<Labels>,
    #[serde(default)]
    pub external_name: Option<String>,
    #[serde(flatten)]
    pub unmodeled: Unmodeled,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
    #[serde(default)]
    pub node_port: Option<u16>,
}

impl Service {
    /// Every cluster IP (`clusterIP` first), without `None` (headless) and duplicates.
    pub fn cluster_ips(&self) -> Vec<&str> {
        let mut ips: Vec<&str> = Vec::new();
        for ip in self.spec.cluster_ip.iter().chain(&self.spec.cluster_ips) {
            if ip != "None" && !ip.is_empty() && !ips.contains(&ip.as_str()) {
                ips.push(ip);
            }
        }
        ips
    }
}

/// The pod template of a workload controller (`apps/v1` Deployment, StatefulSet, DaemonSet,
/// ReplicaSet; `batch/v1` Job, CronJob): the pods it will create, as far as the mesh cares.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Workload {
    /// `Deployment`, `StatefulSet`, ...
    pub kind: String,
    pub metadata: ObjectMeta,
    /// Labels of the pods it creates.
    pub pod_labels: Labels,
    pub service_account: Option<String>,
}

/// The part of a workload controller that the decoder reads; everything else is ignored.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct WorkloadDoc {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkloadDocSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WorkloadDocSpec {
    #[serde(default)]
    pub template: Option<PodTemplate>,
    /// CronJob: `spec.jobTemplate.spec.template`.
    #[serde(default)]
    pub job_template: Option<Box<JobTemplate>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct JobTemplate {
    #[serde(default)]
    pub spec: WorkloadDocSpec,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct PodTemplate {
    #[serde(default)]
    pub metadata: PodTemplateMeta,
    #[serde(default)]
    pub spec: PodTemplateSpec,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct PodTemplateMeta {
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PodTemplateSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
}

impl WorkloadDoc {
    pub(crate) fn into_workload(self, kind: &str) -> Workload {
        let template = match (self.spec.template, self.spec.job_template) {
            (Some(t), _) => Some(t),
            (None, Some(job)) => job.spec.template,
            (None, None) => None,
        };
        let (pod_labels, service_account) = match template {
            Some(t) => (t.metadata.labels, t.spec.service_account_name),
            None => (Labels::new(), None),
        };
        Workload { kind: kind.to_owned(), metadata: self.metadata, pod_labels, service_account }
    }
}

/// `gateway.networking.k8s.io` `Gateway`. With class `istio-waypoint` it declares a waypoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeGateway {
    pub metadata: ObjectMeta,
    pub spec: KubeGatewaySpec,
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeGatewaySpec {
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
    #[serde(default)]
    pub infrastructure: Option<GatewayInfrastructure>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    #[serde(default)]
    pub hostname: Option<String>,
    pub port: u16,
    /// `HTTP`, `HTTPS`, `TLS`, `TCP`, `UDP`, or Istio's `HBONE`.
    pub protocol: String,
    #[serde(default)]
    pub tls: Option<serde_json::Value>,
    #[serde(default)]
    pub allowed_routes: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayAddress {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayInfrastructure {
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    #[serde(default)]
    pub parameters_ref: Option<serde_json::Value>,
}

impl KubeGateway {
    pub fn is_waypoint(&self) -> bool {
        self.spec.gateway_class_name == WAYPOINT_GATEWAY_CLASS
    }
}
