//! The trust bundle in every namespace, as istiod publishes it: a ConfigMap
//! `istio-ca-root-cert` with the roots' PEM under `root-cert.pem`, labelled
//! `istio.io/config: "true"` (ztunnel and waypoints mount it to verify the controller's TLS).
//! Written by server-side apply (field manager [`FIELD_MANAGER`]), so a ConfigMap of that name that
//! someone else made keeps its other keys and labels; never deleted. Written when a namespace
//! appears, when the roots change, and every [`RESYNC`] (which repairs edits and deletions).
//! Skips Kubernetes' own namespaces (as istiod does) and namespaces being deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;
use weft_core::tls::CertificateAuthority;

/// The ConfigMap's name in every namespace.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// The key holding the roots, PEM.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// The label istiod puts on it.
pub const ISTIO_CONFIG_LABEL: &str = "istio.io/config";
/// The field manager of every write.
pub const FIELD_MANAGER: &str = crate::waypoints::FIELD_MANAGER;
/// Namespaces that get no ConfigMap (istiod's list).
pub const SKIPPED_NAMESPACES: &[&str] =
    &["kube-system", "kube-public", "kube-node-lease", "local-path-storage"];
/// Every namespace is written again this often.
pub const RESYNC: Duration = Duration::from_secs(5 * 60);
/// A failed write is retried after this long.
const RETRY: Duration = Duration::from_secs(5);
/// Bound on one API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The ConfigMap for `namespace` holding `roots_pem`: only what Weft owns of it.
pub fn configmap(namespace: &str, roots_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOT_CONFIGMAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(ISTIO_CONFIG_LABEL.to_owned(), "true".to_owned())])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(ROOT_CERT_KEY.to_owned(), roots_pem.to_owned())])),
        ..ConfigMap::default()
    }
}

/// Whether `namespace` gets the ConfigMap.
fn wanted(namespace: &Namespace) -> bool {
    let terminating = namespace.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating")
        || namespace.metadata.deletion_timestamp.is_some();
    !terminating && !SKIPPED_NAMESPACES.contains(&namespace.name_any().as_str())
}

/// Keeps the ConfigMap in every namespace current with `ca`'s roots until the future is dropped
/// (or `ca`'s sender is). Failures are logged and retried.
pub async fn run(client: Client, mut ca: watch::Receiver<Arc<CertificateAuthority>>) {
    let namespaces = Api::<Namespace>::all(client.clone());
    let mut events = watcher::watcher(namespaces, watcher::Config::default()).default_backoff().boxed();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut relist: Option<BTreeSet<String>> = None;
    // What each namespace was last given.
    let mut written: BTreeMap<String, String> = BTreeMap::new();
    let mut failed: BTreeSet<String> = BTreeSet::new();
    let mut retry_at: Option<Instant> = None;
    let mut resync = tokio::time::interval_at(Instant::now() + RESYNC, RESYNC);
    let mut watch_failing = false;
    let mut roots_pem = ca.borrow_and_update().root_pem().to_owned();
    loop {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Err(e)) => {
                    if !watch_failing {
                        tracing::warn!(error = %e, "cannot watch namespaces to publish the CA roots; retrying (may the controller list and watch namespaces?)");
                        watch_failing = true;
                    }
                }
                Some(Ok(event)) => {
                    watch_failing = false;
                    match event {
                        Event::Init => relist = Some(BTreeSet::new()),
                        Event::InitApply(ns) => {
                            if wanted(&ns) {
                                relist.get_or_insert_with(BTreeSet::new).insert(ns.name_any());
                            }
                        }
                        Event::InitDone => {
                            known = relist.take().unwrap_or_default();
                            written.retain(|ns, _| known.contains(ns));
                        }
                        Event::Apply(ns) => {
                            if wanted(&ns) {
                                known.insert(ns.name_any());
                            } else {
                                known.remove(&ns.name_any());
                            }
                        }
                        Event::Delete(ns) => {
                            known.remove(&ns.name_any());
                            written.remove(&ns.name_any());
                        }
                    }
                }
            },
            changed = ca.changed() => {
                if changed.is_err() {
                    return;
                }
                roots_pem = ca.borrow_and_update().root_pem().to_owned();
            }
            _ = resync.tick() => written.clear(),
            () = retry => {
                retry_at = None;
                for ns in std::mem::take(&mut failed) {
                    written.remove(&ns);
                }
            }
        }
        if relist.is_some() {
            // Write once the relist is complete.
            continue;
        }
        for ns in &known {
            if written.get(ns) == Some(&roots_pem) {
                continue;
            }
            let api = Api::<ConfigMap>::namespaced(client.clone(), ns);
            let object = configmap(ns, &roots_pem);
            let result = tokio::time::timeout(
                CALL_TIMEOUT,
                api.patch(ROOT_CONFIGMAP, &params, &Patch::Apply(&object)),
            )
            .await;
            let error = match result {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {CALL_TIMEOUT:?}")),
            };
            // Written or not, don't try again before the retry.
            written.insert(ns.clone(), roots_pem.clone());
            if let Some(error) = error {
                if failed.insert(ns.clone()) {
                    tracing::warn!(
                        namespace = %ns,
                        configmap = ROOT_CONFIGMAP,
                        %error,
                        "cannot publish the CA roots; retrying (may the controller create and patch configmaps?)"
                    );
                }
                retry_at.get_or_insert(Instant::now() + RETRY);
            } else {
                tracing::debug!(namespace = %ns, configmap = ROOT_CONFIGMAP, "published the CA roots");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configmap_is_istiods() {
        let cm = configmap("shop", "PEM");
        assert_eq!(cm.metadata.name.as_deref(), Some("istio-ca-root-cert"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(cm.labels().get("istio.io/config").map(String::as_str), Some("true"));
        assert_eq!(cm.data.unwrap()["root-cert.pem"], "PEM");
    }

    #[test]
    fn skips_system_and_terminating_namespaces() {
        let ns = |name: &str, phase: Option<&str>| Namespace {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
            status: phase.map(|p| k8s_openapi::api::core::v1::NamespaceStatus {
                phase: Some(p.to_owned()),
                ..Default::default()
            }),
            ..Namespace::default()
        };
        assert!(wanted(&ns("shop", None)));
        assert!(wanted(&ns("shop", Some("Active"))));
        assert!(!wanted(&ns("shop", Some("Terminating"))));
        assert!(!wanted(&ns("kube-system", None)));
    }
}
