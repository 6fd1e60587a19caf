//! Istio's RequestAuthentication in the waypoint, as Envoy's `jwt_authn` filter applies it: the
//! JWT rules as typed values (converted from the proto here), where a request's tokens are found,
//! whether each verifies, and what is done to the request when they do. Pure but for
//! [`authenticate`], which asks [`crate::jwks::Jwks`] for keys; it owns no I/O and no policy
//! decision beyond authentication (authorization policies decide later on the principal).
//!
//! What is decided, as Istio and Envoy decide it:
//! - Locations: a rule's `fromHeaders` (the prefix matched case-insensitively and stripped, then
//!   the run of base64url characters and dots taken, as Envoy's extractor does), `fromParams` and
//!   `fromCookies`; a rule with none uses `Authorization: Bearer <token>` and the `access_token`
//!   query parameter.
//! - No token in any rule's location: the request passes unauthenticated (Istio turns a
//!   RequestAuthentication into `requires_any` with `allow_missing`).
//! - Every token found must verify (Envoy: a request with one good and one bad token is refused,
//!   so that a backend cannot read the bad one as the verified one). A token is verified against
//!   the rule that lists its location and whose `issuer` equals its `iss`; none → "Jwt issuer is
//!   not configured". The checks run in Envoy's order: format, issuer, `exp`/`nbf` (60 s clock
//!   skew), audiences (must intersect the rule's when it lists any), then the signature with the
//!   keys chosen by `kid` and by the key's `alg`/`kty`/`crv` fitting the token's `alg`
//!   (jwt_verify_lib's rule: no fitting key → "Jwks doesn't have key to match kid or alg from
//!   Jwt", fitting keys that all fail → "Jwt verification fails").
//! - A refusal answers 401 with Envoy's body, jwt_verify_lib's `getStatusString` texts (Envoy's
//!   `filter.cc` answers "Audiences in Jwt are not allowed" with 403; issue 13 asks 401 for every
//!   invalid token).
//! - On success: the `outputPayloadToHeader` and `outputClaimToHeaders` headers a client sent are
//!   removed first (Envoy sanitizes the payload header; it is done for claim headers too), the
//!   token is removed from where it was found unless `forwardOriginalToken`, the payload header
//!   carries the token's base64url payload segment and each claim header the claim's value
//!   (string as is, integer or bool as text, `a.b` reaching into objects; other types skipped).
//!
//! Deviations: algorithms are those `jsonwebtoken` verifies (RS/PS 256/384/512, ES256/384,
//! EdDSA); ES512 and HS* tokens never find a fitting key (HMAC `oct` keys are never loaded, which
//! also rules out key confusion); `alg: none` is "not supported" as in jwt_verify_lib. A token
//! over [`MAX_TOKEN_BYTES`] is refused before it is decoded ("Jwt verification fails"; Envoy
//! would have refused the oversized header at its codec). A token in a cookie is removed from the
//! `Cookie` header too (Envoy leaves cookies as they are).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, COOKIE};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{StatusCode, Uri};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use weft_core::proto::weft::waypoint::v1 as wp;

use crate::jwks::Jwks;

/// The largest token decoded; a bigger one is refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Envoy's default `clock_skew_seconds` for `exp` and `nbf`.
pub const CLOCK_SKEW_SECS: u64 = 60;
/// The JWKS fetch timeout when a rule sets none (Envoy's and Istio's default).
pub const DEFAULT_JWKS_TIMEOUT: Duration = Duration::from_secs(5);
const BEARER_PREFIX: &str = "Bearer ";
const ACCESS_TOKEN_PARAM: &str = "access_token";

/// Where a token is looked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// A header; `prefix` (may be empty) is matched case-insensitively and stripped.
    Header { name: HeaderName, prefix: String },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

/// Where a rule's keys come from.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// The rule's inline `jwks`, parsed once.
    Inline(Arc<KeySet>),
    /// An `http(s)` `jwksUri`, fetched and cached by [`Jwks`].
    Remote(String),
}

/// One `jwtRules` entry, checked.
#[derive(Clone, Debug)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: KeySource,
    /// Never empty: the defaults are filled in.
    pub locations: Vec<Location>,
    pub output_payload_to_header: Option<HeaderName>,
    pub forward_original_token: bool,
    /// (header, claim) pairs.
    pub output_claim_to_headers: Vec<(HeaderName, String)>,
    /// The JWKS fetch timeout.
    pub timeout: Duration,
}

/// A RequestAuthentication that applies to this waypoint or one of its services.
#[derive(Clone, Debug)]
pub struct RequestAuthentication {
    pub name: String,
    pub namespace: String,
    pub rules: Vec<JwtRule>,
}

