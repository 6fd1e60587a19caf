//! The Kubernetes API as a model: one kube-rs watcher per kind (Namespaces, Pods, Services and the
//! Istio and Gateway API kinds), each object decoded like a manifest and turned into model
//! changes. A (re)list replaces everything the model held of that kind, so after a reconnect or an
//! apiserver restart nothing is lost and nothing stale stays. A kind whose CRD is not installed
//! is retried with the watcher's backoff and never holds up the others. Knows nothing of how the
//! model is used.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use weft_config::decode::KUBE_GATEWAY;
use weft_config::{decode_with, DecodeOptions, Object};

use crate::model::{Change, Model, ObjectKey};

/// How many reports from the watchers may wait for the model task before a watcher waits.
const QUEUE: usize = 1024;

/// One watched custom kind: where it is served and what the model calls it.
#[derive(Clone, Debug)]
struct WatchedKind {
    /// `ObjectKey::kind` of its objects (what [`Object::kind`] returns).
    model_kind: &'static str,
    group: &'static str,
    version: &'static str,
    /// The kind as the apiserver names it.
    kind: &'static str,
    plural: &'static str,
}

/// The custom kinds, at the version Istio (and the Gateway API) store.
const CUSTOM_KINDS: &[WatchedKind] = &[
    custom("VirtualService", "networking.istio.io", "v1", "VirtualService", "virtualservices"),
    custom("DestinationRule", "networking.istio.io", "v1", "DestinationRule", "destinationrules"),
    custom("Gateway", "networking.istio.io", "v1", "Gateway", "gateways"),
    custom("ServiceEntry", "networking.istio.io", "v1", "ServiceEntry", "serviceentries"),
    custom("AuthorizationPolicy", "security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies"),
    custom("PeerAuthentication", "security.istio.io", "v1", "PeerAuthentication", "peerauthentications"),
    custom(
        "RequestAuthentication",
        "security.istio.io",
        "v1",
        "RequestAuthentication",
        "requestauthentications",
    ),
    custom("Telemetry", "telemetry.istio.io", "v1", "Telemetry", "telemetries"),
    custom(KUBE_GATEWAY, "gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
];

const fn custom(
    model_kind: &'static str,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
) -> WatchedKind {
    WatchedKind { model_kind, group, version, kind, plural }
}

impl WatchedKind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }
}

