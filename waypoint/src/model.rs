//! The waypoint's L7 configuration as the data path reads it: the `weft.waypoint.v1.Waypoint`
//! resource (documented in its .proto) converted into typed values where it enters
//! (`TryFrom`, in `convert`), so nothing deeper sees a generated type. Owns the types, their
//! invariants, the conversion and its [`ResourceError`]; does no I/O and decides nothing about
//! requests ([`crate::route`] does). (The binary's flags will be `config.rs`, as in ztunnel.)
//!
//! The conversion parses once what every request would otherwise re-read:
//! - Regexes are compiled here. Envoy (Istio's waypoint) matches with RE2, which must match the
//!   whole value; match regexes are therefore anchored (`^(?:…)$`). The `regex` crate has RE2's
//!   syntax and linear-time guarantee; the differences that remain are that `\d`, `\w`, `\s` and
//!   `\b` are Unicode-aware here and ASCII in RE2, and that `\C` and `\Q…\E` are refused as
//!   invalid.
//! - Istio's header and query-parameter forms that mean "present" (an empty match, `prefix: ""`,
//!   `regex: "*"` or `regex: ".*"`) become [`ValueMatch::Present`], as Istio translates them.
//! - A `host` or `:authority` in a request header `set`/`add` is an authority rewrite, as in
//!   Istio; other pseudo-headers cannot be changed.
//! - A `uriRegexRewrite` replacement in RE2's form (`\1`) becomes the `regex` crate's (`${1}`).
//! - Zero durations mean "unset", as in Istio (a `timeout: 0s` disables the timeout).
//!
//! A resource with any problem is refused whole, as Envoy NACKs a route configuration with a
//! bad regex; [`ResourceError`] lists every problem of the resource, each naming the service, the
//! VirtualService route or DestinationRule, and the field. Nothing a resource contains panics.
//!
//! Not converted yet: the AuthorizationPolicies and RequestAuthentications the resource carries
//! (the authorization and JWT stages will take them in), and Envoy's `%VAR%` substitution in
//! header values (values are literal here).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use regex::bytes::RegexBuilder as BytesRegexBuilder;
use serde::{Serialize, Serializer};

use weft_core::identity::Identity;

use crate::authz::Policy;
use crate::jwt::RequestAuthentication;

/// The most a match regex or rewrite regex may compile to; a larger one is refused (the default
/// of the `regex` crate, stated so that a hostile pattern is refused rather than allocated).
const REGEX_SIZE_LIMIT: usize = 10 * (1 << 20);

/// Istio's default retry policy (used when a route has none): attempts and conditions.
const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
const DEFAULT_RETRY_ON: [RetryOn; 5] = [
    RetryOn::ConnectFailure,
    RetryOn::RefusedStream,
    RetryOn::Unavailable,
    RetryOn::Cancelled,
    RetryOn::RetriableStatusCodes,
];

/// One waypoint's routing configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    /// The waypoint's own SPIFFE identity.
    #[serde(serialize_with = "display")]
    pub identity: Identity,
    /// The services that send their traffic through this waypoint, by hostname.
    pub services: BTreeMap<String, Service>,
    /// What targets the waypoint itself (its Gateway, or the `istio-waypoint` GatewayClass):
    /// applies to every request through it.
    pub security: Security,
}

/// The AuthorizationPolicies and RequestAuthentications that apply, as [`crate::authz`] and
/// [`crate::jwt`] read them.
#[derive(Clone, Debug, Default)]
pub struct Security {
    pub policies: Vec<Policy>,
    pub request_authentications: Vec<RequestAuthentication>,
}

