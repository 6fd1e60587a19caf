//! Who may hold which identity: authenticating a caller from its bearer token and deciding whether
//! that caller may hold a SPIFFE identity. Knows nothing of gRPC, CSRs or certificates.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;

use weft_core::Identity;

use super::waypoint_tokens::WaypointTokenDir;
use crate::model::GATEWAY_NAME_LABEL;

/// An authenticated caller of the CA (and of xDS, which asks the same token).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Caller {
    /// A node agent (ztunnel) acting for the in-mesh pods of its node.
    NodeAgent {
        /// The name of the node the caller runs on.
        node: String,
    },
    /// A waypoint: a pod of the `istio-waypoint` Gateway `namespace/name`, running as the service
    /// account `name` (as Istio's waypoints do). It acts for itself alone.
    Waypoint { namespace: String, name: String },
}

impl Caller {
    pub fn node_agent(node: impl Into<String>) -> Caller {
        Caller::NodeAgent { node: node.into() }
    }

    pub fn waypoint(namespace: impl Into<String>, name: impl Into<String>) -> Caller {
        Caller::Waypoint { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::NodeAgent { node } => write!(f, "node {node}"),
            Caller::Waypoint { namespace, name } => write!(f, "waypoint {namespace}/{name}"),
        }
    }
}

/// Why a caller was not authenticated or not authorized. Messages never contain a token.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token: send the gRPC metadata \"authorization: Bearer <token>\"")]
    NoToken,
    #[error("malformed authorization metadata: {0}")]
    MalformedHeader(&'static str),
    #[error("unknown token: it belongs to no node or waypoint this CA knows")]
    UnknownToken,
    #[error(
        "node {node} may not hold identity {identity}: no pod with that service account runs there \
         in the mesh (a waypoint's identity is the waypoint's alone)"
    )]
    NotAllowed { node: String, identity: Identity },
    #[error(
        "waypoint {namespace}/{name} may hold only its own identity (service account {name} in \
         namespace {namespace}), not {identity}"
    )]
    WaypointNotAllowed { namespace: String, name: String, identity: Identity },
    #[error(
        "the API server did not authenticate the token: {reason} (expired, revoked, bound to a pod \
         that is gone, signed by another key, or not issued for audience {audience:?}?)"
    )]
    TokenNotAuthenticated { reason: String, audience: String },
    #[error(
        "the token belongs to {user:?}, which is no service account (ztunnel and waypoints present \
         their pods' projected service-account tokens)"
    )]
    NotAServiceAccount { user: String },
    #[error(
        "the token belongs to {user}, not to the ztunnel service account {want}, and its pod {pod} \
         is not a waypoint's (it lacks the label {GATEWAY_NAME_LABEL}={name})"
    )]
    NotAWaypoint {
        user: String,
        want: String,
        /// `namespace/name`.
        pod: String,
        /// The service account's name, which a waypoint's Gateway (and label) would have.
        name: String,
    },
    #[error(
        "the token of {user} is not bound to a pod: ztunnel must present its projected \
         service-account token, which names its pod (so must a waypoint)"
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

/// Whether `caller` may hold `identity`: the one decision every authorizer takes. A waypoint
/// may hold only its own service account's identity (the CA checks the trust domain); a node
/// agent only one `on_node` says a pod of the mesh on its node runs as.
pub(crate) fn decide(
    caller: &Caller,
    identity: &Identity,
    on_node: impl FnOnce(&str) -> bool,
) -> Result<(), AuthError> {
    match caller {
        Caller::NodeAgent { node } if on_node(node) => Ok(()),
        Caller::NodeAgent { node } => {
            Err(AuthError::NotAllowed { node: node.clone(), identity: identity.clone() })
        }
        Caller::Waypoint { namespace, name }
            if identity.namespace() == namespace && identity.service_account() == name =>
        {
            Ok(())
        }
        Caller::Waypoint { namespace, name } => Err(AuthError::WaypointNotAllowed {
            namespace: namespace.clone(),
            name: name.clone(),
            identity: identity.clone(),
        }),
    }
}

