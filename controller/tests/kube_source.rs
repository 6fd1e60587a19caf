//! The Kubernetes source against a real kube-apiserver (v1.20.2): objects created, updated and
//! deleted through the API reach the model, and after an apiserver restart the model converges
//! on what the apiserver holds, losing nothing and keeping nothing stale. The shared apiserver
//! comes from `WEFT_TEST_KUBECONFIG` (skipped without it, failing in CI); the restart test starts
//! a private one with `scripts/kube-apiserver/start.sh`.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use controller::model::{Model, ObjectKey};
use controller::sources::kube::watch_model;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config};
use serde_json::{json, Value};
use tokio::sync::watch;
use weft_config::Object;
use weft_core::Identity;

use support::{ambient_namespace, eventually, kube_client, pod, unique_name, DATAPLANE_MODE_LABEL};

/// Bound on every wait for the model to follow the apiserver.
const MODEL_WAIT: Duration = Duration::from_secs(10);
/// Bound on waits for the apiserver itself (a CRD becoming established).
const API_WAIT: Duration = Duration::from_secs(30);
const TRUST_DOMAIN: &str = "cluster.local";
const APISERVER_VERSION: &str = "1.20.2";

// --- objects ----------------------------------------------------------------------------------------

/// Creates a pod and, playing the kubelet, reports it running with `ip`.
async fn create_running_pod(pods: &Api<Pod>, name: &str, node: &str, ip: &str) -> anyhow::Result<()> {
    pods.create(&PostParams::default(), &pod(name, node, "web"))
        .await
        .with_context(|| format!("creating pod {name}"))?;
    let status = json!({ "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] } });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("patching the status of pod {name}"))?;
    Ok(())
}

/// Deletes a pod at once: with no kubelet, a graceful delete would never finish.
async fn delete_pod_now(pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    pods.delete(name, &DeleteParams::default().grace_period(0))
        .await
        .with_context(|| format!("deleting pod {name}"))?;
    Ok(())
}

async fn create_service(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "selector": { "app": "web" }, "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] }
    }))?;
    Api::<Service>::namespaced(client.clone(), ns).create(&PostParams::default(), &service).await?;
    Ok(())
}

/// A custom kind as Istio ships its CRD: every served version, no conversion, v1 stored, the
/// spec left unvalidated.
struct CustomKind {
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    versions: &'static [&'static str],
}

const VIRTUAL_SERVICE: CustomKind = CustomKind {
    group: "networking.istio.io",
    kind: "VirtualService",
    plural: "virtualservices",
    singular: "virtualservice",
    versions: &["v1", "v1beta1", "v1alpha3"],
};
const AUTHORIZATION_POLICY: CustomKind = CustomKind {
    group: "security.istio.io",
    kind: "AuthorizationPolicy",
    plural: "authorizationpolicies",
    singular: "authorizationpolicy",
    versions: &["v1", "v1beta1"],
};

impl CustomKind {
    fn crd_name(&self) -> String {
        format!("{}.{}", self.plural, self.group)
    }

