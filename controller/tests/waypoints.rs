#![allow(clippy::unwrap_used)]
//! Waypoints on Kubernetes against the real kube-apiserver (v1.20.2): an `istio-waypoint`
//! Gateway gets a ServiceAccount, Deployment and Service it owns and a status with its address;
//! they follow the Gateway's deletion (the test apiserver has no garbage collector: the controller
//! deletes them). Also the acceptance run: the whole controller out of cluster with a
//! kubeconfig for its own service account, bound to the ClusterRole below (and nothing more), serves
//! a node's workloads over xDS, signs a ztunnel's certificates after TokenReview and manages a
//! waypoint; `kubectl auth can-i` proves that role allows what it needs and no more. Skips without
//! `WEFT_TEST_KUBECONFIG` (fails in CI).

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use prost::Message;
use serde::Deserialize as _;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use weft_core::cert_manager::{CaClient, CertificateSource, Token};
use weft_core::control::ControlPlane;
use weft_core::proto::istio::workload::{address, Address, TunnelProtocol};
use weft_core::Identity;

use controller::config::{Config, KubeAccess};
use controller::waypoints::{resources, WaypointOptions, FIELD_MANAGER};
use controller::Controller;
use support::{
    ambient_namespace, create_running_pod, ensure_namespace, ensure_service_account, eventually,
    install_gateway_crd, install_istio_crds, kube_client, kubeconfig_with_token, pod, request_token,
    unique_name, Ads, ISTIO_CA_AUDIENCE, KUBECONFIG_ENV,
};

/// Bound on every wait for the controller or the apiserver.
const WAIT: Duration = Duration::from_secs(30);
/// Short, so the tests see a resync.
const RESYNC: Duration = Duration::from_secs(2);
const CONTROLLER_NS: &str = "weft-system";
/// The controller's service account in the acceptance test (a name of the tests', so the chart's
/// own RBAC, if another test applies it, does not blur what this role grants).
const CONTROLLER_SA: &str = "weft-controller-test";
const CONTROLLER_ROLE: &str = "weft-controller-test";
const ZTUNNEL_SA: &str = "ztunnel";
const TEST_MANAGER: &str = "weft-tests";

// --- the controller's RBAC ------------------------------------------------------------------------

/// Everything the controller needs, cluster-wide (what the chart's ClusterRole must grant):
/// read what the model watches, write only waypoint objects and Gateway status, review tokens.
/// The controller's rules as the chart grants them (the ClusterRole `weft-controller` of
/// daemonset/manifests/weft.yaml): what this file proves is what users install.
fn controller_rules() -> Value {
    chart_rules("ClusterRole")
}

/// The rules of the chart's `kind` (ClusterRole, or the Role of the controller's namespace) named
/// `weft-controller`.
fn chart_rules(kind: &str) -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../daemonset/manifests/weft.yaml");
    let text = std::fs::read_to_string(path).expect("the rendered chart");
    let role = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == "weft-controller")
        .unwrap_or_else(|| panic!("{kind} weft-controller in daemonset/manifests/weft.yaml"));
    role["rules"].clone()
}

/// Applies the ClusterRole, the controller's ServiceAccount and the binding (server-side, so
/// every test of the run may do it).
async fn apply_controller_rbac(client: &Client) -> anyhow::Result<()> {
    ensure_namespace(client, CONTROLLER_NS).await?;
    ensure_service_account(client, CONTROLLER_NS, CONTROLLER_SA).await?;
    let params = PatchParams::apply(TEST_MANAGER).force();
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": { "name": CONTROLLER_ROLE },
        "rules": controller_rules(),
    });
    Api::<ClusterRole>::all(client.clone()).patch(CONTROLLER_ROLE, &params, &Patch::Apply(&role)).await?;
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": { "name": CONTROLLER_ROLE },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROLLER_ROLE },
        "subjects": [{ "kind": "ServiceAccount", "name": CONTROLLER_SA, "namespace": CONTROLLER_NS }],
    });
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(CONTROLLER_ROLE, &params, &Patch::Apply(&binding))
        .await?;
    // The Role of its own namespace: the CA's Secrets.
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": { "name": CONTROLLER_ROLE, "namespace": CONTROLLER_NS },
        "rules": chart_rules("Role"),
    });
    Api::<Role>::namespaced(client.clone(), CONTROLLER_NS)
        .patch(CONTROLLER_ROLE, &params, &Patch::Apply(&role))
        .await?;
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": { "name": CONTROLLER_ROLE, "namespace": CONTROLLER_NS },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROLLER_ROLE },
        "subjects": [{ "kind": "ServiceAccount", "name": CONTROLLER_SA, "namespace": CONTROLLER_NS }],
    });
    Api::<RoleBinding>::namespaced(client.clone(), CONTROLLER_NS)
        .patch(CONTROLLER_ROLE, &params, &Patch::Apply(&binding))
        .await?;
    Ok(())
}

