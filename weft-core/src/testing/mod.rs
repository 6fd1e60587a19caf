//! Test helpers shared by unit tests, integration tests, benchmarks and the foundation demo: an
//! in-process CA, a fake CA and a fake delta ADS server on real gRPC ([`ca`], [`ads`]), builders
//! of the controller's resources ([`resources`]), an HBONE inbound that forwards to the
//! `:authority`, and small TCP servers.
//! Only built with the `testing` feature; nothing here is production code.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cert_manager::{CertificateSource, FetchError};
use crate::hbone::{forward, ConnectInfo, H2Stream, Inbound, Refusal};
use crate::identity::Identity;
use crate::tls::{CertificateAuthority, WorkloadCertificate};

pub mod ads;
pub mod ca;
pub mod resources;

pub const TRUST_DOMAIN: &str = crate::names::DEFAULT_TRUST_DOMAIN;

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub fn identity(ns: &str, sa: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, ns, sa).expect("test identities are valid")
}

/// A CA held in memory that signs without CSRs.
pub struct TestCa {
    pub ca: CertificateAuthority,
}

impl TestCa {
    pub fn new() -> Self {
        TestCa { ca: CertificateAuthority::generate(TRUST_DOMAIN).expect("root generation works") }
    }

    /// A certificate valid for an hour.
    pub fn cert(&self, identity: &Identity) -> Arc<WorkloadCertificate> {
        let now = SystemTime::now();
        self.window(identity, now - Duration::from_secs(60), now + Duration::from_secs(3600))
    }

    /// A certificate that expired a minute ago.
    pub fn expired(&self, identity: &Identity) -> Arc<WorkloadCertificate> {
        let now = SystemTime::now();
        self.window(identity, now - Duration::from_secs(7200), now - Duration::from_secs(60))
    }

    pub fn window(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Arc<WorkloadCertificate> {
        Arc::new(self.ca.issue(identity, not_before, not_after).expect("issuing works"))
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// A [`CertificateSource`] signing in-process with a fixed lifetime; counts fetches.
pub struct LocalSource {
    pub ca: Arc<TestCa>,
    pub lifetime: Duration,
    pub fetches: Arc<AtomicUsize>,
}

impl CertificateSource for LocalSource {
    async fn fetch(&self, identity: &Identity) -> Result<WorkloadCertificate, FetchError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let now = SystemTime::now();
        self.ca.ca.issue(identity, now, now + self.lifetime).map_err(|e| FetchError::Other(e.to_string()))
    }
}

/// An HBONE inbound that presents one certificate (or the current one from `cert`) and forwards
/// each CONNECT to its `:authority`. Records what it saw.
pub struct ForwardInbound {
    cert: Box<dyn Fn() -> Arc<WorkloadCertificate> + Send + Sync>,
    pub tls_handshakes: AtomicUsize,
    pub seen: Mutex<Vec<ConnectInfo>>,
}

impl ForwardInbound {
    pub fn new(cert: Arc<WorkloadCertificate>) -> Arc<Self> {
        Self::dynamic(move || cert.clone())
    }

    pub fn dynamic(cert: impl Fn() -> Arc<WorkloadCertificate> + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(ForwardInbound {
            cert: Box::new(cert),
            tls_handshakes: AtomicUsize::new(0),
            seen: Mutex::default(),
        })
    }
}

impl Inbound for ForwardInbound {
    type Accepted = (TcpStream, SocketAddr);

    async fn tls_config(&self, _local: SocketAddr) -> Result<Arc<rustls::ServerConfig>, String> {
        self.tls_handshakes.fetch_add(1, Ordering::SeqCst);
        Ok((self.cert)().server_config())
    }

    async fn serve(&self, (upstream, authority): (TcpStream, SocketAddr), tunnel: H2Stream) {
        forward(tunnel, upstream, authority).await
    }

    async fn accept(&self, info: ConnectInfo) -> Result<(TcpStream, SocketAddr), Refusal> {
        let authority = info.authority;
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(info);
        }
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(authority)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok((stream, authority))
            }
            Ok(Err(e)) => Err(Refusal::unavailable(format!("connect {authority}: {e}"))),
            Err(_) => Err(Refusal::unavailable(format!("connect {authority}: timed out"))),
        }
    }
}

/// A TCP echo server on loopback: echoes until EOF, then closes its write half.
pub async fn echo_server() -> SocketAddr {
    serve_each(|mut stream| async move {
        let (mut read, mut write) = stream.split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
        let _ = write.shutdown().await;
    })
    .await
}

/// Spawns `handler` for every connection accepted on a fresh loopback port.
pub async fn serve_each<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(handler(stream));
                }
                // A failed accept (e.g. out of file descriptors under a parallel test run) must
                // not close the listener: that would reset every connection still queued on it.
                Err(e) => {
                    eprintln!("test server on {addr}: accept failed: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
    addr
}

/// Reads to EOF and returns what was read.
pub async fn read_all(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await?;
    Ok(out)
}

/// Whether a test whose prerequisites are missing (`problem`) may run: yes when nothing is
/// missing; otherwise it prints why and the test passes without running, except under
/// `CI=true`, where the machine is supposed to have everything and the test fails.
pub fn prerequisites(test: &str, problem: Option<String>) -> bool {
    match problem {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test} cannot run here: {why}")
        }
        Some(why) => {
            eprintln!("skipping {test}: {why}");
            false
        }
    }
}

/// [`prerequisites`] for tests that make network namespaces.
pub fn netns_usable(test: &str) -> bool {
    prerequisites(test, crate::netns::unavailable())
}

/// The PEM files of an Istio plug-in CA (the `cacerts` Secret): a root, and an intermediate it
/// signed that signs workload certificates.
#[derive(Clone, Debug)]
pub struct PlugInCa {
    /// `root-cert.pem`.
    pub root_cert: String,
    /// The root's key (not part of `cacerts`; for making more intermediates).
    pub root_key: String,
    /// `ca-cert.pem`: the intermediate.
    pub ca_cert: String,
    /// `ca-key.pem`: the intermediate's key.
    pub ca_key: String,
    /// `cert-chain.pem`: the intermediate then the root, as Istio's tools/certs writes it.
    pub cert_chain: String,
}

impl PlugInCa {
    /// A new root (O=`trust_domain`, CN=`name` Root CA) and an intermediate it signed.
    pub fn new(trust_domain: &str, name: &str) -> PlugInCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_params = |cn: String| {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::OrganizationName, trust_domain);
            params.distinguished_name.push(DnType::CommonName, cn);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params
        };
        let root_key = KeyPair::generate().expect("key generation works");
        let root = ca_params(format!("{name} Root CA")).self_signed(&root_key).expect("self-signing works");
        let ca_key = KeyPair::generate().expect("key generation works");
        let issuer = Issuer::from_ca_cert_der(root.der(), &root_key).expect("the root is a CA");
        let ca =
            ca_params(format!("{name} Intermediate CA")).signed_by(&ca_key, &issuer).expect("signing works");
        PlugInCa {
            root_cert: root.pem(),
            root_key: root_key.serialize_pem(),
            ca_cert: ca.pem(),
            ca_key: ca_key.serialize_pem(),
            cert_chain: format!("{}{}", ca.pem(), root.pem()),
        }
    }

    /// The CA these files make.
    pub fn authority(&self) -> CertificateAuthority {
        CertificateAuthority::from_intermediate_pem(
            TRUST_DOMAIN,
            &self.ca_cert,
            &self.ca_key,
            &self.cert_chain,
            &self.root_cert,
        )
        .expect("a well-formed plug-in CA")
    }
}
