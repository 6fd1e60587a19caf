//! The xDS server over real sockets and real gRPC: the generated delta ADS client against
//! `controller::xds::serve` on 127.0.0.1:0, with Istio workload and authorization resources built by
//! hand. Also checks, byte by byte, that the protos put Istio's field numbers on the wire.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use prost::bytes::{Buf, BufMut};
use prost::Message;
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use weft_core::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use weft_core::proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use weft_core::proto::ca::IstioCertificateRequest;
use weft_core::proto::envoy::config::core::v3::Node;
use weft_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_core::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use weft_core::proto::google::rpc;
use weft_core::proto::istio::security::{self, Authorization, Group, Match, Rules, StringMatch};
use weft_core::proto::istio::workload::{
    self, address, Address, GatewayAddress, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload,
};

use controller::ca::{load_or_create_root, CaService, StaticAuthorizer};
use controller::xds::{
    serve, ClientStatus, Everything, PerResource, Snapshot, View, XdsError, XdsOptions, XdsResource,
    XdsServer, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL,
};

/// Generous: the machine is shared with other builds.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Long enough that a push the debounce held back would have come.
const QUIET: Duration = Duration::from_millis(500);

/// An xDS server on a real port until [`Running::stop`].
struct Running {
    addr: SocketAddr,
    xds: XdsServer,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), XdsError>>,
}

impl Running {
    async fn start(view: impl View, snapshot: Snapshot) -> anyhow::Result<Running> {
        let options = XdsOptions { debounce: DEBOUNCE, ..XdsOptions::default() };
        Running::start_with(view, snapshot, Routes::default(), options).await
    }

