//! Certificate renewal under load: the manager renews at half life; a stream opened with the old
//! certificate survives the renewal and the old certificate's expiry; the next new connection
//! presents the new certificate.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weft_core::cert_manager::CertManager;
use weft_core::drain;
use weft_core::hbone::{ClientSettings, ConnectRequest, Pool, Server, ServerSettings};
use weft_core::testing::{echo_server, identity, ForwardInbound, LocalSource, TestCa};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_used_for_new_connections_while_old_streams_survive() {
    let ca = Arc::new(TestCa::new());
    let fetches = Arc::new(AtomicUsize::new(0));
    let lifetime = Duration::from_secs(4);
    let manager = CertManager::new(LocalSource { ca: ca.clone(), lifetime, fetches: fetches.clone() });
    let client_id = identity("client-ns", "client");
    let server_id = identity("server-ns", "server");

    let inbound = ForwardInbound::new(ca.cert(&server_id));
    let server = Server::new(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        ServerSettings::default(),
        inbound.clone(),
    );
    let hbone_addr = server.local_addr().unwrap();
    let (_stop, watch) = drain::channel();
    tokio::spawn(server.run(watch));
    let echo = echo_server().await;
    let request = |certificate| ConnectRequest {
        certificate,
        expected: vec![server_id.clone()],
        source_ip: None,
        hbone_addr,
        authority: echo,
        forwarded: Default::default(),
        baggage: None,
        traceparent: None,
    };

    let first = manager.get(&client_id).await.unwrap();
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    let mut long = Pool::new(ClientSettings::default()).connect(request(first.clone())).await.unwrap();
    long.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    long.read_exact(&mut buf).await.unwrap();

    // Renewal is due at half life (about 2 s from now).
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        let current = manager.current(&client_id).unwrap();
        if current.leaf() != first.leaf() {
            break current;
        }
        assert!(Instant::now() < deadline, "no renewal within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(fetches.load(Ordering::SeqCst) >= 2);
    assert!(second.not_after() > first.not_after());

    // Let the first certificate expire, then use the stream opened with it.
    while SystemTime::now() <= first.not_after() + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    long.write_all(b"after!").await.unwrap();
    long.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!", "the stream survived renewal and the old certificate's expiry");

    // A new connection presents the newest certificate.
    let newest = manager.get(&client_id).await.unwrap();
    let mut fresh = Pool::new(ClientSettings::default()).connect(request(newest.clone())).await.unwrap();
    fresh.write_all(b"x").await.unwrap();
    fresh.read_exact(&mut buf[..1]).await.unwrap();
    let seen = inbound.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(*seen[0].peer_certificate, *first.leaf());
    assert_eq!(*seen[1].peer_certificate, *newest.leaf());
    assert_ne!(seen[0].peer_certificate, seen[1].peer_certificate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_asks_fetch_once() {
    let fetches = Arc::new(AtomicUsize::new(0));
    let manager = Arc::new(CertManager::new(LocalSource {
        ca: Arc::new(TestCa::new()),
        lifetime: Duration::from_secs(3600),
        fetches: fetches.clone(),
    }));
    let id = identity("a", "b");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (manager, id) = (manager.clone(), id.clone());
        tasks.spawn(async move { manager.get(&id).await.unwrap() });
    }
    let mut leaves = Vec::new();
    while let Some(cert) = tasks.join_next().await {
        leaves.push(cert.unwrap().leaf().clone());
    }
    leaves.dedup();
    assert_eq!(leaves.len(), 1, "everyone got the same certificate");
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    manager.forget(&id);
    assert!(manager.current(&id).is_none());
}
