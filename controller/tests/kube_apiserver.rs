//! What the controller will rely on from a real kube-apiserver (v1.20.2, started by
//! `scripts/test.sh`), checked through kube-rs the way the controller talks to it: ambient
//! namespaces, Pods whose status a test writes itself, Services with cluster IPs, Istio's
//! VirtualService CRD in all its served versions, watches, and service-account tokens that
//! TokenReview authenticates. Skips without `WEFT_TEST_KUBECONFIG` (fails in CI).

mod support;

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;

use support::{ambient_namespace, eventually, kube_client, kube_config, pod, DATAPLANE_MODE_LABEL};

/// Bound on every wait for the apiserver to act.
const WAIT: Duration = Duration::from_secs(30);
const ISTIO_NETWORKING: &str = "networking.istio.io";
const VIRTUAL_SERVICE_CRD: &str = "virtualservices.networking.istio.io";
/// The audience Istio's CA expects on the tokens ztunnel presents.
const ISTIO_CA_AUDIENCE: &str = "istio-ca";

/// Playing the kubelet: the apiserver never runs the pod, so the test reports it running.
async fn report_running(pods: &Api<Pod>, name: &str, ip: &str) -> anyhow::Result<Pod> {
    let status = json!({
        "status": {
            "phase": "Running",
            "hostIP": "192.168.0.10",
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
        }
    });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("patching the status of pod {name}"))
}

fn virtual_service_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(ISTIO_NETWORKING, version, "VirtualService"),
        "virtualservices",
    )
}

