//! TLS on the controller's gRPC port, as istiod serves 15012: a server certificate the
//! controller issues itself from the mesh CA for the names proxies dial (its Service's DNS
//! names, `istiod.istio-system.svc` for Istio's ztunnel, configured IPs), renewed at half life;
//! TLS 1.3 only, ALPN h2, no client certificate (callers authenticate with their tokens).
//! Owns the certificate and the rustls configuration, not the gRPC server.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use serde::Serialize;
use tokio::sync::watch;
use weft_core::tls::{parse_pem_certs, provider, CertificateAuthority, IssueError, ALPN_H2};

/// How long a serving certificate is valid; it is renewed at half that.
pub const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// The names in the serving certificate when none are configured: the chart's Service in its
/// default namespace, and the address Istio's ztunnel dials by default.
pub const DEFAULT_DNS_NAMES: [&str; 2] = ["weft-controller.weft-system.svc", "istiod.istio-system.svc"];

/// The names the serving certificate carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

/// The controller's current serving certificate, swapped in place on renewal.
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
    names: ServingNames,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert").field("names", &self.names).finish_non_exhaustive()
    }
}

/// Why a serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("cannot issue the controller's serving certificate for {names}: {source}")]
    Issue { names: String, source: Box<IssueError> },
    #[error("the controller's serving certificate is unusable: {0}")]
    Unusable(String),
}

impl ServingCert {
    /// Issues the first certificate.
    pub fn issue(ca: &CertificateAuthority, names: ServingNames) -> Result<Arc<ServingCert>, ServingError> {
        let key = certified_key(ca, &names)?;
        Ok(Arc::new(ServingCert { current: RwLock::new(key), names }))
    }

    /// Replaces the certificate with a fresh one from `ca` (e.g. after a root rotation).
    pub fn renew(&self, ca: &CertificateAuthority) -> Result<(), ServingError> {
        let key = certified_key(ca, &self.names)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }

    /// The server side of the gRPC port: TLS 1.3, ALPN h2, this certificate (as renewed).
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            // Invariant: the provider and TLS 1.3 are a valid pair (weft-core's tests check it).
            .expect("TLS 1.3 with the ring provider is supported")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(config)
    }

    /// Renews at half life, and at once when the signer changes (a new root or intermediate),
    /// for as long as the process runs.
    pub async fn renew_periodically(self: Arc<Self>, mut signer: watch::Receiver<Arc<CertificateAuthority>>) {
        let mut signer_open = true;
        loop {
            tokio::select! {
                () = tokio::time::sleep(SERVING_CERT_LIFETIME / 2) => {}
                changed = signer.changed(), if signer_open => {
                    if changed.is_err() {
                        // The signer's source stopped: renew on the timer from the last one.
                        signer_open = false;
                        continue;
                    }
                }
            }
            let ca = signer.borrow_and_update().clone();
            match self.renew(&ca) {
                Ok(()) => tracing::info!(names = ?self.names, "renewed the serving certificate"),
                Err(e) => tracing::error!(error = %e, "keeping the current serving certificate"),
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn certified_key(ca: &CertificateAuthority, names: &ServingNames) -> Result<Arc<CertifiedKey>, ServingError> {
    let issued = ca
        .issue_serving(&names.dns, &names.ips, SERVING_CERT_LIFETIME)
        .map_err(|source| ServingError::Issue { names: format!("{names:?}"), source: Box::new(source) })?;
    let unusable = |e: &dyn fmt::Display| ServingError::Unusable(e.to_string());
    let mut chain = Vec::new();
    for pem in &issued.chain_pem {
        chain.extend(parse_pem_certs(pem).map_err(|e| unusable(&e))?);
    }
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).map_err(|e| unusable(&e))?;
    let key = provider().key_provider.load_private_key(key).map_err(|e| unusable(&e))?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}
