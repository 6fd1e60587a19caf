//! The loader's errors: each names what failed and what the operator can do about it.

use std::{io, path::PathBuf};

/// What went wrong while loading, attaching or removing the capture programs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process lacks the privileges eBPF and routing changes need.
    #[error(
        "{what}: not permitted; run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN \
         (for bpffs) in the node's network namespace"
    )]
    NotPermitted {
        /// The operation that was refused.
        what: String,
    },
    /// The pin directory is not on a bpf filesystem.
    #[error(
        "{path} is not on a bpf filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or choose \
         a pin directory under /sys/fs/bpf"
    )]
    NotBpffs {
        /// The pin directory asked for.
        path: PathBuf,
    },
    /// Mounting bpffs at /sys/fs/bpf failed.
    #[error("bpffs is not mounted at /sys/fs/bpf and mounting it failed: {source}")]
    MountBpffs {
        /// Why.
        source: nix::Error,
    },
    /// The configuration cannot work.
    #[error("invalid capture configuration: {0}")]
    Config(String),
    /// The kernel lacks a feature the capture needs.
    #[error("{0}")]
    Unsupported(String),
    /// No interface of that name in the current network namespace.
    #[error(
        "interface {ifname} not found in this network namespace; is the pod's veth created \
         and is the loader running in the node's namespace?"
    )]
    InterfaceNotFound {
        /// The name asked for.
        ifname: String,
    },
    /// The pin directory holds only part of what a loader pins.
    #[error(
        "{dir} holds an incomplete capture (missing {missing}); remove it with \
         `ebpf::remove` (or `rm -r {dir}`) and open again"
    )]
    IncompletePins {
        /// The pin directory.
        dir: PathBuf,
        /// The first missing entry.
        missing: String,
    },
    /// Loading the embedded object or a program failed (e.g. the verifier refused it).
    #[error("loading the eBPF {what} failed: {}", Chain(&**.source))]
    Load {
        /// Which object or program.
        what: String,
        /// The underlying error, with the verifier log when there is one.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Attaching, detaching or querying a program on an interface failed.
    #[error("{what} on interface {ifname} failed: {}", Chain(&**.source))]
    Attach {
        /// The operation.
        what: &'static str,
        /// The interface.
        ifname: String,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Attaching the listener lookup to the network namespace failed.
    #[error("{what} the listener lookup (sk_lookup, Linux 5.9+) in this network namespace failed: {}", Chain(&**.source))]
    AttachNetns {
        /// The operation.
        what: &'static str,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Pinning or opening a pinned object failed.
    #[error("{what} {path} failed: {}", Chain(&**.source))]
    Pin {
        /// The operation.
        what: &'static str,
        /// The bpffs path.
        path: PathBuf,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading or writing a map failed.
    #[error("map {map}: {}", Chain(.source))]
    Map {
        /// The map's name.
        map: &'static str,
        /// The underlying error.
        source: aya::maps::MapError,
    },
    /// A file system operation on the pin directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The `ip` command (iproute2) could not be run.
    #[error("could not run `ip` to set up the capture routing ({source}); install iproute2")]
    IpCommand {
        /// Why.
        source: io::Error,
    },
    /// An `ip rule`/`ip route` command failed.
    #[error("`{command}` failed: {stderr}")]
    Routing {
        /// The command line.
        command: String,
        /// What `ip` said.
        stderr: String,
    },
}

impl Error {
    /// Wraps `source` with `make`, unless the chain holds a permission error: those become
    /// [`Error::NotPermitted`] naming `what`, since the fix is always the same.
    pub(crate) fn classify<E>(what: impl Into<String>, source: E, make: impl FnOnce(E) -> Self) -> Self
    where
        E: std::error::Error + 'static,
    {
        if is_permission_error(&source) {
            Self::NotPermitted { what: what.into() }
        } else {
            make(source)
        }
    }
}

/// Displays an error with its sources: aya's errors name the call, their sources say why.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(err) = next {
            write!(f, ": {err}")?;
            next = err.source();
        }
        Ok(())
    }
}

/// Whether an error or one of its sources is EPERM. (Not EACCES: the verifier refuses programs
/// with EACCES, and that is no privilege problem.)
fn is_permission_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        let eperm = match err.downcast_ref::<io::Error>() {
            Some(io) => io.raw_os_error() == Some(nix::libc::EPERM),
            None => err.downcast_ref::<nix::Error>() == Some(&nix::Error::EPERM),
        };
        if eperm {
            return true;
        }
        next = err.source();
    }
    false
}
