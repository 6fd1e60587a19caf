#![allow(clippy::unwrap_used)]
//! The capture on real kernel networking: each test builds its own network namespaces (a node,
//! a pod on it, a remote node behind the node's uplink), loads the programs into the node's
//! namespace and checks where TCP connections land. Every test runs in both attach modes (the
//! `tcx::` and `tc::` tests, see [`in_both_modes`]). Needs root and `ip netns`; without them the
//! tests print why and pass, unless CI=true, where they fail.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use aya::{maps::MapData, programs::SchedClassifier, programs::TcAttachType};
use ebpf::{AttachMode, Capture, CaptureConfig};

use socket2::{Domain, Socket, Type};

const POD: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 5);
/// A second pod on the same node, never enrolled.
const POD2: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 6);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 5);
const REMOTE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);
/// An address that exists nowhere: only capture can answer it.
const NOWHERE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 7);
const NOWHERE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 7);
/// The host side of the pod's veth and the node's uplink, in the node namespace.
const POD_VETH: &str = "vpod";
const POD2_VETH: &str = "vpod2";
const UPLINK: &str = "up0";
const SHORT: Duration = Duration::from_millis(300);
const CONNECT: Duration = Duration::from_secs(2);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Every test below takes the attach mode; this makes a `tcx::<test>` and a `tc::<test>` of each.
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod tcx {
            $(#[test] fn $name() { super::$name(ebpf::AttachMode::Tcx) })*
        }
        mod tc {
            $(#[test] fn $name() { super::$name(ebpf::AttachMode::Tc) })*
        }
    };
}

in_both_modes!(
    outbound_connection_lands_on_the_transparent_listener,
    same_node_pods_meet_through_ztunnel,
    outbound_ipv6_lands_on_a_dual_stack_listener,
    enrollment_decides_capture_at_runtime,
    open_connections_survive_enrollment_and_unenrollment,
    a_paused_capture_drops_new_connections_and_keeps_queued_ones,
    another_versions_programs_are_replaced_without_a_gap,
    enrolled_pod_without_listener_fails_closed,
    inbound_on_the_uplink_and_transparent_upstream,
    pinned_capture_outlives_the_loader_and_is_taken_over,
    capture_outlives_a_loader_process_that_exits,
    remove_takes_everything_away,
    errors_name_the_problem,
    recreated_veth_gets_a_fresh_link,
    a_loader_of_the_other_mode_takes_over_without_a_gap,
    other_tc_filters_and_the_qdisc_are_left_alone,
    a_connection_reusing_the_ports_of_one_ztunnel_closed_is_captured,
);

/// Three namespaces and a pin directory, deleted on drop (also when the test panics).
struct Topology {
    mode: AttachMode,
    node: String,
    pod: String,
    pod2: String,
    remote: String,
    pin_dir: PathBuf,
}

