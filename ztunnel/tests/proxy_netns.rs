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
use weft_core::hbone::{ClientError, ClientSettings, ConnectRequest, Pool};
use weft_core::state::{ProxyState, Shared};
use weft_core::telemetry::Metrics;
use weft_core::testing::{identity, LocalSource, TestCa};
use ztunnel::proxy::{Ports, Proxy, ProxyInputs};

use proxy_support::*;

const POD: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 5);
const REMOTE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
/// A second address of the remote namespace that is no workload of the mesh.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 3);
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
    let mut stream = in_ns(ns, || TcpStream::connect_timeout(&to, IO_TIMEOUT)).ok()?;
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
}

impl Ztunnel {
    fn start(ns: &str, ca: Arc<TestCa>, state: Arc<Shared<ProxyState>>) -> Ztunnel {
        let (trigger, watch) = drain::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{ns}");
        let thread = thread::spawn(move || {
            setns(File::open(path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let source = LocalSource { ca, lifetime: Duration::from_secs(3600), fetches: Arc::default() };
                let inputs = ProxyInputs {
                    state,
                    certs: Arc::new(CertManager::new(source)),
                    metrics: Arc::new(Metrics::new().0),
                    node_name: "node-a".into(),
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
        Ztunnel { _drain: trigger, thread: Some(thread) }
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
                forwarded_for: Some(SocketAddr::new(REMOTE.into(), 41000)),
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
                forwarded_for: Some(SocketAddr::new(REMOTE.into(), 41001)),
                baggage: None,
                traceparent: None,
            })
            .await
            .err()
    });
    assert!(matches!(denied, Some(ClientError::Status { status, .. }) if status == 401), "{denied:?}");
}