/// A fixed table: token -> caller, node -> identities its pods run as. For the local cluster and
/// tests; tokens are kept only as SHA-256 digests.
#[derive(Default)]
pub struct StaticAuthorizer {
    tokens: HashMap<TokenDigest, Caller>,
    identities: HashMap<String, BTreeSet<Identity>>,
}

impl StaticAuthorizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// `token` authenticates the node agent of `node`. A node may have several tokens; giving the
    /// same token again replaces its caller.
    pub fn with_token(mut self, token: &str, node: impl Into<String>) -> Self {
        self.tokens.insert(TokenDigest::of(token), Caller::node_agent(node));
        self
    }

    /// `token` authenticates the waypoint `namespace/name`.
    pub fn with_waypoint_token(
        mut self,
        token: &str,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        self.tokens.insert(TokenDigest::of(token), Caller::waypoint(namespace, name));
        self
    }

    /// A pod running as `identity` runs on `node`.
    pub fn with_identity(mut self, node: impl Into<String>, identity: Identity) -> Self {
        self.identities.entry(node.into()).or_default().insert(identity);
        self
    }

    fn lookup(&self, token: &str) -> Option<Caller> {
        self.tokens.get(&TokenDigest::of(token)).cloned()
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
        self.lookup(token).ok_or(AuthError::UnknownToken)
    }

    async fn authorize(&self, caller: &Caller, identity: &Identity) -> Result<(), AuthError> {
        decide(caller, identity, |node| self.identities.get(node).is_some_and(|ids| ids.contains(identity)))
    }
}

/// Tokens from a fixed table and, when given, a directory of waypoint tokens
/// ([`WaypointTokenDir`]; the API server's TokenReview is
/// [`TokenReviewAuthorizer`](super::TokenReviewAuthorizer)); identities from the model: a node
/// may hold the service accounts of the mesh's pods the model places on it, a waypoint its own.
pub struct ModelAuthorizer {
    tokens: StaticAuthorizer,
    waypoints: Option<WaypointTokenDir>,
    identities: ModelIdentities,
}

/// The identities a node may hold according to the model: the service accounts of the pods of
/// the mesh it places on that node. Shared by the authorizers that consult the model.
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

    /// Whether `caller` may hold `identity` ([`decide`], a node's pods from the model).
    pub(crate) fn check(&self, caller: &Caller, identity: &Identity) -> Result<(), AuthError> {
        decide(caller, identity, |node| {
            let model = self.model.borrow().clone();
            model.identities_on_node(&self.trust_domain, node).contains(identity)
        })
    }
}

impl ModelAuthorizer {
    /// `tokens` authenticates callers (its identity table is not consulted).
    pub fn new(
        tokens: StaticAuthorizer,
        trust_domain: &str,
        model: tokio::sync::watch::Receiver<std::sync::Arc<crate::model::Model>>,
    ) -> Self {
        ModelAuthorizer { tokens, waypoints: None, identities: ModelIdentities::new(trust_domain, model) }
    }

    /// A token not in the table is looked up in `dir` ([`WaypointTokenDir`]).
    pub fn with_waypoint_tokens(mut self, dir: WaypointTokenDir) -> Self {
        self.waypoints = Some(dir);
        self
    }
}

impl fmt::Debug for ModelAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelAuthorizer")
            .field("tokens", &self.tokens.tokens.len())
            .field("waypoint_tokens", &self.waypoints)
            .field("trust_domain", &self.identities.trust_domain)
            .finish()
    }
}

