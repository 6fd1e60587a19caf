//! The loader: loads the embedded programs (or takes over pinned ones), attaches them to
//! interfaces (pinned TCX links or clsact tc filters, see [`crate::attach`]) and the listener
//! lookup to the network namespace (a pinned link), and edits the enrolled-address and listener
//! maps. Operates in the network namespace of the calling thread.

use std::{
    fmt, fs, io,
    net::{IpAddr, Ipv6Addr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    include_bytes_aligned,
    maps::{Array, HashMap, Map, MapData, MapError, SockHash},
    programs::{links::FdLink, SchedClassifier, SkLookup, TcAttachType},
    Ebpf,
};

use crate::{
    attach::{self, AttachMode, Slot},
    bpffs, routing, Error,
};

/// The object `build.rs` compiled from `src/bpf/capture.c`.
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture.o"));

const PROG_POD: &str = "weft_pod_in";
const PROG_POD_OUT: &str = "weft_pod_out";
const PROG_UPLINK: &str = "weft_uplink_in";
const PROG_LOOKUP: &str = "weft_listener_lookup";
const MAP_ENROLLED: &str = "weft_enrolled";
const MAP_CONFIG: &str = "weft_config";
const MAP_LISTENERS: &str = "weft_listeners";

const PIN_PROG_POD: &str = "prog_pod";
const PIN_PROG_POD_OUT: &str = "prog_pod_out";
const PIN_PROG_UPLINK: &str = "prog_uplink";
const PIN_PROG_LOOKUP: &str = "prog_lookup";
/// Every program pin of a capture.
const PIN_PROGS: [&str; 4] = [PIN_PROG_POD, PIN_PROG_POD_OUT, PIN_PROG_UPLINK, PIN_PROG_LOOKUP];
const PIN_MAP_ENROLLED: &str = "map_enrolled";
const PIN_MAP_CONFIG: &str = "map_config";
const PIN_MAP_LISTENERS: &str = "map_listeners";
const PIN_LINKS: &str = "links";
/// The listener lookup's link to the network namespace (beside [`PIN_LINKS`], which holds the
/// interfaces' attachments).
const PIN_LINK_LOOKUP: &str = "link_lookup";

/// Value flag in the enrolled map: capture this address's TCP traffic.
const ENROLLED_CAPTURE: u32 = 1;

/// The mark ztunnel's own sockets carry (SO_MARK): their packets to a pod pass the pod's egress
/// program instead of being turned back into ztunnel. Distinct from [`CaptureConfig::mark`], the
/// steering mark that routes assigned packets locally.
pub const SOCKET_MARK: u32 = 0x53a;
/// Istio's source address of kubelet's probes: node traffic from it reaches pods uncaptured (the
/// programs have it built in).
pub const PROBE_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 7, 127);
/// The IPv6 counterpart of [`PROBE_SOURCE_V4`].
pub const PROBE_SOURCE_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff);

/// What the capture steers where, and where it pins its objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// bpffs directory for this node's programs, maps and links (absolute, e.g.
    /// `/sys/fs/bpf/weft/<node>`; bpffs refuses names containing a dot). Created when missing;
    /// bpffs is mounted at /sys/fs/bpf when nothing is.
    pub pin_dir: PathBuf,
    /// Packet mark the programs set on steered packets; must not collide with other users of
    /// the mark on the node.
    pub mark: u32,
    /// Routing table holding the `local default dev lo` route for marked packets.
    pub table: u32,
    /// ztunnel's outbound listener (Istio: 15001).
    pub outbound_port: u16,
    /// ztunnel's HBONE listener, for traffic to a pod's port 15008 (Istio: 15008).
    pub inbound_hbone_port: u16,
    /// ztunnel's plaintext inbound listener, for traffic to any other pod port (Istio: 15006).
    pub inbound_plain_port: u16,
    /// How programs are attached to interfaces; `None` (the default) lets the kernel decide
    /// ([`AttachMode::detect`]: TCX on Linux 6.6+, tc filters before).
    pub attach: Option<AttachMode>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from("/sys/fs/bpf/weft"),
            mark: 0x539,
            table: 133,
            outbound_port: 15001,
            inbound_hbone_port: 15008,
            inbound_plain_port: 15006,
            attach: None,
        }
    }
}

