//! The data path on real kernel networking with the eBPF capture: a node namespace running an
//! in-process ztunnel (production listeners: `[::]`, IP_TRANSPARENT, ports 15001/15006/15008), a
//! pod namespace behind a veth, and a remote namespace behind the node's uplink. Checks that
//! the pod's application sees its real callers and that the remote server sees the pod.
//! Needs root and `ip netns`; without them the tests print why and pass, unless CI=true, where
//! they fail. Nothing is changed outside the namespaces they create (and delete on drop).
#![allow(clippy::unwrap_used)]

mod proxy_support;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ebpf::{Capture, CaptureConfig};
use nix::sched::{setns, CloneFlags};
use weft_core::cert_manager::CertManager;
use weft_core::drain;
use weft_core::hbone::{
    forward, ClientError, ClientSettings, ConnectInfo, ConnectRequest, H2Stream, Inbound, Pool, Refusal,
    Server, ServerSettings,
};
use weft_core::state::{ProxyState, Shared};
use weft_core::telemetry::Metrics;
use weft_core::testing::{identity, LocalSource, TestCa};
use ztunnel::proxy::{Ports, Proxy, ProxyInputs};

use proxy_support::*;

const POD: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 5);
const REMOTE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
/// A second address of the remote namespace that is no workload of the mesh.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 3);
/// Istio's (and Weft's) probe source, an address of the node.
const PROBE: Ipv4Addr = ebpf::PROBE_SOURCE_V4;
/// The node's own address towards the pod.
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const APP_PORT: u16 = 8080;
const REMOTE_PORT: u16 = 9000;
const POD_VETH: &str = "vpod";
const UPLINK: &str = "up0";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Node, pod and remote namespaces and the capture's pin directory, deleted on drop (also when
/// the test panics).
struct Topology {
    node: String,
    pod: String,
    remote: String,
    pin_dir: PathBuf,
}

