//! L7 authorization in the waypoint: Istio's AuthorizationPolicy applied to one HTTP request, as
//! Envoy's RBAC (and, for CUSTOM, ext_authz) filters do in Istio's waypoint. Owns the conversion
//! of `weft.waypoint.v1.AuthorizationPolicy` into [`Policy`] (every string form, CIDR, port and
//! condition key parsed once, where the resource enters), the attributes a rule reads
//! ([`Request`], [`Auth`]), the path normalization used for matching ([`normalize_path`]) and
//! the verdict ([`authorize`]). Pure: no I/O, no logging; the caller answers a denial
//! ([`DENIED_BODY`] with 403, or gRPC [`GRPC_PERMISSION_DENIED`]) and reports it.
//!
//! Istio's rules (AuthorizationPolicy reference; pilot's `security/authz/model/generator.go`):
//! - Order: CUSTOM, then DENY, then ALLOW. A matching CUSTOM policy is delegated to its
//!   extension provider; no provider is configured in Weft, so it denies (Istio likewise turns
//!   a CUSTOM policy whose provider is missing into a DENY). A matching DENY denies. If any
//!   ALLOW policy applies, one must match. AUDIT policies never change the verdict; those that
//!   match are listed in it.
//! - A policy matches when one of its rules does; without rules it matches nothing (so an ALLOW
//!   without rules, "allow-nothing", denies everything). A rule matches when one of `from`
//!   matches (or there is none), one of `to` matches (or there is none) and every `when` holds;
//!   a rule without any of them matches every request. Within a source or an operation every
//!   non-empty field must match; a positive field when the attribute is known and one entry
//!   matches it, a `not` field when the attribute is unknown or no entry matches it.
//! - Strings: `*` any non-empty value, `prefix*`, `*suffix`, else exact (core's
//!   [`StringMatch`]). A header, host or method `*` only asks for presence, as Envoy's
//!   `present_match`.
//! - Principals are `<td>/ns/<ns>/sa/<sa>` of the peer certificate; namespaces and service
//!   accounts (`ns/sa`, or `sa` in the policy's namespace) come from that identity; a
//!   plaintext peer matches none of them, but every `not` form.
//! - `requestPrincipals` (and `request.auth.principal`): `iss/sub`, split at the last `/`, each
//!   half matched on its own claim as Istio does: `*` both present, `*x/sub` issuer suffix and
//!   exact subject, `*sub` any issuer and subject suffix, `iss/x*` exact issuer and subject
//!   prefix, `iss*` issuer prefix and any subject, else both exact.
//! - Hosts: the `:authority` as sent, compared case-insensitively; exact means exact, so
//!   `reviews` does *not* match `reviews:9080` (Istio's documented behaviour: write
//!   `reviews:*` too, see its security best practices "writing host match policies").
//! - Methods: case-sensitive. Ports: the destination (service) port the client called.
//! - Paths: matched against [`normalize_path`] of the request path, without its query. Also
//!   Istio's templates: `{*}` one non-empty segment, `{**}` (last) the rest of the path.
//! - `when` keys: `request.headers[<name>]` (name case-insensitive, repeated values joined with
//!   `,`), `source.ip`, `remote.ip`, `destination.ip` (CIDRs), `destination.port`,
//!   `source.namespace`, `source.principal`, `request.auth.principal`,
//!   `request.auth.audiences`, `request.auth.presenter`, `request.auth.claims[a]` and nested
//!   `request.auth.claims[a][b]` (a string claim, or a list claim with a string element, matches;
//!   numbers, booleans and objects never do, as Envoy's string matcher on JWT metadata),
//!   `connection.sni`.
//!
//! Where Weft deviates, and why:
//! - An unknown `when` key (including `experimental.envoy.filters.*`, which names Envoy
//!   metadata Weft has not) does not refuse the policy, because refusing a DENY would let
//!   through what it was written to stop. It fails closed instead: in an ALLOW policy the
//!   condition never holds, in DENY, CUSTOM and AUDIT policies it always holds. The keys are
//!   listed in [`Policy::unsupported`] for the caller to report.
//! - A malformed value (a CIDR longer than its family, a port above 65535, an empty source,
//!   operation or condition, which Istio's validation refuses, a CUSTOM policy without provider)
//!   refuses the policy, naming the field; the caller keeps the previous version.
//! - A principal written with the `spiffe://` scheme is accepted too (as in core's engine).
//! - A request whose path cannot be normalized (a `#` fragment, `%00`, not starting with `/`),
//!   which Envoy answers with 400 before RBAC, is denied here when any policy applies.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use serde::Serialize;
use weft_core::authz::{Cidr, ServiceAccountMatch, StringMatch};
use weft_core::identity::Identity;
use weft_core::proto::weft::waypoint::v1::{self as wp, authorization_policy::Action as WpAction};