impl Authorizer for ModelAuthorizer {
    async fn authenticate(&self, bearer_token: Option<&str>) -> Result<Caller, AuthError> {
        let token = bearer_token.ok_or(AuthError::NoToken)?;
        if let Some(caller) = self.tokens.lookup(token) {
            return Ok(caller);
        }
        self.waypoints.as_ref().and_then(|dir| dir.lookup(token)).ok_or(AuthError::UnknownToken)
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
            .with_waypoint_token("t-wp", "shop", "waypoint")
            .with_identity("node-a", id("spiffe://cluster.local/ns/default/sa/web"))
            .with_identity("node-a", id("spiffe://cluster.local/ns/default/sa/db"))
            .with_identity("node-b", id("spiffe://cluster.local/ns/shop/sa/cart"))
    }

    #[tokio::test]
    async fn authenticates_known_tokens_only() {
        let auth = table();
        let cases: &[(Option<&str>, Result<Caller, AuthError>)] = &[
            (Some("t-a"), Ok(Caller::node_agent("node-a"))),
            (Some("t-a2"), Ok(Caller::node_agent("node-a"))),
            (Some("t-b"), Ok(Caller::node_agent("node-b"))),
            (Some("t-wp"), Ok(Caller::waypoint("shop", "waypoint"))),
            (None, Err(AuthError::NoToken)),
            (Some(""), Err(AuthError::UnknownToken)),
            (Some("t-A"), Err(AuthError::UnknownToken)),
            (Some("t-a "), Err(AuthError::UnknownToken)),
        ];
        for (token, want) in cases {
            assert_eq!(&auth.authenticate(*token).await, want, "token {token:?}");
        }
    }

    /// Every (caller, identity) pair: a node agent holds the identities of its node's pods, a
    /// waypoint its own only, whatever runs where.
    #[tokio::test]
    async fn authorizes_node_agents_for_their_nodes_and_waypoints_for_themselves() {
        let auth = table();
        let node = Caller::node_agent;
        let waypoint = Caller::waypoint;
        let cases: &[(Caller, &str, bool)] = &[
            (node("node-a"), "spiffe://cluster.local/ns/default/sa/web", true),
            (node("node-a"), "spiffe://cluster.local/ns/default/sa/db", true),
            (node("node-a"), "spiffe://cluster.local/ns/shop/sa/cart", false),
            (node("node-b"), "spiffe://cluster.local/ns/shop/sa/cart", true),
            (node("node-b"), "spiffe://cluster.local/ns/default/sa/web", false),
            (node("node-c"), "spiffe://cluster.local/ns/default/sa/web", false),
            (node("node-a"), "spiffe://other.org/ns/default/sa/web", false),
            (node("node-b"), "spiffe://cluster.local/ns/shop/sa/waypoint", false),
            (waypoint("shop", "waypoint"), "spiffe://cluster.local/ns/shop/sa/waypoint", true),
            (waypoint("shop", "waypoint"), "spiffe://cluster.local/ns/shop/sa/cart", false),
            (waypoint("shop", "waypoint"), "spiffe://cluster.local/ns/other/sa/waypoint", false),
            (waypoint("shop", "waypoint"), "spiffe://cluster.local/ns/default/sa/web", false),
            (waypoint("shop", "other-wp"), "spiffe://cluster.local/ns/shop/sa/waypoint", false),
        ];
        for (caller, identity, allowed) in cases {
            let got = auth.authorize(caller, &id(identity)).await;
            assert_eq!(got.is_ok(), *allowed, "{caller} {identity}: {got:?}");
            if let Err(e) = got {
                let msg = e.to_string();
                let who = match caller {
                    Caller::NodeAgent { node } => format!("node {node}"),
                    Caller::Waypoint { namespace, name } => format!("waypoint {namespace}/{name}"),
                };
                assert!(msg.contains(&who) && msg.contains(identity), "{msg}");
            }
        }
    }

    #[test]
    fn debug_never_shows_tokens() {
        let shown = format!("{:?}", table());
        assert!(!shown.contains("t-a") && !shown.contains("t-wp"), "{shown}");
    }
}