impl CaptureConfig {
    fn validate(&self) -> Result<(), Error> {
        if !self.pin_dir.is_absolute() {
            return Err(Error::Config(format!(
                "pin_dir {} must be an absolute path on bpffs",
                self.pin_dir.display()
            )));
        }
        let name = self.pin_dir.file_name().map(|n| n.to_string_lossy());
        if name.is_none_or(|n| n.contains('.')) {
            return Err(Error::Config(format!(
                "pin_dir {} needs a last component without dots (bpffs refuses them)",
                self.pin_dir.display()
            )));
        }
        if self.mark == 0 || self.mark == SOCKET_MARK {
            return Err(Error::Config(format!(
                "mark must not be 0 or ztunnel's socket mark {SOCKET_MARK:#x}"
            )));
        }
        // 0 is unspecified; 253-255 are the default, main and local tables.
        if matches!(self.table, 0 | 253..=255) {
            return Err(Error::Config(format!("table {} is reserved; pick another (e.g. 133)", self.table)));
        }
        let ports = [self.outbound_port, self.inbound_hbone_port, self.inbound_plain_port];
        if ports.contains(&0) || ports[0] == ports[1] || ports[0] == ports[2] || ports[1] == ports[2] {
            return Err(Error::Config(format!(
                "ports must be non-zero and distinct (outbound {}, HBONE {}, plaintext {})",
                ports[0], ports[1], ports[2]
            )));
        }
        Ok(())
    }
}

/// The capture of one node: programs, maps and links pinned under [`CaptureConfig::pin_dir`].
/// Dropping it keeps everything in place; [`remove`] takes it away.
pub struct Capture {
    cfg: CaptureConfig,
    mode: AttachMode,
    pod: SchedClassifier,
    pod_out: SchedClassifier,
    uplink: SchedClassifier,
    enrolled: HashMap<MapData, [u8; 16], u32>,
    config: Array<MapData, ConfigValue>,
    listeners: SockHash<MapData, u32>,
}

/// Which program an attachment is for.
#[derive(Clone, Copy)]
enum Kind {
    Pod,
    PodOut,
    Uplink,
}

impl Kind {
    fn pin_prefix(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::PodOut => "podout",
            Self::Uplink => "uplink",
        }
    }

    /// Where the program of this kind is pinned.
    fn pin_name(self) -> &'static str {
        match self {
            Self::Pod => PIN_PROG_POD,
            Self::PodOut => PIN_PROG_POD_OUT,
            Self::Uplink => PIN_PROG_UPLINK,
        }
    }

    fn direction(self) -> TcAttachType {
        match self {
            Self::PodOut => TcAttachType::Egress,
            Self::Pod | Self::Uplink => TcAttachType::Ingress,
        }
    }
}

impl Capture {
    /// Loads the programs and maps, or takes over those pinned under `cfg.pin_dir`, writes the
    /// ports and mark into the config map, and ensures the fwmark rule and local route in the
    /// current network namespace (idempotent).
    pub fn open(cfg: CaptureConfig) -> Result<Self, Error> {
        cfg.validate()?;
        let mode = match cfg.attach {
            Some(mode) => mode,
            None => AttachMode::detect()?,
        };
        bpffs::ensure(&cfg.pin_dir)?;
        if !cfg.pin_dir.exists() {
            load_and_pin(&cfg.pin_dir)?;
        } else if !cfg.pin_dir.join(object_marker()).exists() {
            replace_pinned(&cfg.pin_dir)?;
        }
        let dir = &cfg.pin_dir;
        for entry in
            PIN_PROGS.into_iter().chain([PIN_MAP_ENROLLED, PIN_MAP_CONFIG, PIN_MAP_LISTENERS, PIN_LINKS])
        {
            if !dir.join(entry).exists() {
                return Err(Error::IncompletePins { dir: dir.clone(), missing: entry.into() });
            }
        }
        let pod = open_program(&dir.join(PIN_PROG_POD))?;
        let pod_out = open_program(&dir.join(PIN_PROG_POD_OUT))?;
        let uplink = open_program(&dir.join(PIN_PROG_UPLINK))?;
        let enrolled = HashMap::try_from(open_map(&dir.join(PIN_MAP_ENROLLED))?)
            .map_err(|source| Error::Map { map: MAP_ENROLLED, source })?;
        let mut config: Array<MapData, ConfigValue> =
            Array::try_from(open_map(&dir.join(PIN_MAP_CONFIG))?)
                .map_err(|source| Error::Map { map: MAP_CONFIG, source })?;
        let listeners = SockHash::try_from(open_map(&dir.join(PIN_MAP_LISTENERS))?)
            .map_err(|source| Error::Map { map: MAP_LISTENERS, source })?;
        set_config(&mut config, &cfg, false)?;
        attach_lookup(dir)?;
        routing::ensure(cfg.mark, cfg.table)?;
        tracing::info!(pin_dir = %dir.display(), attach = %mode, "capture open");
        Ok(Self { cfg, mode, pod, pod_out, uplink, enrolled, config, listeners })
    }

