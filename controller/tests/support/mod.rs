//! Helpers for tests against the real kube-apiserver that `scripts/test.sh` starts
//! (`scripts/kube-apiserver/start.sh`) and names in `WEFT_TEST_KUBECONFIG`. Without that variable
//! the tests skip, except in CI, where a missing apiserver is a failure.
//! The apiserver is shared by every test of a run and nothing finishes deleting a namespace on it,
//! so each test works in namespaces of its own, named by `unique_name`.

// Each test binary that includes this module uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use weft_core::proto::envoy::config::core::v3::Node;
use weft_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_core::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

/// The kubeconfig of the test apiserver (written by `scripts/kube-apiserver/start.sh`).
pub const KUBECONFIG_ENV: &str = "WEFT_TEST_KUBECONFIG";
/// The label that puts a namespace's pods into the ambient mesh.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// The client config for the test apiserver, or `None` (after a notice) when there is none and
/// this is not CI. Panics in CI without one, and whenever the kubeconfig named is unusable.
pub async fn kube_config() -> Option<Config> {
    let Some(path) = std::env::var_os(KUBECONFIG_ENV) else {
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            panic!(
                "{KUBECONFIG_ENV} is not set: CI requires the real kube-apiserver; run the tests \
                 through scripts/test.sh, which builds and starts it"
            );
        }
        eprintln!(
            "SKIPPED: {KUBECONFIG_ENV} is not set, so there is no kube-apiserver to test against \
             (scripts/test.sh starts one; or run scripts/kube-apiserver/start.sh STATE_DIR and set \
             {KUBECONFIG_ENV}=STATE_DIR/kubeconfig)"
        );
        return None;
    };
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("{KUBECONFIG_ENV}={}: {e}", path.to_string_lossy()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{KUBECONFIG_ENV}={}: {e}", path.to_string_lossy()));
    Some(config)
}

/// A client of the test apiserver with the admin token, or `None` when the test should skip
/// (see [`kube_config`]).
pub async fn kube_client() -> Option<Client> {
    let config = kube_config().await?;
    Some(Client::try_from(config).unwrap_or_else(|e| panic!("kube client for the test apiserver: {e}")))
}

/// A DNS-label name that no other test, in this run or an earlier one against the same
/// apiserver, has used: `prefix-<pid>-<time>-<counter>`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name = format!(
        "{prefix}-{:x}-{:x}-{}",
        std::process::id(),
        nanos & 0xff_ffff_ffff,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    assert!(name.len() <= 63, "{name} is longer than a DNS label");
    name
}

/// Creates a fresh namespace enrolled in the ambient mesh and returns its name.
pub async fn ambient_namespace(client: &Client, prefix: &str) -> anyhow::Result<String> {
    let name = unique_name(prefix);
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([(DATAPLANE_MODE_LABEL.to_owned(), "ambient".to_owned())])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(name)
}

/// Calls `attempt` every 100 ms until it returns `Ok(Some(_))`, for at most `timeout`; the last
/// error (or "still None") is in the failure.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match attempt().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "condition not met yet".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("{what}: not done within {timeout:?}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pod on `node` running as `service_account`, labelled app=web (not running until a test
/// writes its status: there is no kubelet).
pub fn pod(name: &str, node: &str, service_account: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([("app".to_owned(), "web".to_owned())])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            service_account_name: Some(service_account.to_owned()),
            containers: vec![Container {
                name: "app".to_owned(),
                image: Some("registry.invalid/web:1".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// The audience of the tokens ztunnel presents to the CA (Istio's).
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";

/// Creates `object` unless one of that name exists (another test of the run made it); either way
/// the object is there afterwards.
pub async fn create_if_absent<K>(api: &Api<K>, object: &K) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e).context("creating a shared object"),
    }
}

/// Makes sure namespace `name` exists (not ambient unless a test labels it).
pub async fn ensure_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let namespace = Namespace {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
        ..Namespace::default()
    };
    create_if_absent(&Api::<Namespace>::all(client.clone()), &namespace).await
}

/// Makes sure service account `ns/name` exists (no controller creates them on the test apiserver).
pub async fn ensure_service_account(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let account = k8s_openapi::api::core::v1::ServiceAccount {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
        ..Default::default()
    };
    create_if_absent(&Api::namespaced(client.clone(), ns), &account).await
}

/// A token for service account `ns/account` from the TokenRequest API (the test apiserver has no
/// token controller), for `audience`, bound to `pod` when given (as a projected volume's token is).
pub async fn request_token(
    client: &Client,
    ns: &str,
    account: &str,
    audience: &str,
    pod: Option<&Pod>,
    expiration_seconds: i64,
) -> anyhow::Result<String> {
    use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: pod.map(|pod| BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let accounts = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), ns);
    let issued = accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for {ns}/{account}"))?;
    Ok(issued.status.context("TokenRequest has no status")?.token)
}