impl Topology {
    /// Builds the topology for a capture attaching in `mode`, or `None` when the test must be
    /// skipped.
    fn new(mode: AttachMode) -> Option<Self> {
        if !weft_core::testing::netns_usable("eBPF capture test") {
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("weft-ebpf-{}-{n}", std::process::id());
        let topo = Self {
            mode,
            node: format!("{base}-node"),
            pod: format!("{base}-pod"),
            pod2: format!("{base}-pod2"),
            remote: format!("{base}-remote"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/weft-test/{base}")),
        };
        let (node, pod, pod2, remote) = (&topo.node, &topo.pod, &topo.pod2, &topo.remote);
        let script = format!(
            r#"set -e
for ns in {node} {pod} {pod2} {remote}; do
  ip netns add $ns
  ip -n $ns link set lo up
  ip netns exec $ns sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
done
ip netns exec {node} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
ip -n {node} link add {POD_VETH} type veth peer name eth0 netns {pod}
ip -n {node} link add {UPLINK} type veth peer name up0 netns {remote}
# The pod: /32 (/128) addresses and an on-link default route via the node.
ip -n {node} addr add 169.254.1.1/32 dev {POD_VETH}
ip -n {node} addr add fd00:ff::1/128 dev {POD_VETH} nodad
ip -n {node} link set {POD_VETH} up
ip -n {pod} addr add {POD}/32 dev eth0
ip -n {pod} addr add {POD6}/128 dev eth0 nodad
ip -n {pod} link set eth0 up
ip -n {pod} route add 169.254.1.1 dev eth0
ip -n {pod} route add default via 169.254.1.1 dev eth0
ip -n {pod} -6 route add fd00:ff::1 dev eth0
ip -n {pod} -6 route add default via fd00:ff::1 dev eth0
ip -n {node} route add {POD}/32 dev {POD_VETH}
ip -n {node} -6 route add {POD6}/128 dev {POD_VETH}
ip -n {node} link add {POD2_VETH} type veth peer name eth0 netns {pod2}
ip -n {node} addr add 169.254.1.1/32 dev {POD2_VETH}
ip -n {node} link set {POD2_VETH} up
ip -n {pod2} addr add {POD2}/32 dev eth0
ip -n {pod2} link set eth0 up
ip -n {pod2} route add 169.254.1.1 dev eth0
ip -n {pod2} route add default via 169.254.1.1 dev eth0
ip -n {node} route add {POD2}/32 dev {POD2_VETH}
# The uplink to the remote node.
ip -n {node} addr add 192.168.77.1/24 dev {UPLINK}
ip -n {node} addr add fd00:77::1/64 dev {UPLINK} nodad
ip -n {node} link set {UPLINK} up
ip -n {remote} addr add {REMOTE}/24 dev up0
ip -n {remote} addr add {REMOTE6}/64 dev up0 nodad
ip -n {remote} link set up0 up
ip -n {remote} route add 10.10.1.0/24 via 192.168.77.1
ip -n {remote} -6 route add fd00:10::/64 via fd00:77::1
"#
        );
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(
            out.status.success(),
            "building the topology failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(topo)
    }

    fn config(&self) -> CaptureConfig {
        CaptureConfig { pin_dir: self.pin_dir.clone(), attach: Some(self.mode), ..CaptureConfig::default() }
    }

    /// Opens the capture in the node namespace.
    fn open(&self) -> Capture {
        self.open_as(self.mode)
    }

    /// Opens the capture in the node namespace, attaching in `mode`.
    fn open_as(&self, mode: AttachMode) -> Capture {
        let cfg = CaptureConfig { attach: Some(mode), ..self.config() };
        let capture = in_ns(&self.node, move || Capture::open(cfg)).unwrap();
        assert_eq!(capture.attach_mode(), mode);
        capture
    }

    /// The programs attached to the node's interface `ifname` (ingress) in this topology's mode;
    /// asserts that nothing is attached in the other mode.
    fn attached(&self, ifname: &str) -> Vec<u32> {
        self.attached_as(self.mode, ifname)
    }

    fn attached_as(&self, mode: AttachMode, ifname: &str) -> Vec<u32> {
        let (tcx, tc) = attached_programs(&self.node, ifname, TcAttachType::Ingress);
        match mode {
            AttachMode::Tcx => {
                assert!(tc.is_empty(), "tc filters on {ifname} in tcx mode: {tc:?}");
                tcx
            }
            AttachMode::Tc => {
                assert!(tcx.is_empty(), "tcx links on {ifname} in tc mode: {tcx:?}");
                tc
            }
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.node, &self.pod, &self.pod2, &self.remote] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        // The shared parent goes with the last test (fails harmlessly while others use it).
        if let Some(parent) = self.pin_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Why these tests cannot run here, if they cannot.
/// Runs `f` on a thread inside network namespace `ns`; sockets it creates stay in `ns`.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    weft_core::netns::run_in(ns, f).unwrap()
}

/// A listener like ztunnel's: wildcard address, IP_TRANSPARENT.
/// A listener as ztunnel's: IP_TRANSPARENT, and the socket mark whose packets the pod's egress
/// program lets through.
fn transparent_listener(ns: &str, addr: SocketAddr) -> TcpListener {
    in_ns(ns, || {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.set_ip_transparent(true).unwrap();
        socket.set_mark(ebpf::SOCKET_MARK).unwrap();
        if addr.is_ipv6() {
            socket.set_only_v6(false).unwrap();
        }
        socket.bind(&addr.into()).unwrap();
        socket.listen(64).unwrap();
        let listener: TcpListener = socket.into();
        listener.set_nonblocking(true).unwrap();
        listener
    })
}

fn listener(ns: &str, addr: SocketAddr) -> TcpListener {
    in_ns(ns, || {
        let listener = TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        listener
    })
}

/// Accepts within `within`, polling.
fn accept(listener: &TcpListener, within: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(CONNECT)).unwrap();
                return Some((stream, peer));
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("accept: {err}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn connect(ns: &str, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_ns(ns, || {
        let stream = TcpStream::connect_timeout(&to, timeout)?;
        stream.set_read_timeout(Some(CONNECT))?;
        Ok(stream)
    })
}

/// Sends a line each way.
fn exchange(client: &mut TcpStream, server: &mut TcpStream) {
    client.write_all(b"hello").unwrap();
    let mut buf = [0; 5];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    server.write_all(b"world").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Asserts that a connection from the pod to `to` is captured by `outbound`.
fn assert_captured(topo: &Topology, outbound: &TcpListener, to: SocketAddr, pod: IpAddr) {
    let mut client = connect(&topo.pod, to, CONNECT).unwrap();
    let (mut accepted, peer) = accept(outbound, CONNECT).expect("the outbound listener accepts");
    assert_eq!(accepted.local_addr().unwrap(), to, "original destination");
    assert_eq!(peer.ip(), pod);
    assert_eq!(peer, client.local_addr().unwrap());
    exchange(&mut client, &mut accepted);
}

/// IDs of loaded programs named `name` that use the enrolled map pinned in `pin_dir`.
fn our_programs(pin_dir: &std::path::Path, name: &str) -> Vec<u32> {
    let map = MapData::from_pin(pin_dir.join("map_enrolled")).unwrap();
    let map_id = map.info().unwrap().id();
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(name))
        .filter(|p| p.map_ids().ok().flatten().unwrap_or_default().contains(&map_id))
        .map(|p| p.id())
        .collect()
}

/// The ids of the programs attached to `ifname` in namespace `ns`: (TCX links, tc filters).
fn attached_programs(ns: &str, ifname: &str, direction: TcAttachType) -> (Vec<u32>, Vec<u32>) {
    let name = ifname.to_owned();
    let tcx = in_ns(ns, move || {
        let (_, progs) = SchedClassifier::query_tcx(&name, direction).unwrap();
        progs.iter().map(|p| p.id()).collect()
    });
    (tcx, tc_filters(ns, ifname, direction).into_iter().map(|f| f.prog_id).collect())
}

/// A tc filter as `tc -j filter show` lists it.
#[derive(Debug)]
struct TcFilter {
    pref: u64,
    handle: Option<String>,
    prog_id: u32,
}

/// The eBPF filters on `ifname`'s clsact qdisc in namespace `ns` (none without the qdisc).
fn tc_filters(ns: &str, ifname: &str, direction: TcAttachType) -> Vec<TcFilter> {
    let parent = if direction == TcAttachType::Ingress { "ingress" } else { "egress" };
    let out =
        Command::new("tc").args(["-n", ns, "-j", "filter", "show", "dev", ifname, parent]).output().unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["kind"] == "bpf" && f["options"]["prog"]["id"].is_u64())
        .map(|f| TcFilter {
            pref: f["pref"].as_u64().unwrap_or(0),
            handle: f["options"]["handle"].as_str().map(str::to_owned),
            prog_id: f["options"]["prog"]["id"].as_u64().unwrap_or(0) as u32,
        })
        .collect()
}

fn the_other(mode: AttachMode) -> AttachMode {
    match mode {
        AttachMode::Tcx => AttachMode::Tc,
        AttachMode::Tc => AttachMode::Tcx,
    }
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn outbound_connection_lands_on_the_transparent_listener(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || capture.attach_pod(POD_VETH)).unwrap();
    capture.enroll(POD.into()).unwrap();
    assert_eq!(capture.enrolled().unwrap(), vec![IpAddr::from(POD)]);

    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    // A node service on the wildcard address must not catch the pod's connections to that port.
    let node_service = listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 80));
    assert_captured(&topo, &outbound, sa(NOWHERE, 80), POD.into());
    assert!(accept(&node_service, SHORT).is_none(), "a node listener caught it");
    // A second connection, and to another port: each lands with its own destination.
    assert_captured(&topo, &outbound, sa(NOWHERE, 8443), POD.into());
}

