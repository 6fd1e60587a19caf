//! The authorization engine both proxies evaluate: Istio's AuthorizationPolicy semantics over
//! an [`Attributes`] trait, so ztunnel (L4: the peer identity, addresses and ports of a
//! connection) and the waypoint (L7: also hosts, methods, paths, request principals, headers,
//! claims) run the same matching code. Owns the policy types, their conversion from
//! `istio.security.Authorization` (every string form, CIDR and port parsed once, where the
//! resource enters) and the verdict. Pure: no I/O, no logging of its own; the caller reports the
//! [`Verdict`].
//!
//! At L4 the request attributes are unknown: a positive request condition does not match and a
//! negated one does, which is how a rule ztunnel cannot evaluate fails closed.
//!
//! Istio's rules (AuthorizationPolicy docs, and ztunnel's `rbac.rs`):
//! - The policies of a workload are the mesh-wide ones (scope GLOBAL: root namespace, no
//!   selector), its namespace's (scope NAMESPACE) and those naming it (scope WORKLOAD_SELECTOR,
//!   listed in the workload's `authorization_policies`).
//! - A DENY policy that matches denies. Else, if no ALLOW policy applies, allow. Else allow only
//!   if an ALLOW policy matches. (Without policies everything is allowed.)
//! - A policy matches when any of its groups (Istio's rules) matches; a policy without groups
//!   matches nothing (so an ALLOW without rules, "allow-nothing", denies everything). A group
//!   matches when all of its clauses do (none: it matches everything); a clause when any of its
//!   matches does (none: it matches everything); a match when each of its non-empty fields does
//!   (a match without fields matches nothing). A positive field matches when
//!   the connection has the attribute and one entry matches it; a `not_` field when the
//!   connection lacks the attribute or no entry matches it. Hence a plaintext connection (no
//!   peer identity) matches `not_principals: [presence]` — how a STRICT PeerAuthentication,
//!   converted by the controller into a DENY policy, refuses plaintext — but never `principals`.
//! - Principals are compared without the `spiffe://` scheme (`cluster.local/ns/a/sa/b`), the
//!   form the controller sends; source namespaces and service accounts come from the identity.
//!   Unlike Istio's ztunnel, an exact or prefix principal written *with* the scheme is accepted
//!   too (Istio's never matches it, which would make such a DENY deny nothing).
//! - A policy with a malformed part (a CIDR longer than its family, a port above 65535, a string
//!   match without type) is refused whole, and the previous version, if any, stays. Istio's
//!   ztunnel drops the malformed entry instead, which can make a DENY deny less.
//! - A destination that is not a known workload is denied.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Serialize, Serializer};

use crate::identity::Identity;
use crate::proto::istio::security::{
    self, string_match::MatchType, Authorization, Match as ProtoMatch, ServiceAccountMatch as ProtoSaMatch,
    StringMatch as ProtoStringMatch,
};

use crate::state::{invalid, ip_from_bytes, ProxyState, StateError};

/// Where a policy applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Scope {
    /// Every workload of the mesh (a root-namespace policy without selector).
    Global,
    /// Every workload of the policy's namespace.
    Namespace,
    /// The workloads that list the policy.
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// An L4 authorization policy as the proxy evaluates it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// Any group matching makes the policy match (Istio's `rules`).
    pub groups: Vec<Group>,
}

/// All clauses must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Group {
    pub clauses: Vec<Clause>,
}

/// Any match must match (a rule's `from` entries, or its `to` entries).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// Every non-empty field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    /// Request-level conditions (a waypoint's rules; none in `istio.security.Authorization`):
    /// each must hold.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request: Vec<RequestCondition>,
}

/// A condition on a request attribute: one of `values` matches (when any are given) and none of
/// `not_values` does. An attribute the request lacks matches no `values` and no `not_values`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestCondition {
    pub key: RequestKey,
    pub values: Vec<StringMatch>,
    pub not_values: Vec<StringMatch>,
}