/// A service bound to the waypoint, with the VirtualService routes and DestinationRule policy
/// that apply to it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Service {
    /// `<name>.<namespace>.svc.cluster.local`.
    pub hostname: String,
    pub name: String,
    pub namespace: String,
    pub ports: BTreeSet<u16>,
    /// The declared protocol of a port; a port not here is detected from its first bytes.
    pub protocols: BTreeMap<u16, PortProtocol>,
    /// In order; the first whose match fits takes the request. Empty: every request goes to the
    /// service itself on the port it was sent to.
    pub routes: Vec<HttpRoute>,
    pub traffic_policy: TrafficPolicy,
    /// The DestinationRule's subsets, by name.
    pub subsets: BTreeMap<String, Subset>,
    /// `<namespace>/<name>` of the VirtualServices and DestinationRule resolved into this entry.
    pub virtual_services: Vec<String>,
    pub destination_rule: Option<String>,
    /// What targets this Service: applies to the requests for it.
    pub security: Security,
}

/// What a Service port declares it carries (Istio's protocol selection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PortProtocol {
    Http,
    Http2,
    Tcp,
}

/// One VirtualService HTTP route.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpRoute {
    /// May be empty.
    pub name: String,
    /// `<namespace>/<name>` of the VirtualService the route comes from.
    pub virtual_service: String,
    /// OR'd; empty matches every request.
    pub matches: Vec<HttpMatch>,
    pub action: Action,
    /// `None`: no timeout.
    pub timeout: Option<Duration>,
    pub retries: Retries,
    pub fault: Fault,
    pub mirrors: Vec<Mirror>,
    pub headers: Headers,
}

/// What a route does with the requests it takes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Action {
    /// Forward to one of the destinations (by weight), after the rewrite.
    Forward { destinations: WeightedDestinations, rewrite: Rewrite },
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with a fixed response.
    DirectResponse(DirectResponse),
}

/// The conditions of one `match` entry; all of them must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HttpMatch {
    pub name: String,
    pub uri: Option<StringMatch>,
    /// Exact and prefix `uri` matches ignore ASCII case (Envoy's `case_sensitive: false`, which
    /// leaves regexes alone).
    pub ignore_uri_case: bool,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: Vec<HeaderMatch>,
    /// Envoy's inverted header matches: a value match holds when the header is present and its
    /// value does not match; a presence match holds when the header is absent.
    pub without_headers: Vec<HeaderMatch>,
    pub query_params: Vec<QueryMatch>,
    /// The service port the request was sent to.
    pub port: Option<u16>,
    /// The source workload's namespace (from its identity).
    pub source_namespace: Option<String>,
    /// Labels the source workload must all have.
    pub source_labels: BTreeMap<String, String>,
}

/// Istio's `StringMatch`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// Matches the whole value.
    Regex(Pattern),
}

/// A regex compiled once, with the pattern it was written as.
#[derive(Clone, Debug, Serialize)]
pub struct Pattern {
    source: String,
    #[serde(skip)]
    regex: regex::bytes::Regex,
}

/// A condition on a header (or `:authority`, `:method`, `:path`, `:scheme`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeaderMatch {
    pub key: HeaderKey,
    pub value: ValueMatch,
}

/// What a header match looks at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum HeaderKey {
    /// `:authority`, also written `host`.
    Authority,
    Method,
    /// `:path`: the path with its query.
    Path,
    Scheme,
    #[serde(serialize_with = "display")]
    Name(HeaderName),
}

/// A condition on a query parameter (its first value, percent-decoded).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

/// Presence, or a value match.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ValueMatch {
    Present,
    Value(StringMatch),
}

/// The destinations of a forwarding route, picked by weight.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightedDestinations {
    entries: Vec<WeightedDestination>,
    /// The sum of the weights; never 0, so a pick always lands on a destination.
    total: NonZeroU64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightedDestination {
    pub destination: Destination,
    /// Share of requests, relative to the route's total; 0 is never picked.
    pub weight: u32,
    /// Header changes for requests sent to this destination.
    pub headers: Headers,
}

/// A host (fully qualified), optionally a subset and a port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    /// `None`: the port the request arrived on.
    pub port: Option<u16>,
}