fn same_node_pods_meet_through_ztunnel(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || {
        capture.attach_pod(POD_VETH)?;
        capture.attach_pod(POD2_VETH)
    })
    .unwrap();
    capture.enroll(POD.into()).unwrap();
    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    let plain = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15006));
    let app = listener(&topo.pod, sa(Ipv4Addr::UNSPECIFIED, 8080));
    let app2 = listener(&topo.pod2, sa(Ipv4Addr::UNSPECIFIED, 8080));

    // A pod outside the mesh calls the enrolled pod: ztunnel's inbound listener gets it.
    let to = sa(POD, 8080);
    let mut client = connect(&topo.pod2, to, CONNECT).unwrap();
    let (mut accepted, peer) = accept(&plain, CONNECT).expect("inbound capture");
    assert_eq!(accepted.local_addr().unwrap(), to);
    assert_eq!(peer.ip(), IpAddr::from(POD2));
    exchange(&mut client, &mut accepted);
    assert!(accept(&app, SHORT).is_none(), "bypassed ztunnel");

    // The enrolled pod calls the other one: outbound capture.
    assert_captured(&topo, &outbound, sa(POD2, 8080), POD.into());
    assert!(accept(&app2, SHORT).is_none(), "bypassed ztunnel");

    // ztunnel's upstream legs, each from the other pod's address: replies come back on the
    // callee's veth and are matched to ztunnel's socket.
    for (from, to, server) in [(POD2, POD, &app), (POD, POD2, &app2)] {
        let mut upstream = in_ns(&topo.node, || {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            socket.set_ip_transparent(true).unwrap();
            socket.set_mark(ebpf::SOCKET_MARK).unwrap();
            socket.bind(&sa(from, 0).into()).unwrap();
            socket.connect_timeout(&sa(to, 8080).into(), CONNECT).unwrap();
            let stream: TcpStream = socket.into();
            stream.set_read_timeout(Some(CONNECT)).unwrap();
            stream
        });
        let (mut accepted, peer) = accept(server, CONNECT).expect("upstream reaches the pod");
        assert_eq!(peer.ip(), IpAddr::from(from));
        exchange(&mut upstream, &mut accepted);
    }
}

fn outbound_ipv6_lands_on_a_dual_stack_listener(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || capture.attach_pod(POD_VETH)).unwrap();
    capture.enroll(POD.into()).unwrap();
    capture.enroll(POD6.into()).unwrap();

    let outbound = transparent_listener(&topo.node, sa(Ipv6Addr::UNSPECIFIED, 15001));
    assert_captured(&topo, &outbound, sa(NOWHERE6, 80), POD6.into());
    let v4 = sa(NOWHERE, 80);
    let mut client = connect(&topo.pod, v4, CONNECT).unwrap();
    let (mut accepted, peer) = accept(&outbound, CONNECT).unwrap();
    let local = accepted.local_addr().unwrap();
    assert_eq!((local.ip().to_canonical(), local.port()), (v4.ip(), v4.port()));
    assert_eq!(peer.ip().to_canonical(), IpAddr::from(POD));
    exchange(&mut client, &mut accepted);
}

fn enrollment_decides_capture_at_runtime(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || capture.attach_pod(POD_VETH)).unwrap();
    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    let server_addr = sa(REMOTE, 8080);
    let server = listener(&topo.remote, server_addr);

    let direct = |what: &str| {
        let mut client = connect(&topo.pod, server_addr, CONNECT).unwrap();
        let (mut accepted, peer) = accept(&server, CONNECT).expect(what);
        assert_eq!(peer.ip(), IpAddr::from(POD));
        exchange(&mut client, &mut accepted);
        assert!(accept(&outbound, SHORT).is_none(), "{what}: ztunnel saw it");
    };
    direct("not enrolled: reaches the server directly");

    capture.enroll(POD.into()).unwrap();
    assert_captured(&topo, &outbound, server_addr, POD.into());
    assert!(accept(&server, SHORT).is_none(), "enrolled: bypassed the mesh");

    capture.unenroll(POD.into()).unwrap();
    capture.unenroll(POD.into()).unwrap(); // idempotent
    assert!(capture.enrolled().unwrap().is_empty());
    direct("unenrolled: direct again");
}