/// What one kind's watcher reports to the model task.
#[derive(Debug)]
enum Report {
    /// Changes seen on the watch.
    Changes(Vec<Change>),
    /// A (re)list finished: `objects` is everything of `kind` there is; `kept` names objects that
    /// failed to decode and keep whatever the model held of them.
    Relisted { kind: &'static str, objects: Vec<Object>, kept: BTreeSet<ObjectKey> },
}

/// The model plus what the watchers reported, applied in order.
#[derive(Default)]
struct KubeModel {
    model: Model,
}

impl KubeModel {
    /// Applies one report; returns whether the model changed.
    fn apply(&mut self, report: Report) -> bool {
        match report {
            Report::Changes(changes) => {
                changes.into_iter().fold(false, |changed, change| self.model.apply(change) | changed)
            }
            Report::Relisted { kind, objects, kept } => {
                let mut listed: BTreeSet<ObjectKey> = kept;
                let mut changed = false;
                for object in objects {
                    listed.insert(ObjectKey::of(&object));
                    changed |= self.model.apply(Change::Upsert(Box::new(object)));
                }
                let stale: Vec<ObjectKey> = self
                    .model
                    .objects()
                    .map(ObjectKey::of)
                    .filter(|key| key.kind == kind && !listed.contains(key))
                    .collect();
                for key in stale {
                    changed |= self.model.apply(Change::Delete(key));
                }
                changed
            }
        }
    }
}

/// Watches the Kubernetes API through `client` and publishes the model after each burst of
/// changes. Spawns its tasks on the current tokio runtime; they end when every receiver is
/// dropped.
pub fn watch_model(client: Client) -> watch::Receiver<Arc<Model>> {
    let (reports_tx, mut reports) = mpsc::channel::<Report>(QUEUE);
    spawn_typed::<Namespace>(&client, "Namespace", reports_tx.clone());
    spawn_typed::<Pod>(&client, "Pod", reports_tx.clone());
    spawn_typed::<Service>(&client, "Service", reports_tx.clone());
    for kind in CUSTOM_KINDS {
        let resource = kind.api_resource();
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let target = Target {
            model_kind: kind.model_kind,
            api_version: kind.api_version(),
            kind: kind.kind.to_owned(),
        };
        tokio::spawn(run_watcher(api, target, reports_tx.clone()));
    }
    drop(reports_tx);

    let (tx, rx) = watch::channel(Arc::new(Model::default()));
    tokio::spawn(async move {
        let mut state = KubeModel::default();
        loop {
            let report = tokio::select! {
                report = reports.recv() => report,
                () = tx.closed() => return,
            };
            let Some(report) = report else { return };
            // Coalesce: everything already queued goes into the same publication.
            let mut changed = state.apply(report);
            while let Ok(report) = reports.try_recv() {
                changed |= state.apply(report);
            }
            if changed {
                debug!(objects = state.model.len(), "kubernetes model changed");
                tx.send_replace(Arc::new(state.model.clone()));
            }
        }
    });
    rx
}

fn spawn_typed<K>(client: &Client, model_kind: &'static str, reports: mpsc::Sender<Report>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static,
{
    let target =
        Target { model_kind, api_version: K::api_version(&()).into_owned(), kind: K::kind(&()).into_owned() };
    tokio::spawn(run_watcher(Api::<K>::all(client.clone()), target, reports));
}

/// What a watcher's objects are: how to name them to the decoder and in the model.
#[derive(Clone, Debug)]
struct Target {
    /// `ObjectKey::kind` of its objects (what [`Object::kind`] returns).
    model_kind: &'static str,
    api_version: String,
    kind: String,
}

/// Watches one kind until the model task is gone: decodes what the watcher sees and reports it.
/// Errors (an apiserver away, a CRD not installed) are retried with the watcher's default backoff
/// and logged once per outage.
async fn run_watcher<K>(api: Api<K>, target: Target, reports: mpsc::Sender<Report>)
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug + Send + 'static,
{
    let mut events = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut failing = false;
    // Objects of the (re)list in progress; reported together when it is done.
    let mut relist: Option<(Vec<Object>, BTreeSet<ObjectKey>)> = None;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = reports.closed() => return,
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                if failing {
                    debug!(kind = %target.kind, api_version = %target.api_version, error = %e, "watch still failing");
                } else {
                    warn!(
                        kind = %target.kind,
                        api_version = %target.api_version,
                        error = %e,
                        "cannot watch; retrying with backoff (is the CRD installed and the apiserver reachable?)"
                    );
                    failing = true;
                }
                continue;
            }
            // The backoff stream retries for ever; an end means the watcher is done for good.
            None => return,
        };
        if failing {
            info!(kind = %target.kind, api_version = %target.api_version, "watching again");
            failing = false;
        }
        let report = match event {
            Event::Init => {
                relist = Some((Vec::new(), BTreeSet::new()));
                None
            }
            Event::InitApply(object) => {
                let (objects, kept) = relist.get_or_insert_with(Default::default);
                match decode_object(&object, &target) {
                    Ok(decoded) => objects.push(decoded),
                    Err(key) => {
                        kept.insert(key);
                    }
                }
                None
            }
            Event::InitDone => {
                let (objects, kept) = relist.take().unwrap_or_default();
                Some(Report::Relisted { kind: target.model_kind, objects, kept })
            }
            Event::Apply(object) => decode_object(&object, &target)
                .ok()
                .map(|o| Report::Changes(vec![Change::Upsert(Box::new(o))])),
            Event::Delete(object) => {
                let meta = object.meta();
                let key = ObjectKey {
                    kind: target.model_kind.to_owned(),
                    namespace: meta.namespace.clone().unwrap_or_default(),
                    name: meta.name.clone().unwrap_or_default(),
                };
                Some(Report::Changes(vec![Change::Delete(key)]))
            }
        };
        if let Some(report) = report {
            if reports.send(report).await.is_err() {
                return;
            }
        }
    }
}

