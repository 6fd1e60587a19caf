//! Waypoints on Kubernetes: for every Gateway API `Gateway` of class `istio-waypoint`, keeps a
//! ServiceAccount, Deployment and Service of the same name (server-side apply, field manager
//! [`FIELD_MANAGER`], owner references to the Gateway) and writes the Gateway's status (Accepted,
//! Programmed, the Service's address). When a Gateway goes (or changes class) its objects are
//! deleted here, not left to the garbage collector, so a cluster without one (the test apiserver)
//! behaves like one with it. Reconciles on Gateway events and every [`WaypointOptions::resync`].
//! What the objects look like is pure ([`resources`]); this file is the loop that talks to the
//! API server. Knows nothing of the model or xDS.

pub mod resources;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use resources::{
    GatewayInfo, GATEWAY_API_VERSION, GATEWAY_NAME_LABEL, ISTIO_GATEWAY_NAME_LABEL, MANAGED_BY_LABEL,
    MANAGED_BY_VALUE, WAYPOINT_CLASS,
};

/// The field manager of every write: owns only the fields Weft sets.
pub const FIELD_MANAGER: &str = "weft-controller";
/// A failed reconcile is retried after this long.
const RETRY: Duration = Duration::from_secs(5);
/// Bound on one API call, so a hung apiserver connection does not stall the loop for ever.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How waypoint Deployments are made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WaypointOptions {
    /// The waypoint container's image.
    pub image: String,
    /// Where the waypoint reaches the controller (xDS and CA), a URL such as
    /// `https://weft-controller.weft-system.svc:15012`.
    pub controller_address: String,
    /// The name the controller's certificate carries when the address's host is not it (the
    /// waypoint's ALT_XDS_HOSTNAME).
    pub controller_server_name: Option<String>,
    /// Every Gateway is reconciled (and strays swept) this often, besides on its events.
    pub resync: Duration,
}

impl Default for WaypointOptions {
    fn default() -> Self {
        WaypointOptions {
            image: crate::config::DEFAULT_WAYPOINT_IMAGE.to_owned(),
            controller_address: crate::config::DEFAULT_WAYPOINT_CONTROLLER_ADDRESS.to_owned(),
            controller_server_name: None,
            resync: Duration::from_secs(60),
        }
    }
}

/// Why one reconcile failed (retried after [`RETRY`]).
#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("{action} {kind} {namespace}/{name}: {source} (may the controller's service account do that?)")]
    Api { action: &'static str, kind: &'static str, namespace: String, name: String, source: kube::Error },
    #[error("{action} {kind} {namespace}/{name}: no answer within {CALL_TIMEOUT:?}")]
    Timeout { action: &'static str, kind: &'static str, namespace: String, name: String },
    #[error("listing {kind}: {source} (may the controller's service account list them?)")]
    List { kind: &'static str, source: kube::Error },
    #[error("listing {kind}: no answer within {CALL_TIMEOUT:?}")]
    ListTimeout { kind: &'static str },
}

type Key = (String, String);

/// What was last applied for a Gateway, so that events that change only its status or metadata
/// do not re-apply its objects (the periodic resync does).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Applied {
    uid: String,
    generation: i64,
    address: Option<String>,
}

/// The reconcile loop's state.
struct Manager {
    client: Client,
    options: WaypointOptions,
    gateway_resource: ApiResource,
    /// Every Gateway the watcher reported, waypoint or not.
    gateways: BTreeMap<Key, GatewayInfo>,
    applied: BTreeMap<Key, Applied>,
    synced: bool,
    /// `status.readyReplicas` of each waypoint Deployment Weft made, by its (the Gateway's) key.
    ready: BTreeMap<Key, i32>,
    /// The Deployments of a relist in progress.
    ready_relist: Option<BTreeMap<Key, i32>>,
}

