//! ztunnel's xDS client (`weft_core::xds` with the mesh handler) against a fake delta ADS server
//! on a real port: it subscribes to both types with its node and token, the state follows pushes
//! and removals, a bad resource is NACKed with its reason while the rest applies, the state
//! survives the server going away, and a reconnect sends the versions held (so a controller
//! resends only what changed).
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use prost_types::Any;
use tokio::net::TcpListener;
use tokio::sync::watch;
use weft_core::cert_manager::Token;
use weft_core::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, Resource};
use weft_core::proto::istio::security::{self, Authorization};
use weft_core::proto::istio::workload::{address, Address, TunnelProtocol, Workload};
use weft_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use weft_core::state::{ProxyState, Shared};
use weft_core::testing::ads::{response, AdsStream, FakeAds};
use weft_core::xds::Synced;

const TIMEOUT: Duration = Duration::from_secs(10);

fn workload(name: &str, ip: [u8; 4]) -> (String, String, Address) {
    let w = Workload {
        uid: format!("c1//Pod/shop/{name}"),
        name: name.into(),
        namespace: "shop".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        node: "node-a".into(),
        service_account: name.into(),
        ..Default::default()
    };
    (w.uid.clone(), format!("v-{name}"), Address { r#type: Some(address::Type::Workload(w)) })
}

fn policy(name: &str) -> (String, String, Authorization) {
    let a = Authorization {
        name: name.into(),
        namespace: "shop".into(),
        scope: security::Scope::Namespace as i32,
        action: security::Action::Deny as i32,
        groups: Vec::new(),
    };
    (format!("shop/{name}"), "v1".into(), a)
}

async fn until(synced: &mut watch::Receiver<Synced>, what: &str, check: impl Fn(&Synced) -> bool) {
    tokio::time::timeout(TIMEOUT, async {
        while !check(&synced.borrow()) {
            let _ = tokio::time::timeout(Duration::from_millis(50), synced.changed()).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The two subscriptions a new stream opens with, by type.
async fn subscriptions(stream: &mut AdsStream) -> [DeltaDiscoveryRequest; 2] {
    let first = stream.next_request().await;
    let second = stream.next_request().await;
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    assert_eq!(second.type_url, AUTHORIZATION_TYPE_URL);
    [first, second]
}

#[tokio::test]
async fn the_state_follows_the_server_and_outlives_it() {
    let mut server = FakeAds::start().await;
    let addr = server.addr;
    let client = server.mesh_client(
        "ztunnel~10.0.0.9~ztunnel-a.istio-system~istio-system.svc.cluster.local",
        [("NODE_NAME".to_owned(), "node-a".to_owned())].into(),
        Token::Static("t0ken".into()),
    );
    let (state, mut synced) = (Arc::clone(&client.state), client.synced.clone());
    let has = |s: &Shared<ProxyState>, a: &str| s.load().workload_by_ip(ip(a)).is_some();

    let mut stream = server.next_stream().await;
    assert_eq!(stream.metadata.get("authorization").unwrap(), "Bearer t0ken");
    let [addresses, policies] = subscriptions(&mut stream).await;
    let node = addresses.node.unwrap();
    assert_eq!(node.id, "ztunnel~10.0.0.9~ztunnel-a.istio-system~istio-system.svc.cluster.local");
    assert!(format!("{:?}", node.metadata).contains("node-a"));
    assert!(policies.node.is_none(), "the node is sent once per stream");
    assert!(addresses.initial_resource_versions.is_empty());

    stream.respond(response(
        ADDRESS_TYPE_URL,
        "n1",
        vec![workload("web", [10, 0, 0, 1]), workload("db", [10, 0, 0, 2])],
        &[],
    ));
    stream.respond(response(AUTHORIZATION_TYPE_URL, "n2", vec![policy("deny-all")], &[]));
    let ack = stream.next_request().await;
    assert_eq!((ack.response_nonce.as_str(), ack.error_detail.is_none()), ("n1", true));
    assert_eq!(stream.next_request().await.response_nonce, "n2");
    until(&mut synced, "the first pushes", |s| s.complete() && has(&state, "10.0.0.2")).await;
    assert!(state.load().policy("shop/deny-all").is_some());

    // A removal and a garbled resource: the removal applies, the garbage is NACKed by name and
    // the good resource beside it is taken.
    let mut second =
        response(ADDRESS_TYPE_URL, "n3", vec![workload("cart", [10, 0, 0, 3])], &["c1//Pod/shop/db"]);
    second.resources.push(Resource {
        name: "c1//Pod/shop/broken".into(),
        version: "v-broken".into(),
        resource: Some(Any { type_url: ADDRESS_TYPE_URL.into(), value: vec![0x0a, 0xff, 0x01] }),
        ..Default::default()
    });
    stream.respond(second);
    let nack = stream.next_request().await;
    assert_eq!(nack.response_nonce, "n3");
    let detail = nack.error_detail.expect("a NACK");
    assert!(detail.message.contains("c1//Pod/shop/broken"), "{}", detail.message);
    assert!(has(&state, "10.0.0.3") && !has(&state, "10.0.0.2") && has(&state, "10.0.0.1"));

    // The server goes away: the proxy keeps what it had.
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(has(&state, "10.0.0.1") && has(&state, "10.0.0.3"));

    // It comes back on the same port; the client reconnects with the versions it holds (the
    // refused resource among none of them, the removed one gone).
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut server = FakeAds::start_on(listener);
    let mut stream = server.next_stream().await;
    let [addresses, policies] = subscriptions(&mut stream).await;
    let held: Vec<(&str, &str)> =
        addresses.initial_resource_versions.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(held, [("c1//Pod/shop/cart", "v-cart"), ("c1//Pod/shop/web", "v-web")]);
    assert_eq!(policies.initial_resource_versions.get("shop/deny-all").map(String::as_str), Some("v1"));
    stream.respond(response(ADDRESS_TYPE_URL, "m1", vec![workload("search", [10, 0, 0, 4])], &[]));
    until(&mut synced, "the reconnect", |_| has(&state, "10.0.0.4")).await;
    assert!(has(&state, "10.0.0.1"));
    client.task.abort();
    server.stop().await;
}
