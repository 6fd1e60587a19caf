//! The control channel over TLS, as Istio's ztunnel expects of istiod: the controller serves its
//! gRPC port with a certificate it issues itself from the mesh root; a proxy that trusts that root
//! and dials one of the certificate's names gets certificates and xDS; a plaintext client, a
//! client trusting another root, and a client expecting another name are refused; and a proxy
//! refuses a controller whose certificate does not chain to its root.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use controller::config::{Args, Config};
use controller::tls::ServingNames;
use controller::Controller;
use tokio::sync::oneshot;
use weft_core::cert_manager::{CaClient, CertificateSource, FetchError, Token};
use weft_core::control::ControlPlane;
use weft_core::tls::CertificateAuthority;
use weft_core::Identity;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const SERVICE_NAME: &str = "weft-controller.weft-system.svc";

struct Running {
    url: String,
    root: std::path::PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), controller::ControllerError>>,
    _tmp: tempfile::TempDir,
}

impl Running {
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().map(|s| s.send(()));
        tokio::time::timeout(Duration::from_secs(10), self.task).await???;
        Ok(())
    }
}

/// A controller serving TLS on 127.0.0.1 for [`SERVICE_NAME`] and Istio's default name, CA
/// only, with one node token.
async fn start_tls() -> anyhow::Result<Running> {
    let tmp = tempfile::tempdir()?;
    let config = Config {
        ca_dir: tmp.path().join("ca"),
        listen: "127.0.0.1:0".parse()?,
        node_tokens: BTreeMap::from([("token-a".to_owned(), "node-a".to_owned())]),
        node_identities: BTreeMap::from([("node-a".to_owned(), [WEB.parse::<Identity>()?].into())]),
        tls: Some(ServingNames {
            dns: vec![SERVICE_NAME.into(), "istiod.istio-system.svc".into()],
            ips: vec!["127.0.0.1".parse()?],
        }),
        ..Config::default()
    };
    let controller = Controller::bind(&config).await?;
    let url = format!("https://{}", controller.local_addr());
    let root = tmp.path().join("ca").join("root-cert.pem");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));
    Ok(Running { url, root, stop: Some(stop), task, _tmp: tmp })
}

fn client(url: &str, root: &Path, name: Option<&str>) -> anyhow::Result<CaClient> {
    let endpoint = ControlPlane::parse(url, root, name).map_err(anyhow::Error::msg)?;
    Ok(CaClient::new(&endpoint, Token::Static("token-a".into()), Duration::from_secs(3600)))
}

fn refusal(result: Result<impl Sized, FetchError>) -> String {
    match result {
        Ok(_) => panic!("the controller answered"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_trusting_the_mesh_root_is_served_over_tls_by_name_or_ip() -> anyhow::Result<()> {
    let controller = start_tls().await?;
    let web: Identity = WEB.parse()?;
    // By IP (the certificate's IP SAN), and by the Service's name and Istio's default name
    // (ALT_XDS_HOSTNAME, as when the address is a cluster IP).
    for name in [None, Some(SERVICE_NAME), Some("istiod.istio-system.svc")] {
        let cert = client(&controller.url, &controller.root, name)?.fetch(&web).await?;
        assert_eq!(cert.identity(), &web, "{name:?}");
    }
    controller.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_other_roots_and_other_names_are_refused() -> anyhow::Result<()> {
    let controller = start_tls().await?;
    let web: Identity = WEB.parse()?;

    // A plaintext gRPC client (HTTP/2 without TLS) gets no answer.
    let plain_url = controller.url.replace("https://", "http://");
    let plain = CaClient::new(
        &ControlPlane::plaintext(&plain_url).unwrap(),
        Token::Static("token-a".into()),
        Duration::from_secs(3600),
    );
    let err = refusal(plain.fetch(&web).await);
    assert!(err.contains("Unavailable") || err.contains("transport") || err.contains("connection"), "{err}");

    // A client that trusts another root (an impostor's, with the same trust domain and so the
    // same issuer name, or another one) refuses the controller's certificate.
    for (trust_domain, why) in [("cluster.local", "BadSignature"), ("example.org", "UnknownIssuer")] {
        let other = tempfile::NamedTempFile::new()?;
        std::fs::write(other.path(), CertificateAuthority::generate(trust_domain)?.root_pem())?;
        let err = refusal(client(&controller.url, other.path(), None)?.fetch(&web).await);
        assert!(err.contains("TLS handshake") && err.contains(why), "{err}");
    }

    // A client expecting a name the certificate does not carry refuses it too.
    let err =
        refusal(client(&controller.url, &controller.root, Some("impostor.example.com"))?.fetch(&web).await);
    assert!(err.contains("TLS handshake") && err.contains("not valid for name"), "{err}");

    // The refused clients cost the controller nothing: a good one is still served.
    client(&controller.url, &controller.root, None)?.fetch(&web).await?;
    controller.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_delays_nobody() -> anyhow::Result<()> {
    let controller = start_tls().await?;
    let addr = controller.url.trim_start_matches("https://").to_owned();
    // Connections that never say hello, and one that says garbage.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(&addr).await?);
    }
    let mut garbage = tokio::net::TcpStream::connect(&addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    let web: Identity = WEB.parse()?;
    let cert = tokio::time::timeout(
        Duration::from_secs(5),
        client(&controller.url, &controller.root, None)?.fetch(&web),
    )
    .await??;
    assert_eq!(cert.identity(), &web);
    drop(idle);
    controller.stop().await
}

#[test]
fn plaintext_is_local_only_and_tls_is_the_default() {
    let parse = |args: &[&str]| {
        Config::from_args(
            <Args as clap::Parser>::try_parse_from(std::iter::once("controller").chain(args.iter().copied()))
                .unwrap(),
        )
    };
    let tls = parse(&["--listen", "0.0.0.0:15012"]).unwrap();
    let names = tls.tls.expect("TLS by default");
    assert_eq!(names.dns, [SERVICE_NAME, "istiod.istio-system.svc"]);
    let err = parse(&["--listen", "0.0.0.0:15012", "--plaintext"]).unwrap_err().to_string();
    assert!(err.contains("--plaintext serves only on loopback"), "{err}");
    assert!(parse(&["--listen", "127.0.0.1:15012", "--plaintext"]).unwrap().tls.is_none());
    let err = parse(&["--tls-dns-name", "bad name!", "--tls-ip", "10.0.0.300"]).unwrap_err().to_string();
    assert!(err.contains("bad name!") && err.contains("10.0.0.300"), "{err}");
}
