//! The controller's view of the mesh: every object its sources reported, by kind, namespace and
//! name, and what follows from them for ambient mode (who is in the mesh, which waypoint serves
//! whom, which identities live on which node). Pure: no I/O, no knowledge of the source.

use std::collections::{BTreeMap, BTreeSet};

use weft_config::kube::{Namespace, Pod};
use weft_config::Object;
use weft_core::Identity;

/// `istio.io/dataplane-mode`: `ambient` on a namespace (or pod) enrolls, `none` on a pod opts out.
pub const DATAPLANE_MODE: &str = weft_core::names::DATAPLANE_MODE_LABEL;
pub const AMBIENT: &str = weft_core::names::DATAPLANE_MODE_AMBIENT;
pub const NONE: &str = "none";
/// `istio.io/use-waypoint`: the waypoint's name (or `none`), on a namespace, service or pod.
pub const USE_WAYPOINT: &str = weft_core::names::USE_WAYPOINT_LABEL;
/// `istio.io/use-waypoint-namespace`: where that waypoint lives, when not in the same namespace.
pub const USE_WAYPOINT_NAMESPACE: &str = weft_core::names::USE_WAYPOINT_NAMESPACE_LABEL;

/// `istio.io/waypoint-for` on a waypoint's Gateway: which traffic it takes.
pub const WAYPOINT_FOR: &str = weft_core::names::WAYPOINT_FOR_LABEL;
/// `gateway.networking.k8s.io/gateway-name`: on a Gateway's pods (a waypoint's), its name.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// An object's identity in the model.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn of(object: &Object) -> ObjectKey {
        let meta = object.metadata();
        ObjectKey {
            kind: object.kind().to_owned(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
        }
    }
}

/// A change a source reports.
#[derive(Clone, Debug)]
pub enum Change {
    Upsert(Box<Object>),
    Delete(ObjectKey),
}

/// A waypoint a workload or service is bound to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WaypointRef {
    pub namespace: String,
    pub name: String,
}

/// Which traffic a waypoint takes (its Gateway's `istio.io/waypoint-for`), as Istio reads it:
/// `service` (the default), `workload`, `all` or `none`; any other value is the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    /// The value of the label, if any.
    pub fn parse(value: Option<&str>) -> WaypointFor {
        match value {
            Some("workload") => WaypointFor::Workload,
            Some("all") => WaypointFor::All,
            Some("none") => WaypointFor::None,
            _ => WaypointFor::Service,
        }
    }

    /// Whether traffic to a Service bound to this waypoint goes through it.
    pub fn takes_services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    /// Whether traffic addressed to a bound pod itself goes through it.
    pub fn takes_workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// Everything the sources reported.
#[derive(Clone, Debug, Default)]
pub struct Model {
    objects: BTreeMap<ObjectKey, Object>,
}

