//! The CA over real sockets and real gRPC: a tonic client with `authorization: Bearer` metadata
//! against `controller::ca::serve` on 127.0.0.1:0, and the root directory on a real disk.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use prost_types::value::Kind;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateSigningRequestDer, ServerName, UnixTime};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;
use weft_core::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use weft_core::proto::ca::IstioCertificateRequest;
use weft_core::tls::{
    der_to_pem, generate_csr, parse_pem_certs, CertificateAuthority, RootBundle, ServerIdentityVerifier,
    WorkloadCertificate, DEFAULT_CERT_LIFETIME,
};
use weft_core::Identity;

use controller::ca::{
    load_or_create_root, serve, CaError, CaService, StaticAuthorizer, IMPERSONATED_IDENTITY_KEY,
    ROOT_CERT_FILE, ROOT_KEY_FILE,
};
use controller::config::Config;
use controller::Controller;

const TRUST_DOMAIN: &str = "cluster.local";
const TOKEN_A: &str = "token-node-a";
const TOKEN_B: &str = "token-node-b";
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
/// weft-core backdates leaves by a minute; allow that and a little clock movement.
const SLACK: Duration = Duration::from_secs(120);

fn id(s: &str) -> Identity {
    s.parse().expect("test identity")
}

/// node-a runs web, node-b runs cart.
fn authorizer() -> StaticAuthorizer {
    StaticAuthorizer::new()
        .with_token(TOKEN_A, "node-a")
        .with_token(TOKEN_B, "node-b")
        .with_identity("node-a", id(WEB))
        .with_identity("node-b", id(CART))
}

/// A CA service running on a real port until [`Running::stop`].
struct Running {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), CaError>>,
}

impl Running {
    async fn start(service: CaService<StaticAuthorizer>) -> anyhow::Result<Running> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(controller::grpc::Listener::plaintext(listener), service, async {
            let _ = rx.await;
        }));
        Ok(Running { addr, shutdown, task })
    }

    async fn client(&self) -> anyhow::Result<IstioCertificateServiceClient<Channel>> {
        Ok(IstioCertificateServiceClient::connect(format!("http://{}", self.addr)).await?)
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task).await.context("CA did not stop")???;
        Ok(())
    }
}

fn request(
    csr: &str,
    validity_secs: i64,
    authorization: Option<&str>,
    metadata: Option<prost_types::Struct>,
) -> tonic::Request<IstioCertificateRequest> {
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: validity_secs,
        metadata,
    });
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value.parse().expect("ASCII metadata"));
    }
    request
}

fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

fn impersonating(value: Kind) -> Option<prost_types::Struct> {
    Some(prost_types::Struct {
        fields: BTreeMap::from([(
            IMPERSONATED_IDENTITY_KEY.to_owned(),
            prost_types::Value { kind: Some(value) },
        )]),
    })
}

/// Checks a leaf PEM against `roots` as an HBONE client would, expecting `identity`.
fn verify_leaf(roots: RootBundle, leaf_pem: &str, identity: &Identity) -> anyhow::Result<()> {
    let leaf = parse_pem_certs(leaf_pem)?.into_iter().next().context("no leaf")?;
    let verifier = ServerIdentityVerifier::new(roots, vec![identity.clone()]);
    let name = ServerName::try_from("ca.test")?;
    verifier.verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())?;
    Ok(())
}

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(fs::metadata(path)?.permissions().mode() & 0o777)
}

