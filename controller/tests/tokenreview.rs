#![allow(clippy::unwrap_used)]
//! ztunnel authentication by Kubernetes service-account token, against the real kube-apiserver
//! (v1.20.2): the controller in Kubernetes mode without --node-token checks the CA caller's token
//! with a TokenReview (audience istio-ca), requires the ztunnel service account and a bound pod,
//! and signs only identities of pods on that pod's node. Every refusal says why. Skips without
//! `WEFT_TEST_KUBECONFIG` (fails in CI).

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::api::DeleteParams;
use kube::{Api, Client};
use tokio::sync::oneshot;
use weft_core::cert_manager::{CaClient, CertificateSource, FetchError, Token};
use weft_core::Identity;

use controller::config::{Config, KubeAccess};
use controller::Controller;
use support::{
    ambient_namespace, apiserver_state_dir, create_running_pod, ensure_namespace, ensure_service_account,
    eventually, kube_client, pod, request_token, unique_name, ISTIO_CA_AUDIENCE, KUBECONFIG_ENV,
};

const TRUST_DOMAIN: &str = "cluster.local";
const ZTUNNEL_NS: &str = "weft-system";
const ZTUNNEL_SA: &str = "ztunnel";
/// Bound on waits for the controller's model to see the pods.
const WAIT: Duration = Duration::from_secs(20);
/// TokenRequest's shortest lifetime on this apiserver (v1.20 refuses less than 10 minutes).
const TOKEN_SECONDS: i64 = 600;

/// The controller in Kubernetes mode with the admin kubeconfig and no node tokens.
struct Running {
    endpoint: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), controller::ControllerError>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start() -> anyhow::Result<Running> {
        let dir = tempfile::tempdir()?;
        let kubeconfig = std::env::var_os(KUBECONFIG_ENV).context("no test apiserver")?;
        let config = Config {
            ca_dir: dir.path().join("ca"),
            listen: "127.0.0.1:0".parse()?,
            kubernetes: Some(KubeAccess::File(kubeconfig.into())),
            ..Config::default()
        };
        assert_eq!(config.ztunnel_service_account.to_string(), "weft-system/ztunnel");
        let controller = Controller::bind(&config).await?;
        let endpoint = format!("http://{}", controller.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(controller.run(async {
            let _ = stopped.await;
        }));
        Ok(Running { endpoint, stop, task, _dir: dir })
    }

    fn client(&self, token: Option<&str>) -> anyhow::Result<CaClient> {
        let token = token.map_or(Token::None, |t| Token::Static(t.to_owned()));
        Ok(CaClient::new(&self.endpoint, token, Duration::from_secs(3600))?)
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task).await???;
        Ok(())
    }
}

/// A refusal's gRPC code and message (a certificate is a failure of the test).
async fn refusal(client: &CaClient, identity: &Identity) -> anyhow::Result<(tonic::Code, String)> {
    match client.fetch(identity).await {
        Err(FetchError::Refused { code, message, .. }) => Ok((code, message)),
        Err(other) => anyhow::bail!("expected a refusal for {identity}, got {other}"),
        Ok(_) => anyhow::bail!("the CA signed {identity}, which it must refuse"),
    }
}

/// A ztunnel pod of `node` running as the ztunnel service account.
async fn ztunnel_pod(client: &Client, node: &str) -> anyhow::Result<Pod> {
    let pods = Api::<Pod>::namespaced(client.clone(), ZTUNNEL_NS);
    create_running_pod(&pods, &pod(&unique_name("ztunnel"), node, ZTUNNEL_SA), "192.168.0.20").await
}

