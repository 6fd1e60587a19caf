//! Workload certificates and the mutual-TLS configuration HBONE uses: certificates with one
//! SPIFFE URI SAN, root bundles, and rustls verifiers that check chain, validity and identity.
//! Knows nothing of the CA's protocol or of how certificates are obtained.

mod issue;
mod verify;

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::ClientHello;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::{Identity, IdentityError};

pub use issue::{
    generate_csr, CertificateAuthority, CsrError, IssueError, ServingCertificate, SignedRequest,
};
pub use verify::{ClientIdentityVerifier, PeerError, ServerIdentityVerifier, Timestamp};

/// ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Default lifetime of a workload certificate (Istio's default).
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// Why certificate material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no PEM {0} found")]
    NoPem(&'static str),
    #[error("malformed PEM: {0}")]
    Pem(String),
    #[error("certificate is not valid X.509: {0}")]
    X509(String),
    #[error("certificate must have exactly one URI SAN, found {0}")]
    SanCount(usize),
    #[error("certificate's URI SAN is not a SPIFFE identity: {0}")]
    SanIdentity(#[from] IdentityError),
    #[error("private key is unusable: {0}")]
    Key(rustls::Error),
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// The roots a peer's chain must lead to. More than one root is allowed so that a root can be
/// rotated: old and new are trusted side by side while leaves move over.
#[derive(Clone, Default)]
pub struct RootBundle {
    certs: Vec<CertificateDer<'static>>,
}

impl RootBundle {
    pub fn new(certs: Vec<CertificateDer<'static>>) -> Self {
        RootBundle { certs }
    }

    /// Reads every certificate in a PEM document.
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let certs = parse_pem_certs(pem)?;
        if certs.is_empty() {
            return Err(TlsError::NoPem("CERTIFICATE"));
        }
        Ok(RootBundle { certs })
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// This bundle with `other`'s roots added (duplicates dropped).
    pub fn merged(&self, other: &RootBundle) -> RootBundle {
        let mut certs = self.certs.clone();
        for cert in &other.certs {
            if !certs.contains(cert) {
                certs.push(cert.clone());
            }
        }
        RootBundle { certs }
    }

    pub fn to_pem(&self) -> String {
        self.certs.iter().map(|c| der_to_pem("CERTIFICATE", c)).collect()
    }
}

impl fmt::Debug for RootBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootBundle({} roots)", self.certs.len())
    }
}

/// A workload's certificate, its private key, and the roots it trusts.
pub struct WorkloadCertificate {
    identity: Identity,
    /// Leaf first, then intermediates; never the root.
    chain: Vec<CertificateDer<'static>>,
    roots: RootBundle,
    not_before: SystemTime,
    not_after: SystemTime,
    key: Arc<CertifiedKey>,
    server_config: OnceLock<Arc<ServerConfig>>,
    /// Checks peers' chains against `roots` for every handshake made with this certificate.
    chains: OnceLock<Arc<verify::ChainVerifier>>,
}

