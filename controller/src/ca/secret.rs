//! The CA's signing material in Kubernetes Secrets, where istiod keeps it, in the controller's
//! namespace: the plug-in `cacerts` (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
//! `cert-chain.pem`: an intermediate) wins when it exists; else the self-signed
//! `istio-ca-secret`, which the first controller to start creates (create semantics: a replica
//! that loses the race reads the winner's) and every later start reuses. Both are re-read every
//! [`SecretOptions::resync`]: a change swaps the signer without a restart.
//!
//! Trust bundle: `root-cert.pem` when it holds certificates (every one of them is trusted, so an
//! operator rotating a root puts old and new in it, Istio's procedure), else `ca-cert.pem`. And like
//! Istio's self-signed root rotator, which appends the old root to the new one's bundle, a change
//! that drops a root keeps it trusted (published and sent with every chain) for
//! [`SecretOptions::overlap`] more, so leaves it signed stay valid. That memory is this process's
//! only: a rotation that must survive restarts keeps both roots in `root-cert.pem`.
//!
//! Never edits or deletes a Secret; the only write is the one-time creation of `istio-ca-secret`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use weft_core::tls::{CertificateAuthority, IssueError, RootBundle};

use super::CaError;

/// The plug-in CA Secret (an operator's intermediate); wins over [`ISTIO_CA_SECRET`].
pub const CACERTS_SECRET: &str = "cacerts";
/// The self-signed CA Secret the controller creates when there is no [`CACERTS_SECRET`].
pub const ISTIO_CA_SECRET: &str = "istio-ca-secret";
/// The type of the Secret the controller creates (istiod's).
pub const CA_SECRET_TYPE: &str = "istio.io/ca-root";
/// The signing certificate.
pub const CA_CERT_KEY: &str = "ca-cert.pem";
/// The signing certificate's private key (PKCS#8 PEM).
pub const CA_KEY_KEY: &str = "ca-key.pem";
/// The certificates between the signing certificate and a root (the root may be included).
pub const CERT_CHAIN_KEY: &str = "cert-chain.pem";
/// The trusted roots, one or more.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";

/// Where the CA's Secrets are and how often they are re-read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SecretOptions {
    /// The namespace of `cacerts` and `istio-ca-secret` (the controller's own).
    pub namespace: String,
    /// Both Secrets are read again this often.
    pub resync: Duration,
    /// A root a change dropped stays trusted this long.
    pub overlap: Duration,
}

impl Default for SecretOptions {
    fn default() -> Self {
        SecretOptions {
            namespace: crate::config::DEFAULT_CA_SECRET_NAMESPACE.to_owned(),
            resync: Duration::from_secs(10),
            // The longest a leaf lives unless --max-cert-lifetime says otherwise.
            overlap: super::DEFAULT_MAX_CERT_LIFETIME,
        }
    }
}

/// The Secret the material was read from and the keys that matter, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    pub namespace: String,
    pub name: String,
    /// `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem` (those present).
    data: BTreeMap<&'static str, Vec<u8>>,
}

impl Material {
    /// The material of a Secret named `name` in `namespace` holding `data`.
    pub fn new(namespace: &str, name: &str, data: &BTreeMap<String, ByteString>) -> Material {
        let data = [CA_CERT_KEY, CA_KEY_KEY, CERT_CHAIN_KEY, ROOT_CERT_KEY]
            .into_iter()
            .filter_map(|key| data.get(key).map(|value| (key, value.0.clone())))
            .collect();
        Material { namespace: namespace.to_owned(), name: name.to_owned(), data }
    }

