//! What the xDS server serves: encoded resources ([`XdsResource`]) grouped by type URL into a
//! [`Snapshot`], and the [`View`] that decides which of them a given proxy holds. The rest of the
//! controller builds snapshots from its model; this module knows nothing of that model, only of
//! names, versions and encoded bytes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use prost_types::Any;
use weft_core::proto::istio::security::Authorization;
use weft_core::proto::istio::workload::{address, Address, NetworkAddress};
use weft_core::proto::weft::waypoint::v1::Waypoint;

pub use weft_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WAYPOINT_TYPE_URL};

use super::node::NodeInfo;

/// Why a message could not be made into a resource.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("Address holds neither a workload nor a service")]
    EmptyAddress,
    #[error("workload {name:?} in namespace {namespace:?} has no uid; set Workload.uid (its xDS name)")]
    NoUid { name: String, namespace: String },
    #[error("service {name:?} in namespace {namespace:?} has no hostname; set Service.hostname")]
    NoHostname { name: String, namespace: String },
    #[error("authorization policy has no name; set Authorization.name and namespace")]
    NoPolicyName,
    #[error("{owner}: address of {len} bytes is neither IPv4 (4) nor IPv6 (16)")]
    BadIp { owner: String, len: usize },
}

/// One resource as served: its name (unique within its type), its version, other names it answers
/// to, and its encoded body. The version is what delta xDS compares: a client is sent a resource
/// when the version it holds differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsResource {
    name: String,
    version: String,
    aliases: Vec<String>,
    body: Any,
}

/// The resources of one type, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceSet {
    by_name: BTreeMap<String, XdsResource>,
}

/// Everything the server may serve, by type URL: the state the rest of the controller publishes
/// with [`XdsServer::update`](super::XdsServer::update). Cheap to share: the server holds it in an
/// `Arc` and every connection reads the same one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    version: String,
    types: BTreeMap<String, ResourceSet>,
}

/// Decides which resources a proxy holds. Called once per connection, type and push with the
/// current snapshot; it must only select (its answer depends on its inputs alone), and it should
/// be cheap: it runs for every connected proxy on every push.
///
/// Views select, they do not synthesize: per-proxy content belongs in the snapshot as resources
/// of its own.
pub trait View: Send + Sync + 'static {
    /// The resources of `type_url` in `snapshot` that `node` should hold.
    fn select<'s>(&self, snapshot: &'s Snapshot, node: &NodeInfo, type_url: &str) -> Vec<&'s XdsResource>;
}

/// The view in which every proxy holds every resource (what Istio sends a ztunnel).
#[derive(Clone, Copy, Debug, Default)]
pub struct Everything;

/// A view that decides resource by resource with a function of the proxy, the type URL and the
/// resource.
#[derive(Clone, Copy, Debug)]
pub struct PerResource<F>(pub F);

impl XdsResource {
    /// A resource with an encoded body and a version chosen by the caller.
    pub fn new(name: impl Into<String>, version: impl Into<String>, body: Any) -> XdsResource {
        XdsResource { name: name.into(), version: version.into(), aliases: Vec::new(), body }
    }

    /// Encodes `message` as a resource of `type_url`, versioned by its content: a digest of the
    /// encoded bytes, so equal content keeps its version across snapshots (and across restarts,
    /// which spares reconnecting clients a full resend).
    pub fn encode(name: impl Into<String>, type_url: &str, message: &impl prost::Message) -> XdsResource {
        let body = Any { type_url: type_url.to_owned(), value: message.encode_to_vec() };
        let version = content_version(&body.value);
        XdsResource::new(name, version, body)
    }

