//! `weft waypoint apply` and `weft check` against the real kube-apiserver the test run starts
//! (`WEFT_TEST_KUBECONFIG`, set by scripts/test.sh), with the chart's CRDs applied.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};

/// The test apiserver's kubeconfig, or `None` (the test then passes with a note, except under
/// CI=true, where it fails).
fn kubeconfig() -> Option<PathBuf> {
    let path = std::env::var_os("WEFT_TEST_KUBECONFIG").map(PathBuf::from);
    let problem = path.is_none().then(|| {
        "WEFT_TEST_KUBECONFIG is not set: scripts/test.sh starts the kube-apiserver and sets it".into()
    });
    weft_core::testing::prerequisites("weft k8s test", problem).then_some(path).flatten()
}

fn weft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft"))
}

/// Applies the chart's CRDs (server-side apply, so it is idempotent) and waits until the
/// API serves each of them.
async fn apply_crds(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../daemonset/manifests");
    for file in ["crds-istio.yaml", "crds-gateway-api.yaml"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for doc in text.split("\n---").filter(|d| d.contains("kind: CustomResourceDefinition")) {
            let crd: CustomResourceDefinition = serde_yaml::from_str(doc).unwrap();
            let name = crd.metadata.name.clone().unwrap();
            crds.patch(&name, &PatchParams::apply("weft-test").force(), &Patch::Apply(&crd)).await.unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in weft::k8s::CRDS {
        loop {
            let established = crds.get(name).await.ok().and_then(|c| c.status).is_some_and(|s| {
                s.conditions
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            assert!(Instant::now() < deadline, "CRD {name} not established");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn waypoint_apply_writes_the_gateway_and_labels_the_namespace_and_check_passes() {
    let Some(kubeconfig) = kubeconfig() else { return };
    let client = weft::k8s::client(Some(&kubeconfig)).await.unwrap();
    apply_crds(&client).await;

    // The cluster checks pass once the CRDs are in.
    let out = weft().args(["check", "--cluster-only", "--kubeconfig"]).arg(&kubeconfig).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("ok   api-server") && text.contains("ok   crds"), "{text}");

    let ns = format!("wp-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut object = Namespace::default();
    object.metadata.name = Some(ns.clone());
    namespaces.create(&PostParams::default(), &object).await.unwrap();

    for _ in 0..2 {
        // Twice: applying again changes nothing and still succeeds.
        let out =
            weft().args(["waypoint", "apply", "-n", &ns, "--kubeconfig"]).arg(&kubeconfig).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains(&format!("waypoint {ns}/waypoint applied")), "{text}");
    }
    let resource = ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    };
    let gateways: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let gateway = gateways.get("waypoint").await.unwrap();
    assert_eq!(gateway.data["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(gateway.data["spec"]["listeners"][0]["port"], 15008);
    assert_eq!(gateway.data["spec"]["listeners"][0]["protocol"], "HBONE");
    let labels = namespaces.get(&ns).await.unwrap().metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("istio.io/use-waypoint").map(String::as_str), Some("waypoint"));

    // A namespace that does not exist is an error naming it.
    let out = weft()
        .args(["waypoint", "apply", "-n", "no-such-namespace-xyz", "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-namespace-xyz"), "{err}");

    let _ = gateways.delete("waypoint", &DeleteParams::default()).await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