/// A route's rewrite of forwarded requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rewrite {
    pub uri: Option<UriRewrite>,
    /// The new `:authority` (Host).
    pub authority: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum UriRewrite {
    /// Replaces the part of the path the route's `uri` match matched (Envoy's `prefix_rewrite`):
    /// the prefix of a prefix match, the whole path of an exact or regex match, the leading `/`
    /// when the match has no `uri` condition.
    Prefix(String),
    /// Replaces every match of a regex in the path (not the query), Envoy's `regex_rewrite`.
    Regex(RegexRewrite),
}

/// A regex and its replacement, written in RE2's form (`\1` for a group).
#[derive(Clone, Debug, Serialize)]
pub struct RegexRewrite {
    #[serde(serialize_with = "pattern_source")]
    pattern: regex::Regex,
    replacement: String,
    /// `replacement` in the `regex` crate's form (`${1}`).
    #[serde(skip)]
    expansion: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Redirect {
    /// Replaces the path; the request's query is kept unless this has its own.
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    /// 301, 302, 303, 307 or 308.
    #[serde(serialize_with = "status")]
    pub status: StatusCode,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectResponse {
    #[serde(serialize_with = "status")]
    pub status: StatusCode,
    #[serde(serialize_with = "lossy")]
    pub body: Vec<u8>,
}

/// Header changes of a route or a destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Headers {
    pub request: HeaderOps,
    pub response: HeaderOps,
    /// A `host` or `:authority` set or added on requests: an authority rewrite, as in Istio.
    pub authority: Option<String>,
}

/// Envoy's order: remove, then set (replace every value), then add (append).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HeaderOps {
    #[serde(serialize_with = "pairs")]
    pub set: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "pairs")]
    pub add: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "names")]
    pub remove: Vec<HeaderName>,
}

/// A route's retry policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub enum Retries {
    /// None configured: Istio's default ([`Retries::policy`]).
    #[default]
    Default,
    /// `attempts: 0`.
    Disabled,
    Policy(RetryPolicy),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    pub attempts: NonZeroU32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Vec<RetryOn>,
    /// Statuses retried under [`RetryOn::RetriableStatusCodes`].
    #[serde(serialize_with = "statuses")]
    pub retriable_status_codes: Vec<StatusCode>,
    pub backoff: Option<Duration>,
}

/// Envoy's retry conditions, as Istio's `retryOn` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RetryOn {
    FiveXx,
    GatewayError,
    Reset,
    ResetBeforeRequest,
    ConnectFailure,
    EnvoyRateLimited,
    Retriable4xx,
    RefusedStream,
    RetriableStatusCodes,
    RetriableHeaders,
    Http3PostConnectFailure,
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

/// Fault injection.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Fault {
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Delay {
    pub fixed: Duration,
    pub percentage: Percent,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Abort {
    pub status: AbortStatus,
    pub percentage: Percent,
}

/// What an aborted request is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum AbortStatus {
    #[serde(serialize_with = "status")]
    Http(StatusCode),
    /// A gRPC status code (1 to 16), answered as a trailers-only gRPC response.
    Grpc(u32),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mirror {
    pub destination: Destination,
    pub percentage: Percent,
}

/// A share of requests, 0 to 100 (decimals kept).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize)]
pub struct Percent(f64);

/// A DestinationRule's policy for a host or subset.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TrafficPolicy {
    pub defaults: PortPolicy,
    /// Per-port overrides; each section a port sets replaces the default's.
    pub port_level: BTreeMap<u16, PortPolicy>,
}

/// The sections of a traffic policy; `None`: Istio's default.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PortPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    /// Istio's default for waypoints.
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    Passthrough,
    ConsistentHash(HashKey),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum HashKey {
    #[serde(serialize_with = "display")]
    Header(HeaderName),
    Cookie(String),
    SourceIp,
    QueryParameter(String),
}