/// Decodes one object the apiserver sent. On failure (logged with the object's name) returns its
/// key, so a relist keeps the last version that decoded rather than dropping it.
fn decode_object<K: Resource + Serialize>(object: &K, target: &Target) -> Result<Object, ObjectKey> {
    let meta = object.meta();
    let key = ObjectKey {
        kind: target.model_kind.to_owned(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    };
    let name = weft_config::decode::display_name(&target.kind, &key.namespace, &key.name);
    let mut value = match serde_json::to_value(object) {
        Ok(value) => value,
        Err(e) => {
            warn!(object = %name, error = %e, "cannot serialize the object; skipped");
            return Err(key);
        }
    };
    if let Value::Object(map) = &mut value {
        map.insert("apiVersion".to_owned(), Value::String(target.api_version.clone()));
        map.insert("kind".to_owned(), Value::String(target.kind.clone()));
        // Bookkeeping of the apiserver's field managers: large, and nothing reads it.
        if let Some(Value::Object(meta)) = map.get_mut("metadata") {
            meta.remove("managedFields");
        }
    }
    match decode_with(value, &DecodeOptions::default()) {
        Ok(decoded) => {
            for warning in &decoded.warnings {
                debug!(object = %name, field = %warning.field, "field ignored");
            }
            Ok(decoded.object)
        }
        Err(e) => {
            warn!(object = %name, field = e.field(), error = %e, "object cannot be decoded; skipped");
            Err(key)
        }
    }
}

#[cfg(test)]
mod tests {
    use weft_config::load_yaml;

    use super::*;

    fn objects(yaml: &str) -> Vec<Object> {
        load_yaml(yaml, "test.yaml").into_iter().map(|doc| doc.result.unwrap().object).collect()
    }

    fn pod(name: &str) -> String {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: node-a}}\n")
    }

    fn key(kind: &str, namespace: &str, name: &str) -> ObjectKey {
        ObjectKey { kind: kind.into(), namespace: namespace.into(), name: name.into() }
    }

    #[test]
    fn a_relist_replaces_its_kind_only_and_keeps_what_failed_to_decode() {
        let mut state = KubeModel::default();
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
        let first = objects(&format!("{ns}---\n{}---\n{}---\n{}", pod("a"), pod("b"), pod("c")));
        assert!(
            state.apply(Report::Changes(first.into_iter().map(|o| Change::Upsert(Box::new(o))).collect()))
        );
        assert_eq!(state.model.len(), 4);

        // The relist has a and d; c failed to decode; b is gone. The namespace is another kind.
        let relisted = Report::Relisted {
            kind: "Pod",
            objects: objects(&format!("{}---\n{}", pod("a"), pod("d"))),
            kept: BTreeSet::from([key("Pod", "shop", "c")]),
        };
        assert!(state.apply(relisted));
        let keys: BTreeSet<ObjectKey> = state.model.objects().map(ObjectKey::of).collect();
        let want = BTreeSet::from([
            key("Namespace", "", "shop"),
            key("Pod", "shop", "a"),
            key("Pod", "shop", "c"),
            key("Pod", "shop", "d"),
        ]);
        assert_eq!(keys, want);

        // The same relist again changes nothing.
        let again = Report::Relisted {
            kind: "Pod",
            objects: objects(&format!("{}---\n{}", pod("a"), pod("d"))),
            kept: BTreeSet::from([key("Pod", "shop", "c")]),
        };
        assert!(!state.apply(again));
    }

    #[test]
    fn apiserver_objects_decode_with_their_kind_set() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": "node-a", "containers": [{
                "name": "app", "image": "web:1",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
            }]},
            "status": {"podIP": "10.0.0.5", "phase": "Running"},
        }))
        .unwrap();
        let target = Target { model_kind: "Pod", api_version: "v1".into(), kind: "Pod".into() };
        let Object::Pod(decoded) = decode_object(&pod, &target).unwrap() else { panic!("not a pod") };
        assert_eq!(decoded.status.pod_ip.as_deref(), Some("10.0.0.5"));
        assert!(decoded.metadata.managed_fields.is_empty());
        // Container ports come through: a Service's named targetPort resolves against them.
        assert_eq!(decoded.container_port("http"), Some(8080));

        // A custom object whose spec does not decode is skipped, named by its key.
        let resource = CUSTOM_KINDS[0].api_resource();
        let bad = DynamicObject::new("reviews", &resource)
            .within("shop")
            .data(serde_json::json!({"spec": {"hosts": 5}}));
        let target = Target {
            model_kind: "VirtualService",
            api_version: CUSTOM_KINDS[0].api_version(),
            kind: "VirtualService".into(),
        };
        assert_eq!(decode_object(&bad, &target).unwrap_err(), key("VirtualService", "shop", "reviews"));
    }
}