// --- Gateways and what is made for them -----------------------------------------------------------

fn gateways(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &resources::gateway_resource())
}

/// Creates a Gateway of `class` (retrying the 404 of a CRD established a moment ago).
async fn create_gateway(client: &Client, ns: &str, name: &str, class: &str) -> anyhow::Result<DynamicObject> {
    let api = gateways(client, ns);
    let object = DynamicObject::new(name, &resources::gateway_resource()).within(ns).data(json!({
        "spec": {
            "gatewayClassName": class,
            "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE" }],
        }
    }));
    eventually(&format!("creating Gateway {ns}/{name}"), WAIT, || async {
        match api.create(&PostParams::default(), &object).await {
            Ok(created) => Ok(Some(created)),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// The objects made for a Gateway, once all three exist.
struct Made {
    account: ServiceAccount,
    deployment: Deployment,
    service: Service,
}

async fn made_for(client: &Client, ns: &str, name: &str) -> anyhow::Result<Option<Made>> {
    let account = Api::<ServiceAccount>::namespaced(client.clone(), ns).get_opt(name).await?;
    let deployment = Api::<Deployment>::namespaced(client.clone(), ns).get_opt(name).await?;
    let service = Api::<Service>::namespaced(client.clone(), ns).get_opt(name).await?;
    Ok(match (account, deployment, service) {
        (Some(account), Some(deployment), Some(service)) => Some(Made { account, deployment, service }),
        _ => None,
    })
}

async fn none_left(client: &Client, ns: &str, name: &str) -> anyhow::Result<Option<()>> {
    let account = Api::<ServiceAccount>::namespaced(client.clone(), ns).get_opt(name).await?;
    let deployment = Api::<Deployment>::namespaced(client.clone(), ns).get_opt(name).await?;
    let service = Api::<Service>::namespaced(client.clone(), ns).get_opt(name).await?;
    Ok((account.is_none() && deployment.is_none() && service.is_none()).then_some(()))
}

/// Checks what was made for `gateway`: owned by it (controller), labelled, the Service's
/// cluster IP in the Gateway status with Accepted, and Programmed false (NoResources) until the
/// test, playing the Deployment controller, reports a ready pod, then true, for its generation.
async fn check_made(client: &Client, gateway: &DynamicObject) -> anyhow::Result<String> {
    let ns = gateway.metadata.namespace.clone().unwrap();
    let name = gateway.metadata.name.clone().unwrap();
    let made = eventually("the waypoint's ServiceAccount, Deployment and Service", WAIT, || {
        made_for(client, &ns, &name)
    })
    .await?;
    let uid = gateway.metadata.uid.clone().unwrap();
    for meta in [made.account.meta(), made.deployment.meta(), made.service.meta()] {
        let owners = meta.owner_references.clone().unwrap_or_default();
        assert_eq!(owners.len(), 1, "{owners:?}");
        let owner = &owners[0];
        assert_eq!(
            (owner.api_version.as_str(), owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("gateway.networking.k8s.io/v1", "Gateway", name.as_str(), uid.as_str())
        );
        assert_eq!(owner.controller, Some(true));
        let labels = meta.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("gateway.networking.k8s.io/gateway-name"), Some(&name));
        assert_eq!(labels.get("istio.io/gateway-name"), Some(&name));
        let managers: Vec<_> =
            meta.managed_fields.iter().flatten().filter_map(|m| m.manager.clone()).collect();
        assert!(managers.iter().any(|m| m == FIELD_MANAGER), "{managers:?}");
    }
    let pod_spec = made.deployment.spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(pod_spec.service_account_name.as_deref(), Some(name.as_str()));
    let ports: Vec<i32> = pod_spec.containers[0].ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, [15008, 15020, 15021]);
    let service_spec = made.service.spec.clone().unwrap();
    let port = &service_spec.ports.unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("mesh"), 15008));
    let cluster_ip = service_spec.cluster_ip.context("the waypoint Service has no cluster IP")?;

    let generation = gateway.metadata.generation.unwrap();
    let programmed = |want: &'static str| {
        let (ns, name) = (ns.clone(), name.clone());
        move || {
            let (ns, name) = (ns.clone(), name.clone());
            async move {
                let current = gateways(client, &ns).get(&name).await?;
                let status = current.data.get("status").cloned().unwrap_or(Value::Null);
                let found = status["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Programmed" && c["status"] == want));
                Ok(found.then_some(status))
            }
        }
    };
    // No kube-controller-manager here: the Deployment never has a ready pod until the test says so.
    let pending = eventually("the Gateway status without a ready pod", WAIT, programmed("False")).await?;
    let condition =
        pending["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Programmed").unwrap();
    assert_eq!(condition["reason"], "NoResources", "{condition}");
    assert!(condition["message"].as_str().unwrap().contains("no ready pod"), "{condition}");
    let ready = json!({ "status": { "replicas": 1, "readyReplicas": 1, "availableReplicas": 1 } });
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .context("reporting a ready waypoint pod")?;
    let status = eventually("the Gateway status with a ready pod", WAIT, programmed("True")).await?;
    assert_eq!(status["addresses"], json!([{ "type": "IPAddress", "value": cluster_ip }]));
    for kind in ["Accepted", "Programmed"] {
        let condition = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == kind).unwrap();
        assert_eq!(condition["status"], "True", "{condition}");
        assert_eq!(condition["reason"], kind, "{condition}");
        assert_eq!(condition["observedGeneration"], generation, "{condition}");
        assert!(condition["lastTransitionTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{condition}");
    }
    Ok(cluster_ip)
}