/// `token` with its claims changed by `edit` and signed again with the apiserver's own
/// service-account key (start.sh keeps it in STATE_DIR/pki/sa.key): a token the apiserver itself
/// could have issued.
fn resigned(token: &str, edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<String> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let (header, payload) = (parts.next().context("no header")?, parts.next().context("no payload")?);
    let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(payload)?)?;
    edit(&mut claims);
    let signing_input = format!("{header}.{}", b64.encode(serde_json::to_vec(&claims)?));
    let key_path = apiserver_state_dir().context("no apiserver state dir")?.join("pki/sa.key");
    let pem =
        std::fs::read_to_string(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body)?;
    let key = ring::signature::RsaKeyPair::from_pkcs8(&der).map_err(|e| anyhow::anyhow!("sa.key: {e}"))?;
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    Ok(format!("{signing_input}.{}", b64.encode(signature)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_token_gets_certificates_only_for_its_nodes_pods() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    ensure_namespace(&client, ZTUNNEL_NS).await?;
    ensure_service_account(&client, ZTUNNEL_NS, ZTUNNEL_SA).await?;
    // Node names of this test alone, so other tests' pods place no identities on them.
    let (node_a, node_b) = (unique_name("node-a"), unique_name("node-b"));
    let ns = ambient_namespace(&client, "tokenreview").await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    create_running_pod(&pods, &pod("web-0", &node_a, "web"), "10.50.1.5").await?;
    create_running_pod(&pods, &pod("db-0", &node_b, "db"), "10.50.2.5").await?;
    let web = Identity::new(TRUST_DOMAIN, &ns, "web")?;
    let db = Identity::new(TRUST_DOMAIN, &ns, "db")?;

    let zt_a = ztunnel_pod(&client, &node_a).await?;
    let zt_b = ztunnel_pod(&client, &node_b).await?;
    let token_a =
        request_token(&client, ZTUNNEL_NS, ZTUNNEL_SA, ISTIO_CA_AUDIENCE, Some(&zt_a), TOKEN_SECONDS).await?;
    let token_b =
        request_token(&client, ZTUNNEL_NS, ZTUNNEL_SA, ISTIO_CA_AUDIENCE, Some(&zt_b), TOKEN_SECONDS).await?;

    let controller = Running::start().await?;
    let ca_a = controller.client(Some(&token_a))?;
    // The model needs a moment to see the pods; until then node-a's identity is refused.
    let cert = eventually("node-a's ztunnel gets web's certificate", WAIT, || async {
        Ok(ca_a.fetch(&web).await.ok())
    })
    .await?;
    assert_eq!(cert.identity(), &web);
    let (code, message) = refusal(&ca_a, &db).await?;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(message.contains(&format!("node {node_a} may not hold identity {db}")), "{message}");

    let ca_b = controller.client(Some(&token_b))?;
    let cert = eventually("node-b's ztunnel gets db's certificate", WAIT, || async {
        Ok(ca_b.fetch(&db).await.ok())
    })
    .await?;
    assert_eq!(cert.identity(), &db);
    let (code, _) = refusal(&ca_b, &web).await?;
    assert_eq!(code, tonic::Code::PermissionDenied);

    controller.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_are_not_a_ztunnels_are_refused_with_the_reason() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    ensure_namespace(&client, ZTUNNEL_NS).await?;
    ensure_service_account(&client, ZTUNNEL_NS, ZTUNNEL_SA).await?;
    let node = unique_name("node");
    let ns = ambient_namespace(&client, "tokenreview-refused").await?;
    ensure_service_account(&client, &ns, "web").await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let web_pod = create_running_pod(&pods, &pod("web-0", &node, "web"), "10.50.3.5").await?;
    let web = Identity::new(TRUST_DOMAIN, &ns, "web")?;
    let zt = ztunnel_pod(&client, &node).await?;
    let good =
        request_token(&client, ZTUNNEL_NS, ZTUNNEL_SA, ISTIO_CA_AUDIENCE, Some(&zt), TOKEN_SECONDS).await?;

    // v1.20 mints no token shorter than 10 minutes, so an expired one cannot be waited for: the
    // test takes a real token and signs it again, with the apiserver's own key, an hour expired.
    let short = request_token(&client, ZTUNNEL_NS, ZTUNNEL_SA, ISTIO_CA_AUDIENCE, Some(&zt), 60).await;
    let short = short.expect_err("the apiserver minted a 60 s token");
    assert!(format!("{short:#}").contains("10 minutes"), "{short:#}");
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let expired = resigned(&good, |claims| {
        claims["iat"] = (now - 7200).into();
        claims["nbf"] = (now - 7200).into();
        claims["exp"] = (now - 3600).into();
    })?;
    // The same claims re-signed but still valid pass: the re-signing itself is sound.
    let fresh = resigned(&good, |_| {})?;

    let other_account =
        request_token(&client, &ns, "web", ISTIO_CA_AUDIENCE, Some(&web_pod), TOKEN_SECONDS).await?;
    let unbound =
        request_token(&client, ZTUNNEL_NS, ZTUNNEL_SA, ISTIO_CA_AUDIENCE, None, TOKEN_SECONDS).await?;
    let wrong_audience = request_token(
        &client,
        ZTUNNEL_NS,
        ZTUNNEL_SA,
        "https://kubernetes.default.svc",
        Some(&zt),
        TOKEN_SECONDS,
    )
    .await?;
    // A token whose pod was deleted dies with it.
    let doomed = ztunnel_pod(&client, &node).await?;
    let orphaned =
        request_token(&client, ZTUNNEL_NS, ZTUNNEL_SA, ISTIO_CA_AUDIENCE, Some(&doomed), TOKEN_SECONDS)
            .await?;
    let doomed_name = doomed.metadata.name.clone().unwrap_or_default();
    Api::<Pod>::namespaced(client.clone(), ZTUNNEL_NS)
        .delete(&doomed_name, &DeleteParams::default().grace_period(0))
        .await?;
    // A ztunnel pod not (yet) scheduled.
    let mut unscheduled = pod(&unique_name("ztunnel"), "", ZTUNNEL_SA);
    if let Some(spec) = unscheduled.spec.as_mut() {
        spec.node_name = None;
    }
    let unscheduled =
        Api::<Pod>::namespaced(client.clone(), ZTUNNEL_NS).create(&Default::default(), &unscheduled).await?;
    let unscheduled_token =
        request_token(&client, ZTUNNEL_NS, ZTUNNEL_SA, ISTIO_CA_AUDIENCE, Some(&unscheduled), TOKEN_SECONDS)
            .await?;

    let controller = Running::start().await?;
    let ca = controller.client(Some(&good))?;
    eventually("the good token gets web's certificate", WAIT, || async { Ok(ca.fetch(&web).await.ok()) })
        .await?;
    let fresh_cert = controller.client(Some(&fresh))?.fetch(&web).await;
    assert!(
        fresh_cert.is_ok(),
        "a re-signed, unexpired token must pass: {:?}",
        fresh_cert.err().map(|e| e.to_string())
    );

    let unauthenticated = tonic::Code::Unauthenticated;
    let cases: &[(&str, Option<&str>, &[&str])] = &[
        ("no token", None, &["no bearer token"]),
        ("expired", Some(&expired), &["did not authenticate the token", "Token has expired"]),
        (
            "another service account",
            Some(&other_account),
            &[
                &format!("belongs to system:serviceaccount:{ns}:web"),
                "not to the ztunnel service account system:serviceaccount:weft-system:ztunnel",
            ],
        ),
        ("not bound to a pod", Some(&unbound), &["is not bound to a pod"]),
        ("another audience", Some(&wrong_audience), &["invalid for the target audiences [\"istio-ca\"]"]),
        ("its pod deleted", Some(&orphaned), &["Token has been invalidated"]),
        ("its pod not scheduled", Some(&unscheduled_token), &["is not scheduled on a node"]),
        ("garbage", Some("not-a-token"), &["did not authenticate the token"]),
    ];
    for (what, token, fragments) in cases {
        let (code, message) = refusal(&controller.client(*token)?, &web).await.context(*what)?;
        assert_eq!(code, unauthenticated, "{what}: {message}");
        for fragment in *fragments {
            assert!(message.contains(fragment), "{what}: {fragment:?} not in {message:?}");
        }
        eprintln!("{what}: {message}");
        if let Some(token) = token {
            assert!(!message.contains(token), "{what}: the refusal shows the token");
        }
    }
    controller.stop().await
}
