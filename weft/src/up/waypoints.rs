//! Waypoints added to and removed from a running local mesh (`weft waypoint apply|delete
//! --local`), as the controller's Deployment makes them on Kubernetes: a pod namespace on
//! node-a, the Gateway, Pod and Service documents in the controller's directory, the waypoint's
//! token, its process; then the namespace's `istio.io/use-waypoint` label, once the waypoint is
//! ready (so no new connection is sent to a waypoint that cannot serve it). Removal goes the
//! other way round: the label first, then, once every ztunnel has stopped sending to the
//! waypoint, the rest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::manifests::{waypoint_documents, Manifests, PodDef, WAYPOINTS_DIR, WAYPOINT_NODE};
use super::{io, write_token, Mesh, UpError, ADMIN_PORT, DEFAULT_READY_TIMEOUT};
use crate::cluster::Cluster;

/// The label that binds a namespace's traffic to a waypoint.
const USE_WAYPOINT: &str = weft_core::names::USE_WAYPOINT_LABEL;
/// How long connections already inside a waypoint get to finish once no ztunnel sends it new
/// ones, before it is stopped.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

impl Mesh {
    /// The running local mesh `name` (made by `weft up`), for commands that change it.
    pub fn attach(name: &str, bin_dir: PathBuf) -> Result<Mesh, UpError> {
        let cluster = Cluster::load(name)?;
        let manifests = Manifests::read(&super::config_dir(name))?;
        Ok(Mesh {
            cluster,
            pods: manifests.pods,
            bin_dir,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            children: Default::default(),
        })
    }

