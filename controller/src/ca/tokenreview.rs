//! Authenticating ztunnels and waypoints by their Kubernetes service-account token: the bearer
//! token goes to the API server as a TokenReview (audience `istio-ca`) and must be bound to a pod.
//! A token of the configured ztunnel service account is the node agent of that pod's
//! `spec.nodeName`; a token of any other service account `<ns>/<sa>` whose pod carries the label
//! `gateway.networking.k8s.io/gateway-name=<sa>` (as waypoint pods do) is the waypoint `<ns>/<sa>`;
//! any other token is refused. Which identities a node may hold comes from the model, as for
//! [`ModelAuthorizer`](super::ModelAuthorizer); a waypoint holds only its own.
//! Successful reviews are cached briefly by token digest; refusals never are. Knows nothing of
//! gRPC, CSRs or certificates.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use weft_core::Identity;

use super::authz::{AuthError, Authorizer, Caller, ModelIdentities, TokenDigest};
use crate::model::{Model, GATEWAY_NAME_LABEL};

/// The audience Istio's CA expects, and ztunnel's projected token carries.
pub const TOKEN_AUDIENCE: &str = "istio-ca";
/// How long a successful review is trusted without asking the API server again (never longer
/// than the token itself is valid).
pub const REVIEW_CACHE_TTL: Duration = Duration::from_secs(60);
/// The key of `status.user.extra` naming the pod a token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The key of `status.user.extra` holding that pod's uid.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// At most this many reviews are cached; beyond it, expired ones are dropped, then all.
const MAX_CACHED: usize = 4096;

/// A service account, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccountRef {
    /// The user name the API server gives its tokens: `system:serviceaccount:<ns>:<name>`.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceAccountRef {
    type Err = String;

    /// `NAMESPACE/NAME`, both DNS labels (lowercase letters, digits, '-'; at most 63).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (namespace, name) = s
            .split_once('/')
            .ok_or_else(|| "expected NAMESPACE/NAME, e.g. weft-system/ztunnel".to_owned())?;
        for (what, part) in [("namespace", namespace), ("name", name)] {
            let label_ok = !part.is_empty()
                && part.len() <= 63
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-');
            if !label_ok {
                return Err(format!(
                    "the {what} {part:?} is not a DNS label (lowercase letters, digits and '-', at most 63)"
                ));
            }
        }
        Ok(ServiceAccountRef { namespace: namespace.to_owned(), name: name.to_owned() })
    }
}

/// Who a TokenReview says presented a token: a service account, and the pod its token is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Reviewed {
    account: ServiceAccountRef,
    pod: String,
    pod_uid: Option<String>,
}

/// Authenticates callers with the API server's TokenReview and authorizes from the model.
pub struct TokenReviewAuthorizer {
    client: Client,
    ztunnel: ServiceAccountRef,
    identities: ModelIdentities,
    cache: Mutex<HashMap<TokenDigest, Cached>>,
    cache_ttl: Duration,
}

#[derive(Clone)]
struct Cached {
    caller: Caller,
    until: Instant,
}

impl TokenReviewAuthorizer {
    /// Reviews tokens through `client`; only tokens bound to a pod pass, of `ztunnel` (a node
    /// agent) or of a waypoint.
    pub fn new(
        client: Client,
        ztunnel: ServiceAccountRef,
        trust_domain: &str,
        model: watch::Receiver<Arc<Model>>,
    ) -> Self {
        TokenReviewAuthorizer {
            client,
            ztunnel,
            identities: ModelIdentities::new(trust_domain, model),
            cache: Mutex::new(HashMap::new()),
            cache_ttl: REVIEW_CACHE_TTL,
        }
    }

    /// How long a successful review is reused (default [`REVIEW_CACHE_TTL`]; zero: never).
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    fn cached(&self, digest: &TokenDigest) -> Option<Caller> {
        let cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.get(digest).filter(|c| c.until > Instant::now()).map(|c| c.caller.clone())
    }