impl Model {
    /// Applies one change; returns whether the model changed.
    pub fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Upsert(object) => {
                // Kinds Weft does not implement are kept (translation skips them) so that they
                // are reported as not enforced; kinds with no mesh configuration are not.
                if matches!(*object, Object::Ignored(_)) {
                    return false;
                }
                let key = ObjectKey::of(&object);
                if self.objects.get(&key) == Some(&*object) {
                    return false;
                }
                self.objects.insert(key, *object);
                true
            }
            Change::Delete(key) => self.objects.remove(&key).is_some(),
        }
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Object> {
        self.objects.get(key)
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values()
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        let key = ObjectKey { kind: "Namespace".into(), namespace: String::new(), name: name.to_owned() };
        match self.objects.get(&key) {
            Some(Object::Namespace(ns)) => Some(ns),
            _ => None,
        }
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.objects.values().filter_map(|o| match o {
            Object::Pod(pod) => Some(pod),
            _ => None,
        })
    }

    /// What the waypoint `wp` takes, or `None` when no Gateway of class `istio-waypoint` of that
    /// name exists. Istio's ambient index binds nothing to a waypoint it cannot find (the object
    /// is reported as waiting for it, `WaypointIsNotReady`): traffic goes direct, not into a
    /// waypoint that is not there, and does not fall back to the namespace's waypoint.
    pub fn waypoint_for(&self, wp: &WaypointRef) -> Option<WaypointFor> {
        let key = ObjectKey {
            kind: weft_config::decode::KUBE_GATEWAY.to_owned(),
            namespace: wp.namespace.clone(),
            name: wp.name.clone(),
        };
        match self.objects.get(&key) {
            Some(Object::KubeGateway(gateway)) if gateway.is_waypoint() => {
                Some(WaypointFor::parse(gateway.metadata.labels.get(WAYPOINT_FOR).map(String::as_str)))
            }
            _ => None,
        }
    }

    /// Whether `pod` is in the ambient mesh: its namespace (or the pod itself) is labelled
    /// `istio.io/dataplane-mode=ambient` and the pod does not opt out with `none`. Pods on the
    /// host network and finished pods are never captured.
    pub fn in_mesh(&self, pod: &Pod) -> bool {
        if pod.spec.host_network || matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return false;
        }
        match pod.metadata.labels.get(DATAPLANE_MODE).map(String::as_str) {
            Some(NONE) => false,
            Some(AMBIENT) => true,
            _ => self
                .namespace(&pod.metadata.namespace)
                .and_then(|ns| ns.metadata.labels.get(DATAPLANE_MODE))
                .is_some_and(|mode| mode == AMBIENT),
        }
    }

    /// The waypoint serving `pod`: the pod's own `istio.io/use-waypoint` label, else its
    /// namespace's; `none` on the pod opts out of a namespace's waypoint.
    pub fn pod_waypoint(&self, pod: &Pod) -> Option<WaypointRef> {
        let ns = self.namespace(&pod.metadata.namespace).map(|ns| &ns.metadata.labels);
        waypoint_from(&pod.metadata.labels, &pod.metadata.namespace)
            .unwrap_or_else(|| ns.and_then(|labels| waypoint_from(labels, &pod.metadata.namespace)).flatten())
    }

    /// The SPIFFE identities of the pods of the mesh placed on `node`: what that node's ztunnel
    /// may obtain certificates for. Pods outside the mesh are left out (the ztunnel neither
    /// captures nor speaks for them), and so are waypoint pods (labelled with their Gateway's
    /// name; Istio's also opt out with `istio.io/dataplane-mode=none`): a waypoint's identity is
    /// obtained by the waypoint itself, never by the ztunnel of its node.
    pub fn identities_on_node(&self, trust_domain: &str, node: &str) -> BTreeSet<Identity> {
        self.pods()
            .filter(|pod| pod.spec.node_name.as_deref() == Some(node))
            .filter(|pod| self.in_mesh(pod) && !pod.metadata.labels.contains_key(GATEWAY_NAME_LABEL))
            .filter_map(|pod| {
                Identity::new(trust_domain, &pod.metadata.namespace, pod.service_account()).ok()
            })
            .collect()
    }
}

/// Reads `istio.io/use-waypoint` from one set of labels: `None` when absent, `Some(None)` for
/// an explicit `none`, `Some(Some(..))` for a waypoint.
fn waypoint_from(labels: &BTreeMap<String, String>, namespace: &str) -> Option<Option<WaypointRef>> {
    let name = labels.get(USE_WAYPOINT)?;
    if name == NONE || name.is_empty() {
        return Some(None);
    }
    let namespace = labels.get(USE_WAYPOINT_NAMESPACE).cloned().unwrap_or_else(|| namespace.to_owned());
    Some(Some(WaypointRef { namespace, name: name.clone() }))
}

/// A model of the objects in `yaml` (each must load), for the controller's unit tests.
#[cfg(test)]
pub(crate) fn from_yaml(yaml: &str) -> Model {
    let mut model = Model::default();
    for doc in weft_config::load_yaml(yaml, "test.yaml") {
        model.apply(Change::Upsert(Box::new(doc.result.expect("test YAML loads").object)));
    }
    model
}