impl Topology {
    fn new() -> Option<Self> {
        if !weft_core::testing::netns_usable("netns proxy test") {
            return None;
        }
        let base = format!("weft-pxy-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let topo = Topology {
            node: format!("{base}-node"),
            pod: format!("{base}-pod"),
            remote: format!("{base}-remote"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/weft-test/{base}")),
        };
        let (node, pod, remote) = (&topo.node, &topo.pod, &topo.remote);
        let script = format!(
            r#"set -e
for ns in {node} {pod} {remote}; do
  ip netns add $ns
  ip -n $ns link set lo up
done
ip netns exec {node} sysctl -qw net.ipv4.ip_forward=1
ip -n {node} link add {POD_VETH} type veth peer name eth0 netns {pod}
ip -n {node} link add {UPLINK} type veth peer name up0 netns {remote}
ip -n {node} addr add 169.254.1.1/32 dev {POD_VETH}
ip -n {node} link set {POD_VETH} up
ip -n {pod} addr add {POD}/32 dev eth0
ip -n {pod} link set eth0 up
ip -n {pod} route add 169.254.1.1 dev eth0
ip -n {pod} route add default via 169.254.1.1 dev eth0
ip -n {node} route add {POD}/32 dev {POD_VETH}
ip -n {node} addr add 192.168.77.1/24 dev {UPLINK}
ip -n {node} link set {UPLINK} up
ip -n {remote} addr add {REMOTE}/24 dev up0
ip -n {remote} addr add {OUTSIDE}/24 dev up0
ip -n {remote} link set up0 up
ip -n {remote} route add 10.10.1.0/24 via 192.168.77.1
ip -n {node} addr add {PROBE}/32 dev lo
ip -n {remote} addr add {PROBE}/32 dev lo
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

    /// Loads the capture in the node, on the pod's veth and the uplink, with the pod enrolled.
    fn capture(&self) -> Capture {
        let cfg = CaptureConfig { pin_dir: self.pin_dir.clone(), ..CaptureConfig::default() };
        let mut capture = in_ns(&self.node, move || Capture::open(cfg)).unwrap();
        in_ns(&self.node, || {
            capture.attach_pod(POD_VETH)?;
            capture.attach_uplink(UPLINK)
        })
        .unwrap();
        capture.enroll(POD.into()).unwrap();
        capture
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.node, &self.pod, &self.remote] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Some(parent) = self.pin_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    weft_core::netns::run_in(ns, f).unwrap()
}

/// Runs `f` on a tokio runtime on a thread inside `ns` (every thread of the runtime is there).
fn in_ns_async<T: Send, F: std::future::Future<Output = T>>(ns: &str, f: impl FnOnce() -> F + Send) -> T {
    in_ns(ns, || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f()))
}

/// A server in `ns` on `addr` telling each caller its address, then echoing (see `who_am_i`).
fn who_am_i_in(ns: &str, addr: SocketAddr) {
    let listener = in_ns(ns, || TcpListener::bind(addr).unwrap());
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let peer = stream.peer_addr().unwrap();
                let _ = stream.write_all(format!("{peer}\n").as_bytes());
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = stream.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// Connects from `ns` to `to`, returns the address the server saw and checks the echo; `None`
/// if the connection was refused, reset or closed without an answer.
fn call(ns: &str, to: SocketAddr) -> Option<IpAddr> {
    call_from(ns, None, to)
}

/// [`call`] from the source address `from`, when given.
fn call_from(ns: &str, from: Option<IpAddr>, to: SocketAddr) -> Option<IpAddr> {
    let connect = || -> std::io::Result<TcpStream> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        if let Some(from) = from {
            socket.bind(&SocketAddr::new(from, 0).into())?;
        }
        socket.connect_timeout(&to.into(), IO_TIMEOUT)?;
        Ok(socket.into())
    };
    let mut stream = in_ns(ns, connect).ok()?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let seen: SocketAddr = line.trim().parse().unwrap();
    stream.write_all(b"ping").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    reader.read_to_end(&mut echoed).unwrap();
    assert_eq!(echoed, b"ping");
    Some(seen.ip())
}

/// ztunnel of node-a running in the node namespace until dropped.
struct Ztunnel {
    _drain: drain::Trigger,
    thread: Option<thread::JoinHandle<()>>,
    registry: prometheus_client::registry::Registry,
}

impl Ztunnel {
    fn start(ns: &str, ca: Arc<TestCa>, state: Arc<Shared<ProxyState>>) -> Ztunnel {
        let (trigger, watch) = drain::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{ns}");
        let (metrics, registry) = Metrics::new();
        let thread = thread::spawn(move || {
            setns(File::open(path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let source = LocalSource { ca, lifetime: Duration::from_secs(3600), fetches: Arc::default() };
                let inputs = ProxyInputs {
                    state,
                    certs: Arc::new(CertManager::new(source)),
                    metrics: Arc::new(metrics),
                    node_name: "node-a".into(),
                    // The state is set before the proxy starts: no updates to re-check after.
                    updates: tokio::sync::watch::channel(weft_core::xds::Synced::new(&[])).1,
                };
                // Production settings: dual-stack wildcard, Istio's ports, IP_TRANSPARENT.
                let proxy = Proxy::bind(inputs, IpAddr::V6(Ipv6Addr::UNSPECIFIED), Ports::default()).await;
                let proxy = match proxy {
                    Ok(proxy) => proxy,
                    Err(e) => return ready_tx.send(Err(e.to_string())).unwrap(),
                };
                ready_tx.send(Ok(())).unwrap();
                proxy.run(watch).await;
            });
        });
        ready_rx.recv().unwrap().unwrap();
        Ztunnel { _drain: trigger, thread: Some(thread), registry }
    }

    /// Waits (bounded) for a metric line containing every one of `parts`.
    fn wait_metric(&self, parts: &[&str]) -> String {
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        loop {
            let text = weft_core::telemetry::encode(&self.registry);
            if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.to_owned();
            }
            assert!(std::time::Instant::now() < deadline, "no metric line with {parts:?} in:\n{text}");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self._drain.drain();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn mesh() -> (Arc<TestCa>, Arc<Shared<ProxyState>>) {
    init_logs();
    let state = Arc::new(Shared::new(ProxyState::new("")));
    add_workload(&state, workload("app-ns", "app", &POD.to_string(), "node-a"));
    add_workload(&state, workload("remote-ns", "remote", &REMOTE.to_string(), "node-b"));
    (Arc::new(TestCa::new()), state)
}

#[test]
fn pods_see_their_real_callers_through_the_capture() {
    let Some(topo) = Topology::new() else { return };
    let _capture = topo.capture();
    let (ca, state) = mesh();
    let _ztunnel = Ztunnel::start(&topo.node, ca.clone(), state.clone());
    who_am_i_in(&topo.pod, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), APP_PORT));
    who_am_i_in(&topo.remote, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), REMOTE_PORT));

    // Plaintext inbound (:15006): the pod's application sees the remote caller, not the node.
    let seen = call(&topo.remote, SocketAddr::new(POD.into(), APP_PORT));
    assert_eq!(seen, Some(REMOTE.into()), "plaintext inbound");

