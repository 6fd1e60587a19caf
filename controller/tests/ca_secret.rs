#![allow(clippy::unwrap_used)]
//! The CA kept in Kubernetes Secrets, against the real kube-apiserver: `istio-ca-secret` created
//! in an empty namespace and reused by every later (or racing) start, the controller recreated
//! with the same root, a plug-in `cacerts` intermediate whose leaves chain through it, a rotation
//! that keeps the old root trusted, and the `istio-ca-root-cert` ConfigMap in every namespace.
//! Skips without `WEFT_TEST_KUBECONFIG` (fails in CI).

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{ServerName, UnixTime};
use tokio::sync::watch;
use weft_core::testing::PlugInCa;
use weft_core::tls::{
    generate_csr, parse_pem_certs, CertificateAuthority, RootBundle, ServerIdentityVerifier,
    WorkloadCertificate,
};
use weft_core::Identity;

use controller::ca::root_configmap::{self, ROOT_CONFIGMAP};
use controller::ca::secret::{
    CACERTS_SECRET, CA_CERT_KEY, CA_KEY_KEY, CA_SECRET_TYPE, CERT_CHAIN_KEY, ISTIO_CA_SECRET, ROOT_CERT_KEY,
};
use controller::ca::{SecretCa, SecretOptions};
use controller::config::{Config, KubeAccess};
use controller::Controller;
use support::{ensure_namespace, eventually, kube_client, unique_name, KUBECONFIG_ENV};

const TRUST_DOMAIN: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(30);

fn options(namespace: &str) -> SecretOptions {
    SecretOptions { namespace: namespace.to_owned(), ..SecretOptions::default() }
}

/// A fresh namespace of this test's.
async fn namespace(client: &Client, prefix: &str) -> anyhow::Result<String> {
    let name = unique_name(prefix);
    ensure_namespace(client, &name).await?;
    Ok(name)
}

fn web(ns: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, ns, "web").unwrap()
}

/// A leaf for `identity` signed through the CA's CSR path, as a workload receives it.
fn leaf(
    ca: &CertificateAuthority,
    identity: &Identity,
) -> anyhow::Result<(Vec<String>, WorkloadCertificate)> {
    let (key, csr) = generate_csr(identity)?;
    let chain = ca.sign(&ca.check_csr(&csr)?, Duration::from_secs(3600))?;
    let cert = WorkloadCertificate::from_pem(&key, &chain, &RootBundle::default())?;
    Ok((chain, cert))
}

/// Verifies `cert` (its leaf, with the intermediates it presents) as an HBONE client would.
fn verify(roots: RootBundle, cert: &WorkloadCertificate) -> anyhow::Result<()> {
    verify_presented(roots, cert, &cert.chain()[1..])
}

