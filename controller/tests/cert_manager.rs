//! The workload side of the CA: weft-core's certificate manager and CA client against the real
//! controller over gRPC, as a node proxy uses them (impersonating its pods' identities).

use std::collections::BTreeMap;
use std::time::Duration;

use controller::config::Config;
use controller::Controller;
use tokio::sync::oneshot;
use weft_core::cert_manager::{CaClient, CertManager, CertificateSource, FetchError, Token};
use weft_core::control::ControlPlane;
use weft_core::Identity;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_its_pods_certificates_and_nothing_else() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let web: Identity = WEB.parse()?;
    let db: Identity = DB.parse()?;
    let config = Config {
        ca_dir: tmp.path().join("ca"),
        listen: "127.0.0.1:0".parse()?,
        node_tokens: BTreeMap::from([
            ("token-a".to_owned(), "node-a".to_owned()),
            ("token-b".to_owned(), "node-b".to_owned()),
        ]),
        node_identities: BTreeMap::from([
            ("node-a".to_owned(), [web.clone()].into()),
            ("node-b".to_owned(), [db.clone()].into()),
        ]),
        ..Config::default()
    };
    let controller = Controller::bind(&config).await?;
    let endpoint = format!("http://{}", controller.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));

    // The token is read from a file, as a projected service-account token would be.
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "token-a\n")?;
    let client = CaClient::new(
        &ControlPlane::plaintext(&endpoint).unwrap(),
        Token::File(token_file),
        Duration::from_secs(3600),
    );
    let manager = CertManager::new(client.clone());
    let cert = manager.get(&web).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(cert.identity(), &web);
    let lifetime = cert.not_after().duration_since(cert.not_before())?;
    assert!(lifetime >= Duration::from_secs(3600) && lifetime <= Duration::from_secs(3600 + 60));
    assert_eq!(cert.roots().certs().len(), 1, "the root comes with the chain");

    // node-a may not hold node-b's pod identity; the refusal says so.
    match client.fetch(&db).await {
        Err(FetchError::Refused { code, message, .. }) => {
            assert_eq!(code, tonic::Code::PermissionDenied);
            assert!(message.contains("node-a") && message.contains(DB), "{message}");
        }
        other => anyhow::bail!("expected a refusal, got {:?}", other.map(|c| c.identity().to_string())),
    }
    let err = manager.get(&db).await.expect_err("refused");
    assert!(err.to_string().contains("PermissionDenied"), "{err}");

    // No token at all.
    let anonymous =
        CaClient::new(&ControlPlane::plaintext(&endpoint).unwrap(), Token::None, Duration::from_secs(3600));
    match anonymous.fetch(&web).await {
        Err(FetchError::Refused { code, .. }) => assert_eq!(code, tonic::Code::Unauthenticated),
        other => anyhow::bail!("expected Unauthenticated, got {:?}", other.map(|c| c.identity().to_string())),
    }

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task).await???;
    Ok(())
}

/// Two pods of the mesh (their namespace is ambient): only those place identities on a node.
const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: web}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: db}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_decides_which_node_may_hold_which_identity() -> anyhow::Result<()> {
    use controller::ca::{self, CaService, ModelAuthorizer, StaticAuthorizer};
    use controller::sources::dir_model::watch_model;

    let tmp = tempfile::tempdir()?;
    let config_dir = tmp.path().join("config");
    std::fs::create_dir(&config_dir)?;
    std::fs::write(config_dir.join("pods.yaml"), PODS)?;
    let mut model = watch_model(&config_dir)?;
    tokio::time::timeout(Duration::from_secs(2), model.wait_for(|m| m.len() == 3)).await??;

    let root = ca::load_or_create_root(&tmp.path().join("ca"), "cluster.local")?;
    let tokens = StaticAuthorizer::new().with_token("token-a", "node-a");
    let service = CaService::new(root, ModelAuthorizer::new(tokens, "cluster.local", model.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(ca::serve(controller::grpc::Listener::plaintext(listener), service, async {
        let _ = stopped.await;
    }));

    let node_a = CaClient::new(
        &ControlPlane::plaintext(&endpoint).unwrap(),
        Token::Static("token-a".into()),
        Duration::from_secs(3600),
    );
    let web: Identity = WEB.parse()?;
    let db: Identity = DB.parse()?;
    assert_eq!(node_a.fetch(&web).await.map_err(|e| anyhow::anyhow!("{e}"))?.identity(), &web);
    match node_a.fetch(&db).await {
        Err(FetchError::Refused { code, message, .. }) => {
            assert_eq!(code, tonic::Code::PermissionDenied);
            assert!(
                message.contains("node node-a may not hold identity spiffe://cluster.local/ns/shop/sa/db")
            );
        }
        other => anyhow::bail!("node-a got node-b's identity: {:?}", other.map(|c| c.identity().to_string())),
    }

    // The db pod is rescheduled onto node-a: no restart, the CA follows the model.
    std::fs::write(config_dir.join("pods.yaml"), PODS.replace("nodeName: node-b", "nodeName: node-a"))?;
    tokio::time::timeout(
        Duration::from_secs(2),
        model.wait_for(|m| m.identities_on_node("cluster.local", "node-a").contains(&db)),
    )
    .await??;
    assert_eq!(node_a.fetch(&db).await.map_err(|e| anyhow::anyhow!("{e}"))?.identity(), &db);

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task).await???;
    Ok(())
}
