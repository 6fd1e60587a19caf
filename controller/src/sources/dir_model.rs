//! The YAML directory as a model: decodes each changed file and turns it into model changes,
//! remembering which objects each file defined so that an edited or deleted file removes what it
//! no longer holds. Problems in a file are logged and leave other files' objects untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};
use weft_config::{load_yaml, LoadError};

use super::dir::{self, DirError, FileChange};
use crate::model::{Change, Model, ObjectKey};

/// Watches `root` and publishes the model after each batch of file changes.
pub fn watch_model(root: &Path) -> Result<watch::Receiver<Arc<Model>>, DirError> {
    let mut files = dir::watch(root)?;
    let (tx, rx) = watch::channel(Arc::new(Model::default()));
    tokio::spawn(async move {
        let mut state = DirModel::default();
        while let Some(batch) = files.recv().await {
            if state.apply(batch) || tx.borrow().is_empty() {
                tx.send_replace(Arc::new(state.model.clone()));
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(rx)
}

/// The model plus which file defined which objects.
#[derive(Default)]
pub struct DirModel {
    pub model: Model,
    by_file: BTreeMap<PathBuf, BTreeSet<ObjectKey>>,
}

impl DirModel {
    /// Applies a batch of file changes; returns whether the model changed.
    pub fn apply(&mut self, batch: Vec<FileChange>) -> bool {
        let mut changed = false;
        for change in batch {
            match change {
                FileChange::Changed { path, text } => {
                    let mut keys = BTreeSet::new();
                    for doc in load_yaml(&text, &path.display().to_string()) {
                        match doc.result {
                            Ok(decoded) => {
                                for warning in &decoded.warnings {
                                    warn!(file = %path.display(), line = doc.line, "{}", warning.field);
                                }
                                let key = ObjectKey::of(&decoded.object);
                                changed |= self.model.apply(Change::Upsert(Box::new(decoded.object)));
                                keys.insert(key);
                            }
                            Err(LoadError::Yaml { line, column, message }) => {
                                warn!(file = %path.display(), line, column, %message, "invalid YAML; document skipped");
                            }
                            Err(LoadError::Decode(e)) => {
                                warn!(file = %path.display(), line = doc.line, error = %e, "object skipped");
                            }
                        }
                    }
                    let old = self.by_file.insert(path.clone(), keys.clone()).unwrap_or_default();
                    for gone in old.difference(&keys) {
                        changed |= self.remove_unless_elsewhere(gone, &path);
                    }
                }
                FileChange::Removed { path } => {
                    for gone in self.by_file.remove(&path).unwrap_or_default() {
                        changed |= self.remove_unless_elsewhere(&gone, &path);
                    }
                }
            }
        }
        if changed {
            info!(objects = self.model.len(), "configuration changed");
        }
        changed
    }

    /// Deletes `key` unless another file still defines it.
    fn remove_unless_elsewhere(&mut self, key: &ObjectKey, from: &Path) -> bool {
        let elsewhere = self.by_file.iter().any(|(path, keys)| path != from && keys.contains(key));
        !elsewhere && self.model.apply(Change::Delete(key.clone()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// A pod of the mesh (labelled ambient itself), so its identity is its node's.
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {istio.io/dataplane-mode: ambient}}\nspec: {nodeName: node-a, serviceAccountName: web}\n";
    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

    fn changed(path: &str, text: &str) -> FileChange {
        FileChange::Changed { path: path.into(), text: text.into() }
    }

    #[test]
    fn files_add_replace_and_remove_their_objects() {
        let mut dm = DirModel::default();
        assert!(dm.apply(vec![changed("a.yaml", &format!("{NS}---\n{POD}"))]));
        assert_eq!(dm.model.len(), 2);
        // The pod moves to another file: it stays.
        assert!(!dm.apply(vec![changed("b.yaml", POD)]));
        assert!(!dm.apply(vec![changed("a.yaml", NS)]));
        assert_eq!(dm.model.len(), 2);
        // Broken YAML in a file drops only that file's objects, never the others'.
        assert!(dm.apply(vec![changed("a.yaml", "kind: [unclosed")]));
        assert_eq!(dm.model.len(), 1);
        assert!(dm.apply(vec![FileChange::Removed { path: "b.yaml".into() }]));
        assert!(dm.model.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_written_then_deleted_reaches_the_model_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = watch_model(dir.path()).unwrap();
        let wait_for = |model: &mut watch::Receiver<Arc<Model>>, want: usize| {
            let mut model = model.clone();
            async move {
                let started = Instant::now();
                tokio::time::timeout(Duration::from_secs(1), model.wait_for(|m| m.len() == want))
                    .await
                    .expect("model updated within 1 s")
                    .unwrap();
                started.elapsed()
            }
        };
        std::fs::write(dir.path().join("pod.yaml"), POD).unwrap();
        wait_for(&mut model, 1).await;
        assert_eq!(
            model.borrow().identities_on_node("cluster.local", "node-a").len(),
            1,
            "the pod places its identity on node-a"
        );
        std::fs::remove_file(dir.path().join("pod.yaml")).unwrap();
        wait_for(&mut model, 0).await;
    }
}