async fn expect_refusal(
    client: &mut IstioCertificateServiceClient<Channel>,
    req: tonic::Request<IstioCertificateRequest>,
    code: Code,
    fragments: &[&str],
) -> anyhow::Result<()> {
    let status = match client.create_certificate(req).await {
        Ok(_) => anyhow::bail!("expected {code:?}, got a certificate"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{status:?}");
    for fragment in fragments {
        assert!(status.message().contains(fragment), "{:?} should contain {fragment:?}", status.message());
    }
    Ok(())
}

#[tokio::test]
async fn allowed_identity_gets_a_chain_leaf_first() -> anyhow::Result<()> {
    let ca = CertificateAuthority::generate(TRUST_DOMAIN)?;
    let root_pem = ca.root_pem().to_owned();
    let running = Running::start(CaService::new(ca, authorizer())).await?;
    let mut client = running.client().await?;

    for (requested, want) in
        [(3600, Duration::from_secs(3600)), (0, DEFAULT_CERT_LIFETIME), (-5, DEFAULT_CERT_LIFETIME)]
    {
        let (key, csr) = generate_csr(&id(WEB))?;
        let chain = client
            .create_certificate(request(&csr, requested, bearer(TOKEN_A).as_deref(), None))
            .await?
            .into_inner()
            .cert_chain;
        assert_eq!(chain.len(), 2, "leaf and root");
        assert_eq!(chain[1], root_pem, "root last");
        let cert = WorkloadCertificate::from_pem(&key, &chain, &RootBundle::default())?;
        assert_eq!(cert.identity(), &id(WEB));
        assert_eq!(cert.roots().certs(), parse_pem_certs(&root_pem)?);
        let lifetime = cert.not_after().duration_since(cert.not_before())?;
        assert!(lifetime >= want && lifetime <= want + SLACK, "asked {requested}s, got {lifetime:?}");
        verify_leaf(cert.roots().clone(), &chain[0], &id(WEB))?;
    }

    // The same identity on behalf of a workload, named in the metadata.
    let (_, csr) = generate_csr(&id(CART))?;
    let req = request(&csr, 0, bearer(TOKEN_B).as_deref(), impersonating(Kind::StringValue(CART.into())));
    assert_eq!(client.create_certificate(req).await?.into_inner().cert_chain.len(), 2);

    running.stop().await
}

#[tokio::test]
async fn identity_the_node_may_not_hold_is_refused() -> anyhow::Result<()> {
    let running =
        Running::start(CaService::new(CertificateAuthority::generate(TRUST_DOMAIN)?, authorizer())).await?;
    let mut client = running.client().await?;
    let (_, csr) = generate_csr(&id(CART))?;
    let req = request(&csr, 0, bearer(TOKEN_A).as_deref(), None);
    expect_refusal(
        &mut client,
        req,
        Code::PermissionDenied,
        &["node-a", CART, "no pod with that service account"],
    )
    .await?;
    // An unknown service account is refused just the same.
    let (_, csr) = generate_csr(&id("spiffe://cluster.local/ns/default/sa/admin"))?;
    let req = request(&csr, 0, bearer(TOKEN_A).as_deref(), None);
    expect_refusal(&mut client, req, Code::PermissionDenied, &["node-a", "sa/admin"]).await?;
    running.stop().await
}

#[tokio::test]
async fn missing_or_unknown_token_is_unauthenticated() -> anyhow::Result<()> {
    let running =
        Running::start(CaService::new(CertificateAuthority::generate(TRUST_DOMAIN)?, authorizer())).await?;
    let mut client = running.client().await?;
    let (_, csr) = generate_csr(&id(WEB))?;
    let cases: &[(Option<&str>, &str)] = &[
        (None, "no bearer token"),
        (Some("Bearer "), "no bearer token"),
        (Some("Bearer not-a-token"), "unknown token"),
        (Some("Basic dXNlcjpwdw=="), "Bearer"),
        (Some(TOKEN_A), "Bearer"),
    ];
    for (authorization, fragment) in cases {
        let req = request(&csr, 0, *authorization, None);
        expect_refusal(&mut client, req, Code::Unauthenticated, &[fragment]).await?;
    }
    // Authentication comes first: a bad CSR from an unknown caller is still Unauthenticated.
    let req = request("garbage", 0, Some("Bearer not-a-token"), None);
    expect_refusal(&mut client, req, Code::Unauthenticated, &["unknown token"]).await?;
    running.stop().await
}

#[tokio::test]
async fn malformed_csr_is_invalid_argument_naming_the_problem() -> anyhow::Result<()> {
    let running =
        Running::start(CaService::new(CertificateAuthority::generate(TRUST_DOMAIN)?, authorizer())).await?;
    let mut client = running.client().await?;

    let (_, good) = generate_csr(&id(WEB))?;
    let der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())?.as_ref().to_vec();
    // Tampered: change the identity inside the signed part ("sa/web" -> "sa/wec").
    let mut tampered = der.clone();
    let at = tampered.windows(6).position(|w| w == b"sa/web").context("identity in the CSR")?;
    tampered[at + 5] = b'c';
    let (_, foreign) = generate_csr(&id("spiffe://other.org/ns/default/sa/web"))?;

    let cases: Vec<(String, &[&str])> = vec![
        ("garbage".into(), &["not a PEM"]),
        (String::new(), &["not a PEM"]),
        (der_to_pem("CERTIFICATE", &der), &["not a PEM \"CERTIFICATE REQUEST\""]),
        (der_to_pem("CERTIFICATE REQUEST", &[0x30, 0x03, 1, 2, 3]), &["not a valid PKCS#10"]),
        (der_to_pem("CERTIFICATE REQUEST", &der[..der.len() / 2]), &["not a valid PKCS#10"]),
        (der_to_pem("CERTIFICATE REQUEST", &tampered), &["signature does not verify"]),
        (foreign, &["trust domain", "other.org", TRUST_DOMAIN]),
    ];
    for (csr, fragments) in cases {
        let req = request(&csr, 0, bearer(TOKEN_A).as_deref(), None);
        expect_refusal(&mut client, req, Code::InvalidArgument, fragments).await?;
    }
    running.stop().await
}

#[tokio::test]
async fn impersonated_identity_must_match_the_csr() -> anyhow::Result<()> {
    let running =
        Running::start(CaService::new(CertificateAuthority::generate(TRUST_DOMAIN)?, authorizer())).await?;
    let mut client = running.client().await?;
    let (_, csr) = generate_csr(&id(WEB))?;
    let token = bearer(TOKEN_A);

    let req = request(&csr, 0, token.as_deref(), impersonating(Kind::StringValue(CART.into())));
    expect_refusal(&mut client, req, Code::PermissionDenied, &[IMPERSONATED_IDENTITY_KEY, CART, WEB]).await?;
    let req = request(&csr, 0, token.as_deref(), impersonating(Kind::StringValue("web".into())));
    expect_refusal(
        &mut client,
        req,
        Code::InvalidArgument,
        &[IMPERSONATED_IDENTITY_KEY, "not a SPIFFE identity"],
    )
    .await?;
    let req = request(&csr, 0, token.as_deref(), impersonating(Kind::BoolValue(true)));
    expect_refusal(&mut client, req, Code::InvalidArgument, &[IMPERSONATED_IDENTITY_KEY, "must be a string"])
        .await?;

    // Matching, or empty (as Istio treats it: not set), is accepted.
    for value in [WEB, ""] {
        let req = request(&csr, 0, token.as_deref(), impersonating(Kind::StringValue(value.into())));
        client.create_certificate(req).await.with_context(|| format!("impersonating {value:?}"))?;
    }
    running.stop().await
}

#[tokio::test]
async fn validity_over_the_max_is_refused() -> anyhow::Result<()> {
    let day = 24 * 60 * 60;
    let running =
        Running::start(CaService::new(CertificateAuthority::generate(TRUST_DOMAIN)?, authorizer())).await?;
    let mut client = running.client().await?;
    let (_, csr) = generate_csr(&id(WEB))?;
    let over = 90 * day + 1;
    let req = request(&csr, over, bearer(TOKEN_A).as_deref(), None);
    expect_refusal(
        &mut client,
        req,
        Code::InvalidArgument,
        &[&format!("{over}s"), &format!("{}s", 90 * day)],
    )
    .await?;
    let req = request(&csr, i64::MAX, bearer(TOKEN_A).as_deref(), None);
    expect_refusal(&mut client, req, Code::InvalidArgument, &["greater than the maximum"]).await?;
    client.create_certificate(request(&csr, 90 * day, bearer(TOKEN_A).as_deref(), None)).await?;
    running.stop().await?;

    // A configured maximum below the default: over it is refused, the default is capped to it.
    let service = CaService::new(CertificateAuthority::generate(TRUST_DOMAIN)?, authorizer())
        .with_max_lifetime(Duration::from_secs(3600));
    let running = Running::start(service).await?;
    let mut client = running.client().await?;
    let req = request(&csr, 3601, bearer(TOKEN_A).as_deref(), None);
    expect_refusal(&mut client, req, Code::InvalidArgument, &["3601s", "3600s"]).await?;
    let (key, csr) = generate_csr(&id(WEB))?;
    let chain =
        client.create_certificate(request(&csr, 0, bearer(TOKEN_A).as_deref(), None)).await?.into_inner();
    let cert = WorkloadCertificate::from_pem(&key, &chain.cert_chain, &RootBundle::default())?;
    let lifetime = cert.not_after().duration_since(cert.not_before())?;
    assert!(lifetime <= Duration::from_secs(3600) + SLACK, "{lifetime:?}");
    running.stop().await
}

#[tokio::test]
async fn root_files_are_private_and_the_root_survives_a_restart() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("var/ca");
    let ca = load_or_create_root(&dir, TRUST_DOMAIN)?;
    assert_eq!(mode(&dir)?, 0o700);
    assert_eq!(mode(&dir.join(ROOT_CERT_FILE))?, 0o600);
    assert_eq!(mode(&dir.join(ROOT_KEY_FILE))?, 0o600);
    let old_roots = ca.roots();
    let old_root_pem = ca.root_pem().to_owned();

    let running = Running::start(CaService::new(ca, authorizer())).await?;
    let (_, csr) = generate_csr(&id(WEB))?;
    let before = running
        .client()
        .await?
        .create_certificate(request(&csr, 0, bearer(TOKEN_A).as_deref(), None))
        .await?;
    let before = before.into_inner().cert_chain;
    running.stop().await?;

    let reloaded = load_or_create_root(&dir, TRUST_DOMAIN)?;
    assert_eq!(reloaded.root_pem(), old_root_pem, "same root after a restart");
    let new_roots = reloaded.roots();
    let running = Running::start(CaService::new(reloaded, authorizer())).await?;
    let (_, csr) = generate_csr(&id(WEB))?;
    let after = running
        .client()
        .await?
        .create_certificate(request(&csr, 0, bearer(TOKEN_A).as_deref(), None))
        .await?;
    let after = after.into_inner().cert_chain;
    running.stop().await?;

    verify_leaf(new_roots.clone(), &before[0], &id(WEB)).context("old leaf, reloaded root")?;
    verify_leaf(old_roots.clone(), &after[0], &id(WEB)).context("new leaf, old root")?;
    verify_leaf(old_roots, &before[0], &id(WEB))?;
    // And a leaf from some other root does not verify: the checks above mean something.
    let stranger = CertificateAuthority::generate(TRUST_DOMAIN)?;
    assert!(verify_leaf(stranger.roots(), &after[0], &id(WEB)).is_err());
    assert_eq!(mode(&dir.join(ROOT_KEY_FILE))?, 0o600, "still private after reloads");
    Ok(())
}