    async fn start_with(
        view: impl View,
        snapshot: Snapshot,
        also: Routes,
        options: XdsOptions,
    ) -> anyhow::Result<Running> {
        let xds = XdsServer::new(view, options);
        xds.update(snapshot);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, rx) = oneshot::channel::<()>();
        let task =
            tokio::spawn(serve(controller::grpc::Listener::plaintext(listener), xds.clone(), also, async {
                let _ = rx.await;
            }));
        Ok(Running { addr, xds, shutdown, task })
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.addr))?.connect().await?)
    }

    /// Opens a stream whose first request is `first`.
    async fn open(&self, first: DeltaDiscoveryRequest) -> anyhow::Result<Ads> {
        let mut client = AggregatedDiscoveryServiceClient::new(self.channel().await?);
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await?;
        let responses = client.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Ads { tx, responses })
    }

    /// Waits until some connected client satisfies `check`, and returns it.
    async fn client_where(&self, check: impl Fn(&ClientStatus) -> bool) -> anyhow::Result<ClientStatus> {
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        loop {
            if let Some(c) = self.xds.clients().into_iter().find(&check) {
                return Ok(c);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no client as expected: {:#?}",
                self.xds.clients()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        tokio::time::timeout(RECV_TIMEOUT, self.task).await.context("xDS server did not stop")???;
        Ok(())
    }
}

/// One delta ADS stream, client side.
struct Ads {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

impl Ads {
    async fn send(&self, request: DeltaDiscoveryRequest) -> anyhow::Result<()> {
        Ok(self.tx.send(request).await?)
    }

    async fn recv(&mut self) -> anyhow::Result<DeltaDiscoveryResponse> {
        let message =
            tokio::time::timeout(RECV_TIMEOUT, self.responses.message()).await.context("no response")?;
        message?.context("stream ended")
    }

    /// The status the stream ends with.
    async fn end(&mut self) -> anyhow::Result<Status> {
        match tokio::time::timeout(RECV_TIMEOUT, self.responses.message())
            .await
            .context("stream did not end")?
        {
            Err(status) => Ok(status),
            Ok(other) => anyhow::bail!("expected the stream to end with a status, got {other:?}"),
        }
    }

    async fn expect_quiet(&mut self) -> anyhow::Result<()> {
        if let Ok(message) = tokio::time::timeout(QUIET, self.responses.message()).await {
            anyhow::bail!("expected no response, got {message:?}");
        }
        Ok(())
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) -> anyhow::Result<()> {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await
    }

    async fn recv_and_ack(&mut self) -> anyhow::Result<DeltaDiscoveryResponse> {
        let response = self.recv().await?;
        self.ack(&response).await?;
        Ok(response)
    }
}

const ZTUNNEL_A: &str = "ztunnel~10.0.0.2~ztunnel-a.istio-system~istio-system.svc.cluster.local";
const ZTUNNEL_B: &str = "ztunnel~10.0.1.2~ztunnel-b.istio-system~istio-system.svc.cluster.local";

/// A node as Istio's ztunnel sends it.
fn node(id: &str, node_name: &str) -> Node {
    let string = |s: &str| Value { kind: Some(Kind::StringValue(s.to_owned())) };
    let fields = BTreeMap::from([
        ("NODE_NAME".to_owned(), string(node_name)),
        ("NAME".to_owned(), string("ztunnel-a")),
        ("NAMESPACE".to_owned(), string("istio-system")),
    ]);
    Node { id: id.to_owned(), metadata: Some(Struct { fields }), ..Default::default() }
}

/// A type's first request, wildcard, as Istio's ztunnel sends it.
fn subscribe(node: Option<Node>, type_url: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest { node, type_url: type_url.to_owned(), ..Default::default() }
}

fn workload(uid: &str, node: &str, ip: [u8; 4]) -> Workload {
    Workload {
        uid: uid.to_owned(),
        name: uid.rsplit('/').next().unwrap_or(uid).to_owned(),
        namespace: "shop".to_owned(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        trust_domain: "cluster.local".to_owned(),
        service_account: "web".to_owned(),
        node: node.to_owned(),
        ..Default::default()
    }
}

fn address_of(w: Workload) -> XdsResource {
    XdsResource::address(&Address { r#type: Some(address::Type::Workload(w)) }).expect("valid workload")
}

fn service(name: &str, vip: [u8; 4]) -> XdsResource {
    XdsResource::address(&Address {
        r#type: Some(address::Type::Service(Service {
            name: name.to_owned(),
            namespace: "shop".to_owned(),
            hostname: format!("{name}.shop.svc.cluster.local"),
            addresses: vec![NetworkAddress { network: String::new(), address: vip.to_vec() }],
            ports: vec![Port { service_port: 80, target_port: 8080 }],
            ..Default::default()
        })),
    })
    .expect("valid service")
}

fn policy(name: &str, port: u32) -> XdsResource {
    XdsResource::authorization(&Authorization {
        name: name.to_owned(),
        namespace: "shop".to_owned(),
        scope: security::Scope::Namespace as i32,
        action: security::Action::Deny as i32,
        groups: vec![Group {
            rules: vec![Rules {
                matches: vec![Match {
                    destination_ports: vec![port],
                    principals: vec![StringMatch {
                        match_type: Some(security::string_match::MatchType::Prefix("spiffe://".to_owned())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
    })
    .expect("valid policy")
}

/// Three workloads (two on node-a, one on node-b), a service and a policy.
fn base_snapshot() -> Snapshot {
    Snapshot::new("1")
        .with(address_of(workload("c1//Pod/shop/web-1", "node-a", [10, 1, 0, 1])))
        .with(address_of(workload("c1//Pod/shop/web-2", "node-a", [10, 1, 0, 2])))
        .with(address_of(workload("c1//Pod/shop/cart-1", "node-b", [10, 1, 1, 1])))
        .with(service("web", [10, 96, 0, 10]))
        .with(policy("deny-9000", 9000))
}

fn names(response: &DeltaDiscoveryResponse) -> BTreeSet<String> {
    response.resources.iter().map(|r| r.name.clone()).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn decode_workload(resource: &Resource) -> anyhow::Result<Workload> {
    let any = resource.resource.as_ref().context("resource without body")?;
    anyhow::ensure!(any.type_url == ADDRESS_TYPE_URL, "body type {}", any.type_url);
    match Address::decode(any.value.as_slice())?.r#type {
        Some(address::Type::Workload(w)) => Ok(w),
        other => anyhow::bail!("expected a workload, got {other:?}"),
    }
}

#[tokio::test]
async fn subscribe_receives_everything_and_node_is_recorded() -> anyhow::Result<()> {
    let snapshot = base_snapshot();
    let server = Running::start(Everything, snapshot.clone()).await?;
    let mut ads = server.open(subscribe(Some(node(ZTUNNEL_A, "node-a")), ADDRESS_TYPE_URL)).await?;

    let addresses = ads.recv_and_ack().await?;
    assert_eq!(addresses.type_url, ADDRESS_TYPE_URL);
    assert_eq!(addresses.system_version_info, "1");
    assert!(!addresses.nonce.is_empty());
    assert!(addresses.removed_resources.is_empty());
    assert_eq!(
        names(&addresses),
        set(&[
            "c1//Pod/shop/cart-1",
            "c1//Pod/shop/web-1",
            "c1//Pod/shop/web-2",
            "shop/web.shop.svc.cluster.local"
        ])
    );
    for r in &addresses.resources {
        let expected = snapshot.get(ADDRESS_TYPE_URL, &r.name).context("unknown resource")?;
        assert_eq!(r.version, expected.version());
        assert_eq!(r.aliases, expected.aliases());
        assert_eq!(r.resource.as_ref(), Some(expected.body()));
    }
    let web1 = addresses.resources.iter().find(|r| r.name == "c1//Pod/shop/web-1").context("web-1")?;
    assert_eq!(web1.aliases, ["/10.1.0.1"]);
    assert_eq!(decode_workload(web1)?.node, "node-a");

    ads.send(subscribe(None, AUTHORIZATION_TYPE_URL)).await?;
    let policies = ads.recv_and_ack().await?;
    assert_eq!(policies.type_url, AUTHORIZATION_TYPE_URL);
    assert_eq!(names(&policies), set(&["shop/deny-9000"]));
    assert_ne!(policies.nonce, addresses.nonce);
    let body = policies.resources[0].resource.as_ref().context("body")?;
    assert_eq!(body.type_url, AUTHORIZATION_TYPE_URL);
    assert_eq!(
        Authorization::decode(body.value.as_slice())?.groups[0].rules[0].matches[0].destination_ports,
        [9000]
    );

    let client = server.client_where(|c| c.types.values().all(|t| t.acks == 1) && c.types.len() == 2).await?;
    assert_eq!(client.node.id, ZTUNNEL_A);
    assert_eq!(client.node.node_name.as_deref(), Some("node-a"));
    assert_eq!(client.node.proxy_type, "ztunnel");
    assert_eq!(client.node.pod_name, "ztunnel-a");
    assert_eq!(client.node.pod_namespace, "istio-system");
    assert_eq!(client.node.ip.to_string(), "10.0.0.2");
    assert!(client.peer.is_some_and(|p| p.ip().is_loopback()));
    assert!(client.types[ADDRESS_TYPE_URL].wildcard);
    server.stop().await
}

#[tokio::test]
async fn updates_send_only_what_changed_and_acks_are_recorded() -> anyhow::Result<()> {
    let server = Running::start(Everything, base_snapshot()).await?;
    let mut ads = server.open(subscribe(Some(node(ZTUNNEL_A, "node-a")), ADDRESS_TYPE_URL)).await?;
    let first = ads.recv_and_ack().await?;
    ads.send(subscribe(None, AUTHORIZATION_TYPE_URL)).await?;
    ads.recv_and_ack().await?;

    let acked = server.client_where(|c| c.types.get(ADDRESS_TYPE_URL).is_some_and(|t| t.acks == 1)).await?;
    let status = &acked.types[ADDRESS_TYPE_URL];
    assert_eq!(status.last_acked_nonce.as_deref(), Some(first.nonce.as_str()));
    let sent: BTreeMap<String, String> =
        first.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
    assert_eq!(status.acked, sent);

    // One workload changes (its status): exactly it is pushed, and no policy response.
    let mut changed = workload("c1//Pod/shop/web-2", "node-a", [10, 1, 0, 2]);
    changed.status = workload::WorkloadStatus::Unhealthy as i32;
    let snapshot = base_snapshot().with(address_of(changed));
    server.xds.update(snapshot.clone().with_version("2"));
    let update = ads.recv_and_ack().await?;
    assert_eq!(update.type_url, ADDRESS_TYPE_URL);
    assert_eq!(update.system_version_info, "2");
    assert_eq!(names(&update), set(&["c1//Pod/shop/web-2"]));
    assert!(update.removed_resources.is_empty());
    assert_eq!(decode_workload(&update.resources[0])?.status, workload::WorkloadStatus::Unhealthy as i32);
    ads.expect_quiet().await?;

    // A workload and the policy go away: removals only.
    let mut smaller = snapshot.clone();
    smaller.remove(ADDRESS_TYPE_URL, "c1//Pod/shop/cart-1");
    smaller.remove(AUTHORIZATION_TYPE_URL, "shop/deny-9000");
    server.xds.update(smaller);
    let mut removals = BTreeMap::new();
    for _ in 0..2 {
        let r = ads.recv_and_ack().await?;
        assert!(r.resources.is_empty(), "{r:?}");
        removals.insert(r.type_url.clone(), r.removed_resources.clone());
    }
    assert_eq!(removals[ADDRESS_TYPE_URL], ["c1//Pod/shop/cart-1"]);
    assert_eq!(removals[AUTHORIZATION_TYPE_URL], ["shop/deny-9000"]);
    ads.expect_quiet().await?;

    let client =
        server.client_where(|c| c.types.get(AUTHORIZATION_TYPE_URL).is_some_and(|t| t.acks == 2)).await?;
    assert!(client.types[AUTHORIZATION_TYPE_URL].acked.is_empty());
    let addresses = &client.types[ADDRESS_TYPE_URL].acked;
    assert!(!addresses.contains_key("c1//Pod/shop/cart-1"));
    assert_eq!(addresses["c1//Pod/shop/web-2"], update.resources[0].version);
    server.stop().await
}

/// A writer that keeps what the tracing subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

// A current-thread runtime (the default): the server's tasks run on this thread, under the
// capturing subscriber.
#[tokio::test]
async fn nack_is_logged_and_recorded_and_not_resent() -> anyhow::Result<()> {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = Running::start(Everything, base_snapshot()).await?;
    let mut ads = server.open(subscribe(Some(node(ZTUNNEL_A, "node-a")), ADDRESS_TYPE_URL)).await?;
    let rejected = ads.recv().await?;
    ads.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.to_owned(),
        response_nonce: rejected.nonce.clone(),
        error_detail: Some(rpc::Status {
            code: Code::InvalidArgument as i32,
            message: "c1//Pod/shop/web-1: unknown tunnel protocol".to_owned(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await?;

    let client = server.client_where(|c| c.types.get(ADDRESS_TYPE_URL).is_some_and(|t| t.nacks == 1)).await?;
    let status = &client.types[ADDRESS_TYPE_URL];
    let nack = status.last_nack.as_ref().context("no NACK recorded")?;
    assert_eq!(nack.nonce, rejected.nonce);
    assert_eq!(nack.code, Code::InvalidArgument as i32);
    assert_eq!(nack.message, "c1//Pod/shop/web-1: unknown tunnel protocol");
    assert!(status.acked.is_empty(), "a NACK acknowledges nothing");
    assert_eq!(status.acks, 0);

    // Not resent, neither at once nor after the debounce, nor when something else changes.
    ads.expect_quiet().await?;
    server.xds.update(base_snapshot().with(service("cart", [10, 96, 0, 11])));
    let next = ads.recv_and_ack().await?;
    assert_eq!(names(&next), set(&["shop/cart.shop.svc.cluster.local"]));
    ads.expect_quiet().await?;

    let text = logs.text();
    let line =
        text.lines().find(|l| l.contains("NACK")).with_context(|| format!("no NACK in the logs:\n{text}"))?;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(ZTUNNEL_A), "{line}");
    assert!(line.contains(ADDRESS_TYPE_URL), "{line}");
    assert!(line.contains(&format!("nonce=\"{}\"", rejected.nonce)), "{line}");
    assert!(line.contains("unknown tunnel protocol"), "{line}");
    server.stop().await
}

#[tokio::test]
async fn reconnect_sends_only_what_the_client_lacks() -> anyhow::Result<()> {
    let server = Running::start(Everything, base_snapshot()).await?;
    let mut ads = server.open(subscribe(Some(node(ZTUNNEL_A, "node-a")), ADDRESS_TYPE_URL)).await?;
    let held: BTreeMap<String, String> =
        ads.recv_and_ack().await?.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
    drop(ads);
    wait_no_clients(&server.xds).await?;

    // While the client was away: web-1 changed, cart-1 went away, web-3 appeared.
    let mut moved = workload("c1//Pod/shop/web-1", "node-a", [10, 1, 0, 1]);
    moved.canonical_revision = "v2".to_owned();
    let mut snapshot = base_snapshot().with(address_of(moved)).with(address_of(workload(
        "c1//Pod/shop/web-3",
        "node-a",
        [10, 1, 0, 3],
    )));
    snapshot.remove(ADDRESS_TYPE_URL, "c1//Pod/shop/cart-1");
    server.xds.update(snapshot);

    let mut reconnect = subscribe(Some(node(ZTUNNEL_A, "node-a")), ADDRESS_TYPE_URL);
    reconnect.initial_resource_versions = held;
    let mut ads = server.open(reconnect).await?;
    let response = ads.recv_and_ack().await?;
    assert_eq!(names(&response), set(&["c1//Pod/shop/web-1", "c1//Pod/shop/web-3"]));
    assert_eq!(response.removed_resources, ["c1//Pod/shop/cart-1"]);
    assert_eq!(decode_workload(&response.resources[0])?.canonical_revision, "v2");
    ads.expect_quiet().await?;

    // Istio's ztunnel reconnects with empty versions ("it has these names"): all of them are resent.
    let mut istio_style = subscribe(Some(node(ZTUNNEL_B, "node-b")), ADDRESS_TYPE_URL);
    istio_style.initial_resource_versions = BTreeMap::from([
        ("c1//Pod/shop/web-2".to_owned(), String::new()),
        ("gone".to_owned(), String::new()),
    ]);
    let mut ads_b = server.open(istio_style).await?;
    let response = ads_b.recv().await?;
    assert_eq!(response.resources.len(), 4);
    assert_eq!(response.removed_resources, ["gone"]);
    server.stop().await
}

#[tokio::test]
async fn quick_updates_coalesce_into_one_push() -> anyhow::Result<()> {
    let server = Running::start(Everything, base_snapshot()).await?;
    let mut ads = server.open(subscribe(Some(node(ZTUNNEL_A, "node-a")), ADDRESS_TYPE_URL)).await?;
    ads.recv_and_ack().await?;

    let mut snapshot = base_snapshot();
    for i in 0..10u8 {
        let mut w = workload("c1//Pod/shop/web-1", "node-a", [10, 1, 0, 1]);
        w.canonical_revision = format!("r{i}");
        snapshot.insert(address_of(w));
        snapshot.insert(address_of(workload(&format!("c1//Pod/shop/batch-{i}"), "node-a", [10, 2, 0, i])));
        server.xds.update(snapshot.clone().with_version(i.to_string()));
    }
    let push = ads.recv_and_ack().await?;
    assert_eq!(push.system_version_info, "9", "the push carries the last snapshot");
    assert_eq!(push.resources.len(), 11, "web-1 and ten batch workloads: {:?}", names(&push));
    let web1 = push.resources.iter().find(|r| r.name == "c1//Pod/shop/web-1").context("web-1")?;
    assert_eq!(decode_workload(web1)?.canonical_revision, "r9");
    ads.expect_quiet().await?;
    let client = server.client_where(|c| c.types.get(ADDRESS_TYPE_URL).is_some_and(|t| t.acks == 2)).await?;
    assert_eq!(client.types[ADDRESS_TYPE_URL].responses, 2);
    server.stop().await
}

/// Workloads only to the ztunnel of their node; services and policies to everyone.
fn own_node_view() -> impl View {
    PerResource(|node: &controller::xds::NodeInfo, type_url: &str, r: &XdsResource| {
        if type_url != ADDRESS_TYPE_URL {
            return true;
        }
        match Address::decode(r.body().value.as_slice()).ok().and_then(|a| a.r#type) {
            Some(address::Type::Workload(w)) => node.node_name.as_deref() == Some(w.node.as_str()),
            Some(address::Type::Service(_)) => true,
            None => false,
        }
    })
}

#[tokio::test]
async fn each_node_sees_its_own_workloads() -> anyhow::Result<()> {
    let server = Running::start(own_node_view(), base_snapshot()).await?;
    let mut a = server.open(subscribe(Some(node(ZTUNNEL_A, "node-a")), ADDRESS_TYPE_URL)).await?;
    let mut b = server.open(subscribe(Some(node(ZTUNNEL_B, "node-b")), ADDRESS_TYPE_URL)).await?;
    let service = "shop/web.shop.svc.cluster.local";
    assert_eq!(names(&a.recv_and_ack().await?), set(&["c1//Pod/shop/web-1", "c1//Pod/shop/web-2", service]));
    assert_eq!(names(&b.recv_and_ack().await?), set(&["c1//Pod/shop/cart-1", service]));

    // web-2 moves to node-b: a is told to remove it, b receives it.
    let snapshot = base_snapshot().with(address_of(workload("c1//Pod/shop/web-2", "node-b", [10, 1, 1, 2])));
    server.xds.update(snapshot);
    let to_a = a.recv_and_ack().await?;
    assert!(to_a.resources.is_empty());
    assert_eq!(to_a.removed_resources, ["c1//Pod/shop/web-2"]);
    let to_b = b.recv_and_ack().await?;
    assert_eq!(names(&to_b), set(&["c1//Pod/shop/web-2"]));
    assert!(to_b.removed_resources.is_empty());
    a.expect_quiet().await?;
    b.expect_quiet().await?;
    assert_eq!(server.xds.clients().len(), 2);
    server.stop().await
}

#[tokio::test]
async fn on_demand_subscriptions_by_name_and_alias() -> anyhow::Result<()> {
    let server = Running::start(Everything, base_snapshot()).await?;
    // Istio's ztunnel in on-demand mode: subscribe and unsubscribe "*" = nothing for now.
    let mut first = subscribe(Some(node(ZTUNNEL_A, "node-a")), ADDRESS_TYPE_URL);
    first.resource_names_subscribe = vec!["*".to_owned()];
    first.resource_names_unsubscribe = vec!["*".to_owned()];
    let mut ads = server.open(first).await?;
    let empty = ads.recv_and_ack().await?;
    assert!(empty.resources.is_empty() && empty.removed_resources.is_empty());

    // Ask by address alias (network/IP), and for an address that does not exist.
    ads.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.to_owned(),
        resource_names_subscribe: vec!["/10.1.0.2".to_owned(), "/10.9.9.9".to_owned()],
        ..Default::default()
    })
    .await?;
    let answer = ads.recv_and_ack().await?;
    assert_eq!(names(&answer), set(&["c1//Pod/shop/web-2"]));
    assert_eq!(answer.removed_resources, ["/10.9.9.9"]);

    // Only what it asked for is pushed when things change.
    let mut w1 = workload("c1//Pod/shop/web-1", "node-a", [10, 1, 0, 1]);
    w1.canonical_revision = "v2".to_owned();
    let mut w2 = workload("c1//Pod/shop/web-2", "node-a", [10, 1, 0, 2]);
    w2.canonical_revision = "v2".to_owned();
    server.xds.update(base_snapshot().with(address_of(w1)).with(address_of(w2)));
    assert_eq!(names(&ads.recv_and_ack().await?), set(&["c1//Pod/shop/web-2"]));
    ads.expect_quiet().await?;
    server.stop().await
}

/// Sends and receives raw bytes, to put garbage on the wire.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[tokio::test]
async fn invalid_first_requests_are_refused_with_a_clear_status() -> anyhow::Result<()> {
    let server = Running::start(Everything, base_snapshot()).await?;

    let status = server.open(subscribe(None, ADDRESS_TYPE_URL)).await?.end().await?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("node"), "{status:?}");

    let bad_id = Node { id: "10.0.0.2".to_owned(), ..Default::default() };
    let status = server.open(subscribe(Some(bad_id), ADDRESS_TYPE_URL)).await?.end().await?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("10.0.0.2"), "{status:?}");

    let unknown = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    let status = server.open(subscribe(Some(node(ZTUNNEL_A, "node-a")), unknown)).await?.end().await?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains(unknown) && status.message().contains(ADDRESS_TYPE_URL), "{status:?}");

    // Garbage where a DeltaDiscoveryRequest should be: field 1 claims 5 bytes, has 1.
    let mut grpc = tonic::client::Grpc::new(server.channel().await?);
    grpc.ready().await?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
    );
    let garbage = tokio_stream::iter(vec![vec![0x0a, 0x05, 0x01]]);
    let mut responses = grpc.streaming(tonic::Request::new(garbage), path, RawCodec).await?.into_inner();
    let status = match tokio::time::timeout(RECV_TIMEOUT, responses.message()).await? {
        Err(status) => status,
        Ok(other) => anyhow::bail!("expected an error status, got {other:?}"),
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("DeltaDiscoveryRequest"), "{status:?}");

    // Garbage after a good first request: answered, then the stream ends with a status.
    let first = subscribe(Some(node(ZTUNNEL_A, "node-a")), ADDRESS_TYPE_URL).encode_to_vec();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
    );
    let requests = tokio_stream::iter(vec![first, vec![0x12, 0x7f]]);
    grpc.ready().await?;
    let mut responses = grpc.streaming(tonic::Request::new(requests), path, RawCodec).await?.into_inner();
    let answered = tokio::time::timeout(RECV_TIMEOUT, responses.message()).await??.context("no response")?;
    assert_eq!(DeltaDiscoveryResponse::decode(answered.as_slice())?.resources.len(), 4);
    let status = match tokio::time::timeout(RECV_TIMEOUT, responses.message()).await? {
        Err(status) => status,
        Ok(other) => anyhow::bail!("expected an error status, got {other:?}"),
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    wait_no_clients(&server.xds).await?;

    // The server serves on.
    let mut good = server.open(subscribe(Some(node(ZTUNNEL_B, "node-b")), ADDRESS_TYPE_URL)).await?;
    assert_eq!(good.recv().await?.resources.len(), 4);
    server.stop().await
}

#[tokio::test]
async fn serves_the_ca_on_the_same_port_and_shuts_streams_down() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = CaService::new(load_or_create_root(dir.path(), "cluster.local")?, StaticAuthorizer::new());
    let routes = Routes::new(IstioCertificateServiceServer::new(ca));
    let options = XdsOptions { debounce: DEBOUNCE, ..XdsOptions::default() };
    let server = Running::start_with(Everything, base_snapshot(), routes, options).await?;

    let mut ads = server.open(subscribe(Some(node(ZTUNNEL_A, "node-a")), ADDRESS_TYPE_URL)).await?;
    assert_eq!(ads.recv_and_ack().await?.resources.len(), 4);

    // The CA answers on the same port (and refuses a caller without a token, as it should).
    let mut ca_client = IstioCertificateServiceClient::new(server.channel().await?);
    let refused = ca_client
        .create_certificate(IstioCertificateRequest {
            csr: String::new(),
            validity_duration: 0,
            metadata: None,
        })
        .await
        .err()
        .context("the CA accepted a request without a token")?;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // Shutdown closes the stream with UNAVAILABLE (proxies reconnect) and the server stops.
    let xds = server.xds.clone();
    server.stop().await?;
    let status = ads.end().await?;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    wait_no_clients(&xds).await
}

async fn wait_no_clients(xds: &XdsServer) -> anyhow::Result<()> {
    tokio::time::timeout(RECV_TIMEOUT, async {
        while !xds.clients().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .with_context(|| format!("streams still registered: {:#?}", xds.clients()))
}

#[tokio::test]
async fn a_silent_stream_is_closed_after_the_first_request_timeout() -> anyhow::Result<()> {
    let options = XdsOptions { first_request_timeout: Duration::from_millis(200), ..XdsOptions::default() };
    let server = Running::start_with(Everything, base_snapshot(), Routes::default(), options).await?;
    let mut client = AggregatedDiscoveryServiceClient::new(server.channel().await?);
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let mut ads =
        Ads { tx, responses: client.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner() };
    let status = ads.end().await?;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(server.xds.clients().is_empty());
    server.stop().await
}

/// Splits a protobuf message into (field number, wire type, payload) without a schema.
fn fields(mut bytes: &[u8]) -> anyhow::Result<Vec<(u64, u8, Vec<u8>)>> {
    fn varint(bytes: &mut &[u8]) -> anyhow::Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = bytes.split_first().context("truncated varint")?;
            *bytes = rest;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        anyhow::bail!("varint too long")
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let (number, wire_type) = (key >> 3, (key & 7) as u8);
        let payload = match wire_type {
            0 => {
                let before = bytes;
                varint(&mut bytes)?;
                before[..before.len() - bytes.len()].to_vec()
            }
            2 => {
                let len = usize::try_from(varint(&mut bytes)?)?;
                anyhow::ensure!(bytes.len() >= len, "truncated field {number}");
                let (payload, rest) = bytes.split_at(len);
                bytes = rest;
                payload.to_vec()
            }
            other => anyhow::bail!("unexpected wire type {other} for field {number}"),
        };
        out.push((number, wire_type, payload));
    }
    Ok(out)
}

fn field(fields: &[(u64, u8, Vec<u8>)], number: u64) -> anyhow::Result<(u8, Vec<u8>)> {
    let (_, wire_type, payload) =
        fields.iter().find(|(n, _, _)| *n == number).with_context(|| format!("no field {number}"))?;
    Ok((*wire_type, payload.clone()))
}

/// The numbers are Istio's (istio/istio pkg/workloadapi/workload.proto and
/// security/authorization.proto) and Envoy's (api/envoy/service/discovery/v3/discovery.proto,
/// config/core/v3/base.proto): a proxy built from those files reads these bytes.
#[test]
fn protos_use_istio_and_envoy_field_numbers() -> anyhow::Result<()> {
    let mut w = workload("c1//Pod/shop/web-1", "node-a", [10, 1, 0, 1]);
    w.hostname = "h".to_owned();
    w.network = "net1".to_owned();
    w.canonical_name = "web".to_owned();
    w.cluster_id = "c1".to_owned();
    w.waypoint = Some(GatewayAddress {
        destination: Some(workload::gateway_address::Destination::Address(NetworkAddress {
            network: "net1".to_owned(),
            address: vec![10, 1, 9, 9],
        })),
        hbone_mtls_port: 15008,
    });
    w.services = BTreeMap::from([(
        "shop/web.shop.svc.cluster.local".to_owned(),
        PortList { ports: vec![Port { service_port: 80, target_port: 8080 }] },
    )]);
    w.authorization_policies = vec!["shop/deny-9000".to_owned()];
    let bytes = w.encode_to_vec();
    // uid is field 20, length-delimited: key (20 << 3 | 2) = 162 = varint a2 01, then the length.
    let uid_key = [0xa2, 0x01, 18];
    assert!(bytes.windows(3).any(|w| w == uid_key), "no uid key in {bytes:02x?}");
    let f = fields(&bytes)?;
    let expect_string = |number: u64, value: &str| -> anyhow::Result<()> {
        assert_eq!(field(&f, number)?, (2, value.as_bytes().to_vec()), "field {number}");
        Ok(())
    };
    expect_string(20, "c1//Pod/shop/web-1")?; // uid
    expect_string(1, "web-1")?; // name
    expect_string(2, "shop")?; // namespace
    assert_eq!(field(&f, 3)?, (2, vec![10, 1, 0, 1])); // addresses
    expect_string(21, "h")?; // hostname
    expect_string(4, "net1")?; // network
    assert_eq!(field(&f, 5)?, (0, vec![1])); // tunnel_protocol = HBONE (1)
    expect_string(6, "cluster.local")?; // trust_domain
    expect_string(7, "web")?; // service_account
    expect_string(9, "node-a")?; // node
    expect_string(10, "web")?; // canonical_name
    expect_string(16, "shop/deny-9000")?; // authorization_policies
    expect_string(18, "c1")?; // cluster_id
                              // waypoint (8): GatewayAddress { address (2): NetworkAddress { network 1, address 2 }, hbone_mtls_port 3 }
    let waypoint = fields(&field(&f, 8)?.1)?;
    let gateway = fields(&field(&waypoint, 2)?.1)?;
    assert_eq!(field(&gateway, 1)?, (2, b"net1".to_vec()));
    assert_eq!(field(&gateway, 2)?, (2, vec![10, 1, 9, 9]));
    assert_eq!(field(&waypoint, 3)?, (0, vec![0xa0, 0x75])); // 15008
                                                             // services (22): map entry { key 1, value 2: PortList { ports 1: Port { service_port 1, target_port 2 } } }
    let entry = fields(&field(&f, 22)?.1)?;
    assert_eq!(field(&entry, 1)?, (2, b"shop/web.shop.svc.cluster.local".to_vec()));
    let port = fields(&field(&fields(&field(&entry, 2)?.1)?, 1)?.1)?;
    assert_eq!(field(&port, 1)?, (0, vec![80]));
    assert_eq!(field(&port, 2)?, (0, vec![0x90, 0x3f])); // 8080

    // Address: workload is field 1, service field 2.
    let a = Address { r#type: Some(address::Type::Workload(Workload::default())) }.encode_to_vec();
    assert_eq!(a, [0x0a, 0x00]);
    let s = Address { r#type: Some(address::Type::Service(Service::default())) }.encode_to_vec();
    assert_eq!(s, [0x12, 0x00]);
    let svc = Service { hostname: "x".to_owned(), ..Default::default() }.encode_to_vec();
    assert_eq!(svc, [0x1a, 0x01, b'x']); // hostname = 3

    // Authorization: groups 5 -> Group.rules 1 -> Rules.matches 2 -> Match.destination_ports 9 (packed).
    let policy = policy("p", 9000);
    let body = &policy.body().value;
    let a = fields(body)?;
    assert_eq!(field(&a, 1)?, (2, b"p".to_vec()));
    assert_eq!(field(&a, 2)?, (2, b"shop".to_vec()));
    assert_eq!(field(&a, 3)?, (0, vec![1])); // scope NAMESPACE
    assert_eq!(field(&a, 4)?, (0, vec![1])); // action DENY
    let m = fields(&field(&fields(&field(&fields(&field(&a, 5)?.1)?, 1)?.1)?, 2)?.1)?;
    assert_eq!(field(&m, 9)?, (2, vec![0xa8, 0x46])); // packed [9000]
    let principal = fields(&field(&m, 3)?.1)?; // principals: StringMatch { prefix = 2 }
    assert_eq!(field(&principal, 2)?, (2, b"spiffe://".to_vec()));

    // Envoy's delta discovery messages.
    let request = DeltaDiscoveryRequest {
        node: Some(Node { id: "n".to_owned(), cluster: "c".to_owned(), ..Default::default() }),
        type_url: "t".to_owned(),
        resource_names_subscribe: vec!["s".to_owned()],
        resource_names_unsubscribe: vec!["u".to_owned()],
        initial_resource_versions: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
        response_nonce: "x".to_owned(),
        error_detail: Some(rpc::Status { code: 3, message: "m".to_owned(), details: vec![] }),
    };
    let r = fields(&request.encode_to_vec())?;
    let node = fields(&field(&r, 1)?.1)?;
    assert_eq!(field(&node, 1)?, (2, b"n".to_vec()));
    assert_eq!(field(&node, 2)?, (2, b"c".to_vec()));
    assert_eq!(field(&r, 2)?, (2, b"t".to_vec()));
    assert_eq!(field(&r, 3)?, (2, b"s".to_vec()));
    assert_eq!(field(&r, 4)?, (2, b"u".to_vec()));
    assert_eq!(field(&r, 5)?, (2, vec![0x0a, 0x01, b'k', 0x12, 0x01, b'v']));
    assert_eq!(field(&r, 6)?, (2, b"x".to_vec()));
    assert_eq!(field(&r, 7)?, (2, vec![0x08, 0x03, 0x12, 0x01, b'm']));
    let metadata = Node { metadata: Some(Struct::default()), ..Default::default() }.encode_to_vec();
    assert_eq!(metadata, [0x1a, 0x00]); // Node.metadata = 3

    let response = DeltaDiscoveryResponse {
        system_version_info: "1".to_owned(),
        resources: vec![Resource {
            name: "n".to_owned(),
            aliases: vec!["a".to_owned()],
            version: "v".to_owned(),
            resource: Some(prost_types::Any { type_url: "t".to_owned(), value: vec![] }),
            ..Default::default()
        }],
        type_url: "t".to_owned(),
        removed_resources: vec!["r".to_owned()],
        nonce: "x".to_owned(),
    };
    let r = fields(&response.encode_to_vec())?;
    assert_eq!(field(&r, 1)?, (2, b"1".to_vec()));
    assert_eq!(field(&r, 4)?, (2, b"t".to_vec()));
    assert_eq!(field(&r, 5)?, (2, b"x".to_vec()));
    assert_eq!(field(&r, 6)?, (2, b"r".to_vec()));
    let resource = fields(&field(&r, 2)?.1)?;
    assert_eq!(field(&resource, 1)?, (2, b"v".to_vec()));
    assert_eq!(field(&resource, 2)?, (2, vec![0x0a, 0x01, b't']));
    assert_eq!(field(&resource, 3)?, (2, b"n".to_vec()));
    assert_eq!(field(&resource, 4)?, (2, b"a".to_vec()));
    Ok(())
}

/// A first push bigger than gRPC's default 4 MiB message limit arrives in several responses that
/// a client with default limits reads, each ACKed; the next change is one small delta.
#[tokio::test]
async fn a_push_larger_than_a_grpc_message_is_split_into_responses() -> anyhow::Result<()> {
    let mut snapshot = Snapshot::new("big");
    for i in 0..20_000u32 {
        let [_, _, hi, lo] = i.to_be_bytes();
        let mut w = workload(&format!("c1//Pod/shop/web-{i}"), "node-a", [10, 2, hi, lo]);
        // ~300 bytes each, as a pod with labels and a few services: ~6 MiB in all.
        w.canonical_name = "x".repeat(200);
        snapshot.insert(address_of(w));
    }
    let total: usize = snapshot.resources(ADDRESS_TYPE_URL).map(|r| r.body().value.len()).sum();
    assert!(total > 5 << 20, "the test needs more than 4 MiB, has {total}");
    let server = Running::start(Everything, snapshot).await?;
    let mut ads = server.open(subscribe(Some(node(ZTUNNEL_A, "node-a")), ADDRESS_TYPE_URL)).await?;
    let mut received = BTreeSet::new();
    let mut responses = 0;
    while received.len() < 20_000 {
        let response = ads.recv_and_ack().await?;
        assert!(response.encoded_len() < 4 << 20, "response of {} bytes", response.encoded_len());
        let before = received.len();
        received.extend(names(&response));
        assert_eq!(received.len(), before + response.resources.len(), "no resource twice");
        responses += 1;
    }
    assert!(responses >= 6, "{responses} responses");
    let status =
        server.client_where(|c| c.types.get(ADDRESS_TYPE_URL).is_some_and(|t| t.acks == responses)).await?;
    assert_eq!(status.types[ADDRESS_TYPE_URL].acked.len(), 20_000);

    let mut next = server.xds.snapshot().as_ref().clone().with_version("big-2");
    next.remove(ADDRESS_TYPE_URL, "c1//Pod/shop/web-7");
    server.xds.update(next);
    let response = ads.recv_and_ack().await?;
    assert!(response.resources.is_empty());
    assert_eq!(response.removed_resources, ["c1//Pod/shop/web-7"]);
    server.stop().await
}