    /// Tells the capture which socket is ztunnel's listener on `port` (one of the configured
    /// ports), for the SYNs only the kernel's listener lookup can deliver: those reusing the
    /// ports of a connection ztunnel closed, still in TIME_WAIT. The entry goes when the socket
    /// closes. Call it for every listener whenever the process takes them (bound or handed over).
    pub fn set_listener(&mut self, port: u16, listener: &impl AsFd) -> Result<(), Error> {
        self.listeners
            .insert(u32::from(port), listener.as_fd(), 0)
            .map_err(|source| Error::Map { map: MAP_LISTENERS, source })
    }

    /// Attaches the pod programs to a pod's host-side veth (ingress and egress), pinning the
    /// links or recording the tc filters, and sets the veth's `accept_local` (the node's own
    /// packets to the pod come back in on it). Idempotent; a stale pinned link (the veth was
    /// recreated) is replaced, as is an attachment of the other mode (made by an older loader).
    pub fn attach_pod(&mut self, host_ifname: &str) -> Result<(), Error> {
        self.attach(Kind::Pod, host_ifname)?;
        self.attach(Kind::PodOut, host_ifname)?;
        routing::accept_local(host_ifname)
    }

    /// Detaches the pod programs from a veth (whichever mode attached them) and unpins the
    /// links. Idempotent; the interface may already be gone.
    pub fn detach_pod(&mut self, host_ifname: &str) -> Result<(), Error> {
        self.detach(Kind::Pod, host_ifname)?;
        self.detach(Kind::PodOut, host_ifname)
    }