    /// The CA this material makes: signs with `ca-cert.pem` and `ca-key.pem`, presents
    /// `cert-chain.pem`'s intermediates, trusts `root-cert.pem` (required in `cacerts`; when empty
    /// in `istio-ca-secret`, `ca-cert.pem` is the root). Errors name the Secret and the key.
    pub fn authority(&self, trust_domain: &str) -> Result<CertificateAuthority, CaError> {
        let cert = self.text(CA_CERT_KEY, true)?;
        let key = self.text(CA_KEY_KEY, true)?;
        let chain = self.text(CERT_CHAIN_KEY, false)?;
        let roots = self.text(ROOT_CERT_KEY, self.name == CACERTS_SECRET)?;
        let roots = if roots.trim().is_empty() { cert } else { roots };
        CertificateAuthority::from_intermediate_pem(trust_domain, cert, key, chain, roots).map_err(|e| {
            let (key, reason) = match e {
                IssueError::RootCert(reason) => (CA_CERT_KEY, reason),
                IssueError::RootKey(reason) => (CA_KEY_KEY, reason),
                IssueError::KeyMismatch => (CA_KEY_KEY, format!("the key is not {CA_CERT_KEY}'s")),
                IssueError::Chain(reason) => (CERT_CHAIN_KEY, reason),
                IssueError::Roots(reason) => (ROOT_CERT_KEY, reason),
                IssueError::Untrusted(reason) => (
                    CA_CERT_KEY,
                    format!(
                        "it does not lead to a root of {ROOT_CERT_KEY}: {reason} (put the missing \
                         intermediates in {CERT_CHAIN_KEY}, or the root in {ROOT_CERT_KEY})"
                    ),
                ),
                other => (CA_CERT_KEY, other.to_string()),
            };
            self.error(key, reason)
        })
    }

    /// The value of `key` as text; absent is `""` unless `required`.
    fn text(&self, key: &'static str, required: bool) -> Result<&str, CaError> {
        match self.data.get(key) {
            None if required => Err(self.error(key, "the key is missing".into())),
            None => Ok(""),
            Some(bytes) => {
                std::str::from_utf8(bytes).map_err(|_| self.error(key, "it is not UTF-8 text (PEM)".into()))
            }
        }
    }

    fn error(&self, key: &'static str, reason: String) -> CaError {
        CaError::SecretKey { namespace: self.namespace.clone(), name: self.name.clone(), key, reason }
    }
}