/// Creates a pod and, playing the kubelet, reports it running with `ip`; returns it.
pub async fn create_running_pod(pods: &Api<Pod>, pod: &Pod, ip: &str) -> anyhow::Result<Pod> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    pods.create(&PostParams::default(), pod).await.with_context(|| format!("creating pod {name}"))?;
    let status =
        serde_json::json!({ "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] } });
    pods.patch_status(&name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&status))
        .await
        .with_context(|| format!("patching the status of pod {name}"))
}

/// The test apiserver's kubeconfig with `token` as the user's credential: what a component
/// running out of cluster as that service account uses. Written to `path`.
pub fn kubeconfig_with_token(path: &std::path::Path, token: &str) -> anyhow::Result<()> {
    let admin = std::env::var_os(KUBECONFIG_ENV).context("no test apiserver")?;
    let mut kubeconfig = Kubeconfig::read_from(&admin)?;
    for named in &mut kubeconfig.auth_infos {
        if let Some(auth) = named.auth_info.as_mut() {
            auth.token = Some(token.to_owned().into());
        }
    }
    let text = serde_json::to_string(&kubeconfig)?;
    anyhow::ensure!(text.contains(token), "the kubeconfig lost the token when written");
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The state directory of the test apiserver (its kubeconfig's directory; start.sh keeps its
/// keys in `pki/` there).
pub fn apiserver_state_dir() -> Option<std::path::PathBuf> {
    let kubeconfig = std::path::PathBuf::from(std::env::var_os(KUBECONFIG_ENV)?);
    kubeconfig.parent().map(std::path::Path::to_path_buf)
}

/// The Gateway API's Gateway CRD, reduced to a structural schema of what Weft reads and writes
/// (the chart ships the real one): `v1` stored and `v1beta1` served, the status subresource.
pub fn gateway_crd() -> anyhow::Result<
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
> {
    let any = serde_json::json!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true });
    let schema = serde_json::json!({
        "openAPIV3Schema": {
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["gatewayClassName", "listeners"],
                    "properties": {
                        "gatewayClassName": { "type": "string", "minLength": 1 },
                        "listeners": { "type": "array", "minItems": 1, "items": any },
                        "addresses": { "type": "array", "items": any },
                        "infrastructure": any,
                    },
                },
                "status": {
                    "type": "object",
                    "properties": {
                        "addresses": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["value"],
                                "properties": { "type": { "type": "string" }, "value": { "type": "string" } },
                            },
                        },
                        "conditions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["lastTransitionTime", "message", "reason", "status", "type"],
                                "properties": {
                                    "type": { "type": "string" },
                                    "status": { "type": "string", "enum": ["True", "False", "Unknown"] },
                                    "reason": { "type": "string" },
                                    "message": { "type": "string" },
                                    "observedGeneration": { "type": "integer", "format": "int64" },
                                    "lastTransitionTime": { "type": "string", "format": "date-time" },
                                },
                            },
                        },
                        "listeners": { "type": "array", "items": any },
                    },
                },
            },
        }
    });
    let version = |name: &str, storage: bool| {
        serde_json::json!({
            "name": name, "served": true, "storage": storage,
            "schema": schema, "subresources": { "status": {} },
        })
    };
    let crd = serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "gateways.gateway.networking.k8s.io",
            // *.k8s.io groups need it; the value is the one the Gateway API's own CRDs carry.
            "annotations": { "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/2466" },
        },
        "spec": {
            "group": "gateway.networking.k8s.io",
            "names": { "kind": "Gateway", "listKind": "GatewayList", "plural": "gateways", "singular": "gateway", "shortNames": ["gtw"] },
            "scope": "Namespaced",
            "versions": [version("v1", true), version("v1beta1", false)],
        }
    });
    serde_json::from_value(crd).context("the Gateway CRD does not deserialize")
}

/// Installs the Gateway CRD unless one is there already (the chart's, from another test), and
/// waits until it is established.
pub async fn install_gateway_crd(client: &Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::runtime::wait::{await_condition, conditions};
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    create_if_absent(&crds, &gateway_crd()?).await?;
    let name = "gateways.gateway.networking.k8s.io";
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, name, conditions::is_crd_established()),
    )
    .await
    .context("the Gateway CRD did not become Established")??;
    Ok(())
}

/// The Istio kinds the controller watches: (group, kind, plural, served versions; v1 stored).
pub const ISTIO_KINDS: &[(&str, &str, &str, &[&str])] = &[
    ("networking.istio.io", "VirtualService", "virtualservices", &["v1", "v1beta1", "v1alpha3"]),
    ("networking.istio.io", "DestinationRule", "destinationrules", &["v1", "v1beta1", "v1alpha3"]),
    ("networking.istio.io", "Gateway", "gateways", &["v1", "v1beta1", "v1alpha3"]),
    ("networking.istio.io", "ServiceEntry", "serviceentries", &["v1", "v1beta1", "v1alpha3"]),
    ("security.istio.io", "AuthorizationPolicy", "authorizationpolicies", &["v1", "v1beta1"]),
    ("security.istio.io", "PeerAuthentication", "peerauthentications", &["v1", "v1beta1"]),
    ("security.istio.io", "RequestAuthentication", "requestauthentications", &["v1", "v1beta1"]),
    ("telemetry.istio.io", "Telemetry", "telemetries", &["v1", "v1alpha1"]),
];

