//! Issuing workload certificates: a signing CA (a self-signed root, or an intermediate whose chain
//! leads to a trusted root), CSR generation for clients, and the CSR checks every signing request
//! must pass. The CA service (controller) decides *who* may
//! have an identity; this module only decides what a well-formed request and certificate are.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::FromDer;

use super::{parse_pem_certs, RootBundle, TlsError, WorkloadCertificate};
use crate::identity::{validate_trust_domain, Identity, IdentityError};

/// How long a generated root is valid (Istio's self-signed root: 10 years).
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// No leaf lives longer than its root could.
const MAX_LEAF_LIFETIME: Duration = ROOT_LIFETIME;
/// Leaves start slightly in the past so that small clock skew between nodes does not reject
/// them: a minute, or a quarter of a short lifetime.
fn backdate(lifetime: Duration) -> Duration {
    Duration::from_secs(60).min(lifetime / 4)
}

/// Why a CSR was refused. Each variant says what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("CSR is not a PEM \"CERTIFICATE REQUEST\" block")]
    NotPem,
    #[error("CSR is not a valid PKCS#10 request: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify with its own public key")]
    BadSignature,
    #[error("CSR key must be ECDSA P-256 with SHA-256, found {0}")]
    KeyAlgorithm(String),
    #[error("CSR must carry exactly one SAN, a SPIFFE URI; found {0}")]
    Sans(String),
    #[error("CSR's URI SAN is not a SPIFFE identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("CSR asks for trust domain {got:?}, this CA signs only {want:?}")]
    TrustDomain { got: String, want: String },
}

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("CA root certificate is unusable: {0}")]
    RootCert(String),
    #[error("CA root key is unusable: {0}")]
    RootKey(String),
    #[error("CA root key does not belong to the root certificate")]
    KeyMismatch,
    #[error("CA certificate chain is unusable: {0}")]
    Chain(String),
    #[error("CA trust bundle is unusable: {0}")]
    Roots(String),
    #[error("the CA certificate does not lead to a trusted root: {0}")]
    Untrusted(String),
    #[error(transparent)]
    TrustDomain(#[from] IdentityError),
    #[error("requested validity is out of range: {0}")]
    Validity(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A CSR that passed every check: who it is for and the key to certify.
#[derive(Debug)]
pub struct SignedRequest {
    pub identity: Identity,
    params: CertificateSigningRequestParams,
}

/// Signs workload certificates for one trust domain: a self-signed root, or (Istio's plug-in CA)
/// an intermediate whose chain leads to one of the trusted roots. The trust bundle may hold more
/// roots than the one the signer chains to, so that a root can be rotated.
pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, PEM (the root itself when self-signed).
    cert_pem: String,
    key_pem: String,
    /// The certificates between a leaf and a root, the signing certificate first; empty when the
    /// signer is a root. PEM, one certificate each.
    chain: Vec<String>,
    /// Every trusted root.
    roots: RootBundle,
    /// `roots` as PEM (for a single root as it was loaded, byte for byte).
    roots_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new root for `trust_domain` (organization = trust domain, as Istio's self-signed root).
    pub fn generate(trust_domain: &str) -> Result<Self, IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = (now - backdate(ROOT_LIFETIME)).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let root_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Self::from_pem(trust_domain, &root_pem, &key_pem)
    }

    /// A root loaded from its PEM certificate and PKCS#8 key (as written by [`Self::generate`]).
    /// The key must be the certificate's.
    pub fn from_pem(trust_domain: &str, root_pem: &str, key_pem: &str) -> Result<Self, IssueError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| IssueError::RootKey(e.to_string()))?;
        let root = parse_pem_certs(root_pem)
            .map_err(|e| IssueError::RootCert(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| IssueError::RootCert("no PEM \"CERTIFICATE\" block".into()))?;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&root)
            .map_err(|e| IssueError::RootCert(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(IssueError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&root, key).map_err(|e| IssueError::RootCert(e.to_string()))?;
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_owned(),
            issuer,
            cert_pem: root_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            chain: Vec::new(),
            roots: RootBundle::new(vec![root]),
            roots_pem: root_pem.to_owned(),
        })
    }

    /// A CA signing with `cert_pem` (a CA certificate) and its PKCS#8 `key_pem`, trusting the
    /// roots in `roots_pem` (one or more): Istio's plug-in CA (`ca-cert.pem`, `ca-key.pem`,
    /// `cert-chain.pem`, `root-cert.pem`). `chain_pem` holds the certificates between the signing
    /// certificate and a root in any order; the signing certificate and roots in it are ignored,
    /// so each of Istio's conventions (`ca-cert.pem` alone, or followed by the root) works.
    /// The signing certificate must lead through them to one of the roots; it may be a root
    /// itself. Issued chains are the leaf, the signing certificate and intermediates, then every
    /// root.
    pub fn from_intermediate_pem(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        chain_pem: &str,
        roots_pem: &str,
    ) -> Result<Self, IssueError> {
        validate_trust_domain(trust_domain)?;
        let cert = parse_pem_certs(cert_pem)
            .map_err(|e| IssueError::RootCert(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| IssueError::RootCert("no PEM \"CERTIFICATE\" block".into()))?;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&cert)
            .map_err(|e| IssueError::RootCert(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(IssueError::RootCert("it is not a CA certificate (basicConstraints CA:TRUE)".into()));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| IssueError::RootKey(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(IssueError::KeyMismatch);
        }
        let pool = parse_pem_certs(chain_pem).map_err(|e| IssueError::Chain(e.to_string()))?;
        let roots = RootBundle::from_pem(roots_pem).map_err(|e| IssueError::Roots(e.to_string()))?;
        let above = path_to_root(&cert, &pool, roots.certs())?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| IssueError::RootCert(e.to_string()))?;
        let is_root = roots.certs().contains(&cert);
        let chain = if is_root {
            Vec::new()
        } else {
            std::iter::once(&cert).chain(&above).map(|c| super::der_to_pem("CERTIFICATE", c)).collect()
        };
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_owned(),
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            chain,
            roots_pem: roots.to_pem(),
            roots,
        })
    }

    /// The same CA trusting `extra` roots too (kept after a rotation so that leaves of the old
    /// root stay valid).
    pub fn with_extra_roots(mut self, extra: &RootBundle) -> Self {
        let merged = self.roots.merged(extra);
        if merged.certs().len() != self.roots.certs().len() {
            self.roots_pem = merged.to_pem();
            self.roots = merged;
        }
        self
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Every trusted root, PEM: what workloads must trust, and the last element of issued chains.
    pub fn root_pem(&self) -> &str {
        &self.roots_pem
    }

    /// The signing certificate, PEM (the root itself when self-signed).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The certificates between a leaf and a root, the signing certificate first; empty when the
    /// signer is a root.
    pub fn chain_pem(&self) -> &[String] {
        &self.chain
    }

    /// Every trusted root.
    pub fn roots(&self) -> RootBundle {
        self.roots.clone()
    }

    /// Parses and checks a PEM CSR: well-formed, self-signature valid, ECDSA P-256, exactly one
    /// SAN which is a SPIFFE URI in this CA's trust domain.
    pub fn check_csr(&self, pem: &str) -> Result<SignedRequest, CsrError> {
        let block = pem::parse(pem).map_err(|_| CsrError::NotPem)?;
        if block.tag() != "CERTIFICATE REQUEST" {
            return Err(CsrError::NotPem);
        }
        let der = block.contents();
        let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        parsed.verify_signature().map_err(|_| CsrError::BadSignature)?;
        let params = CertificateSigningRequestParams::from_der(&der.to_vec().into())
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if params.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CsrError::KeyAlgorithm(format!("{:?}", params.public_key.algorithm())));
        }
        let identity: Identity = match &params.params.subject_alt_names[..] {
            [SanType::URI(uri)] => uri.as_str().parse()?,
            sans => return Err(CsrError::Sans(format!("{sans:?}"))),
        };
        if identity.trust_domain() != self.trust_domain {
            return Err(CsrError::TrustDomain {
                got: identity.trust_domain().to_owned(),
                want: self.trust_domain.clone(),
            });
        }
        Ok(SignedRequest { identity, params })
    }

    /// Signs a checked request: a leaf valid for `lifetime` from now, with exactly the SPIFFE URI
    /// SAN and nothing else the CSR asked for. Returns the chain PEMs as Istio's CA does: the leaf,
    /// the intermediates (one each), then every trusted root in one last element.
    pub fn sign(&self, request: &SignedRequest, lifetime: Duration) -> Result<Vec<String>, IssueError> {
        if lifetime > MAX_LEAF_LIFETIME {
            return Err(IssueError::Validity(format!(
                "lifetime {}s is longer than the {}s any leaf may have",
                lifetime.as_secs(),
                MAX_LEAF_LIFETIME.as_secs()
            )));
        }
        let now = SystemTime::now();
        self.sign_window(
            &request.identity,
            &request.params.public_key,
            now - backdate(lifetime),
            now + lifetime,
        )
    }

    /// Generates a key and a certificate for `identity` valid from `not_before` to `not_after`,
    /// bypassing CSRs; for the local demo and tests (including deliberately expired certificates).
    pub fn issue(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let chain = self.sign_window(identity, &key, not_before, not_after)?;
        Ok(WorkloadCertificate::from_pem(&key.serialize_pem(), &chain, &RootBundle::default())?)
    }

    /// What every issued chain is: the leaf, the intermediates, then the roots (one PEM element).
    fn chain_from(&self, leaf_pem: String) -> Vec<String> {
        let mut chain = Vec::with_capacity(self.chain.len() + 2);
        chain.push(leaf_pem);
        chain.extend(self.chain.iter().cloned());
        chain.push(self.roots_pem.clone());
        chain
    }

    fn sign_window(
        &self,
        identity: &Identity,
        public_key: &impl rcgen::PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<String>, IssueError> {
        if not_after <= not_before {
            return Err(IssueError::Validity("not_after must be after not_before".into()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(|e: rcgen::Error| IssueError::Validity(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(public_key, &self.issuer)?;
        Ok(self.chain_from(leaf.pem()))
    }
}

/// A server certificate for a control-plane endpoint (the controller's gRPC port): what
/// [`CertificateAuthority::issue_serving`] returns.
pub struct ServingCertificate {
    /// Leaf first, root last.
    pub chain_pem: Vec<String>,
    /// PKCS#8.
    pub key_pem: String,
}

impl CertificateAuthority {
    /// A key and a TLS server certificate for `dns_names` and `ips` (no SPIFFE identity: the
    /// proxies check the controller as any TLS client checks a server), valid for `lifetime`.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        lifetime: Duration,
    ) -> Result<ServingCertificate, IssueError> {
        if dns_names.is_empty() && ips.is_empty() {
            return Err(IssueError::Validity("a serving certificate needs a DNS name or an IP".into()));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.as_str());
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        for name in dns_names {
            let name = name
                .clone()
                .try_into()
                .map_err(|e: rcgen::Error| IssueError::Validity(format!("DNS name {name:?}: {e}")))?;
            sans.push(SanType::DnsName(name));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        params.not_before = (now - backdate(lifetime)).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &self.issuer)?;
        Ok(ServingCertificate { chain_pem: self.chain_from(leaf.pem()), key_pem: key.serialize_pem() })
    }
}

/// The certificates from `cert`'s issuer up to (not including) one of `roots`, each found in
/// `pool` by name and checked by signature. Empty when `roots` holds `cert` or its issuer.
fn path_to_root(
    cert: &CertificateDer<'static>,
    pool: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<Vec<CertificateDer<'static>>, IssueError> {
    use x509_parser::certificate::X509Certificate;
    fn parse<'a>(
        der: &'a CertificateDer<'static>,
        err: fn(String) -> IssueError,
    ) -> Result<X509Certificate<'a>, IssueError> {
        X509Certificate::from_der(der).map(|(_, c)| c).map_err(|e| err(e.to_string()))
    }
    let issued_by = |child: &X509Certificate<'_>, parent: &X509Certificate<'_>| {
        child.issuer() == parent.subject() && child.verify_signature(Some(parent.public_key())).is_ok()
    };
    if roots.contains(cert) {
        return Ok(Vec::new());
    }
    let parsed_roots = roots.iter().map(|r| parse(r, IssueError::Roots)).collect::<Result<Vec<_>, _>>()?;
    let parsed_pool = pool.iter().map(|c| parse(c, IssueError::Chain)).collect::<Result<Vec<_>, _>>()?;
    let mut above = Vec::new();
    let mut current = parse(cert, IssueError::RootCert)?;
    // Each step moves to another certificate of the pool; a path longer than the pool has a loop.
    for _ in 0..=pool.len() {
        if parsed_roots.iter().any(|root| issued_by(&current, root)) {
            return Ok(above);
        }
        let next = parsed_pool
            .iter()
            .zip(pool)
            .find(|&(parent, der)| !roots.contains(der) && der != cert && issued_by(&current, parent));
        match next {
            Some((parent, der)) if !above.contains(der) => {
                above.push(der.clone());
                current = parent.clone();
            }
            _ => {
                return Err(IssueError::Untrusted(format!(
                    "no trusted root nor certificate of the chain issued \"{}\"",
                    current.subject()
                )))
            }
        }
    }
    Err(IssueError::Untrusted("the chain loops".into()))
}

/// A new P-256 key and a CSR for `identity` (empty subject, one URI SAN), both PEM; what a
/// certificate client sends to the CA.
pub fn generate_csr(identity: &Identity) -> Result<(String, String), IssueError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // ring's system RNG; a failure here would mean the OS has no entropy source.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    #[test]
    fn csr_round_trip_signs_exactly_the_identity() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let who = id("spiffe://cluster.local/ns/default/sa/web");
        let (key, csr) = generate_csr(&who).unwrap();
        let req = ca.check_csr(&csr).unwrap();
        assert_eq!(req.identity, who);
        let chain = ca.sign(&req, Duration::from_secs(3600)).unwrap();
        assert_eq!(chain.len(), 2);
        let cert = WorkloadCertificate::from_pem(&key, &chain, &RootBundle::default()).unwrap();
        assert_eq!(cert.identity(), &who);
        assert_eq!(cert.chain().len(), 1, "the root is moved to the bundle");
        assert_eq!(cert.roots().certs().len(), 1);
        let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
        assert_eq!(lifetime, Duration::from_secs(3600 + 60));
    }

    #[test]
    fn csr_checks_name_what_is_wrong() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        assert_eq!(ca.check_csr("hello").unwrap_err(), CsrError::NotPem);
        let garbage = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", vec![0x30, 0x03, 1, 2, 3]));
        assert!(matches!(ca.check_csr(&garbage), Err(CsrError::Malformed(_))));

        let foreign = id("spiffe://other.org/ns/default/sa/web");
        let (_, csr) = generate_csr(&foreign).unwrap();
        assert!(matches!(ca.check_csr(&csr), Err(CsrError::TrustDomain { .. })));

        // Two SANs.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["example.com".to_string()]).unwrap();
        params.subject_alt_names.push(SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap()));
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(ca.check_csr(&csr), Err(CsrError::Sans(_))));

        // A URI that is not SPIFFE.
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI("https://cluster.local/x".try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(ca.check_csr(&csr), Err(CsrError::Identity(_))));

        // Wrong key type.
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap())];
        let csr = params.serialize_request(&ed).unwrap().pem().unwrap();
        assert!(matches!(ca.check_csr(&csr), Err(CsrError::KeyAlgorithm(_))));

        // Tampered: flip a byte inside the signed part.
        let (_, csr) = generate_csr(&id("spiffe://cluster.local/ns/a/sa/b")).unwrap();
        let mut der = pem::parse(&csr).unwrap().into_contents();
        let i = der.len() / 2;
        der[i] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let err = ca.check_csr(&tampered).unwrap_err();
        assert!(matches!(err, CsrError::BadSignature | CsrError::Malformed(_)), "{err}");
    }

    #[test]
    fn root_reloads_from_pem_and_old_leaves_still_chain() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let again = CertificateAuthority::from_pem("cluster.local", ca.root_pem(), ca.key_pem()).unwrap();
        let other = CertificateAuthority::generate("cluster.local").unwrap();
        let err =
            CertificateAuthority::from_pem("cluster.local", ca.root_pem(), other.key_pem()).unwrap_err();
        assert!(matches!(err, IssueError::KeyMismatch), "{err}");
        assert!(!format!("{ca:?}").contains("PRIVATE"));
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        let now = SystemTime::now();
        let leaf = again.issue(&who, now, now + Duration::from_secs(60)).unwrap();
        assert_eq!(leaf.roots().certs(), ca.roots().certs());
    }

    fn verify_chain(roots: RootBundle, cert: &WorkloadCertificate) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier;
        let verifier = super::super::ServerIdentityVerifier::new(roots, vec![cert.identity().clone()]);
        let name = rustls_pki_types::ServerName::try_from("ca.test").unwrap();
        let now = rustls_pki_types::UnixTime::now();
        verifier.verify_server_cert(&cert.chain()[0], &cert.chain()[1..], &name, &[], now).map(|_| ())
    }

    #[test]
    fn an_intermediate_signs_leaf_intermediate_root() {
        let plug = crate::testing::PlugInCa::new("cluster.local", "plug");
        let ca = plug.authority();
        assert_eq!(ca.chain_pem(), std::slice::from_ref(&plug.ca_cert));
        assert_eq!(ca.root_pem(), RootBundle::from_pem(&plug.root_cert).unwrap().to_pem());
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        let (key, csr) = generate_csr(&who).unwrap();
        let chain = ca.sign(&ca.check_csr(&csr).unwrap(), Duration::from_secs(3600)).unwrap();
        assert_eq!(chain.len(), 3, "leaf, intermediate, root");
        assert_eq!(chain[1], plug.ca_cert);
        assert_eq!(parse_pem_certs(&chain[2]).unwrap(), parse_pem_certs(&plug.root_cert).unwrap());
        let cert = WorkloadCertificate::from_pem(&key, &chain, &RootBundle::default()).unwrap();
        assert_eq!(cert.chain().len(), 2, "the intermediate is presented with the leaf");
        assert_eq!(cert.roots().certs(), parse_pem_certs(&plug.root_cert).unwrap());
        verify_chain(cert.roots().clone(), &cert).unwrap();
        // Without the intermediate the leaf does not verify: it really is the signer.
        let alone = WorkloadCertificate::from_pem(&key, &chain[..1], &RootBundle::default()).unwrap();
        assert!(verify_chain(cert.roots().clone(), &alone).is_err());
    }

    #[test]
    fn every_cert_chain_convention_gives_the_same_chain() {
        let plug = crate::testing::PlugInCa::new("cluster.local", "plug");
        let reversed = format!("{}{}", plug.root_cert, plug.ca_cert);
        for chain_pem in ["", plug.ca_cert.as_str(), plug.cert_chain.as_str(), reversed.as_str()] {
            let ca = CertificateAuthority::from_intermediate_pem(
                "cluster.local",
                &plug.ca_cert,
                &plug.ca_key,
                chain_pem,
                &plug.root_cert,
            )
            .unwrap();
            assert_eq!(ca.chain_pem(), std::slice::from_ref(&plug.ca_cert), "cert-chain.pem {chain_pem:?}");
        }
        // A second level: root -> mid -> ca; cert-chain.pem must hold mid.
        let mid = crate::testing::PlugInCa::new("cluster.local", "mid");
        let mid_issuer =
            rcgen::Issuer::from_ca_cert_pem(&mid.ca_cert, KeyPair::from_pem(&mid.ca_key).unwrap()).unwrap();
        let leaf_ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "leaf CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let leaf_ca = params.signed_by(&leaf_ca_key, &mid_issuer).unwrap();
        let chain_pem = format!("{}{}{}", mid.root_cert, leaf_ca.pem(), mid.ca_cert);
        let ca = CertificateAuthority::from_intermediate_pem(
            "cluster.local",
            &leaf_ca.pem(),
            &leaf_ca_key.serialize_pem(),
            &chain_pem,
            &mid.root_cert,
        )
        .unwrap();
        let want: Vec<_> =
            [leaf_ca.der(), &parse_pem_certs(&mid.ca_cert).unwrap()[0]].iter().map(|d| d.to_vec()).collect();
        let got: Vec<_> = ca.chain_pem().iter().map(|p| parse_pem_certs(p).unwrap()[0].to_vec()).collect();
        assert_eq!(got, want, "signing certificate first, then towards the root");
        let err = CertificateAuthority::from_intermediate_pem(
            "cluster.local",
            &leaf_ca.pem(),
            &leaf_ca_key.serialize_pem(),
            "",
            &mid.root_cert,
        )
        .unwrap_err();
        assert!(matches!(err, IssueError::Untrusted(_)), "{err}");
        assert!(err.to_string().contains("leaf CA"), "names the certificate without an issuer: {err}");
    }

    #[test]
    fn plug_in_errors_say_which_file() {
        let plug = crate::testing::PlugInCa::new("cluster.local", "plug");
        let other = crate::testing::PlugInCa::new("cluster.local", "other");
        let make = |cert: &str, key: &str, chain: &str, roots: &str| {
            CertificateAuthority::from_intermediate_pem("cluster.local", cert, key, chain, roots).unwrap_err()
        };
        let p = &plug;
        assert!(matches!(make(&p.ca_cert, &other.ca_key, "", &p.root_cert), IssueError::KeyMismatch));
        assert!(matches!(make("junk", &p.ca_key, "", &p.root_cert), IssueError::RootCert(_)));
        assert!(matches!(make(&p.ca_cert, "junk", "", &p.root_cert), IssueError::RootKey(_)));
        assert!(matches!(make(&p.ca_cert, &p.ca_key, "", ""), IssueError::Roots(_)));
        assert!(matches!(make(&p.ca_cert, &p.ca_key, "", &other.root_cert), IssueError::Untrusted(_)));
        let bad_chain = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(make(&p.ca_cert, &p.ca_key, bad_chain, &p.root_cert), IssueError::Chain(_)));
        // A leaf is no CA.
        let leaf_issuer = CertificateAuthority::generate("cluster.local").unwrap();
        let leaf = leaf_issuer
            .issue(
                &id("spiffe://cluster.local/ns/a/sa/b"),
                SystemTime::now(),
                SystemTime::now() + Duration::from_secs(60),
            )
            .unwrap();
        let leaf_pem = super::super::der_to_pem("CERTIFICATE", leaf.leaf());
        let err = make(&leaf_pem, &p.ca_key, "", leaf_issuer.root_pem());
        assert!(matches!(err, IssueError::RootCert(_)) && err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn a_bundle_of_two_roots_is_sent_last_and_trusted_whole() {
        let old = CertificateAuthority::generate("cluster.local").unwrap();
        let plug = crate::testing::PlugInCa::new("cluster.local", "new");
        let bundle = format!("{}{}", plug.root_cert, old.root_pem());
        let ca = CertificateAuthority::from_intermediate_pem(
            "cluster.local",
            &plug.ca_cert,
            &plug.ca_key,
            &plug.cert_chain,
            &bundle,
        )
        .unwrap();
        assert_eq!(ca.roots().certs().len(), 2);
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        let (key, csr) = generate_csr(&who).unwrap();
        let chain = ca.sign(&ca.check_csr(&csr).unwrap(), Duration::from_secs(3600)).unwrap();
        assert_eq!(chain.len(), 3);
        let cert = WorkloadCertificate::from_pem(&key, &chain, &RootBundle::default()).unwrap();
        assert_eq!(cert.chain().len(), 2);
        assert_eq!(cert.roots().certs(), ca.roots().certs(), "both roots are trusted");
        // A leaf of the old root verifies against what the new CA hands out.
        let old_leaf =
            old.issue(&who, SystemTime::now(), SystemTime::now() + Duration::from_secs(60)).unwrap();
        verify_chain(cert.roots().clone(), &old_leaf).unwrap();

        // The same with a self-signed root that keeps the old one after a rotation.
        let new = CertificateAuthority::generate("cluster.local").unwrap().with_extra_roots(&old.roots());
        assert_eq!(new.roots().certs().len(), 2);
        assert_eq!(parse_pem_certs(new.root_pem()).unwrap(), new.roots().certs());
        let leaf = new.issue(&who, SystemTime::now(), SystemTime::now() + Duration::from_secs(60)).unwrap();
        assert_eq!(leaf.chain().len(), 1);
        assert_eq!(leaf.roots().certs().len(), 2);
        verify_chain(leaf.roots().clone(), &old_leaf).unwrap();
    }
}
