//! HBONE end to end on loopback: real sockets, real rustls mutual TLS 1.3, real HTTP/2.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use weft_core::drain;
use weft_core::hbone::{
    ClientError, ClientSettings, ConnectRequest, Pool, Server, ServerEvent, ServerSettings,
};
use weft_core::identity::Identity;
use weft_core::testing::{echo_server, identity, read_all, serve_each, ForwardInbound, TestCa};
use weft_core::tls::{PeerError, WorkloadCertificate};

struct Fixture {
    ca: Arc<TestCa>,
    addr: SocketAddr,
    server_id: Identity,
    inbound: Arc<ForwardInbound>,
    events: broadcast::Receiver<ServerEvent>,
    _drain: drain::Trigger,
}

async fn start(ca: Arc<TestCa>, settings: ServerSettings) -> Fixture {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let server_id = identity("server-ns", "server");
    let inbound = ForwardInbound::new(ca.cert(&server_id));
    start_with(ca, settings, server_id, inbound).await
}

async fn start_with(
    ca: Arc<TestCa>,
    settings: ServerSettings,
    server_id: Identity,
    inbound: Arc<ForwardInbound>,
) -> Fixture {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::new(listener, settings, inbound.clone());
    let addr = server.local_addr().unwrap();
    let events = server.events();
    let (trigger, watch) = drain::channel();
    tokio::spawn(server.run(watch));
    Fixture { ca, addr, server_id, inbound, events, _drain: trigger }
}

impl Fixture {
    fn request(&self, cert: Arc<WorkloadCertificate>, authority: SocketAddr) -> ConnectRequest {
        ConnectRequest {
            certificate: cert,
            expected: vec![self.server_id.clone()],
            source_ip: None,
            hbone_addr: self.addr,
            authority,
            forwarded: weft_core::hbone::Forwarded {
                for_addr: Some("10.1.2.3:4567".parse().unwrap()),
                host: None,
            },
            baggage: Some("k8s.namespace.name=client-ns".into()),
            traceparent: None,
        }
    }

    fn client_cert(&self) -> Arc<WorkloadCertificate> {
        self.ca.cert(&identity("client-ns", "client"))
    }

    /// The next refusal event, waiting at most 5 s.
    async fn next_event(&mut self) -> ServerEvent {
        tokio::time::timeout(Duration::from_secs(5), self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no server event within 5 s"))
            .expect("event channel open")
    }

    /// A fresh client with a good certificate still gets through.
    async fn assert_still_serving(&self) {
        let echo = echo_server().await;
        let pool = Pool::new(ClientSettings::default());
        let mut stream =
            pool.connect(self.request(self.client_cert(), echo)).await.expect("good client is served");
        stream.write_all(b"still here").await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(read_all(&mut stream).await.unwrap(), b"still here");
    }
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_stream_arrives_intact_and_headers_are_carried() {
    let fx = start(Arc::new(TestCa::new()), ServerSettings::default()).await;
    // Upstream: hashes everything it receives, answers with the digest after the client's EOF.
    let hasher = serve_each(|mut stream| async move {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => hash.update(&buf[..n]),
            }
        }
        let _ = stream.write_all(&hash.finalize()).await;
        let _ = stream.shutdown().await;
    })
    .await;