    /// Attaches the uplink program to the node's interface towards other nodes (ingress).
    /// Idempotent.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<(), Error> {
        self.attach(Kind::Uplink, ifname)
    }

    /// Detaches the uplink program from an interface. Idempotent.
    pub fn detach_uplink(&mut self, ifname: &str) -> Result<(), Error> {
        self.detach(Kind::Uplink, ifname)
    }

    /// Captures the TCP traffic of a pod address from now on: new connections. Connections the
    /// pod already has (their SYN passed uncaptured) go on untouched until they end.
    pub fn enroll(&mut self, ip: IpAddr) -> Result<(), Error> {
        self.set(ip, ENROLLED_CAPTURE)
    }

    /// Stops capturing a pod address: new connections pass untouched, while the connections
    /// ztunnel holds for it keep reaching ztunnel until they end. Idempotent.
    pub fn unenroll(&mut self, ip: IpAddr) -> Result<(), Error> {
        self.set(ip, 0)
    }

    /// Forgets a pod address (the pod left the node). Idempotent.
    pub fn forget(&mut self, ip: IpAddr) -> Result<(), Error> {
        match self.enrolled.remove(&key(ip)) {
            Ok(()) => Ok(()),
            Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(err)) if err.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Map { map: MAP_ENROLLED, source }),
        }
    }

    /// The enrolled (captured) addresses, in no particular order.
    pub fn enrolled(&self) -> Result<Vec<IpAddr>, Error> {
        Ok(self.pods()?.into_iter().filter(|(_, captured)| *captured).map(|(ip, _)| ip).collect())
    }

    /// Every pod address the capture knows, and whether it is captured, in no particular order.
    pub fn pods(&self) -> Result<Vec<(IpAddr, bool)>, Error> {
        self.enrolled
            .iter()
            .map(|entry| {
                entry
                    .map(|(k, flags)| (Ipv6Addr::from(k).to_canonical(), flags & ENROLLED_CAPTURE != 0))
                    .map_err(|source| Error::Map { map: MAP_ENROLLED, source })
            })
            .collect()
    }

    fn set(&mut self, ip: IpAddr, flags: u32) -> Result<(), Error> {
        self.enrolled.insert(key(ip), flags, 0).map_err(|source| Error::Map { map: MAP_ENROLLED, source })
    }

    /// Stops giving new connections to the listeners (their SYNs are dropped, and sent again
    /// by the clients) while connections already queued are still accepted: what a ztunnel does
    /// before it closes its listeners for good, so that nothing queued is reset. The next
    /// [`Capture::open`] resumes.
    pub fn pause_new_connections(&mut self) -> Result<(), Error> {
        set_config(&mut self.config, &self.cfg, true)
    }

    /// The configuration this capture was opened with.
    pub fn config(&self) -> &CaptureConfig {
        &self.cfg
    }

    /// How this capture attaches programs.
    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    fn attach(&mut self, kind: Kind, ifname: &str) -> Result<(), Error> {
        check_ifname(ifname)?;
        if nix::net::if_::if_nametoindex(ifname).is_err() {
            return Err(Error::InterfaceNotFound { ifname: ifname.into() });
        }
        let links = self.cfg.pin_dir.join(PIN_LINKS);
        let slot = Slot { links: &links, prefix: kind.pin_prefix(), ifname, direction: kind.direction() };
        let prog = match kind {
            Kind::Pod => &mut self.pod,
            Kind::PodOut => &mut self.pod_out,
            Kind::Uplink => &mut self.uplink,
        };
        attach::attach(prog, self.mode, &slot)?;
        tracing::info!(ifname, kind = kind.pin_prefix(), attach = %self.mode, "capture attached");
        Ok(())
    }

    fn detach(&mut self, kind: Kind, ifname: &str) -> Result<(), Error> {
        check_ifname(ifname)?;
        let links = self.cfg.pin_dir.join(PIN_LINKS);
        attach::detach(&Slot {
            links: &links,
            prefix: kind.pin_prefix(),
            ifname,
            direction: kind.direction(),
        })?;
        tracing::info!(ifname, kind = kind.pin_prefix(), "capture detached");
        Ok(())
    }
}

/// The config map's value (see `CFG_*` in capture.c).
type ConfigValue = [u32; 6];

fn set_config(map: &mut Array<MapData, ConfigValue>, cfg: &CaptureConfig, paused: bool) -> Result<(), Error> {
    let value = [
        cfg.mark,
        u32::from(cfg.outbound_port),
        u32::from(cfg.inbound_hbone_port),
        u32::from(cfg.inbound_plain_port),
        SOCKET_MARK,
        u32::from(paused),
    ];
    map.set(0, value, 0).map_err(|source| Error::Map { map: MAP_CONFIG, source })
}

impl fmt::Debug for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capture").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// Detaches everything pinned under `cfg.pin_dir` (the tc filters it records are deleted in the
/// current network namespace), unpins it (the programs and maps are unloaded once no process
/// holds them: drop every [`Capture`] of this directory first), and removes the fwmark rule and
/// local route from the current network namespace. Idempotent.
pub fn remove(cfg: &CaptureConfig) -> Result<(), Error> {
    cfg.validate()?;
    attach::detach_all_tc(&cfg.pin_dir.join(PIN_LINKS))?;
    match fs::remove_dir_all(&cfg.pin_dir) {
        Ok(()) => tracing::info!(pin_dir = %cfg.pin_dir.display(), "capture unpinned"),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(io_error("removing", &cfg.pin_dir, source));
        }
    }
    routing::remove(cfg.mark, cfg.table)
}

/// IDs of the capture programs pinned anywhere under `dir` (every capture of a cluster, say),
/// read before [`remove`] so that [`wait_unloaded`] can tell when the kernel has let go of them.
/// A `dir` that is not there has none.
pub fn pinned_program_ids(dir: &Path) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if path.is_dir() {
                dirs.push(path);
            } else if PIN_PROGS.contains(&name) {
                // Only by its name: the kernel reads a link's info as a program's too.
                if let Ok(info) = aya::programs::ProgramInfo::from_pin(&path) {
                    ids.push(info.id());
                }
            }
        }
    }
    ids
}