/// The public keys of a JWK set that can verify a token: RSA, EC P-256/P-384 and Ed25519 keys;
/// others (`oct`, P-521, unparseable entries) are skipped.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<Key>,
    /// Tokens whose signature these keys have verified (see [`VerifiedTokens`]).
    verified: Arc<Mutex<VerifiedTokens>>,
}

/// Tokens a key set has verified, so a token seen again costs a lookup instead of a signature
/// check (Envoy's jwt_authn keeps a cache of verified tokens too). Entries are whole tokens,
/// compared exactly (no hash is trusted), at most [`VERIFIED_TOKENS`] of them, none longer than
/// [`VERIFIED_TOKEN_BYTES`]; the oldest goes first. Only the signature is cached: time,
/// issuer and audience are checked on every request. A refetched key set starts empty, so a
/// rotated-out key's tokens are checked again, and fail.
#[derive(Default)]
struct VerifiedTokens {
    tokens: std::collections::HashSet<Box<str>>,
    order: std::collections::VecDeque<Box<str>>,
}

/// How many verified tokens a key set remembers, and the longest it remembers.
const VERIFIED_TOKENS: usize = 256;
const VERIFIED_TOKEN_BYTES: usize = 8 * 1024;

impl VerifiedTokens {
    fn contains(&self, token: &str) -> bool {
        self.tokens.contains(token)
    }

    fn insert(&mut self, token: &str) {
        if token.len() > VERIFIED_TOKEN_BYTES || self.tokens.contains(token) {
            return;
        }
        if self.order.len() >= VERIFIED_TOKENS {
            if let Some(oldest) = self.order.pop_front() {
                self.tokens.remove(&oldest);
            }
        }
        self.order.push_back(token.into());
        self.tokens.insert(token.into());
    }
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    /// The JWK's `alg`, when it names one: `Some(None)` for an `alg` no token can use.
    alg: Option<Option<Algorithm>>,
    kind: KeyKind,
    decoding: DecodingKey,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

/// Why a token was refused: jwt_verify_lib's statuses that this module can reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    JwtBadFormat,
    JwtHeaderBadBase64,
    JwtHeaderBadJson,
    JwtHeaderBadAlg,
    JwtHeaderNotImplementedAlg,
    JwtHeaderBadKid,
    JwtPayloadBadBase64,
    JwtPayloadBadJson,
    JwtIssNotString,
    JwtSubNotString,
    JwtIatNotInteger,
    JwtIatOutOfRange,
    JwtNbfNotInteger,
    JwtNbfOutOfRange,
    JwtExpNotInteger,
    JwtExpOutOfRange,
    JwtJtiNotString,
    JwtAudNotString,
    JwtSignatureBadBase64,
    JwtUnknownIssuer,
    JwtAudienceNotAllowed,
    JwtVerificationFail,
    JwtNotYetValid,
    JwtExpired,
    JwksKidAlgMismatch,
    JwksFetchFail,
    /// Not jwt_verify_lib's: a token over [`MAX_TOKEN_BYTES`].
    JwtTooLarge,
}

/// A request refused by authentication: the local reply and, for logs, why (never the token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub body: &'static str,
    pub code: Status,
    pub reason: String,
}

/// A verified token.
#[derive(Clone, Debug, PartialEq)]
pub struct Authenticated {
    pub issuer: String,
    pub subject: String,
    /// `<iss>/<sub>`, Istio's request principal.
    pub principal: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    pub claims: Value,
}

/// A token found in a request, with the rules (indices) that list its location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub location: Location,
    pub token: String,
    pub rules: Vec<usize>,
}

/// A token split and decoded, not yet verified.
#[derive(Clone, Debug)]
pub struct Token<'a> {
    /// `header.payload`, what the signature covers.
    signed: &'a str,
    payload_b64: &'a str,
    signature_b64: &'a str,
    alg: TokenAlg,
    kid: Option<String>,
    iss: String,
    sub: String,
    aud: Vec<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    azp: Option<String>,
    claims: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenAlg {
    Verifiable(Algorithm),
    /// jwt_verify_lib knows it (HS*, ES512) but no key here can verify it.
    NoKeyFits,
}

/// The keys a rule's remote `jwksUri` has, as the pure [`check`] asks for them.
pub type KeyLookup<'a> = &'a dyn Fn(&str) -> Option<Arc<KeySet>>;

/// What [`check`] decided.
#[derive(Debug)]
pub enum Check {
    /// Every token found verified (possibly none were found).
    Pass(Verified),
    Refuse(Refusal),
    /// Keys for `uri` are needed first (none cached, or none with the token's `kid`).
    Fetch {
        uri: String,
        timeout: Duration,
    },
}

