//! The user's manifests for `weft up`: reading a directory of YAML into documents and Pods (with
//! their node, command, environment and mesh membership) and writing the documents back with each
//! Pod's status filled in. It only reads and transforms: it starts nothing and touches no
//! namespace.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use weft_config::{load_yaml, Object};

use super::{io, UpError, TRUST_DOMAIN};

/// The label that enrolls a namespace (or pod) in the ambient mesh.
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The label of a Gateway's pods and Service, as Kubernetes' Gateway API and Istio set it.
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Where waypoint pods run (the controller's node; any node would do).
pub(super) const WAYPOINT_NODE: &str = "node-a";
/// Where waypoint Service VIPs are taken from: the first free address from here on, inside
/// Kubernetes' default service range 10.96.0.0/12.
const WAYPOINT_VIP_START: [u8; 4] = [10, 96, 200, 1];
/// The directory (under the controller's) of the documents `weft up` adds for waypoints.
pub const WAYPOINTS_DIR: &str = "weft-waypoints";

/// A Pod of the manifests: where it runs and what it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDef {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    /// `containers[0].command` + `args`; empty when the pod runs nothing.
    pub command: Vec<String>,
    /// `containers[0].env` entries with a literal `value`.
    pub env: Vec<(String, String)>,
    /// Whether its namespace (or the pod) enrolls it in the ambient mesh as the manifests stand.
    pub ambient: bool,
    /// The Gateway this pod is the waypoint of (`weft up` made the pod for it).
    pub waypoint: Option<String>,
}

impl PodDef {
    /// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
    pub fn identity(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}", self.namespace, self.service_account)
    }

    /// The log and process name of the pod's command.
    pub fn process_name(&self) -> String {
        format!("pod-{}-{}", self.namespace, self.name)
    }
}

/// The manifests of a directory: each file's documents (as JSON values) and the Pods.
#[derive(Debug, Clone)]
pub struct Manifests {
    /// Path relative to the directory → its documents (`kind: List` expanded).
    pub files: Vec<(PathBuf, Vec<Value>)>,
    pub pods: Vec<PodDef>,
}

impl Manifests {
    /// Reads every `*.yaml`/`*.yml` under `dir`; an invalid document, or a Pod without
    /// `spec.nodeName`, is an error naming it.
    pub fn read(dir: &Path) -> Result<Manifests, UpError> {
        let mut paths = Vec::new();
        collect_yaml(dir, &mut paths)?;
        if paths.is_empty() {
            return Err(UpError::Config(format!("{} holds no *.yaml or *.yml file", dir.display())));
        }
        paths.sort();
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for path in &paths {
            let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
            let shown = path.display().to_string();
            for doc in load_yaml(&text, &shown) {
                if let Err(e) = &doc.result {
                    errors.push(format!("{}:{}: {}: {e}", doc.file, doc.line, doc.name));
                }
            }
            let mut docs = Vec::new();
            for de in serde_yaml::Deserializer::from_str(&text) {
                match Value::deserialize(de) {
                    Ok(Value::Null) => {}
                    Ok(value) => expand_list(value, &mut docs),
                    Err(e) => {
                        // After a syntax error the stream yields the same error forever: stop.
                        errors.push(format!("{shown}: {e}"));
                        break;
                    }
                }
            }
            let relative = path.strip_prefix(dir).unwrap_or(path).to_path_buf();
            files.push((relative, docs));
        }
        if !errors.is_empty() {
            return Err(UpError::Config(errors.join("\n")));
        }
        files.extend(waypoint_documents(&files));
        let pods = pods_of(&files)?;
        Ok(Manifests { files, pods })
    }