    // Outbound passthrough (:15001) to an address outside the mesh: the server sees the pod.
    let seen = call(&topo.pod, SocketAddr::new(OUTSIDE.into(), REMOTE_PORT));
    assert_eq!(seen, Some(POD.into()), "outbound passthrough");

    // HBONE inbound (:15008), as a remote ztunnel sends it: the application sees the address
    // in `forwarded`.
    let seen = in_ns_async(&topo.remote, || async {
        let pool = Pool::new(ClientSettings::default());
        let mut stream = pool
            .connect(ConnectRequest {
                certificate: ca.cert(&identity("remote-ns", "remote")),
                expected: vec![identity("app-ns", "app")],
                source_ip: None,
                hbone_addr: SocketAddr::new(POD.into(), 15008),
                authority: SocketAddr::new(POD.into(), APP_PORT),
                forwarded: weft_core::hbone::Forwarded {
                    for_addr: Some(SocketAddr::new(REMOTE.into(), 41000)),
                    host: None,
                },
                baggage: None,
                traceparent: None,
            })
            .await
            .unwrap();
        exchange(&mut stream, b"hbone").await
    });
    assert_eq!(seen.ip(), IpAddr::from(REMOTE), "HBONE inbound");

    // STRICT: plaintext to the pod is refused; HBONE still works.
    add_policy(&state, strict());
    let mut app = workload("app-ns", "app", &POD.to_string(), "node-a");
    app.authorization_policies = vec![STRICT.into()];
    add_workload(&state, app);
    assert_eq!(call(&topo.remote, SocketAddr::new(POD.into(), APP_PORT)), None, "STRICT let plaintext in");
    let denied = in_ns_async(&topo.remote, || async {
        let m = principal("cluster.local/ns/remote-ns/sa/remote");
        add_policy(
            &state,
            policy(
                "app-ns",
                "deny-remote",
                weft_core::proto::istio::security::Scope::Namespace,
                weft_core::proto::istio::security::Action::Deny,
                m,
            ),
        );
        Pool::new(ClientSettings::default())
            .connect(ConnectRequest {
                certificate: ca.cert(&identity("remote-ns", "remote")),
                expected: vec![identity("app-ns", "app")],
                source_ip: None,
                hbone_addr: SocketAddr::new(POD.into(), 15008),
                authority: SocketAddr::new(POD.into(), APP_PORT),
                forwarded: weft_core::hbone::Forwarded {
                    for_addr: Some(SocketAddr::new(REMOTE.into(), 41001)),
                    host: None,
                },
                baggage: None,
                traceparent: None,
            })
            .await
            .err()
    });
    assert!(matches!(denied, Some(ClientError::Status { status, .. }) if status == 401), "{denied:?}");
}

/// An HBONE server standing in for Istio's ztunnel on the remote node: it identifies the source
/// by the outer connection's peer address and admits only `allowed` (an `ipBlocks` ALLOW), then
/// connects to the authority; it keeps what each CONNECT said.
struct AddressCheckingPeer {
    certificate: Arc<weft_core::tls::WorkloadCertificate>,
    allowed: std::sync::Mutex<IpAddr>,
    seen: std::sync::Mutex<Vec<ConnectInfo>>,
}

impl Inbound for AddressCheckingPeer {
    type Accepted = tokio::net::TcpStream;

    async fn tls_config(&self, _local: SocketAddr) -> Result<Arc<rustls::ServerConfig>, String> {
        Ok(self.certificate.server_config())
    }

    async fn accept(&self, info: ConnectInfo) -> Result<tokio::net::TcpStream, Refusal> {
        let (peer, authority) = (info.peer_addr.ip().to_canonical(), info.authority);
        self.seen.lock().unwrap().push(info);
        let allowed = *self.allowed.lock().unwrap();
        if peer != allowed {
            return Err(Refusal::denied(format!("{peer} is not in ipBlocks [{allowed}/32]")));
        }
        tokio::net::TcpStream::connect(authority).await.map_err(|e| Refusal::unavailable(e.to_string()))
    }

    async fn serve(&self, upstream: tokio::net::TcpStream, tunnel: H2Stream) {
        forward(tunnel, upstream, SocketAddr::from((REMOTE, REMOTE_PORT))).await
    }
}