/// The tokens that verified, in the order found, with the rule (index) each verified against.
#[derive(Debug, Default)]
pub struct Verified {
    pub tokens: Vec<(Found, usize, Authenticated, String)>,
}

impl Status {
    /// jwt_verify_lib's `getStatusString`, the body of Envoy's local reply.
    pub fn text(self) -> &'static str {
        match self {
            Status::JwtBadFormat => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            Status::JwtHeaderBadBase64 => "Jwt header is an invalid Base64url encoded",
            Status::JwtHeaderBadJson => "Jwt header is an invalid JSON",
            Status::JwtHeaderBadAlg => "Jwt header [alg] field is required and must be a string",
            Status::JwtHeaderNotImplementedAlg => "Jwt header [alg] is not supported",
            Status::JwtHeaderBadKid => "Jwt header [kid] field is not a string",
            Status::JwtPayloadBadBase64 => "Jwt payload is an invalid Base64url encoded",
            Status::JwtPayloadBadJson => "Jwt payload is an invalid JSON",
            Status::JwtIssNotString => "Jwt payload [iss] field is not a string",
            Status::JwtSubNotString => "Jwt payload [sub] field is not a string",
            Status::JwtIatNotInteger => "Jwt payload [iat] field is not an integer",
            Status::JwtIatOutOfRange => "Jwt payload [iat] field is not a positive 64 bit integer",
            Status::JwtNbfNotInteger => "Jwt payload [nbf] field is not an integer",
            Status::JwtNbfOutOfRange => "Jwt payload [nbf] field is not a positive 64 bit integer",
            Status::JwtExpNotInteger => "Jwt payload [exp] field is not an integer",
            Status::JwtExpOutOfRange => "Jwt payload [exp] field is not a positive 64 bit integer",
            Status::JwtJtiNotString => "Jwt payload [jti] field is not a string",
            Status::JwtAudNotString => "Jwt payload [aud] field is not a string or string list",
            Status::JwtSignatureBadBase64 => "Jwt signature is an invalid Base64url encoded",
            Status::JwtUnknownIssuer => "Jwt issuer is not configured",
            Status::JwtAudienceNotAllowed => "Audiences in Jwt are not allowed",
            Status::JwtVerificationFail | Status::JwtTooLarge => "Jwt verification fails",
            Status::JwtNotYetValid => "Jwt not yet valid",
            Status::JwtExpired => "Jwt is expired",
            Status::JwksKidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
            Status::JwksFetchFail => "Jwks remote fetch is failed",
        }
    }

    /// The local reply's status: 401 for every refusal. (Envoy answers a token for another
    /// audience with 403; Weft's issue 13 asks 401 for every invalid token, the status a client
    /// re-authenticates on, and the body still names the audience.)
    pub fn http_status(self) -> StatusCode {
        StatusCode::UNAUTHORIZED
    }

    fn refuse(self, reason: impl Into<String>) -> Refusal {
        Refusal { status: self.http_status(), body: self.text(), code: self, reason: reason.into() }
    }
}