/// Limits on connections and requests to a destination; `None`: unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionPool {
    pub max_connections: Option<NonZeroU32>,
    pub connect_timeout: Option<Duration>,
    pub http1_max_pending_requests: Option<NonZeroU32>,
    pub http2_max_requests: Option<NonZeroU32>,
    pub max_requests_per_connection: Option<NonZeroU32>,
    pub max_retries: Option<NonZeroU32>,
    /// `http.idleTimeout`: an upstream connection with no request for this long is closed.
    pub idle_timeout: Option<Duration>,
    pub max_concurrent_streams: Option<NonZeroU32>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// An upstream connection older than this is closed (after its requests end).
    pub max_connection_duration: Option<Duration>,
    /// `tcp.idleTimeout`: a TCP stream with no bytes either way for this long is closed.
    pub tcp_idle_timeout: Option<Duration>,
    pub h2_upgrade_policy: H2Upgrade,
    /// Upstream requests use the client's HTTP version (over the port's declared protocol).
    pub use_client_protocol: bool,
}

/// TCP keepalive on upstream connections; unset fields keep the kernel's setting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TcpKeepalive {
    pub probes: Option<NonZeroU32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

/// Whether HTTP/1.1 requests go upstream as HTTP/2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum H2Upgrade {
    /// Istio's mesh default: not upgraded.
    #[default]
    Default,
    DoNotUpgrade,
    Upgrade,
}

/// Ejection of failing endpoints. Counts are as the controller sent them (0: that check is off;
/// the wire format cannot say "unset", so Istio's default of 5 is the controller's to fill in);
/// durations `None`: Istio's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: u32,
    pub consecutive_gateway_errors: u32,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    /// 0 to 100.
    pub max_ejection_percent: u32,
    /// 0 to 100.
    pub min_health_percent: u32,
    /// Counted only with `split_external_local_origin_errors`.
    pub consecutive_local_origin_failures: u32,
    /// Local-origin failures (connect failure, reset, timeout) count apart from responses.
    pub split_external_local_origin_errors: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Subset {
    pub name: String,
    /// Endpoints whose workload labels include all of these.
    pub labels: BTreeMap<String, String>,
    /// The service's policy with the subset's own sections laid over it (by the controller).
    pub traffic_policy: TrafficPolicy,
}

/// A `Waypoint` resource that was refused, with every problem found in it; the caller keeps the
/// configuration it had (and NACKs the resource).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "waypoint {waypoint}: configuration refused, {} problem(s): {}; fix them in the objects named",
    .problems.len(),
    join(.problems)
)]
pub struct ResourceError {
    /// `<namespace>/<name>` as far as the resource says.
    pub waypoint: String,
    pub problems: Vec<Problem>,
}

/// One problem: where (service, VirtualService route or DestinationRule), which field, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub at: String,
    pub field: String,
    pub reason: String,
}

impl Security {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.request_authentications.is_empty()
    }

    /// The request authentications by name, as they are compared and shown.
    fn names(&self) -> Vec<String> {
        self.request_authentications.iter().map(|r| format!("{}/{}", r.namespace, r.name)).collect()
    }
}

impl PartialEq for Security {
    /// Policies compare whole; request authentications by name (their keys are fetched data).
    fn eq(&self, other: &Security) -> bool {
        self.policies == other.policies && self.names() == other.names()
    }
}

impl Serialize for Security {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut out = s.serialize_struct("Security", 2)?;
        out.serialize_field("policies", &self.policies)?;
        out.serialize_field("request_authentications", &self.names())?;
        out.end()
    }
}

impl Waypoint {
    /// The subset `name` of the service `host`, when this waypoint serves `host` and its
    /// DestinationRule defines it.
    pub fn subset(&self, host: &str, name: &str) -> Option<&Subset> {
        self.services.get(host)?.subsets.get(name)
    }
}

impl Pattern {
    /// The regex as written in the configuration.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the pattern matches the whole of `value`.
    pub fn is_match(&self, value: &[u8]) -> bool {
        self.regex.is_match(value)
    }