    let payload = pseudo_random(256 * 1024 * 1024);
    let want: [u8; 32] = Sha256::digest(&payload).into();
    let pool = Pool::new(ClientSettings::default());
    let mut stream = pool.connect(fx.request(fx.client_cert(), hasher)).await.unwrap();
    let started = Instant::now();
    stream.write_all(&payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let got = read_all(&mut stream).await.unwrap();
    assert_eq!(got, want, "SHA-256 of what arrived equals what was sent");
    eprintln!("256 MiB through HBONE in {:?}", started.elapsed());

    let seen = fx.inbound.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].authority, hasher);
    assert_eq!(seen[0].peer_identity, identity("client-ns", "client"));
    assert_eq!(seen[0].forwarded.for_addr, Some("10.1.2.3:4567".parse().unwrap()));
    assert_eq!(seen[0].baggage.as_deref(), Some("k8s.namespace.name=client-ns"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_share_one_connection() {
    let settings = ServerSettings { max_streams_per_connection: 1000, ..ServerSettings::default() };
    let fx = start(Arc::new(TestCa::new()), settings).await;
    let echo = echo_server().await;
    let pool = Pool::new(ClientSettings { max_streams_per_connection: 1000, ..ClientSettings::default() });
    let cert = fx.client_cert();
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let (pool, request, barrier) = (pool.clone(), fx.request(cert.clone(), echo), barrier.clone());
        tasks.spawn(async move {
            let mut stream = pool.connect(request).await.expect("stream opens");
            // Hold every stream open until all 1,000 exist at once.
            barrier.wait().await;
            let msg = format!("stream {i}");
            stream.write_all(msg.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
            assert_eq!(read_all(&mut stream).await.unwrap(), msg.as_bytes());
        });
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
        done += 1;
    }
    assert_eq!(done, 1000);
    assert_eq!(pool.connections_opened(), 1, "one TLS connection carried every stream");
    assert_eq!(fx.inbound.tls_handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_connection_stream_cap_opens_more_connections() {
    let fx = start(Arc::new(TestCa::new()), ServerSettings::default()).await;
    let echo = echo_server().await;
    let pool = Pool::new(ClientSettings::default()); // 100 streams per connection
    let cert = fx.client_cert();
    let mut open = Vec::new();
    for _ in 0..250 {
        open.push(pool.connect(fx.request(cert.clone(), echo)).await.unwrap());
    }
    assert_eq!(pool.connections_opened(), 3, "250 streams at 100 per connection need 3 connections");
    drop(open);
    // Slots are released: a new stream reuses a pooled connection.
    let _again = pool.connect(fx.request(cert, echo)).await.unwrap();
    assert_eq!(pool.connections_opened(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let fx = start(Arc::new(TestCa::new()), ServerSettings::default()).await;
    let echo = echo_server().await;
    let pool =
        Pool::new(ClientSettings { idle_timeout: Duration::from_millis(300), ..ClientSettings::default() });
    let stream = pool.connect(fx.request(fx.client_cert(), echo)).await.unwrap();
    drop(stream);
    assert_eq!(pool.connections_open(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.connections_open() > 0 {
        assert!(Instant::now() < deadline, "idle connection still open after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _next = pool.connect(fx.request(fx.client_cert(), echo)).await.unwrap();
    assert_eq!(pool.connections_opened(), 2, "a new connection replaces the reaped one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_closes_a_connection_that_carries_no_stream() {
    let settings = ServerSettings { idle_timeout: Duration::from_millis(300), ..ServerSettings::default() };
    let fx = start(Arc::new(TestCa::new()), settings).await;
    let echo = echo_server().await;
    // The client would keep it for minutes: only the server's idle timeout closes it.
    let pool = Pool::new(ClientSettings::default());
    // A stream open longer than the idle timeout keeps the connection.
    let mut stream = pool.connect(fx.request(fx.client_cert(), echo)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stream.write_all(b"still open").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(read_all(&mut stream).await.unwrap(), b"still open");
    drop(stream);
    assert_eq!(pool.connections_open(), 1);
    // Once it carries none, the server closes it (GOAWAY); the pool notices.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.connections_open() > 0 {
        assert!(Instant::now() < deadline, "the server kept an idle connection past 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fx.assert_still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_address_cannot_take_more_than_its_share_of_connections() {
    let settings = ServerSettings { max_connections_per_source: 3, ..ServerSettings::default() };
    let fx = start(Arc::new(TestCa::new()), settings).await;
    let echo = echo_server().await;
    // Three connections from 127.0.0.1 (one stream each), each held open.
    let pool = Pool::new(ClientSettings { max_streams_per_connection: 1, ..ClientSettings::default() });
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(pool.connect(fx.request(fx.client_cert(), echo)).await.expect("within the share"));
    }
    // A fourth from the same address is reset at once.
    let refused = pool.connect(fx.request(fx.client_cert(), echo)).await;
    assert!(refused.is_err(), "a fourth connection from one source was served");
    // Another source address is served.
    let other = Pool::new(ClientSettings::default());
    let mut request = fx.request(fx.client_cert(), echo);
    request.source_ip = Some("127.0.0.2".parse().unwrap());
    let mut stream = other.connect(request).await.expect("another source is served");
    stream.write_all(b"x").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(read_all(&mut stream).await.unwrap(), b"x");
    // Closing them makes room again.
    drop(held);
    drop(pool);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let fresh = Pool::new(ClientSettings::default());
        if fresh.connect(fx.request(fx.client_cert(), echo)).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "closed connections' places were never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_travels_in_each_direction() {
    let fx = start(Arc::new(TestCa::new()), ServerSettings::default()).await;
    // Upstream closes its write half first, then keeps reading and reports what it got.
    let (report_tx, mut report_rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = serve_each(move |mut stream: TcpStream| {
        let report = report_tx.clone();
        async move {
            stream.write_all(b"server done").await.unwrap();
            stream.shutdown().await.unwrap();
            let got = read_all(&mut stream).await.unwrap();
            report.send(got).unwrap();
        }
    })
    .await;
    let pool = Pool::new(ClientSettings::default());
    let mut stream = pool.connect(fx.request(fx.client_cert(), upstream)).await.unwrap();
    // Server -> client half-close: we see EOF while our own half is still open.
    assert_eq!(read_all(&mut stream).await.unwrap(), b"server done");
    // Client -> server still flows after that, and our half-close reaches the server as EOF.
    stream.write_all(b"client still talking").await.unwrap();
    stream.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), report_rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, b"client still talking");

    // And the other order: client half-closes first, echo answers after seeing EOF.
    let echo = echo_server().await;
    let mut stream = pool.connect(fx.request(fx.client_cert(), echo)).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(read_all(&mut stream).await.unwrap(), b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_answered_503_promptly() {
    let fx = start(Arc::new(TestCa::new()), ServerSettings::default()).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let pool = Pool::new(ClientSettings::default());
    let started = Instant::now();
    let err = pool.connect(fx.request(fx.client_cert(), closed)).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Status { status, .. } if status == http::StatusCode::SERVICE_UNAVAILABLE),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert!(err.to_string().contains("503"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_the_wrong_identity_is_refused() {
    let fx = start(Arc::new(TestCa::new()), ServerSettings::default()).await;
    let echo = echo_server().await;
    let mut request = fx.request(fx.client_cert(), echo);
    request.expected = vec![identity("server-ns", "someone-else")];
    let err = Pool::new(ClientSettings::default()).connect(request).await.unwrap_err();
    match err.peer_error() {
        Some(PeerError::WrongIdentity { got, .. }) => assert_eq!(got, &fx.server_id),
        other => panic!("want WrongIdentity, got {other:?} from {err}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("spiffe://cluster.local/ns/server-ns/sa/server is not one of the expected"),
        "{text}"
    );
    fx.assert_still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_is_refused() {
    let ca = Arc::new(TestCa::new());
    let server_id = identity("server-ns", "server");
    let inbound = ForwardInbound::new(ca.expired(&server_id));
    let fx = start_with(ca, ServerSettings::default(), server_id, inbound).await;
    let err = Pool::new(ClientSettings::default())
        .connect(fx.request(fx.client_cert(), echo_server().await))
        .await
        .unwrap_err();
    assert!(matches!(err.peer_error(), Some(PeerError::Expired { .. })), "{err}");
    assert!(err.to_string().contains("expired at"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_checked_and_each_refusal_says_why() {
    let mut fx = start(Arc::new(TestCa::new()), ServerSettings::default()).await;
    let echo = echo_server().await;

    let foreign_td = fx.ca.cert(&"spiffe://other.org/ns/client-ns/sa/client".parse().unwrap());
    let expired = fx.ca.expired(&identity("client-ns", "client"));
    let stranger_ca = TestCa::new();
    // Signed by a root the server does not trust.
    let unknown_root = {
        let now = std::time::SystemTime::now();
        let theirs =
            stranger_ca.ca.issue(&identity("client-ns", "client"), now, now + Duration::from_secs(600));
        // It trusts our root (so it accepts the server); the server must refuse it.
        Arc::new(theirs.unwrap().with_roots(fx.ca.ca.roots()))
    };
    let cases: Vec<(&str, Arc<WorkloadCertificate>, &str)> = vec![
        ("another trust domain", foreign_td, "trust domain \"other.org\""),
        ("an expired certificate", expired, "expired at"),
        ("an unknown root", unknown_root, "not signed by a trusted root"),
    ];
    for (what, cert, want) in cases {
        let err = Pool::new(ClientSettings::default()).connect(fx.request(cert, echo)).await;
        assert!(err.is_err(), "{what}: connection must be refused");
        match fx.next_event().await {
            ServerEvent::HandshakeFailed { reason, .. } => {
                assert!(reason.contains(want), "{what}: reason {reason:?} should contain {want:?}")
            }
            other => panic!("{what}: unexpected event {other:?}"),
        }
    }

    // No client certificate at all: a rustls client with no client auth.
    let config = no_client_cert_config(&fx.ca);
    let tcp = TcpStream::connect(fx.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(fx.addr.ip().into());
    let result = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await;
    if let Ok(mut tls) = result {
        // TLS 1.3: the client finishes first; the server's refusal arrives as an alert.
        let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let mut buf = [0u8; 16];
        assert!(!matches!(tls.read(&mut buf).await, Ok(n) if n > 0));
    }
    match fx.next_event().await {
        ServerEvent::HandshakeFailed { reason, .. } => {
            assert!(reason.contains("no certificates"), "reason {reason:?}")
        }
        other => panic!("no client certificate: unexpected event {other:?}"),
    }
    fx.assert_still_serving().await;
}

/// A client that trusts our root and speaks h2 but presents no certificate.
fn no_client_cert_config(ca: &TestCa) -> Arc<rustls::ClientConfig> {
    let verifier =
        weft_core::tls::ServerIdentityVerifier::new(ca.ca.roots(), vec![identity("server-ns", "server")]);
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(weft_core::tls::provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http1_and_tls_without_h2_are_refused_while_others_are_served() {
    let mut fx = start(Arc::new(TestCa::new()), ServerSettings::default()).await;
    // A good stream stays open through all of it.
    let echo = echo_server().await;
    let pool = Pool::new(ClientSettings::default());
    let mut long_lived = pool.connect(fx.request(fx.client_cert(), echo)).await.unwrap();
    long_lived.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    long_lived.read_exact(&mut buf).await.unwrap();

    // Plaintext HTTP/1.1.
    let mut tcp = TcpStream::connect(fx.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let _ = read_all(&mut tcp).await;
    match fx.next_event().await {
        ServerEvent::HandshakeFailed { reason, .. } => assert!(!reason.is_empty()),
        other => panic!("plaintext: unexpected event {other:?}"),
    }

    // Plaintext HTTP/2 preface.
    let mut tcp = TcpStream::connect(fx.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let _ = read_all(&mut tcp).await;
    assert!(matches!(fx.next_event().await, ServerEvent::HandshakeFailed { .. }));

    let client_cert = fx.client_cert();
    // TLS offering only http/1.1.
    let mut config = (*client_cert.client_config(vec![fx.server_id.clone()])).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let _ = tls_exchange(fx.addr, config, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    match fx.next_event().await {
        ServerEvent::HandshakeFailed { reason, .. } => {
            assert!(reason.contains("protocol"), "{reason}")
        }
        other => panic!("ALPN http/1.1: unexpected event {other:?}"),
    }

    // TLS with no ALPN at all.
    let mut config = (*client_cert.client_config(vec![fx.server_id.clone()])).clone();
    config.alpn_protocols = vec![];
    let _ = tls_exchange(fx.addr, config, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(matches!(fx.next_event().await, ServerEvent::NotH2 { alpn: None, .. }));

    // TLS claiming h2 but speaking HTTP/1.1 inside.
    let config = (*client_cert.client_config(vec![fx.server_id.clone()])).clone();
    let _ = tls_exchange(fx.addr, config, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(matches!(fx.next_event().await, ServerEvent::ProtocolError { .. }));

    // The long-lived stream never noticed, and new clients are still served.
    long_lived.write_all(b"after!").await.unwrap();
    long_lived.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
    fx.assert_still_serving().await;
}

/// Connects with `config`, writes `data`, reads until the server closes; errors are expected.
async fn tls_exchange(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    data: &[u8],
) -> std::io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    tls.write_all(data).await?;
    tokio::time::timeout(Duration::from_secs(5), read_all(&mut tls)).await.unwrap_or(Ok(Vec::new()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_with_a_bad_authority_gets_400() {
    let fx = start(Arc::new(TestCa::new()), ServerSettings::default()).await;
    let config = fx.client_cert().client_config(vec![fx.server_id.clone()]);
    let tcp = TcpStream::connect(fx.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(fx.addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
    let (mut sender, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    for authority in ["reviews.default.svc:9080", "10.0.0.1"] {
        let request = http::Request::builder().method(http::Method::CONNECT).uri(authority).body(()).unwrap();
        sender = sender.ready().await.unwrap();
        let (response, _send) = sender.send_request(request, false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), http::StatusCode::BAD_REQUEST, "{authority}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_finishes_open_streams_and_refuses_new_connections() {
    let ca = Arc::new(TestCa::new());
    let server_id = identity("server-ns", "server");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::new(listener, ServerSettings::default(), ForwardInbound::new(ca.cert(&server_id)));
    let addr = server.local_addr().unwrap();
    let (trigger, watch) = drain::channel();
    let running = tokio::spawn(server.run(watch));
    let echo = echo_server().await;
    let client = ca.cert(&identity("client-ns", "client"));
    let request = ConnectRequest {
        certificate: client.clone(),
        expected: vec![server_id],
        source_ip: None,
        hbone_addr: addr,
        authority: echo,
        forwarded: Default::default(),
        baggage: None,
        traceparent: None,
    };
    let pool = Pool::new(ClientSettings::default());
    let mut open = pool.connect(request.clone()).await.unwrap();
    trigger.drain();
    // The open stream keeps working through the drain.
    open.write_all(b"during drain").await.unwrap();
    open.shutdown().await.unwrap();
    assert_eq!(read_all(&mut open).await.unwrap(), b"during drain");
    drop(open);
    tokio::time::timeout(Duration::from_secs(10), running).await.expect("server stops after drain").unwrap();
    assert!(Pool::new(ClientSettings::default()).connect(request).await.is_err(), "listener is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_waiting_on_a_failed_dial_share_its_error() {
    let ca = TestCa::new();
    // A port nothing listens on: every dial is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let pool = Pool::new(ClientSettings::default());
    let request = ConnectRequest {
        certificate: ca.cert(&identity("client-ns", "client")),
        expected: vec![identity("server-ns", "server")],
        source_ip: None,
        hbone_addr: closed,
        authority: closed,
        forwarded: Default::default(),
        baggage: None,
        traceparent: None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (pool, request) = (pool.clone(), request.clone());
        tasks.spawn(async move { pool.connect(request).await });
    }
    let mut refused = 0;
    while let Some(result) = tasks.join_next().await {
        let err = result.unwrap().unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. } | ClientError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains(&closed.to_string()), "{err}");
        refused += 1;
    }
    assert_eq!(refused, 20);
    assert_eq!(pool.connections_opened(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_bundle_trusts_old_and_new_roots_during_a_rotation() {
    let (old, new, stranger) = (TestCa::new(), TestCa::new(), TestCa::new());
    let both = old.ca.roots().merged(&new.ca.roots());
    assert_eq!(both.certs().len(), 2);
    let trusting_both = |ca: &TestCa, id: &Identity| {
        let now = std::time::SystemTime::now();
        let cert = ca.ca.issue(id, now, now + Duration::from_secs(600)).unwrap();
        Arc::new(cert.with_roots(both.clone()))
    };
    let server_id = identity("server-ns", "server");
    // The server's certificate comes from the old root; it trusts both roots.
    let inbound = ForwardInbound::new(trusting_both(&old, &server_id));
    let mut fx = start_with(Arc::new(TestCa::new()), ServerSettings::default(), server_id, inbound).await;
    let echo = echo_server().await;
    let client_id = identity("client-ns", "client");
    for (which, ca) in [("old root", &old), ("new root", &new)] {
        let mut stream = Pool::new(ClientSettings::default())
            .connect(fx.request(trusting_both(ca, &client_id), echo))
            .await
            .unwrap_or_else(|e| panic!("client from the {which} refused: {e}"));
        stream.write_all(which.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(read_all(&mut stream).await.unwrap(), which.as_bytes());
    }
    // A root outside the bundle is still refused.
    let err = Pool::new(ClientSettings::default())
        .connect(fx.request(trusting_both(&stranger, &client_id), echo))
        .await;
    assert!(err.is_err());
    match fx.next_event().await {
        ServerEvent::HandshakeFailed { reason, .. } => {
            assert!(reason.contains("not signed by a trusted root"), "{reason}")
        }
        other => panic!("unexpected event {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_value_that_is_not_valid_is_an_error_not_a_panic() {
    let fx = start(Arc::new(TestCa::new()), ServerSettings::default()).await;
    let mut request = fx.request(fx.client_cert(), echo_server().await);
    request.baggage = Some("k8s.pod.name=evil\r\ninjected: 1".into());
    let err = Pool::new(ClientSettings::default()).connect(request).await.unwrap_err();
    assert!(matches!(err, ClientError::BadRequest { .. }), "{err}");
    fx.assert_still_serving().await;
}

/// Lengths of the TLS records in `bytes` (a TLS byte stream from its start).
fn tls_record_lengths(bytes: &[u8]) -> Vec<usize> {
    let mut lengths = Vec::new();
    let mut at = 0;
    while at + 5 <= bytes.len() {
        let len = usize::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
        lengths.push(len);
        at += 5 + len;
    }
    lengths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_transfer_leaves_in_full_tls_records() {
    let fx = start(Arc::new(TestCa::new()), ServerSettings::default()).await;
    // Between the client and the server, a relay that keeps what the client sends.
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let server = fx.addr;
    let recorded = tokio::spawn(async move {
        let (mut client, _) = relay.accept().await.unwrap();
        let mut upstream = TcpStream::connect(server).await.unwrap();
        let (mut from_client, mut to_client) = client.split();
        let (mut from_server, mut to_server) = upstream.split();
        let mut seen = Vec::new();
        let up = async {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = from_client.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    let _ = to_server.shutdown().await;
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                to_server.write_all(&buf[..n]).await.unwrap();
            }
        };
        let down = async {
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
            let _ = to_client.shutdown().await;
        };
        tokio::join!(up, down);
        seen
    });
    let sink = serve_each(|mut stream| async move {
        let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
    })
    .await;

    // As ztunnel carries a connection: a TCP socket copied into the HBONE stream.
    let payload = pseudo_random(8 * 1024 * 1024);
    let (mut app, mut captured) = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (app, listener.accept().await.unwrap().0)
    };
    let pool = Pool::new(ClientSettings::default());
    let mut tunnel = pool
        .connect(ConnectRequest { hbone_addr: relay_addr, ..fx.request(fx.client_cert(), sink) })
        .await
        .unwrap();
    let copy =
        tokio::spawn(async move { weft_core::hbone::copy_bidirectional(&mut captured, &mut tunnel).await });
    app.write_all(&payload).await.unwrap();
    app.shutdown().await.unwrap();
    let _ = read_all(&mut app).await;
    copy.await.unwrap().unwrap();
    drop(pool);

    let lengths = tls_record_lengths(&recorded.await.unwrap());
    let full = 16 * 1024 + 17;
    let tiny = lengths.iter().filter(|&&l| l < 64).count();
    assert!(lengths.iter().all(|&l| l <= full), "no record is over TLS's maximum: {lengths:?}");
    assert!(
        lengths.iter().filter(|&&l| l == full).count() * 16 * 1024 >= payload.len() * 9 / 10,
        "most of the payload travels in full records: {lengths:?}"
    );
    // Before frames were sized to records, every 64 KiB read left a 9-byte frame tail in a
    // record (and a TCP segment) of its own: 128 of them here.
    assert!(tiny <= 8, "{tiny} records under 64 bytes: {lengths:?}");
}
