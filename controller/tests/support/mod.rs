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