impl KeySet {
    /// Parses a JWK set (`{"keys": [...]}`), with jwt_verify_lib's texts for a set that has no
    /// usable key.
    pub fn parse(json: &str) -> Result<KeySet, String> {
        let value: Value = serde_json::from_str(json).map_err(|_| "Jwks is an invalid JSON".to_string())?;
        let Some(keys) = value.get("keys") else {
            return Err("Jwks does not have [keys] field".into());
        };
        let Some(keys) = keys.as_array() else {
            return Err("[keys] in Jwks is not an array".into());
        };
        let keys: Vec<Key> = keys.iter().filter_map(Key::from_value).collect();
        if keys.is_empty() {
            return Err("Jwks doesn't have any valid public key".into());
        }
        Ok(KeySet { keys, verified: Arc::default() })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys' `kid`s, in order (for the config dump and tests).
    pub fn kids(&self) -> Vec<Option<&str>> {
        self.keys.iter().map(|k| k.kid.as_deref()).collect()
    }
}

impl Key {
    fn from_value(value: &Value) -> Option<Key> {
        let jwk: Jwk = serde_json::from_value(value.clone()).ok()?;
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyKind::Rsa,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => KeyKind::P256,
                EllipticCurve::P384 => KeyKind::P384,
                _ => return None,
            },
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => KeyKind::Ed25519,
            _ => return None,
        };
        let decoding = DecodingKey::from_jwk(&jwk).ok()?;
        let alg = jwk.common.key_algorithm.map(|a| match a {
            KeyAlgorithm::RS256 => Some(Algorithm::RS256),
            KeyAlgorithm::RS384 => Some(Algorithm::RS384),
            KeyAlgorithm::RS512 => Some(Algorithm::RS512),
            KeyAlgorithm::PS256 => Some(Algorithm::PS256),
            KeyAlgorithm::PS384 => Some(Algorithm::PS384),
            KeyAlgorithm::PS512 => Some(Algorithm::PS512),
            KeyAlgorithm::ES256 => Some(Algorithm::ES256),
            KeyAlgorithm::ES384 => Some(Algorithm::ES384),
            KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
            _ => None,
        });
        Some(Key { kid: jwk.common.key_id, alg, kind, decoding })
    }

    /// jwt_verify_lib's key choice: the `kid`s agree when both have one, the key's `alg` (when
    /// it has one) is the token's, and the key's type and curve fit the token's algorithm.
    fn fits(&self, kid: Option<&str>, alg: Algorithm) -> bool {
        if let (Some(want), Some(have)) = (kid, self.kid.as_deref()) {
            if want != have {
                return false;
            }
        }
        if let Some(key_alg) = self.alg {
            if key_alg != Some(alg) {
                return false;
            }
        }
        matches!(
            (self.kind, alg),
            (
                KeyKind::Rsa,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (KeyKind::P256, Algorithm::ES256)
                | (KeyKind::P384, Algorithm::ES384)
                | (KeyKind::Ed25519, Algorithm::EdDSA)
        )
    }
}

impl Location {
    fn describe(&self) -> String {
        match self {
            Location::Header { name, .. } => format!("header {name}"),
            Location::Param(p) => format!("query parameter {p}"),
            Location::Cookie(c) => format!("cookie {c}"),
        }
    }
}

impl Verified {
    /// The first verified token's identity, the request's principal.
    pub fn first(&self) -> Option<Authenticated> {
        self.tokens.first().map(|(_, _, a, _)| a.clone())
    }
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.iter().map(|k| (k.kid.as_deref(), k.kind))).finish()
    }
}

impl TryFrom<&wp::JwtRule> for JwtRule {
    type Error = String;

    fn try_from(rule: &wp::JwtRule) -> Result<Self, String> {
        if rule.issuer.is_empty() {
            return Err("jwtRules.issuer: must be set".into());
        }
        let keys = if !rule.jwks.is_empty() {
            let set = KeySet::parse(&rule.jwks)
                .map_err(|e| format!("jwtRules.jwks (issuer {}): {e}", rule.issuer))?;
            KeySource::Inline(Arc::new(set))
        } else {
            let uri: Uri = rule.jwks_uri.parse().map_err(|_| {
                format!("jwtRules.jwksUri (issuer {}): {:?} is not a URI", rule.issuer, rule.jwks_uri)
            })?;
            match uri.scheme_str() {
                Some("http" | "https") if uri.host().is_some() => {}
                _ => {
                    return Err(format!(
                        "jwtRules.jwksUri (issuer {}): {:?} is not an http(s) URI (OpenID \
                         discovery from the issuer is not supported: set jwksUri or jwks)",
                        rule.issuer, rule.jwks_uri
                    ))
                }
            }
            KeySource::Remote(rule.jwks_uri.clone())
        };
        let mut locations = Vec::new();
        for h in &rule.from_headers {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("jwtRules.fromHeaders.name: {:?} is not a header name", h.name))?;
            locations.push(Location::Header { name, prefix: h.prefix.clone() });
        }
        for p in &rule.from_params {
            if p.is_empty() {
                return Err("jwtRules.fromParams: empty parameter name".into());
            }
            locations.push(Location::Param(p.clone()));
        }
        for c in &rule.from_cookies {
            if c.is_empty() {
                return Err("jwtRules.fromCookies: empty cookie name".into());
            }
            locations.push(Location::Cookie(c.clone()));
        }
        if locations.is_empty() {
            locations.push(Location::Header { name: AUTHORIZATION, prefix: BEARER_PREFIX.into() });
            locations.push(Location::Param(ACCESS_TOKEN_PARAM.into()));
        }
        let output_payload_to_header = match rule.output_payload_to_header.as_str() {
            "" => None,
            h => Some(
                HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("jwtRules.outputPayloadToHeader: {h:?} is not a header name"))?,
            ),
        };
        let mut output_claim_to_headers = Vec::new();
        for c in &rule.output_claim_to_headers {
            let header = HeaderName::from_bytes(c.header.as_bytes()).map_err(|_| {
                format!("jwtRules.outputClaimToHeaders.header: {:?} is not a header name", c.header)
            })?;
            if c.claim.is_empty() {
                return Err("jwtRules.outputClaimToHeaders.claim: must be set".into());
            }
            output_claim_to_headers.push((header, c.claim.clone()));
        }
        let timeout = match &rule.timeout {
            None => DEFAULT_JWKS_TIMEOUT,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err("jwtRules.timeout: must not be negative".into())
            }
            Some(d) if d.seconds == 0 && d.nanos == 0 => DEFAULT_JWKS_TIMEOUT,
            Some(d) => Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs()),
        };
        Ok(JwtRule {
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            keys,
            locations,
            output_payload_to_header,
            forward_original_token: rule.forward_original_token,
            output_claim_to_headers,
            timeout,
        })
    }
}

