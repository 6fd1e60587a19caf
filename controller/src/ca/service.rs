//! Istio's `IstioCertificateService` over gRPC: authenticate the caller, check the CSR and the
//! requested lifetime, ask the [`Authorizer`] whether the caller may hold the identity, then
//! sign. Each refusal is classified once, here, into a gRPC status. Holds no key material itself.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost_types::value::Kind;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;
use weft_core::identity::IdentityError;
use weft_core::proto::ca::istio_certificate_service_server::IstioCertificateService;
use weft_core::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use weft_core::tls::{CertificateAuthority, CsrError, IssueError, DEFAULT_CERT_LIFETIME};
use weft_core::Identity;

use super::authz::{AuthError, Authorizer, Caller};

/// The longest workload certificate the CA signs unless configured otherwise (Istio's
/// MAX_WORKLOAD_CERT_TTL default: 90 days).
pub const DEFAULT_MAX_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 60 * 60);
/// No configuration may raise the maximum above this (the lifetime of a generated root).
pub const MAX_CERT_LIFETIME_CEILING: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// The metadata key a node proxy sets to the identity it asks for on a workload's behalf.
pub const IMPERSONATED_IDENTITY_KEY: &str = "ImpersonatedIdentity";

const AUTHORIZATION_HEADER: &str = "authorization";

/// Why a certificate request was refused; each variant maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Unauthenticated(AuthError),
    #[error("{0}")]
    Csr(#[from] CsrError),
    #[error("metadata {IMPERSONATED_IDENTITY_KEY} must be a string, found {0}")]
    ImpersonationNotString(&'static str),
    #[error("metadata {IMPERSONATED_IDENTITY_KEY} is not a SPIFFE identity: {0}")]
    ImpersonationInvalid(IdentityError),
    // Boxed: two identities would make every `Result<_, Refusal>` large.
    #[error("metadata {IMPERSONATED_IDENTITY_KEY} is {impersonated} but the CSR asks for {csr}")]
    ImpersonationMismatch { impersonated: Box<Identity>, csr: Box<Identity> },
    #[error("{0}")]
    Unauthorized(AuthError),
    #[error(transparent)]
    Lifetime(#[from] LifetimeError),
    #[error("signing failed: {0}")]
    Issue(#[from] IssueError),
}

impl Refusal {
    /// The gRPC status code this refusal is answered with.
    pub fn code(&self) -> Code {
        match self {
            // The API server could not be asked: the caller may retry, its token was not judged.
            Refusal::Unauthenticated(AuthError::ReviewFailed(_)) => Code::Unavailable,
            Refusal::Unauthenticated(_) => Code::Unauthenticated,
            Refusal::Csr(_)
            | Refusal::ImpersonationNotString(_)
            | Refusal::ImpersonationInvalid(_)
            | Refusal::Lifetime(_) => Code::InvalidArgument,
            Refusal::ImpersonationMismatch { .. } | Refusal::Unauthorized(_) => Code::PermissionDenied,
            Refusal::Issue(_) => Code::Internal,
        }
    }
}

impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Self {
        Status::new(refusal.code(), refusal.to_string())
    }
}

/// Why a requested certificate lifetime was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LifetimeError {
    #[error("requested validity of {requested}s is greater than the maximum of {max}s")]
    TooLong { requested: u64, max: u64 },
}

/// The lifetime to sign for a request's `validity_duration` (seconds): non-positive means
/// `default` (but never more than `max`); more than `max` is refused.
pub fn cert_lifetime(
    requested_secs: i64,
    default: Duration,
    max: Duration,
) -> Result<Duration, LifetimeError> {
    let Ok(requested) = u64::try_from(requested_secs) else {
        return Ok(default.min(max));
    };
    if requested == 0 {
        return Ok(default.min(max));
    }
    if requested > max.as_secs() {
        return Err(LifetimeError::TooLong { requested, max: max.as_secs() });
    }
    Ok(Duration::from_secs(requested))
}

/// The `ImpersonatedIdentity` a request's metadata names, if any. An empty string or a null
/// counts as absent (as in Istio); anything else that is not a SPIFFE identity string is refused.
pub fn impersonated_identity(metadata: Option<&prost_types::Struct>) -> Result<Option<Identity>, Refusal> {
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY_KEY)) else {
        return Ok(None);
    };
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Ok(None),
        Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
        Some(Kind::StringValue(s)) => s.parse().map(Some).map_err(Refusal::ImpersonationInvalid),
        Some(Kind::NumberValue(_)) => Err(Refusal::ImpersonationNotString("a number")),
        Some(Kind::BoolValue(_)) => Err(Refusal::ImpersonationNotString("a bool")),
        Some(Kind::StructValue(_)) => Err(Refusal::ImpersonationNotString("a struct")),
        Some(Kind::ListValue(_)) => Err(Refusal::ImpersonationNotString("a list")),
    }
}

