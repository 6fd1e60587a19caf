//! rustls verifiers for HBONE peers: the chain must lead to one of our roots, the certificate
//! must be valid now, and the SPIFFE identity must be acceptable (the server checks the client's
//! trust domain; the client checks that the server is one of the identities it expects).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use super::{provider, CertInfo, RootBundle, TlsError};
use crate::identity::Identity;

/// Why a peer's certificate was refused. Each variant names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer certificate has no usable SPIFFE identity: {0}")]
    NoIdentity(#[source] TlsError),
    #[error("peer certificate for {identity} expired at {not_after} (now {now})")]
    Expired { identity: Identity, not_after: Timestamp, now: Timestamp },
    #[error("peer certificate for {identity} is not valid until {not_before} (now {now})")]
    NotYetValid { identity: Identity, not_before: Timestamp, now: Timestamp },
    #[error("peer certificate for {identity} is not signed by a trusted root ({detail})")]
    UnknownRoot { identity: Identity, detail: &'static str },
    #[error("peer certificate chain for {identity} is invalid: {reason}")]
    Chain { identity: Identity, reason: String },
    #[error("peer identity {got} is not one of the expected identities [{}]", list(.expected))]
    WrongIdentity { got: Identity, expected: Vec<Identity> },
    #[error("peer identity {got} is from trust domain {:?}, only {want:?} is trusted", .got.trust_domain())]
    WrongTrustDomain { got: Identity, want: String },
}

fn list(ids: &[Identity]) -> String {
    ids.iter().map(Identity::to_string).collect::<Vec<_>>().join(", ")
}

/// Seconds since the Unix epoch, printed as an RFC 3339 date.
#[derive(Debug, Clone, Copy)]
pub struct Timestamp(pub u64);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let formatted = i64::try_from(self.0)
            .ok()
            .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
        match formatted {
            Some(s) => f.write_str(&s),
            None => write!(f, "{}s after the epoch", self.0),
        }
    }
}

impl PeerError {
    /// Finds a `PeerError` inside a rustls error, if the verifier produced one.
    pub fn find(err: &rustls::Error) -> Option<&PeerError> {
        match err {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other.0.downcast_ref(),
            _ => None,
        }
    }
}

impl From<PeerError> for rustls::Error {
    fn from(err: PeerError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
    }
}

/// How many verified chains a [`ChainVerifier`] remembers, and for how long at most.
const VERIFIED_CHAINS: usize = 256;
const VERIFIED_FOR: Duration = Duration::from_secs(300);

/// The chain, validity and signature checks both verifiers share. One per set of roots (each
/// workload certificate holds one), shared by every handshake made with that certificate.
///
/// A chain that verified is remembered, so the next handshake with the same peer certificate
/// skips webpki's chain building and the CA's signature check (an ECDSA verification, a fifth
/// of a server's handshake here). What is skipped depends only on the certificates' bytes, these
/// roots and the usage; the peer still proves it holds the key with a fresh signature over each
/// handshake, and a remembered chain is used only within its leaf's validity and for at most
/// [`VERIFIED_FOR`].
pub(crate) struct ChainVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
    verified: Mutex<HashMap<ChainKey, Verified>>,
}

/// A chain's identity in memory: SHA-256 of the usage and the certificates, so what a peer
/// sends (up to rustls' 64 KiB of certificates, junk intermediates included) costs 32 bytes
/// to remember.
type ChainKey = [u8; 32];

/// A chain that verified: whose it is, and until when that stands.
struct Verified {
    identity: Identity,
    not_before: u64,
    not_after: u64,
    at: Instant,
}

/// The cache key of a chain: the digest of the usage, then each certificate, length first.
fn chain_key(usage: u8, end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> ChainKey {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(&[usage]);
    for cert in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        digest.update(&(cert.len() as u64).to_be_bytes());
        digest.update(cert);
    }
    let mut key = [0; 32];
    key.copy_from_slice(digest.finish().as_ref());
    key
}