    /// An `istio.workload.Address` named as Istio names it: a workload by its uid, a service by
    /// `namespace/hostname`; each with the aliases `network/IP` of its addresses, so a proxy can
    /// ask for it by address.
    pub fn address(address: &Address) -> Result<XdsResource, ResourceError> {
        let (name, aliases) = match &address.r#type {
            None => return Err(ResourceError::EmptyAddress),
            Some(address::Type::Workload(w)) => {
                if w.uid.is_empty() {
                    return Err(ResourceError::NoUid {
                        name: w.name.clone(),
                        namespace: w.namespace.clone(),
                    });
                }
                let aliases = w
                    .addresses
                    .iter()
                    .map(|ip| network_alias(&w.network, ip, &w.uid))
                    .collect::<Result<Vec<_>, _>>()?;
                (w.uid.clone(), aliases)
            }
            Some(address::Type::Service(s)) => {
                if s.hostname.is_empty() {
                    return Err(ResourceError::NoHostname {
                        name: s.name.clone(),
                        namespace: s.namespace.clone(),
                    });
                }
                let name = format!("{}/{}", s.namespace, s.hostname);
                let aliases = s
                    .addresses
                    .iter()
                    .map(|NetworkAddress { network, address }| network_alias(network, address, &name))
                    .collect::<Result<Vec<_>, _>>()?;
                (name, aliases)
            }
        };
        Ok(XdsResource::encode(name, ADDRESS_TYPE_URL, address).with_aliases(aliases))
    }

    /// An `istio.security.Authorization` named `namespace/name`, the name workloads list in
    /// `authorization_policies` (and the key Istio's ztunnel removes policies by).
    pub fn authorization(policy: &Authorization) -> Result<XdsResource, ResourceError> {
        if policy.name.is_empty() {
            return Err(ResourceError::NoPolicyName);
        }
        let name = format!("{}/{}", policy.namespace, policy.name);
        Ok(XdsResource::encode(name, AUTHORIZATION_TYPE_URL, policy))
    }

    /// A waypoint's L7 configuration, named `namespace/name` after its Gateway.
    pub fn waypoint(waypoint: &Waypoint) -> XdsResource {
        let name = format!("{}/{}", waypoint.namespace, waypoint.name);
        XdsResource::encode(name, WAYPOINT_TYPE_URL, waypoint)
    }

    /// Replaces the aliases (other names a client may subscribe to this resource by).
    #[must_use]
    pub fn with_aliases(mut self, aliases: Vec<String>) -> XdsResource {
        self.aliases = aliases;
        self
    }

    /// Replaces the version.
    #[must_use]
    pub fn with_version(mut self, version: impl Into<String>) -> XdsResource {
        self.version = version.into();
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn aliases(&self) -> &[String] {
        &self.aliases
    }

    /// The type URL of the encoded body.
    pub fn type_url(&self) -> &str {
        &self.body.type_url
    }

    pub fn body(&self) -> &Any {
        &self.body
    }

    /// Whether a client subscribed to `name` asked for this resource.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }
}

impl ResourceSet {
    /// Adds or replaces (by name) a resource; returns the one replaced.
    pub fn insert(&mut self, resource: XdsResource) -> Option<XdsResource> {
        self.by_name.insert(resource.name.clone(), resource)
    }

    pub fn remove(&mut self, name: &str) -> Option<XdsResource> {
        self.by_name.remove(name)
    }

    pub fn get(&self, name: &str) -> Option<&XdsResource> {
        self.by_name.get(name)
    }

    /// The resources in name order.
    pub fn iter(&self) -> impl Iterator<Item = &XdsResource> {
        self.by_name.values()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl Snapshot {
    /// An empty snapshot; `version` is reported to clients for debugging only
    /// (`system_version_info`).
    pub fn new(version: impl Into<String>) -> Snapshot {
        Snapshot { version: version.into(), types: BTreeMap::new() }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// The same resources under another version.
    #[must_use]
    pub fn with_version(mut self, version: impl Into<String>) -> Snapshot {
        self.version = version.into();
        self
    }

    /// Adds or replaces (by type URL and name) a resource; returns the one replaced.
    pub fn insert(&mut self, resource: XdsResource) -> Option<XdsResource> {
        self.types.entry(resource.type_url().to_owned()).or_default().insert(resource)
    }

    /// [`insert`](Self::insert) for building a snapshot in one expression.
    #[must_use]
    pub fn with(mut self, resource: XdsResource) -> Snapshot {
        self.insert(resource);
        self
    }

    pub fn remove(&mut self, type_url: &str, name: &str) -> Option<XdsResource> {
        self.types.get_mut(type_url)?.remove(name)
    }

    pub fn get(&self, type_url: &str, name: &str) -> Option<&XdsResource> {
        self.types.get(type_url)?.get(name)
    }

    /// The resources of one type (empty when there are none).
    pub fn resources(&self, type_url: &str) -> impl Iterator<Item = &XdsResource> {
        self.types.get(type_url).into_iter().flat_map(ResourceSet::iter)
    }

    /// The type URLs that have at least one resource.
    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.iter().filter(|(_, set)| !set.is_empty()).map(|(t, _)| t.as_str())
    }
}

impl View for Everything {
    fn select<'s>(&self, snapshot: &'s Snapshot, _: &NodeInfo, type_url: &str) -> Vec<&'s XdsResource> {
        snapshot.resources(type_url).collect()
    }
}