/// The Secret `istio-ca-secret` for a new self-signed root, as istiod writes it.
pub fn self_signed_secret(ca: &CertificateAuthority) -> Secret {
    let data =
        [(CA_CERT_KEY, ca.cert_pem()), (CA_KEY_KEY, ca.key_pem()), (CERT_CHAIN_KEY, ""), (ROOT_CERT_KEY, "")]
            .into_iter()
            .map(|(key, value)| (key.to_owned(), ByteString(value.as_bytes().to_vec())))
            .collect();
    Secret {
        metadata: ObjectMeta { name: Some(ISTIO_CA_SECRET.to_owned()), ..ObjectMeta::default() },
        type_: Some(CA_SECRET_TYPE.to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Reads the CA's Secrets in one namespace, creating `istio-ca-secret` when neither exists.
#[derive(Clone)]
struct Store {
    secrets: Api<Secret>,
    namespace: String,
    trust_domain: String,
}

impl Store {
    /// The material in use now: `cacerts`, else `istio-ca-secret` (created when absent).
    async fn read(&self) -> Result<Material, CaError> {
        if let Some(secret) = self.get(CACERTS_SECRET).await? {
            return Ok(self.material(CACERTS_SECRET, &secret));
        }
        if let Some(secret) = self.get(ISTIO_CA_SECRET).await? {
            return Ok(self.material(ISTIO_CA_SECRET, &secret));
        }
        let ca = CertificateAuthority::generate(&self.trust_domain).map_err(CaError::Generate)?;
        match self.secrets.create(&PostParams::default(), &self_signed_secret(&ca)).await {
            Ok(secret) => {
                tracing::info!(
                    namespace = %self.namespace,
                    secret = ISTIO_CA_SECRET,
                    trust_domain = %self.trust_domain,
                    "created a new self-signed CA root"
                );
                Ok(self.material(ISTIO_CA_SECRET, &secret))
            }
            // Another replica created it first: use its root.
            Err(kube::Error::Api(status)) if status.code == 409 => match self.get(ISTIO_CA_SECRET).await? {
                Some(secret) => Ok(self.material(ISTIO_CA_SECRET, &secret)),
                None => Err(self.api_error("read", ISTIO_CA_SECRET, "it was created, then deleted".into())),
            },
            Err(e) => Err(self.api_error("create", ISTIO_CA_SECRET, e.to_string())),
        }
    }

    async fn get(&self, name: &'static str) -> Result<Option<Secret>, CaError> {
        self.secrets.get_opt(name).await.map_err(|e| self.api_error("read", name, e.to_string()))
    }

    fn material(&self, name: &str, secret: &Secret) -> Material {
        Material::new(&self.namespace, name, secret.data.as_ref().unwrap_or(&BTreeMap::new()))
    }

    fn api_error(&self, action: &'static str, name: &'static str, reason: String) -> CaError {
        CaError::SecretApi { action, namespace: self.namespace.clone(), name, reason }
    }
}

/// The CA kept in Secrets: the current signer (see [`Self::authority`]) and the loop that
/// follows the Secrets ([`Self::run`]).
pub struct SecretCa {
    store: Store,
    options: SecretOptions,
    material: Material,
    /// The roots `material` itself trusts (without the retired ones).
    own_roots: RootBundle,
    /// Roots a change dropped, trusted until the instant given.
    retired: Vec<(CertificateDer<'static>, Instant)>,
    tx: watch::Sender<Arc<CertificateAuthority>>,
}

impl SecretCa {
    /// Reads (or, in an empty namespace, creates) the CA's Secret and loads the signer; an
    /// unusable Secret is an error naming it and the key.
    pub async fn load(
        client: Client,
        trust_domain: &str,
        options: SecretOptions,
    ) -> Result<SecretCa, CaError> {
        weft_core::identity::validate_trust_domain(trust_domain)
            .map_err(|e| CaError::TrustDomain { trust_domain: trust_domain.to_owned(), source: e })?;
        let store = Store {
            secrets: Api::namespaced(client, &options.namespace),
            namespace: options.namespace.clone(),
            trust_domain: trust_domain.to_owned(),
        };
        let material = store.read().await?;
        let ca = material.authority(trust_domain)?;
        tracing::info!(
            namespace = %material.namespace,
            secret = %material.name,
            roots = ca.roots().certs().len(),
            intermediates = ca.chain_pem().len(),
            "loaded the CA"
        );
        let own_roots = ca.roots();
        let (tx, _) = watch::channel(Arc::new(ca));
        Ok(SecretCa { store, options, material, own_roots, retired: Vec::new(), tx })
    }

    /// The signer now and after every change.
    pub fn authority(&self) -> watch::Receiver<Arc<CertificateAuthority>> {
        self.tx.subscribe()
    }

    /// Re-reads the Secrets every [`SecretOptions::resync`] until dropped. A change loads the
    /// new signer (keeping dropped roots for the overlap); a Secret that became unusable is
    /// logged and the last good signer kept.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval_at(Instant::now() + self.options.resync, self.options.resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            match self.refresh().await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    tracing::error!(error = %e, "cannot reload the CA; still signing with the last good one");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }

    /// One resync: reads the Secrets and publishes a new signer if they (or the retired roots)
    /// changed.
    pub async fn refresh(&mut self) -> Result<(), CaError> {
        let now = Instant::now();
        let before = self.retired.len();
        self.retired.retain(|(_, until)| *until > now);
        let expired = self.retired.len() != before;
        let material = self.store.read().await?;
        if material == self.material && !expired {
            return Ok(());
        }
        let ca = material.authority(&self.store.trust_domain)?;
        let new_roots = ca.roots();
        // Only the roots the last material trusted itself start an overlap: a retired root whose
        // overlap ended is not retired again.
        for root in self.own_roots.certs() {
            let kept = self.retired.iter().any(|(r, _)| r == root);
            if !new_roots.certs().contains(root) && !kept {
                self.retired.push((root.clone(), now + self.options.overlap));
            }
        }
        self.retired.retain(|(root, _)| !new_roots.certs().contains(root));
        let retired = RootBundle::new(self.retired.iter().map(|(root, _)| root.clone()).collect());
        let ca = ca.with_extra_roots(&retired);
        tracing::info!(
            namespace = %material.namespace,
            secret = %material.name,
            roots = ca.roots().certs().len(),
            kept_from_before = retired.certs().len(),
            overlap_secs = self.options.overlap.as_secs(),
            "the CA changed; signing with the new material"
        );
        self.material = material;
        self.own_roots = new_roots;
        self.tx.send_replace(Arc::new(ca));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use weft_core::testing::PlugInCa;
    use weft_core::tls::parse_pem_certs;

    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect()
    }

    fn plug_in(plug: &PlugInCa) -> Material {
        Material::new(
            "istio-system",
            CACERTS_SECRET,
            &data(&[
                (CA_CERT_KEY, &plug.ca_cert),
                (CA_KEY_KEY, &plug.ca_key),
                (CERT_CHAIN_KEY, &plug.cert_chain),
                (ROOT_CERT_KEY, &plug.root_cert),
            ]),
        )
    }

    #[test]
    fn a_self_signed_secret_round_trips() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let secret = self_signed_secret(&ca);
        assert_eq!(secret.type_.as_deref(), Some(CA_SECRET_TYPE));
        let material = Material::new("weft-system", ISTIO_CA_SECRET, secret.data.as_ref().unwrap());
        let loaded = material.authority("cluster.local").unwrap();
        assert_eq!(loaded.roots().certs(), ca.roots().certs());
        assert!(loaded.chain_pem().is_empty(), "a root signs directly");
        assert_eq!(loaded.key_pem(), ca.key_pem());
    }

    #[test]
    fn cacerts_signs_as_the_intermediate() {
        let plug = PlugInCa::new("cluster.local", "plug");
        let ca = plug_in(&plug).authority("cluster.local").unwrap();
        assert_eq!(ca.chain_pem(), std::slice::from_ref(&plug.ca_cert));
        assert_eq!(ca.roots().certs(), parse_pem_certs(&plug.root_cert).unwrap());
    }

    #[test]
    fn errors_name_the_secret_and_the_key() {
        let plug = PlugInCa::new("cluster.local", "plug");
        let other = PlugInCa::new("cluster.local", "other");
        let full = [
            (CA_CERT_KEY, plug.ca_cert.as_str()),
            (CA_KEY_KEY, plug.ca_key.as_str()),
            (CERT_CHAIN_KEY, plug.cert_chain.as_str()),
            (ROOT_CERT_KEY, plug.root_cert.as_str()),
        ];
        let with = |key: &str, value: Option<&str>| {
            let pairs: Vec<(&str, &str)> = full
                .iter()
                .filter_map(|(k, v)| if *k == key { value.map(|value| (*k, value)) } else { Some((*k, *v)) })
                .collect();
            Material::new("istio-system", CACERTS_SECRET, &data(&pairs))
                .authority("cluster.local")
                .unwrap_err()
                .to_string()
        };
        let cases: &[(&str, Option<&str>, &str, &str)] = &[
            (CA_KEY_KEY, Some(&other.ca_key), CA_KEY_KEY, "is not ca-cert.pem's"),
            (CA_KEY_KEY, None, CA_KEY_KEY, "missing"),
            (CA_CERT_KEY, None, CA_CERT_KEY, "missing"),
            (CA_CERT_KEY, Some("junk"), CA_CERT_KEY, "CERTIFICATE"),
            (ROOT_CERT_KEY, None, ROOT_CERT_KEY, "missing"),
            (ROOT_CERT_KEY, Some(&other.root_cert), CA_CERT_KEY, "does not lead to a root"),
            (
                CERT_CHAIN_KEY,
                Some("-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n"),
                CERT_CHAIN_KEY,
                "",
            ),
        ];
        for (key, value, named, fragment) in cases {
            let msg = with(key, *value);
            assert!(
                msg.contains(&format!("Secret istio-system/cacerts, key {named}")),
                "{key}={value:?}: {msg}"
            );
            assert!(msg.contains(fragment), "{key}={value:?}: {msg}");
        }
        // istio-ca-secret without root-cert.pem is its own root; cacerts is not.
        let own = Material::new(
            "ns",
            ISTIO_CA_SECRET,
            &data(&[(CA_CERT_KEY, &plug.root_cert), (CA_KEY_KEY, &plug.root_key)]),
        );
        own.authority("cluster.local").unwrap();
        let bad = Material::new("ns", ISTIO_CA_SECRET, &data(&[(CA_CERT_KEY, &plug.root_cert)]));
        let msg = bad.authority("cluster.local").unwrap_err().to_string();
        assert!(msg.contains("Secret ns/istio-ca-secret, key ca-key.pem"), "{msg}");
        let binary = Material::new(
            "ns",
            ISTIO_CA_SECRET,
            &BTreeMap::from([(CA_CERT_KEY.to_owned(), ByteString(vec![0xff, 0xfe]))]),
        );
        let msg = binary.authority("cluster.local").unwrap_err().to_string();
        assert!(msg.contains("key ca-cert.pem") && msg.contains("UTF-8"), "{msg}");
    }
}