    fn new(source: &str) -> Result<Pattern, String> {
        let build = |pattern: &str| {
            BytesRegexBuilder::new(pattern)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| format!("not a valid regex: {e}"))
        };
        // Alone first: a pattern such as `a)|(b` must not escape the anchoring group.
        build(source)?;
        let regex = build(&format!("^(?:{source})$"))?;
        Ok(Pattern { source: source.to_owned(), regex })
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.source == other.source
    }
}

impl RegexRewrite {
    pub fn pattern(&self) -> &str {
        self.pattern.as_str()
    }

    /// The replacement as written (RE2's form).
    pub fn replacement(&self) -> &str {
        &self.replacement
    }

    /// `path` with every match of the regex replaced.
    pub fn apply<'p>(&self, path: &'p str) -> std::borrow::Cow<'p, str> {
        self.pattern.replace_all(path, self.expansion.as_str())
    }

    /// `pattern` and RE2's form of `replacement` (`\0`..`\9` a group, `\\` a backslash),
    /// compiled for `regex::Regex::replace_all`.
    fn new(pattern: &str, replacement: &str) -> Result<RegexRewrite, String> {
        let regex = regex::RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("match: not a valid regex: {e}"))?;
        path_chars(&replacement.replace('\\', "")).map_err(|e| format!("rewrite: {e}"))?;
        let mut expansion = String::with_capacity(replacement.len());
        let mut chars = replacement.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('\\') => expansion.push('\\'),
                    Some(d @ '0'..='9') => {
                        let group = d.to_digit(10).unwrap_or(0) as usize;
                        if group >= regex.captures_len() {
                            return Err(format!(
                                "rewrite: \\{group} names a group the regex does not have ({} groups)",
                                regex.captures_len() - 1
                            ));
                        }
                        expansion.push_str(&format!("${{{group}}}"));
                    }
                    _ => {
                        return Err(
                            "rewrite: a backslash must be followed by a digit or a backslash".to_owned()
                        )
                    }
                },
                '$' => expansion.push_str("$$"),
                c => expansion.push(c),
            }
        }
        Ok(RegexRewrite { pattern: regex, replacement: replacement.to_owned(), expansion })
    }
}

impl PartialEq for RegexRewrite {
    fn eq(&self, other: &RegexRewrite) -> bool {
        self.pattern.as_str() == other.pattern.as_str() && self.replacement == other.replacement
    }
}

impl fmt::Display for HeaderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderKey::Authority => f.write_str(":authority"),
            HeaderKey::Method => f.write_str(":method"),
            HeaderKey::Path => f.write_str(":path"),
            HeaderKey::Scheme => f.write_str(":scheme"),
            HeaderKey::Name(name) => f.write_str(name.as_str()),
        }
    }
}

impl WeightedDestinations {
    /// The destination `pick` lands on: `pick` modulo the total weight, counted along the
    /// destinations in order (with weights 90 and 10, picks 0 to 89 take the first and 90 to 99
    /// the second). A uniformly random `pick` splits requests by weight.
    pub fn pick(&self, pick: u32) -> &WeightedDestination {
        let mut point = u64::from(pick) % self.total.get();
        let mut chosen = None;
        for entry in self.entries.iter().filter(|e| e.weight > 0) {
            chosen = Some(entry);
            let weight = u64::from(entry.weight);
            if point < weight {
                break;
            }
            point -= weight;
        }
        // Invariant: `total` (not 0) is the sum of the weights, so some entry has a weight.
        chosen.expect("a route's weights add up to more than 0")
    }

    pub fn entries(&self) -> &[WeightedDestination] {
        &self.entries
    }
}