/// A request attribute, named as Istio's `to.operation`, `from.source` and `when` keys name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum RequestKey {
    /// `hosts` (the `:authority`/Host, compared case-insensitively by the caller's lowercasing).
    Host,
    /// `methods`.
    Method,
    /// `paths` (normalised by the caller).
    Path,
    /// `requestPrincipals` / `request.auth.principal`: `<iss>/<sub>` of a validated JWT.
    RequestPrincipal,
    /// `request.auth.audiences`.
    Audience,
    /// `request.auth.presenter`.
    Presenter,
    /// `request.headers[<name>]` (lowercase name).
    Header(String),
    /// `request.auth.claims[a][b]`: the path into the JWT's claims.
    Claim(Vec<String>),
    /// `remoteIpBlocks` / `remote.ip` as a string (the original client, e.g. from X-Forwarded-For).
    RemoteIp,
    /// `connection.sni`.
    Sni,
}

/// What a policy reads of a connection or request. ztunnel's [`Connection`] knows the L4 part;
/// the waypoint adds the request's.
pub trait Attributes {
    /// The peer's identity from its certificate; `None` for plaintext.
    fn source_identity(&self) -> Option<&Identity>;
    fn source_ip(&self) -> IpAddr;
    /// The destination address and port asked for.
    fn destination(&self) -> SocketAddr;
    /// The values of a request attribute (several for a list claim or a repeated header); empty
    /// when the attribute is absent, as every one is at L4.
    fn request(&self, key: &RequestKey) -> Vec<&str> {
        let _ = key;
        Vec::new()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// An IP network: an address and a prefix length (at most 32 for IPv4, 128 for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    address: IpAddr,
    prefix: u8,
}

/// A connection arriving for a workload, as L4 policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The peer's identity from its certificate; `None` for plaintext.
    pub src_identity: Option<Identity>,
    pub src_ip: IpAddr,
    /// The destination workload's IP (on the proxy's network) and the port asked for.
    pub dst: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// `policy` is the DENY policy that matched (`namespace/name`), `None` when no ALLOW policy
    /// matched or the destination is unknown.
    Deny {
        policy: Option<String>,
        reason: String,
    },
}

impl TryFrom<Authorization> for Policy {
    type Error = StateError;

    /// Converts an `istio.security.Authorization`; errors name the policy (`namespace/name`).
    fn try_from(a: Authorization) -> Result<Policy, StateError> {
        const KIND: &str = "authorization";
        let key = format!("{}/{}", a.namespace, a.name);
        let name = key.as_str();
        let scope = match security::Scope::try_from(a.scope) {
            Ok(security::Scope::Global) => Scope::Global,
            Ok(security::Scope::Namespace) => Scope::Namespace,
            Ok(security::Scope::WorkloadSelector) => Scope::WorkloadSelector,
            Err(_) => return Err(invalid(KIND, name, "scope", format!("unknown value {}", a.scope))),
        };
        let action = match security::Action::try_from(a.action) {
            Ok(security::Action::Allow) => Action::Allow,
            Ok(security::Action::Deny) => Action::Deny,
            Err(_) => return Err(invalid(KIND, name, "action", format!("unknown value {}", a.action))),
        };
        let mut groups = Vec::new();
        for (g, group) in a.groups.iter().enumerate() {
            let mut clauses = Vec::new();
            for (r, rules) in group.rules.iter().enumerate() {
                let mut matches = Vec::new();
                for (m, proto) in rules.matches.iter().enumerate() {
                    let field = format!("groups[{g}].rules[{r}].matches[{m}]");
                    matches.push(
                        Match::from_proto(proto)
                            .map_err(|(f, why)| invalid(KIND, name, format!("{field}.{f}"), why))?,
                    );
                }
                clauses.push(Clause { matches });
            }
            groups.push(Group { clauses });
        }
        Ok(Policy { name: a.name, namespace: a.namespace, scope, action, groups })
    }
}

impl Policy {
    /// `namespace/name`, the policy's resource name.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the attributes match any group (a policy without groups matches nothing).
    pub fn matches(&self, attrs: &impl Attributes) -> bool {
        self.groups.iter().any(|g| g.clauses.iter().all(|c| c.matches(attrs)))
    }
}

impl Clause {
    /// Any of its matches matches; a clause without matches matches everything, while a match
    /// without fields matches nothing (both as in Istio's ztunnel).
    fn matches(&self, attrs: &impl Attributes) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| !m.is_empty() && m.matches(attrs))
    }
}