/// Runs the waypoint manager until the future is dropped. Errors are logged and retried; a
/// missing Gateway CRD is retried with the watcher's backoff.
pub async fn run(client: Client, options: WaypointOptions) {
    let gateway_resource = resources::gateway_resource();
    let api = Api::<DynamicObject>::all_with(client.clone(), &gateway_resource);
    let mut events = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut manager = Manager {
        client,
        options: options.clone(),
        gateway_resource,
        gateways: BTreeMap::new(),
        applied: BTreeMap::new(),
        synced: false,
        ready: BTreeMap::new(),
        ready_relist: None,
    };
    let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}");
    let deployments = Api::<Deployment>::all(manager.client.clone());
    let mut deployment_events =
        watcher::watcher(deployments, watcher::Config::default().labels(&selector)).default_backoff().boxed();
    let mut deployments_failing = false;
    let mut resync = tokio::time::interval_at(Instant::now() + options.resync, options.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut relist: Option<Vec<GatewayInfo>> = None;
    let mut pending: BTreeSet<Key> = BTreeSet::new();
    let mut retry: BTreeSet<Key> = BTreeSet::new();
    let mut retry_at: Option<Instant> = None;
    let mut sweep_due = false;
    let mut failing = false;

    loop {
        let retry_sleep = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let mut next = tokio::select! {
            event = events.next() => Some(event),
            event = deployment_events.next() => {
                match event {
                    Some(Ok(event)) => {
                        deployments_failing = false;
                        manager.on_deployment_event(event, &mut pending);
                    }
                    Some(Err(e)) => {
                        if !deployments_failing {
                            warn!(error = %e, "cannot watch waypoint Deployments; retrying with backoff (may the controller watch deployments?)");
                            deployments_failing = true;
                        }
                    }
                    None => return,
                }
                None
            }
            _ = resync.tick() => {
                if manager.synced {
                    manager.applied.clear();
                    pending.extend(manager.gateways.keys().cloned());
                    sweep_due = true;
                }
                None
            }
            () = retry_sleep => {
                pending.append(&mut retry);
                retry_at = None;
                sweep_due |= manager.synced;
                None
            }
        };
        // Take every event already waiting before acting, so a burst is reconciled once.
        while let Some(event) = next {
            match event {
                Some(Ok(event)) => {
                    if failing {
                        info!("watching Gateways again");
                        failing = false;
                    }
                    sweep_due |= manager.on_event(event, &mut relist, &mut pending);
                }
                Some(Err(e)) => {
                    if !failing {
                        warn!(error = %e, "cannot watch gateway.networking.k8s.io Gateways; retrying with backoff (is the Gateway API CRD installed?)");
                        failing = true;
                    }
                }
                None => return,
            }
            next = events.next().now_or_never();
        }
        if !manager.synced {
            continue;
        }
        for key in std::mem::take(&mut pending) {
            if let Err(e) = manager.reconcile(&key).await {
                warn!(gateway = %format!("{}/{}", key.0, key.1), error = %e, "waypoint reconcile failed; retrying");
                retry.insert(key);
            }
        }
        if sweep_due {
            match manager.sweep().await {
                Ok(()) => sweep_due = false,
                Err(e) => {
                    warn!(error = %e, "cannot sweep waypoint objects whose Gateway is gone; retrying");
                    retry_at.get_or_insert(Instant::now() + RETRY);
                }
            }
        }
        if !retry.is_empty() {
            retry_at.get_or_insert(Instant::now() + RETRY);
        }
    }
}

impl Manager {
    /// Applies one watcher event to the state; returns whether a sweep is due (a relist ended).
    fn on_event(
        &mut self,
        event: Event<DynamicObject>,
        relist: &mut Option<Vec<GatewayInfo>>,
        pending: &mut BTreeSet<Key>,
    ) -> bool {
        match event {
            Event::Init => {
                *relist = Some(Vec::new());
                false
            }
            Event::InitApply(object) => {
                if let Some(gateway) = GatewayInfo::from_object(&object) {
                    relist.get_or_insert_with(Vec::new).push(gateway);
                }
                false
            }
            Event::InitDone => {
                let listed = relist.take().unwrap_or_default();
                // Gateways gone while the watch was down are cleaned up by name, then by the sweep.
                pending.extend(self.gateways.keys().cloned());
                self.gateways = listed.into_iter().map(|g| (g.key(), g)).collect();
                pending.extend(self.gateways.keys().cloned());
                self.applied.clear();
                self.synced = true;
                true
            }
            Event::Apply(object) => {
                if let Some(gateway) = GatewayInfo::from_object(&object) {
                    pending.insert(gateway.key());
                    self.gateways.insert(gateway.key(), gateway);
                }
                false
            }
            Event::Delete(object) => {
                let key = (object.namespace().unwrap_or_default(), object.name_any());
                self.gateways.remove(&key);
                pending.insert(key);
                false
            }
        }
    }

    /// Applies one event of the waypoint Deployments' watch; a Gateway whose Deployment's ready
    /// count changed is due for a reconcile (its status).
    fn on_deployment_event(&mut self, event: Event<Deployment>, pending: &mut BTreeSet<Key>) {
        let entry = |d: &Deployment| {
            let ready = d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
            ((d.namespace().unwrap_or_default(), d.name_any()), ready)
        };
        match event {
            Event::Init => self.ready_relist = Some(BTreeMap::new()),
            Event::InitApply(d) => {
                let (key, ready) = entry(&d);
                self.ready_relist.get_or_insert_with(BTreeMap::new).insert(key, ready);
            }
            Event::InitDone => {
                let listed = self.ready_relist.take().unwrap_or_default();
                let changed =
                    self.ready.keys().chain(listed.keys()).filter(|k| self.ready.get(*k) != listed.get(*k));
                pending.extend(changed.cloned().collect::<Vec<_>>());
                self.ready = listed;
            }
            Event::Apply(d) => {
                let (key, ready) = entry(&d);
                if self.ready.insert(key.clone(), ready) != Some(ready) {
                    pending.insert(key);
                }
            }
            Event::Delete(d) => {
                let (key, _) = entry(&d);
                if self.ready.remove(&key).is_some() {
                    pending.insert(key);
                }
            }
        }
    }