#[tokio::test]
async fn damaged_root_material_is_reported_and_left_alone() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let cert_path = dir.join(ROOT_CERT_FILE);
    let key_path = dir.join(ROOT_KEY_FILE);
    let ca = load_or_create_root(dir, TRUST_DOMAIN)?;

    // A corrupted key.
    fs::write(&key_path, "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")?;
    let before = fs::read(&key_path)?;
    let err = load_or_create_root(dir, TRUST_DOMAIN).err().context("a corrupted key must not load")?;
    assert!(matches!(err, CaError::Unparsable { .. }), "{err:?}");
    assert!(err.to_string().contains(&key_path.display().to_string()), "{err}");
    assert_eq!(fs::read(&key_path)?, before, "the key file is not overwritten");
    assert_eq!(fs::read_to_string(&cert_path)?, ca.root_pem(), "nor the certificate");

    // Not PEM at all, and not UTF-8.
    fs::write(&key_path, [0xff, 0xfe, 0x00])?;
    let err = load_or_create_root(dir, TRUST_DOMAIN).err().context("binary key")?;
    assert!(err.to_string().contains(ROOT_KEY_FILE), "{err}");

    // A corrupted certificate next to a good key.
    fs::write(&key_path, ca.key_pem())?;
    fs::write(&cert_path, "hello")?;
    let err =
        load_or_create_root(dir, TRUST_DOMAIN).err().context("a corrupted certificate must not load")?;
    assert!(err.to_string().contains(ROOT_CERT_FILE), "{err}");
    assert_eq!(fs::read_to_string(&cert_path)?, "hello");

    // One file without the other: named, and nothing is created.
    fs::remove_file(&cert_path)?;
    let err =
        load_or_create_root(dir, TRUST_DOMAIN).err().context("a key without a certificate must not load")?;
    let msg = err.to_string();
    assert!(msg.contains(ROOT_KEY_FILE) && msg.contains(ROOT_CERT_FILE), "{msg}");
    assert!(!cert_path.exists(), "no new certificate was written");
    assert_eq!(fs::read_to_string(&key_path)?, ca.key_pem(), "the key is left alone");

    // Put back, the original root loads again.
    fs::write(&cert_path, ca.root_pem())?;
    assert_eq!(load_or_create_root(dir, TRUST_DOMAIN)?.root_pem(), ca.root_pem());
    Ok(())
}