#[cfg(test)]
mod tests {
    use super::{from_yaml as model, *};

    fn pod<'a>(model: &'a Model, ns: &str, name: &str) -> &'a Pod {
        model.pods().find(|p| p.metadata.namespace == ns && p.metadata.name == name).unwrap()
    }

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: shop-wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.0.1.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: shop, labels: {istio.io/dataplane-mode: none, istio.io/use-waypoint: none}}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.6, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {istio.io/use-waypoint: db-wp, istio.io/use-waypoint-namespace: infra}}
spec: {nodeName: node-b, serviceAccountName: db}
status: {podIP: 10.0.2.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
spec: {nodeName: node-a, serviceAccountName: old}
status: {podIP: 10.0.1.7, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: single, namespace: legacy, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: node-b}
status: {podIP: 10.0.2.8, phase: Succeeded}
"#;

    #[test]
    fn membership_follows_namespace_and_pod_labels() {
        let m = model(MESH);
        let table = [
            ("shop", "web", true),
            ("shop", "batch", false), // opts out
            ("shop", "db", true),
            ("legacy", "old", false),    // namespace not labelled
            ("legacy", "single", false), // labelled itself, but finished
        ];
        for (ns, name, want) in table {
            assert_eq!(m.in_mesh(pod(&m, ns, name)), want, "{ns}/{name}");
        }
    }

    #[test]
    fn relabelling_a_namespace_changes_membership_without_restarts() {
        let mut m = model(MESH);
        assert!(!m.in_mesh(pod(&m, "legacy", "old")));
        let labelled = model(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy, labels: {istio.io/dataplane-mode: ambient}}\n",
        );
        let ns = labelled.objects().next().unwrap().clone();
        assert!(m.apply(Change::Upsert(Box::new(ns.clone()))));
        assert!(!m.apply(Change::Upsert(Box::new(ns))), "the same object again is no change");
        assert!(m.in_mesh(pod(&m, "legacy", "old")));
        let key = ObjectKey { kind: "Namespace".into(), namespace: String::new(), name: "legacy".into() };
        assert!(m.apply(Change::Delete(key)));
        assert!(!m.in_mesh(pod(&m, "legacy", "old")));
    }

    #[test]
    fn waypoints_bind_by_pod_then_namespace() {
        let m = model(MESH);
        let wp = |ns: &str, name: &str| Some(WaypointRef { namespace: ns.into(), name: name.into() });
        assert_eq!(m.pod_waypoint(pod(&m, "shop", "web")), wp("shop", "shop-wp"));
        assert_eq!(m.pod_waypoint(pod(&m, "shop", "batch")), None);
        assert_eq!(m.pod_waypoint(pod(&m, "shop", "db")), wp("infra", "db-wp"));
        assert_eq!(m.pod_waypoint(pod(&m, "legacy", "old")), None);
    }

    #[test]
    fn identities_on_a_node_are_its_running_mesh_pods_service_accounts() {
        // A waypoint pod on node-a, as Istio labels them, and one labelled only with its Gateway.
        let waypoints = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: wp-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: shop-wp, istio.io/dataplane-mode: none}}
spec: {nodeName: node-a, serviceAccountName: shop-wp}
status: {podIP: 10.0.1.9, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-2, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: other-wp}}
spec: {nodeName: node-a, serviceAccountName: other-wp}
status: {podIP: 10.0.1.10, phase: Running}
"#;
        let m = model(&format!("{MESH}{waypoints}"));
        let ids = |node| {
            m.identities_on_node("cluster.local", node).iter().map(|i| i.to_string()).collect::<Vec<_>>()
        };
        // Not legacy/old (namespace not in the mesh), shop/default (batch opts out), the waypoints.
        assert_eq!(ids("node-a"), ["spiffe://cluster.local/ns/shop/sa/web"]);
        assert_eq!(ids("node-b"), ["spiffe://cluster.local/ns/shop/sa/db"]);
        assert!(ids("node-c").is_empty());
    }
}
