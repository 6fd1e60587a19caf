//! A directory of YAML files, watched: reports which files appeared, changed or went away, with
//! their contents, within about a second of the change. Knows nothing of what the YAML means.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// How long the directory must be quiet before it is rescanned: editors write files in several
/// steps (truncate, write, rename), and one rescan should see the end result.
pub const SETTLE: Duration = Duration::from_millis(100);
/// Rescan this often even without an event, in case the platform dropped one.
pub const RESCAN: Duration = Duration::from_secs(30);

/// One file's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChange {
    /// The file is new or its contents changed.
    Changed { path: PathBuf, text: String },
    /// The file is gone (or is no longer readable as UTF-8 text).
    Removed { path: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("cannot watch {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
}

/// Watches `root` recursively for `*.yaml` and `*.yml` files. The first batch holds every file;
/// later batches hold what changed. The watch stops when the receiver is dropped.
pub fn watch(root: &Path) -> Result<mpsc::Receiver<Vec<FileChange>>, DirError> {
    if !root.is_dir() {
        return Err(DirError::NotADirectory { path: root.to_owned() });
    }
    let (notify_tx, mut notify_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Err(e) = &event {
            warn!(error = %e, "file watch error; rescanning");
        }
        let _ = notify_tx.send(());
    })
    .map_err(|source| DirError::Watch { path: root.to_owned(), source })?;
    watcher
        .watch(root, RecursiveMode::Recursive)
        .map_err(|source| DirError::Watch { path: root.to_owned(), source })?;

    let (tx, rx) = mpsc::channel(16);
    let root = root.to_owned();
    tokio::spawn(async move {
        let _watcher = watcher; // dropped (and the watch ended) with this task
        let mut known = BTreeMap::new();
        let mut first = true;
        loop {
            let changes = rescan(&root, &mut known).await;
            if (first || !changes.is_empty()) && tx.send(changes).await.is_err() {
                return;
            }
            first = false;
            // Wait for an event (or the periodic rescan), then for the directory to settle.
            tokio::select! {
                event = notify_rx.recv() => if event.is_none() { return },
                _ = tokio::time::sleep(RESCAN) => {}
                _ = tx.closed() => return,
            }
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(SETTLE) => break,
                    event = notify_rx.recv() => if event.is_none() { return },
                }
            }
        }
    });
    Ok(rx)
}

/// Reads every YAML file under `root` and returns what differs from `known`, updating it.
async fn rescan(root: &Path, known: &mut BTreeMap<PathBuf, String>) -> Vec<FileChange> {
    let root = root.to_owned();
    let current = tokio::task::spawn_blocking(move || read_tree(&root)).await.unwrap_or_default();
    let mut changes = Vec::new();
    for (path, text) in &current {
        if known.get(path) != Some(text) {
            changes.push(FileChange::Changed { path: path.clone(), text: text.clone() });
        }
    }
    for path in known.keys() {
        if !current.contains_key(path) {
            changes.push(FileChange::Removed { path: path.clone() });
        }
    }
    debug!(files = current.len(), changes = changes.len(), "rescanned config directory");
    *known = current;
    changes
}

/// Every `*.yaml`/`*.yml` file below `root`, sorted by path; unreadable files are skipped.
pub fn read_tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                dirs.push(path);
            } else if is_yaml(&path) {
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        files.insert(path, text);
                    }
                    Err(e) => warn!(path = %path.display(), error = %e, "skipping unreadable file"),
                }
            }
        }
    }
    files
}

fn is_yaml(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    !hidden && matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    async fn next(rx: &mut mpsc::Receiver<Vec<FileChange>>) -> Vec<FileChange> {
        tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .expect("a change reported within 1 s")
            .expect("watch running")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_created_changed_and_deleted_are_reported_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "kind: A\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let mut rx = watch(dir.path()).unwrap();
        let first = next(&mut rx).await;
        assert_eq!(
            first,
            vec![FileChange::Changed { path: dir.path().join("a.yaml"), text: "kind: A\n".into() }]
        );

        let started = Instant::now();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b.yml"), "kind: B\n").unwrap();
        assert_eq!(
            next(&mut rx).await,
            vec![FileChange::Changed { path: dir.path().join("sub/b.yml"), text: "kind: B\n".into() }]
        );
        std::fs::write(dir.path().join("a.yaml"), "kind: A2\n").unwrap();
        assert_eq!(
            next(&mut rx).await,
            vec![FileChange::Changed { path: dir.path().join("a.yaml"), text: "kind: A2\n".into() }]
        );
        std::fs::remove_file(dir.path().join("sub/b.yml")).unwrap();
        assert_eq!(next(&mut rx).await, vec![FileChange::Removed { path: dir.path().join("sub/b.yml") }]);
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn an_empty_directory_reports_an_empty_first_batch_and_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut rx = watch(dir.path()).unwrap();
        assert_eq!(next(&mut rx).await, vec![]);
        let file = dir.path().join("x.yaml");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(watch(&file), Err(DirError::NotADirectory { .. })));
    }
}