/// Runs `peer` on REMOTE:15008 in the remote namespace until the returned trigger is dropped.
fn run_peer(ns: &str, peer: Arc<AddressCheckingPeer>) -> drain::Trigger {
    let listener = in_ns(ns, || TcpListener::bind(SocketAddr::from((REMOTE, 15008))).unwrap());
    listener.set_nonblocking(true).unwrap();
    let (trigger, watch) = drain::channel();
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        // The peer's own connections (to the authority) are made in the remote namespace too.
        setns(File::open(path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            Server::new(listener, ServerSettings::default(), peer).run(watch).await;
        });
    });
    trigger
}

#[test]
fn the_outer_hbone_connection_leaves_from_the_pods_own_address() {
    let Some(topo) = Topology::new() else { return };
    let _capture = topo.capture();
    let (ca, state) = mesh();
    let remote = endpoint_of(
        workload("remote-ns", "remote", &REMOTE.to_string(), "node-b"),
        "remote-ns",
        "remote",
        &[(80, u32::from(REMOTE_PORT))],
    );
    add_workload(&state, remote);
    add_service(&state, service("remote-ns", "remote", "10.96.0.50", &[(80, u32::from(REMOTE_PORT))]));
    let _ztunnel = Ztunnel::start(&topo.node, ca.clone(), state.clone());
    who_am_i_in(&topo.remote, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), REMOTE_PORT));
    let peer = Arc::new(AddressCheckingPeer {
        certificate: ca.cert(&identity("remote-ns", "remote")),
        allowed: std::sync::Mutex::new(POD.into()),
        seen: Default::default(),
    });
    let _peer = run_peer(&topo.remote, peer.clone());

    // To the pod and through the Service's VIP: the peer admits the pod's address, as an
    // ipBlocks ALLOW for the pod on Istio's ztunnel does.
    assert_eq!(call(&topo.pod, SocketAddr::from((REMOTE, REMOTE_PORT))), Some(REMOTE.into()), "to the pod");
    assert_eq!(call(&topo.pod, "10.96.0.50:80".parse().unwrap()), Some(REMOTE.into()), "to the VIP");
    let seen = peer.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (info, host) in seen.iter().zip([None, Some("remote.remote-ns.svc.cluster.local")]) {
        assert_eq!(info.peer_addr.ip().to_canonical(), IpAddr::from(POD), "outer source: {info:?}");
        assert_eq!(info.peer_identity, identity("app-ns", "app"));
        assert_eq!(info.forwarded.for_addr.map(|a| a.ip()), Some(POD.into()), "for=: {info:?}");
        assert_eq!(info.forwarded.host.as_deref(), host, "host=: {info:?}");
        assert!(info.traceparent.as_deref().is_some_and(weft_core::hbone::is_traceparent), "{info:?}");
        assert_eq!(info.authority, SocketAddr::from((REMOTE, REMOTE_PORT)));
    }
    // The node's address is not the source: a peer that admits only the node refuses the pod.
    *peer.allowed.lock().unwrap() = IpAddr::from([192, 168, 77, 1]);
    assert_eq!(
        call(&topo.pod, SocketAddr::from((REMOTE, REMOTE_PORT))),
        None,
        "a node-only ALLOW let the pod in"
    );
}

#[test]
fn node_traffic_meets_the_pods_inbound_policy_and_probes_pass() {
    let Some(topo) = Topology::new() else { return };
    let _capture = topo.capture();
    let (ca, state) = mesh();
    let _ztunnel = Ztunnel::start(&topo.node, ca.clone(), state.clone());
    who_am_i_in(&topo.pod, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), APP_PORT));
    who_am_i_in(&topo.node, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 9100));
    let app = SocketAddr::from((POD, APP_PORT));

    // PERMISSIVE: the node's own connection is admitted through ztunnel, from the node's address.
    assert_eq!(call(&topo.node, app), Some(NODE_ADDR.into()), "node to a PERMISSIVE pod");
    // The pod calling a service of the node: the node's replies reach ztunnel's socket.
    assert_eq!(call(&topo.pod, SocketAddr::from((NODE_ADDR, 9100))), Some(POD.into()), "pod to the node");

    // STRICT: the node is refused like any plaintext caller; the probe source still gets in.
    add_policy(&state, strict());
    let mut strict_app = workload("app-ns", "app", &POD.to_string(), "node-a");
    strict_app.authorization_policies = vec![STRICT.into()];
    add_workload(&state, strict_app);
    assert_eq!(call(&topo.node, app), None, "STRICT let the node in");
    assert_eq!(call_from(&topo.node, Some(PROBE.into()), app), Some(PROBE.into()), "probe under STRICT");
    // Only the node's own probes: another host sending from the probe address is captured.
    assert_eq!(
        call_from(&topo.remote, Some(PROBE.into()), app),
        None,
        "STRICT let a remote probe address in"
    );
}