impl TryFrom<&wp::RequestAuthentication> for RequestAuthentication {
    type Error = String;

    fn try_from(ra: &wp::RequestAuthentication) -> Result<Self, String> {
        let rules = ra
            .jwt_rules
            .iter()
            .map(JwtRule::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("RequestAuthentication {}/{}: {e}", ra.namespace, ra.name))?;
        Ok(RequestAuthentication { name: ra.name.clone(), namespace: ra.namespace.clone(), rules })
    }
}

fn b64url() -> &'static GeneralPurpose {
    static ENGINE: OnceLock<GeneralPurpose> = OnceLock::new();
    ENGINE.get_or_init(|| {
        GeneralPurpose::new(
            &alphabet::URL_SAFE,
            GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
        )
    })
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// Finds the tokens in the request's rule locations (each location once, whatever the number of
/// rules listing it). Safe on any header bytes.
pub fn extract(rules: &[&JwtRule], parts: &Parts) -> Vec<Found> {
    let mut found: Vec<Found> = Vec::new();
    let mut seen: Vec<(&Location, Option<usize>)> = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        for location in &rule.locations {
            if let Some((_, slot)) = seen.iter().find(|(l, _)| *l == location) {
                if let Some(f) = slot.and_then(|s| found.get_mut(s)) {
                    if !f.rules.contains(&i) {
                        f.rules.push(i);
                    }
                }
                continue;
            }
            let token = token_at(location, parts);
            let slot = token.map(|token| {
                found.push(Found { location: location.clone(), token, rules: vec![i] });
                found.len() - 1
            });
            seen.push((location, slot));
        }
    }
    found
}

fn token_at(location: &Location, parts: &Parts) -> Option<String> {
    let token = match location {
        Location::Header { name, prefix } => {
            let value = parts.headers.get(name)?.as_bytes();
            if prefix.is_empty() {
                String::from_utf8_lossy(value).trim().to_string()
            } else {
                let p = prefix.as_bytes();
                if value.len() < p.len() || !value[..p.len()].eq_ignore_ascii_case(p) {
                    return None;
                }
                let rest = &value[p.len()..];
                let start = rest.iter().position(|b| is_token_char(*b))?;
                let len = rest[start..].iter().take_while(|b| is_token_char(**b)).count();
                String::from_utf8_lossy(&rest[start..start + len]).into_owned()
            }
        }
        Location::Param(param) => {
            let query = parts.uri.query()?;
            query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(k) == *param).then(|| percent_decode(v))
            })?
        }
        Location::Cookie(cookie) => parts.headers.get_all(COOKIE).iter().find_map(|value| {
            let value = value.to_str().ok()?;
            value.split(';').find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k.trim() == cookie).then(|| v.trim().trim_matches('"').to_string())
            })
        })?,
    };
    (!token.is_empty()).then_some(token)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits and decodes a token as jwt_verify_lib's `Jwt::parseFromString` does (no signature or
