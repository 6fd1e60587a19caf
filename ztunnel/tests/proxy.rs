//! The data path on loopback, without capture: real listeners, real HBONE (mutual TLS, HTTP/2)
//! between in-process ztunnels, real upstream connections. The "pods" are loopback addresses
//! (all of 127.0.0.0/8 is local, so upstream connections can leave from a client pod's address
//! without IP_TRANSPARENT). Runs as any user; sockets are transparent only as root.
#![allow(clippy::unwrap_used)]

mod proxy_support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use weft_core::hbone::{ClientError, ClientSettings, ConnectRequest, Pool};
use weft_core::proto::istio::security::{Action, Scope};
use weft_core::proto::istio::workload::TunnelProtocol;
use weft_core::state::{ProxyState, Shared};
use weft_core::testing::{identity, TestCa};
use ztunnel::proxy::Ports;

use proxy_support::*;

const SERVER: &str = "127.0.0.1";
const CLIENT: &str = "127.0.0.3";
const OTHER: &str = "127.0.0.4";
/// Where the outbound tests bind their ztunnel; also the service VIP.
const VIP: &str = "127.0.0.5";

struct Mesh {
    ca: Arc<TestCa>,
    state: Arc<Shared<ProxyState>>,
}

impl Mesh {
    /// server-ns/server on node-a at 127.0.0.1; client-ns/client and other-ns/other on node-b.
    fn new() -> Mesh {
        init_logs();
        let state = Arc::new(Shared::new(ProxyState::new("")));
        add_workload(&state, workload("server-ns", "server", SERVER, "node-a"));
        add_workload(&state, workload("client-ns", "client", CLIENT, "node-b"));
        add_workload(&state, workload("other-ns", "other", OTHER, "node-b"));
        Mesh { ca: Arc::new(TestCa::new()), state }
    }

    async fn node_a(&self) -> Node {
        Node::start(self.ca.clone(), self.state.clone(), "node-a", ip(SERVER), any_port()).await
    }

    /// Opens an HBONE stream to node-a as `ns/name` calling from `from` (the outer connection's
    /// source, and `for=`), to `app`.
    async fn hbone(
        &self,
        node: &Node,
        ns: &str,
        name: &str,
        from: &str,
        app: SocketAddr,
    ) -> Result<weft_core::hbone::H2Stream, ClientError> {
        self.hbone_claiming(node, ns, name, from, from, app).await
    }

    /// [`Mesh::hbone`] from `from` with `forwarded: for=` claiming `claimed`.
    async fn hbone_claiming(
        &self,
        node: &Node,
        ns: &str,
        name: &str,
        from: &str,
        claimed: &str,
        app: SocketAddr,
    ) -> Result<weft_core::hbone::H2Stream, ClientError> {
        let pool = Pool::new(ClientSettings::default());
        pool.connect(ConnectRequest {
            certificate: self.ca.cert(&identity(ns, name)),
            expected: vec![identity("server-ns", "server")],
            source_ip: Some(ip(from)),
            hbone_addr: node.addrs.hbone,
            authority: app,
            forwarded: weft_core::hbone::Forwarded {
                for_addr: Some(SocketAddr::new(ip(claimed), 40000)),
                host: Some("server.server-ns.svc.cluster.local".into()),
            },
            baggage: None,
            traceparent: None,
        })
        .await
    }
}

