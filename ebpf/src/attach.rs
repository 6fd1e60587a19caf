//! How a loaded program is attached to an interface so that it outlives the loader: a pinned
//! TCX link (Linux 6.6+), or a direct-action filter on the interface's clsact qdisc, made over
//! netlink at Weft's reserved priority and handle (Linux 5.10 to 6.5), with a marker directory
//! in the pin directory saying so. Knows nothing of what the programs do.
//!
//! A tc filter is no bpf link: it is not held by a file descriptor and cannot be pinned, it
//! stays on the qdisc until deleted. aya detaches the filters it made when their
//! `SchedClassifierLink` (or the program holding it) is dropped, so the link is taken from the
//! program and forgotten: the filter then stays when the loader exits, as a pinned TCX link does.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    Link, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
};

use crate::Error;

/// The tc filter priority Weft's filters take: 1, the first to run, so no filter before ours
/// can let an enrolled pod's packet pass (TCX links are put first in their chain likewise).
pub const TC_PRIORITY: u16 = 1;
/// The tc filter handle Weft's filters take at [`TC_PRIORITY`] (`0x5745`, "WE"); a filter at
/// this priority and handle is Weft's, and is replaced or deleted as such.
pub const TC_HANDLE: u32 = 0x5745;

/// The oldest kernel the capture runs on (clsact attachment; `bpf_sk_assign` and the socket
/// lookups in tc programs are older).
const MIN_KERNEL: (u32, u32) = (5, 10);
/// The first kernel with TCX links.
const TCX_KERNEL: (u32, u32) = (6, 6);

/// Prefix of the marker directory (`links/tc_<kind>_<if>`) that records a tc filter attachment.
const TC_MARKER_PREFIX: &str = "tc_";

/// How the capture's programs are attached to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttachMode {
    /// TCX links, pinned in bpffs (Linux 6.6+).
    Tcx,
    /// Direct-action filters on a clsact qdisc, made over netlink (any kernel the capture runs
    /// on, Linux 5.10+).
    Tc,
}

impl AttachMode {
    /// The mode this kernel gets: TCX where the kernel has it (probed by querying the TCX
    /// programs of `lo`, which kernels without TCX refuse with EINVAL; by the kernel version when
    /// the query is not permitted), else tc. [`Error::Unsupported`] below Linux 5.10.
    pub fn detect() -> Result<Self, Error> {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let version = parse_release(release.trim());
        let by_version = version.map(|(major, minor)| (major, minor, Self::for_kernel(major, minor)));
        if let Some((_, _, None)) = by_version {
            return Err(Error::Unsupported(format!(
                "the capture needs Linux {}.{} or later (TCX links from {}.{}, a clsact qdisc and tc \
                 filters before); this kernel is {}: run the node on a newer kernel (Debian 11+, \
                 Ubuntu 22.04+, RHEL 9+)",
                MIN_KERNEL.0,
                MIN_KERNEL.1,
                TCX_KERNEL.0,
                TCX_KERNEL.1,
                release.trim()
            )));
        }
        match SchedClassifier::query_tcx("lo", TcAttachType::Ingress) {
            Ok(_) => Ok(Self::Tcx),
            Err(err) if os_error(&err) == Some(nix::libc::EINVAL) => Ok(Self::Tc),
            // Not permitted to ask (or no lo): the version decides; unknown, try TCX.
            Err(_) => Ok(by_version.and_then(|(_, _, mode)| mode).unwrap_or(Self::Tcx)),
        }
    }

    /// The mode a kernel of this version gets, `None` when the capture does not run on it.
    pub fn for_kernel(major: u32, minor: u32) -> Option<Self> {
        if (major, minor) >= TCX_KERNEL {
            Some(Self::Tcx)
        } else if (major, minor) >= MIN_KERNEL {
            Some(Self::Tc)
        } else {
            None
        }
    }

    /// The name [`FromStr`] parses: `tcx` or `tc`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Tc => "tc",
        }
    }

    /// What the mode is, for an operator.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Tcx => "TCX links (Linux 6.6+)",
            Self::Tc => "a clsact qdisc and tc filters over netlink (TCX needs Linux 6.6)",
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttachMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcx" => Ok(Self::Tcx),
            "tc" => Ok(Self::Tc),
            other => Err(format!("{other:?} is no attach mode: `tcx` or `tc`")),
        }
    }
}

/// One program's place on one interface, and where its pin or marker lives.
pub(crate) struct Slot<'a> {
    /// `<pin_dir>/links`.
    pub links: &'a Path,
    /// The program's pin prefix (`pod`, `podout`, `uplink`).
    pub prefix: &'static str,
    pub ifname: &'a str,
    pub direction: TcAttachType,
}

impl Slot<'_> {
    /// `links/<prefix>_<if>`: the pinned TCX link.
    fn tcx_pin(&self) -> PathBuf {
        self.links.join(format!("{}_{}", self.prefix, self.ifname))
    }

    /// `links/tc_<prefix>_<if>`: an empty directory saying a tc filter was attached.
    fn tc_marker(&self) -> PathBuf {
        self.links.join(format!("{TC_MARKER_PREFIX}{}_{}", self.prefix, self.ifname))
    }

    fn err(&self, what: &'static str) -> impl FnOnce(ProgramError) -> Error + '_ {
        move |source| {
            Error::classify(format!("{what} on {}", self.ifname), source, |source| Error::Attach {
                what,
                ifname: self.ifname.into(),
                source: Box::new(source),
            })
        }
    }
}