/// The body Envoy's RBAC filter answers a denied HTTP request with (status 403).
pub const DENIED_BODY: &str = "RBAC: access denied";
/// The HTTP status of a denial.
pub const DENIED_STATUS: u16 = 403;
/// The gRPC status (`PERMISSION_DENIED`) a denied gRPC request is answered with.
pub const GRPC_PERMISSION_DENIED: u32 = 7;

/// An AuthorizationPolicy that applies to the waypoint's traffic.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub action: Action,
    /// Any rule matching makes the policy match; none: the policy matches nothing.
    pub rules: Vec<Rule>,
    /// The `when` keys Weft cannot evaluate, as `rules[i].when[j].key: "<key>"` (fail closed,
    /// see the module docs).
    pub unsupported: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    /// Delegated to an extension provider (by name); none is configured in Weft.
    Custom {
        provider: String,
    },
}

/// One of Istio's rules.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

/// `from.source`: every non-empty field must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub request_principals: Vec<RequestPrincipalMatch>,
    pub not_request_principals: Vec<RequestPrincipalMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
    pub remote_ip_blocks: Vec<Cidr>,
    pub not_remote_ip_blocks: Vec<Cidr>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
}

/// `to.operation`: every non-empty field must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Operation {
    /// Lowercased; compared with the lowercased `:authority`.
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<PathMatch>,
    pub not_paths: Vec<PathMatch>,
}

/// A `requestPrincipals` entry: the issuer and subject matched separately (Istio's split).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestPrincipalMatch {
    pub issuer: StringMatch,
    pub subject: StringMatch,
}

/// A `paths` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathMatch {
    String(StringMatch),
    /// Istio's path template, by segment (`/a/{*}/b` is `["", "a", {*}, "b"]`).
    Template(Vec<Segment>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Segment {
    Literal(String),
    /// `{*}`: one non-empty segment.
    One,
    /// `{**}` (last): the rest of the path, any number of segments.
    Rest,
}

/// `values` (one must match, when given) and `not_values` (none may match).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Values<T> {
    pub values: Vec<T>,
    pub not_values: Vec<T>,
}

/// A `when` condition, by key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Condition {
    /// `request.headers[<name>]` (lowercase name).
    Header {
        name: String,
        values: Values<StringMatch>,
    },
    SourceIp(Values<Cidr>),
    RemoteIp(Values<Cidr>),
    DestinationIp(Values<Cidr>),
    DestinationPort(Values<u16>),
    SourceNamespace(Values<StringMatch>),
    SourcePrincipal(Values<StringMatch>),
    RequestPrincipal(Values<RequestPrincipalMatch>),
    Audiences(Values<StringMatch>),
    Presenter(Values<StringMatch>),
    /// `request.auth.claims[a][b]...`: the path into the claims.
    Claim {
        path: Vec<String>,
        values: Values<StringMatch>,
    },
    Sni(Values<StringMatch>),
    /// A key Weft cannot evaluate (see the module docs: fails closed).
    Unsupported(String),
}

/// The validated JWT of a request, as the JWT stage reports it.
#[derive(Clone, Copy, Debug)]
pub struct Auth<'a> {
    /// `<iss>/<sub>`.
    pub principal: &'a str,
    /// The `aud` claim.
    pub audiences: &'a [String],
    /// The `azp` claim.
    pub presenter: Option<&'a str>,
    /// The whole payload.
    pub claims: &'a serde_json::Value,
}

/// What a rule reads of a request.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The peer's identity from its certificate; `None` for plaintext.
    pub source_identity: Option<&'a Identity>,
    /// The connection's source address (`source.ip`, `ipBlocks`).
    pub source_ip: IpAddr,
    /// The original client (`remote.ip`, `remoteIpBlocks`): see [`remote_ip`]; without trusted
    /// proxies, the source address.
    pub remote_ip: IpAddr,
    /// The destination address and the service port the client called.
    pub destination: SocketAddr,
    /// The `:authority` (Host) as sent.
    pub host: &'a str,
    pub method: &'a str,
    /// The request path as sent, with its query; empty when the request has none (CONNECT).
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The SNI of the connection; `None` for requests inside HBONE.
    pub sni: Option<&'a str>,
    /// The validated JWT, if any.
    pub auth: Option<Auth<'a>>,
}

/// The verdict on a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `audited`: the keys of the AUDIT policies that matched.
    Allow { audited: Vec<String> },
    /// `policy`: the key of the CUSTOM or DENY policy that matched; `None` when no ALLOW policy
    /// matched (or the path could not be normalized).
    Deny { policy: Option<String>, reason: String, audited: Vec<String> },
}

/// A request's attributes as rules read them, computed once per request.
struct Attrs<'r, 'a> {
    req: &'r Request<'a>,
    /// `<td>/ns/<ns>/sa/<sa>` of the peer.
    principal: Option<String>,
    /// Normalized path without query; `None` when the request has no path.
    path: Option<String>,
    host: String,
    /// JWT issuer and subject.
    iss_sub: Option<(&'a str, &'a str)>,
}