    fn remember(&self, digest: TokenDigest, caller: &Caller, token: &str) {
        let ttl = match jwt_expiry(token).and_then(|exp| exp.duration_since(SystemTime::now()).ok()) {
            Some(left) => left.min(self.cache_ttl),
            None => self.cache_ttl,
        };
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| c.until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(digest, Cached { caller: caller.clone(), until: now + ttl });
    }

    /// Asks the API server who `token` is, then reads its pod; returns who that makes the caller.
    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::ReviewFailed(e.to_string()))?;
        let reviewed = reviewed_status(&reviewed.status.unwrap_or_default())?;

        let namespace = &reviewed.account.namespace;
        let gone = || AuthError::PodGone { namespace: namespace.clone(), pod: reviewed.pod.clone() };
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(&reviewed.pod)
            .await
            .map_err(|e| AuthError::ReviewFailed(e.to_string()))?
            .ok_or_else(gone)?;
        if reviewed.pod_uid.is_some() && pod.metadata.uid != reviewed.pod_uid {
            return Err(gone());
        }
        caller_of(&reviewed, &pod, &self.ztunnel)
    }
}

impl fmt::Debug for TokenReviewAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cached = self.cache.lock().map_or(0, |c| c.len());
        f.debug_struct("TokenReviewAuthorizer")
            .field("ztunnel", &self.ztunnel)
            .field("cached reviews", &cached)
            .field("cache_ttl", &self.cache_ttl)
            .finish()
    }
}

impl Authorizer for TokenReviewAuthorizer {
    async fn authenticate(&self, bearer_token: Option<&str>) -> Result<Caller, AuthError> {
        let token = bearer_token.ok_or(AuthError::NoToken)?;
        let digest = TokenDigest::of(token);
        if let Some(caller) = self.cached(&digest) {
            return Ok(caller);
        }
        let caller = self.review(token).await?;
        tracing::debug!(%caller, "token review passed");
        self.remember(digest, &caller, token);
        Ok(caller)
    }

    async fn authorize(&self, caller: &Caller, identity: &Identity) -> Result<(), AuthError> {
        self.identities.check(caller, identity)
    }
}

/// What a TokenReview's status says about the caller: authenticated for [`TOKEN_AUDIENCE`], as a
/// service account, bound to a pod.
fn reviewed_status(status: &TokenReviewStatus) -> Result<Reviewed, AuthError> {
    if status.authenticated != Some(true) {
        let reason =
            status.error.clone().filter(|e| !e.is_empty()).unwrap_or_else(|| "no reason given".into());
        return Err(AuthError::TokenNotAuthenticated { reason, audience: TOKEN_AUDIENCE.to_owned() });
    }
    // An authenticator that ignores audiences answers with none: the token is then only known to
    // be good for the API server itself, not for this CA.
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == TOKEN_AUDIENCE) {
        return Err(AuthError::TokenNotAuthenticated {
            reason: format!("the token is valid for audiences {audiences:?} only"),
            audience: TOKEN_AUDIENCE.to_owned(),
        });
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let account = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(namespace, name)| !namespace.is_empty() && !name.is_empty())
        .map(|(namespace, name)| ServiceAccountRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        });
    let Some(account) = account else {
        return Err(AuthError::NotAServiceAccount { user: username });
    };
    let extra = user.extra.unwrap_or_default();
    let first =
        |key: &str| extra.get(key).and_then(|values| values.first()).filter(|v| !v.is_empty()).cloned();
    let pod = first(POD_NAME_EXTRA).ok_or(AuthError::NotBoundToPod { user: username })?;
    Ok(Reviewed { account, pod, pod_uid: first(POD_UID_EXTRA) })
}

