//! PeerAuthentication as ztunnel receives it in Istio: not a resource of its own, but DENY
//! `Authorization`s that refuse callers without a peer identity (plaintext), listed by name on the
//! workloads they govern.
//!
//! Each workload's mode follows Istio's precedence: the workload-selector PeerAuthentication that
//! selects it (the oldest if several), then its namespace's (no selector), then the mesh's (root
//! namespace, no selector), else PERMISSIVE; `UNSET` inherits from the next scope. Port-level
//! modes (workload-selector policies only) override the workload's mode for one port.
//!
//! - A workload whose mode is STRICT on every port lists the static policy
//!   `istio-system/istio_converted_static_strict` (one resource, shared).
//! - A workload-selector policy with port-level modes that differ from the workload's becomes
//!   `<ns>/converted_peer_authentication_<name>`, listed on the workloads it selects: when the
//!   workload is STRICT it refuses plaintext except on its PERMISSIVE/DISABLE ports; otherwise it
//!   refuses plaintext on its STRICT ports only.
//!
//! DISABLE is treated as PERMISSIVE: ztunnel always accepts mTLS.

use std::collections::{BTreeMap, HashMap};

use weft_config::kube::Pod;
use weft_config::meta::ObjectMeta;
use weft_config::security::{MtlsMode, PeerAuthentication};
use weft_config::Object;
use weft_core::proto::istio::security::{
    self, string_match::MatchType, Authorization, Group, Match, Rules, StringMatch,
};

use super::ROOT_NAMESPACE;
use crate::model::Model;

/// The shared policy a STRICT workload lists (Istio's name: `_` cannot occur in Kubernetes names).
pub const STATIC_STRICT: &str = "istio_converted_static_strict";
/// The prefix of a workload-selector policy with port-level modes, converted.
pub const CONVERTED_PREFIX: &str = "converted_peer_authentication_";

/// The PeerAuthentications of a model, by scope.
#[derive(Default)]
pub struct PeerAuthentications<'m> {
    mesh: Option<&'m PeerAuthentication>,
    namespace: HashMap<&'m str, &'m PeerAuthentication>,
    selector: HashMap<&'m str, Vec<&'m PeerAuthentication>>,
}

impl<'m> PeerAuthentications<'m> {
    pub fn of(model: &'m Model) -> PeerAuthentications<'m> {
        let mut all: Vec<&PeerAuthentication> = model
            .objects()
            .filter_map(|o| match o {
                Object::PeerAuthentication(pa) => Some(pa),
                _ => None,
            })
            .collect();
        // Oldest first, so the first found at a scope is the one Istio applies.
        all.sort_by_key(|pa| age(&pa.metadata));
        let mut out = PeerAuthentications::default();
        for pa in all {
            let ns = pa.metadata.namespace.as_str();
            match (&pa.spec.selector, ns) {
                (Some(_), _) => out.selector.entry(ns).or_default().push(pa),
                (None, ROOT_NAMESPACE) => {
                    out.mesh.get_or_insert(pa);
                }
                (None, _) => {
                    out.namespace.entry(ns).or_insert(pa);
                }
            }
        }
        out
    }

    /// The names of the mTLS policies `pod` lists (see the module docs).
    pub fn policies_of(&self, pod: &Pod) -> Vec<String> {
        self.governing(pod).into_iter().map(|a| format!("{}/{}", a.namespace, a.name)).collect()
    }

    /// The `Authorization`s the model's workloads list: the static STRICT policy when any
    /// workload is STRICT, and each workload-selector policy with port exceptions.
    pub fn authorizations(&self, model: &Model) -> Vec<Authorization> {
        let mut listed: BTreeMap<String, Authorization> = BTreeMap::new();
        for policy in model.pods().flat_map(|pod| self.governing(pod)) {
            listed.entry(format!("{}/{}", policy.namespace, policy.name)).or_insert(policy);
        }
        listed.into_values().collect()
    }

    /// The mTLS policies that govern `pod`.
    fn governing(&self, pod: &Pod) -> Vec<Authorization> {
        let own = self.selecting(pod);
        let mode = self.mode(own, &pod.metadata.namespace);
        match own.filter(|pa| port_modes(pa, mode).values().any(|m| *m != mode)) {
            Some(pa) => vec![converted(pa, mode)],
            None if mode == MtlsMode::Strict => vec![static_strict()],
            None => Vec::new(),
        }
    }

    /// The oldest workload-selector policy of the pod's namespace that selects it.
    fn selecting(&self, pod: &Pod) -> Option<&'m PeerAuthentication> {
        let candidates = self.selector.get(pod.metadata.namespace.as_str())?;
        candidates
            .iter()
            .copied()
            .find(|pa| pa.spec.selector.as_ref().is_some_and(|s| s.matches(&pod.metadata.labels)))
    }