/// The waypoint manager alone, as the controller runs it; stopped on drop.
struct Manager(tokio::task::JoinHandle<()>);

impl Manager {
    fn start(client: &Client) -> Manager {
        let options = WaypointOptions { resync: RESYNC, ..WaypointOptions::default() };
        Manager(tokio::spawn(controller::waypoints::run(client.clone(), options)))
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_gateway_gets_its_objects_and_status_and_they_go_with_it() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    install_gateway_crd(&client).await?;
    let ns = ambient_namespace(&client, "waypoint").await?;
    let manager = Manager::start(&client);

    let started = Instant::now();
    let gateway = create_gateway(&client, &ns, "waypoint", resources::WAYPOINT_CLASS).await?;
    let other = create_gateway(&client, &ns, "ingress", "istio").await?;
    check_made(&client, &gateway).await?;
    eprintln!("waypoint objects and status {:?} after the Gateway was created", started.elapsed());
    assert!(made_for(&client, &ns, "ingress").await?.is_none(), "a non-waypoint Gateway got a waypoint");
    assert!(other.data.get("status").is_none_or(|s| s.get("conditions").is_none()));

    // Another field manager scales the waypoint and annotates its Service: Weft's resync leaves
    // their fields alone, and puts back a Deployment someone deleted.
    let scale = json!({ "apiVersion": "apps/v1", "kind": "Deployment", "spec": { "replicas": 3 } });
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    deployments.patch("waypoint", &PatchParams::apply("autoscaler"), &Patch::Apply(&scale)).await?;
    let note = json!({ "metadata": { "annotations": { "example.com/owner": "team-a" } } });
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    services.patch("waypoint", &PatchParams::default(), &Patch::Merge(&note)).await?;
    tokio::time::sleep(RESYNC * 2).await;
    let replicas = deployments.get("waypoint").await?.spec.and_then(|s| s.replicas);
    assert_eq!(replicas, Some(3), "the resync took the replica count back");
    let annotations = services.get("waypoint").await?.metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.get("example.com/owner").map(String::as_str), Some("team-a"));
    deployments.delete("waypoint", &DeleteParams::default()).await?;
    eventually("the deleted Deployment put back", WAIT, || async {
        Ok(deployments.get_opt("waypoint").await?.filter(|d| d.metadata.deletion_timestamp.is_none()))
    })
    .await?;
    // The new Deployment has no ready pod: the Gateway is no longer programmed.
    eventually("Programmed false again", WAIT, || async {
        let current = gateways(&client, &ns).get("waypoint").await?;
        let conditions = current.data.pointer("/status/conditions").and_then(Value::as_array).cloned();
        Ok(conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c["type"] == "Programmed" && c["status"] == "False" && c["reason"] == "NoResources")
            .then_some(()))
    })
    .await?;

    let deleted = Instant::now();
    gateways(&client, &ns).delete("waypoint", &DeleteParams::default()).await?;
    eventually("the waypoint objects deleted with the Gateway", WAIT, || none_left(&client, &ns, "waypoint"))
        .await?;
    eprintln!("waypoint objects gone {:?} after the Gateway was deleted", deleted.elapsed());
    drop(manager);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_a_gateway_deleted_while_the_controller_was_down_are_swept() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    install_gateway_crd(&client).await?;
    let ns = ambient_namespace(&client, "waypoint-sweep").await?;
    let manager = Manager::start(&client);
    let gateway = create_gateway(&client, &ns, "waypoint", resources::WAYPOINT_CLASS).await?;
    check_made(&client, &gateway).await?;
    drop(manager);

    gateways(&client, &ns).delete("waypoint", &DeleteParams::default()).await?;
    // A Gateway of the same name, created again, is a new owner: its objects stay.
    let kept = create_gateway(&client, &ns, "kept", resources::WAYPOINT_CLASS).await?;
    let _manager = Manager::start(&client);
    eventually("the orphaned objects swept", WAIT, || none_left(&client, &ns, "waypoint")).await?;
    check_made(&client, &kept).await?;
    Ok(())
}

