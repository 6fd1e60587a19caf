//! Makes sure the pin directory lives on a bpf filesystem, mounting bpffs at /sys/fs/bpf when
//! nothing is mounted there. Knows nothing of what is pinned.

use std::{fs, path::Path};

use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

use crate::Error;

const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf when `pin_dir` is below it and nothing is mounted there, then
/// checks that `pin_dir` (or its nearest existing ancestor) is on bpffs.
pub(crate) fn ensure(pin_dir: &Path) -> Result<(), Error> {
    if pin_dir.starts_with(DEFAULT_MOUNT) && !mounted(DEFAULT_MOUNT) {
        // In the host's mount namespace this is the bpffs every later ztunnel finds; in a private
        // one (e.g. under `ip netns exec`, which remounts /sys) the pins die with this process and
        // capture fails open when it exits. Say so loudly.
        tracing::warn!(
            "no bpffs at {DEFAULT_MOUNT}: mounting one. If this process runs in a private mount namespace \
             (e.g. `ip netns exec`), pinned capture will not outlive it; run in the host's mount namespace \
             (`nsenter --net=...`, or mount the host's /sys/fs/bpf)"
        );
        mount(Some("bpf"), DEFAULT_MOUNT, Some("bpf"), MsFlags::empty(), None::<&str>).map_err(|source| {
            match source {
                nix::Error::EPERM => {
                    Error::NotPermitted { what: format!("mounting bpffs at {DEFAULT_MOUNT}") }
                }
                source => Error::MountBpffs { source },
            }
        })?;
    }
    let existing = pin_dir.ancestors().find(|dir| dir.exists()).unwrap_or(Path::new("/"));
    match statfs(existing) {
        Ok(fs) if fs.filesystem_type() == BPF_FS_MAGIC => Ok(()),
        _ => Err(Error::NotBpffs { path: pin_dir.to_owned() }),
    }
}

/// Whether /proc/mounts lists a bpf filesystem at `dir`.
fn mounted(dir: &str) -> bool {
    fs::read_to_string("/proc/mounts")
        .map(|mounts| {
            mounts.lines().any(|line| {
                let mut fields = line.split_whitespace();
                let (_, at, kind) = (fields.next(), fields.next(), fields.next());
                at == Some(dir) && kind == Some("bpf")
            })
        })
        .unwrap_or(false)
}