/// The token of an `authorization: Bearer <token>` value. No value, or an empty token, is `None`
/// (the authorizer then says "no bearer token").
pub fn bearer_token(value: Option<&str>) -> Result<Option<&str>, AuthError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let value = value.trim();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedHeader("the authorization scheme must be \"Bearer\""));
    }
    let token = token.trim();
    Ok((!token.is_empty()).then_some(token))
}

/// The CA's gRPC service: signs CSRs for identities the [`Authorizer`] allows, with the signer
/// current when each request arrives.
pub struct CaService<A> {
    ca: watch::Receiver<Arc<CertificateAuthority>>,
    authorizer: Arc<A>,
    max_lifetime: Duration,
}

/// A signed certificate and what it was signed for.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Who asked: a node agent, or a waypoint.
    pub caller: Caller,
    pub identity: Identity,
    pub lifetime: Duration,
    /// PEM certificates, leaf first, root last.
    pub chain: Vec<String>,
}

impl<A: Authorizer> CaService<A> {
    /// A service signing with `ca`, with the default maximum lifetime (90 days).
    pub fn new(ca: CertificateAuthority, authorizer: A) -> Self {
        Self::following(watch::channel(Arc::new(ca)).1, authorizer)
    }

    /// A service signing with whatever `ca` holds at each request (a signer that can rotate).
    pub fn following(ca: watch::Receiver<Arc<CertificateAuthority>>, authorizer: A) -> Self {
        CaService { ca, authorizer: Arc::new(authorizer), max_lifetime: DEFAULT_MAX_CERT_LIFETIME }
    }

    /// Refuse requests for longer than `max` (clamped to [`MAX_CERT_LIFETIME_CEILING`]).
    pub fn with_max_lifetime(mut self, max: Duration) -> Self {
        if max > MAX_CERT_LIFETIME_CEILING {
            tracing::warn!(
                requested = max.as_secs(),
                ceiling = MAX_CERT_LIFETIME_CEILING.as_secs(),
                "maximum certificate lifetime clamped"
            );
        }
        self.max_lifetime = max.min(MAX_CERT_LIFETIME_CEILING);
        self
    }

    /// The signer now.
    pub fn ca(&self) -> Arc<CertificateAuthority> {
        self.ca.borrow().clone()
    }

    /// The signer as it changes (the serving certificate is renewed from it).
    pub fn signer(&self) -> watch::Receiver<Arc<CertificateAuthority>> {
        self.ca.clone()
    }

    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }

    /// Decides and, if allowed, signs one request, in order: authenticate, check the CSR and any
    /// `ImpersonatedIdentity`, authorize, check the lifetime, sign. `authorization` is the raw
    /// `authorization` metadata value.
    pub async fn handle(
        &self,
        authorization: Option<&str>,
        request: &IstioCertificateRequest,
    ) -> Result<Issued, Refusal> {
        let token = bearer_token(authorization).map_err(Refusal::Unauthenticated)?;
        let caller = self.authorizer.authenticate(token).await.map_err(Refusal::Unauthenticated)?;
        tracing::Span::current().record("caller", tracing::field::display(&caller));
        self.handle_for(&caller, request).await
    }

    async fn handle_for(
        &self,
        caller: &Caller,
        request: &IstioCertificateRequest,
    ) -> Result<Issued, Refusal> {
        let ca = self.ca();
        let csr = ca.check_csr(&request.csr)?;
        if let Some(impersonated) = impersonated_identity(request.metadata.as_ref())? {
            if impersonated != csr.identity {
                return Err(Refusal::ImpersonationMismatch {
                    impersonated: Box::new(impersonated),
                    csr: Box::new(csr.identity),
                });
            }
        }
        self.authorizer.authorize(caller, &csr.identity).await.map_err(Refusal::Unauthorized)?;
        let lifetime = cert_lifetime(request.validity_duration, DEFAULT_CERT_LIFETIME, self.max_lifetime)?;
        // `sign` adds the lifetime to the clock; the ceiling keeps that far from overflowing.
        if SystemTime::now().checked_add(lifetime).is_none() {
            return Err(Refusal::Issue(IssueError::Validity("lifetime overflows the clock".into())));
        }
        let chain = ca.sign(&csr, lifetime)?;
        Ok(Issued { caller: caller.clone(), identity: csr.identity, lifetime, chain })
    }

    /// Answers one gRPC request, logging the outcome.
    async fn respond(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let result = match request.metadata().get(AUTHORIZATION_HEADER).map(|v| v.to_str()) {
            None => self.handle(None, request.get_ref()).await,
            Some(Ok(value)) => self.handle(Some(value), request.get_ref()).await,
            Some(Err(_)) => Err(Refusal::Unauthenticated(AuthError::MalformedHeader(
                "the authorization value is not visible ASCII",
            ))),
        };
        match result {
            Ok(issued) => {
                tracing::info!(
                    caller = %issued.caller,
                    identity = %issued.identity,
                    lifetime_secs = issued.lifetime.as_secs(),
                    "issued a workload certificate"
                );
                Ok(Response::new(IstioCertificateResponse { cert_chain: issued.chain }))
            }
            Err(refusal) => {
                let code = refusal.code();
                if code == Code::Internal {
                    tracing::error!(error = %refusal, "failed to sign a certificate");
                } else {
                    tracing::warn!(?code, reason = %refusal, "refused a certificate request");
                }
                Err(refusal.into())
            }
        }
    }
}