/// Installs a CRD for every Istio kind the controller watches, unless one is there (as Istio
/// ships them in shape: every served version, v1 stored, the spec unvalidated).
pub async fn install_istio_crds(client: &Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::runtime::wait::{await_condition, conditions};
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let schema = serde_json::json!({
        "openAPIV3Schema": {
            "type": "object",
            "properties": {
                "spec": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
                "status": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
            },
        }
    });
    for (group, kind, plural, versions) in ISTIO_KINDS {
        let name = format!("{plural}.{group}");
        let versions: Vec<serde_json::Value> = versions
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v, "served": true, "storage": *v == "v1",
                    "schema": schema, "subresources": { "status": {} },
                })
            })
            .collect();
        let crd = serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": { "name": name },
            "spec": {
                "group": group,
                "names": {
                    "kind": kind,
                    "listKind": format!("{kind}List"),
                    "plural": plural,
                    "singular": kind.to_lowercase(),
                },
                "scope": "Namespaced",
                "versions": versions,
            }
        });
        create_if_absent(&crds, &serde_json::from_value(crd)?).await?;
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .with_context(|| format!("the {kind} CRD did not become Established"))??;
    }
    Ok(())
}

/// One delta ADS stream as a proxy opens it: a wildcard subscription to one type (Address, as a
/// ztunnel opens it, unless [`Ads::open`] says otherwise); every response is ACKed as it is read.
pub struct Ads {
    tx: tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Ads {
    /// Opens the stream to `endpoint` (`http://ip:port`) as the proxy `node_id` of `node_name`,
    /// presenting `token` as its bearer token.
    pub async fn subscribe(
        endpoint: String,
        node_id: &str,
        node_name: &str,
        token: Option<&str>,
    ) -> anyhow::Result<Ads> {
        let metadata = [(controller::xds::NODE_NAME_KEY, node_name)];
        Ads::open(endpoint, node_id, &metadata, controller::xds::ADDRESS_TYPE_URL, token).await
    }

    /// Opens the stream to `endpoint` as the proxy `node_id` with the string `metadata` given
    /// (e.g. `NODE_NAME`, a waypoint's `WAYPOINT_NAME`), subscribing to every resource of
    /// `type_url`, presenting `token` as its bearer token.
    pub async fn open(
        endpoint: String,
        node_id: &str,
        metadata: &[(&str, &str)],
        type_url: &str,
        token: Option<&str>,
    ) -> anyhow::Result<Ads> {
        use prost_types::value::Kind;
        let channel = tonic::transport::Channel::from_shared(endpoint)?.connect().await?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let fields = metadata
            .iter()
            .map(|(key, value)| {
                let value = prost_types::Value { kind: Some(Kind::StringValue((*value).to_owned())) };
                ((*key).to_owned(), value)
            })
            .collect();
        let node = Node {
            id: node_id.to_owned(),
            metadata: Some(prost_types::Struct { fields }),
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            node: Some(node),
            type_url: type_url.to_owned(),
            ..Default::default()
        })
        .await?;
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
        }
        let responses = client.delta_aggregated_resources(request).await?.into_inner();
        Ok(Ads { tx, responses })
    }

    /// Subscribes the stream to every resource of another type as well.
    pub async fn also(&self, type_url: &str) -> anyhow::Result<()> {
        self.tx.send(DeltaDiscoveryRequest { type_url: type_url.to_owned(), ..Default::default() }).await?;
        Ok(())
    }

    /// Why the server refuses a stream opened with these credentials (it fails if it does not
    /// refuse within `wait`). The refusal may come as the call's status or as the stream's.
    pub async fn refusal(
        endpoint: String,
        node_id: &str,
        node_name: &str,
        token: Option<&str>,
        wait: Duration,
    ) -> String {
        let err = match Ads::subscribe(endpoint, node_id, node_name, token).await {
            Err(e) => e,
            Ok(mut ads) => match ads.until("a refusal", wait, |_| Some(())).await {
                Err(e) => e,
                Ok(()) => panic!("the stream of {node_name} with token {token:?} was served"),
            },
        };
        format!("{err:#}")
    }

    /// Reads (and ACKs) responses until one satisfies `check`, for at most `wait`.
    pub async fn until<T>(
        &mut self,
        what: &str,
        wait: Duration,
        mut check: impl FnMut(&DeltaDiscoveryResponse) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let response = tokio::time::timeout_at(deadline, self.responses.message())
                .await
                .with_context(|| format!("no response with {what} within {wait:?}"))??
                .context("stream ended")?;
            self.tx
                .send(DeltaDiscoveryRequest {
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    ..Default::default()
                })
                .await?;
            if let Some(found) = check(&response) {
                return Ok(found);
            }
        }
    }
}
