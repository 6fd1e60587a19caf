#![allow(clippy::unwrap_used)]
//! ztunnel and waypoint authentication by Kubernetes service-account token, against the real
//! kube-apiserver (v1.20.2): the controller in Kubernetes mode without --node-token checks the CA
//! caller's token with a TokenReview (audience istio-ca) and requires a bound pod; the ztunnel
//! service account's token is signed only identities of the mesh's pods on that pod's node, and
//! another service account's token whose pod is labelled as its Gateway's is that waypoint's,
//! signed only its own identity and sent only its own Waypoint over xDS. Every refusal says why.
//! Skips without `WEFT_TEST_KUBECONFIG` (fails in CI).

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::api::DeleteParams;
use kube::{Api, Client};
use tokio::sync::oneshot;
use weft_core::cert_manager::{CaClient, CertificateSource, FetchError, Token};
use weft_core::control::ControlPlane;
use weft_core::Identity;

use controller::config::{Config, KubeAccess};
use controller::Controller;
use support::{
    ambient_namespace, apiserver_state_dir, create_running_pod, ensure_namespace, ensure_service_account,
    eventually, install_gateway_crd, kube_client, pod, request_token, unique_name, Ads, ISTIO_CA_AUDIENCE,
    KUBECONFIG_ENV,
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
        Ok(CaClient::new(&ControlPlane::plaintext(&self.endpoint).unwrap(), token, Duration::from_secs(3600)))
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

/// A pod of `node` running as `account`, labelled as the pod of the Gateway `gateway` (as waypoint
/// pods are).
fn gateway_pod(name: &str, node: &str, account: &str, gateway: &str) -> Pod {
    let mut pod = pod(name, node, account);
    pod.metadata.labels = Some(
        [
            ("gateway.networking.k8s.io/gateway-name".to_owned(), gateway.to_owned()),
            ("istio.io/dataplane-mode".to_owned(), "none".to_owned()),
        ]
        .into(),
    );
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_token_gets_only_its_own_identity_and_waypoint_resource() -> anyhow::Result<()> {
    use controller::xds::{NODE_NAME_KEY, WAYPOINT_NAME_KEY, WAYPOINT_TYPE_URL};
    use kube::api::{DynamicObject, PostParams};

    let Some(client) = kube_client().await else { return Ok(()) };
    ensure_namespace(&client, ZTUNNEL_NS).await?;
    ensure_service_account(&client, ZTUNNEL_NS, ZTUNNEL_SA).await?;
    install_gateway_crd(&client).await?;
    let node = unique_name("node");
    let ns = ambient_namespace(&client, "tokenreview-waypoint").await?;
    for account in ["waypoint", "web"] {
        ensure_service_account(&client, &ns, account).await?;
    }
    let gateways = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &ns,
        &controller::waypoints::resources::gateway_resource(),
    );
    let gateway = DynamicObject::new("waypoint", &controller::waypoints::resources::gateway_resource())
        .within(&ns)
        .data(serde_json::json!({
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE" }],
            }
        }));
    gateways.create(&PostParams::default(), &gateway).await.context("creating the waypoint Gateway")?;

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    // The waypoint's pod runs on the node, beside web.
    let wp_pod =
        create_running_pod(&pods, &gateway_pod("waypoint-0", &node, "waypoint", "waypoint"), "10.50.4.9")
            .await?;
    let web_pod = create_running_pod(&pods, &pod("web-0", &node, "web"), "10.50.4.5").await?;
    // web's account, its pod labelled as the waypoint's: the label must name the pod's own account.
    let impostor =
        create_running_pod(&pods, &gateway_pod("impostor-0", &node, "web", "waypoint"), "10.50.4.6").await?;
    let zt = ztunnel_pod(&client, &node).await?;
    let token = |ns: &str, account: &str, pod: &Pod| {
        let (client, ns, account, pod) = (client.clone(), ns.to_owned(), account.to_owned(), pod.clone());
        async move { request_token(&client, &ns, &account, ISTIO_CA_AUDIENCE, Some(&pod), TOKEN_SECONDS).await }
    };
    let wp_token = token(&ns, "waypoint", &wp_pod).await?;
    let web_token = token(&ns, "web", &web_pod).await?;
    let impostor_token = token(&ns, "web", &impostor).await?;
    let zt_token = token(ZTUNNEL_NS, ZTUNNEL_SA, &zt).await?;
    let own = Identity::new(TRUST_DOMAIN, &ns, "waypoint")?;
    let web = Identity::new(TRUST_DOMAIN, &ns, "web")?;

    let controller = Running::start().await?;
    // CA: the waypoint gets its own identity (no model needed: the token says who it is) and no
    // other; the ztunnel of its node gets web's and never the waypoint's.
    let wp_ca = controller.client(Some(&wp_token))?;
    assert_eq!(wp_ca.fetch(&own).await?.identity(), &own);
    let (code, message) = refusal(&wp_ca, &web).await?;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(message.contains(&format!("waypoint {ns}/waypoint may hold only its own identity")), "{message}");
    let zt_ca = controller.client(Some(&zt_token))?;
    eventually("the ztunnel gets web's certificate", WAIT, || async { Ok(zt_ca.fetch(&web).await.ok()) })
        .await?;
    let (code, message) = refusal(&zt_ca, &own).await?;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(message.contains(&format!("node {node} may not hold identity {own}")), "{message}");
    // Tokens of other accounts are no waypoint's, labelled or not.
    for (what, token, fragment) in [
        ("web", &web_token, format!("its pod {ns}/web-0 is not a waypoint's")),
        (
            "impostor",
            &impostor_token,
            "lacks the label gateway.networking.k8s.io/gateway-name=web".to_owned(),
        ),
    ] {
        let (code, message) = refusal(&controller.client(Some(token.as_str()))?, &own).await?;
        assert_eq!(code, tonic::Code::Unauthenticated, "{what}: {message}");
        assert!(message.contains(&fragment), "{what}: {message}");
    }

    // xDS: the waypoint subscribes as itself and is sent its own Waypoint; the ztunnel's token
    // cannot subscribe as the waypoint.
    let endpoint = controller.endpoint.clone();
    let wp_node = format!("waypoint~10.50.4.9~waypoint-0.{ns}~{ns}.svc.cluster.local");
    let metadata = [(NODE_NAME_KEY, node.as_str()), (WAYPOINT_NAME_KEY, "waypoint")];
    let mut ads =
        Ads::open(endpoint.clone(), &wp_node, &metadata, WAYPOINT_TYPE_URL, Some(&wp_token)).await?;
    let name = format!("{ns}/waypoint");
    ads.until("the waypoint's own Waypoint", WAIT, |r| {
        r.resources.iter().any(|r| r.name == name).then_some(())
    })
    .await?;
    let refusal = match Ads::open(endpoint, &wp_node, &metadata, WAYPOINT_TYPE_URL, Some(&zt_token)).await {
        Err(e) => format!("{e:#}"),
        Ok(mut ads) => match ads.until("a refusal", WAIT, |_| Some(())).await {
            Err(e) => format!("{e:#}"),
            Ok(()) => anyhow::bail!("the ztunnel's token subscribed as the waypoint"),
        },
    };
    assert!(refusal.contains("only that waypoint's own token may"), "{refusal}");
    controller.stop().await
}