/// Who a reviewed token's holder is, given its pod: the ztunnel service account's is the node
/// agent of the pod's node; another service account's is a waypoint when its pod is labelled as
/// the pod of a Gateway of the service account's name (Istio's waypoints run as
/// `<gateway name>`); anyone else is refused.
fn caller_of(reviewed: &Reviewed, pod: &Pod, ztunnel: &ServiceAccountRef) -> Result<Caller, AuthError> {
    let account = &reviewed.account;
    if account == ztunnel {
        return match pod.spec.as_ref().and_then(|spec| spec.node_name.clone()).filter(|node| !node.is_empty())
        {
            Some(node) => Ok(Caller::node_agent(node)),
            None => Err(AuthError::PodWithoutNode {
                namespace: account.namespace.clone(),
                pod: reviewed.pod.clone(),
            }),
        };
    }
    let labels = pod.metadata.labels.as_ref();
    if labels.and_then(|l| l.get(GATEWAY_NAME_LABEL)) == Some(&account.name) {
        return Ok(Caller::waypoint(account.namespace.clone(), account.name.clone()));
    }
    Err(AuthError::NotAWaypoint {
        user: account.username(),
        want: ztunnel.username(),
        pod: format!("{}/{}", account.namespace, reviewed.pod),
        name: account.name.clone(),
    })
}

