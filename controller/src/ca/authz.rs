//! Who may hold which identity: authenticating a caller from its bearer token and deciding whether
//! that caller's node may hold a SPIFFE identity. Knows nothing of gRPC, CSRs or certificates.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;

use weft_core::Identity;

/// An authenticated caller of the CA: a node agent (ztunnel) acting for the pods on its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The name of the node the caller runs on.
    pub node: String,
}

/// Why a caller was not authenticated or not authorized. Messages never contain a token.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token: send the gRPC metadata \"authorization: Bearer <token>\"")]
    NoToken,
    #[error("malformed authorization metadata: {0}")]
    MalformedHeader(&'static str),
    #[error("unknown token: it belongs to no node this CA knows")]
    UnknownToken,
    #[error("node {node} may not hold identity {identity}: no pod with that service account runs there")]
    NotAllowed { node: String, identity: Identity },
    #[error(
        "the API server did not authenticate the token: {reason} (expired, revoked, bound to a pod \
         that is gone, signed by another key, or not issued for audience {audience:?}?)"
    )]
    TokenNotAuthenticated { reason: String, audience: String },
    #[error("the token belongs to {user}, not to the ztunnel service account {want}")]
    WrongServiceAccount { user: String, want: String },
    #[error(
        "the token of {user} is not bound to a pod: ztunnel must present its projected \
         service-account token, which names its pod"
    )]
    NotBoundToPod { user: String },
    #[error("the token's pod {namespace}/{pod} no longer exists (it was deleted or replaced)")]
    PodGone { namespace: String, pod: String },
    #[error("the token's pod {namespace}/{pod} is not scheduled on a node (spec.nodeName is empty)")]
    PodWithoutNode { namespace: String, pod: String },
    #[error(
        "cannot check the token with the API server: {0} (is it reachable, and may the controller \
         create tokenreviews and get pods?)"
    )]
    ReviewFailed(String),
}

/// Decides who may have which identity. Used generically (not as `dyn`); implementations may
/// wait on a remote system (Kubernetes TokenReview), hence async.
pub trait Authorizer: Send + Sync + 'static {
    /// Who presented `bearer_token` (`None`: the request carried none).
    fn authenticate(
        &self,
        bearer_token: Option<&str>,
    ) -> impl Future<Output = Result<Caller, AuthError>> + Send;

    /// Whether `caller` may hold a certificate for `identity`.
    fn authorize(
        &self,
        caller: &Caller,
        identity: &Identity,
    ) -> impl Future<Output = Result<(), AuthError>> + Send;
}

impl<A: Authorizer> Authorizer for std::sync::Arc<A> {
    async fn authenticate(&self, bearer_token: Option<&str>) -> Result<Caller, AuthError> {
        self.as_ref().authenticate(bearer_token).await
    }

    async fn authorize(&self, caller: &Caller, identity: &Identity) -> Result<(), AuthError> {
        self.as_ref().authorize(caller, identity).await
    }
}

/// A fixed table: token -> node, node -> identities its pods run as. For the local cluster and
/// tests; tokens are kept only as SHA-256 digests.
#[derive(Default)]
pub struct StaticAuthorizer {
    tokens: HashMap<TokenDigest, String>,
    identities: HashMap<String, BTreeSet<Identity>>,
}

impl StaticAuthorizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// `token` authenticates `node`. A node may have several tokens; giving the same token again
    /// replaces its node.
    pub fn with_token(mut self, token: &str, node: impl Into<String>) -> Self {
        self.tokens.insert(TokenDigest::of(token), node.into());
        self
    }

    /// A pod running as `identity` runs on `node`.
    pub fn with_identity(mut self, node: impl Into<String>, identity: Identity) -> Self {
        self.identities.entry(node.into()).or_default().insert(identity);
        self
    }
}

impl fmt::Debug for StaticAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticAuthorizer")
            .field("tokens", &self.tokens.len())
            .field("identities", &self.identities)
            .finish()
    }
}

impl Authorizer for StaticAuthorizer {
    async fn authenticate(&self, bearer_token: Option<&str>) -> Result<Caller, AuthError> {
        let token = bearer_token.ok_or(AuthError::NoToken)?;
        let node = self.tokens.get(&TokenDigest::of(token)).ok_or(AuthError::UnknownToken)?;
        Ok(Caller { node: node.clone() })
    }

    async fn authorize(&self, caller: &Caller, identity: &Identity) -> Result<(), AuthError> {
        match self.identities.get(&caller.node) {
            Some(ids) if ids.contains(identity) => Ok(()),
            _ => Err(AuthError::NotAllowed { node: caller.node.clone(), identity: identity.clone() }),
        }
    }
}

/// Tokens from a fixed table (the API server's TokenReview is
/// [`TokenReviewAuthorizer`](super::TokenReviewAuthorizer)); identities from the model: a node may
/// hold the service accounts of the pods the model places on it.
pub struct ModelAuthorizer {
    tokens: StaticAuthorizer,
    identities: ModelIdentities,
}