impl<A> Clone for CaService<A> {
    fn clone(&self) -> Self {
        CaService {
            ca: self.ca.clone(),
            authorizer: self.authorizer.clone(),
            max_lifetime: self.max_lifetime,
        }
    }
}

#[tonic::async_trait]
impl<A: Authorizer> IstioCertificateService for CaService<A> {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        let span = tracing::info_span!("ca_request", ?peer, caller = tracing::field::Empty);
        self.respond(request).instrument(span).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost_types::{Struct, Value};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateSigningRequestDer;
    use weft_core::tls::generate_csr;

    use super::*;
    use crate::ca::StaticAuthorizer;

    const H: u64 = 60 * 60;

    #[test]
    fn lifetime_table() {
        let default = Duration::from_secs(24 * H);
        let max = Duration::from_secs(90 * 24 * H);
        let cases: &[(i64, Duration, Result<u64, LifetimeError>)] = &[
            (0, max, Ok(24 * H)),
            (-1, max, Ok(24 * H)),
            (i64::MIN, max, Ok(24 * H)),
            (1, max, Ok(1)),
            (3600, max, Ok(3600)),
            (90 * 24 * 3600, max, Ok(90 * 24 * H)),
            (
                90 * 24 * 3600 + 1,
                max,
                Err(LifetimeError::TooLong { requested: 90 * 24 * H + 1, max: 90 * 24 * H }),
            ),
            (i64::MAX, max, Err(LifetimeError::TooLong { requested: i64::MAX as u64, max: 90 * 24 * H })),
            // A maximum below the default caps the default.
            (0, Duration::from_secs(H), Ok(H)),
            (2 * 3600, Duration::from_secs(H), Err(LifetimeError::TooLong { requested: 2 * H, max: H })),
        ];
        for (requested, max, want) in cases {
            let got = cert_lifetime(*requested, default, *max).map(|d| d.as_secs());
            assert_eq!(&got, want, "requested {requested}, max {max:?}");
        }
        let msg = cert_lifetime(100, default, Duration::from_secs(50)).unwrap_err().to_string();
        assert!(msg.contains("100s") && msg.contains("50s"), "{msg}");
    }

    #[test]
    fn bearer_token_table() {
        // (authorization value, token, or Err if the value is refused)
        type Case<'a> = (Option<&'a str>, Result<Option<&'a str>, ()>);
        let cases: &[Case<'_>] = &[
            (None, Ok(None)),
            (Some("Bearer abc"), Ok(Some("abc"))),
            (Some("bearer abc"), Ok(Some("abc"))),
            (Some("BEARER  abc "), Ok(Some("abc"))),
            (Some("Bearer"), Ok(None)),
            (Some("Bearer "), Ok(None)),
            (Some(""), Err(())),
            (Some("Basic abc"), Err(())),
            (Some("abc"), Err(())),
        ];
        for (value, want) in cases {
            assert_eq!(bearer_token(*value).map_err(|_| ()), *want, "{value:?}");
        }
    }