impl TryFrom<&wp::AuthorizationPolicy> for Policy {
    type Error = String;

    /// Converts a policy; an error names the field (`rules[0].from[1].source.ipBlocks[2]`) and
    /// why.
    fn try_from(p: &wp::AuthorizationPolicy) -> Result<Policy, String> {
        let action = match WpAction::try_from(p.action) {
            Ok(WpAction::Allow) => Action::Allow,
            Ok(WpAction::Deny) => Action::Deny,
            Ok(WpAction::Audit) => Action::Audit,
            Ok(WpAction::Custom) if p.provider.is_empty() => {
                return Err("provider: a CUSTOM policy must name an extension provider".into())
            }
            Ok(WpAction::Custom) => Action::Custom { provider: p.provider.clone() },
            Err(_) => return Err(format!("action: unknown value {}", p.action)),
        };
        let mut unsupported = Vec::new();
        let mut rules = Vec::with_capacity(p.rules.len());
        for (r, rule) in p.rules.iter().enumerate() {
            let at = format!("rules[{r}]");
            let from = rule
                .from
                .iter()
                .enumerate()
                .map(|(i, s)| Source::convert(s, &p.namespace, &format!("{at}.from[{i}].source")))
                .collect::<Result<_, _>>()?;
            let to = rule
                .to
                .iter()
                .enumerate()
                .map(|(i, o)| Operation::convert(o, &format!("{at}.to[{i}].operation")))
                .collect::<Result<_, _>>()?;
            let mut when = Vec::with_capacity(rule.when.len());
            for (i, c) in rule.when.iter().enumerate() {
                let condition = Condition::convert(c, &format!("{at}.when[{i}]"))?;
                if let Condition::Unsupported(key) = &condition {
                    unsupported.push(format!("{at}.when[{i}].key: {key:?}"));
                }
                when.push(condition);
            }
            rules.push(Rule { from, to, when });
        }
        Ok(Policy { name: p.name.clone(), namespace: p.namespace.clone(), action, rules, unsupported })
    }
}

impl Policy {
    /// `<namespace>.<name>`, the policy's name in Istio's access logs.
    pub fn key(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    fn matches(&self, attrs: &Attrs) -> bool {
        // Fail closed on conditions Weft cannot evaluate: they never allow, always deny.
        let unknown_holds = self.action != Action::Allow;
        self.rules.iter().any(|r| r.matches(attrs, unknown_holds))
    }
}

impl Rule {
    fn matches(&self, attrs: &Attrs, unknown_holds: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(attrs)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(attrs)))
            && self.when.iter().all(|c| c.holds(attrs, unknown_holds))
    }
}

impl Source {
    fn convert(s: &wp::Source, policy_namespace: &str, at: &str) -> Result<Source, String> {
        let source = Source {
            principals: principals(&s.principals),
            not_principals: principals(&s.not_principals),
            request_principals: s
                .request_principals
                .iter()
                .map(|v| RequestPrincipalMatch::parse(v))
                .collect(),
            not_request_principals: s
                .not_request_principals
                .iter()
                .map(|v| RequestPrincipalMatch::parse(v))
                .collect(),
            namespaces: strings(&s.namespaces),
            not_namespaces: strings(&s.not_namespaces),
            ip_blocks: cidrs(&s.ip_blocks, &format!("{at}.ipBlocks"))?,
            not_ip_blocks: cidrs(&s.not_ip_blocks, &format!("{at}.notIpBlocks"))?,
            remote_ip_blocks: cidrs(&s.remote_ip_blocks, &format!("{at}.remoteIpBlocks"))?,
            not_remote_ip_blocks: cidrs(&s.not_remote_ip_blocks, &format!("{at}.notRemoteIpBlocks"))?,
            service_accounts: service_accounts(
                &s.service_accounts,
                policy_namespace,
                &format!("{at}.serviceAccounts"),
            )?,
            not_service_accounts: service_accounts(
                &s.not_service_accounts,
                policy_namespace,
                &format!("{at}.notServiceAccounts"),
            )?,
        };
        if source == Source::default() {
            return Err(format!("{at}: empty (Istio's validation refuses a source without fields)"));
        }
        Ok(source)
    }

    fn matches(&self, a: &Attrs) -> bool {
        let id = a.req.source_identity;
        let principal = a.principal.as_deref();
        let namespace = id.map(Identity::namespace);
        let sa = |m: &ServiceAccountMatch| {
            id.is_some_and(|i| i.namespace() == m.namespace && i.service_account() == m.service_account)
        };
        let rp = |m: &RequestPrincipalMatch| m.matches(a.iss_sub);
        let src = a.req.source_ip;
        let remote = a.req.remote_ip;
        field(&self.principals, |m| principal.is_some_and(|p| m.matches(p)))
            && not_field(&self.not_principals, |m| principal.is_some_and(|p| m.matches(p)))
            && field(&self.request_principals, rp)
            && not_field(&self.not_request_principals, rp)
            && field(&self.namespaces, |m| namespace.is_some_and(|n| m.matches(n)))
            && not_field(&self.not_namespaces, |m| namespace.is_some_and(|n| m.matches(n)))
            && field(&self.ip_blocks, |c| c.contains(src))
            && not_field(&self.not_ip_blocks, |c| c.contains(src))
            && field(&self.remote_ip_blocks, |c| c.contains(remote))
            && not_field(&self.not_remote_ip_blocks, |c| c.contains(remote))
            && field(&self.service_accounts, sa)
            && not_field(&self.not_service_accounts, sa)
    }
}