impl<F> View for PerResource<F>
where
    F: Fn(&NodeInfo, &str, &XdsResource) -> bool + Send + Sync + 'static,
{
    fn select<'s>(&self, snapshot: &'s Snapshot, node: &NodeInfo, type_url: &str) -> Vec<&'s XdsResource> {
        snapshot.resources(type_url).filter(|r| (self.0)(node, type_url, r)).collect()
    }
}

/// `network/IP`, the alias Istio gives an address resource for each of its IPs.
fn network_alias(network: &str, ip: &[u8], owner: &str) -> Result<String, ResourceError> {
    let ip = match ip.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(ip).map_err(|_| bad_ip(owner, ip))?),
        16 => IpAddr::from(<[u8; 16]>::try_from(ip).map_err(|_| bad_ip(owner, ip))?),
        _ => return Err(bad_ip(owner, ip)),
    };
    Ok(format!("{network}/{ip}"))
}

fn bad_ip(owner: &str, ip: &[u8]) -> ResourceError {
    ResourceError::BadIp { owner: owner.to_owned(), len: ip.len() }
}

/// The first 8 bytes of the SHA-256 of `bytes`, in hex.
fn content_version(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use weft_core::proto::istio::workload::{Service, Workload};

    use super::*;

    fn workload(uid: &str, ips: Vec<Vec<u8>>) -> Address {
        Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.into(),
                name: "web-1".into(),
                namespace: "shop".into(),
                addresses: ips,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn address_names_and_aliases() {
        let w =
            XdsResource::address(&workload("c1//Pod/shop/web-1", vec![vec![10, 0, 0, 7]])).expect("valid");
        assert_eq!(w.name(), "c1//Pod/shop/web-1");
        assert_eq!(w.aliases(), ["/10.0.0.7"]);
        assert_eq!(w.type_url(), ADDRESS_TYPE_URL);
        assert!(w.answers_to("/10.0.0.7") && w.answers_to("c1//Pod/shop/web-1") && !w.answers_to("x"));

        let svc = Address {
            r#type: Some(address::Type::Service(Service {
                name: "web".into(),
                namespace: "shop".into(),
                hostname: "web.shop.svc.cluster.local".into(),
                addresses: vec![NetworkAddress { network: "net1".into(), address: vec![0xfd; 16] }],
                ..Default::default()
            })),
        };
        let s = XdsResource::address(&svc).expect("valid");
        assert_eq!(s.name(), "shop/web.shop.svc.cluster.local");
        assert_eq!(s.aliases(), ["net1/fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd"]);

        assert_eq!(XdsResource::address(&Address { r#type: None }), Err(ResourceError::EmptyAddress));
        assert!(matches!(XdsResource::address(&workload("", vec![])), Err(ResourceError::NoUid { .. })));
        assert!(matches!(
            XdsResource::address(&workload("u", vec![vec![1, 2, 3]])),
            Err(ResourceError::BadIp { len: 3, .. })
        ));
    }

    #[test]
    fn content_versions() {
        let a = XdsResource::address(&workload("u", vec![vec![10, 0, 0, 7]])).expect("valid");
        let same = XdsResource::address(&workload("u", vec![vec![10, 0, 0, 7]])).expect("valid");
        let other = XdsResource::address(&workload("u", vec![vec![10, 0, 0, 8]])).expect("valid");
        assert_eq!(a.version(), same.version());
        assert_ne!(a.version(), other.version());
        assert_eq!(a.version().len(), 16);

        let policy =
            Authorization { name: "deny-all".into(), namespace: "shop".into(), ..Default::default() };
        assert_eq!(XdsResource::authorization(&policy).expect("valid").name(), "shop/deny-all");
        assert_eq!(XdsResource::authorization(&Authorization::default()), Err(ResourceError::NoPolicyName));
    }

    #[test]
    fn snapshot_by_type() {
        let w = XdsResource::address(&workload("u1", vec![])).expect("valid");
        let p = XdsResource::authorization(&Authorization { name: "p".into(), ..Default::default() })
            .expect("valid");
        let mut snap = Snapshot::new("v1").with(w.clone()).with(p.clone());
        assert_eq!(snap.type_urls().collect::<Vec<_>>(), [AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL]);
        assert_eq!(snap.get(ADDRESS_TYPE_URL, "u1"), Some(&w));
        assert_eq!(snap.resources(AUTHORIZATION_TYPE_URL).count(), 1);
        assert_eq!(snap.resources("type.googleapis.com/unknown").count(), 0);
        assert_eq!(snap.remove(AUTHORIZATION_TYPE_URL, "/p"), Some(p));
        assert_eq!(snap.type_urls().collect::<Vec<_>>(), [ADDRESS_TYPE_URL]);
    }
}