/// The `exp` claim of a JWT, read without checking the signature (the API server did that): it
/// only shortens how long a review is cached.
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn ztunnel() -> ServiceAccountRef {
        "weft-system/ztunnel".parse().unwrap()
    }

    fn status(authenticated: bool, audiences: &[&str], user: &str, pod: Option<&str>) -> TokenReviewStatus {
        let extra = pod.map(|p| {
            BTreeMap::from([
                (POD_NAME_EXTRA.to_owned(), vec![p.to_owned()]),
                (POD_UID_EXTRA.to_owned(), vec!["uid-1".to_owned()]),
            ])
        });
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            error: (!authenticated).then(|| "token has expired".to_owned()),
            user: Some(UserInfo { username: Some(user.to_owned()), extra, ..UserInfo::default() }),
        }
    }

    /// A review's status, and the (service account, pod) it names or a fragment of the refusal.
    type StatusCase<'a> = (TokenReviewStatus, Result<(&'a str, &'a str), &'a str>);

    #[test]
    fn review_status_table() {
        let zt = "system:serviceaccount:weft-system:ztunnel";
        let cases: &[StatusCase<'_>] = &[
            (
                status(true, &["istio-ca"], zt, Some("ztunnel-abc")),
                Ok(("weft-system/ztunnel", "ztunnel-abc")),
            ),
            (
                status(true, &["istio-ca", "other"], zt, Some("ztunnel-abc")),
                Ok(("weft-system/ztunnel", "ztunnel-abc")),
            ),
            (
                status(true, &["istio-ca"], "system:serviceaccount:shop:waypoint", Some("waypoint-1")),
                Ok(("shop/waypoint", "waypoint-1")),
            ),
            (
                status(false, &[], zt, Some("ztunnel-abc")),
                Err("did not authenticate the token: token has expired"),
            ),
            (TokenReviewStatus::default(), Err("no reason given")),
            (status(true, &[], zt, Some("ztunnel-abc")), Err("valid for audiences [] only")),
            (status(true, &["https://kubernetes.default.svc"], zt, Some("z")), Err("valid for audiences")),
            (
                status(true, &["istio-ca"], "admin", Some("z")),
                Err("belongs to \"admin\", which is no service account"),
            ),
            (
                status(true, &["istio-ca"], "system:serviceaccount:shop", Some("z")),
                Err("which is no service account"),
            ),
            (status(true, &["istio-ca"], zt, None), Err("is not bound to a pod")),
            (status(true, &["istio-ca"], zt, Some("")), Err("is not bound to a pod")),
        ];
        for (status, want) in cases {
            let got = reviewed_status(status);
            match (want, &got) {
                (Ok((account, pod)), Ok(reviewed)) => {
                    assert_eq!(reviewed.account.to_string(), *account);
                    assert_eq!(reviewed.pod, *pod);
                    assert_eq!(reviewed.pod_uid.as_deref(), Some("uid-1"));
                }
                (Err(fragment), Err(e)) => assert!(e.to_string().contains(fragment), "{e}"),
                _ => panic!("{status:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// Who the holder of a reviewed token is, by its service account and its pod's node and labels.
    #[test]
    fn caller_table() {
        let pod = |node: Option<&str>, gateway: Option<&str>| Pod {
            metadata: kube::api::ObjectMeta {
                labels: gateway.map(|g| BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), g.to_owned())])),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: node.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        };
        let reviewed =
            |account: &str| Reviewed { account: account.parse().unwrap(), pod: "p-0".into(), pod_uid: None };
        let cases: &[(&str, Pod, Result<Caller, &str>)] = &[
            ("weft-system/ztunnel", pod(Some("node-a"), None), Ok(Caller::node_agent("node-a"))),
            // The ztunnel's account is a node agent even if its pod were labelled as a Gateway's.
            ("weft-system/ztunnel", pod(Some("node-a"), Some("ztunnel")), Ok(Caller::node_agent("node-a"))),
            ("weft-system/ztunnel", pod(None, None), Err("weft-system/p-0 is not scheduled on a node")),
            ("weft-system/ztunnel", pod(Some(""), None), Err("is not scheduled on a node")),
            (
                "shop/waypoint",
                pod(Some("node-a"), Some("waypoint")),
                Ok(Caller::waypoint("shop", "waypoint")),
            ),
            ("shop/waypoint", pod(None, Some("waypoint")), Ok(Caller::waypoint("shop", "waypoint"))),
            // Same name, ztunnel's namespace: a waypoint named ztunnel there, not a node agent.
            ("other/ztunnel", pod(Some("node-a"), Some("ztunnel")), Ok(Caller::waypoint("other", "ztunnel"))),
            (
                "shop/web",
                pod(Some("node-a"), None),
                Err("belongs to system:serviceaccount:shop:web, not to the ztunnel service account \
                     system:serviceaccount:weft-system:ztunnel, and its pod shop/p-0 is not a waypoint's \
                     (it lacks the label gateway.networking.k8s.io/gateway-name=web)"),
            ),
            (
                "shop/web",
                pod(Some("node-a"), Some("waypoint")),
                Err("lacks the label gateway.networking.k8s.io/gateway-name=web"),
            ),
            ("other-ns/ztunnel", pod(Some("node-a"), None), Err("not to the ztunnel service account")),
        ];
        for (account, pod, want) in cases {
            let got = caller_of(&reviewed(account), pod, &ztunnel());
            match (want, &got) {
                (Ok(caller), Ok(got)) => assert_eq!(got, caller, "{account}"),
                (Err(fragment), Err(e)) => assert!(e.to_string().contains(fragment), "{account}: {e}"),
                _ => panic!("{account} {pod:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn service_account_flag_values() {
        assert_eq!(ztunnel().username(), "system:serviceaccount:weft-system:ztunnel");
        assert_eq!(ztunnel().to_string(), "weft-system/ztunnel");
        for bad in ["ztunnel", "/ztunnel", "weft-system/", "Weft/ztunnel", "a/b/c", "-a/b", "a/b_c"] {
            assert!(bad.parse::<ServiceAccountRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn expiry_is_read_from_the_payload() {
        let encode = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
        };
        let token = format!("h.{}.s", encode(&serde_json::json!({"exp": 2_000_000_000u64, "sub": "x"})));
        assert_eq!(jwt_expiry(&token), Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000)));
        assert_eq!(jwt_expiry("not-a-jwt"), None);
        assert_eq!(jwt_expiry(&format!("h.{}.s", encode(&serde_json::json!({"sub": "x"})))), None);
        assert_eq!(jwt_expiry("h.!!!.s"), None);
    }
}