impl Operation {
    fn convert(o: &wp::Operation, at: &str) -> Result<Operation, String> {
        let hosts =
            |list: &[String]| list.iter().map(|h| StringMatch::from_istio(&h.to_ascii_lowercase())).collect();
        let operation = Operation {
            hosts: hosts(&o.hosts),
            not_hosts: hosts(&o.not_hosts),
            ports: ports(&o.ports, &format!("{at}.ports"))?,
            not_ports: ports(&o.not_ports, &format!("{at}.notPorts"))?,
            methods: strings(&o.methods),
            not_methods: strings(&o.not_methods),
            paths: paths(&o.paths, &format!("{at}.paths"))?,
            not_paths: paths(&o.not_paths, &format!("{at}.notPaths"))?,
        };
        if operation == Operation::default() {
            return Err(format!("{at}: empty (Istio's validation refuses an operation without fields)"));
        }
        Ok(operation)
    }

    fn matches(&self, a: &Attrs) -> bool {
        let host = |m: &StringMatch| present_or(m, &a.host);
        let method = |m: &StringMatch| present_or(m, a.req.method);
        let port = a.req.destination.port();
        let path = |m: &PathMatch| a.path.as_deref().is_some_and(|p| m.matches(p));
        field(&self.hosts, host)
            && not_field(&self.not_hosts, host)
            && field(&self.ports, |p| *p == port)
            && not_field(&self.not_ports, |p| *p == port)
            && field(&self.methods, method)
            && not_field(&self.not_methods, method)
            && field(&self.paths, path)
            && not_field(&self.not_paths, path)
    }
}

impl RequestPrincipalMatch {
    /// Istio's split of `iss/sub` with its `*` forms (see the module docs).
    fn parse(value: &str) -> RequestPrincipalMatch {
        let (iss, sub, found) = match value.rsplit_once('/') {
            Some((iss, sub)) => (iss, sub, true),
            None => (value, "", false),
        };
        let exact = |s: &str| StringMatch::Exact(s.to_owned());
        let (issuer, subject) = if value == "*" {
            (StringMatch::Presence, StringMatch::Presence)
        } else if let Some(rest) = value.strip_prefix('*') {
            if found {
                let issuer = match iss.strip_prefix('*') {
                    Some("") => StringMatch::Presence,
                    Some(suffix) => StringMatch::Suffix(suffix.to_owned()),
                    None => exact(iss),
                };
                (issuer, exact(sub))
            } else {
                (StringMatch::Presence, StringMatch::Suffix(rest.to_owned()))
            }
        } else if let Some(rest) = value.strip_suffix('*') {
            if found {
                let subject = match sub.strip_suffix('*') {
                    Some("") => StringMatch::Presence,
                    Some(prefix) => StringMatch::Prefix(prefix.to_owned()),
                    None => exact(sub),
                };
                (exact(iss), subject)
            } else {
                (StringMatch::Prefix(rest.to_owned()), StringMatch::Presence)
            }
        } else {
            (exact(iss), exact(sub))
        };
        RequestPrincipalMatch { issuer, subject }
    }

    fn matches(&self, iss_sub: Option<(&str, &str)>) -> bool {
        iss_sub.is_some_and(|(iss, sub)| self.issuer.matches(iss) && self.subject.matches(sub))
    }
}