impl ChainVerifier {
    pub(crate) fn new(roots: &RootBundle) -> Arc<Self> {
        let anchors = roots
            .certs()
            .iter()
            .filter_map(|root| match webpki::anchor_from_trusted_cert(root) {
                Ok(anchor) => Some(anchor.to_owned()),
                Err(e) => {
                    tracing::warn!(error = ?e, "ignoring a root certificate that cannot be a trust anchor");
                    None
                }
            })
            .collect();
        Arc::new(ChainVerifier {
            anchors,
            algorithms: provider().signature_verification_algorithms,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Checks the chain for a server (`server` true) or a client and returns the peer's
    /// identity: from memory when this chain verified before (see [`ChainVerifier`]).
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        server: bool,
    ) -> Result<Identity, PeerError> {
        let key = chain_key(u8::from(server), end_entity, intermediates);
        if let Some(known) = self.verified.lock().ok().and_then(|verified| {
            let v = verified.get(&key)?;
            let current =
                (v.not_before..=v.not_after).contains(&now.as_secs()) && v.at.elapsed() < VERIFIED_FOR;
            current.then(|| v.identity.clone())
        }) {
            return Ok(known);
        }
        let usage = if server { KeyUsage::server_auth() } else { KeyUsage::client_auth() };
        let (identity, not_before, not_after) = self.verify_chain(end_entity, intermediates, now, usage)?;
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= VERIFIED_CHAINS {
                verified.clear();
            }
            verified.insert(
                key,
                Verified { identity: identity.clone(), not_before, not_after, at: Instant::now() },
            );
        }
        Ok(identity)
    }

    /// webpki's checks of the chain for `usage`: the peer's identity and its leaf's validity
    /// window (Unix seconds).
    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<(Identity, u64, u64), PeerError> {
        let info = CertInfo::parse(end_entity).map_err(PeerError::NoIdentity)?;
        let identity = info.identity;
        let cert = EndEntityCert::try_from(end_entity)
            .map_err(|e| PeerError::Chain { identity: identity.clone(), reason: format!("{e:?}") })?;
        let stamp = |t: SystemTime| {
            Timestamp(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs())
        };
        let now_stamp = Timestamp(now.as_secs());
        cert.verify_for_usage(self.algorithms.all, &self.anchors, intermediates, now, usage, None, None)
            .map_err(|e| match e {
                webpki::Error::CertExpired { .. } => PeerError::Expired {
                    identity: identity.clone(),
                    not_after: stamp(info.not_after),
                    now: now_stamp,
                },
                webpki::Error::CertNotValidYet { .. } => PeerError::NotYetValid {
                    identity: identity.clone(),
                    not_before: stamp(info.not_before),
                    now: now_stamp,
                },
                webpki::Error::UnknownIssuer => {
                    PeerError::UnknownRoot { identity: identity.clone(), detail: "no trusted issuer" }
                }
                // A root with the issuer's name exists but did not make the signature: another
                // CA that happens to share the name (every trust domain's root is O=<domain>).
                webpki::Error::InvalidSignatureForPublicKey => PeerError::UnknownRoot {
                    identity: identity.clone(),
                    detail: "an issuer by that name exists but its key did not sign it",
                },
                other => PeerError::Chain { identity: identity.clone(), reason: format!("{other:?}") },
            })?;
        Ok((identity, stamp(info.not_before).0, stamp(info.not_after).0))
    }

    fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client side: accepts a server whose certificate chains to our roots and whose SPIFFE
/// identity is one of those expected (the destination workload's, or its waypoint's).
/// The TLS server name is ignored: HBONE sends no SNI and certificates carry no DNS names.
pub struct ServerIdentityVerifier {
    chain: Arc<ChainVerifier>,
    expected: Vec<Identity>,
}

impl ServerIdentityVerifier {
    pub fn new(roots: RootBundle, expected: Vec<Identity>) -> Self {
        Self::with_chain(ChainVerifier::new(&roots), expected)
    }

    pub(crate) fn with_chain(chain: Arc<ChainVerifier>, expected: Vec<Identity>) -> Self {
        ServerIdentityVerifier { chain, expected }
    }
}

impl fmt::Debug for ServerIdentityVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerIdentityVerifier(expect [{}])", list(&self.expected))
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = self.chain.verify(end_entity, intermediates, now, true)?;
        if !self.expected.contains(&got) {
            return Err(PeerError::WrongIdentity { got, expected: self.expected.clone() }.into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.schemes()
    }
}

/// Server side: requires a client certificate that chains to our roots and whose SPIFFE
/// identity is in our trust domain. Authorization by full identity happens later, in policy.
pub struct ClientIdentityVerifier {
    chain: Arc<ChainVerifier>,
    trust_domain: String,
}

impl ClientIdentityVerifier {
    pub fn new(roots: RootBundle, trust_domain: String) -> Self {
        Self::with_chain(ChainVerifier::new(&roots), trust_domain)
    }

    pub(crate) fn with_chain(chain: Arc<ChainVerifier>, trust_domain: String) -> Self {
        ClientIdentityVerifier { chain, trust_domain }
    }
}

impl fmt::Debug for ClientIdentityVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientIdentityVerifier(trust domain {:?})", self.trust_domain)
    }
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let got = self.chain.verify(end_entity, intermediates, now, false)?;
        if got.trust_domain() != self.trust_domain {
            return Err(PeerError::WrongTrustDomain { got, want: self.trust_domain.clone() }.into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::issue::CertificateAuthority;

    fn unix(t: SystemTime) -> UnixTime {
        UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default())
    }

    /// A certificate of `id` from `ca`, valid from a minute before `now` to an hour after.
    fn issue(ca: &CertificateAuthority, id: &Identity, now: SystemTime) -> crate::tls::WorkloadCertificate {
        ca.issue(id, now - Duration::from_secs(60), now + Duration::from_secs(3600)).unwrap()
    }

    #[test]
    fn a_verified_chain_is_remembered_only_for_its_usage_and_within_its_validity() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let now = SystemTime::now();
        let cert = issue(&ca, &id, now);
        let (leaf, intermediates) = (cert.leaf().clone(), &cert.chain()[1..]);
        let chains = ChainVerifier::new(&ca.roots());

        assert_eq!(chains.verify(&leaf, intermediates, unix(now), false).unwrap(), id);
        assert_eq!(chains.verified.lock().unwrap().len(), 1);
        assert_eq!(chains.verify(&leaf, intermediates, unix(now), false).unwrap(), id, "from memory");
        assert_eq!(chains.verified.lock().unwrap().len(), 1);
        // The other usage is verified on its own (and remembered apart).
        assert!(chains.verify(&leaf, intermediates, unix(now), true).is_ok());
        assert_eq!(chains.verified.lock().unwrap().len(), 2);
        // After the leaf's end the remembered chain does not count: webpki says why.
        let later = unix(now + Duration::from_secs(7200));
        assert!(matches!(chains.verify(&leaf, intermediates, later, false), Err(PeerError::Expired { .. })));
        // Other bytes are another chain: one signed by another CA is refused.
        let other = CertificateAuthority::generate("cluster.local").unwrap();
        let forged = issue(&other, &id, now);
        assert!(matches!(
            chains.verify(forged.leaf(), &forged.chain()[1..], unix(now), false),
            Err(PeerError::UnknownRoot { .. })
        ));
    }