/// Connections open when a pod is enrolled go on as they started (directly), and so do the
/// connections ztunnel holds when it is unenrolled (through ztunnel); only new connections follow
/// the new state. Every path: the pod calling out, a remote node calling in over the uplink, a
/// pod of the same node calling in, and the node itself calling in.
fn open_connections_survive_enrollment_and_unenrollment(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || {
        capture.attach_pod(POD_VETH)?;
        capture.attach_pod(POD2_VETH)?;
        capture.attach_uplink(UPLINK)
    })
    .unwrap();
    capture.unenroll(POD.into()).unwrap(); // known, not captured: what ztunnel writes
    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    let plain = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15006));
    let remote_server = listener(&topo.remote, sa(REMOTE, 8080));
    let app = listener(&topo.pod, sa(Ipv4Addr::UNSPECIFIED, 8080));
    let callers = [topo.remote.as_str(), topo.pod2.as_str(), topo.node.as_str()];

    // Open before enrollment, all direct.
    let mut open: Vec<(String, TcpStream, TcpStream)> = Vec::new();
    let client = connect(&topo.pod, sa(REMOTE, 8080), CONNECT).unwrap();
    let (server, _) = accept(&remote_server, CONNECT).expect("direct to the remote server");
    open.push(("pod -> remote".into(), client, server));
    for caller in callers {
        let client = connect(caller, sa(POD, 8080), CONNECT).unwrap();
        let (server, _) = accept(&app, CONNECT).expect("direct to the pod");
        open.push((format!("{caller} -> pod"), client, server));
    }
    for (what, client, server) in &mut open {
        client.set_read_timeout(Some(CONNECT)).unwrap();
        server.set_read_timeout(Some(CONNECT)).unwrap();
        eprintln!("before enrollment: {what}");
        exchange(client, server);
    }

    capture.enroll(POD.into()).unwrap();
    for (what, client, server) in &mut open {
        eprintln!("after enrollment: {what}");
        exchange(client, server);
    }
    assert!(accept(&outbound, SHORT).is_none() && accept(&plain, SHORT).is_none(), "ztunnel saw old flows");
    // New connections are captured.
    let mut captured: Vec<(String, TcpStream, TcpStream)> = Vec::new();
    let client = connect(&topo.pod, sa(REMOTE, 8080), CONNECT).unwrap();
    let (server, _) = accept(&outbound, CONNECT).expect("a new outbound connection is captured");
    captured.push(("pod -> remote".into(), client, server));
    for caller in callers {
        let client = connect(caller, sa(POD, 8080), CONNECT).unwrap();
        let (server, _) = accept(&plain, CONNECT).expect("a new inbound connection is captured");
        captured.push((format!("{caller} -> pod"), client, server));
    }
    assert!(accept(&remote_server, SHORT).is_none() && accept(&app, SHORT).is_none(), "bypassed ztunnel");
    for (what, client, server) in &mut captured {
        client.set_read_timeout(Some(CONNECT)).unwrap();
        server.set_read_timeout(Some(CONNECT)).unwrap();
        eprintln!("captured: {what}");
        exchange(client, server);
    }

    capture.unenroll(POD.into()).unwrap();
    for (what, client, server) in captured.iter_mut().chain(open.iter_mut()) {
        eprintln!("after unenrollment: {what}");
        exchange(client, server);
    }
    // New connections are direct again.
    let mut client = connect(&topo.pod, sa(REMOTE, 8080), CONNECT).unwrap();
    let (mut server, _) = accept(&remote_server, CONNECT).expect("direct again to the remote server");
    exchange(&mut client, &mut server);
    for caller in callers {
        let mut client = connect(caller, sa(POD, 8080), CONNECT).unwrap();
        let (mut server, _) = accept(&app, CONNECT).expect("direct again to the pod");
        exchange(&mut client, &mut server);
    }
    assert!(accept(&outbound, SHORT).is_none() && accept(&plain, SHORT).is_none(), "still captured");
}

/// What a stopping ztunnel does before it closes its listeners: the capture stops handing them
/// new connections (SYNs are dropped, so clients send them again) while what they queued is still
/// accepted; the next open resumes.
fn a_paused_capture_drops_new_connections_and_keeps_queued_ones(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || capture.attach_pod(POD_VETH)).unwrap();
    capture.enroll(POD.into()).unwrap();
    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    let to = sa(REMOTE, 8080);
    let mut queued = connect(&topo.pod, to, CONNECT).unwrap(); // in the listener's queue

    capture.pause_new_connections().unwrap();
    let refused = connect(&topo.pod, to, Duration::from_millis(500));
    assert!(refused.is_err(), "a new connection got through a paused capture: {refused:?}");
    let (mut accepted, _) = accept(&outbound, CONNECT).expect("the queued connection is accepted");
    assert_eq!(accepted.peer_addr().unwrap(), queued.local_addr().unwrap());
    exchange(&mut queued, &mut accepted);
    assert!(accept(&outbound, SHORT).is_none(), "the paused capture queued another connection");

    let _resumed = topo.open();
    assert_captured(&topo, &outbound, to, POD.into());
}