/// Attaches `prog` at `slot` in `mode`. Idempotent; a stale attachment (the interface was
/// recreated) is replaced, and one made in the other mode (by a loader of another mode) is
/// removed once the new one is in place, so the interface is never left uncaptured.
pub(crate) fn attach(prog: &mut SchedClassifier, mode: AttachMode, slot: &Slot<'_>) -> Result<(), Error> {
    match mode {
        AttachMode::Tcx => {
            attach_tcx(prog, slot)?;
            detach_tc(slot)
        }
        AttachMode::Tc => {
            attach_tc(prog, slot)?;
            detach_tcx(slot)
        }
    }
}

/// Removes whatever Weft attached at `slot`, in either mode. Idempotent; the interface may be
/// gone.
pub(crate) fn detach(slot: &Slot<'_>) -> Result<(), Error> {
    detach_tcx(slot)?;
    detach_tc(slot)
}

/// Deletes the tc filters the markers under `links` record, in the current network namespace
/// (the TCX links go with their pins). For removing the whole capture.
pub(crate) fn detach_all_tc(links: &Path) -> Result<(), Error> {
    let entries = match fs::read_dir(links) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(Error::Io { what: "listing", path: links.to_owned(), source }),
    };
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io { what: "listing", path: links.to_owned(), source })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TC_MARKER_PREFIX) else { continue };
        let found = [
            ("podout_", TcAttachType::Egress),
            ("pod_", TcAttachType::Ingress),
            ("uplink_", TcAttachType::Ingress),
        ]
        .into_iter()
        .find_map(|(prefix, direction)| rest.strip_prefix(prefix).map(|ifname| (prefix, ifname, direction)));
        let Some((prefix, ifname, direction)) = found else { continue };
        let slot = Slot { links, prefix: prefix.trim_end_matches('_'), ifname, direction };
        detach_tc(&slot)?;
    }
    Ok(())
}

fn attach_tcx(prog: &mut SchedClassifier, slot: &Slot<'_>) -> Result<(), Error> {
    let pin = slot.tcx_pin();
    if pin.exists() {
        let id = prog.info().map_err(slot.err("reading the program id"))?.id();
        let (_, attached) = SchedClassifier::query_tcx(slot.ifname, slot.direction)
            .map_err(slot.err("querying tcx programs"))?;
        if attached.iter().any(|p| p.id() == id) {
            return Ok(());
        }
        // The interface was recreated under the same name (e.g. the pod restarted): the
        // pinned link points at the old one.
        tracing::info!(ifname = slot.ifname, "replacing a stale pinned link");
        remove_path(&pin)?;
    }
    // First in the chain, so no program before ours can let an enrolled pod's packet pass.
    let link_id = prog
        .attach_with_options(slot.ifname, slot.direction, TcAttachOptions::TcxOrder(LinkOrder::first()))
        .map_err(slot.err("attaching (tcx)"))?;
    let link = prog.take_link(link_id).map_err(slot.err("taking the link"))?;
    let link = FdLink::try_from(link).map_err(|source| Error::Attach {
        what: "converting the tcx link",
        ifname: slot.ifname.into(),
        source: Box::new(source),
    })?;
    link.pin(&pin).map_err(|source| {
        Error::classify(format!("pinning {}", pin.display()), source, |source| Error::Pin {
            what: "pinning link",
            path: pin.clone(),
            source: Box::new(source),
        })
    })?;
    Ok(())
}

fn attach_tc(prog: &mut SchedClassifier, slot: &Slot<'_>) -> Result<(), Error> {
    // The marker first: a crash after it and before the filter leaves a marker whose filter
    // is missing, which detach tolerates; the other order could leave an unrecorded filter.
    let marker = slot.tc_marker();
    match fs::create_dir(&marker) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(io_error("creating", &marker, source)),
    }
    match tc::qdisc_add_clsact(slot.ifname) {
        Ok(()) => {}
        Err(TcError::NetlinkError(err)) if err.raw_os_error() == Some(nix::libc::EEXIST) => {}
        Err(source) => {
            return Err(slot.err("adding the clsact qdisc")(ProgramError::TcError(source)));
        }
    }
    let options = || NlOptions { priority: TC_PRIORITY, handle: TcHandle::from(TC_HANDLE), classid: None };
    let link_id =
        match prog.attach_with_options(slot.ifname, slot.direction, TcAttachOptions::Netlink(options())) {
            Ok(id) => id,
            // Weft's filter is there (a restarted loader, or the same attach again): replace its
            // program in place, atomically (cls_bpf swaps the program under RCU).
            Err(err) if os_error(&err) == Some(nix::libc::EEXIST) => {
                let existing = SchedClassifierLink::attached(
                    slot.ifname,
                    slot.direction,
                    TC_PRIORITY,
                    TC_HANDLE.into(),
                    None,
                )
                .map_err(|e| slot.err("finding the tc filter")(ProgramError::IOError(e)))?;
                prog.attach_to_link(existing).map_err(slot.err("replacing the tc filter"))?
            }
            Err(err) => {
                // EINVAL here: another filter of another protocol or kind holds priority 1.
                return Err(slot.err("attaching (tc filter, priority 1)")(err));
            }
        };
    let link = prog.take_link(link_id).map_err(slot.err("taking the link"))?;
    // Dropping the link would delete the filter; it must outlive this process.
    std::mem::forget(link);
    Ok(())
}