impl WorkloadCertificate {
    /// Builds a workload certificate from a CA's answer: `chain` is leaf first; the self-signed
    /// certificates at its end are taken as roots (Istio's CA sends every root of its bundle
    /// last, several during a rotation) and added to `extra_roots`.
    pub fn from_pem(key_pem: &str, chain_pem: &[String], extra_roots: &RootBundle) -> Result<Self, TlsError> {
        let mut chain = Vec::new();
        for pem in chain_pem {
            chain.extend(parse_pem_certs(pem)?);
        }
        let mut trailing_roots = Vec::new();
        while chain.len() > 1 {
            match chain.last() {
                Some(last) if is_self_signed(last)? => trailing_roots.extend(chain.pop()),
                _ => break,
            }
        }
        trailing_roots.reverse();
        let roots = extra_roots.merged(&RootBundle::new(trailing_roots));
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(e.to_string()))?
            .ok_or(TlsError::NoPem("PRIVATE KEY"))?;
        Self::new(chain, key, roots)
    }

    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootBundle,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoPem("CERTIFICATE"))?;
        let info = CertInfo::parse(leaf)?;
        let signing_key = provider().key_provider.load_private_key(key).map_err(TlsError::Key)?;
        let key = Arc::new(CertifiedKey::new(chain.clone(), signing_key));
        key.keys_match().map_err(TlsError::Key)?;
        Ok(WorkloadCertificate {
            identity: info.identity,
            chain,
            roots,
            not_before: info.not_before,
            not_after: info.not_after,
            key,
            server_config: OnceLock::new(),
            chains: OnceLock::new(),
        })
    }

    /// The same certificate and key, trusting `roots` instead (e.g. after a root rotation).
    pub fn with_roots(self, roots: RootBundle) -> Self {
        WorkloadCertificate { roots, server_config: OnceLock::new(), chains: OnceLock::new(), ..self }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn roots(&self) -> &RootBundle {
        &self.roots
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial-independent fingerprint for logs and dumps: its DER bytes' length and
    /// validity window are not unique, so compare certificates by [`Self::chain`] instead.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    fn chains(&self) -> Arc<verify::ChainVerifier> {
        self.chains.get_or_init(|| verify::ChainVerifier::new(&self.roots)).clone()
    }

    /// Server side of HBONE: presents this certificate, requires a client certificate from the
    /// same trust domain chaining to one of our roots. Built once per certificate.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config
            .get_or_init(|| {
                let verifier = Arc::new(ClientIdentityVerifier::with_chain(
                    self.chains(),
                    self.identity.trust_domain().to_owned(),
                ));
                let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    // Invariant: the provider and TLS 1.3 are a valid pair (checked by tests).
                    .expect("TLS 1.3 with the ring provider is supported")
                    .with_client_cert_verifier(verifier)
                    .with_cert_resolver(Arc::new(Resolver(self.key.clone())));
                config.alpn_protocols = vec![ALPN_H2.to_vec()];
                config.send_tls13_tickets = 0;
                Arc::new(config)
            })
            .clone()
    }

    /// Client side of HBONE: presents this certificate and accepts a server only if it chains
    /// to one of our roots and presents one of `expected`.
    pub fn client_config(&self, expected: Vec<Identity>) -> Arc<ClientConfig> {
        let verifier = Arc::new(ServerIdentityVerifier::with_chain(self.chains(), expected));
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            // Invariant: as in server_config.
            .expect("TLS 1.3 with the ring provider is supported")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Resolver(self.key.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.enable_sni = false;
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("roots", &self.roots)
            .finish()
    }
}

/// The crypto Weft's TLS uses: TLS 1.3 with AES-256-GCM and AES-128-GCM (what Istio's ztunnel
/// offers), X25519 and P-256 key exchange.
pub fn provider() -> CryptoProvider {
    use rustls::crypto::ring::{cipher_suite, default_provider, kx_group};
    CryptoProvider {
        cipher_suites: vec![cipher_suite::TLS13_AES_256_GCM_SHA384, cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1],
        ..default_provider()
    }
}

/// A rustls error in words: the verifier's own explanation when it refused the peer's
/// certificate (rustls would print that one as a debug dump), else rustls's message.
pub fn describe(err: &rustls::Error) -> String {
    match PeerError::find(err) {
        Some(peer) => peer.to_string(),
        None => err.to_string(),
    }
}

/// What Weft reads from a certificate: its SPIFFE identity and validity window.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub identity: Identity,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertInfo {
    /// Parses a leaf; it must carry exactly one URI SAN and that SAN must be a SPIFFE identity.
    pub fn parse(der: &CertificateDer<'_>) -> Result<CertInfo, TlsError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::X509(e.to_string()))?;
        let uris = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(TlsError::X509(e.to_string())),
        };
        let [uri] = uris[..] else {
            return Err(TlsError::SanCount(uris.len()));
        };
        let validity = cert.validity();
        Ok(CertInfo {
            identity: uri.parse()?,
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
        })
    }
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

fn is_self_signed(der: &CertificateDer<'_>) -> Result<bool, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::X509(e.to_string()))?;
    Ok(cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok())
}

/// All certificates in a PEM document, in order.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))
}

/// PEM-encodes one DER object (LF line endings, as rcgen and openssl write PEM).
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der.to_vec()), config)
}

/// Always presents the one certificate it holds (client and server side).
#[derive(Debug)]
struct Resolver(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