impl HeaderOps {
    /// Whether the operations change nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the operations to `headers` in Envoy's order: remove, set, add.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

impl Retries {
    /// The policy that applies: Istio's default when none is configured, `None` when disabled.
    pub fn policy(&self) -> Option<RetryPolicy> {
        match self {
            Retries::Default => Some(RetryPolicy {
                attempts: NonZeroU32::new(DEFAULT_RETRY_ATTEMPTS).unwrap_or(NonZeroU32::MIN),
                per_try_timeout: None,
                retry_on: DEFAULT_RETRY_ON.to_vec(),
                retriable_status_codes: vec![StatusCode::SERVICE_UNAVAILABLE],
                backoff: None,
            }),
            Retries::Disabled => None,
            Retries::Policy(policy) => Some(policy.clone()),
        }
    }
}

impl RetryOn {
    fn parse(name: &str) -> Option<RetryOn> {
        Some(match name {
            "5xx" => RetryOn::FiveXx,
            "gateway-error" => RetryOn::GatewayError,
            "reset" => RetryOn::Reset,
            "reset-before-request" => RetryOn::ResetBeforeRequest,
            "connect-failure" => RetryOn::ConnectFailure,
            "envoy-ratelimited" => RetryOn::EnvoyRateLimited,
            "retriable-4xx" => RetryOn::Retriable4xx,
            "refused-stream" => RetryOn::RefusedStream,
            "retriable-status-codes" => RetryOn::RetriableStatusCodes,
            "retriable-headers" => RetryOn::RetriableHeaders,
            "http3-post-connect-failure" => RetryOn::Http3PostConnectFailure,
            "cancelled" => RetryOn::Cancelled,
            "deadline-exceeded" => RetryOn::DeadlineExceeded,
            "internal" => RetryOn::Internal,
            "resource-exhausted" => RetryOn::ResourceExhausted,
            "unavailable" => RetryOn::Unavailable,
            _ => return None,
        })
    }
}

impl Percent {
    pub const ALL: Percent = Percent(100.0);

    pub fn value(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Percent {
    type Error = String;

    fn try_from(value: f64) -> Result<Percent, String> {
        if (0.0..=100.0).contains(&value) {
            Ok(Percent(value))
        } else {
            Err(format!("{value} is not a percentage from 0 to 100"))
        }
    }
}

impl TrafficPolicy {
    /// The load balancer for requests to `port`.
    pub fn load_balancer(&self, port: u16) -> &LoadBalancer {
        static DEFAULT: LoadBalancer = LoadBalancer::LeastRequest;
        self.section(port, |p| p.load_balancer.as_ref()).unwrap_or(&DEFAULT)
    }

    /// The connection pool limits for `port` (`None`: unlimited).
    pub fn connection_pool(&self, port: u16) -> Option<&ConnectionPool> {
        self.section(port, |p| p.connection_pool.as_ref())
    }

    /// Outlier detection for `port` (`None`: off).
    pub fn outlier_detection(&self, port: u16) -> Option<&OutlierDetection> {
        self.section(port, |p| p.outlier_detection.as_ref())
    }

    fn section<'p, T>(&'p self, port: u16, get: impl Fn(&'p PortPolicy) -> Option<&'p T>) -> Option<&'p T> {
        self.port_level.get(&port).and_then(&get).or_else(|| get(&self.defaults))
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: field `{}`: {}", self.at, self.field, self.reason)
    }
}

/// Characters a path (and query) may carry, so a rewrite never builds a request the proxy
/// cannot send.
fn path_chars(s: &str) -> Result<(), String> {
    match s.bytes().find(|b| !b.is_ascii_graphic() || *b == b'#') {
        None => Ok(()),
        Some(b) => Err(format!("{s:?} has a character a path cannot carry ({:?})", char::from(b))),
    }
}

fn join(problems: &[Problem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

fn display<T: fmt::Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

fn status<S: Serializer>(code: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(code.as_u16())
}

fn statuses<S: Serializer>(codes: &[StatusCode], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(codes.iter().map(StatusCode::as_u16))
}

fn lossy<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(bytes))
}

fn pattern_source<S: Serializer>(regex: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(regex.as_str())
}

fn names<S: Serializer>(names: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(names.iter().map(HeaderName::as_str))
}

fn pairs<S: Serializer>(pairs: &[(HeaderName, HeaderValue)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        pairs
            .iter()
            .map(|(n, v)| [n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()]),
    )
}

mod convert;

#[cfg(test)]
mod tests;
