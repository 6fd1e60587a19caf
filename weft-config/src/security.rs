//! `security.istio.io` kinds: AuthorizationPolicy, PeerAuthentication, RequestAuthentication.
//! Served as v1 and v1beta1 with the same fields, so both decode to the same types.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::meta::{ObjectMeta, PolicyTargetReference, WorkloadSelector};
use super::types::{IstioDuration, PortKey};

/// `AuthorizationPolicy`: who may do what to the selected workloads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    /// An empty spec is valid: with action ALLOW and no rules it denies everything.
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads in the policy's namespace (all of them when absent; in the root namespace, the
    /// whole mesh). Mutually exclusive with `targetRef(s)`.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub action: AuthorizationAction,
    /// The extension provider of a CUSTOM policy.
    #[serde(default)]
    pub provider: Option<ExtensionProvider>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtensionProvider {
    pub name: String,
}

/// One rule: matches when any `from`, any `to` and every `when` match (absent lists match all).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleFrom {
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleTo {
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Ports as strings, as Istio's API has them.
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

impl Rule {
    /// The fields of this rule only a request can answer (a waypoint's), by path relative to the
    /// rule, in the order Istio documents them: `from[1].source.requestPrincipals`,
    /// `to[0].operation.methods`, `when`. ztunnel sees connections, not requests. `when` counts
    /// whatever its keys: Weft gives ztunnel no condition, not even one on `source.ip`.
    pub fn l7_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, from) in self.from.iter().enumerate() {
            out.extend(from.source.l7_fields().into_iter().map(|f| format!("from[{i}].source.{f}")));
        }
        for (i, to) in self.to.iter().enumerate() {
            out.extend(to.operation.l7_fields().into_iter().map(|f| format!("to[{i}].operation.{f}")));
        }
        if !self.when.is_empty() {
            out.push("when".to_owned());
        }
        out
    }

    /// The ports and ipBlocks ztunnel cannot use, by path relative to the rule, with why.
    pub fn malformed_l4(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut check = |path: String, values: &[String], valid: fn(&str) -> bool, what: &str| {
            for (j, v) in values.iter().enumerate() {
                if !valid(v) {
                    out.push((format!("{path}[{j}]"), format!("{v:?} is not {what}")));
                }
            }
        };
        let port = |v: &str| parse_port(v).is_some();
        let block = |v: &str| parse_ip_block(v).is_some();
        for (i, to) in self.to.iter().enumerate() {
            let op = &to.operation;
            check(format!("to[{i}].operation.ports"), &op.ports, port, "a port number");
            check(format!("to[{i}].operation.notPorts"), &op.not_ports, port, "a port number");
        }
        for (i, from) in self.from.iter().enumerate() {
            let s = &from.source;
            check(format!("from[{i}].source.ipBlocks"), &s.ip_blocks, block, "an IP or CIDR");
            check(format!("from[{i}].source.notIpBlocks"), &s.not_ip_blocks, block, "an IP or CIDR");
        }
        out
    }

    /// The rule as ztunnel enforces a DENY rule with L7 fields: without them, failing closed.
    /// `when` goes; a `from` or `to` entry that had L7 fields and has no other field left would
    /// match every request it names, so its list now matches every connection (the list is
    /// emptied: an entry without fields matches nothing at ztunnel, which would deny less than
    /// written).
    pub fn without_l7(&self) -> Rule {
        let mut rule = self.clone();
        rule.when.clear();
        let mut to_matches_all = false;
        for to in &mut rule.to {
            let op = &mut to.operation;
            let had_l7 = !op.l7_fields().is_empty();
            op.hosts.clear();
            op.not_hosts.clear();
            op.methods.clear();
            op.not_methods.clear();
            op.paths.clear();
            op.not_paths.clear();
            to_matches_all |= had_l7 && !op.has_l4_fields();
        }
        if to_matches_all {
            rule.to.clear();
        }
        let mut from_matches_all = false;
        for from in &mut rule.from {
            let s = &mut from.source;
            let had_l7 = !s.l7_fields().is_empty();
            s.request_principals.clear();
            s.not_request_principals.clear();
            s.remote_ip_blocks.clear();
            s.not_remote_ip_blocks.clear();
            from_matches_all |= had_l7 && !s.has_l4_fields();
        }
        if from_matches_all {
            rule.from.clear();
        }
        rule
    }
}

impl Operation {
    /// The names of its set fields that only a request can answer.
    fn l7_fields(&self) -> Vec<&'static str> {
        let fields: [(&'static str, &[String]); 6] = [
            ("hosts", &self.hosts),
            ("notHosts", &self.not_hosts),
            ("methods", &self.methods),
            ("notMethods", &self.not_methods),
            ("paths", &self.paths),
            ("notPaths", &self.not_paths),
        ];
        fields.into_iter().filter(|(_, v)| !v.is_empty()).map(|(name, _)| name).collect()
    }

    /// Whether it sets a field ztunnel checks (ports).
    pub fn has_l4_fields(&self) -> bool {
        !(self.ports.is_empty() && self.not_ports.is_empty())
    }
}

impl Source {
    /// The names of its set fields that only a request can answer (remote IPs come from
    /// request headers such as X-Forwarded-For).
    fn l7_fields(&self) -> Vec<&'static str> {
        let fields: [(&'static str, &[String]); 4] = [
            ("requestPrincipals", &self.request_principals),
            ("notRequestPrincipals", &self.not_request_principals),
            ("remoteIpBlocks", &self.remote_ip_blocks),
            ("notRemoteIpBlocks", &self.not_remote_ip_blocks),
        ];
        fields.into_iter().filter(|(_, v)| !v.is_empty()).map(|(name, _)| name).collect()
    }

    /// Whether it sets a field ztunnel checks (principals, namespaces, service accounts, ipBlocks).
    pub fn has_l4_fields(&self) -> bool {
        [
            &self.principals,
            &self.not_principals,
            &self.namespaces,
            &self.not_namespaces,
            &self.service_accounts,
            &self.not_service_accounts,
            &self.ip_blocks,
            &self.not_ip_blocks,
        ]
        .iter()
        .any(|v| !v.is_empty())
    }
}

/// A port as AuthorizationPolicy writes it (a string): 1-65535, else `None`.
pub fn parse_port(value: &str) -> Option<u16> {
    value.parse::<u16>().ok().filter(|p| *p != 0)
}

/// An `ipBlocks` entry: an IP (one host) or a CIDR, as the address and the prefix length; `None`
/// when it is neither or the prefix is longer than the address family allows.
pub fn parse_ip_block(value: &str) -> Option<(IpAddr, u8)> {
    let (ip, length) = match value.split_once('/') {
        Some((ip, length)) => (ip, Some(length.parse::<u8>().ok()?)),
        None => (value, None),
    };
    let ip: IpAddr = ip.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let length = length.unwrap_or(max);
    (length <= max).then_some((ip, length))
}

/// `PeerAuthentication`: whether workloads accept plaintext, mutual TLS, or both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope (PERMISSIVE at the top).
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<Mtls>,
    /// Per workload port (container port), overriding `mtls`; needs a selector.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<PortKey, Mtls>,
}

/// `RequestAuthentication`: which JWTs the selected workloads accept.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RequestAuthenticationSpec,
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// An inline JSON Web Key Set (a JSON document in a string).
    #[serde(default)]
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    #[serde(default)]
    pub timeout: Option<IstioDuration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtHeader {
    pub name: String,
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}