    /// Brings one Gateway's objects and status in line, or removes the objects of a Gateway that
    /// is gone or no longer a waypoint.
    async fn reconcile(&mut self, key: &Key) -> Result<(), WaypointError> {
        let Some(gateway) = self.gateways.get(key).filter(|g| g.is_waypoint() && !g.deleting).cloned() else {
            self.applied.remove(key);
            let live = self.live_uids();
            return self.delete_named(&key.0, &key.1, &live).await;
        };
        let applied = match self.applied.get(key) {
            Some(a) if a.uid == gateway.uid && a.generation == gateway.generation => a.clone(),
            _ => {
                let applied = self.apply_objects(&gateway).await?;
                debug!(gateway = %format!("{}/{}", key.0, key.1), "waypoint objects applied");
                self.applied.insert(key.clone(), applied.clone());
                applied
            }
        };
        let now =
            k8s_openapi::chrono::Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true);
        let ready = self.ready.get(key).copied().unwrap_or(0);
        let status = resources::status(&gateway, applied.address.as_deref(), ready, &now);
        if resources::status_differs(&gateway.status, &status) {
            let body = resources::status_patch(&gateway, status);
            let api =
                Api::<DynamicObject>::namespaced_with(self.client.clone(), &key.0, &self.gateway_resource);
            call("writing the status of", "Gateway", key, async {
                api.patch_status(&key.1, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
                    .await
            })
            .await?;
            info!(gateway = %format!("{}/{}", key.0, key.1), address = ?applied.address, "waypoint status written");
        }
        Ok(())
    }

    /// Server-side applies the ServiceAccount, Deployment and Service; returns the address.
    async fn apply_objects(&self, gateway: &GatewayInfo) -> Result<Applied, WaypointError> {
        let key = gateway.key();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let accounts = Api::<ServiceAccount>::namespaced(self.client.clone(), &key.0);
        let body = resources::service_account(gateway);
        call("applying", "ServiceAccount", &key, accounts.patch(&key.1, &params, &Patch::Apply(&body)))
            .await?;
        let deployments = Api::<Deployment>::namespaced(self.client.clone(), &key.0);
        let body = resources::deployment(gateway, &self.options);
        call("applying", "Deployment", &key, deployments.patch(&key.1, &params, &Patch::Apply(&body)))
            .await?;
        let services = Api::<Service>::namespaced(self.client.clone(), &key.0);
        let body = resources::service(gateway);
        let service =
            call("applying", "Service", &key, services.patch(&key.1, &params, &Patch::Apply(&body))).await?;
        let address = service.spec.and_then(|s| s.cluster_ip).filter(|ip| !ip.is_empty() && ip != "None");
        Ok(Applied { uid: gateway.uid.clone(), generation: gateway.generation, address })
    }

    /// The uids of the Gateways that should have waypoint objects.
    fn live_uids(&self) -> BTreeSet<String> {
        self.gateways.values().filter(|g| g.is_waypoint() && !g.deleting).map(|g| g.uid.clone()).collect()
    }

    /// Deletes the objects named `name` in `namespace` that a Gateway controls, unless that
    /// Gateway is live.
    async fn delete_named(
        &self,
        namespace: &str,
        name: &str,
        live: &BTreeSet<String>,
    ) -> Result<(), WaypointError> {
        self.delete_if_stray::<Deployment>(namespace, name, live).await?;
        self.delete_if_stray::<Service>(namespace, name, live).await?;
        self.delete_if_stray::<ServiceAccount>(namespace, name, live).await
    }