/// The identities a node may hold according to the model: the service accounts of the pods it
/// places on that node. Shared by the authorizers that consult the model.
#[derive(Clone)]
pub(crate) struct ModelIdentities {
    trust_domain: String,
    model: tokio::sync::watch::Receiver<std::sync::Arc<crate::model::Model>>,
}

impl ModelIdentities {
    pub(crate) fn new(
        trust_domain: &str,
        model: tokio::sync::watch::Receiver<std::sync::Arc<crate::model::Model>>,
    ) -> Self {
        ModelIdentities { trust_domain: trust_domain.to_owned(), model }
    }

    /// Whether a pod running as `identity` is on `caller`'s node.
    pub(crate) fn check(&self, caller: &Caller, identity: &Identity) -> Result<(), AuthError> {
        let model = self.model.borrow().clone();
        if model.identities_on_node(&self.trust_domain, &caller.node).contains(identity) {
            Ok(())
        } else {
            Err(AuthError::NotAllowed { node: caller.node.clone(), identity: identity.clone() })
        }
    }
}

impl ModelAuthorizer {
    /// `tokens` authenticates callers (its identity table is not consulted).
    pub fn new(
        tokens: StaticAuthorizer,
        trust_domain: &str,
        model: tokio::sync::watch::Receiver<std::sync::Arc<crate::model::Model>>,
    ) -> Self {
        ModelAuthorizer { tokens, identities: ModelIdentities::new(trust_domain, model) }
    }
}

impl fmt::Debug for ModelAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelAuthorizer")
            .field("tokens", &self.tokens.tokens.len())
            .field("trust_domain", &self.identities.trust_domain)
            .finish()
    }
}

impl Authorizer for ModelAuthorizer {
    async fn authenticate(&self, bearer_token: Option<&str>) -> Result<Caller, AuthError> {
        self.tokens.authenticate(bearer_token).await
    }

    async fn authorize(&self, caller: &Caller, identity: &Identity) -> Result<(), AuthError> {
        self.identities.check(caller, identity)
    }
}

/// SHA-256 of a token: lookups compare digests, so their timing says nothing about the token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub(crate) fn of(token: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        TokenDigest(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    fn table() -> StaticAuthorizer {
        StaticAuthorizer::new()
            .with_token("t-a", "node-a")
            .with_token("t-a2", "node-a")
            .with_token("t-b", "node-b")
            .with_identity("node-a", id("spiffe://cluster.local/ns/default/sa/web"))
            .with_identity("node-a", id("spiffe://cluster.local/ns/default/sa/db"))
            .with_identity("node-b", id("spiffe://cluster.local/ns/shop/sa/cart"))
    }

    #[tokio::test]
    async fn authenticates_known_tokens_only() {
        let auth = table();
        let cases: &[(Option<&str>, Result<&str, AuthError>)] = &[
            (Some("t-a"), Ok("node-a")),
            (Some("t-a2"), Ok("node-a")),
            (Some("t-b"), Ok("node-b")),
            (None, Err(AuthError::NoToken)),
            (Some(""), Err(AuthError::UnknownToken)),
            (Some("t-A"), Err(AuthError::UnknownToken)),
            (Some("t-a "), Err(AuthError::UnknownToken)),
        ];
        for (token, want) in cases {
            let got = auth.authenticate(*token).await.map(|c| c.node);
            assert_eq!(got.as_deref().map_err(Clone::clone), want.clone(), "token {token:?}");
        }
    }

    #[tokio::test]
    async fn authorizes_only_identities_of_the_callers_node() {
        let auth = table();
        let cases: &[(&str, &str, bool)] = &[
            ("node-a", "spiffe://cluster.local/ns/default/sa/web", true),
            ("node-a", "spiffe://cluster.local/ns/default/sa/db", true),
            ("node-a", "spiffe://cluster.local/ns/shop/sa/cart", false),
            ("node-b", "spiffe://cluster.local/ns/shop/sa/cart", true),
            ("node-b", "spiffe://cluster.local/ns/default/sa/web", false),
            ("node-c", "spiffe://cluster.local/ns/default/sa/web", false),
            ("node-a", "spiffe://other.org/ns/default/sa/web", false),
        ];
        for (node, identity, allowed) in cases {
            let caller = Caller { node: (*node).to_owned() };
            let got = auth.authorize(&caller, &id(identity)).await;
            assert_eq!(got.is_ok(), *allowed, "{node} {identity}: {got:?}");
            if let Err(e) = got {
                let msg = e.to_string();
                assert!(msg.contains(node) && msg.contains(identity), "{msg}");
            }
        }
    }

    #[test]
    fn debug_never_shows_tokens() {
        let shown = format!("{:?}", table());
        assert!(!shown.contains("t-a"), "{shown}");
    }
}