impl PathMatch {
    fn parse(value: &str) -> Result<PathMatch, String> {
        if !value.contains("{*}") && !value.contains("{**}") {
            return Ok(PathMatch::String(StringMatch::from_istio(value)));
        }
        if !value.starts_with('/') {
            return Err(format!("{value:?}: a path template must start with /"));
        }
        let parts: Vec<&str> = value.split('/').collect();
        let last = parts.len().saturating_sub(1);
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "{*}" => Segment::One,
                "{**}" if i == last => Segment::Rest,
                "{**}" => return Err(format!("{value:?}: {{**}} must be the last segment")),
                p if p.contains('{') || p.contains('}') || p.contains('*') => {
                    return Err(format!(
                        "{value:?}: a path template's operators {{*}} and {{**}} must be whole segments"
                    ))
                }
                p => Segment::Literal(p.to_owned()),
            });
        }
        Ok(PathMatch::Template(segments))
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::String(m) => m.matches(path),
            PathMatch::Template(segments) => {
                let mut parts = path.split('/');
                for segment in segments {
                    match segment {
                        Segment::Rest => return parts.next().is_some(),
                        Segment::One => {
                            if parts.next().is_none_or(str::is_empty) {
                                return false;
                            }
                        }
                        Segment::Literal(l) => {
                            if parts.next() != Some(l.as_str()) {
                                return false;
                            }
                        }
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

impl<T> Values<T> {
    fn holds(&self, matches: impl Fn(&T) -> bool) -> bool {
        field(&self.values, &matches) && not_field(&self.not_values, &matches)
    }
}

impl Condition {
    fn convert(c: &wp::Condition, at: &str) -> Result<Condition, String> {
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(format!("{at}: one of values and notValues must be set"));
        }
        let key = c.key.as_str();
        let strings = || Values { values: strings(&c.values), not_values: strings(&c.not_values) };
        let cidrs = || -> Result<Values<Cidr>, String> {
            Ok(Values {
                values: cidrs(&c.values, &format!("{at}.values"))?,
                not_values: cidrs(&c.not_values, &format!("{at}.notValues"))?,
            })
        };
        Ok(match key {
            "source.ip" => Condition::SourceIp(cidrs()?),
            "remote.ip" => Condition::RemoteIp(cidrs()?),
            "destination.ip" => Condition::DestinationIp(cidrs()?),
            "destination.port" => {
                let ports = |list: &[String], field: &str| {
                    list.iter()
                        .enumerate()
                        .map(|(i, v)| {
                            v.parse::<u16>()
                                .map_err(|_| format!("{at}.{field}[{i}]: {v:?} is not a port number"))
                        })
                        .collect::<Result<Vec<_>, _>>()
                };
                Condition::DestinationPort(Values {
                    values: ports(&c.values, "values")?,
                    not_values: ports(&c.not_values, "notValues")?,
                })
            }
            "source.namespace" => Condition::SourceNamespace(strings()),
            "source.principal" => Condition::SourcePrincipal(Values {
                values: principals(&c.values),
                not_values: principals(&c.not_values),
            }),
            "request.auth.principal" => Condition::RequestPrincipal(Values {
                values: c.values.iter().map(|v| RequestPrincipalMatch::parse(v)).collect(),
                not_values: c.not_values.iter().map(|v| RequestPrincipalMatch::parse(v)).collect(),
            }),
            "request.auth.audiences" => Condition::Audiences(strings()),
            "request.auth.presenter" => Condition::Presenter(strings()),
            "connection.sni" => Condition::Sni(strings()),
            _ => {
                if let Some(rest) = key.strip_prefix("request.headers") {
                    let name = bracketed(rest)
                        .filter(|names| names.len() == 1)
                        .and_then(|mut names| names.pop())
                        .ok_or_else(|| format!("{at}.key: {key:?} is not request.headers[<name>]"))?;
                    Condition::Header { name: name.to_ascii_lowercase(), values: strings() }
                } else if let Some(rest) = key.strip_prefix("request.auth.claims") {
                    let path = bracketed(rest)
                        .ok_or_else(|| format!("{at}.key: {key:?} is not request.auth.claims[<name>]..."))?;
                    Condition::Claim { path, values: strings() }
                } else {
                    Condition::Unsupported(key.to_owned())
                }
            }
        })
    }

    fn holds(&self, a: &Attrs, unknown_holds: bool) -> bool {
        let req = a.req;
        let auth = req.auth.as_ref();
        let principal = a.principal.as_deref();
        match self {
            Condition::Header { name, values } => {
                let joined = header(req.headers, name);
                values.holds(|m| joined.as_deref().is_some_and(|v| present_or(m, v)))
            }
            Condition::SourceIp(v) => v.holds(|c| c.contains(req.source_ip)),
            Condition::RemoteIp(v) => v.holds(|c| c.contains(req.remote_ip)),
            Condition::DestinationIp(v) => v.holds(|c| c.contains(req.destination.ip())),
            Condition::DestinationPort(v) => v.holds(|p| *p == req.destination.port()),
            Condition::SourceNamespace(v) => {
                v.holds(|m| req.source_identity.is_some_and(|i| m.matches(i.namespace())))
            }
            Condition::SourcePrincipal(v) => v.holds(|m| principal.is_some_and(|p| m.matches(p))),
            Condition::RequestPrincipal(v) => v.holds(|m| m.matches(a.iss_sub)),
            Condition::Audiences(v) => {
                v.holds(|m| auth.is_some_and(|j| j.audiences.iter().any(|aud| m.matches(aud))))
            }
            Condition::Presenter(v) => {
                v.holds(|m| auth.and_then(|j| j.presenter).is_some_and(|p| m.matches(p)))
            }
            Condition::Claim { path, values } => {
                let found = auth.map(|j| claim_strings(j.claims, path)).unwrap_or_default();
                values.holds(|m| found.iter().any(|s| m.matches(s)))
            }
            Condition::Sni(v) => v.holds(|m| req.sni.is_some_and(|s| m.matches(s))),
            Condition::Unsupported(_) => unknown_holds,
        }
    }
}

impl<'r, 'a> Attrs<'r, 'a> {
    fn new(req: &'r Request<'a>, path: Option<String>) -> Attrs<'r, 'a> {
        let principal = req
            .source_identity
            .map(|i| format!("{}/ns/{}/sa/{}", i.trust_domain(), i.namespace(), i.service_account()));
        let iss_sub = req.auth.map(|auth| {
            let claim = |name: &str| auth.claims.get(name).and_then(serde_json::Value::as_str);
            match (claim("iss"), claim("sub")) {
                (Some(iss), Some(sub)) => (iss, sub),
                _ => auth.principal.rsplit_once('/').unwrap_or((auth.principal, "")),
            }
        });
        Attrs { req, principal, path, host: req.host.to_ascii_lowercase(), iss_sub }
    }
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom { .. } => "CUSTOM",
        })
    }
}