/// time check). Safe on any input.
pub fn parse(token: &str) -> Result<Token<'_>, Status> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Status::JwtTooLarge);
    }
    let mut segments = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (segments.next(), segments.next(), segments.next(), segments.next())
    else {
        return Err(Status::JwtBadFormat);
    };
    let header = b64url().decode(header_b64).map_err(|_| Status::JwtHeaderBadBase64)?;
    let header: Value = serde_json::from_slice(&header).map_err(|_| Status::JwtHeaderBadJson)?;
    let header = header.as_object().ok_or(Status::JwtHeaderBadJson)?;
    let alg = match header.get("alg").and_then(Value::as_str) {
        None => return Err(Status::JwtHeaderBadAlg),
        Some(alg) => match alg {
            "RS256" => TokenAlg::Verifiable(Algorithm::RS256),
            "RS384" => TokenAlg::Verifiable(Algorithm::RS384),
            "RS512" => TokenAlg::Verifiable(Algorithm::RS512),
            "PS256" => TokenAlg::Verifiable(Algorithm::PS256),
            "PS384" => TokenAlg::Verifiable(Algorithm::PS384),
            "PS512" => TokenAlg::Verifiable(Algorithm::PS512),
            "ES256" => TokenAlg::Verifiable(Algorithm::ES256),
            "ES384" => TokenAlg::Verifiable(Algorithm::ES384),
            "EdDSA" => TokenAlg::Verifiable(Algorithm::EdDSA),
            "ES512" | "HS256" | "HS384" | "HS512" => TokenAlg::NoKeyFits,
            _ => return Err(Status::JwtHeaderNotImplementedAlg),
        },
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(Status::JwtHeaderBadKid),
    };
    let payload = b64url().decode(payload_b64).map_err(|_| Status::JwtPayloadBadBase64)?;
    let claims: Value = serde_json::from_slice(&payload).map_err(|_| Status::JwtPayloadBadJson)?;
    let object = claims.as_object().ok_or(Status::JwtPayloadBadJson)?;
    let string = |name: &str, err: Status| match object.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(err),
    };
    let iss = string("iss", Status::JwtIssNotString)?.unwrap_or_default();
    let sub = string("sub", Status::JwtSubNotString)?.unwrap_or_default();
    string("jti", Status::JwtJtiNotString)?;
    let azp = object.get("azp").and_then(Value::as_str).map(str::to_string);
    let time = |name: &str, not_int: Status, range: Status| match object.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(v), _, _) => Ok(Some(v)),
            (None, Some(_), _) => Err(range),
            (None, None, Some(f)) if f.fract() == 0.0 && f >= 0.0 && f < u64::MAX as f64 => {
                Ok(Some(f as u64))
            }
            (None, None, Some(f)) if f.fract() == 0.0 => Err(range),
            _ => Err(not_int),
        },
        Some(_) => Err(not_int),
    };
    time("iat", Status::JwtIatNotInteger, Status::JwtIatOutOfRange)?;
    let nbf = time("nbf", Status::JwtNbfNotInteger, Status::JwtNbfOutOfRange)?;
    let exp = time("exp", Status::JwtExpNotInteger, Status::JwtExpOutOfRange)?;
    let aud = match object.get("aud") {
        None => Vec::new(),
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|a| a.as_str().map(str::to_string).ok_or(Status::JwtAudNotString))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(Status::JwtAudNotString),
    };
    if b64url().decode(signature_b64).is_err() {
        return Err(Status::JwtSignatureBadBase64);
    }
    let signed = &token[..header_b64.len() + 1 + payload_b64.len()];
    Ok(Token { signed, payload_b64, signature_b64, alg, kid, iss, sub, aud, exp, nbf, azp, claims })
}

impl Token<'_> {
    /// jwt_verify_lib's `verifyTimeConstraint`.
    fn check_time(&self, now: u64) -> Result<(), Status> {
        if self.nbf.is_some_and(|nbf| now.saturating_add(CLOCK_SKEW_SECS) < nbf) {
            return Err(Status::JwtNotYetValid);
        }
        if self.exp.is_some_and(|exp| now > exp.saturating_add(CLOCK_SKEW_SECS)) {
            return Err(Status::JwtExpired);
        }
        Ok(())
    }

    fn check_audiences(&self, rule: &JwtRule) -> Result<(), Status> {
        if rule.audiences.is_empty() || self.aud.iter().any(|a| rule.audiences.contains(a)) {
            Ok(())
        } else {
            Err(Status::JwtAudienceNotAllowed)
        }
    }

    /// The signature, with jwt_verify_lib's choice of keys.
    fn check_signature(&self, keys: &KeySet) -> Result<(), Status> {
        let TokenAlg::Verifiable(alg) = self.alg else {
            return Err(Status::JwksKidAlgMismatch);
        };
        let whole = format!("{}.{}", self.signed, self.signature_b64);
        let verified = || keys.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified().contains(&whole) {
            return Ok(());
        }
        let mut fitting = false;
        for key in keys.keys.iter().filter(|k| k.fits(self.kid.as_deref(), alg)) {
            fitting = true;
            let ok =
                jsonwebtoken::crypto::verify(self.signature_b64, self.signed.as_bytes(), &key.decoding, alg);
            if matches!(ok, Ok(true)) {
                verified().insert(&whole);
                return Ok(());
            }
        }
        Err(if fitting { Status::JwtVerificationFail } else { Status::JwksKidAlgMismatch })
    }

    fn authenticated(&self) -> Authenticated {
        Authenticated {
            issuer: self.iss.clone(),
            subject: self.sub.clone(),
            principal: format!("{}/{}", self.iss, self.sub),
            audiences: self.aud.clone(),
            presenter: self.azp.clone(),
            claims: self.claims.clone(),
        }
    }
}

