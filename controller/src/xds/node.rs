//! Who is on the other end of an xDS stream: the Envoy `Node` a proxy sends on its first request,
//! parsed into [`NodeInfo`]. Istio's ztunnel identifies itself as
//! `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` and puts its Kubernetes node in
//! the metadata as `NODE_NAME`.

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
