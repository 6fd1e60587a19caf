#![allow(clippy::unwrap_used)]
//! The capture on real kernel networking: each test builds its own network namespaces (a node,
//! a pod on it, a remote node behind the node's uplink), loads the programs into the node's
//! namespace and checks where TCP connections land. Needs root and `ip netns`; without them the
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
use ebpf::{Capture, CaptureConfig};

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

/// Three namespaces and a pin directory, deleted on drop (also when the test panics).
struct Topology {
    node: String,
    pod: String,
    pod2: String,
    remote: String,
    pin_dir: PathBuf,
}

impl Topology {
    /// Builds the topology, or `None` when the test must be skipped.
    fn new() -> Option<Self> {
        if !weft_core::testing::netns_usable("eBPF capture test") {
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("weft-ebpf-{}-{n}", std::process::id());
        let topo = Self {
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
        CaptureConfig { pin_dir: self.pin_dir.clone(), ..CaptureConfig::default() }
    }

    /// Opens the capture in the node namespace.
    fn open(&self) -> Capture {
        let cfg = self.config();
        in_ns(&self.node, move || Capture::open(cfg)).unwrap()
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

fn tcx_programs(ns: &str, ifname: &str) -> Vec<u32> {
    let ifname = ifname.to_owned();
    in_ns(ns, move || {
        let (_, progs) = SchedClassifier::query_tcx(&ifname, TcAttachType::Ingress).unwrap();
        progs.iter().map(|p| p.id()).collect()
    })
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn outbound_connection_lands_on_the_transparent_listener() {
    let Some(topo) = Topology::new() else { return };
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

#[test]
fn same_node_pods_meet_through_ztunnel() {
    let Some(topo) = Topology::new() else { return };
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

#[test]
fn outbound_ipv6_lands_on_a_dual_stack_listener() {
    let Some(topo) = Topology::new() else { return };
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

#[test]
fn enrollment_decides_capture_at_runtime() {
    let Some(topo) = Topology::new() else { return };
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

#[test]
fn enrolled_pod_without_listener_fails_closed() {
    let Some(topo) = Topology::new() else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || capture.attach_pod(POD_VETH)).unwrap();
    capture.enroll(POD.into()).unwrap();
    let server_addr = sa(REMOTE, 8080);
    let server = listener(&topo.remote, server_addr);

    let result = connect(&topo.pod, server_addr, Duration::from_secs(1));
    assert!(result.is_err(), "connected without ztunnel: {result:?}");
    assert!(accept(&server, SHORT).is_none(), "reached the server in plaintext");
}

#[test]
fn inbound_on_the_uplink_and_transparent_upstream() {
    let Some(topo) = Topology::new() else { return };
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

#[test]
fn pinned_capture_outlives_the_loader_and_is_taken_over() {
    let Some(topo) = Topology::new() else { return };
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
    assert_eq!(tcx_programs(&topo.node, POD_VETH), first);
    let outbound = transparent_listener(&topo.node, sa(Ipv4Addr::UNSPECIFIED, 15001));
    assert_captured(&topo, &outbound, sa(NOWHERE, 80), POD.into());

    // Detach: the pod is no longer captured even though it is enrolled.
    in_ns(&topo.node, || capture.detach_pod(POD_VETH)).unwrap();
    in_ns(&topo.node, || capture.detach_pod(POD_VETH)).unwrap(); // idempotent
    assert!(tcx_programs(&topo.node, POD_VETH).is_empty());
    let mut client = connect(&topo.pod, server_addr, CONNECT).unwrap();
    let (mut accepted, _) = accept(&server, CONNECT).expect("direct after detach");
    exchange(&mut client, &mut accepted);
}

#[test]
fn remove_takes_everything_away() {
    let Some(topo) = Topology::new() else { return };
    let cfg = topo.config();
    let mut capture = topo.open();
    in_ns(&topo.node, || {
        capture.attach_pod(POD_VETH)?;
        capture.attach_uplink(UPLINK)
    })
    .unwrap();
    capture.enroll(POD.into()).unwrap();
    let mut ids = our_programs(&topo.pin_dir, "weft_pod_in");
    ids.extend(our_programs(&topo.pin_dir, "weft_uplink_in"));
    assert_eq!(ids.len(), 2);
    let rules = sh(&["ip", "-n", &topo.node, "rule", "show"]);
    assert!(rules.contains("fwmark 0x539 lookup 133"), "{rules}");
    drop(capture);

    in_ns(&topo.node, || ebpf::remove(&cfg)).unwrap();
    in_ns(&topo.node, || ebpf::remove(&cfg)).unwrap(); // idempotent

    assert!(!topo.pin_dir.exists());
    // Links and programs are released asynchronously; poll.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let loaded: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .filter(|id| ids.contains(id))
            .collect();
        if loaded.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still loaded: {loaded:?}");
        thread::sleep(Duration::from_millis(20));
    }
    for ifname in [POD_VETH, UPLINK] {
        assert!(tcx_programs(&topo.node, ifname).is_empty());
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

#[test]
fn errors_name_the_problem() {
    let Some(topo) = Topology::new() else { return };
    let mut capture = topo.open();
    let err = in_ns(&topo.node, || capture.attach_pod("nosuchveth")).unwrap_err();
    assert!(matches!(err, ebpf::Error::InterfaceNotFound { .. }), "{err}");
    assert!(err.to_string().contains("nosuchveth"), "{err}");
    let cfg = CaptureConfig { pin_dir: "/tmp/not-bpffs/weft".into(), ..CaptureConfig::default() };
    let err = in_ns(&topo.node, || Capture::open(cfg)).unwrap_err();
    assert!(matches!(err, ebpf::Error::NotBpffs { .. }), "{err}");
}

#[test]
fn recreated_veth_gets_a_fresh_link() {
    let Some(topo) = Topology::new() else { return };
    let mut capture = topo.open();
    in_ns(&topo.node, || capture.attach_pod(POD2_VETH)).unwrap();
    let ours = tcx_programs(&topo.node, POD2_VETH);
    assert_eq!(ours.len(), 1);
    // The pod restarts: its veth is deleted and made again under the same name.
    let node = topo.node.as_str();
    sh(&["ip", "-n", node, "link", "del", POD2_VETH]);
    sh(&["ip", "-n", node, "link", "add", POD2_VETH, "type", "veth", "peer", "name", "eth1"]);
    assert!(tcx_programs(&topo.node, POD2_VETH).is_empty());
    in_ns(&topo.node, || capture.attach_pod(POD2_VETH)).unwrap();
    assert_eq!(tcx_programs(&topo.node, POD2_VETH), ours);
}
