//! Shared by the proxy integration tests: the controller's resources built by hand, a ztunnel
//! started in-process, an application server that tells each caller its address.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use weft_core::cert_manager::CertManager;
use weft_core::drain;
use weft_core::proto::istio::security::{self, Authorization, Match};
use weft_core::proto::istio::workload::{Service, Workload};
use weft_core::state::{ProxyState, Shared};
use weft_core::telemetry::{self, Metrics};
pub use weft_core::testing::resources::{self, endpoint_of, ip, service};
use weft_core::testing::{LocalSource, TestCa};
use weft_core::xds::Synced;
use ztunnel::proxy::{ListenAddrs, Ports, Proxy, ProxyInputs, ProxyOptions};

pub const STRICT: &str = "istio-system/istio_converted_static_strict";

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A healthy mesh pod `ns/name` with service account `name` on `node`.
pub fn workload(ns: &str, name: &str, addr: &str, node: &str) -> Workload {
    Workload { node: node.into(), canonical_revision: "v1".into(), ..resources::workload(ns, name, addr) }
}

pub fn add_workload(state: &Shared<ProxyState>, w: Workload) {
    state.update(|s| resources::add_workload(s, w));
}

pub fn add_service(state: &Shared<ProxyState>, s: Service) {
    state.update(|state| resources::add_service(state, s));
}

pub fn add_policy(state: &Shared<ProxyState>, a: Authorization) {
    state.update(|s| resources::add_policy(s, a));
}

/// A policy of one rule with one `from` clause made of `m`.
pub fn policy(
    ns: &str,
    name: &str,
    scope: security::Scope,
    action: security::Action,
    m: Match,
) -> Authorization {
    resources::policy(ns, name, scope, action, vec![vec![vec![m]]])
}

/// The controller's shared STRICT policy: deny callers without a peer identity. Workloads that
/// are STRICT list it.
pub fn strict() -> Authorization {
    let m = Match { not_principals: vec![resources::presence()], ..Default::default() };
    policy(
        "istio-system",
        "istio_converted_static_strict",
        security::Scope::WorkloadSelector,
        security::Action::Deny,
        m,
    )
}

pub fn principal(p: &str) -> Match {
    Match { principals: vec![resources::exact(p)], ..Default::default() }
}

pub fn namespace(ns: &str) -> Match {
    Match { namespaces: vec![resources::exact(ns)], ..Default::default() }
}

/// A ztunnel running in-process.
pub struct Node {
    pub addrs: ListenAddrs,
    pub registry: Registry,
    pub ca: Arc<TestCa>,
    updates: watch::Sender<Synced>,
    _drain: drain::Trigger,
}

impl Node {
    /// Starts a ztunnel for `node` on `bind`. Transparent sockets only as root.
    pub async fn start(
        ca: Arc<TestCa>,
        state: Arc<Shared<ProxyState>>,
        node: &str,
        bind: IpAddr,
        ports: Ports,
    ) -> Node {
        let (metrics, registry) = Metrics::new();
        let (updates, updates_rx) = watch::channel(Synced::new(&[]));
        let source = LocalSource {
            ca: ca.clone(),
            lifetime: Duration::from_secs(3600),
            fetches: Arc::new(AtomicUsize::new(0)),
        };
        let inputs = ProxyInputs {
            state,
            certs: Arc::new(CertManager::new(source)),
            metrics: Arc::new(metrics),
            node_name: node.into(),
            updates: updates_rx,
        };
        let options = ProxyOptions { transparent: is_root(), ..ProxyOptions::default() };
        let proxy = Proxy::bind_with(inputs, bind, ports, options).await.unwrap();
        let addrs = proxy.local_addrs();
        let (trigger, watch) = drain::channel();
        tokio::spawn(proxy.run(watch));
        Node { addrs, registry, ca, updates, _drain: trigger }
    }

    /// Tells the proxy the state was updated, as the xDS client does after each response.
    pub fn updated(&self) {
        self.updates.send_modify(|synced| synced.generation += 1);
    }

    pub fn metrics(&self) -> String {
        telemetry::encode(&self.registry)
    }

    /// Waits (bounded) until the metrics contain every one of `parts` in one line.
    pub async fn wait_metric(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = self.metrics();
            if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.to_owned();
            }
            assert!(Instant::now() < deadline, "no metric line with {parts:?} in:\n{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn any_port() -> Ports {
    Ports { outbound: 0, inbound_plain: 0, hbone: 0 }
}

/// An application on `addr` (port 0: any): tells each caller its address on one line, then
/// echoes until EOF. Returns its address and a count of accepted connections.
pub async fn who_am_i(addr: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = stream.write_all(format!("{peer}\n").as_bytes()).await;
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

/// Reads the caller address line [`who_am_i`] sends, then checks the echo of `msg`.
pub async fn exchange(
    stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    msg: &[u8],
) -> SocketAddr {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await.unwrap().unwrap();
    let seen: SocketAddr = line.trim().parse().unwrap_or_else(|_| panic!("not an address: {line:?}"));
    let stream = reader.into_inner();
    stream.write_all(msg).await.unwrap();
    stream.shutdown().await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), weft_core::testing::read_all(stream))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, msg);
    seen
}

/// Whether the server closed or reset `stream` without sending anything.
pub async fn refused(mut stream: TcpStream) -> bool {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut stream, &mut buf))
        .await
    {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("connection neither answered nor closed within 5 s"),
    }
}