// --- the acceptance run -------------------------------------------------------------------------

/// Reads `ads` until every name in `want` has been received.
async fn until_received(ads: &mut Ads, want: &[String]) -> anyhow::Result<BTreeMap<String, Address>> {
    let mut seen = BTreeMap::new();
    ads.until(&format!("{want:?}"), WAIT, |response| {
        for resource in &response.resources {
            if let Some(body) = &resource.resource {
                if let Ok(address) = Address::decode(body.value.as_slice()) {
                    seen.insert(resource.name.clone(), address);
                }
            }
        }
        want.iter().all(|w| seen.contains_key(w)).then_some(())
    })
    .await?;
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_with_its_own_service_account_serves_a_node_and_manages_waypoints(
) -> anyhow::Result<()> {
    let Some(admin) = kube_client().await else { return Ok(()) };
    // The controller's warnings (a refused API call names what its role lacks) in the output.
    let _ = tracing_subscriber::fmt().with_env_filter("warn,controller=info").with_test_writer().try_init();
    install_gateway_crd(&admin).await?;
    install_istio_crds(&admin).await?;
    apply_controller_rbac(&admin).await?;
    ensure_service_account(&admin, CONTROLLER_NS, ZTUNNEL_SA).await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    let token =
        request_token(&admin, CONTROLLER_NS, CONTROLLER_SA, "https://kubernetes.default.svc", None, 3600)
            .await?;
    kubeconfig_with_token(&kubeconfig, &token)?;

    let config = Config {
        ca_dir: dir.path().join("ca"),
        listen: "127.0.0.1:0".parse()?,
        kubernetes: Some(KubeAccess::File(kubeconfig)),
        waypoints: WaypointOptions { resync: RESYNC, ..WaypointOptions::default() },
        ..Config::default()
    };
    let controller = Controller::bind(&config).await?;
    let endpoint = format!("http://{}", controller.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));

    // An ambient namespace, two pods on this test's node and one elsewhere, a Service.
    let node = unique_name("node");
    let ns = ambient_namespace(&admin, "acceptance").await?;
    let pods = Api::<Pod>::namespaced(admin.clone(), &ns);
    create_running_pod(&pods, &pod("web-0", &node, "web"), "10.60.1.5").await?;
    create_running_pod(&pods, &pod("web-1", &node, "web"), "10.60.1.6").await?;
    create_running_pod(&pods, &pod("elsewhere", &unique_name("node"), "web"), "10.60.2.5").await?;
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": { "selector": { "app": "web" }, "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] }
    }))?;
    Api::<Service>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &service).await?;

    // The node's ztunnel: a pod of the ztunnel service account, and its token.
    let zt = create_running_pod(
        &Api::namespaced(admin.clone(), CONTROLLER_NS),
        &pod(&unique_name("ztunnel"), &node, ZTUNNEL_SA),
        "192.168.0.30",
    )
    .await?;
    let zt_token =
        request_token(&admin, CONTROLLER_NS, ZTUNNEL_SA, ISTIO_CA_AUDIENCE, Some(&zt), 600).await?;
    let node_id = format!("ztunnel~192.168.0.30~ztunnel-x.{CONTROLLER_NS}~{CONTROLLER_NS}.svc.cluster.local");

    // xDS, like the CA, wants that token, and for the node it names only.
    let refusal = Ads::refusal(endpoint.clone(), &node_id, &node, None, WAIT).await;
    assert!(refusal.contains("xDS needs the node's token"), "{refusal}");
    let other_node = unique_name("node");
    let refusal = Ads::refusal(endpoint.clone(), &node_id, &other_node, Some(&zt_token), WAIT).await;
    assert!(refusal.contains("but the stream's NODE_NAME is"), "{refusal}");

    let started = Instant::now();
    let mut ads = Ads::subscribe(endpoint.clone(), &node_id, &node, Some(&zt_token)).await?;
    let uid = |name: &str| format!("Kubernetes//Pod/{ns}/{name}");
    let service_name = format!("{ns}/web.{ns}.svc.cluster.local");
    let received = until_received(&mut ads, &[uid("web-0"), uid("web-1"), service_name.clone()]).await?;
    eprintln!("the node's workloads and the Service over xDS {:?} after subscribing", started.elapsed());
    for name in ["web-0", "web-1"] {
        let Some(address::Type::Workload(w)) = received[&uid(name)].r#type.clone() else {
            bail!("{name}: not a workload")
        };
        assert_eq!(w.tunnel_protocol, TunnelProtocol::Hbone as i32, "{name} is in an ambient namespace");
        assert_eq!(w.node, node);
    }
    assert!(matches!(received[&service_name].r#type, Some(address::Type::Service(_))));

    // A ztunnel of that node gets its pods' certificates through TokenReview done with the
    // controller's own credentials.
    let ca = CaClient::new(
        &ControlPlane::plaintext(&endpoint).unwrap(),
        Token::Static(zt_token),
        Duration::from_secs(3600),
    );
    let web = Identity::new("cluster.local", &ns, "web")?;
    let cert =
        eventually("the ztunnel's certificate for web", WAIT, || async { Ok(ca.fetch(&web).await.ok()) })
            .await?;
    assert_eq!(cert.identity(), &web);

    // A waypoint, managed with the same credentials.
    let gateway = create_gateway(&admin, &ns, "waypoint", resources::WAYPOINT_CLASS).await?;
    check_made(&admin, &gateway).await?;
    gateways(&admin, &ns).delete("waypoint", &DeleteParams::default()).await?;
    eventually("the waypoint objects deleted with the Gateway", WAIT, || none_left(&admin, &ns, "waypoint"))
        .await?;

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), running).await???;
    Ok(())
}