    #[test]
    fn junk_intermediates_are_another_chain_and_cost_no_more_memory() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let now = SystemTime::now();
        let cert = issue(&ca, &id, now);
        let chains = ChainVerifier::new(&ca.roots());
        let mut padded = cert.chain()[1..].to_vec();
        padded.push(CertificateDer::from(vec![0x30; 60 * 1024]));
        let first = chains.verify(cert.leaf(), &padded, unix(now), false);
        let second = chains.verify(cert.leaf(), &cert.chain()[1..], unix(now), false);
        assert_eq!(second.unwrap(), id);
        let verified = chains.verified.lock().unwrap();
        assert_eq!(verified.len(), usize::from(first.is_ok()) + 1, "the padded chain is not the plain one");
    }

    #[test]
    fn the_memory_is_bounded() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let chains = ChainVerifier::new(&ca.roots());
        let now = SystemTime::now();
        for i in 0..VERIFIED_CHAINS + 3 {
            let id: Identity = format!("spiffe://cluster.local/ns/a/sa/s{i}").parse().unwrap();
            let cert = issue(&ca, &id, now);
            chains.verify(cert.leaf(), &cert.chain()[1..], unix(now), false).unwrap();
            assert!(chains.verified.lock().unwrap().len() <= VERIFIED_CHAINS);
        }
    }
}
