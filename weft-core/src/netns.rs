//! Named network namespaces (`ip netns`, bound at `/run/netns/<name>`): running code inside one,
//! and telling whether they can be used here at all. The local cluster, its tests and the
//! capture and proxy tests share this.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;

use nix::sched::CloneFlags;

/// Why code could not be run inside a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source} (does `ip netns list` show it?)")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot enter network namespace {name}: {errno} (needs CAP_SYS_ADMIN)")]
    Enter { name: String, errno: nix::Error },
}

/// Where `ip netns` binds its namespaces.
pub const DIR: &str = "/run/netns";

/// Where `ip netns` binds the namespace `name`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(DIR).join(name)
}

/// Runs `f` on a thread that entered the network namespace `name`. Sockets `f` opens belong to
/// that namespace for good, so a listener or connection made here can be handed back and used
/// from any thread or runtime. A panic in `f` is re-raised here.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let path = path(name);
    let file = File::open(&path).map_err(|source| NetnsError::Open { path, source })?;
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|errno| NetnsError::Enter { name: name.to_owned(), errno })?;
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Why network namespaces cannot be made here, if they cannot: not root, or no working
/// `ip netns` (iproute2).
pub fn unavailable() -> Option<String> {
    let uid = nix::unistd::geteuid();
    if !uid.is_root() {
        return Some(format!("not root (uid {uid}): network namespaces, veths and eBPF need root"));
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("`ip netns list` failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Some(format!("cannot run `ip` (install iproute2): {e}")),
    }
}