/// The whole program in-process: config -> root on disk -> port -> a certificate -> shutdown.
#[tokio::test]
async fn controller_runs_from_its_config() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let config = Config {
        ca_dir: tmp.path().join("ca"),
        listen: "127.0.0.1:0".parse()?,
        node_tokens: BTreeMap::from([(TOKEN_A.to_owned(), "node-a".to_owned())]),
        node_identities: BTreeMap::from([("node-a".to_owned(), [id(WEB)].into())]),
        ..Config::default()
    };
    let controller = Controller::bind(&config).await?;
    let addr = controller.local_addr();
    let root_pem = controller.root_pem().to_owned();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));

    let mut client = IstioCertificateServiceClient::connect(format!("http://{addr}")).await?;
    let (key, csr) = generate_csr(&id(WEB))?;
    let chain =
        client.create_certificate(request(&csr, 0, bearer(TOKEN_A).as_deref(), None)).await?.into_inner();
    let cert = WorkloadCertificate::from_pem(&key, &chain.cert_chain, &RootBundle::default())?;
    assert_eq!(cert.roots().certs(), parse_pem_certs(&root_pem)?);

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task).await???;
    assert_eq!(fs::read_to_string(config.ca_dir.join(ROOT_CERT_FILE))?, root_pem);
    Ok(())
}
