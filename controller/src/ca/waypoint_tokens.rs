//! Waypoint tokens of the local cluster (no Kubernetes, so no TokenReview): the file
//! `DIR/<namespace>/<name>` holds the bearer token of the waypoint `<namespace>/<name>`
//! (surrounding whitespace ignored). Waypoints come and go while the mesh runs, so the directory is
//! read on demand: a token found before is checked again against its file (a deleted or rewritten
//! file revokes it), and an unknown token makes the directory be read afresh. Tokens are kept and
//! compared only as SHA-256 digests. Knows nothing of gRPC, CSRs or the model.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::authz::{Caller, TokenDigest};
use super::tokenreview::ServiceAccountRef;

/// A token file larger than this is no token (and is not read further).
const MAX_TOKEN_BYTES: u64 = 64 * 1024;
/// At most this many files are read in one pass over the directory.
const MAX_FILES: usize = 10_000;

/// The waypoint tokens under one directory (see the module docs).
pub struct WaypointTokenDir {
    dir: PathBuf,
    /// Digest -> the waypoint whose file held it when last read.
    cache: Mutex<HashMap<TokenDigest, ServiceAccountRef>>,
}

impl WaypointTokenDir {
    pub fn new(dir: impl Into<PathBuf>) -> WaypointTokenDir {
        WaypointTokenDir { dir: dir.into(), cache: Mutex::new(HashMap::new()) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The waypoint whose file holds `token` now, if any.
    ///
    /// Blocking file I/O on the caller's task: a handful of small files of a local cluster, read
    /// once per CA request or xDS stream, not per connection.
    pub fn lookup(&self, token: &str) -> Option<Caller> {
        let digest = TokenDigest::of(token);
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(waypoint) = cache.get(&digest).cloned() {
            if self.read_token(&waypoint).as_deref().map(TokenDigest::of) == Some(digest) {
                return Some(Caller::waypoint(waypoint.namespace, waypoint.name));
            }
        }
        *cache = self.scan();
        cache.get(&digest).map(|w| Caller::waypoint(w.namespace.clone(), w.name.clone()))
    }

    /// Every `<namespace>/<name>` file's token. Entries that are not two DNS labels deep (a
    /// temporary file being written, say) are skipped; an unreadable directory holds no tokens.
    fn scan(&self) -> HashMap<TokenDigest, ServiceAccountRef> {
        let mut found = HashMap::new();
        let namespaces = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the waypoint tokens directory");
                }
                return found;
            }
        };
        let mut files = 0;
        for namespace in namespaces.flatten() {
            let Ok(names) = std::fs::read_dir(namespace.path()) else { continue };
            for name in names.flatten() {
                files += 1;
                if files > MAX_FILES {
                    tracing::warn!(dir = %self.dir.display(), "more than {MAX_FILES} waypoint token files; the rest are ignored");
                    return found;
                }
                let waypoint = format!(
                    "{}/{}",
                    namespace.file_name().to_string_lossy(),
                    name.file_name().to_string_lossy()
                );
                let Ok(waypoint) = waypoint.parse::<ServiceAccountRef>() else { continue };
                if let Some(token) = self.read_token(&waypoint) {
                    found.insert(TokenDigest::of(&token), waypoint);
                }
            }
        }
        found
    }

    /// The token in `waypoint`'s file, trimmed; `None` when absent, unreadable, empty or too big.
    fn read_token(&self, waypoint: &ServiceAccountRef) -> Option<String> {
        let path = self.dir.join(&waypoint.namespace).join(&waypoint.name);
        let file = std::fs::File::open(&path).ok()?;
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut text = String::new();
        file.take(MAX_TOKEN_BYTES + 1).read_to_string(&mut text).ok()?;
        let token = text.trim();
        (!token.is_empty() && text.len() as u64 <= MAX_TOKEN_BYTES).then(|| token.to_owned())
    }
}

impl fmt::Debug for WaypointTokenDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known = self.cache.lock().map_or(0, |c| c.len());
        f.debug_struct("WaypointTokenDir").field("dir", &self.dir).field("known tokens", &known).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, waypoint: &str, token: &str) {
        let path = dir.join(waypoint);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, token).unwrap();
    }

    #[test]
    fn files_are_read_on_demand_and_revoked_when_gone_or_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = WaypointTokenDir::new(tmp.path().join("tokens"));
        assert_eq!(dir.lookup("t-wp"), None, "no directory yet: no tokens");

        write(dir.dir(), "shop/waypoint", "t-wp\n");
        write(dir.dir(), "infra/egress", "t-egress");
        write(dir.dir(), "shop/.waypoint.tmp", "t-tmp");
        write(dir.dir(), "shop/empty", " \n");
        write(dir.dir(), "Bad_NS/waypoint", "t-bad");
        write(dir.dir(), "toplevel-file", "t-top");
        let cases: &[(&str, Option<Caller>)] = &[
            ("t-wp", Some(Caller::waypoint("shop", "waypoint"))),
            ("t-egress", Some(Caller::waypoint("infra", "egress"))),
            ("t-wp\n", None),
            ("t-tmp", None),
            ("", None),
            ("t-bad", None),
            ("t-top", None),
            ("unknown", None),
        ];
        for (token, want) in cases {
            assert_eq!(&dir.lookup(token), want, "token {token:?}");
        }

        // A rewritten file revokes the old token and authenticates the new one; a deleted file
        // revokes its token.
        write(dir.dir(), "shop/waypoint", "t-wp-2");
        assert_eq!(dir.lookup("t-wp"), None);
        assert_eq!(dir.lookup("t-wp-2"), Some(Caller::waypoint("shop", "waypoint")));
        std::fs::remove_file(dir.dir().join("infra/egress")).unwrap();
        assert_eq!(dir.lookup("t-egress"), None);

        let shown = format!("{dir:?}");
        assert!(!shown.contains("t-wp"), "{shown}");
    }

    #[test]
    fn oversized_files_are_no_tokens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = WaypointTokenDir::new(tmp.path());
        let big = "x".repeat(MAX_TOKEN_BYTES as usize + 1);
        write(tmp.path(), "shop/waypoint", &big);
        assert_eq!(dir.lookup(&big), None);
    }
}