    fn crd(&self) -> anyhow::Result<CustomResourceDefinition> {
        let schema = json!({
            "openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "spec": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
                    "status": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
                },
            }
        });
        let versions: Vec<Value> = self
            .versions
            .iter()
            .map(|v| {
                json!({
                    "name": v, "served": true, "storage": *v == "v1",
                    "schema": schema, "subresources": { "status": {} },
                })
            })
            .collect();
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": { "name": self.crd_name() },
            "spec": {
                "group": self.group,
                "names": {
                    "kind": self.kind,
                    "listKind": format!("{}List", self.kind),
                    "plural": self.plural,
                    "singular": self.singular,
                },
                "scope": "Namespaced",
                "versions": versions,
            }
        });
        serde_json::from_value(crd).with_context(|| format!("the {} CRD does not deserialize", self.kind))
    }

    /// Applies the CRD (server-side, so a second apply is a no-op) and waits until Established.
    async fn install(&self, client: &Client) -> anyhow::Result<()> {
        let crds = Api::<CustomResourceDefinition>::all(client.clone());
        let name = self.crd_name();
        crds.patch(&name, &PatchParams::apply("weft-tests").force(), &Patch::Apply(self.crd()?))
            .await
            .with_context(|| format!("applying the {} CRD", self.kind))?;
        tokio::time::timeout(API_WAIT, await_condition(crds, &name, conditions::is_crd_established()))
            .await
            .with_context(|| format!("the {} CRD did not become Established", self.kind))??;
        Ok(())
    }

    fn api(&self, client: &Client, ns: &str) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, "v1", self.kind),
            self.plural,
        );
        Api::namespaced_with(client.clone(), ns, &resource)
    }

    /// Creates an object with `spec`, retrying the 404 of a group not yet served everywhere.
    async fn create(&self, client: &Client, ns: &str, name: &str, spec: Value) -> anyhow::Result<()> {
        let api = self.api(client, ns);
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, "v1", self.kind),
            self.plural,
        );
        let object = DynamicObject::new(name, &resource).within(ns).data(json!({ "spec": spec }));
        eventually(&format!("creating {} {ns}/{name}", self.kind), API_WAIT, || async {
            match api.create(&PostParams::default(), &object).await {
                Ok(_) => Ok(Some(())),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }
}

// --- the model --------------------------------------------------------------------------------------

fn key(kind: &str, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey { kind: kind.to_owned(), namespace: namespace.to_owned(), name: name.to_owned() }
}

fn model_pod<'a>(model: &'a Model, ns: &str, name: &str) -> Option<&'a weft_config::kube::Pod> {
    match model.get(&key("Pod", ns, name)) {
        Some(Object::Pod(pod)) => Some(pod),
        _ => None,
    }
}

fn virtual_service_hosts(model: &Model, ns: &str, name: &str) -> Option<Vec<String>> {
    match model.get(&key("VirtualService", ns, name)) {
        Some(Object::VirtualService(vs)) => Some(vs.spec.hosts.clone()),
        _ => None,
    }
}

/// Waits (at most [`MODEL_WAIT`]) until the published model satisfies `condition`; returns how
/// long that took.
async fn until(
    model: &watch::Receiver<Arc<Model>>,
    what: &str,
    condition: impl FnMut(&Arc<Model>) -> bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut model = model.clone();
    let outcome = tokio::time::timeout(MODEL_WAIT, async { model.wait_for(condition).await.is_ok() }).await;
    match outcome {
        Ok(true) => Ok(started.elapsed()),
        Ok(false) => bail!("{what}: the model publisher is gone"),
        Err(_) => bail!("{what}: not in the model within {MODEL_WAIT:?}"),
    }
}