/// Verifies `cert`'s leaf presented with `intermediates`.
fn verify_presented(
    roots: RootBundle,
    cert: &WorkloadCertificate,
    intermediates: &[rustls_pki_types::CertificateDer<'static>],
) -> anyhow::Result<()> {
    let verifier = ServerIdentityVerifier::new(roots, vec![cert.identity().clone()]);
    let name = ServerName::try_from("ca.test")?;
    verifier.verify_server_cert(&cert.chain()[0], intermediates, &name, &[], UnixTime::now())?;
    Ok(())
}

fn text(secret: &Secret, key: &str) -> String {
    let data = secret.data.as_ref().expect("Secret data");
    String::from_utf8(data.get(key).unwrap_or_else(|| panic!("no key {key}")).0.clone()).unwrap()
}

async fn create_cacerts(client: &Client, ns: &str, plug: &PlugInCa) -> anyhow::Result<()> {
    let data = [
        (CA_CERT_KEY, &plug.ca_cert),
        (CA_KEY_KEY, &plug.ca_key),
        (CERT_CHAIN_KEY, &plug.cert_chain),
        (ROOT_CERT_KEY, &plug.root_cert),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    let secret = Secret {
        metadata: ObjectMeta { name: Some(CACERTS_SECRET.to_owned()), ..ObjectMeta::default() },
        data: Some(data),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await?;
    Ok(())
}

#[tokio::test]
async fn an_empty_namespace_gets_istio_ca_secret_once() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    let ns = namespace(&client, "ca-empty").await?;

    // Two replicas starting together end up with one root.
    let (a, b) = tokio::join!(
        SecretCa::load(client.clone(), TRUST_DOMAIN, options(&ns)),
        SecretCa::load(client.clone(), TRUST_DOMAIN, options(&ns))
    );
    let (a, b) = (a?.authority().borrow().clone(), b?.authority().borrow().clone());
    assert_eq!(a.root_pem(), b.root_pem(), "racing replicas share the root");

    let secret = Api::<Secret>::namespaced(client.clone(), &ns).get(ISTIO_CA_SECRET).await?;
    assert_eq!(secret.type_.as_deref(), Some(CA_SECRET_TYPE));
    assert_eq!(parse_pem_certs(&text(&secret, CA_CERT_KEY))?, a.roots().certs());
    assert_eq!(text(&secret, CA_KEY_KEY), a.key_pem());
    assert_eq!(text(&secret, CERT_CHAIN_KEY), "");
    assert_eq!(text(&secret, ROOT_CERT_KEY), "");

    // A restart reuses it: a leaf of the first start verifies with the roots of the next.
    let (_, before) = leaf(&a, &web(&ns))?;
    let again =
        SecretCa::load(client.clone(), TRUST_DOMAIN, options(&ns)).await?.authority().borrow().clone();
    assert_eq!(again.root_pem(), a.root_pem());
    verify(again.roots(), &before)?;
    Ok(())
}

/// The acceptance: the controller deleted and recreated has the same root.
#[tokio::test]
async fn the_controller_recreated_keeps_its_root() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    let ns = namespace(&client, "ca-restart").await?;
    let kubeconfig = std::env::var_os(KUBECONFIG_ENV).context("kubeconfig")?;
    let config = Config {
        listen: "127.0.0.1:0".parse()?,
        kubernetes: Some(KubeAccess::File(kubeconfig.into())),
        ca_secret: options(&ns),
        ..Config::default()
    };
    let first = Controller::bind(&config).await?;
    let root = first.root_pem();
    drop(first);
    let second = Controller::bind(&config).await?;
    assert_eq!(second.root_pem(), root, "the same root after the controller is recreated");
    let secret = Api::<Secret>::namespaced(client.clone(), &ns).get(ISTIO_CA_SECRET).await?;
    assert_eq!(parse_pem_certs(&text(&secret, CA_CERT_KEY))?, parse_pem_certs(&root)?);
    Ok(())
}

#[tokio::test]
async fn cacerts_wins_and_leaves_chain_through_its_intermediate() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    let ns = namespace(&client, "ca-plugin").await?;
    let plug = PlugInCa::new(TRUST_DOMAIN, "plug");
    create_cacerts(&client, &ns, &plug).await?;

    let ca = SecretCa::load(client.clone(), TRUST_DOMAIN, options(&ns)).await?.authority().borrow().clone();
    let (chain, cert) = leaf(&ca, &web(&ns))?;
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(chain[1], plug.ca_cert, "the intermediate follows the leaf");
    assert_eq!(parse_pem_certs(&chain[2])?, parse_pem_certs(&plug.root_cert)?, "the root comes last");
    let root = RootBundle::from_pem(&plug.root_cert)?;
    verify(root.clone(), &cert)?;
    let without_intermediate = verify_presented(root, &cert, &[]);
    assert!(without_intermediate.is_err(), "the intermediate, not the root, signed the leaf");
    let absent = Api::<Secret>::namespaced(client.clone(), &ns).get_opt(ISTIO_CA_SECRET).await?;
    assert!(absent.is_none(), "no self-signed root is made beside cacerts");
    Ok(())
}