/// Istio's verdict on `request` under `policies` (those that apply to its destination): CUSTOM,
/// then DENY, then ALLOW; matching AUDIT policies are listed (see the module docs).
pub fn authorize(policies: &[&Policy], request: &Request) -> Decision {
    if policies.is_empty() {
        return Decision::Allow { audited: Vec::new() };
    }
    let path = if request.path.is_empty() {
        None
    } else {
        match normalize_path(request.path) {
            Ok(p) => Some(p),
            Err(why) => {
                return Decision::Deny {
                    policy: None,
                    reason: format!("the request path cannot be normalized for policy matching: {why}"),
                    audited: Vec::new(),
                }
            }
        }
    };
    let attrs = Attrs::new(request, path);
    let audited: Vec<String> =
        policies.iter().filter(|p| p.action == Action::Audit && p.matches(&attrs)).map(|p| p.key()).collect();
    for p in policies {
        if let Action::Custom { provider } = &p.action {
            if p.matches(&attrs) {
                let key = p.key();
                let reason = format!(
                    "CUSTOM policy {key} names extension provider {provider:?}, which is not configured"
                );
                return Decision::Deny { policy: Some(key), reason, audited };
            }
        }
    }
    if let Some(deny) = policies.iter().find(|p| p.action == Action::Deny && p.matches(&attrs)) {
        let key = deny.key();
        return Decision::Deny { reason: format!("DENY policy {key} matched"), policy: Some(key), audited };
    }
    let allow: Vec<&&Policy> = policies.iter().filter(|p| p.action == Action::Allow).collect();
    if allow.is_empty() || allow.iter().any(|p| p.matches(&attrs)) {
        return Decision::Allow { audited };
    }
    let names: Vec<String> = allow.iter().map(|p| p.key()).collect();
    Decision::Deny {
        policy: None,
        reason: format!("no ALLOW policy matched (checked {})", names.join(", ")),
        audited,
    }
}

/// The original client's address for `remote.ip`: with `num_trusted_proxies` (Istio's
/// `numTrustedProxies`, Envoy's `xff_num_trusted_hops`) N > 0, the Nth address from the right of
/// `X-Forwarded-For`; with 0, or when the header has fewer addresses or a malformed one there,
/// the connection's peer.
pub fn remote_ip(peer: IpAddr, headers: &HeaderMap, num_trusted_proxies: u32) -> IpAddr {
    let Ok(n) = usize::try_from(num_trusted_proxies) else { return peer };
    if n == 0 {
        return peer;
    }
    let Some(xff) = header(headers, "x-forwarded-for") else { return peer };
    let addresses: Vec<&str> = xff.split(',').map(str::trim).collect();
    addresses
        .len()
        .checked_sub(n)
        .and_then(|i| addresses.get(i))
        .and_then(|a| a.parse::<IpAddr>().ok())
        .unwrap_or(peer)
}

/// The request path as policies see it: Istio's default normalization (`BASE`, Envoy's
/// `normalize_path`, Chromium's URL path canonicalization), the query dropped.
///
/// - `.` and `..` segments are resolved (RFC 3986), also when written `%2e`; `..` never climbs
///   above the root: `/../a` is `/a`.
/// - A backslash becomes `/`.
/// - Percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded: `%41` is `A`.
///   Other escapes stay as sent, in their case: `%2F`, `%2f`, `%5C` are *not* decoded (that is
///   `DECODE_AND_MERGE_SLASHES`, not the default; Envoy's `path_with_escaped_slashes_action`
///   stays `KEEP_UNCHANGED`), so `/a%2Fb` is one segment. A malformed escape is kept.
/// - Characters a path may not hold (controls, space, `"`, `<`, `>`, `^`, a backtick, `{`, `|`, `}`, non-ASCII) are
///   percent-encoded, in upper case.
/// - `//` is kept (`MERGE_SLASHES` is not the default); case is kept (`/A` is not `/a`).
/// - Refused (Envoy answers 400): `%00` or a NUL, a fragment (`#`), a path not starting with `/`.
pub fn normalize_path(path: &str) -> Result<String, String> {
    normalize_path_bytes(path.as_bytes())
}