/// Istio's VirtualService CRD as Istio ships it in shape: three served versions with no
/// conversion between them, v1 stored, the spec left unvalidated.
fn virtual_service_crd() -> anyhow::Result<CustomResourceDefinition> {
    let schema = json!({
        "openAPIV3Schema": {
            "type": "object",
            "properties": {
                "spec": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
                "status": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
            },
        }
    });
    let version = |name: &str, storage: bool| {
        json!({
            "name": name,
            "served": true,
            "storage": storage,
            "schema": schema,
            "subresources": { "status": {} },
        })
    };
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": VIRTUAL_SERVICE_CRD },
        "spec": {
            "group": ISTIO_NETWORKING,
            "names": {
                "kind": "VirtualService",
                "listKind": "VirtualServiceList",
                "plural": "virtualservices",
                "singular": "virtualservice",
                "shortNames": ["vs"],
                "categories": ["istio-io", "networking-istio-io"],
            },
            "scope": "Namespaced",
            "versions": [version("v1", true), version("v1beta1", false), version("v1alpha3", false)],
        }
    });
    serde_json::from_value(crd).context("the VirtualService CRD does not deserialize")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_keeps_its_ambient_label() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    let name = ambient_namespace(&client, "ambient").await?;

    let namespace = Api::<Namespace>::all(client).get(&name).await?;
    let labels = namespace.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get(DATAPLANE_MODE_LABEL).map(String::as_str), Some("ambient"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_requests_are_refused() -> anyhow::Result<()> {
    let Some(mut config) = kube_config().await else { return Ok(()) };
    config.auth_info = Default::default();
    let anonymous = Client::try_from(config)?;

    let err = Api::<Namespace>::all(anonymous)
        .list(&Default::default())
        .await
        .expect_err("an anonymous list of namespaces must fail");
    let kube::Error::Api(status) = &err else { panic!("expected an API error status, got {err}") };
    assert!(matches!(status.code, 401 | 403), "{status:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_status_is_written_through_the_status_subresource() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    let ns = ambient_namespace(&client, "pod-status").await?;
    let pods = Api::<Pod>::namespaced(client, &ns);

    let created = pods.create(&PostParams::default(), &pod("web-0", "node-a", "web")).await?;
    assert!(created.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_none());
    report_running(&pods, "web-0", "10.244.1.5").await?;

    let pod = pods.get("web-0").await?;
    assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("node-a"));
    let status = pod.status.context("pod has no status")?;
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.5"));
    assert_eq!(status.host_ip.as_deref(), Some("192.168.0.10"));
    let pod_ips: Vec<_> = status.pod_ips.unwrap_or_default().into_iter().map(|ip| ip.ip).collect();
    assert_eq!(pod_ips, ["10.244.1.5"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_gets_a_cluster_ip() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    let ns = ambient_namespace(&client, "service").await?;
    let services = Api::<Service>::namespaced(client, &ns);

    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": {
            "selector": { "app": "web" },
            "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }],
        }
    }))?;
    let created = services.create(&PostParams::default(), &service).await?;

    let spec = created.spec.context("service has no spec")?;
    let cluster_ip = spec.cluster_ip.context("no clusterIP assigned")?;
    let ip: IpAddr = cluster_ip.parse().with_context(|| format!("clusterIP {cluster_ip:?}"))?;
    assert!(ip.is_ipv4(), "{ip}");
    assert_eq!(spec.cluster_ips, Some(vec![cluster_ip.clone()]));
    assert_eq!(services.get("web").await?.spec.and_then(|s| s.cluster_ip), Some(cluster_ip));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_service_is_served_in_every_istio_version() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    // Cluster-scoped and shared by the run: server-side apply makes a second apply a no-op.
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.patch(
        VIRTUAL_SERVICE_CRD,
        &PatchParams::apply("weft-tests").force(),
        &Patch::Apply(virtual_service_crd()?),
    )
    .await
    .context("applying the VirtualService CRD")?;
    tokio::time::timeout(WAIT, await_condition(crds, VIRTUAL_SERVICE_CRD, conditions::is_crd_established()))
        .await
        .context("the VirtualService CRD did not become Established")??;

    let ns = ambient_namespace(&client, "virtual-service").await?;
    let v1 = virtual_service_resource("v1");
    let spec = json!({
        "hosts": ["reviews"],
        "http": [{
            "match": [{ "headers": { "end-user": { "exact": "jason" } } }],
            "route": [{ "destination": { "host": "reviews", "subset": "v2" }, "weight": 100 }],
        }],
    });
    let object = DynamicObject::new("reviews", &v1).within(&ns).data(json!({ "spec": spec }));
    let v1_api = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &v1);
    // Established can precede the moment the new group is served everywhere: retry a 404.
    eventually("creating a v1 VirtualService", WAIT, || async {
        match v1_api.create(&PostParams::default(), &object).await {
            Ok(created) => Ok(Some(created)),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await?;

    for version in ["v1", "v1beta1", "v1alpha3"] {
        let resource = virtual_service_resource(version);
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &resource);
        let read = api.get("reviews").await.with_context(|| format!("reading through {version}"))?;
        let api_version = read.types.as_ref().map(|t| t.api_version.as_str());
        assert_eq!(api_version, Some(format!("{ISTIO_NETWORKING}/{version}").as_str()));
        assert_eq!(read.data["spec"], spec, "spec read through {version}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_watcher_sees_an_update_made_after_it_started() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    let ns = ambient_namespace(&client, "watch").await?;
    let pods = Api::<Pod>::namespaced(client, &ns);
    pods.create(&PostParams::default(), &pod("web-0", "node-a", "web")).await?;

    let mut events = watcher(pods.clone(), watcher::Config::default()).boxed();
    let listed = tokio::time::timeout(WAIT, async {
        let mut listed = Vec::new();
        while let Some(event) = events.try_next().await? {
            match event {
                watcher::Event::InitApply(pod) => listed.push(pod.metadata.name.unwrap_or_default()),
                watcher::Event::InitDone => return anyhow::Ok(listed),
                _ => {}
            }
        }
        anyhow::bail!("the watch stream ended during the initial list")
    })
    .await
    .context("the watcher's initial list did not finish")??;
    assert_eq!(listed, ["web-0"]);

    report_running(&pods, "web-0", "10.244.1.7").await?;
    let seen = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.try_next().await? {
            if let watcher::Event::Apply(pod) = event {
                if pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some("10.244.1.7") {
                    return anyhow::Ok(pod);
                }
            }
        }
        anyhow::bail!("the watch stream ended before the update")
    })
    .await
    .context("the watcher did not report the status update")??;
    assert_eq!(seen.metadata.name.as_deref(), Some("web-0"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_pod_token_passes_token_review() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    let ns = ambient_namespace(&client, "token").await?;
    // Without a token controller nothing creates service accounts: the test does.
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
    let account = ServiceAccount {
        metadata: ObjectMeta { name: Some("web".to_owned()), ..ObjectMeta::default() },
        ..ServiceAccount::default()
    };
    accounts.create(&PostParams::default(), &account).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let web = pods.create(&PostParams::default(), &pod("web-0", "node-a", "web")).await?;

    // What a projected service-account token volume holds: bound to the pod, for Istio's CA.
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![ISTIO_CA_AUDIENCE.to_owned()],
            expiration_seconds: Some(600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some("web-0".to_owned()),
                uid: web.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let issued = accounts.create_token_request("web", &PostParams::default(), &request).await?;
    let token = issued.status.context("TokenRequest has no status")?.token;
    assert!(!token.is_empty());

    let reviews = Api::<TokenReview>::all(client);
    let review = |token: &str, audience: &str| TokenReview {
        spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![audience.to_owned()]) },
        ..TokenReview::default()
    };
    let reviewed = reviews.create(&PostParams::default(), &review(&token, ISTIO_CA_AUDIENCE)).await?;
    let status = reviewed.status.context("TokenReview has no status")?;
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(status.audiences, Some(vec![ISTIO_CA_AUDIENCE.to_owned()]));
    let user = status.user.context("authenticated TokenReview without a user")?;
    assert_eq!(user.username, Some(format!("system:serviceaccount:{ns}:web")));
    let groups = user.groups.unwrap_or_default();
    assert!(groups.contains(&format!("system:serviceaccounts:{ns}")), "{groups:?}");
    let extra = user.extra.unwrap_or_default();
    assert_eq!(extra.get("authentication.kubernetes.io/pod-name"), Some(&vec!["web-0".to_owned()]));
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-uid"),
        web.metadata.uid.map(|uid| vec![uid]).as_ref()
    );

    // Neither another audience nor a forged signature passes.
    let other_audience = reviews.create(&PostParams::default(), &review(&token, "other")).await?;
    assert_ne!(other_audience.status.and_then(|s| s.authenticated), Some(true));
    let (unsigned, _signature) = token.rsplit_once('.').context("token is not a JWT")?;
    let forged = format!("{unsigned}.AAAA");
    let forged_review = reviews.create(&PostParams::default(), &review(&forged, ISTIO_CA_AUDIENCE)).await?;
    assert_ne!(forged_review.status.and_then(|s| s.authenticated), Some(true));
    Ok(())
}