/// An upgrade whose programs differ from the pinned ones (another version's) replaces them: the
/// enrolled pods are kept, every attachment gets the new program, and a pod's connections are
/// captured throughout (none passes uncaptured, none fails).
fn another_versions_programs_are_replaced_without_a_gap(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || {
        capture.attach_pod(POD_VETH)?;
        capture.attach_uplink(UPLINK)
    })
    .unwrap();
    capture.enroll(POD.into()).unwrap();
    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    assert_captured(&topo, &outbound, sa(NOWHERE, 80), POD.into());
    // Make the pins look like another version's.
    let marker = std::fs::read_dir(&topo.pin_dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("object-"))
        .expect("the pin directory names its object")
        .path();
    std::fs::rename(&marker, topo.pin_dir.join("object-0000000000000000")).unwrap();
    let old = our_programs(&topo.pin_dir, "weft_pod_in");
    assert_eq!(topo.attached(POD_VETH), old);
    drop(capture);

    // Connections keep being captured while the programs are replaced.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (pod_ns, stop2) = (topo.pod.clone(), stop.clone());
    let dialer = thread::spawn(move || {
        let (mut ok, mut failed) = (0, 0);
        while !stop2.load(Ordering::SeqCst) {
            match connect(&pod_ns, sa(NOWHERE, 80), CONNECT) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    });
    let acceptor = {
        let (listener, stop) = (outbound.try_clone().unwrap(), stop.clone());
        thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            while !stop.load(Ordering::SeqCst) {
                let _ = listener.accept();
                thread::sleep(Duration::from_millis(1));
            }
        })
    };
    thread::sleep(Duration::from_millis(200));
    let capture = topo.open();
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = dialer.join().unwrap();
    acceptor.join().unwrap();
    assert!(ok > 10 && failed == 0, "during the replacement: {ok} captured, {failed} failed");

    let new = our_programs(&topo.pin_dir, "weft_pod_in");
    assert_eq!(new.len(), 1);
    assert_ne!(new, old, "the programs were not replaced");
    assert_eq!(topo.attached(POD_VETH), new, "the old program is still attached");
    assert_eq!(our_programs(&topo.pin_dir, "weft_uplink_in"), topo.attached(UPLINK));
    assert_eq!(capture.enrolled().unwrap(), vec![IpAddr::from(POD)], "enrollment kept");
    while accept(&outbound, SHORT).is_some() {} // the dialer's last connections
    assert_captured(&topo, &outbound, sa(NOWHERE, 80), POD.into());
    let leftovers: Vec<_> = std::fs::read_dir(topo.pin_dir.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("-old-") || n.contains("-loading-"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

fn enrolled_pod_without_listener_fails_closed(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || capture.attach_pod(POD_VETH)).unwrap();
    capture.enroll(POD.into()).unwrap();
    let server_addr = sa(REMOTE, 8080);
    let server = listener(&topo.remote, server_addr);

    let result = connect(&topo.pod, server_addr, Duration::from_secs(1));
    assert!(result.is_err(), "connected without ztunnel: {result:?}");
    assert!(accept(&server, SHORT).is_none(), "reached the server in plaintext");
}

fn inbound_on_the_uplink_and_transparent_upstream(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || {
        capture.attach_pod(POD_VETH)?;
        capture.attach_uplink(UPLINK)
    })
    .unwrap();
    capture.enroll(POD.into()).unwrap();
    let hbone = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15008));
    let plain = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15006));
    let app = listener(&topo.pod, sa(Ipv4Addr::UNSPECIFIED, 8080));

    for (port, listener) in [(15008, &hbone), (8080, &plain)] {
        let to = sa(POD, port);
        let mut client = connect(&topo.remote, to, CONNECT).unwrap();
        let (mut accepted, peer) = accept(listener, CONNECT).expect("ztunnel accepts");
        assert_eq!(accepted.local_addr().unwrap(), to);
        assert_eq!(peer.ip(), IpAddr::from(REMOTE));
        exchange(&mut client, &mut accepted);
    }
    assert!(accept(&app, SHORT).is_none(), "inbound bypassed ztunnel");

    // ztunnel's upstream leg: from the node, spoofing the remote client's address.
    let mut upstream = in_ns(&topo.node, || {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_ip_transparent(true).unwrap();
        socket.set_mark(ebpf::SOCKET_MARK).unwrap();
        socket.bind(&sa(REMOTE, 0).into()).unwrap();
        socket.connect_timeout(&sa(POD, 8080).into(), CONNECT).unwrap();
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(CONNECT)).unwrap();
        stream
    });
    let (mut accepted, peer) = accept(&app, CONNECT).expect("the pod's server accepts");
    assert_eq!(peer.ip(), IpAddr::from(REMOTE), "the pod sees the client's address");
    exchange(&mut upstream, &mut accepted);

    // No listener: inbound to an enrolled pod fails closed.
    drop(plain);
    let result = connect(&topo.remote, sa(POD, 8080), Duration::from_secs(1));
    assert!(result.is_err(), "connected without ztunnel: {result:?}");
    assert!(accept(&app, SHORT).is_none(), "reached the pod in plaintext");

    // Not enrolled: straight to the pod.
    capture.unenroll(POD.into()).unwrap();
    let mut client = connect(&topo.remote, sa(POD, 8080), CONNECT).unwrap();
    let (mut accepted, peer) = accept(&app, CONNECT).expect("direct to the pod");
    assert_eq!(peer.ip(), IpAddr::from(REMOTE));
    exchange(&mut client, &mut accepted);
}