/// [`normalize_path`] over arbitrary bytes (the fuzz entry): never panics.
pub fn normalize_path_bytes(raw: &[u8]) -> Result<String, String> {
    if raw.contains(&b'#') {
        return Err("the path has a fragment (#)".into());
    }
    let path = match raw.iter().position(|b| *b == b'?') {
        Some(q) => raw.get(..q).unwrap_or_default(),
        None => raw,
    };
    if path.first() != Some(&b'/') {
        return Err("the path does not start with /".into());
    }
    let mut out: Vec<u8> = Vec::with_capacity(path.len() + 8);
    // Where in `out` a '%' that began no valid escape was copied.
    let mut last_invalid_percent: Option<usize> = None;
    let mut i = 0;
    while let Some(&c) = path.get(i) {
        let dot = dot_len(path, i);
        if dot > 0 {
            if out.last() == Some(&b'/') {
                let after = i + dot;
                match after_dot(path, after) {
                    Dot::Name => {
                        out.push(b'.');
                        i += dot;
                    }
                    Dot::Current(consumed) => i = after + consumed,
                    Dot::Parent(consumed) => {
                        back_up_to_previous_slash(&mut out);
                        i = after + consumed;
                    }
                }
            } else {
                out.push(b'.');
                i += dot;
            }
            continue;
        }
        match c {
            b'\\' => out.push(b'/'),
            b'%' => match decode_escape(path, i) {
                Some(value) => {
                    match char_class(value) {
                        Class::Unescape => {
                            out.push(value);
                            if let Some(p) = last_invalid_percent {
                                if p + 3 >= out.len() {
                                    check_nested_escapes(path, i + 3, p, &mut out);
                                }
                            }
                        }
                        Class::Invalid => return Err("the path has an encoded NUL (%00)".into()),
                        _ => out.extend_from_slice(path.get(i..i + 3).unwrap_or_default()),
                    }
                    i += 2;
                }
                None => {
                    last_invalid_percent = Some(out.len());
                    out.push(b'%');
                }
            },
            _ => match char_class(c) {
                Class::Invalid => return Err("the path has a NUL byte".into()),
                Class::Escape => push_escaped(&mut out, c),
                _ => out.push(c),
            },
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "the normalized path is not UTF-8".into())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Pass,
    Unescape,
    Escape,
    Invalid,
}

enum Dot {
    /// Part of a name.
    Name,
    /// `.`: skip it and the consumed bytes after it.
    Current(usize),
    /// `..`: climb one segment.
    Parent(usize),
}

/// Chromium's path character table (`url_canon_path.cc`, `kPathCharLookup`) as Envoy uses it.
fn char_class(c: u8) -> Class {
    match c {
        0 => Class::Invalid,
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => Class::Unescape,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'.' | b'/' | b':' | b';' | b'='
        | b'@' | b'[' | b']' => Class::Pass,
        _ => Class::Escape,
    }
}

/// 1 for `.`, 3 for `%2e`/`%2E`, else 0.
fn dot_len(s: &[u8], i: usize) -> usize {
    match s.get(i) {
        Some(b'.') => 1,
        Some(b'%') if s.get(i + 1) == Some(&b'2') && matches!(s.get(i + 2), Some(b'e' | b'E')) => 3,
        _ => 0,
    }
}

fn after_dot(s: &[u8], after: usize) -> Dot {
    let slash = |i: usize| matches!(s.get(i), Some(b'/' | b'\\'));
    if after >= s.len() {
        return Dot::Current(0);
    }
    if slash(after) {
        return Dot::Current(1);
    }
    let second = dot_len(s, after);
    if second > 0 {
        let end = after + second;
        if end >= s.len() {
            return Dot::Parent(second);
        }
        if slash(end) {
            return Dot::Parent(second + 1);
        }
    }
    Dot::Name
}

/// `out` ends with `/`: drop the last segment, never the leading `/`.
fn back_up_to_previous_slash(out: &mut Vec<u8>) {
    let Some(last) = out.len().checked_sub(1) else { return };
    let keep = out.get(..last).and_then(|head| head.iter().rposition(|b| *b == b'/')).map_or(1, |p| p + 1);
    out.truncate(keep.max(1));
}

/// The byte `%XY` at `i` encodes, if `XY` are hex digits.
fn decode_escape(s: &[u8], i: usize) -> Option<u8> {
    let hex = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
    if s.get(i) != Some(&b'%') {
        return None;
    }
    Some(hex(*s.get(i + 1)?)? << 4 | hex(*s.get(i + 2)?)?)
}

fn push_escaped(out: &mut Vec<u8>, c: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push(b'%');
    out.push(HEX[usize::from(c >> 4)]);
    out.push(HEX[usize::from(c & 0xf)]);
}

/// Chromium's `CheckForNestedEscapes`: a decoded byte just after a '%' that began no escape may
/// form a new escape with it (`%%30%30` would read `%00` on a second pass); that '%' becomes
/// `%25`, so normalizing twice changes nothing.
fn check_nested_escapes(spec: &[u8], next: usize, percent: usize, out: &mut Vec<u8>) {
    let length = out.len();
    let Some(&last_unescaped) = out.last() else { return };
    let append_next = percent + 2 == length;
    if append_next {
        match spec.get(next) {
            Some(&b) if b < 0x80 => out.push(b),
            _ => return,
        }
    }
    if decode_escape(out, percent).is_some() {
        if !append_next {
            if let Some(&c) = out.get(percent + 1) {
                out.push(c);
            }
        }
        if let Some(slot) = out.get_mut(percent + 1..percent + 3) {
            slot.copy_from_slice(b"25");
        }
        out.push(last_unescaped);
    } else if append_next {
        out.truncate(length);
    }
}

/// A positive field: empty matches all; else one entry must match.
fn field<T>(entries: &[T], matches: impl Fn(&T) -> bool) -> bool {
    entries.is_empty() || entries.iter().any(matches)
}

/// A negated field: no entry may match.
fn not_field<T>(entries: &[T], matches: impl Fn(&T) -> bool) -> bool {
    !entries.iter().any(matches)
}

/// Envoy's header matching: `*` (present_match) asks only for presence, even of an empty value.
fn present_or(m: &StringMatch, value: &str) -> bool {
    matches!(m, StringMatch::Presence) || m.matches(value)
}

/// A header's values joined with `,` (Envoy's view of a repeated header); `None` when absent.
fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let parts: Vec<String> = values.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
    Some(parts.join(","))
}

