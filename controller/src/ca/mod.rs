//! The controller's certificate authority: the root kept on disk ([`load_or_create_root`]) or, on
//! Kubernetes, in istiod's Secrets ([`SecretCa`]) with the trust bundle published to every
//! namespace ([`root_configmap`]), who may hold which identity ([`Authorizer`]), and Istio's
//! certificate-signing gRPC API ([`CaService`], [`serve`]). What a well-formed CSR and certificate are is weft-core's business,
//! not this module's.

mod authz;
pub mod root_configmap;
pub mod secret;
mod service;
mod store;
mod tokenreview;
mod waypoint_tokens;

use std::future::Future;
use std::io;
use std::path::PathBuf;

use weft_core::identity::IdentityError;
use weft_core::proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use weft_core::tls::IssueError;

pub use authz::{AuthError, Authorizer, Caller, ModelAuthorizer, StaticAuthorizer};
pub use secret::{SecretCa, SecretOptions};
pub use service::{
    bearer_token, cert_lifetime, impersonated_identity, CaService, Issued, LifetimeError, Refusal,
    DEFAULT_MAX_CERT_LIFETIME, IMPERSONATED_IDENTITY_KEY, MAX_CERT_LIFETIME_CEILING,
};
pub use store::{load_or_create_root, ROOT_CERT_FILE, ROOT_KEY_FILE};
pub use tokenreview::{
    ServiceAccountRef, TokenReviewAuthorizer, POD_NAME_EXTRA, POD_UID_EXTRA, REVIEW_CACHE_TTL, TOKEN_AUDIENCE,
};
pub use waypoint_tokens::WaypointTokenDir;

pub use crate::grpc::DRAIN_DEADLINE;

/// Why the CA could not start or keep serving. Each message names the file or address to check.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("trust domain {trust_domain:?} is invalid: {source}")]
    TrustDomain { trust_domain: String, source: IdentityError },
    #[error("cannot create the CA directory {}: {source}", .path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {} (nothing existing was replaced): {source}", .path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "{} exists but {} does not; refusing to create a new root beside existing material \
         (restore the missing file, or if an earlier first start was interrupted, remove {} to \
         start over with a new root)",
        .present.display(), .missing.display(), .present.display()
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("{} is unusable: {reason} (it was left untouched)", .path.display())]
    Unparsable { path: PathBuf, reason: String },
    #[error("{} and {} do not form a usable root: {reason}", .cert.display(), .key.display())]
    Mismatch { cert: PathBuf, key: PathBuf, reason: String },
    #[error("Secret {namespace}/{name}, key {key}: {reason}")]
    SecretKey { namespace: String, name: String, key: &'static str, reason: String },
    #[error(
        "cannot {action} Secret {namespace}/{name}: {reason} (may the controller's service account \
         get and create secrets in {namespace}?)"
    )]
    SecretApi { action: &'static str, namespace: String, name: &'static str, reason: String },
    #[error("cannot generate a new root: {0}")]
    Generate(#[source] IssueError),
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind { addr: std::net::SocketAddr, source: io::Error },
    #[error("the CA's gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// How the CA of a controller with a model authenticates callers: a static table of node tokens
/// (`--node-token`) plus, if given, a directory of waypoint tokens (`--waypoint-tokens-dir`); or
/// the API server's TokenReview (Kubernetes without `--node-token`), which knows ztunnels and
/// waypoints by their service accounts and pods. Either way a node agent may hold only the
/// identities of the mesh's pods the model places on its node, and a waypoint only its own.
#[derive(Debug)]
pub enum NodeAuthorizer {
    Static(ModelAuthorizer),
    TokenReview(TokenReviewAuthorizer),
}

impl Authorizer for NodeAuthorizer {
    async fn authenticate(&self, bearer_token: Option<&str>) -> Result<Caller, AuthError> {
        match self {
            NodeAuthorizer::Static(a) => a.authenticate(bearer_token).await,
            NodeAuthorizer::TokenReview(a) => a.authenticate(bearer_token).await,
        }
    }

    async fn authorize(&self, caller: &Caller, identity: &weft_core::Identity) -> Result<(), AuthError> {
        match self {
            NodeAuthorizer::Static(a) => a.authorize(caller, identity).await,
            NodeAuthorizer::TokenReview(a) => a.authorize(caller, identity).await,
        }
    }
}

/// Serves `service` on `listener` until `shutdown` completes, then lets in-flight requests finish
/// for at most [`DRAIN_DEADLINE`].
pub async fn serve<A: Authorizer>(
    listener: crate::grpc::Listener,
    service: CaService<A>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CaError> {
    let routes = tonic::service::Routes::new(IstioCertificateServiceServer::new(service));
    Ok(crate::grpc::serve(listener, routes, "CA", shutdown, || ()).await?)
}