/// The whole decision for one request, pure: every token found in the rules' locations must
/// verify. `keys` gives the cached keys of a remote `jwksUri`; `refetched` lists the URIs already
/// refetched for this request, whose missing keys or `kid` are then final.
pub fn check(
    rules: &[&JwtRule],
    parts: &Parts,
    now: u64,
    keys: KeyLookup<'_>,
    refetched: &[String],
) -> Check {
    let mut verified = Verified::default();
    for found in extract(rules, parts) {
        let at = found.location.describe();
        let refuse = |s: Status, why: String| Check::Refuse(s.refuse(format!("token in {at}: {why}")));
        let token = match parse(&found.token) {
            Ok(t) => t,
            Err(Status::JwtTooLarge) => {
                return refuse(
                    Status::JwtTooLarge,
                    format!("{} bytes, over the {MAX_TOKEN_BYTES} byte limit", found.token.len()),
                )
            }
            Err(s) => return refuse(s, s.text().to_string()),
        };
        let Some(&ri) = found.rules.iter().find(|&&r| rules.get(r).is_some_and(|r| r.issuer == token.iss))
        else {
            return refuse(
                Status::JwtUnknownIssuer,
                format!("issuer {:?} is not one of the rules for this location", token.iss),
            );
        };
        let Some(rule) = rules.get(ri) else {
            return refuse(Status::JwtUnknownIssuer, "no rule".into());
        };
        if let Err(s) = token.check_time(now) {
            return refuse(
                s,
                format!("issuer {}: exp {:?} nbf {:?} now {now}", rule.issuer, token.exp, token.nbf),
            );
        }
        if let Err(s) = token.check_audiences(rule) {
            return refuse(
                s,
                format!("issuer {}: audiences {:?} not in {:?}", rule.issuer, token.aud, rule.audiences),
            );
        }
        let (set, remote) = match &rule.keys {
            KeySource::Inline(set) => (set.clone(), None),
            KeySource::Remote(uri) => match keys(uri) {
                Some(set) => (set, Some(uri)),
                None if refetched.contains(uri) => {
                    return refuse(
                        Status::JwksFetchFail,
                        format!("issuer {}: no keys from {uri}", rule.issuer),
                    )
                }
                None => return Check::Fetch { uri: uri.clone(), timeout: rule.timeout },
            },
        };
        if let Err(s) = token.check_signature(&set) {
            // An unknown `kid` may be a rotation not seen yet: refetch once, then decide.
            if let (Status::JwksKidAlgMismatch, Some(uri)) = (s, remote) {
                if !refetched.contains(uri) {
                    return Check::Fetch { uri: uri.clone(), timeout: rule.timeout };
                }
            }
            return refuse(s, format!("issuer {}: kid {:?}, {} keys", rule.issuer, token.kid, set.len()));
        }
        let payload = token.payload_b64.to_string();
        let auth = token.authenticated();
        verified.tokens.push((found, ri, auth, payload));
    }
    Check::Pass(verified)
}

/// Applies a passing decision to the request: drops client-sent output headers, removes each
/// verified token unless its rule forwards it, and sets the payload and claim headers.
pub fn apply(rules: &[&JwtRule], parts: &mut Parts, verified: &Verified) {
    for rule in rules {
        if let Some(h) = &rule.output_payload_to_header {
            parts.headers.remove(h);
        }
        for (h, _) in &rule.output_claim_to_headers {
            parts.headers.remove(h);
        }
    }
    for (found, ri, auth, payload) in &verified.tokens {
        let Some(rule) = rules.get(*ri) else { continue };
        if !rule.forward_original_token {
            remove_token(&found.location, parts);
        }
        if let Some(h) = &rule.output_payload_to_header {
            if let Ok(v) = HeaderValue::from_str(payload) {
                parts.headers.insert(h.clone(), v);
            }
        }
        for (h, claim) in &rule.output_claim_to_headers {
            if let Some(v) = claim_value(&auth.claims, claim).and_then(|v| HeaderValue::from_str(&v).ok()) {
                parts.headers.insert(h.clone(), v);
            }
        }
    }
}