fn pinned_capture_outlives_the_loader_and_is_taken_over(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || capture.attach_pod(POD_VETH)).unwrap();
    capture.enroll(POD.into()).unwrap();
    let first = our_programs(&topo.pin_dir, "weft_pod_in");
    assert_eq!(first.len(), 1);
    drop(capture); // ztunnel exits

    // Capture stays: a new listener gets the pod's connections...
    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    assert_captured(&topo, &outbound, sa(NOWHERE, 80), POD.into());
    // ...and without one, they fail closed.
    drop(outbound);
    let server_addr = sa(REMOTE, 8080);
    let server = listener(&topo.remote, server_addr);
    assert!(connect(&topo.pod, server_addr, Duration::from_secs(1)).is_err());
    assert!(accept(&server, SHORT).is_none());

    // A restarted loader takes over: same program, same enrollment, one attachment.
    let mut capture = topo.open();
    assert_eq!(our_programs(&topo.pin_dir, "weft_pod_in"), first);
    assert_eq!(our_programs(&topo.pin_dir, "weft_uplink_in").len(), 1);
    assert_eq!(capture.enrolled().unwrap(), vec![IpAddr::from(POD)]);
    in_ns(&topo.node, || capture.attach_pod(POD_VETH)).unwrap();
    assert_eq!(topo.attached(POD_VETH), first);
    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    assert_captured(&topo, &outbound, sa(NOWHERE, 80), POD.into());

    // Detach: the pod is no longer captured even though it is enrolled.
    in_ns(&topo.node, || capture.detach_pod(POD_VETH)).unwrap();
    in_ns(&topo.node, || capture.detach_pod(POD_VETH)).unwrap(); // idempotent
    assert!(topo.attached(POD_VETH).is_empty());
    let mut client = connect(&topo.pod, server_addr, CONNECT).unwrap();
    let (mut accepted, _) = accept(&server, CONNECT).expect("direct after detach");
    exchange(&mut client, &mut accepted);
}

/// What [`loader_process`] reads: the node namespace, the pin directory and the attach mode.
const LOADER_ENV: [&str; 3] =
    ["WEFT_TEST_LOADER_NETNS", "WEFT_TEST_LOADER_PIN_DIR", "WEFT_TEST_LOADER_ATTACH"];

/// The capture stays when the process that attached it ends without running any destructor
/// (as a crashed or killed ztunnel does): the loader here is this test binary run again as
/// [`loader_process`].
fn capture_outlives_a_loader_process_that_exits(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["loader_process", "--exact", "--nocapture", "--test-threads", "1"])
        .env(LOADER_ENV[0], &topo.node)
        .env(LOADER_ENV[1], &topo.pin_dir)
        .env(LOADER_ENV[2], mode.as_str())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the loader process failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(topo.attached(POD_VETH).len(), 1);
    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    assert_captured(&topo, &outbound, sa(NOWHERE, 80), POD.into());
    drop(outbound);
    let server_addr = sa(REMOTE, 8080);
    let server = listener(&topo.remote, server_addr);
    assert!(connect(&topo.pod, server_addr, Duration::from_secs(1)).is_err(), "failed open");
    assert!(accept(&server, SHORT).is_none());
}

/// Not a test of its own (it does nothing unless [`LOADER_ENV`] is set): the loader process of
/// [`capture_outlives_a_loader_process_that_exits`]. Attaches and enrolls the pod, then exits
/// the process at once, running no destructor.
#[test]
fn loader_process() {
    let [Ok(ns), Ok(pin_dir), Ok(mode)] = LOADER_ENV.map(std::env::var) else { return };
    let cfg = CaptureConfig {
        pin_dir: pin_dir.into(),
        attach: Some(mode.parse().unwrap()),
        ..CaptureConfig::default()
    };
    in_ns(&ns, move || -> Result<(), ebpf::Error> {
        let mut capture = Capture::open(cfg)?;
        capture.attach_pod(POD_VETH)?;
        capture.enroll(POD.into())?;
        std::process::exit(0)
    })
    .unwrap();
}

fn remove_takes_everything_away(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let cfg = topo.config();
    let mut capture = topo.open();
    in_ns(&topo.node, || {
        capture.attach_pod(POD_VETH)?;
        capture.attach_uplink(UPLINK)
    })
    .unwrap();
    capture.enroll(POD.into()).unwrap();
    // The three tc programs and the listener lookup, attached to the node's namespace.
    let ids = ebpf::pinned_program_ids(&topo.pin_dir);
    assert_eq!(ids.len(), 4, "{ids:?}");
    let rules = sh(&["ip", "-n", &topo.node, "rule", "show"]);
    assert!(rules.contains("fwmark 0x539 lookup 133"), "{rules}");
    drop(capture);

    in_ns(&topo.node, || ebpf::remove(&cfg)).unwrap();
    in_ns(&topo.node, || ebpf::remove(&cfg)).unwrap(); // idempotent

    assert!(!topo.pin_dir.exists());
    // Links and programs are released asynchronously.
    ebpf::wait_unloaded(&ids, Duration::from_secs(5)).unwrap_or_else(|left| panic!("still loaded: {left:?}"));
    for ifname in [POD_VETH, UPLINK] {
        assert_eq!(attached_programs(&topo.node, ifname, TcAttachType::Ingress), (vec![], vec![]));
        let net = sh(&["ip", "netns", "exec", &topo.node, "bpftool", "net", "show", "dev", ifname]);
        assert!(!net.contains("weft_"), "{net}");
    }
    for family in ["-4", "-6"] {
        let rules = sh(&["ip", family, "-n", &topo.node, "rule", "show"]);
        assert!(!rules.contains("fwmark"), "{rules}");
        let routes = sh(&["ip", family, "-n", &topo.node, "route", "show", "table", "133"]);
        assert!(routes.trim().is_empty(), "{routes}");
    }

    // The pod's traffic flows directly again.
    let server = listener(&topo.remote, sa(REMOTE, 8080));
    let mut client = connect(&topo.pod, sa(REMOTE, 8080), CONNECT).unwrap();
    let (mut accepted, _) = accept(&server, CONNECT).unwrap();
    exchange(&mut client, &mut accepted);
}