/// Waits until none of the programs `ids` is loaded, for at most `timeout`; `Err` names those
/// still loaded then. The kernel frees a program only after its last holder is gone, and tc
/// filters and the interfaces of a deleted network namespace go asynchronously, after an RCU
/// grace period: a moment after [`remove`] or `ip netns del` returns, not at once.
pub fn wait_unloaded(ids: &[u32], timeout: std::time::Duration) -> Result<(), Vec<u32>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let loaded: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .filter(|id| ids.contains(id))
            .collect();
        if loaded.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(loaded);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Loads the embedded object and pins its programs and maps into `dir`, atomically: everything
/// is pinned into a sibling directory first, which is then renamed.
fn load_and_pin(dir: &Path) -> Result<(), Error> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).map_err(|source| io_error("creating", parent, source))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // bpffs refuses names with a dot.
    let tmp = parent.join(format!("{name}-loading-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(|source| io_error("creating", &tmp, source))?;
    let pinned = pin_fresh(&tmp);
    let renamed = pinned.and_then(|()| match fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another loader won the race: take its objects over.
        Err(_) if dir.exists() => Ok(()),
        Err(source) => Err(io_error("renaming into place", dir, source)),
    });
    let _ = fs::remove_dir_all(&tmp);
    renamed
}

fn pin_fresh(dir: &Path) -> Result<(), Error> {
    let load_err = |what: &str| {
        let what = what.to_owned();
        move |source: Box<dyn std::error::Error + Send + Sync>| Error::Load { what: what.clone(), source }
    };
    let mut ebpf = Ebpf::load(OBJECT).map_err(|source| {
        Error::classify("loading the eBPF object", source, |source| Error::Load {
            what: "object".into(),
            source: Box::new(source),
        })
    })?;
    for (prog_name, pin_name) in
        [(PROG_POD, PIN_PROG_POD), (PROG_POD_OUT, PIN_PROG_POD_OUT), (PROG_UPLINK, PIN_PROG_UPLINK)]
    {
        let what = format!("program {prog_name}");
        let prog: &mut SchedClassifier = ebpf
            .program_mut(prog_name)
            .ok_or_else(|| load_err(&what)("missing from the object".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| load_err(&what)(Box::new(e)))?;
        prog.load().map_err(|source| {
            Error::classify(format!("loading {what}"), source, |source| load_err(&what)(Box::new(source)))
        })?;
        let path = dir.join(pin_name);
        prog.pin(&path).map_err(|source| pin_error("pinning program", &path, source))?;
    }
    let lookup: &mut SkLookup = ebpf
        .program_mut(PROG_LOOKUP)
        .ok_or_else(|| load_err(PROG_LOOKUP)("missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| load_err(PROG_LOOKUP)(Box::new(e)))?;
    lookup.load().map_err(|source| {
        Error::classify(format!("loading {PROG_LOOKUP}"), source, |source| {
            load_err(PROG_LOOKUP)(Box::new(source))
        })
    })?;
    let path = dir.join(PIN_PROG_LOOKUP);
    lookup.pin(&path).map_err(|source| pin_error("pinning program", &path, source))?;
    for (map_name, pin_name) in
        [(MAP_ENROLLED, PIN_MAP_ENROLLED), (MAP_CONFIG, PIN_MAP_CONFIG), (MAP_LISTENERS, PIN_MAP_LISTENERS)]
    {
        let map = ebpf
            .map(map_name)
            .ok_or_else(|| load_err(&format!("map {map_name}"))("missing from the object".into()))?;
        let path = dir.join(pin_name);
        map.pin(&path).map_err(|source| pin_error("pinning map", &path, source))?;
    }
    let links = dir.join(PIN_LINKS);
    fs::create_dir(&links).map_err(|source| io_error("creating", &links, source))?;
    let marker = dir.join(object_marker());
    fs::create_dir(&marker).map_err(|source| io_error("creating", &marker, source))
}

/// Whether `pin_dir` holds this loader's own programs: when not (nothing pinned yet, or another
/// version's programs), [`Capture::open`] loads the object, which costs the loading process
/// the heap that parsing the kernel's BTF takes.
pub fn pinned_current(pin_dir: &Path) -> bool {
    pin_dir.join(object_marker()).exists()
}

/// The directory in a pin directory that names the object its programs came from
/// (`object-<FNV-1a of the object>`; bpffs holds directories, not files).
fn object_marker() -> String {
    let hash = OBJECT
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    format!("object-{hash:016x}")
}

/// Replaces programs pinned by another version of this loader (an upgrade) without a moment
/// uncaptured: the new object is loaded and pinned beside `dir`, the enrolled addresses are
/// copied over, every recorded attachment gets the new program (a tc filter is replaced in
/// place, atomically; a new TCX link goes first in the chain before the old one is unpinned),
/// and then the new directory takes the old one's place. The old programs and maps go once no
/// process holds them (a ztunnel of the old version still running keeps its own copies).
fn replace_pinned(dir: &Path) -> Result<(), Error> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let pid = std::process::id();
    let tmp = parent.join(format!("{name}-loading-{pid}"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(|source| io_error("creating", &tmp, source))?;
    let replaced = pin_fresh(&tmp).and_then(|()| {
        copy_enrolled(dir, &tmp);
        reattach(&dir.join(PIN_LINKS), &tmp)?;
        attach_lookup(&tmp)
    });
    if let Err(e) = replaced {
        // The old attachments still run the old programs: capture goes on as it was.
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!("{name}-old-{pid}"));
    fs::rename(dir, &old).map_err(|source| io_error("moving aside", dir, source))?;
    fs::rename(&tmp, dir).map_err(|source| io_error("renaming into place", dir, source))?;
    // Unpinning the old TCX links detaches the old programs (the new ones run before them
    // already); the old tc markers only record filters that now run the new programs.
    fs::remove_dir_all(&old).map_err(|source| io_error("removing", &old, source))?;
    tracing::info!(pin_dir = %dir.display(), "capture programs of another version replaced");
    Ok(())
}

/// Copies the enrolled map of the pin directory `from` into the one pinned in `to`; an old map
/// that cannot be read is logged and skipped (ztunnel writes every local pod again on its first
/// update).
fn copy_enrolled(from: &Path, to: &Path) {
    let open = |dir: &Path| -> Result<HashMap<MapData, [u8; 16], u32>, Error> {
        HashMap::try_from(open_map(&dir.join(PIN_MAP_ENROLLED))?)
            .map_err(|source| Error::Map { map: MAP_ENROLLED, source })
    };
    let copied = open(from).and_then(|old| {
        let mut new = open(to)?;
        for entry in old.iter() {
            let (k, v) = entry.map_err(|source| Error::Map { map: MAP_ENROLLED, source })?;
            new.insert(k, v, 0).map_err(|source| Error::Map { map: MAP_ENROLLED, source })?;
        }
        Ok(())
    });
    if let Err(e) = copied {
        tracing::warn!(error = %e, "cannot copy the enrolled pods of the replaced capture");
    }
}

/// Gives every attachment recorded under `links` the program of the same kind pinned in `to`,
/// recording it under `to`'s links, in the attachment's own mode.
fn reattach(links: &Path, to: &Path) -> Result<(), Error> {
    let entries = match fs::read_dir(links) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(io_error("listing", links, source)),
    };
    let new_links = to.join(PIN_LINKS);
    for entry in entries {
        let entry = entry.map_err(|source| io_error("listing", links, source))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let (mode, rest) = match name.strip_prefix("tc_") {
            Some(rest) => (AttachMode::Tc, rest),
            None => (AttachMode::Tcx, name.as_str()),
        };
        let Some((kind, ifname)) = [Kind::PodOut, Kind::Pod, Kind::Uplink].into_iter().find_map(|k| {
            rest.strip_prefix(k.pin_prefix()).and_then(|r| r.strip_prefix('_')).map(|i| (k, i))
        }) else {
            continue;
        };
        if nix::net::if_::if_nametoindex(ifname).is_err() {
            continue; // the interface is gone, and its attachment with it
        }
        let mut prog = open_program(&to.join(kind.pin_name()))?;
        let slot = Slot { links: &new_links, prefix: kind.pin_prefix(), ifname, direction: kind.direction() };
        attach::attach(&mut prog, mode, &slot)?;
    }
    Ok(())
}

/// Attaches the listener lookup pinned in `dir` to the calling thread's network namespace and
/// pins the link, unless a link is pinned there already. Another version's lookup, attached
/// too while [`replace_pinned`] runs, goes with its directory.
fn attach_lookup(dir: &Path) -> Result<(), Error> {
    let pin = dir.join(PIN_LINK_LOOKUP);
    if pin.exists() {
        return Ok(());
    }
    let path = dir.join(PIN_PROG_LOOKUP);
    let mut prog =
        SkLookup::from_pin(&path).map_err(|source| pin_error("opening pinned program", &path, source))?;
    let netns_path = Path::new("/proc/thread-self/ns/net");
    let netns = fs::File::open(netns_path).map_err(|source| io_error("opening", netns_path, source))?;
    let attach_err = |what: &'static str| {
        move |source: aya::programs::ProgramError| {
            Error::classify(format!("{what} the listener lookup"), source, |source| Error::AttachNetns {
                what,
                source: Box::new(source),
            })
        }
    };
    let id = prog.attach(&netns).map_err(attach_err("attaching"))?;
    let link = FdLink::from(prog.take_link(id).map_err(attach_err("taking the link of"))?);
    link.pin(&pin).map_err(|source| pin_error("pinning link", &pin, source))?;
    Ok(())
}

fn open_program(path: &Path) -> Result<SchedClassifier, Error> {
    SchedClassifier::from_pin(path).map_err(|source| pin_error("opening pinned program", path, source))
}

fn open_map(path: &Path) -> Result<Map, Error> {
    let data = MapData::from_pin(path).map_err(|source| pin_error("opening pinned map", path, source))?;
    Map::from_map_data(data).map_err(|source| pin_error("opening pinned map", path, source))
}

fn pin_error<E>(what: &'static str, path: &Path, source: E) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    Error::classify(format!("{what} {}", path.display()), source, |source| Error::Pin {
        what,
        path: path.to_owned(),
        source: Box::new(source),
    })
}