#[tokio::test]
async fn a_rotation_keeps_the_old_root_trusted_for_the_overlap() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    let ns = namespace(&client, "ca-rotate").await?;
    let mut secret_ca = SecretCa::load(client.clone(), TRUST_DOMAIN, options(&ns)).await?;
    let signer = secret_ca.authority();
    let old = signer.borrow().clone();
    let (_, old_leaf) = leaf(&old, &web(&ns))?;

    // The operator plugs in a new root: the next resync signs with it, and trusts both.
    let plug = PlugInCa::new(TRUST_DOMAIN, "next");
    create_cacerts(&client, &ns, &plug).await?;
    secret_ca.refresh().await?;
    let new = signer.borrow().clone();
    assert_eq!(new.roots().certs().len(), 2, "the new root and the old");
    assert_eq!(new.roots().certs()[0], parse_pem_certs(&plug.root_cert)?[0], "the new root first");
    let (chain, new_leaf) = leaf(&new, &web(&ns))?;
    assert_eq!(parse_pem_certs(chain.last().unwrap())?, new.roots().certs(), "chains carry both roots");
    assert_eq!(new_leaf.roots().certs(), new.roots().certs(), "workloads trust both");
    verify(new_leaf.roots().clone(), &old_leaf)?;
    verify(new_leaf.roots().clone(), &new_leaf)?;

    // Unchanged Secrets change nothing.
    secret_ca.refresh().await?;
    assert!(Arc::ptr_eq(&new, &signer.borrow()));

    // With no overlap, a dropped root goes at the resync after the change.
    let mut no_overlap = SecretCa::load(
        client.clone(),
        TRUST_DOMAIN,
        SecretOptions { overlap: Duration::ZERO, ..options(&ns) },
    )
    .await?;
    let signer = no_overlap.authority();
    Api::<Secret>::namespaced(client.clone(), &ns).delete(CACERTS_SECRET, &Default::default()).await?;
    no_overlap.refresh().await?;
    assert_eq!(signer.borrow().roots().certs().len(), 2, "back to istio-ca-secret, the plug-in root kept");
    no_overlap.refresh().await?;
    assert_eq!(signer.borrow().roots().certs(), old.roots().certs(), "the overlap is over");
    Ok(())
}

#[tokio::test]
async fn the_roots_are_published_in_every_namespace() -> anyhow::Result<()> {
    let Some(client) = kube_client().await else { return Ok(()) };
    let before = namespace(&client, "roots-before").await?;
    // A ConfigMap of that name someone made keeps its other keys.
    let theirs = ConfigMap {
        metadata: ObjectMeta { name: Some(ROOT_CONFIGMAP.to_owned()), ..ObjectMeta::default() },
        data: Some(BTreeMap::from([("note".to_owned(), "mine".to_owned())])),
        ..ConfigMap::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), &before).create(&PostParams::default(), &theirs).await?;

    let first = Arc::new(CertificateAuthority::generate(TRUST_DOMAIN)?);
    let (tx, rx) = watch::channel(first.clone());
    let publisher = tokio::spawn(root_configmap::run(client.clone(), rx));

    let roots_in = |ns: String, want: String| {
        let client = client.clone();
        async move {
            let cm = Api::<ConfigMap>::namespaced(client, &ns).get_opt(ROOT_CONFIGMAP).await?;
            let data = cm.as_ref().and_then(|cm| cm.data.clone()).unwrap_or_default();
            Ok((data.get("root-cert.pem") == Some(&want)).then_some(cm))
        }
    };
    let cm = eventually("the ConfigMap in a namespace made before", WAIT, || {
        roots_in(before.clone(), first.root_pem().to_owned())
    })
    .await?
    .unwrap();
    assert_eq!(cm.data.as_ref().unwrap()["note"], "mine");
    assert_eq!(cm.metadata.labels.as_ref().unwrap()["istio.io/config"], "true");

    let after = namespace(&client, "roots-after").await?;
    eventually("the ConfigMap in a namespace made after", WAIT, || {
        roots_in(after.clone(), first.root_pem().to_owned())
    })
    .await?;

    // Every namespace but Kubernetes' own.
    for ns in Api::<Namespace>::all(client.clone()).list(&Default::default()).await? {
        let name = ns.metadata.name.clone().unwrap();
        let terminating = ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
        if root_configmap::SKIPPED_NAMESPACES.contains(&name.as_str()) || terminating {
            continue;
        }
        eventually(&format!("the ConfigMap in {name}"), WAIT, || {
            roots_in(name.clone(), first.root_pem().to_owned())
        })
        .await?;
    }

    // New roots reach every namespace.
    let next = Arc::new(CertificateAuthority::generate(TRUST_DOMAIN)?.with_extra_roots(&first.roots()));
    tx.send_replace(next.clone());
    for ns in [&before, &after] {
        eventually("the new roots", WAIT, || roots_in(ns.clone(), next.root_pem().to_owned())).await?;
    }
    assert_eq!(parse_pem_certs(next.root_pem())?.len(), 2);
    publisher.abort();
    Ok(())
}