/// An HBONE CONNECT from the remote namespace to the pod's application, as `client` (from
/// `source_ip` when given) claiming `for_addr`: the address the application saw, or the error.
fn hbone_call(
    topo: &Topology,
    ca: &TestCa,
    client: weft_core::identity::Identity,
    source_ip: Option<IpAddr>,
    for_addr: SocketAddr,
) -> Result<SocketAddr, ClientError> {
    in_ns_async(&topo.remote, || async {
        let mut stream = Pool::new(ClientSettings::default())
            .connect(ConnectRequest {
                certificate: ca.cert(&client),
                expected: vec![identity("app-ns", "app")],
                source_ip,
                hbone_addr: SocketAddr::new(POD.into(), 15008),
                authority: SocketAddr::new(POD.into(), APP_PORT),
                forwarded: weft_core::hbone::Forwarded { for_addr: Some(for_addr), host: None },
                baggage: None,
                traceparent: None,
            })
            .await?;
        Ok(exchange(&mut stream, b"hbone").await)
    })
}

#[test]
fn a_pod_with_its_own_waypoint_admits_only_the_waypoint() {
    let Some(topo) = Topology::new() else { return };
    let _capture = topo.capture();
    let (ca, state) = mesh();
    // The waypoint `app-ns/wp` (identity app-ns/wp): its Service and its pod, which lives on
    // node-b at OUTSIDE. The pod is bound to it (waypoint-for: workload).
    add_service(&state, service("app-ns", "wp", "10.96.0.99", &[(15008, 15008)]));
    let wp_pod = workload("app-ns", "wp", &OUTSIDE.to_string(), "node-b");
    add_workload(&state, endpoint_of(wp_pod, "app-ns", "wp", &[(15008, 15008)]));
    let mut app = workload("app-ns", "app", &POD.to_string(), "node-a");
    app.waypoint = resources::waypoint("app-ns", "wp");
    add_workload(&state, app);
    let ztunnel = Ztunnel::start(&topo.node, ca.clone(), state.clone());
    who_am_i_in(&topo.pod, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), APP_PORT));
    let from_remote = SocketAddr::new(REMOTE.into(), 41000);

    // Another workload's CONNECT straight to the pod's ztunnel: 401, counted as a denial.
    let bypass = hbone_call(&topo, &ca, identity("remote-ns", "remote"), None, from_remote);
    assert!(matches!(&bypass, Err(ClientError::Status { status, .. }) if *status == 401), "{bypass:?}");
    ztunnel.wait_metric(&[
        "istio_tcp_connections_closed_total",
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/remote-ns/sa/remote\"",
        "destination_workload=\"app\"",
        "response_flags=\"DENY\"",
    ]);
    // A plaintext caller skipped the waypoint too: reset, and counted.
    assert_eq!(
        call(&topo.remote, SocketAddr::new(POD.into(), APP_PORT)),
        None,
        "plaintext bypassed the waypoint"
    );
    ztunnel.wait_metric(&[
        "istio_tcp_connections_closed_total",
        "source_principal=\"unknown\"",
        "destination_workload=\"app\"",
        "response_flags=\"DENY\"",
    ]);

    // The waypoint's own CONNECT (from its pod, carrying the original client) is admitted, and
    // the application sees the original client.
    let through = hbone_call(&topo, &ca, identity("app-ns", "wp"), Some(OUTSIDE.into()), from_remote);
    assert_eq!(through.unwrap().ip(), IpAddr::from(REMOTE), "through the waypoint");

    // Bound only through its Service (waypoint-for: service): direct connections to the pod's
    // own address are Istio's and still admitted, in HBONE and in plaintext.
    let mut app_svc = service("app-ns", "app", "10.96.0.60", &[(80, u32::from(APP_PORT))]);
    app_svc.waypoint = resources::waypoint("app-ns", "wp");
    add_service(&state, app_svc);
    let app = workload("app-ns", "app", &POD.to_string(), "node-a");
    add_workload(&state, endpoint_of(app, "app-ns", "app", &[(80, u32::from(APP_PORT))]));
    let direct = hbone_call(&topo, &ca, identity("remote-ns", "remote"), None, from_remote);
    assert_eq!(direct.unwrap().ip(), IpAddr::from(REMOTE), "direct HBONE to a service-waypoint pod");
    let seen = call(&topo.remote, SocketAddr::new(POD.into(), APP_PORT));
    assert_eq!(seen, Some(REMOTE.into()), "direct plaintext to a service-waypoint pod");
}