fn io_error(what: &'static str, path: &Path, source: io::Error) -> Error {
    if source.raw_os_error() == Some(nix::libc::EPERM) {
        return Error::NotPermitted { what: format!("{what} {}", path.display()) };
    }
    Error::Io { what, path: path.to_owned(), source }
}

/// Interface names are at most 15 bytes and become part of a pin path.
fn check_ifname(ifname: &str) -> Result<(), Error> {
    if ifname.is_empty()
        || ifname.len() > 15
        || ifname.contains(['/', '\0'])
        || ifname == "."
        || ifname == ".."
    {
        return Err(Error::InterfaceNotFound { ifname: ifname.into() });
    }
    Ok(())
}

/// The enrolled map's key: IPv6 as is, IPv4 mapped (::ffff:a.b.c.d).
fn key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_ipv4_into_ipv6() {
        let v4: IpAddr = "10.10.1.5".parse().unwrap_or(IpAddr::V4([0; 4].into()));
        let k = key(v4);
        assert_eq!(&k[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&k[12..], &[10, 10, 1, 5]);
        assert_eq!(Ipv6Addr::from(k).to_canonical(), v4);
        let v6: IpAddr = "fd00::5".parse().unwrap_or(IpAddr::V4([0; 4].into()));
        assert_eq!(Ipv6Addr::from(key(v6)).to_canonical(), v6);
    }

    #[test]
    fn config_is_validated() {
        assert!(CaptureConfig::default().validate().is_ok());
        let bad = [
            CaptureConfig { mark: 0, ..Default::default() },
            CaptureConfig { table: 254, ..Default::default() },
            CaptureConfig { inbound_plain_port: 15001, ..Default::default() },
            CaptureConfig { pin_dir: "weft".into(), ..Default::default() },
            CaptureConfig { pin_dir: "/sys/fs/bpf/weft/node.a".into(), ..Default::default() },
        ];
        for cfg in bad {
            assert!(matches!(cfg.validate(), Err(Error::Config(_))), "{cfg:?}");
        }
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("veth1234abcd").is_ok());
        for bad in ["", "a/b", "..", "sixteen-chars-xx"] {
            assert!(check_ifname(bad).is_err(), "{bad}");
        }
    }
}