/// A TCP connection from `from` (a loopback address) to `to`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(from), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test]
async fn hbone_reaches_the_pod_from_the_callers_address() {
    let mesh = Mesh::new();
    let node = mesh.node_a().await;
    let (app, _) = who_am_i(SocketAddr::new(ip(SERVER), 0)).await;

    let mut stream = mesh.hbone(&node, "client-ns", "client", CLIENT, app).await.unwrap();
    let seen = exchange(&mut stream, b"hello through HBONE").await;
    assert_eq!(seen.ip(), ip(CLIENT), "the application sees the client pod, not ztunnel");

    let opened = node
        .wait_metric(&[
            "istio_tcp_connections_closed_total{",
            "reporter=\"destination\"",
            "source_workload=\"client\"",
            "source_principal=\"spiffe://cluster.local/ns/client-ns/sa/client\"",
            "destination_workload=\"server\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ])
        .await;
    assert!(opened.ends_with(" 1"), "{opened}");
    // 19 bytes up, the address line plus 19 bytes back.
    let received = node.wait_metric(&["istio_tcp_received_bytes_total{", "reporter=\"destination\""]).await;
    assert!(received.ends_with(" 19"), "{received}");
}

#[tokio::test]
async fn a_forwarded_address_the_certificate_does_not_prove_is_refused() {
    let mesh = Mesh::new();
    let node = mesh.node_a().await;
    let (app, accepted) = who_am_i(SocketAddr::new(ip(SERVER), 0)).await;
    // other-ns/other, connecting from its own address, with its certificate, claiming
    // client-ns/client's address, and an address outside the mesh: both refused with 400, the
    // pod never reached.
    for claimed in [CLIENT, "8.8.8.8"] {
        let err = mesh.hbone_claiming(&node, "other-ns", "other", OTHER, claimed, app).await.unwrap_err();
        assert!(matches!(err, ClientError::Status { status, .. } if status == 400), "{claimed}: {err}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    // Its own address is the source, whatever port `for=` names.
    let mut stream = mesh.hbone(&node, "other-ns", "other", OTHER, app).await.unwrap();
    assert_eq!(exchange(&mut stream, b"ok").await.ip(), ip(OTHER));
}

#[tokio::test]
async fn a_deny_policy_answers_401_and_counts_the_denial() {
    let mesh = Mesh::new();
    let m = principal("cluster.local/ns/client-ns/sa/client");
    add_policy(&mesh.state, policy("server-ns", "deny-client", Scope::Namespace, Action::Deny, m));
    let node = mesh.node_a().await;
    let (app, accepted) = who_am_i(SocketAddr::new(ip(SERVER), 0)).await;

    let err = mesh.hbone(&node, "client-ns", "client", CLIENT, app).await.unwrap_err();
    assert!(matches!(err, ClientError::Status { status, .. } if status == 401), "{err}");
    node.wait_metric(&[
        "istio_tcp_connections_closed_total{",
        "response_flags=\"DENY\"",
        "source_workload=\"client\"",
    ])
    .await;
    // Another caller is not affected.
    let mut stream = mesh.hbone(&node, "other-ns", "other", OTHER, app).await.unwrap();
    assert_eq!(exchange(&mut stream, b"ok").await.ip(), ip(OTHER));
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the denied caller never reached the pod");
}

#[tokio::test]
async fn strict_refuses_plaintext_and_allows_hbone() {
    let mesh = Mesh::new();
    add_policy(&mesh.state, strict());
    let mut server = workload("server-ns", "server", SERVER, "node-a");
    server.authorization_policies = vec![STRICT.into()];
    add_workload(&mesh.state, server);
    let node = mesh.node_a().await;
    let (app, _) = who_am_i(SocketAddr::new(ip(SERVER), 0)).await;

    // Without capture, the plaintext listener's own address stands for the pod's.
    let plain = connect_from(CLIENT, node.addrs.inbound_plain).await;
    assert!(refused(plain).await, "plaintext was answered");
    node.wait_metric(&[
        "istio_tcp_connections_closed_total{",
        "response_flags=\"DENY\"",
        "connection_security_policy=\"unknown\"",
        "source_workload=\"client\"",
        "source_principal=\"unknown\"",
    ])
    .await;

    let mut stream = mesh.hbone(&node, "client-ns", "client", CLIENT, app).await.unwrap();
    assert_eq!(exchange(&mut stream, b"mtls").await.ip(), ip(CLIENT));
}

#[tokio::test]
async fn an_allow_for_one_namespace_shuts_out_another() {
    let mesh = Mesh::new();
    let allow =
        policy("server-ns", "allow-client-ns", Scope::Namespace, Action::Allow, namespace("client-ns"));
    add_policy(&mesh.state, allow);
    let node = mesh.node_a().await;
    let (app, _) = who_am_i(SocketAddr::new(ip(SERVER), 0)).await;

    let mut stream = mesh.hbone(&node, "client-ns", "client", CLIENT, app).await.unwrap();
    assert_eq!(exchange(&mut stream, b"allowed").await.ip(), ip(CLIENT));
    let err = mesh.hbone(&node, "other-ns", "other", OTHER, app).await.unwrap_err();
    assert!(matches!(err, ClientError::Status { status, .. } if status == 401), "{err}");
}

#[tokio::test]
async fn hbone_to_an_address_that_is_not_the_presented_pod_is_refused() {
    let mesh = Mesh::new();
    add_workload(&mesh.state, workload("server-ns", "second", "127.0.0.2", "node-a"));
    add_workload(&mesh.state, workload("far-ns", "far", "127.0.0.8", "node-b"));
    let node = mesh.node_a().await;
    let (app, accepted) = who_am_i(SocketAddr::new(ip(SERVER), 0)).await;

    // The tunnel was opened to 127.0.0.1 (server's certificate) but asks for another pod.
    let err =
        mesh.hbone(&node, "client-ns", "client", CLIENT, SocketAddr::new(ip("127.0.0.2"), app.port())).await;
    assert!(matches!(err, Err(ClientError::Status { status, .. }) if status == 400), "{err:?}");
    // ... or for a pod of another node.
    let err = mesh.hbone(&node, "client-ns", "client", CLIENT, SocketAddr::new(ip("127.0.0.8"), 80)).await;
    assert!(matches!(err, Err(ClientError::Status { status, .. }) if status == 400), "{err:?}");
    // A pod that is down: 503.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let err = mesh.hbone(&node, "client-ns", "client", CLIENT, closed).await;
    assert!(matches!(err, Err(ClientError::Status { status, .. }) if status == 503), "{err:?}");
    node.wait_metric(&["istio_tcp_connections_closed_total{", "response_flags=\"CONNECT\""]).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

/// The outbound tests: ztunnel of node-a on 127.0.0.5, which is also a service VIP whose port is
/// the outbound listener's, so a connection to the listener looks like a captured call to the
/// service. The client pod (127.0.0.3) is moved to node-a.
struct Outbound {
    mesh: Mesh,
    node: Node,
    app: SocketAddr,
}

impl Outbound {
    /// `endpoint` serves the app; `protocol` says whether it is in the mesh.
    async fn start(endpoint: (&str, &str), protocol: TunnelProtocol) -> Outbound {
        let mesh = Mesh::new();
        add_workload(&mesh.state, workload("client-ns", "client", CLIENT, "node-a"));
        let node = Node::start(mesh.ca.clone(), mesh.state.clone(), "node-a", ip(VIP), any_port()).await;
        let (app, _) = who_am_i(SocketAddr::new(ip(endpoint.1), 0)).await;
        let port = u32::from(node.addrs.outbound.port());
        let mut w = workload("server-ns", "server", endpoint.1, endpoint.0);
        w.tunnel_protocol = protocol as i32;
        add_workload(&mesh.state, endpoint_of(w, "server-ns", "web", &[(port, u32::from(app.port()))]));
        add_service(&mesh.state, service("server-ns", "web", VIP, &[(port, u32::from(app.port()))]));
        Outbound { mesh, node, app }
    }
}

#[tokio::test]
async fn outbound_to_a_mesh_pod_of_the_same_node_is_authorized_in_process() {
    let out = Outbound::start(("node-a", SERVER), TunnelProtocol::Hbone).await;
    let mut stream = connect_from(CLIENT, out.node.addrs.outbound).await;
    assert_eq!(exchange(&mut stream, b"same node").await.ip(), ip(CLIENT));
    for reporter in ["source", "destination"] {
        out.node
            .wait_metric(&[
                "istio_tcp_connections_closed_total{",
                &format!("reporter=\"{reporter}\""),
                "source_principal=\"spiffe://cluster.local/ns/client-ns/sa/client\"",
                "destination_service=\"web.server-ns.svc.cluster.local\"",
                "destination_workload=\"server\"",
                "connection_security_policy=\"mutual_tls\"",
            ])
            .await;
    }

    // The destination's policy applies on the same node too.
    let m = principal("cluster.local/ns/client-ns/sa/client");
    add_policy(&out.mesh.state, policy("server-ns", "deny", Scope::Namespace, Action::Deny, m));
    assert!(refused(connect_from(CLIENT, out.node.addrs.outbound).await).await);
    out.node.wait_metric(&["reporter=\"source\"", "response_flags=\"DENY\""]).await;
    out.node.wait_metric(&["reporter=\"destination\"", "response_flags=\"DENY\""]).await;
}

#[tokio::test]
async fn outbound_to_a_pod_outside_the_mesh_passes_through_from_the_pods_address() {
    let out = Outbound::start(("node-b", SERVER), TunnelProtocol::None).await;
    let mut stream = connect_from(CLIENT, out.node.addrs.outbound).await;
    assert_eq!(exchange(&mut stream, b"plain").await.ip(), ip(CLIENT));
    out.node
        .wait_metric(&[
            "istio_tcp_connections_closed_total{",
            "reporter=\"source\"",
            "source_workload=\"client\"",
            "source_principal=\"unknown\"",
            "destination_workload=\"server\"",
            "connection_security_policy=\"unknown\"",
        ])
        .await;
}

#[tokio::test]
async fn outbound_from_an_unknown_or_foreign_source_is_refused() {
    let out = Outbound::start(("node-a", SERVER), TunnelProtocol::Hbone).await;
    // 127.0.0.9 is no workload; 127.0.0.4 is a pod of node-b.
    for from in ["127.0.0.9", OTHER] {
        assert!(refused(connect_from(from, out.node.addrs.outbound).await).await, "{from} was proxied");
    }
    // No endpoint: refused, counted with CONNECT.
    out.mesh.state.update(|s| s.remove_address("Kubernetes//Pod/server-ns/server"));
    assert!(refused(connect_from(CLIENT, out.node.addrs.outbound).await).await);
    out.node.wait_metric(&["reporter=\"source\"", "response_flags=\"CONNECT\""]).await;
    // The listener still serves.
    add_workload(
        &out.mesh.state,
        endpoint_of(
            workload("server-ns", "server", SERVER, "node-a"),
            "server-ns",
            "web",
            &[(u32::from(out.node.addrs.outbound.port()), u32::from(out.app.port()))],
        ),
    );
    let mut stream = connect_from(CLIENT, out.node.addrs.outbound).await;
    assert_eq!(exchange(&mut stream, b"again").await.ip(), ip(CLIENT));
}

/// Outbound to a pod of another node: HBONE from node-a's ztunnel to node-b's on
/// `127.0.0.6:15008` (HBONE's port is fixed). Skipped if that port is taken here.
#[tokio::test]
async fn outbound_to_another_node_goes_through_hbone() {
    const FAR: &str = "127.0.0.6";
    let out = Outbound::start(("node-b", FAR), TunnelProtocol::Hbone).await;
    let ports = Ports { hbone: 15008, ..any_port() };
    if std::net::TcpListener::bind((ip(FAR), 15008)).is_err() {
        eprintln!("skipping: {FAR}:15008 is taken in this network namespace");
        return;
    }
    let node_b = Node::start(out.mesh.ca.clone(), out.mesh.state.clone(), "node-b", ip(FAR), ports).await;

    let mut stream = connect_from(CLIENT, out.node.addrs.outbound).await;
    assert_eq!(exchange(&mut stream, b"across nodes").await.ip(), ip(CLIENT));
    out.node
        .wait_metric(&[
            "istio_tcp_connections_closed_total{",
            "reporter=\"source\"",
            "destination_workload=\"server\"",
            "connection_security_policy=\"mutual_tls\"",
        ])
        .await;
    node_b
        .wait_metric(&[
            "istio_tcp_connections_closed_total{",
            "reporter=\"destination\"",
            "source_principal=\"spiffe://cluster.local/ns/client-ns/sa/client\"",
            "source_workload=\"client\"",
            // Guessed at the destination from the pod's one service with this target port.
            "destination_service=\"web.server-ns.svc.cluster.local\"",
        ])
        .await;

    // Denied at node-b: the client's connection is reset, both sides count it.
    let m = principal("cluster.local/ns/client-ns/sa/client");
    add_policy(&out.mesh.state, policy("server-ns", "deny", Scope::Namespace, Action::Deny, m));
    assert!(refused(connect_from(CLIENT, out.node.addrs.outbound).await).await);
    out.node.wait_metric(&["reporter=\"source\"", "response_flags=\"DENY\""]).await;
    node_b.wait_metric(&["reporter=\"destination\"", "response_flags=\"DENY\""]).await;
}

#[tokio::test]
async fn a_connection_to_ztunnels_own_port_is_not_looped() {
    let mesh = Mesh::new();
    let node = mesh.node_a().await;
    // Plaintext to node-a's :15006 with no policy: allowed, but the destination is the
    // listener itself.
    assert!(refused(connect_from(CLIENT, node.addrs.inbound_plain).await).await);
}

/// Reads the caller address line [`who_am_i`] sends first, leaving the stream open.
async fn greeting(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> SocketAddr {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(read, 1, "closed before the greeting ended: {line:?}");
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap().trim().parse().unwrap()
}

/// Sends `msg` and reads its echo back, on a stream that stays open.
async fn round_trip(stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin), msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut echoed = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(echoed, msg);
}

/// How long `stream` takes to be closed or reset (at most `limit`; `None` if it stays open).
async fn closed_within(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn an_open_hbone_stream_a_new_deny_forbids_is_closed_and_the_others_flow_on() {
    let mesh = Mesh::new();
    let node = mesh.node_a().await;
    let (app, _) = who_am_i(SocketAddr::new(ip(SERVER), 0)).await;
    let mut client = mesh.hbone(&node, "client-ns", "client", CLIENT, app).await.unwrap();
    let mut other = mesh.hbone(&node, "other-ns", "other", OTHER, app).await.unwrap();
    assert_eq!(greeting(&mut client).await.ip(), ip(CLIENT));
    assert_eq!(greeting(&mut other).await.ip(), ip(OTHER));
    round_trip(&mut client, b"before").await;
    round_trip(&mut other, b"before").await;

    // An update that changes nothing for them closes nothing.
    add_workload(&mesh.state, workload("client-ns", "late", "127.0.0.6", "node-b"));
    node.updated();
    assert_eq!(closed_within(&mut client, Duration::from_millis(200)).await, None);
    round_trip(&mut client, b"still allowed").await;

    let m = principal("cluster.local/ns/client-ns/sa/client");
    add_policy(&mesh.state, policy("server-ns", "deny-client", Scope::Namespace, Action::Deny, m));
    node.updated();
    let took = closed_within(&mut client, Duration::from_secs(1)).await;
    assert!(took.is_some(), "client-ns/client's stream outlived the DENY by 1 s");
    round_trip(&mut other, b"after the deny").await;

    node.wait_metric(&[
        "istio_tcp_connections_closed_total{",
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/client-ns/sa/client\"",
        "response_flags=\"DENY\"",
    ])
    .await;
    let metrics = node.metrics();
    let other_closed = metrics.lines().any(|l| {
        l.starts_with("istio_tcp_connections_closed_total{") && l.contains("source_workload=\"other\"")
    });
    assert!(!other_closed, "other-ns/other counted closed:\n{metrics}");
}

#[tokio::test]
async fn an_open_same_node_connection_a_new_deny_forbids_is_closed() {
    let out = Outbound::start(("node-a", SERVER), TunnelProtocol::Hbone).await;
    let mut stream = connect_from(CLIENT, out.node.addrs.outbound).await;
    assert_eq!(greeting(&mut stream).await.ip(), ip(CLIENT));
    round_trip(&mut stream, b"same node").await;

    let m = principal("cluster.local/ns/client-ns/sa/client");
    add_policy(&out.mesh.state, policy("server-ns", "deny", Scope::Namespace, Action::Deny, m));
    out.node.updated();
    assert!(closed_within(&mut stream, Duration::from_secs(1)).await.is_some(), "outlived the DENY");
    for reporter in ["source", "destination"] {
        out.node
            .wait_metric(&[
                "istio_tcp_connections_closed_total{",
                &format!("reporter=\"{reporter}\""),
                "response_flags=\"DENY\"",
            ])
            .await;
    }
}