impl Match {
    /// Converts one match; an error names the field (relative to the match) and why.
    fn from_proto(m: &ProtoMatch) -> Result<Match, (String, String)> {
        let strings = |field: &str, list: &[ProtoStringMatch], principal: bool| {
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    StringMatch::from_proto(s, principal)
                        .ok_or((format!("{field}[{i}]"), "empty match".into()))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let cidrs = |field: &str, list: &[security::Address]| {
            list.iter()
                .enumerate()
                .map(|(i, a)| Cidr::from_proto(a).map_err(|why| (format!("{field}[{i}]"), why)))
                .collect::<Result<Vec<_>, _>>()
        };
        let ports = |field: &str, list: &[u32]| {
            list.iter()
                .enumerate()
                .map(|(i, p)| {
                    u16::try_from(*p)
                        .map_err(|_| (format!("{field}[{i}]"), format!("{p} is not a port number")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let sas = |list: &[ProtoSaMatch]| {
            list.iter()
                .map(|s| ServiceAccountMatch {
                    namespace: s.namespace.clone(),
                    service_account: s.service_account.clone(),
                })
                .collect()
        };
        Ok(Match {
            namespaces: strings("namespaces", &m.namespaces, false)?,
            not_namespaces: strings("not_namespaces", &m.not_namespaces, false)?,
            service_accounts: sas(&m.service_accounts),
            not_service_accounts: sas(&m.not_service_accounts),
            principals: strings("principals", &m.principals, true)?,
            not_principals: strings("not_principals", &m.not_principals, true)?,
            source_ips: cidrs("source_ips", &m.source_ips)?,
            not_source_ips: cidrs("not_source_ips", &m.not_source_ips)?,
            destination_ips: cidrs("destination_ips", &m.destination_ips)?,
            not_destination_ips: cidrs("not_destination_ips", &m.not_destination_ips)?,
            destination_ports: ports("destination_ports", &m.destination_ports)?,
            not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
            request: Vec::new(),
        })
    }

    fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    fn matches(&self, attrs: &impl Attributes) -> bool {
        let id = attrs.source_identity();
        let namespace = id.map(Identity::namespace);
        // Istio's principal form: the identity without its scheme.
        let principal =
            id.map(|i| format!("{}/ns/{}/sa/{}", i.trust_domain(), i.namespace(), i.service_account()));
        let src_ip = attrs.source_ip().to_canonical();
        let dst = attrs.destination();
        let dst_ip = dst.ip().to_canonical();
        let dst_port = dst.port();
        let sa_matches = |m: &ServiceAccountMatch| {
            id.is_some_and(|i| i.namespace() == m.namespace && i.service_account() == m.service_account)
        };

        field(&self.namespaces, namespace, |m, v| m.matches(v))
            && not_field(&self.not_namespaces, namespace, |m, v| m.matches(v))
            && field(&self.service_accounts, id, |m, _| sa_matches(m))
            && not_field(&self.not_service_accounts, id, |m, _| sa_matches(m))
            && field(&self.principals, principal.as_deref(), |m, v| m.matches(v))
            && not_field(&self.not_principals, principal.as_deref(), |m, v| m.matches(v))
            && field(&self.source_ips, Some(src_ip), |c, ip| c.contains(ip))
            && not_field(&self.not_source_ips, Some(src_ip), |c, ip| c.contains(ip))
            && field(&self.destination_ips, Some(dst_ip), |c, ip| c.contains(ip))
            && not_field(&self.not_destination_ips, Some(dst_ip), |c, ip| c.contains(ip))
            && field(&self.destination_ports, Some(dst_port), |p, port| *p == port)
            && not_field(&self.not_destination_ports, Some(dst_port), |p, port| *p == port)
            && self.request.iter().all(|c| c.matches(attrs))
    }
}

impl RequestCondition {
    fn matches(&self, attrs: &impl Attributes) -> bool {
        let values = attrs.request(&self.key);
        let any = |list: &[StringMatch]| values.iter().any(|v| list.iter().any(|m| m.matches(v)));
        (self.values.is_empty() || any(&self.values)) && !any(&self.not_values)
    }
}

/// A positive field: empty matches all; else the attribute must be known and match an entry.
fn field<T, V: Copy>(entries: &[T], value: Option<V>, matches: impl Fn(&T, V) -> bool) -> bool {
    entries.is_empty() || value.is_some_and(|v| entries.iter().any(|e| matches(e, v)))
}

/// A negated field: empty matches all; else the attribute must be unknown or match no entry.
fn not_field<T, V: Copy>(entries: &[T], value: Option<V>, matches: impl Fn(&T, V) -> bool) -> bool {
    entries.is_empty() || value.is_none_or(|v| !entries.iter().any(|e| matches(e, v)))
}

impl StringMatch {
    /// `None` for a match without a type. Principals lose a `spiffe://` scheme, so that a
    /// policy written with it still compares with Istio's principal form.
    fn from_proto(m: &ProtoStringMatch, principal: bool) -> Option<StringMatch> {
        let strip = |s: &str| {
            let s = if principal { s.strip_prefix("spiffe://").unwrap_or(s) } else { s };
            s.to_owned()
        };
        Some(match m.match_type.as_ref()? {
            MatchType::Exact(s) => StringMatch::Exact(strip(s)),
            MatchType::Prefix(s) => StringMatch::Prefix(strip(s)),
            MatchType::Suffix(s) => StringMatch::Suffix(s.clone()),
            MatchType::Presence(()) => StringMatch::Presence,
        })
    }

    /// Istio's string form in AuthorizationPolicy fields: `*` any non-empty value, `prefix*`,
    /// `*suffix`, else exact.
    pub fn from_istio(value: &str) -> StringMatch {
        if value == "*" {
            StringMatch::Presence
        } else if let Some(prefix) = value.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else if let Some(suffix) = value.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else {
            StringMatch::Exact(value.to_owned())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

impl Cidr {
    /// A network from an address and a prefix length; host bits are ignored.
    pub fn new(address: IpAddr, prefix: u8) -> Result<Cidr, String> {
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix length {prefix} is longer than {max} for {address}"));
        }
        Ok(Cidr { address, prefix })
    }

    fn from_proto(a: &security::Address) -> Result<Cidr, String> {
        let address = ip_from_bytes(&a.address)?;
        // An IPv4-mapped IPv6 network becomes IPv4: its prefix counts 96 bits fewer.
        let prefix =
            if address.is_ipv4() && a.address.len() == 16 { a.length.saturating_sub(96) } else { a.length };
        let prefix = u8::try_from(prefix).map_err(|_| format!("prefix length {} is too long", a.length))?;
        Cidr::new(address, prefix)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Attributes for Connection {
    fn source_identity(&self) -> Option<&Identity> {
        self.src_identity.as_ref()
    }

    fn source_ip(&self) -> IpAddr {
        self.src_ip
    }

    fn destination(&self) -> SocketAddr {
        self.dst
    }
}

/// Istio's verdict for a connection to a workload (see the module docs): the policies that
/// apply to the destination workload, DENY first, then ALLOW. An unknown destination is denied.
pub fn authorize(state: &ProxyState, attrs: &impl Attributes) -> Verdict {
    let dst = attrs.destination();
    let Some(workload) = state.workload_by_ip(dst.ip()) else {
        return Verdict::Deny {
            policy: None,
            reason: format!(
                "destination {} is not a known workload on network {:?}",
                dst.ip(),
                state.network()
            ),
        };
    };
    let policies: Vec<&Policy> = state.policies_for(workload).into_iter().map(|p| &**p).collect();
    evaluate(&policies, attrs, &workload.uid)
}

/// Istio's verdict under `policies` (those that apply to `target`, named in the reason): a
/// matching DENY denies; else with no ALLOW policy everything is allowed; else one must match.
pub fn evaluate(policies: &[&Policy], attrs: &impl Attributes, target: &str) -> Verdict {
    if let Some(deny) = policies.iter().find(|p| p.action == Action::Deny && p.matches(attrs)) {
        return Verdict::Deny {
            policy: Some(deny.key()),
            reason: format!("DENY policy {} matched", deny.key()),
        };
    }
    let allow: Vec<&Policy> = policies.iter().copied().filter(|p| p.action == Action::Allow).collect();
    if allow.is_empty() || allow.iter().any(|p| p.matches(attrs)) {
        return Verdict::Allow;
    }
    let names: Vec<String> = allow.iter().map(|p| p.key()).collect();
    Verdict::Deny {
        policy: None,
        reason: format!("no ALLOW policy of workload {target} matched (checked {})", names.join(", ")),
    }
}

#[cfg(test)]
mod tests;