/// The string values at `path` in the claims: a string, or the strings of a list.
fn claim_strings<'v>(claims: &'v serde_json::Value, path: &[String]) -> Vec<&'v str> {
    let mut value = claims;
    for key in path {
        match value.get(key.as_str()) {
            Some(v) => value = v,
            None => return Vec::new(),
        }
    }
    match value {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(items) => items.iter().filter_map(serde_json::Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// `[a][b]...` into `["a", "b"]`; `None` unless the whole text is non-empty bracketed names.
fn bracketed(mut text: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    while !text.is_empty() {
        let rest = text.strip_prefix('[')?;
        let (name, after) = rest.split_once(']')?;
        if name.is_empty() || name.contains('[') {
            return None;
        }
        names.push(name.to_owned());
        text = after;
    }
    (!names.is_empty()).then_some(names)
}

fn strings(list: &[String]) -> Vec<StringMatch> {
    list.iter().map(|s| StringMatch::from_istio(s)).collect()
}

/// Principals compare without the `spiffe://` scheme (Istio's form); one written with it is
/// accepted too.
fn principals(list: &[String]) -> Vec<StringMatch> {
    list.iter().map(|s| StringMatch::from_istio(s.strip_prefix("spiffe://").unwrap_or(s))).collect()
}

fn cidrs(list: &[String], at: &str) -> Result<Vec<Cidr>, String> {
    list.iter()
        .enumerate()
        .map(|(i, v)| parse_cidr(v).map_err(|why| format!("{at}[{i}]: {v:?} is not a CIDR ({why})")))
        .collect()
}

/// `203.0.113.4` (a single address) or `203.0.113.0/24`.
fn parse_cidr(value: &str) -> Result<Cidr, String> {
    let (address, prefix) = match value.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (value, None),
    };
    let address: IpAddr = address.trim().parse().map_err(|_| format!("{address:?} is not an IP address"))?;
    let prefix = match prefix {
        Some(p) => p.trim().parse::<u8>().map_err(|_| format!("{p:?} is not a prefix length"))?,
        None if address.is_ipv4() => 32,
        None => 128,
    };
    Cidr::new(address, prefix)
}

fn ports(list: &[u32], at: &str) -> Result<Vec<u16>, String> {
    list.iter()
        .enumerate()
        .map(|(i, p)| u16::try_from(*p).map_err(|_| format!("{at}[{i}]: {p} is not a port number")))
        .collect()
}

fn paths(list: &[String], at: &str) -> Result<Vec<PathMatch>, String> {
    list.iter()
        .enumerate()
        .map(|(i, v)| PathMatch::parse(v).map_err(|why| format!("{at}[{i}]: {why}")))
        .collect()
}

/// `ns/sa`, or `sa` in the policy's namespace.
fn service_accounts(list: &[String], namespace: &str, at: &str) -> Result<Vec<ServiceAccountMatch>, String> {
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let (ns, sa) = v.split_once('/').unwrap_or((namespace, v));
            if ns.is_empty() || sa.is_empty() || sa.contains('/') {
                return Err(format!("{at}[{i}]: {v:?} is not <namespace>/<service account>"));
            }
            Ok(ServiceAccountMatch { namespace: ns.to_owned(), service_account: sa.to_owned() })
        })
        .collect()
}

#[cfg(test)]
mod tests;