    /// The documents for the controller: every Pod gets `status.phase: Running`, `podIP` and
    /// `podIPs` from `ips` (keyed by (namespace, name)).
    pub fn with_pod_ips(&self, ips: &BTreeMap<(String, String), Vec<IpAddr>>) -> Vec<(PathBuf, String)> {
        self.files
            .iter()
            .map(|(path, docs)| {
                let mut text = String::new();
                for doc in docs {
                    let mut doc = doc.clone();
                    if let Ok(decoded) = weft_config::decode(doc.clone()) {
                        if let Object::Pod(pod) = decoded.object {
                            let key = (pod.metadata.namespace.clone(), pod.metadata.name.clone());
                            if let Some(ips) = ips.get(&key) {
                                set_status(&mut doc, &pod.metadata.namespace, ips);
                            }
                        }
                    }
                    text.push_str("---\n");
                    text.push_str(&serde_yaml::to_string(&doc).unwrap_or_default());
                }
                (path.clone(), text)
            })
            .collect()
    }
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), UpError> {
    let entries = std::fs::read_dir(dir).map_err(io(format!("reading directory {}", dir.display())))?;
    for entry in entries {
        let path = entry.map_err(io(format!("reading directory {}", dir.display())))?.path();
        if path.is_dir() {
            collect_yaml(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

fn expand_list(value: Value, docs: &mut Vec<Value>) {
    if value.get("kind").and_then(Value::as_str) == Some("List") {
        if let Some(Value::Array(items)) = value.get("items") {
            docs.extend(items.iter().cloned());
            return;
        }
    }
    docs.push(value);
}

pub(super) fn set_status(doc: &mut Value, namespace: &str, ips: &[IpAddr]) {
    let Value::Object(map) = doc else { return };
    if let Some(Value::Object(meta)) = map.get_mut("metadata") {
        meta.entry("namespace").or_insert_with(|| Value::String(namespace.into()));
    }
    let status = map.entry("status").or_insert_with(|| Value::Object(Default::default()));
    if !status.is_object() {
        *status = Value::Object(Default::default());
    }
    if let Value::Object(status) = status {
        status.insert("phase".into(), "Running".into());
        if let Some(first) = ips.first() {
            status.insert("podIP".into(), first.to_string().into());
        }
        let all: Vec<Value> = ips.iter().map(|ip| serde_json::json!({ "ip": ip.to_string() })).collect();
        status.insert("podIPs".into(), Value::Array(all));
    }
}

/// For each `istio-waypoint` Gateway, what its Deployment and Service are on Kubernetes: a
/// Pod (labelled with the Gateway's name, out of the ambient capture, running as service
/// account `<gateway name>`, running `waypoint`) and a Service with a VIP and the HBONE port
/// 15008, named `mesh` as Istio names it. One file per Gateway, under [`WAYPOINTS_DIR`].
pub(super) fn waypoint_documents(files: &[(PathBuf, Vec<Value>)]) -> Vec<(PathBuf, Vec<Value>)> {
    let mut used: Vec<String> = Vec::new();
    let mut gateways = Vec::new();
    let mut existing = Vec::new();
    for (_, docs) in files {
        for doc in docs {
            if let Some(ip) = doc.pointer("/spec/clusterIP").and_then(Value::as_str) {
                used.push(ip.to_owned());
            }
            let Ok(decoded) = weft_config::decode(doc.clone()) else { continue };
            match decoded.object {
                Object::KubeGateway(gw) if gw.is_waypoint() => {
                    gateways.push((gw.metadata.namespace.clone(), gw.metadata.name.clone()));
                }
                // The directory `weft up` wrote already holds the waypoint's documents.
                Object::Pod(pod) if pod.metadata.labels.contains_key(GATEWAY_NAME_LABEL) => {
                    existing.push((
                        pod.metadata.namespace.clone(),
                        pod.metadata.labels[GATEWAY_NAME_LABEL].clone(),
                    ));
                }
                _ => {}
            }
        }
    }
    let mut next = u32::from_be_bytes(WAYPOINT_VIP_START);
    let mut out = Vec::new();
    for (namespace, name) in gateways.into_iter().filter(|g| !existing.contains(g)) {
        let vip = loop {
            let ip = std::net::Ipv4Addr::from(next).to_string();
            next += 1;
            if !used.contains(&ip) {
                break ip;
            }
        };
        let labels = serde_json::json!({ GATEWAY_NAME_LABEL: name, DATAPLANE_MODE: "none" });
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": format!("{name}-0"), "namespace": namespace, "labels": labels },
            "spec": {
                "nodeName": WAYPOINT_NODE,
                "serviceAccountName": name,
                "containers": [{ "name": "istio-proxy", "command": ["waypoint"] }],
            },
        });
        let service = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "namespace": namespace, "labels": { GATEWAY_NAME_LABEL: name } },
            "spec": {
                "clusterIP": vip,
                "selector": { GATEWAY_NAME_LABEL: name },
                "ports": [{ "name": "mesh", "port": 15008, "protocol": "TCP", "targetPort": 15008 }],
            },
        });
        out.push((PathBuf::from(WAYPOINTS_DIR).join(format!("{namespace}-{name}.yaml")), vec![pod, service]));
    }
    out
}