// --- RBAC, proven with kubectl auth can-i ---------------------------------------------------------

/// `kubectl auth can-i VERB RESOURCE [--subresource S] --all-namespaces --as USER`: allowed?
fn can_i(kubectl: &std::path::Path, user: &str, verb: &str, resource: &str) -> anyhow::Result<bool> {
    let kubeconfig = std::env::var_os(KUBECONFIG_ENV).context("no test apiserver")?;
    let mut command = Command::new(kubectl);
    command.arg("--kubeconfig").arg(kubeconfig).args(["auth", "can-i", verb]);
    // kubectl reads `RESOURCE/X` as a resource name; a subresource is its own flag.
    match resource.split_once('/') {
        Some((resource, sub)) => command.args([resource, "--subresource", sub]),
        None => command.arg(resource),
    };
    let out = command.args(["--all-namespaces", "--as", user]).output().context("running kubectl")?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match (out.status.code(), answer.as_str()) {
        (Some(0), "yes") => Ok(true),
        (Some(1), "no") => Ok(false),
        _ => bail!(
            "kubectl auth can-i {verb} {resource} --as {user}: exit {:?}, stdout {answer:?}, stderr {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_allows_the_controller_exactly_what_it_needs_and_ztunnel_nothing() -> anyhow::Result<()> {
    let Some(admin) = kube_client().await else { return Ok(()) };
    // scripts/setup.sh installs kubectl (with helm) into /usr/local/bin.
    let kubectl = std::path::PathBuf::from("kubectl");
    let found =
        Command::new(&kubectl).args(["version", "--client"]).output().is_ok_and(|o| o.status.success());
    if !weft_core::testing::prerequisites(
        "RBAC test",
        (!found).then(|| "no kubectl on PATH (scripts/setup.sh installs it)".into()),
    ) {
        return Ok(());
    }
    // kubectl resolves resource names through discovery: the CRDs must be there.
    install_gateway_crd(&admin).await?;
    install_istio_crds(&admin).await?;
    apply_controller_rbac(&admin).await?;
    ensure_service_account(&admin, CONTROLLER_NS, ZTUNNEL_SA).await?;
    let controller = format!("system:serviceaccount:{CONTROLLER_NS}:{CONTROLLER_SA}");
    let ztunnel = format!("system:serviceaccount:{CONTROLLER_NS}:{ZTUNNEL_SA}");

    // (user, verb, resource, allowed)
    let mut table: Vec<(&str, &str, &str, bool)> = Vec::new();
    for resource in [
        "namespaces",
        "pods",
        "services",
        "virtualservices.networking.istio.io",
        "destinationrules.networking.istio.io",
        "gateways.networking.istio.io",
        "serviceentries.networking.istio.io",
        "authorizationpolicies.security.istio.io",
        "peerauthentications.security.istio.io",
        "requestauthentications.security.istio.io",
        "telemetries.telemetry.istio.io",
        "gateways.gateway.networking.k8s.io",
    ] {
        for verb in ["get", "list", "watch"] {
            table.push((&controller, verb, resource, true));
        }
    }
    table.extend([
        (controller.as_str(), "create", "tokenreviews.authentication.k8s.io", true),
        (&controller, "patch", "gateways.gateway.networking.k8s.io/status", true),
        (&controller, "create", "deployments.apps", true),
        (&controller, "patch", "deployments.apps", true),
        (&controller, "delete", "deployments.apps", true),
        (&controller, "list", "deployments.apps", true),
        (&controller, "watch", "deployments.apps", true),
        (&controller, "create", "services", true),
        (&controller, "patch", "services", true),
        (&controller, "delete", "services", true),
        (&controller, "create", "serviceaccounts", true),
        (&controller, "patch", "serviceaccounts", true),
        (&controller, "delete", "serviceaccounts", true),
        (&controller, "list", "serviceaccounts", true),
        // The mesh roots, published in every namespace by server-side apply.
        (&controller, "create", "configmaps", true),
        (&controller, "patch", "configmaps", true),
        // Not needed, so not granted (Secrets: only in its own namespace, by the Role).
        (&controller, "get", "secrets", false),
        (&controller, "list", "secrets", false),
        (&controller, "create", "pods", false),
        (&controller, "delete", "pods", false),
        (&controller, "patch", "pods", false),
        (&controller, "update", "pods/status", false),
        (&controller, "update", "deployments.apps", false),
        (&controller, "update", "services", false),
        (&controller, "create", "serviceaccounts/token", false),
        (&controller, "patch", "gateways.gateway.networking.k8s.io", false),
        (&controller, "update", "gateways.gateway.networking.k8s.io", false),
        (&controller, "delete", "gateways.gateway.networking.k8s.io", false),
        (&controller, "create", "gateways.gateway.networking.k8s.io", false),
        (&controller, "patch", "virtualservices.networking.istio.io", false),
        (&controller, "patch", "namespaces", false),
        (&controller, "list", "configmaps", false),
        (&controller, "list", "nodes", false),
        (&controller, "create", "subjectaccessreviews.authorization.k8s.io", false),
        (&controller, "impersonate", "users", false),
        (&controller, "escalate", "clusterroles.rbac.authorization.k8s.io", false),
        (&controller, "bind", "clusterroles.rbac.authorization.k8s.io", false),
        // ztunnel needs nothing beyond its own token.
        (&ztunnel, "get", "secrets", false),
        (&ztunnel, "list", "secrets", false),
        (&ztunnel, "list", "pods", false),
        (&ztunnel, "get", "pods", false),
        (&ztunnel, "watch", "pods", false),
        (&ztunnel, "list", "services", false),
        (&ztunnel, "create", "tokenreviews.authentication.k8s.io", false),
        (&ztunnel, "create", "serviceaccounts/token", false),
    ]);

    let started = Instant::now();
    let mut wrong = Vec::new();
    for (user, verb, resource, want) in &table {
        let got = can_i(&kubectl, user, verb, resource)?;
        if got != *want {
            wrong.push(format!("{user} {verb} {resource}: got {got}, want {want}"));
        }
    }
    eprintln!("{} kubectl auth can-i checks in {:?}", table.len(), started.elapsed());
    assert!(wrong.is_empty(), "RBAC differs from the table:\n{}", wrong.join("\n"));
    Ok(())
}