fn errors_name_the_problem(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    let err = in_ns(&topo.node, || capture.attach_pod("nosuchveth")).unwrap_err();
    assert!(matches!(err, ebpf::Error::InterfaceNotFound { .. }), "{err}");
    assert!(err.to_string().contains("nosuchveth"), "{err}");
    let cfg = CaptureConfig { pin_dir: "/tmp/not-bpffs/weft".into(), ..CaptureConfig::default() };
    let err = in_ns(&topo.node, || Capture::open(cfg)).unwrap_err();
    assert!(matches!(err, ebpf::Error::NotBpffs { .. }), "{err}");
}

fn recreated_veth_gets_a_fresh_link(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || capture.attach_pod(POD2_VETH)).unwrap();
    let ours = topo.attached(POD2_VETH);
    assert_eq!(ours.len(), 1);
    // The pod restarts: its veth is deleted and made again under the same name.
    let node = topo.node.as_str();
    sh(&["ip", "-n", node, "link", "del", POD2_VETH]);
    sh(&["ip", "-n", node, "link", "add", POD2_VETH, "type", "veth", "peer", "name", "eth1"]);
    assert!(topo.attached(POD2_VETH).is_empty());
    in_ns(&topo.node, || capture.attach_pod(POD2_VETH)).unwrap();
    assert_eq!(topo.attached(POD2_VETH), ours);
}

/// A node whose capture was attached in the other mode (an older ztunnel, or one before a kernel
/// upgrade) is taken over: the new attachment is made before the old one goes, and the old one
/// goes entirely.
fn a_loader_of_the_other_mode_takes_over_without_a_gap(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut old = topo.open_as(the_other(mode));
    in_ns(&topo.node, || {
        old.attach_pod(POD_VETH)?;
        old.attach_uplink(UPLINK)
    })
    .unwrap();
    old.enroll(POD.into()).unwrap();
    let ours = topo.attached_as(the_other(mode), POD_VETH);
    assert_eq!(ours.len(), 1);
    drop(old);

    let mut capture = topo.open();
    in_ns(&topo.node, || {
        capture.attach_pod(POD_VETH)?;
        capture.attach_uplink(UPLINK)
    })
    .unwrap();
    // Same pinned program, now attached only in this mode, both directions.
    assert_eq!(topo.attached(POD_VETH), ours);
    assert_eq!(topo.attached(UPLINK).len(), 1);
    let (tcx, tc) = attached_programs(&topo.node, POD_VETH, TcAttachType::Egress);
    assert_eq!(tcx.len() + tc.len(), 1, "egress: tcx {tcx:?}, tc {tc:?}");
    let links: Vec<String> = std::fs::read_dir(topo.pin_dir.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(links.len(), 3, "one pin or marker per attachment: {links:?}");
    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    assert_captured(&topo, &outbound, sa(NOWHERE, 80), POD.into());

    in_ns(&topo.node, || {
        capture.detach_pod(POD_VETH)?;
        capture.detach_uplink(UPLINK)
    })
    .unwrap();
    for (ifname, direction) in
        [(POD_VETH, TcAttachType::Ingress), (POD_VETH, TcAttachType::Egress), (UPLINK, TcAttachType::Ingress)]
    {
        assert_eq!(attached_programs(&topo.node, ifname, direction), (vec![], vec![]), "{ifname}");
    }
    assert_eq!(std::fs::read_dir(topo.pin_dir.join("links")).unwrap().count(), 0);
}

/// Weft's filter runs first on a clsact qdisc other tools use too, and detaching takes only
/// Weft's filter away.
fn other_tc_filters_and_the_qdisc_are_left_alone(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let node = topo.node.as_str();
    sh(&["tc", "-n", node, "qdisc", "add", "dev", POD_VETH, "clsact"]);
    // Another tool's filter: classic BPF that matches nothing (this kernel may have no other
    // classifier or action modules).
    sh(&[
        "tc",
        "-n",
        node,
        "filter",
        "add",
        "dev",
        POD_VETH,
        "ingress",
        "pref",
        "10",
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
    ]);
    let foreign = || sh(&["tc", "-n", node, "filter", "show", "dev", POD_VETH, "ingress"]);
    assert!(foreign().contains("bytecode"));

    let mut capture = topo.open();
    in_ns(&topo.node, || capture.attach_pod(POD_VETH)).unwrap();
    in_ns(&topo.node, || capture.attach_pod(POD_VETH)).unwrap(); // idempotent
    assert_eq!(topo.attached(POD_VETH).len(), 1);
    if mode == AttachMode::Tc {
        let filters = tc_filters(node, POD_VETH, TcAttachType::Ingress);
        assert_eq!(filters.len(), 1, "{filters:?}");
        assert_eq!(filters[0].pref, u64::from(ebpf::TC_PRIORITY), "{filters:?}");
        assert_eq!(filters[0].handle.as_deref(), Some("0x5745"), "{filters:?}");
        assert_eq!(ebpf::TC_HANDLE, 0x5745);
    }
    capture.enroll(POD.into()).unwrap();
    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    assert_captured(&topo, &outbound, sa(NOWHERE, 80), POD.into());

    in_ns(&topo.node, || capture.detach_pod(POD_VETH)).unwrap();
    assert!(topo.attached(POD_VETH).is_empty());
    assert!(foreign().contains("pref 10 bpf chain 0 handle 0x1"), "the other filter went: {}", foreign());
    let qdiscs = sh(&["tc", "-n", node, "qdisc", "show", "dev", POD_VETH]);
    assert!(qdiscs.contains("clsact"), "{qdiscs}");
}

#[test]
fn this_kernel_gets_the_mode_its_version_says() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap(), parts.next().unwrap());
    let expected = AttachMode::for_kernel(major, minor);
    assert_eq!(AttachMode::detect().ok(), expected, "Linux {release}");
}

