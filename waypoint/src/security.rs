//! The security stage of a request, first of all stages as in Istio's waypoint (Envoy's
//! `jwt_authn`, then `rbac`, then fault injection and the router): the RequestAuthentications
//! that apply validate the request's JWT ([`crate::jwt`]), then the AuthorizationPolicies that
//! apply decide ([`crate::authz`]).
//!
//! What applies (Istio's ambient rules): policies whose `targetRefs` name this waypoint's
//! Gateway or the `istio-waypoint` GatewayClass (carried at the waypoint level of the resource)
//! apply to every request through it; those naming a Service apply to requests for that
//! Service. A workload's own traffic (a workload bound to this waypoint, called by address)
//! gets the waypoint-level ones.
//!
//! Answers, as Envoy's: an invalid token is 401 with the JWT filter's reason as body; a denied
//! request is 403 `RBAC: access denied`. A gRPC request gets the same as a trailers-only
//! response: UNAUTHENTICATED (16) or PERMISSION_DENIED (7). Neither answer reaches the backend;
//! the token never appears in a log line.

use std::net::SocketAddr;

use http::request::Parts;
use http::StatusCode;

use crate::authz::{self, Auth, Decision, Policy};
use crate::jwks::Jwks;
use crate::jwt::{self, Authenticated, JwtRule};
use crate::model::{Service, Waypoint};

/// A request refused by the stage.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    /// The answer's body (Envoy's text).
    pub body: String,
    /// For the log: why, and the policy that denied (`<namespace>.<name>`) when one did.
    pub reason: String,
    pub policy: Option<String>,
}

/// What the stage learned of an allowed request: its JWT principal and the AUDIT policies that
/// matched it.
#[derive(Debug, Default)]
pub struct Allowed {
    pub principal: Option<String>,
    pub audited: Vec<String>,
}

/// The connection facts a policy reads.
pub struct Peer<'a> {
    pub identity: &'a weft_core::identity::Identity,
    pub client: SocketAddr,
    /// Where the client sent to (the service VIP and port, or the workload).
    pub destination: SocketAddr,
}

/// Runs the stage over `parts` (a token may be removed, claims copied into headers).
pub async fn check(
    config: &Waypoint,
    service: Option<&Service>,
    jwks: &Jwks,
    peer: &Peer<'_>,
    parts: &mut Parts,
) -> Result<Allowed, Refused> {
    let rules: Vec<&JwtRule> = config
        .security
        .request_authentications
        .iter()
        .chain(service.into_iter().flat_map(|s| s.security.request_authentications.iter()))
        .flat_map(|ra| ra.rules.iter())
        .collect();
    let authenticated: Option<Authenticated> = if rules.is_empty() {
        None
    } else {
        jwt::authenticate(&rules, jwks, parts).await.map_err(|refusal| Refused {
            status: refusal.status,
            body: refusal.body.to_string(),
            reason: refusal.reason,
            policy: None,
        })?
    };
    let policies: Vec<&Policy> = config
        .security
        .policies
        .iter()
        .chain(service.into_iter().flat_map(|s| s.security.policies.iter()))
        .collect();
    let principal = authenticated.as_ref().map(|a| a.principal.clone());
    if policies.is_empty() {
        return Ok(Allowed { principal, audited: Vec::new() });
    }
    let auth = authenticated.as_ref().map(|a| Auth {
        principal: &a.principal,
        audiences: &a.audiences,
        presenter: a.presenter.as_deref(),
        claims: &a.claims,
    });
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or_default();
    let request = authz::Request {
        source_identity: Some(peer.identity),
        source_ip: peer.client.ip(),
        remote_ip: peer.client.ip(),
        destination: peer.destination,
        host,
        method: parts.method.as_str(),
        path,
        headers: &parts.headers,
        sni: None,
        auth,
    };
    match authz::authorize(&policies, &request) {
        Decision::Allow { audited } => Ok(Allowed { principal, audited }),
        Decision::Deny { policy, reason, .. } => {
            // Envoy's body; a CUSTOM policy's denial also says which provider is missing, since
            // the client can do nothing else about it.
            let custom = policy.as_ref().is_some_and(|key| {
                policies.iter().any(|p| p.key() == *key && matches!(p.action, authz::Action::Custom { .. }))
            });
            let body = if custom {
                format!("{}: {reason}", authz::DENIED_BODY)
            } else {
                authz::DENIED_BODY.to_owned()
            };
            Err(Refused { status: StatusCode::FORBIDDEN, body, reason, policy })
        }
    }
}