/// The Pods of the documents, with what their namespaces say about the mesh.
fn pods_of(files: &[(PathBuf, Vec<Value>)]) -> Result<Vec<PodDef>, UpError> {
    let mut ambient_namespaces = BTreeMap::new();
    let mut pods = Vec::new();
    let mut errors = Vec::new();
    for (path, docs) in files {
        for doc in docs {
            let Ok(decoded) = weft_config::decode(doc.clone()) else { continue };
            match decoded.object {
                Object::Namespace(ns) => {
                    let ambient =
                        ns.metadata.labels.get(DATAPLANE_MODE).map(String::as_str) == Some("ambient");
                    ambient_namespaces.insert(ns.metadata.name.clone(), ambient);
                }
                Object::Pod(pod) => {
                    let (namespace, name) = (pod.metadata.namespace.clone(), pod.metadata.name.clone());
                    let Some(node) = pod.spec.node_name.clone() else {
                        errors.push(format!(
                            "{}: Pod {namespace}/{name} has no spec.nodeName; say which node it runs on \
                             (node-a, node-b, ...)",
                            path.display()
                        ));
                        continue;
                    };
                    let container = doc.pointer("/spec/containers/0");
                    let strings = |field: &str| -> Vec<String> {
                        container
                            .and_then(|c| c.get(field))
                            .and_then(Value::as_array)
                            .map(|a| {
                                a.iter()
                                    .map(|v| v.as_str().map_or_else(|| v.to_string(), String::from))
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                    let mut command = strings("command");
                    command.extend(strings("args"));
                    let env = container
                        .and_then(|c| c.get("env"))
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|e| {
                                    Some((
                                        e.get("name")?.as_str()?.to_string(),
                                        e.get("value")?.as_str()?.to_string(),
                                    ))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let pod_mode = pod.metadata.labels.get(DATAPLANE_MODE).cloned();
                    pods.push((
                        pod_mode,
                        PodDef {
                            namespace,
                            name,
                            node,
                            service_account: pod.service_account().to_string(),
                            command,
                            env,
                            ambient: false,
                            waypoint: pod.metadata.labels.get(GATEWAY_NAME_LABEL).cloned(),
                        },
                    ));
                }
                _ => {}
            }
        }
    }
    if !errors.is_empty() {
        return Err(UpError::Config(errors.join("\n")));
    }
    Ok(pods
        .into_iter()
        .map(|(mode, mut pod)| {
            pod.ambient = match mode.as_deref() {
                Some("none") => false,
                Some("ambient") => true,
                _ => ambient_namespaces.get(&pod.namespace).copied().unwrap_or(false),
            };
            pod
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pods_get_their_ips_and_namespaces_their_membership() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: cart\n  namespace: shop\nspec:\n  nodeName: node-b\n  \
             serviceAccountName: cart\n  containers:\n  - name: app\n    command: [weft-app, --http, \"8080\"]\n    \
             env:\n    - {name: GREETING, value: \"yes\"}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: old\nspec:\n  nodeName: node-a\n  containers: [{name: x}]\n",
        )
        .unwrap();
        let m = Manifests::read(dir.path()).unwrap();
        assert_eq!(m.pods.len(), 2);
        let cart = &m.pods[0];
        assert_eq!(cart.command, ["weft-app", "--http", "8080"]);
        assert_eq!(cart.env, [("GREETING".to_string(), "yes".to_string())]);
        assert!(cart.ambient);
        assert_eq!(cart.identity(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert!(!m.pods[1].ambient);
        assert_eq!(m.pods[1].namespace, "default");

        let ip: IpAddr = "10.10.2.2".parse().unwrap();
        let ips = BTreeMap::from([(("shop".to_string(), "cart".to_string()), vec![ip])]);
        let out = m.with_pod_ips(&ips);
        let docs = load_yaml(&out[0].1, "out");
        let pod = docs
            .iter()
            .find_map(|d| match &d.result.as_ref().unwrap().object {
                Object::Pod(p) if p.metadata.name == "cart" => Some(p.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(pod.status.pod_ip.as_deref(), Some("10.10.2.2"));
        assert_eq!(pod.status.phase.as_deref(), Some("Running"));
        assert_eq!(pod.ips(), ["10.10.2.2"]);
        assert_eq!(docs.len(), 3);
    }

    /// A syntax error is reported once, with its line, and reading stops (serde_yaml's document
    /// stream repeats a syntax error forever: collecting them exhausted the memory).
    #[test]
    fn invalid_yaml_is_one_error_not_an_endless_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("bad.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nspec:\n  x: [{key: a[b], values: [\"1\"]}]\n",
        )
        .unwrap();
        let e = Manifests::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("bad.yaml") && e.lines().count() <= 3, "{e}");
    }

    #[test]
    fn a_pod_without_a_node_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: lost\n  namespace: x\nspec:\n  containers: [{name: a}]\n",
        )
        .unwrap();
        let e = Manifests::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("Pod x/lost has no spec.nodeName"), "{e}");
    }
}