    /// Adds the waypoint `namespace/name` and binds the namespace to it (see the module docs).
    pub fn apply_waypoint(&mut self, namespace: &str, name: &str) -> Result<(), UpError> {
        let file = self.config_dir().join(WAYPOINTS_DIR).join(format!("{namespace}-{name}.yaml"));
        if !file.exists() {
            let gateway = serde_json::json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": { "name": name, "namespace": namespace,
                              "labels": { weft_core::names::WAYPOINT_FOR_LABEL: "service" } },
                "spec": { "gatewayClassName": weft_core::names::WAYPOINT_GATEWAY_CLASS,
                          "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE" }] },
            });
            let existing = read_dir_docs(&self.config_dir())?;
            let (_, docs) =
                waypoint_documents(&[(PathBuf::new(), [existing, vec![gateway.clone()]].concat())])
                    .into_iter()
                    .next()
                    .ok_or_else(|| {
                        UpError::Config(format!("no waypoint documents for {namespace}/{name}"))
                    })?;
            let pod_name = format!("{name}-0");
            let pod = self.cluster.add_pod(namespace, &pod_name, WAYPOINT_NODE)?;
            let mut docs = docs;
            for doc in docs.iter_mut().filter(|d| d["kind"] == "Pod") {
                super::manifests::set_status(doc, namespace, &pod.ips);
            }
            write_docs(&file, &[vec![gateway], docs].concat())?;
            let def = PodDef {
                namespace: namespace.to_owned(),
                name: pod_name,
                node: WAYPOINT_NODE.to_owned(),
                service_account: name.to_owned(),
                command: vec!["waypoint".to_owned()],
                env: Vec::new(),
                ambient: false,
                waypoint: Some(name.to_owned()),
            };
            write_token(&self.waypoint_token_path(namespace, name))?;
            self.pods.push(def.clone());
            self.start_pod(&def)?;
            self.wait_pod_ready(&def)?;
        }
        self.label_namespace(namespace, Some(name))
    }

    /// Unbinds the namespace from the waypoint `namespace/name` and removes it (see the module
    /// docs).
    pub fn delete_waypoint(&mut self, namespace: &str, name: &str) -> Result<(), UpError> {
        self.label_namespace(namespace, None)?;
        self.wait_unbound(namespace)?;
        std::thread::sleep(DRAIN_GRACE);
        let file = self.config_dir().join(WAYPOINTS_DIR).join(format!("{namespace}-{name}.yaml"));
        if file.exists() {
            std::fs::remove_file(&file).map_err(io(format!("removing {}", file.display())))?;
        }
        self.cluster.remove_pod(namespace, &format!("{name}-0"))?;
        let token = self.waypoint_token_path(namespace, name);
        let _ = std::fs::remove_file(token);
        self.pods.retain(|p| !(p.namespace == namespace && p.waypoint.as_deref() == Some(name)));
        Ok(())
    }

    /// Sets (or, with `None`, removes) the namespace's `istio.io/use-waypoint` label in the
    /// controller's directory; a namespace no file declares gets a file of its own.
    fn label_namespace(&self, namespace: &str, waypoint: Option<&str>) -> Result<(), UpError> {
        let dir = self.config_dir();
        for path in yaml_files(&dir)? {
            let mut docs = read_docs(&path)?;
            let Some(doc) =
                docs.iter_mut().find(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == namespace)
            else {
                continue;
            };
            set_label(doc, waypoint);
            return write_docs(&path, &docs);
        }
        let mut doc =
            serde_json::json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": namespace } });
        set_label(&mut doc, waypoint);
        write_docs(&dir.join(WAYPOINTS_DIR).join(format!("namespace-{namespace}.yaml")), &[doc])
    }

    /// Waits until no node's ztunnel sends a service of `namespace` to a waypoint.
    fn wait_unbound(&self, namespace: &str) -> Result<(), UpError> {
        let deadline = Instant::now() + self.ready_timeout;
        let nodes: Vec<String> = self.cluster.plan().nodes.iter().map(|n| n.name.clone()).collect();
        loop {
            let bound = nodes.iter().any(|node| {
                let Ok((200, body)) = self.ztunnel_get(node, ADMIN_PORT, "/config_dump") else { return true };
                let dump: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                dump["services"].as_array().is_none_or(|services| {
                    services.iter().any(|s| {
                        s["service"]["namespace"] == namespace && !s["service"]["waypoint"].is_null()
                    })
                })
            });
            if !bound {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(UpError::Config(format!(
                    "the ztunnels still send namespace {namespace}'s services to a waypoint after {:?}",
                    self.ready_timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn set_label(doc: &mut Value, waypoint: Option<&str>) {
    let meta = &mut doc["metadata"];
    if !meta["labels"].is_object() {
        meta["labels"] = serde_json::json!({});
    }
    if let Value::Object(labels) = &mut meta["labels"] {
        match waypoint {
            Some(name) => {
                labels.insert(USE_WAYPOINT.to_owned(), Value::String(name.to_owned()));
            }
            None => {
                labels.remove(USE_WAYPOINT);
            }
        }
    }
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, UpError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io(format!("reading {}", dir.display())))?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn read_docs(path: &Path) -> Result<Vec<Value>, UpError> {
    let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
    let mut docs = Vec::new();
    for de in serde_yaml::Deserializer::from_str(&text) {
        match <Value as serde::Deserialize>::deserialize(de) {
            Ok(Value::Null) => {}
            Ok(doc) => docs.push(doc),
            Err(e) => return Err(UpError::Config(format!("{}: {e}", path.display()))),
        }
    }
    Ok(docs)
}

fn read_dir_docs(dir: &Path) -> Result<Vec<Value>, UpError> {
    let mut docs = Vec::new();
    for path in yaml_files(dir)? {
        docs.extend(read_docs(&path)?);
    }
    Ok(docs)
}

/// Writes `docs` to `path` at once (a temporary file renamed over it), as an operator's edit.
fn write_docs(path: &Path, docs: &[Value]) -> Result<(), UpError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    let mut text = String::new();
    for doc in docs {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(doc).map_err(|e| UpError::Config(e.to_string()))?);
    }
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("writing {}", path.display())))
}