/// A claim as header text: strings as they are, integers and bools as text; `a.b` reaches into
/// objects when there is no claim named `a.b`.
pub fn claim_value(claims: &Value, claim: &str) -> Option<String> {
    let value = claims.get(claim).or_else(|| claim.split('.').try_fold(claims, |v, part| v.get(part)))?;
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn remove_token(location: &Location, parts: &mut Parts) {
    match location {
        Location::Header { name, .. } => {
            parts.headers.remove(name);
        }
        Location::Param(param) => {
            let Some(query) = parts.uri.query() else { return };
            let kept: Vec<&str> = query
                .split('&')
                .filter(|pair| percent_decode(pair.split_once('=').map_or(pair, |(k, _)| k)) != *param)
                .collect();
            let path = parts.uri.path().to_string();
            let pq = if kept.is_empty() { path.clone() } else { format!("{path}?{}", kept.join("&")) };
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            // A path and query cut from a valid one stays valid; if not, the query goes whole,
            // so the token is never forwarded.
            uri.path_and_query = Some(
                PathAndQuery::try_from(pq)
                    .or_else(|_| PathAndQuery::try_from(path))
                    .unwrap_or_else(|_| PathAndQuery::from_static("/")),
            );
            parts.uri = Uri::from_parts(uri).unwrap_or_default();
        }
        Location::Cookie(cookie) => {
            let values: Vec<String> = parts
                .headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| {
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    let kept: Vec<&str> = v
                        .split(';')
                        .map(str::trim)
                        .filter(|p| {
                            !p.is_empty() && p.split_once('=').map_or(*p, |(k, _)| k).trim() != cookie
                        })
                        .collect();
                    (!kept.is_empty()).then(|| kept.join("; "))
                })
                .collect();
            parts.headers.remove(COOKIE);
            for v in values {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    parts.headers.append(COOKIE, v);
                }
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Authenticates one request against `rules` (those of every RequestAuthentication that applies):
/// `Ok(None)` with no token, `Ok(Some(_))` with the first verified token's identity (the request
/// changed as [`apply`] says), `Err` with the local reply to send. Waits for a JWKS refetch (under
/// the rule's timeout, rate-limited by [`Jwks`]) only when the keys or the token's `kid` are missing.
pub async fn authenticate(
    rules: &[&JwtRule],
    keys: &Jwks,
    parts: &mut Parts,
) -> Result<Option<Authenticated>, Refusal> {
    let mut refetched: Vec<String> = Vec::new();
    loop {
        let lookup = |uri: &str| keys.cached(uri);
        match check(rules, parts, unix_now(), &lookup, &refetched) {
            Check::Pass(verified) => {
                apply(rules, parts, &verified);
                return Ok(verified.first());
            }
            Check::Refuse(refusal) => return Err(refusal),
            Check::Fetch { uri, timeout } => {
                keys.refetch(&uri, timeout).await;
                refetched.push(uri);
            }
        }
    }
}

/// Extraction and parsing over a request head made of arbitrary bytes (a first line taken as the
/// URI, then `name: value` lines), for fuzzing: never panics.
#[doc(hidden)]
pub fn fuzz_request_head(data: &[u8]) {
    static RULES: OnceLock<Vec<JwtRule>> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        let keys = KeySource::Inline(Arc::new(KeySet::default()));
        let rule = |locations: Vec<Location>| JwtRule {
            issuer: "fuzz".into(),
            audiences: vec!["a".into()],
            keys: keys.clone(),
            locations,
            output_payload_to_header: Some(HeaderName::from_static("x-payload")),
            forward_original_token: false,
            output_claim_to_headers: vec![(HeaderName::from_static("x-sub"), "sub".into())],
            timeout: DEFAULT_JWKS_TIMEOUT,
        };
        vec![
            rule(vec![
                Location::Header { name: AUTHORIZATION, prefix: BEARER_PREFIX.into() },
                Location::Param(ACCESS_TOKEN_PARAM.into()),
            ]),
            rule(vec![
                Location::Header { name: HeaderName::from_static("x-jwt"), prefix: String::new() },
                Location::Cookie("session".into()),
            ]),
        ]
    });
    let refs: Vec<&JwtRule> = rules.iter().collect();
    let mut lines = data.split(|b| *b == b'\n');
    let mut builder = http::Request::builder();
    if let Some(uri) = lines.next().and_then(|l| Uri::try_from(l.trim_ascii()).ok()) {
        builder = builder.uri(uri);
    }
    let Ok(request) = builder.body(()) else { return };
    let (mut parts, ()) = request.into_parts();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            parts.headers.append(n, v);
        }
    }
    for found in extract(&refs, &parts) {
        let _ = parse(&found.token);
    }
    let lookup = |_: &str| None;
    if let Check::Pass(v) = check(&refs, &parts, unix_now(), &lookup, &[]) {
        apply(&refs, &mut parts, &v);
    }
}

#[cfg(test)]
pub(crate) mod tests;