    async fn delete_if_stray<K>(
        &self,
        namespace: &str,
        name: &str,
        live: &BTreeSet<String>,
    ) -> Result<(), WaypointError>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let api = Api::<K>::namespaced(self.client.clone(), namespace);
        let key = (namespace.to_owned(), name.to_owned());
        let kind = kind_name::<K>();
        let Some(object) = call("reading", kind, &key, api.get_opt(name)).await? else { return Ok(()) };
        if let Some(stray) = stray(object.meta(), live) {
            self.delete_unless_owner_lives(&api, kind, &key, stray).await?;
        }
        Ok(())
    }

    /// Deletes every object Weft made for a Gateway that no longer exists or is no longer a
    /// waypoint (what the garbage collector would do, for clusters without one, and for Gateways
    /// deleted while the watch was down).
    async fn sweep(&self) -> Result<(), WaypointError> {
        let live = self.live_uids();
        self.sweep_kind::<Deployment>(&live).await?;
        self.sweep_kind::<Service>(&live).await?;
        self.sweep_kind::<ServiceAccount>(&live).await
    }

    async fn sweep_kind<K>(&self, live: &BTreeSet<String>) -> Result<(), WaypointError>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let kind = kind_name::<K>();
        let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}");
        let all = Api::<K>::all(self.client.clone());
        let list = tokio::time::timeout(CALL_TIMEOUT, all.list(&ListParams::default().labels(&selector)))
            .await
            .map_err(|_| WaypointError::ListTimeout { kind })?
            .map_err(|source| WaypointError::List { kind, source })?;
        for object in list.items {
            let meta = object.meta();
            if let Some(stray) = stray(meta, live) {
                let namespace = meta.namespace.clone().unwrap_or_default();
                let key = (namespace.clone(), meta.name.clone().unwrap_or_default());
                let api = Api::<K>::namespaced(self.client.clone(), &namespace);
                self.delete_unless_owner_lives(&api, kind, &key, stray).await?;
            }
        }
        Ok(())
    }

    /// Deletes a stray after asking the API server whether its Gateway is really gone: this
    /// watcher may not have seen a Gateway created a moment ago (or another controller instance
    /// may be the one that made the object), and a live waypoint must never lose its objects.
    async fn delete_unless_owner_lives<K>(
        &self,
        api: &Api<K>,
        kind: &'static str,
        key: &Key,
        stray: Stray,
    ) -> Result<(), WaypointError>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let gateways =
            Api::<DynamicObject>::namespaced_with(self.client.clone(), &key.0, &self.gateway_resource);
        let owner_key = (key.0.clone(), stray.owner_name.clone());
        let owner = call("reading", "Gateway", &owner_key, gateways.get_opt(&stray.owner_name)).await?;
        let owner_lives = owner
            .as_ref()
            .and_then(GatewayInfo::from_object)
            .is_some_and(|g| g.uid == stray.owner_uid && g.is_waypoint() && !g.deleting);
        if owner_lives {
            return Ok(());
        }
        delete(api, kind, key, stray.uid).await
    }
}

/// An object Weft made whose Gateway this manager does not know as a live waypoint.
#[derive(Debug, PartialEq, Eq)]
struct Stray {
    /// The object's own uid (the delete's precondition).
    uid: String,
    owner_name: String,
    owner_uid: String,
}

/// The object as a [`Stray`] when Weft made it and it is controlled by a Gateway whose uid is not
/// in `live`; `None` for objects Weft does not control or whose Gateway is live.
fn stray(meta: &kube::api::ObjectMeta, live: &BTreeSet<String>) -> Option<Stray> {
    let labels = meta.labels.as_ref()?;
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY_VALUE) {
        return None;
    }
    let owner = meta.owner_references.as_ref()?.iter().find(|o| {
        o.controller == Some(true)
            && o.kind == "Gateway"
            && o.api_version.starts_with("gateway.networking.k8s.io/")
    })?;
    if live.contains(&owner.uid) {
        return None;
    }
    Some(Stray { uid: meta.uid.clone()?, owner_name: owner.name.clone(), owner_uid: owner.uid.clone() })
}

/// Deletes one object, only if it is still the one seen (`uid`); gone already is fine.
async fn delete<K>(api: &Api<K>, kind: &'static str, key: &Key, uid: String) -> Result<(), WaypointError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let params = DeleteParams {
        preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
        ..DeleteParams::background()
    };
    match call("deleting", kind, key, api.delete(&key.1, &params)).await {
        Ok(_) => {
            info!(object = %format!("{kind} {}/{}", key.0, key.1), "deleted waypoint object whose Gateway is gone");
            Ok(())
        }
        Err(WaypointError::Api { source: kube::Error::Api(status), .. })
            if status.code == 404 || status.code == 409 =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// One API call, bounded by [`CALL_TIMEOUT`], its error naming what was done to what.
async fn call<T>(
    action: &'static str,
    kind: &'static str,
    key: &Key,
    request: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, WaypointError> {
    let (namespace, name) = (key.0.clone(), key.1.clone());
    match tokio::time::timeout(CALL_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(WaypointError::Api { action, kind, namespace, name, source }),
        Err(_) => Err(WaypointError::Timeout { action, kind, namespace, name }),
    }
}

fn kind_name<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Deployment" => "Deployment",
        "Service" => "Service",
        "ServiceAccount" => "ServiceAccount",
        _ => "object",
    }
}
