//! Who is on the other end of an xDS stream: the Envoy `Node` a proxy sends on its first request,
//! parsed into [`NodeInfo`]. Istio's ztunnel identifies itself as
//! `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` and puts its Kubernetes node in
//! the metadata as `NODE_NAME`; a waypoint as `waypoint~<ip>~<pod>.<namespace>~...` with its Gateway's
//! name as `WAYPOINT_NAME`. Whether a stream may speak as the node it claims, given who its token
//! says it is ([`Principal`]), is decided here too ([`NodeInfo::admits`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use prost_types::value::Kind;
use weft_core::proto::envoy::config::core::v3::Node;

/// The metadata key under which a node proxy names the Kubernetes node it runs on.
pub const NODE_NAME_KEY: &str = "NODE_NAME";
/// The metadata key under which a waypoint names its Gateway (in its pod's namespace).
pub const WAYPOINT_NAME_KEY: &str = "WAYPOINT_NAME";

/// Why a client's `Node` was refused. Messages say what the client must send instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("the first request of the stream carries no node; send node.id (e.g. ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local)")]
    Missing,
    #[error("node id {id:?} is not <type>~<ip>~<pod>.<namespace>~<dns domain>: {reason}")]
    Id { id: String, reason: &'static str },
}

/// Who a stream's bearer token says the client is (as the CA authenticated it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The node agent (ztunnel) of this Kubernetes node.
    NodeAgent(String),
    /// The waypoint of the Gateway `namespace/name`.
    Waypoint { namespace: String, name: String },
}

/// A connected proxy, as it identified itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node id as sent.
    pub id: String,
    /// The first part of the id: `ztunnel`, `waypoint`, `router`, `sidecar`.
    pub proxy_type: String,
    /// The proxy's own IP (the second part of the id).
    pub ip: IpAddr,
    /// The proxy's pod name (may be empty when the proxy does not know it).
    pub pod_name: String,
    /// The proxy's pod namespace (may be empty when the proxy does not know it).
    pub pod_namespace: String,
    /// The fourth part of the id, e.g. `istio-system.svc.cluster.local`.
    pub dns_domain: String,
    /// The Kubernetes node the proxy runs on (metadata `NODE_NAME`), if it said.
    pub node_name: Option<String>,
    /// `node.cluster` as sent (often empty).
    pub cluster: String,
    /// The string-valued entries of the node metadata; other values are left out.
    pub metadata: BTreeMap<String, String>,
}

impl NodeInfo {
    /// Parses the node a client sent on its first request.
    pub fn from_node(node: Option<&Node>) -> Result<NodeInfo, NodeError> {
        let node = node.filter(|n| !n.id.is_empty()).ok_or(NodeError::Missing)?;
        let mut info = NodeInfo::parse_id(&node.id)?;
        info.cluster = node.cluster.clone();
        if let Some(metadata) = &node.metadata {
            info.metadata = metadata
                .fields
                .iter()
                .filter_map(|(k, v)| match &v.kind {
                    Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                    _ => None,
                })
                .collect();
        }
        info.node_name = info.metadata.get(NODE_NAME_KEY).filter(|n| !n.is_empty()).cloned();
        Ok(info)
    }

    /// Whether a client authenticated as `principal` may speak as this node (else why not): a node
    /// agent only as its own node (`NODE_NAME`) and never as a waypoint (`WAYPOINT_NAME`, which
    /// would be sent a waypoint's configuration); a waypoint only as itself (`WAYPOINT_NAME` its
    /// name, the node id's namespace its namespace), whatever node it runs on.
    pub fn admits(&self, principal: &Principal) -> Result<(), String> {
        let claimed = |key: &str| self.metadata.get(key).map(String::as_str).unwrap_or("");
        match principal {
            Principal::NodeAgent(node) => {
                if self.node_name.as_deref() != Some(node.as_str()) {
                    let claimed = claimed(NODE_NAME_KEY);
                    return Err(format!(
                        "the token is node {node:?}'s, but the stream's NODE_NAME is {claimed:?}"
                    ));
                }
                match claimed(WAYPOINT_NAME_KEY) {
                    "" => Ok(()),
                    waypoint => Err(format!(
                        "the token is node {node:?}'s, but the stream claims to be waypoint {:?} \
                         ({WAYPOINT_NAME_KEY}); only that waypoint's own token may",
                        format!("{}/{waypoint}", self.pod_namespace)
                    )),
                }
            }
            Principal::Waypoint { namespace, name } => {
                let waypoint = format!("{namespace}/{name}");
                let claimed = claimed(WAYPOINT_NAME_KEY);
                if claimed != name {
                    return Err(format!(
                        "the token is waypoint {waypoint:?}'s, but the stream's {WAYPOINT_NAME_KEY} is {claimed:?}"
                    ));
                }
                if &self.pod_namespace != namespace {
                    return Err(format!(
                        "the token is waypoint {waypoint:?}'s, but the stream's node id {:?} puts it in \
                         namespace {:?}",
                        self.id, self.pod_namespace
                    ));
                }
                Ok(())
            }
        }
    }

