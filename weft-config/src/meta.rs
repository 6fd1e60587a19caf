//! What every object carries (`metadata`) and the selectors and references the kinds share.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Labels and annotations: string to string, as Kubernetes stores them.
pub type Labels = BTreeMap<String, String>;

/// Kubernetes `ObjectMeta`, the fields Weft reads plus the ones the API server adds (accepted so
/// that `kubectl get -o yaml` output decodes without warnings, and otherwise unused).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    /// Filled in by the decoder for namespaced kinds (the caller's default, else `default`);
    /// empty for cluster-scoped kinds.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub resource_version: Option<String>,
    #[serde(default)]
    pub generation: Option<i64>,
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
    #[serde(default)]
    pub generate_name: Option<String>,
    #[serde(default)]
    pub finalizers: Vec<String>,
    #[serde(default)]
    pub owner_references: Vec<serde_json::Value>,
    #[serde(default)]
    pub managed_fields: Vec<serde_json::Value>,
    #[serde(default)]
    pub self_link: Option<String>,
    #[serde(default)]
    pub deletion_grace_period_seconds: Option<i64>,
}

/// Istio's `WorkloadSelector` (`selector:` of the security kinds and Telemetry).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

impl WorkloadSelector {
    /// Whether every label of the selector is on `labels` (an empty selector selects all).
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Istio's `PolicyTargetReference` (`targetRef`/`targetRefs`): a Gateway API style reference.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    /// Must be empty or the policy's own namespace.
    #[serde(default)]
    pub namespace: String,
}

/// Renders labels as `k=v,k2=v2` (for messages).
pub fn labels_to_string(labels: &Labels) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}