    fn metadata(value: Kind) -> Struct {
        Struct {
            fields: BTreeMap::from([(IMPERSONATED_IDENTITY_KEY.to_owned(), Value { kind: Some(value) })]),
        }
    }

    #[test]
    fn impersonated_identity_table() {
        let web: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(impersonated_identity(None).unwrap(), None);
        assert_eq!(impersonated_identity(Some(&Struct::default())).unwrap(), None);
        let some = metadata(Kind::StringValue(web.to_string()));
        assert_eq!(impersonated_identity(Some(&some)).unwrap(), Some(web));
        for absent in [Kind::StringValue(String::new()), Kind::NullValue(0)] {
            assert_eq!(impersonated_identity(Some(&metadata(absent))).unwrap(), None);
        }
        let bad = impersonated_identity(Some(&metadata(Kind::StringValue("web".into())))).unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert!(bad.to_string().contains("not a SPIFFE identity"), "{bad}");
        let number = impersonated_identity(Some(&metadata(Kind::NumberValue(1.0)))).unwrap_err();
        assert_eq!(number.code(), Code::InvalidArgument);
        assert!(number.to_string().contains("must be a string"), "{number}");
    }

    /// A waypoint obtains its own identity whether or not it names it as `ImpersonatedIdentity`,
    /// and no other identity either way; a node agent never obtains the waypoint's.
    #[tokio::test]
    async fn a_waypoint_obtains_only_its_own_identity_with_or_without_impersonation() {
        let id = |s: &str| s.parse::<Identity>().unwrap();
        let own = id("spiffe://cluster.local/ns/shop/sa/waypoint");
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let service = CaService::new(
            CertificateAuthority::generate("cluster.local").unwrap(),
            StaticAuthorizer::new()
                .with_waypoint_token("wp", "shop", "waypoint")
                .with_token("zt", "node-a")
                .with_identity("node-a", web.clone()),
        );
        // (token, identity, ImpersonatedIdentity sent, issued or the refusal's code)
        let cases: &[(&str, &Identity, bool, Result<(), Code>)] = &[
            ("wp", &own, true, Ok(())),
            ("wp", &own, false, Ok(())),
            ("wp", &web, true, Err(Code::PermissionDenied)),
            ("wp", &web, false, Err(Code::PermissionDenied)),
            ("zt", &web, true, Ok(())),
            ("zt", &own, true, Err(Code::PermissionDenied)),
            ("zt", &own, false, Err(Code::PermissionDenied)),
        ];
        for (token, identity, impersonate, want) in cases {
            let (_, csr) = generate_csr(identity).unwrap();
            let metadata = impersonate.then(|| metadata(Kind::StringValue(identity.to_string())));
            let request = IstioCertificateRequest { csr, validity_duration: 0, metadata };
            let got = service.handle(Some(&format!("Bearer {token}")), &request).await;
            match (want, &got) {
                (Ok(()), Ok(issued)) => assert_eq!(&issued.identity, *identity),
                (Err(code), Err(refusal)) => assert_eq!(refusal.code(), *code, "{refusal}"),
                _ => panic!("{token} {identity} {impersonate}: got {got:?}"),
            }
        }
    }

    /// Every truncation and every single-bit flip of a valid CSR is refused, never a panic.
    #[tokio::test]
    async fn damaged_csrs_are_refused_without_panicking() {
        let web: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let service = CaService::new(
            CertificateAuthority::generate("cluster.local").unwrap(),
            StaticAuthorizer::new().with_token("t", "node-a").with_identity("node-a", web.clone()),
        );
        let (_, csr) = generate_csr(&web).unwrap();
        let der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap().as_ref().to_vec();
        let to_pem = |bytes: &[u8]| weft_core::tls::der_to_pem("CERTIFICATE REQUEST", bytes);
        let mut damaged = Vec::new();
        for len in 0..der.len() {
            damaged.push(to_pem(&der[..len]));
        }
        for i in 0..der.len() {
            let mut flipped = der.clone();
            flipped[i] ^= 0x01;
            damaged.push(to_pem(&flipped));
        }
        for csr in damaged {
            let request = IstioCertificateRequest { csr, validity_duration: 0, metadata: None };
            if let Err(refusal) = service.handle(Some("Bearer t"), &request).await {
                assert_ne!(refusal.code(), Code::Internal, "{refusal}");
            }
        }
    }
}