    /// Parses `<type>~<ip>~<pod>.<namespace>~<dns domain>`. The pod part is split at its last dot
    /// (pod names may contain dots, namespaces may not); both halves may be empty, as Istio's ztunnel
    /// sends `.` when it does not know its pod.
    pub fn parse_id(id: &str) -> Result<NodeInfo, NodeError> {
        let err = |reason| NodeError::Id { id: id.to_owned(), reason };
        let parts: Vec<&str> = id.split('~').collect();
        let [proxy_type, ip, pod, dns_domain] = parts[..] else {
            return Err(err("it must have four parts separated by '~'"));
        };
        if proxy_type.is_empty() {
            return Err(err("the proxy type (first part) is empty"));
        }
        let ip: IpAddr = ip.parse().map_err(|_| err("the second part is not an IP address"))?;
        let (pod_name, pod_namespace) =
            pod.rsplit_once('.').ok_or(err("the third part is not <pod>.<namespace>"))?;
        Ok(NodeInfo {
            id: id.to_owned(),
            proxy_type: proxy_type.to_owned(),
            ip,
            pod_name: pod_name.to_owned(),
            pod_namespace: pod_namespace.to_owned(),
            dns_domain: dns_domain.to_owned(),
            node_name: None,
            cluster: String::new(),
            metadata: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use prost_types::{Struct, Value};

    use super::*;

    fn string(s: &str) -> Value {
        Value { kind: Some(Kind::StringValue(s.to_owned())) }
    }

    #[test]
    fn ids() {
        let ok = [
            (
                "ztunnel~10.0.0.5~ztunnel-x7k.istio-system~istio-system.svc.cluster.local",
                "ztunnel",
                "10.0.0.5",
                "ztunnel-x7k",
                "istio-system",
            ),
            ("ztunnel~fd00::5~a.b.c~c.svc.cluster.local", "ztunnel", "fd00::5", "a.b", "c"),
            ("ztunnel~1.1.1.1~.~.svc.cluster.local", "ztunnel", "1.1.1.1", "", ""),
            ("waypoint~10.0.1.9~wp-1.shop~shop.svc.cluster.local", "waypoint", "10.0.1.9", "wp-1", "shop"),
        ];
        for (id, proxy_type, ip, pod, ns) in ok {
            let info = NodeInfo::parse_id(id).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(info.proxy_type, proxy_type, "{id}");
            assert_eq!(info.ip, ip.parse::<IpAddr>().expect("test ip"), "{id}");
            assert_eq!(info.pod_name, pod, "{id}");
            assert_eq!(info.pod_namespace, ns, "{id}");
        }
        let bad = [
            "",
            "ztunnel",
            "ztunnel~10.0.0.5~pod.ns",
            "ztunnel~10.0.0.5~pod.ns~d~extra",
            "~10.0.0.5~pod.ns~d",
            "ztunnel~not-an-ip~pod.ns~d",
            "ztunnel~10.0.0.5~podns~d",
        ];
        for id in bad {
            assert!(matches!(NodeInfo::parse_id(id), Err(NodeError::Id { .. })), "{id:?} should be refused");
        }
    }

    fn node(id: &str, metadata: &[(&str, &str)]) -> NodeInfo {
        let fields = metadata.iter().map(|(k, v)| ((*k).to_owned(), string(v))).collect();
        let node = Node { id: id.into(), metadata: Some(Struct { fields }), ..Default::default() };
        NodeInfo::from_node(Some(&node)).expect("valid node")
    }

    /// Who may open a stream as whom: every principal against ztunnel and waypoint streams.
    #[test]
    fn admission_table() {
        const ZT: &str = "ztunnel~10.0.0.5~ztunnel-x7k.weft-system~weft-system.svc.cluster.local";
        const WP: &str = "waypoint~10.0.1.9~waypoint-5d8f.shop~shop.svc.cluster.local";
        const WP_OTHER_NS: &str = "waypoint~10.0.1.9~waypoint-5d8f.infra~infra.svc.cluster.local";
        let node_a = Principal::NodeAgent("node-a".into());
        let waypoint = Principal::Waypoint { namespace: "shop".into(), name: "waypoint".into() };
        // (principal, node id, metadata, admitted or a fragment of the refusal)
        type Case<'a> = (&'a Principal, &'a str, &'a [(&'a str, &'a str)], Result<(), &'a str>);
        let cases: &[Case<'_>] = &[
            (&node_a, ZT, &[(NODE_NAME_KEY, "node-a")], Ok(())),
            (&node_a, ZT, &[(NODE_NAME_KEY, "node-b")], Err("node \"node-a\"'s, but the stream's NODE_NAME is \"node-b\"")),
            (&node_a, ZT, &[], Err("NODE_NAME is \"\"")),
            (
                &node_a,
                WP,
                &[(NODE_NAME_KEY, "node-a"), (WAYPOINT_NAME_KEY, "waypoint")],
                Err("claims to be waypoint \"shop/waypoint\" (WAYPOINT_NAME); only that waypoint's own token may"),
            ),
            (&waypoint, WP, &[(NODE_NAME_KEY, "node-a"), (WAYPOINT_NAME_KEY, "waypoint")], Ok(())),
            (&waypoint, WP, &[(WAYPOINT_NAME_KEY, "waypoint")], Ok(())),
            (
                &waypoint,
                WP,
                &[(WAYPOINT_NAME_KEY, "other")],
                Err("waypoint \"shop/waypoint\"'s, but the stream's WAYPOINT_NAME is \"other\""),
            ),
            (&waypoint, WP, &[(NODE_NAME_KEY, "node-a")], Err("WAYPOINT_NAME is \"\"")),
            (&waypoint, ZT, &[(NODE_NAME_KEY, "node-a")], Err("WAYPOINT_NAME is \"\"")),
            (
                &waypoint,
                WP_OTHER_NS,
                &[(WAYPOINT_NAME_KEY, "waypoint")],
                Err("puts it in namespace \"infra\""),
            ),
        ];
        for (principal, id, metadata, want) in cases {
            let got = node(id, metadata).admits(principal);
            match (want, &got) {
                (Ok(()), Ok(())) => {}
                (Err(fragment), Err(msg)) => {
                    assert!(msg.contains(fragment), "{principal:?} {id} {metadata:?}: {msg}")
                }
                _ => panic!("{principal:?} {id} {metadata:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn metadata_and_node_name() {
        let mut fields = BTreeMap::new();
        fields.insert(NODE_NAME_KEY.to_owned(), string("node-a"));
        fields.insert("NAME".to_owned(), string("ztunnel-x7k"));
        fields.insert("NUMBER".to_owned(), Value { kind: Some(Kind::NumberValue(1.0)) });
        let node = Node {
            id: "ztunnel~10.0.0.5~ztunnel-x7k.istio-system~istio-system.svc.cluster.local".into(),
            cluster: "Kubernetes".into(),
            metadata: Some(Struct { fields }),
            ..Default::default()
        };
        let info = NodeInfo::from_node(Some(&node)).expect("valid node");
        assert_eq!(info.node_name.as_deref(), Some("node-a"));
        assert_eq!(info.cluster, "Kubernetes");
        assert_eq!(info.metadata.get("NAME").map(String::as_str), Some("ztunnel-x7k"));
        assert!(!info.metadata.contains_key("NUMBER"));

        assert_eq!(NodeInfo::from_node(None), Err(NodeError::Missing));
        assert_eq!(NodeInfo::from_node(Some(&Node::default())), Err(NodeError::Missing));
        let mut empty_name = node.clone();
        if let Some(m) = empty_name.metadata.as_mut() {
            m.fields.insert(NODE_NAME_KEY.to_owned(), string(""));
        }
        assert_eq!(NodeInfo::from_node(Some(&empty_name)).expect("valid").node_name, None);
    }
}