// --- the tests --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_reach_the_model_and_follow_updates_and_deletes() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    VIRTUAL_SERVICE.install(&client).await?;
    AUTHORIZATION_POLICY.install(&client).await?;
    let model = watch_model(client.clone());

    let ns = ambient_namespace(&client, "kube-source").await?;
    // A node name of its own, so other tests' pods do not place identities on it.
    let node = unique_name("node");
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    create_running_pod(&pods, "web-0", &node, "10.244.3.5").await?;
    create_service(&client, &ns, "web").await?;
    VIRTUAL_SERVICE.create(&client, &ns, "reviews", json!({ "hosts": ["reviews"] })).await?;
    AUTHORIZATION_POLICY.create(&client, &ns, "deny-all", json!({ "action": "DENY", "rules": [{}] })).await?;

    let web = Identity::new(TRUST_DOMAIN, &ns, "web")?;
    let took = until(&model, "namespace, pod, service, VirtualService and AuthorizationPolicy", |m| {
        model_pod(m, &ns, "web-0")
            .is_some_and(|pod| m.in_mesh(pod) && pod.status.pod_ip.as_deref() == Some("10.244.3.5"))
            && m.identities_on_node(TRUST_DOMAIN, &node) == BTreeSet::from([web.clone()])
            && m.get(&key("Service", &ns, "web")).is_some()
            && virtual_service_hosts(m, &ns, "reviews") == Some(vec!["reviews".to_owned()])
            && m.get(&key("AuthorizationPolicy", &ns, "deny-all")).is_some()
    })
    .await?;
    eprintln!("objects in the model {took:?} after the last create");

    // The namespace leaves the mesh; the VirtualService gains a host.
    let unlabel = json!({ "metadata": { "labels": { DATAPLANE_MODE_LABEL: null } } });
    Api::<Namespace>::all(client.clone())
        .patch(&ns, &PatchParams::default(), &Patch::Merge(&unlabel))
        .await?;
    let hosts = json!({ "spec": { "hosts": ["reviews", "ratings"] } });
    VIRTUAL_SERVICE
        .api(&client, &ns)
        .patch("reviews", &PatchParams::default(), &Patch::Merge(&hosts))
        .await?;
    until(&model, "the namespace label removed and the VirtualService updated", |m| {
        model_pod(m, &ns, "web-0").is_some_and(|pod| !m.in_mesh(pod))
            && virtual_service_hosts(m, &ns, "reviews")
                == Some(vec!["reviews".to_owned(), "ratings".to_owned()])
    })
    .await?;

    delete_pod_now(&pods, "web-0").await?;
    AUTHORIZATION_POLICY.api(&client, &ns).delete("deny-all", &DeleteParams::default()).await?;
    until(&model, "the pod and the policy deleted", |m| {
        model_pod(m, &ns, "web-0").is_none()
            && m.identities_on_node(TRUST_DOMAIN, &node).is_empty()
            && m.get(&key("AuthorizationPolicy", &ns, "deny-all")).is_none()
            && m.get(&key("Service", &ns, "web")).is_some()
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_converges_after_an_apiserver_restart() -> anyhow::Result<()> {
    let Some(apiserver) = PrivateApiserver::start().await? else { return Ok(()) };
    let client = apiserver.client().await?;
    VIRTUAL_SERVICE.install(&client).await?;
    let model = watch_model(client.clone());

    let ns = ambient_namespace(&client, "restart").await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    create_running_pod(&pods, "kept", "node-a", "10.244.4.1").await?;
    create_running_pod(&pods, "doomed", "node-a", "10.244.4.2").await?;
    create_service(&client, &ns, "web").await?;
    VIRTUAL_SERVICE.create(&client, &ns, "reviews", json!({ "hosts": ["reviews"] })).await?;
    let all_there = |m: &Model| {
        m.namespace(&ns).is_some()
            && model_pod(m, &ns, "kept").is_some()
            && m.get(&key("Service", &ns, "web")).is_some()
            && virtual_service_hosts(m, &ns, "reviews").is_some()
    };
    until(&model, "the objects before the restart", |m| {
        all_there(m) && model_pod(m, &ns, "doomed").is_some()
    })
    .await?;

    apiserver.stop()?;
    let refused = pods.list(&Default::default()).await;
    assert!(refused.is_err(), "the apiserver still answers after stop.sh");
    // While it is down, the source keeps publishing what it had.
    assert!(model.has_changed().is_ok(), "the model publisher died with the apiserver");
    assert!(all_there(&model.borrow()), "the model lost objects while the apiserver was down");

    let restarted = Instant::now();
    apiserver.restart().await?;
    eprintln!("apiserver restarted in {:?}", restarted.elapsed());
    // Changed right after the restart, likely before the watchers are back.
    delete_pod_now(&pods, "doomed").await?;
    create_running_pod(&pods, "fresh", "node-a", "10.244.4.3").await?;
    let took = until(&model, "the model after the restart", |m| {
        all_there(m) && model_pod(m, &ns, "doomed").is_none() && model_pod(m, &ns, "fresh").is_some()
    })
    .await?;
    eprintln!(
        "model converged {took:?} after the changes, {:?} after the restart began",
        restarted.elapsed()
    );
    let identities = model.borrow().identities_on_node(TRUST_DOMAIN, "node-a");
    assert_eq!(identities, BTreeSet::from([Identity::new(TRUST_DOMAIN, &ns, "web")?]));
    Ok(())
}

// --- a private apiserver ----------------------------------------------------------------------------

/// An etcd and kube-apiserver of this test alone, in a temporary STATE_DIR; stopped on drop,
/// also when the test fails.
struct PrivateApiserver {
    state: tempfile::TempDir,
}

impl PrivateApiserver {
    /// Starts one, or returns `None` (after a notice) when build.sh's cache is missing outside CI.
    async fn start() -> anyhow::Result<Option<PrivateApiserver>> {
        let bin = cache_dir().join("bin/kube-apiserver");
        if !bin.exists() && !std::env::var("CI").is_ok_and(|ci| ci == "true") {
            eprintln!("SKIPPED: no {} (run scripts/kube-apiserver/build.sh)", bin.display());
            return Ok(None);
        }
        let apiserver = PrivateApiserver { state: tempfile::tempdir()? };
        apiserver.run_start(false).await?;
        Ok(Some(apiserver))
    }

    async fn restart(&self) -> anyhow::Result<()> {
        self.run_start(true).await
    }

    async fn run_start(&self, keep_state: bool) -> anyhow::Result<()> {
        let mut start = tokio::process::Command::new(script("start.sh"));
        start.arg(self.state.path());
        if keep_state {
            start.env("KEEP_STATE", "1");
        }
        let out = start.output().await.context("running start.sh")?;
        if !out.status.success() {
            bail!("start.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn stop(&self) -> anyhow::Result<()> {
        let out = std::process::Command::new(script("stop.sh")).arg(self.state.path()).output()?;
        if !out.status.success() {
            bail!("stop.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    async fn client(&self) -> anyhow::Result<Client> {
        let kubeconfig = Kubeconfig::read_from(self.state.path().join("kubeconfig"))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }
}

impl Drop for PrivateApiserver {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping the private apiserver in {}: {e:#}", self.state.path().display());
        }
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-apiserver").join(name)
}

/// build.sh's cache, as start.sh finds it.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEFT_KUBE_APISERVER_DIR") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    cache.join(format!("weft/kube-apiserver-{APISERVER_VERSION}"))
}

/// The controller binary's Kubernetes mode: `--kubeconfig` feeds the model, so a pod created in
/// the API server becomes an xDS Workload, HBONE because its namespace is ambient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_serves_workloads_from_the_api_server() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    let Some(kubeconfig) = std::env::var_os(support::KUBECONFIG_ENV) else { return Ok(()) };
    let ns = ambient_namespace(&client, "ctl").await?;
    let config = controller::config::Config {
        // The CA's Secret in the test's namespace: the apiserver may have no weft-system yet.
        ca_secret: controller::ca::SecretOptions { namespace: ns.clone(), ..Default::default() },
        listen: "127.0.0.1:0".parse()?,
        kubernetes: Some(controller::config::KubeAccess::File(kubeconfig.into())),
        ..controller::config::Config::default()
    };
    let controller = controller::Controller::bind(&config).await?;
    let xds = controller.xds().context("Kubernetes mode serves xDS")?.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));

    let name = unique_name("web");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    create_running_pod(&pods, &name, "node-ctl", "10.44.0.7").await?;
    let uid = format!("Kubernetes//Pod/{ns}/{name}");
    eventually("the workload in the xDS snapshot", Duration::from_secs(10), || {
        let xds = xds.clone();
        let uid = uid.clone();
        async move {
            let snapshot = xds.snapshot();
            anyhow::Ok(snapshot.get(controller::xds::ADDRESS_TYPE_URL, &uid).map(|_| ()))
        }
    })
    .await?;

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), running).await???;
    Ok(())
}