/// ztunnel closes a connection first when the server did (it passes the close on), so its side
/// of the connection stays in TIME_WAIT for a minute. A client that opens a new connection from
/// the same port to the same address meanwhile (a busy client cycles through its ports in
/// seconds) must reach ztunnel's listener with its first SYN: no reset, no SYN sent again, and
/// never a node service listening on the port. Outbound (IPv4 and IPv6) and inbound.
fn a_connection_reusing_the_ports_of_one_ztunnel_closed_is_captured(mode: AttachMode) {
    let Some(topo) = Topology::new(mode) else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || {
        capture.attach_pod(POD_VETH)?;
        capture.attach_uplink(UPLINK)
    })
    .unwrap();
    capture.enroll(POD.into()).unwrap();
    capture.enroll(POD6.into()).unwrap();
    let outbound = transparent_listener(&topo.node, sa(Ipv6Addr::UNSPECIFIED, 15001));
    let plain = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15006));
    capture.set_listener(15001, &outbound).unwrap();
    capture.set_listener(15006, &plain).unwrap();
    // Node services on the ports the clients call.
    let node_service = listener(&topo.node, sa(Ipv6Addr::UNSPECIFIED, 80));
    let node_service_inbound = listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 8080));

    let cases = [
        ("outbound", &topo.pod, sa(POD, 40001), sa(NOWHERE, 80), &outbound),
        ("outbound IPv6", &topo.pod, sa(POD6, 40002), sa(NOWHERE6, 80), &outbound),
        ("inbound", &topo.remote, sa(REMOTE, 40003), sa(POD, 8080), &plain),
    ];
    for (what, ns, from, to, ztunnel) in cases {
        closed_by_ztunnel(ns, &topo.node, from, to, ztunnel);
        let before = tcp_counters(ns);
        let mut client = connect_from(ns, from, to, CONNECT).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (mut accepted, peer) = accept(ztunnel, CONNECT).unwrap_or_else(|| panic!("{what}: not accepted"));
        assert_eq!(peer.ip().to_canonical(), from.ip(), "{what}");
        assert_eq!(peer.port(), from.port(), "{what}");
        exchange(&mut client, &mut accepted);
        assert_eq!(tcp_counters(ns), before, "{what}: the client reset or sent its SYN again");
    }
    assert!(accept(&node_service, SHORT).is_none(), "a node service took a captured connection");
    assert!(accept(&node_service_inbound, SHORT).is_none(), "a node service took a captured connection");

    // Without ztunnel's listener the SYN fails closed; the node service never gets it.
    let (from, to) = (sa(POD, 40004), sa(NOWHERE, 80));
    closed_by_ztunnel(&topo.pod, &topo.node, from, to, &outbound);
    drop(outbound);
    let result = connect_from(&topo.pod, from, to, Duration::from_secs(1));
    assert!(result.is_err(), "connected without ztunnel: {result:?}");
    assert!(accept(&node_service, SHORT).is_none(), "a node service took a captured connection");
}

/// Opens a connection from `from` (in `ns`) to `to`, which `ztunnel` accepts, and closes it
/// ztunnel first; returns once ztunnel's side (in `node`) is in TIME_WAIT.
fn closed_by_ztunnel(ns: &str, node: &str, from: SocketAddr, to: SocketAddr, ztunnel: &TcpListener) {
    let mut client = connect_from(ns, from, to, CONNECT).unwrap();
    let (mut accepted, _) = accept(ztunnel, CONNECT).expect("ztunnel accepts");
    exchange(&mut client, &mut accepted);
    accepted.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(client.read(&mut [0; 1]).unwrap(), 0, "the client sees ztunnel's close");
    drop(client);
    assert_eq!(accepted.read(&mut [0; 1]).unwrap(), 0, "ztunnel sees the client's close");
    drop(accepted);
    let port = format!(":{}", from.port());
    let deadline = Instant::now() + CONNECT;
    while !sh(&["ip", "netns", "exec", node, "ss", "-Htn", "state", "time-wait"]).contains(&port) {
        assert!(Instant::now() < deadline, "no TIME_WAIT for {from} -> {to}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Connects from a fixed address and port.
fn connect_from(ns: &str, from: SocketAddr, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_ns(ns, || {
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&from.into())?;
        socket.connect_timeout(&to.into(), timeout)?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(CONNECT))?;
        Ok(stream)
    })
}

/// The resets and retransmissions TCP sent in namespace `ns` (`/proc/net/snmp`).
fn tcp_counters(ns: &str) -> (u64, u64) {
    let snmp = in_ns(ns, || std::fs::read_to_string("/proc/thread-self/net/snmp")).unwrap();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let field = |name: &str| {
        let i = names.split_whitespace().position(|n| n == name).unwrap();
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    };
    (field("OutRsts"), field("RetransSegs"))
}
