//! SPIFFE workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! Owns parsing and printing; knows nothing of certificates or TLS.

use std::fmt;
use std::str::FromStr;

/// A workload's identity, as carried in the single URI SAN of its certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a SPIFFE identity Weft accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    #[error("identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    #[error("identity {identity:?} has an invalid {part} {value:?}: {why}")]
    Part { identity: String, part: &'static str, value: String, why: &'static str },
}

impl Identity {
    /// Builds an identity from its parts, checking each as [`FromStr`] does.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

/// Checks a trust domain on its own (as a CA configuration names it).
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    check_trust_domain(trust_domain).map_err(|why| IdentityError::Part {
        identity: format!("spiffe://{trust_domain}"),
        part: "trust domain",
        value: trust_domain.to_owned(),
        why,
    })
}

/// A trust domain: lowercase letters, digits, '.', '-' and '_' (SPIFFE ID spec, section 2.1).
fn check_trust_domain(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("it is empty");
    }
    if value.len() > 255 {
        return Err("it is longer than 255 characters");
    }
    if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("only lowercase letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

/// A Kubernetes namespace or service-account name: a DNS-1123 subdomain (RFC 1123), which also
/// satisfies SPIFFE's path-segment rules.
fn check_name(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("it is empty");
    }
    if value.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-')) {
        return Err("only lowercase letters, digits, '.' and '-' are allowed");
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(value.as_bytes()[0]) || !alnum(value.as_bytes()[value.len() - 1]) {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| IdentityError::Scheme(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service_account] = parts[..] else {
            return Err(IdentityError::Shape(s.to_owned()));
        };
        let part = |part: &'static str, value: &str, check: fn(&str) -> Result<(), &'static str>| {
            check(value).map_err(|why| IdentityError::Part {
                identity: s.to_owned(),
                part,
                value: value.to_owned(),
                why,
            })
        };
        part("trust domain", trust_domain, check_trust_domain)?;
        part("namespace", namespace, check_name)?;
        part("service account", service_account, check_name)?;
        Ok(Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/bookinfo-productpage");
        assert_eq!(Identity::new("cluster.local", "default", "bookinfo-productpage").unwrap(), id);
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("http://cluster.local/ns/a/sa/b", "does not start with \"spiffe://\""),
            ("spiffe://cluster.local/ns/a", "is not of the form"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "is not of the form"),
            ("spiffe://cluster.local/sa/b/ns/a", "is not of the form"),
            ("spiffe://cluster.local/ns/a/sa/", "invalid service account \"\": it is empty"),
            ("spiffe:///ns/a/sa/b", "invalid trust domain \"\": it is empty"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "invalid trust domain"),
            ("spiffe://cluster.local:8080/ns/a/sa/b", "invalid trust domain"),
            ("spiffe://cluster.local/ns/A/sa/b", "invalid namespace \"A\""),
            ("spiffe://cluster.local/ns/-a/sa/b", "must start and end"),
            ("spiffe://cluster.local/ns/a/sa/b%20c", "invalid service account"),
            ("spiffe://cluster.local/ns/a/sa/b?q=1", "invalid service account"),
            ("SPIFFE://cluster.local/ns/a/sa/b", "does not start"),
            ("", "does not start"),
        ];
        for (input, want) in cases {
            let err = input.parse::<Identity>().unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: got {err:?}, want it to contain {want:?}");
        }
    }
}