fn detach_tcx(slot: &Slot<'_>) -> Result<(), Error> {
    let pin = slot.tcx_pin();
    // Unpinning drops the last reference to the link, which detaches it.
    match PinnedLink::from_pin(&pin) {
        Ok(link) => {
            let unpinned =
                link.unpin().map_err(|source| Error::Io { what: "unpinning", path: pin.clone(), source })?;
            drop(unpinned);
            Ok(())
        }
        Err(_) if !pin.exists() => Ok(()),
        Err(source) => Err(Error::Pin { what: "opening pinned link", path: pin, source: Box::new(source) }),
    }
}

/// Deletes Weft's filter (at [`TC_PRIORITY`] and [`TC_HANDLE`]) and the marker. Other filters and
/// the clsact qdisc stay: other tools may use the qdisc, and an empty one passes every packet.
fn detach_tc(slot: &Slot<'_>) -> Result<(), Error> {
    let marker = slot.tc_marker();
    if !marker.exists() {
        return Ok(());
    }
    match SchedClassifierLink::attached(slot.ifname, slot.direction, TC_PRIORITY, TC_HANDLE.into(), None) {
        Ok(link) => match link.detach() {
            Ok(()) => {}
            // No such filter (ENOENT), or no clsact qdisc or another protocol at the priority
            // (EINVAL), or the interface is gone: nothing of ours is attached.
            Err(err)
                if matches!(
                    os_error(&err),
                    Some(nix::libc::ENOENT | nix::libc::EINVAL | nix::libc::ENODEV)
                ) => {}
            Err(err) => return Err(slot.err("deleting the tc filter")(err)),
        },
        // The interface is gone, and the filter with it.
        Err(err)
            if err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(nix::libc::ENODEV) => {}
        Err(e) => return Err(slot.err("finding the tc filter")(ProgramError::IOError(e))),
    }
    remove_path(&marker)
}

/// (major, minor) of a kernel release string such as `5.15.0-91-generic`.
pub(crate) fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// The OS error code under an aya program error, if there is one.
fn os_error(err: &ProgramError) -> Option<i32> {
    match err {
        ProgramError::SyscallError(err) => err.io_error.raw_os_error(),
        ProgramError::NetlinkError(err) | ProgramError::TcError(TcError::NetlinkError(err)) => {
            err.raw_os_error()
        }
        ProgramError::TcError(TcError::IoError(err)) | ProgramError::IOError(err) => err.raw_os_error(),
        _ => None,
    }
}

fn io_error(what: &'static str, path: &Path, source: io::Error) -> Error {
    if source.raw_os_error() == Some(nix::libc::EPERM) {
        return Error::NotPermitted { what: format!("{what} {}", path.display()) };
    }
    Error::Io { what, path: path.to_owned(), source }
}

/// Removes a pin (file) or marker (empty directory). Idempotent.
fn remove_path(path: &Path) -> Result<(), Error> {
    let removed = if path.is_dir() { fs::remove_dir(path) } else { fs::remove_file(path) };
    match removed {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(io_error("removing", path, source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_version_picks_the_mode() {
        for (version, mode) in [
            ((4, 19), None),
            ((5, 4), None),
            ((5, 10), Some(AttachMode::Tc)),
            ((5, 14), Some(AttachMode::Tc)),
            ((5, 15), Some(AttachMode::Tc)),
            ((6, 1), Some(AttachMode::Tc)),
            ((6, 5), Some(AttachMode::Tc)),
            ((6, 6), Some(AttachMode::Tcx)),
            ((6, 18), Some(AttachMode::Tcx)),
            ((7, 0), Some(AttachMode::Tcx)),
        ] {
            assert_eq!(AttachMode::for_kernel(version.0, version.1), mode, "{version:?}");
        }
    }

    #[test]
    fn releases_parse() {
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("6.18.44-fc-v1045"), Some((6, 18)));
        assert_eq!(parse_release("5.14.0-427.el9.x86_64"), Some((5, 14)));
        assert_eq!(parse_release(""), None);
        assert_eq!(parse_release("six"), None);
    }

    #[test]
    fn modes_parse_by_name() {
        for mode in [AttachMode::Tcx, AttachMode::Tc] {
            assert_eq!(mode.as_str().parse::<AttachMode>(), Ok(mode));
        }
        assert!("auto".parse::<AttachMode>().is_err());
        assert!("TCX".parse::<AttachMode>().is_err());
    }
}
