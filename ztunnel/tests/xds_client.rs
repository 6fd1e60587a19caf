//! ztunnel's xDS client against the controller's real delta ADS server on a real port: the state
//! follows pushes and removals, a bad resource is NACKed with its reason while the rest applies,
//! the state survives the controller going away, and a reconnect sends the versions held so the
//! controller resends only what changed.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use controller::xds::{serve, Everything, Snapshot, XdsOptions, XdsResource, XdsServer, ADDRESS_TYPE_URL};
use prost_types::Any;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::service::Routes;
use weft_core::cert_manager::Token;
use weft_core::proto::istio::security::{self, Authorization};
use weft_core::proto::istio::workload::{address, Address, TunnelProtocol, Workload};
use ztunnel::state::ProxyState;
use ztunnel::xds::{self, Synced, XdsConfig};

const TIMEOUT: Duration = Duration::from_secs(10);

fn workload(name: &str, ip: [u8; 4]) -> XdsResource {
    XdsResource::address(&Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: format!("c1//Pod/shop/{name}"),
            name: name.into(),
            namespace: "shop".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: TunnelProtocol::Hbone as i32,
            node: "node-a".into(),
            service_account: name.into(),
            ..Default::default()
        })),
    })
    .unwrap()
}

fn policy(name: &str) -> XdsResource {
    XdsResource::authorization(&Authorization {
        name: name.into(),
        namespace: "shop".into(),
        scope: security::Scope::Namespace as i32,
        action: security::Action::Deny as i32,
        groups: Vec::new(),
    })
    .unwrap()
}

struct Controller {
    xds: XdsServer,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn controller(listener: TcpListener, snapshot: Snapshot) -> Controller {
    let xds =
        XdsServer::new(Everything, XdsOptions { debounce: Duration::from_millis(20), ..Default::default() });
    xds.update(snapshot);
    let (stop, rx) = oneshot::channel::<()>();
    let server = xds.clone();
    let task = tokio::spawn(async move {
        let _ = serve(listener, server, Routes::default(), async {
            let _ = rx.await;
        })
        .await;
    });
    Controller { xds, stop, task }
}

impl Controller {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(TIMEOUT, self.task).await;
    }
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

#[tokio::test]
async fn the_state_follows_the_controller_and_outlives_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let first = Snapshot::new("1")
        .with(workload("web", [10, 0, 0, 1]))
        .with(workload("db", [10, 0, 0, 2]))
        .with(policy("deny-all"));
    let server = controller(listener, first.clone()).await;
    let state = Arc::new(RwLock::new(ProxyState::new("")));
    let (tx, mut synced) = watch::channel(Synced::default());
    let config = XdsConfig {
        endpoint: format!("http://{addr}"),
        node_id: "ztunnel~10.0.0.9~ztunnel-a.istio-system~istio-system.svc.cluster.local".into(),
        node_name: "node-a".into(),
        token: Token::Static("t0ken".into()),
    };
    let client = tokio::spawn(xds::run(config, Arc::clone(&state), tx));
    let has = |s: &Arc<RwLock<ProxyState>>, a: &str| s.read().unwrap().workload_by_ip(ip(a)).is_some();
    until(&mut synced, "the first push", |s| s.complete() && has(&state, "10.0.0.2")).await;
    assert!(state.read().unwrap().policy("shop/deny-all").is_some());

    // A removal and a garbled resource: the removal applies, the garbage is NACKed by name and
    // the good resource beside it is taken.
    let mut second = first.clone().with_version("2").with(workload("cart", [10, 0, 0, 3]));
    second.remove(ADDRESS_TYPE_URL, "c1//Pod/shop/db");
    second.insert(XdsResource::new(
        "c1//Pod/shop/broken",
        "v-broken",
        Any { type_url: ADDRESS_TYPE_URL.into(), value: vec![0x0a, 0xff, 0x01] },
    ));
    server.xds.update(second.clone());
    until(&mut synced, "the second push", |_| has(&state, "10.0.0.3") && !has(&state, "10.0.0.2")).await;
    let nack = tokio::time::timeout(TIMEOUT, async {
        loop {
            let nack = server
                .xds
                .clients()
                .into_iter()
                .find_map(|c| c.types.get(ADDRESS_TYPE_URL)?.last_nack.clone());
            if let Some(nack) = nack {
                return nack;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(nack.message.contains("c1//Pod/shop/broken"), "{}", nack.message);
    assert!(has(&state, "10.0.0.1"), "other resources are kept");

    // The controller goes away: the proxy keeps what it had.
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(has(&state, "10.0.0.1") && has(&state, "10.0.0.3"));

    // It comes back on the same port with one change; the client reconnects with the versions it
    // holds and is sent only the change.
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut third = second.with_version("3");
    third.remove(ADDRESS_TYPE_URL, "c1//Pod/shop/broken");
    let third = third.with(workload("search", [10, 0, 0, 4]));
    let server = controller(listener, third).await;
    until(&mut synced, "the reconnect", |_| has(&state, "10.0.0.4")).await;
    let addresses = tokio::time::timeout(TIMEOUT, async {
        loop {
            let acked = server.xds.clients().into_iter().find_map(|c| c.types.get(ADDRESS_TYPE_URL).cloned());
            match acked {
                Some(t) if t.acks > 0 => return t,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(addresses.responses, 1, "one response on reconnect");
    let sent: Vec<&str> = addresses.acked.keys().map(String::as_str).collect();
    assert_eq!(sent, ["c1//Pod/shop/search"], "only what the client lacked");
    assert!(has(&state, "10.0.0.1"));
    client.abort();
    server.stop().await;
}