    /// The workload-level mode: `own`'s, else the namespace's, else the mesh's, else PERMISSIVE.
    fn mode(&self, own: Option<&PeerAuthentication>, namespace: &str) -> MtlsMode {
        [own, self.namespace.get(namespace).copied(), self.mesh]
            .into_iter()
            .flatten()
            .map(top_mode)
            .find(|m| *m != MtlsMode::Unset)
            .map_or(MtlsMode::Permissive, normalize)
    }
}

fn age(meta: &ObjectMeta) -> (String, String) {
    (meta.creation_timestamp.clone().unwrap_or_default(), meta.name.clone())
}

fn top_mode(pa: &PeerAuthentication) -> MtlsMode {
    pa.spec.mtls.as_ref().map_or(MtlsMode::Unset, |m| m.mode)
}

/// DISABLE is PERMISSIVE for ztunnel, which always accepts mTLS.
fn normalize(mode: MtlsMode) -> MtlsMode {
    if mode == MtlsMode::Disable {
        MtlsMode::Permissive
    } else {
        mode
    }
}

/// Each port's mode (UNSET ports take the workload's `mode`).
fn port_modes(pa: &PeerAuthentication, mode: MtlsMode) -> BTreeMap<u32, MtlsMode> {
    pa.spec
        .port_level_mtls
        .iter()
        .map(|(port, m)| (port.0, if m.mode == MtlsMode::Unset { mode } else { normalize(m.mode) }))
        .collect()
}

fn no_identity() -> Match {
    Match {
        not_principals: vec![StringMatch { match_type: Some(MatchType::Presence(())) }],
        ..Default::default()
    }
}

fn deny(namespace: &str, name: String, rules: Vec<Rules>) -> Authorization {
    Authorization {
        name,
        namespace: namespace.to_owned(),
        scope: security::Scope::WorkloadSelector as i32,
        action: security::Action::Deny as i32,
        groups: vec![Group { rules }],
    }
}

/// Refuses plaintext wherever it is listed.
pub fn static_strict() -> Authorization {
    deny(ROOT_NAMESPACE, STATIC_STRICT.to_owned(), vec![Rules { matches: vec![no_identity()] }])
}

/// A workload-selector policy with port exceptions to the workload's `mode` (see the module docs).
fn converted(pa: &PeerAuthentication, mode: MtlsMode) -> Authorization {
    let ports = port_modes(pa, mode);
    let name = format!("{CONVERTED_PREFIX}{}", pa.metadata.name);
    let rules = if mode == MtlsMode::Strict {
        let open: Vec<u32> = ports.iter().filter(|(_, m)| **m != MtlsMode::Strict).map(|(p, _)| *p).collect();
        // Both rules must match (rules of a group are AND'd): plaintext, to a port not exempted.
        vec![
            Rules { matches: vec![no_identity()] },
            Rules { matches: vec![Match { not_destination_ports: open, ..Default::default() }] },
        ]
    } else {
        let strict: Vec<u32> =
            ports.iter().filter(|(_, m)| **m == MtlsMode::Strict).map(|(p, _)| *p).collect();
        vec![Rules { matches: vec![Match { destination_ports: strict, ..no_identity() }] }]
    };
    deny(&pa.metadata.namespace, name, rules)
}
