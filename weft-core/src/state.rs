//! What a proxy (ztunnel or waypoint) knows of the mesh: workloads, services and L4
//! authorization policies as the controller pushes them over delta xDS (`istio.workload.Address`,
//! `istio.security.Authorization`), converted into internal types where they enter (`TryFrom`)
//! and indexed for the data path, plus the one rule for a service's endpoint candidates. Owns the
//! conversion, the indexes and [`Shared`], the handle the data path reads through; decides
//! nothing about connections (the proxies' routing and [`crate::authz`] do) and does no I/O.
//!
//! Resource names are Istio's, as the controller sends them: a workload is named by its uid, a
//! service by `namespace/hostname`, a policy by `namespace/name`. A resource that does not decode
//! (an address of the wrong length, a port above 65535, a name that does not match its content)
//! is refused with an error naming the resource and the field, and leaves the state as it was.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::identity::Identity;
use crate::proto::istio::security::Authorization;
use crate::proto::istio::workload::{
    address, gateway_address, load_balancing, Address, GatewayAddress, NetworkAddress, Port,
    Service as ProtoService, TunnelProtocol, Workload as ProtoWorkload, WorkloadStatus,
};
use serde::{Serialize, Serializer};

use crate::authz::{Policy, Scope};
use crate::names;

/// How a workload receives traffic from the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Protocol {
    /// In the ambient mesh: reached through HBONE on port 15008.
    Hbone,
    /// Not in the mesh: reached with plain TCP.
    None,
}

/// A pod (or other workload) as the proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub network: String,
    pub protocol: Protocol,
    #[serde(serialize_with = "display")]
    pub identity: Identity,
    pub waypoint: Option<Waypoint>,
    pub node: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    pub cluster_id: String,
    /// Services this workload is an endpoint of, `namespace/hostname` -> service port -> target
    /// port, resolved for this workload (a named target port: its container port of that name).
    /// A port the workload does not serve (no container port of that name) is absent; a target
    /// port of 0 is treated as absent.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// `namespace/name` of the policies that apply to it by selector (the controller also lists
    /// namespace- and mesh-wide ones; they are found by scope too, and counted once).
    pub authorization_policies: Vec<String>,
    pub healthy: bool,
}

/// A Kubernetes Service (or other named destination with virtual IPs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub addresses: Vec<NetworkIp>,
    /// Service port -> target port (0: named, resolved per endpoint in [`Workload::services`]).
    pub ports: BTreeMap<u16, u16>,
    /// Identities an endpoint of this service may also present.
    #[serde(serialize_with = "display_all")]
    pub subject_alt_names: Vec<Identity>,
    pub waypoint: Option<Waypoint>,
    /// Load balancing may pick unhealthy endpoints (`health_policy: ALLOW_ALL`).
    pub allow_unhealthy: bool,
}

/// An IP address on a network (the empty string is the default network).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NetworkIp {
    pub network: String,
    pub ip: IpAddr,
}

/// Where a workload's or service's waypoint is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Waypoint {
    pub destination: WaypointDestination,
    /// The waypoint's HBONE port.
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum WaypointDestination {
    /// The waypoint's service, as `namespace/hostname`.
    Service(String),
    /// An address: a service VIP or a workload IP.
    Address(NetworkIp),
}

/// An `istio.workload.Address` converted: a workload or a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressResource {
    Workload(Box<Workload>),
    Service(Box<Service>),
}

/// A service endpoint chosen for a port: the workload and the port to reach it on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    /// The resolved target port (0 when no port was asked for).
    pub target_port: u16,
}

/// The state the data path reads and one writer (the xDS client) replaces. Readers take a
/// snapshot, an `Arc`, under a lock held only to copy a pointer; the writer builds the next
/// version beside the current one and swaps it in, so a large update never holds up a lookup.
#[derive(Debug, Default)]
pub struct Shared<T> {
    current: RwLock<Arc<T>>,
    /// Serializes writers: each update starts from the version the previous one left.
    writer: Mutex<()>,
}

/// A resource the proxy could not take in.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("{kind} {name:?}: field `{field}`: {reason}; the resource was ignored, check the controller that sent it")]
    Invalid { kind: &'static str, name: String, field: String, reason: String },
}

/// The workloads, services and policies pushed by the controller, with the indexes the data
/// path looks them up by.
///
/// The xDS client owns the writes; the listeners read it through [`Shared`]. Lookups are in this
/// proxy's network.
#[derive(Clone, Debug, Default)]
pub struct ProxyState {
    /// The network this proxy's node is on: sources and destinations are looked up in it.
    network: String,
    workloads: HashMap<String, Arc<Workload>>,
    workload_by_ip: HashMap<NetworkIp, String>,
    services: HashMap<String, Arc<Service>>,
    service_by_vip: HashMap<NetworkIp, String>,
    /// Service key -> uids of the workloads listing it.
    endpoints: HashMap<String, BTreeSet<String>>,
    policies: HashMap<String, Arc<Policy>>,
    /// Namespace -> keys of NAMESPACE-scoped policies there.
    namespace_policies: HashMap<String, BTreeSet<String>>,
    global_policies: BTreeSet<String>,
}

/// A read-only copy of the state for the admin `/config_dump`, sorted by name.
#[derive(Debug, Serialize)]
pub struct ConfigDump {
    pub workloads: Vec<Workload>,
    pub services: Vec<ServiceDump>,
    pub policies: Vec<Policy>,
}

/// A service with the uids of its endpoints.
#[derive(Debug, Serialize)]
pub struct ServiceDump {
    #[serde(flatten)]
    pub service: Service,
    pub endpoints: Vec<String>,
}

impl StateError {
    /// The error with `name` as the resource's name where the resource itself had none.
    pub fn named(self, name: &str) -> StateError {
        match self {
            StateError::Invalid { kind, name: own, field, reason } if own.is_empty() => {
                StateError::Invalid { kind, name: name.to_owned(), field, reason }
            }
            other => other,
        }
    }
}

impl<T: Clone> Shared<T> {
    pub fn new(value: T) -> Self {
        Shared { current: RwLock::new(Arc::new(value)), writer: Mutex::new(()) }
    }

    /// The current version. Holding it does not block the writer.
    pub fn load(&self) -> Arc<T> {
        // The lock guards a pointer copy: nothing can panic while it is held.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Applies `change` to a copy of the current version and makes the copy current.
    pub fn update<R>(&self, change: impl FnOnce(&mut T) -> R) -> R {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = T::clone(&self.load());
        let result = change(&mut next);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        result
    }
}

impl AddressResource {
    /// The resource name Istio gives it: a workload's uid, a service's `namespace/hostname`.
    pub fn name(&self) -> String {
        match self {
            AddressResource::Workload(w) => w.uid.clone(),
            AddressResource::Service(s) => s.key(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            AddressResource::Workload(_) => "workload",
            AddressResource::Service(_) => "service",
        }
    }
}

impl Workload {
    /// The workload's addresses as keys of the (network, IP) index.
    fn network_ips(&self) -> impl Iterator<Item = NetworkIp> + '_ {
        self.addresses.iter().map(|ip| NetworkIp { network: self.network.clone(), ip: *ip })
    }

    /// The address to reach the workload at for a destination of `like`'s family, else its first.
    pub fn address_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.addresses.iter().find(|ip| ip.is_ipv4() == like.is_ipv4()).or(self.addresses.first()).copied()
    }
}

impl Service {
    /// `namespace/hostname`, the service's resource name and its key in workloads' `services`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

impl ProxyState {
    /// An empty state for a proxy whose node is on `network` ("" for the default network).
    pub fn new(network: impl Into<String>) -> Self {
        ProxyState { network: network.into(), ..Default::default() }
    }

    /// The network this proxy's node is on.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// Adds or replaces the workload or service `name` (an `istio.workload.Address` resource).
    pub fn apply_address(&mut self, name: &str, address: Address) -> Result<(), StateError> {
        let resource = AddressResource::try_from(address).map_err(|e| e.named(name))?;
        self.insert_address(name, resource)
    }

    /// Adds or replaces the workload or service `name`, already converted (the xDS client
    /// converts outside the state's lock). The name must be the resource's own.
    pub fn insert_address(&mut self, name: &str, resource: AddressResource) -> Result<(), StateError> {
        let own = resource.name();
        if own != name {
            let field = match resource {
                AddressResource::Workload(_) => "uid",
                AddressResource::Service(_) => "namespace/hostname",
            };
            return Err(invalid(resource.kind(), name, field, format!("{own:?} is not the resource name")));
        }
        self.remove_address(name);
        match resource {
            AddressResource::Workload(w) => self.insert_workload(*w),
            AddressResource::Service(s) => self.insert_service(*s),
        }
        Ok(())
    }

    /// Removes the workload (named by uid) or service (named `namespace/hostname`) `name`;
    /// returns whether there was one.
    pub fn remove_address(&mut self, name: &str) -> bool {
        if let Some(old) = self.workloads.remove(name) {
            for key in old.network_ips() {
                if self.workload_by_ip.get(&key).is_some_and(|uid| uid == name) {
                    self.workload_by_ip.remove(&key);
                }
            }
            for service in old.services.keys() {
                if let Some(uids) = self.endpoints.get_mut(service) {
                    uids.remove(name);
                    if uids.is_empty() {
                        self.endpoints.remove(service);
                    }
                }
            }
            return true;
        }
        if let Some(old) = self.services.remove(name) {
            for key in &old.addresses {
                if self.service_by_vip.get(key).is_some_and(|k| k == name) {
                    self.service_by_vip.remove(key);
                }
            }
            return true;
        }
        false
    }

    /// Adds or replaces the policy `name` (`namespace/name`).
    pub fn apply_authorization(
        &mut self,
        name: &str,
        authorization: Authorization,
    ) -> Result<(), StateError> {
        let policy = Policy::try_from(authorization)?;
        self.insert_policy(name, policy)
    }

    /// Adds or replaces the policy `name`, already converted. The name must be the policy's own.
    pub fn insert_policy(&mut self, name: &str, policy: Policy) -> Result<(), StateError> {
        if policy.key() != name {
            return Err(invalid(
                "authorization",
                name,
                "namespace/name",
                format!("{:?} is not the resource name", policy.key()),
            ));
        }
        self.remove_authorization(name);
        match policy.scope {
            Scope::Global => {
                self.global_policies.insert(name.to_owned());
            }
            Scope::Namespace => {
                self.namespace_policies.entry(policy.namespace.clone()).or_default().insert(name.to_owned());
            }
            Scope::WorkloadSelector => {}
        }
        self.policies.insert(name.to_owned(), Arc::new(policy));
        Ok(())
    }

    /// Removes the policy `name`; returns whether there was one.
    pub fn remove_authorization(&mut self, name: &str) -> bool {
        let Some(old) = self.policies.remove(name) else {
            return false;
        };
        self.global_policies.remove(name);
        if let Some(keys) = self.namespace_policies.get_mut(&old.namespace) {
            keys.remove(name);
            if keys.is_empty() {
                self.namespace_policies.remove(&old.namespace);
            }
        }
        true
    }

    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The workload with `ip` on this proxy's network.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_address(&self.network, ip)
    }

    pub fn workload_by_address(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        let key = NetworkIp { network: network.to_owned(), ip: ip.to_canonical() };
        self.workload_by_ip.get(&key).and_then(|uid| self.workloads.get(uid))
    }

    /// The service named `namespace/hostname`.
    pub fn service_by_key(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// The service with virtual IP `ip` on this proxy's network.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_address(&self.network, ip)
    }

    pub fn service_by_address(&self, network: &str, ip: IpAddr) -> Option<&Arc<Service>> {
        let key = NetworkIp { network: network.to_owned(), ip: ip.to_canonical() };
        self.service_by_vip.get(&key).and_then(|k| self.services.get(k))
    }

    /// The workloads listing the service `key` (`namespace/hostname`), healthy or not, by uid.
    pub fn endpoints(&self, key: &str) -> Vec<&Arc<Workload>> {
        self.endpoints.get(key).into_iter().flatten().filter_map(|uid| self.workloads.get(uid)).collect()
    }

    /// The endpoints a connection to `port` of `service` may be sent to, by uid: healthy (or
    /// any, with `health_policy: ALLOW_ALL`), with an address, and with the target port
    /// resolved, the endpoint's own mapping first (a named target port is 0 in the service and
    /// resolved per endpoint), else the service's, as Istio's ztunnel resolves it. An endpoint
    /// whose target port stays unknown is not a candidate: for a named target port, one whose
    /// mapping lacks the port (its pod names no such container port) or maps it to 0. `None` for
    /// `port` asks for any port (target port 0), as a waypoint's pods are found.
    pub fn endpoint_candidates(&self, service: &Service, port: Option<u16>) -> Vec<Endpoint> {
        let key = service.key();
        let service_target = port.and_then(|p| service.ports.get(&p).copied()).unwrap_or(0);
        self.endpoints(&key)
            .into_iter()
            .filter(|w| (w.healthy || service.allow_unhealthy) && !w.addresses.is_empty())
            .filter_map(|w| {
                let Some(port) = port else {
                    return Some(Endpoint { workload: Arc::clone(w), target_port: 0 });
                };
                let own = w.services.get(&key).and_then(|ports| ports.get(&port)).copied().unwrap_or(0);
                let target_port = if own != 0 { own } else { service_target };
                (target_port != 0).then(|| Endpoint { workload: Arc::clone(w), target_port })
            })
            .collect()
    }

    pub fn policy(&self, key: &str) -> Option<&Arc<Policy>> {
        self.policies.get(key)
    }

    /// The policies that apply to `workload`, each once, sorted by key: mesh-wide (GLOBAL),
    /// its namespace's (NAMESPACE), and those it lists (WORKLOAD_SELECTOR). A listed policy the
    /// proxy has not received (yet) is skipped, as Istio's ztunnel does.
    pub fn policies_for(&self, workload: &Workload) -> Vec<&Arc<Policy>> {
        let mut keys: BTreeSet<&str> = self.global_policies.iter().map(String::as_str).collect();
        keys.extend(
            self.namespace_policies.get(&workload.namespace).into_iter().flatten().map(String::as_str),
        );
        keys.extend(workload.authorization_policies.iter().map(String::as_str));
        keys.into_iter().filter_map(|k| self.policies.get(k)).collect()
    }

    /// Everything the proxy holds, for `/config_dump`.
    pub fn config_dump(&self) -> ConfigDump {
        let mut workloads: Vec<Workload> = self.workloads.values().map(|w| (**w).clone()).collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<ServiceDump> = self
            .services
            .iter()
            .map(|(key, s)| ServiceDump {
                service: (**s).clone(),
                endpoints: self.endpoints.get(key).into_iter().flatten().cloned().collect(),
            })
            .collect();
        services.sort_by_key(|s| s.service.key());
        let mut policies: Vec<Policy> = self.policies.values().map(|p| (**p).clone()).collect();
        policies.sort_by_key(Policy::key);
        ConfigDump { workloads, services, policies }
    }

    fn insert_workload(&mut self, workload: Workload) {
        for key in workload.network_ips() {
            self.workload_by_ip.insert(key, workload.uid.clone());
        }
        for service in workload.services.keys() {
            self.endpoints.entry(service.clone()).or_default().insert(workload.uid.clone());
        }
        self.workloads.insert(workload.uid.clone(), Arc::new(workload));
    }

    fn insert_service(&mut self, service: Service) {
        let key = service.key();
        for vip in &service.addresses {
            self.service_by_vip.insert(vip.clone(), key.clone());
        }
        self.services.insert(key, Arc::new(service));
    }
}

/// Builds the error for field `field` of resource `name`.
pub(crate) fn invalid(
    kind: &'static str,
    name: &str,
    field: impl Into<String>,
    reason: impl Into<String>,
) -> StateError {
    StateError::Invalid { kind, name: name.to_owned(), field: field.into(), reason: reason.into() }
}

/// An IP address from its 4 or 16 bytes (IPv4-mapped IPv6 addresses become IPv4).
pub(crate) fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, String> {
    if let Ok(octets) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::from(octets));
    }
    if let Ok(octets) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::from(octets).to_canonical());
    }
    Err(format!("an IP address is 4 or 16 bytes, not {}", bytes.len()))
}

fn port(value: u32) -> Result<u16, String> {
    u16::try_from(value).map_err(|_| format!("{value} is not a port number"))
}

fn ports(
    kind: &'static str,
    name: &str,
    field: &str,
    list: &[Port],
) -> Result<BTreeMap<u16, u16>, StateError> {
    let mut map = BTreeMap::new();
    for (i, p) in list.iter().enumerate() {
        let service_port =
            port(p.service_port).map_err(|e| invalid(kind, name, format!("{field}[{i}].service_port"), e))?;
        let target_port =
            port(p.target_port).map_err(|e| invalid(kind, name, format!("{field}[{i}].target_port"), e))?;
        map.insert(service_port, target_port);
    }
    Ok(map)
}

fn network_ip(
    kind: &'static str,
    name: &str,
    field: &str,
    a: &NetworkAddress,
) -> Result<NetworkIp, StateError> {
    let ip = ip_from_bytes(&a.address).map_err(|e| invalid(kind, name, format!("{field}.address"), e))?;
    Ok(NetworkIp { network: a.network.clone(), ip })
}

fn waypoint(
    kind: &'static str,
    name: &str,
    gw: Option<GatewayAddress>,
) -> Result<Option<Waypoint>, StateError> {
    let Some(gw) = gw else {
        return Ok(None);
    };
    let destination = match &gw.destination {
        Some(gateway_address::Destination::Hostname(h)) => {
            WaypointDestination::Service(format!("{}/{}", h.namespace, h.hostname))
        }
        Some(gateway_address::Destination::Address(a)) => {
            WaypointDestination::Address(network_ip(kind, name, "waypoint.address", a)?)
        }
        None => return Err(invalid(kind, name, "waypoint.destination", "neither a hostname nor an address")),
    };
    let port = match gw.hbone_mtls_port {
        0 => names::HBONE_PORT,
        p => port(p).map_err(|e| invalid(kind, name, "waypoint.hbone_mtls_port", e))?,
    };
    Ok(Some(Waypoint { destination, port }))
}

impl TryFrom<ProtoWorkload> for Workload {
    type Error = StateError;

    fn try_from(w: ProtoWorkload) -> Result<Workload, StateError> {
        workload_from_proto(w)
    }
}

impl TryFrom<ProtoService> for Service {
    type Error = StateError;

    fn try_from(s: ProtoService) -> Result<Service, StateError> {
        service_from_proto(s)
    }
}

impl TryFrom<Address> for AddressResource {
    type Error = StateError;

    fn try_from(address: Address) -> Result<AddressResource, StateError> {
        match address.r#type {
            Some(address::Type::Workload(w)) => {
                Workload::try_from(w).map(|w| AddressResource::Workload(Box::new(w)))
            }
            Some(address::Type::Service(s)) => {
                Service::try_from(s).map(|s| AddressResource::Service(Box::new(s)))
            }
            None => Err(invalid("address", "", "type", "neither a workload nor a service")),
        }
    }
}

fn workload_from_proto(w: ProtoWorkload) -> Result<Workload, StateError> {
    const KIND: &str = "workload";
    let name = w.uid.clone();
    let name = name.as_str();
    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip_from_bytes(a).map_err(|e| invalid(KIND, name, format!("addresses[{i}]"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(TunnelProtocol::Hbone) => Protocol::Hbone,
        Ok(TunnelProtocol::None) => Protocol::None,
        Err(_) => {
            return Err(invalid(
                KIND,
                name,
                "tunnel_protocol",
                format!("unknown value {}", w.tunnel_protocol),
            ))
        }
    };
    let healthy = match WorkloadStatus::try_from(w.status) {
        Ok(status) => status == WorkloadStatus::Healthy,
        Err(_) => return Err(invalid(KIND, name, "status", format!("unknown value {}", w.status))),
    };
    let trust_domain = if w.trust_domain.is_empty() { names::DEFAULT_TRUST_DOMAIN } else { &w.trust_domain };
    let service_account =
        if w.service_account.is_empty() { names::DEFAULT_SERVICE_ACCOUNT } else { &w.service_account };
    let identity = Identity::new(trust_domain, &w.namespace, service_account)
        .map_err(|e| invalid(KIND, name, "trust_domain/namespace/service_account", e.to_string()))?;
    let waypoint = waypoint(KIND, name, w.waypoint)?;
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        services.insert(key.clone(), ports(KIND, name, &format!("services[{key:?}].ports"), &list.ports)?);
    }
    Ok(Workload {
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        addresses,
        network: w.network,
        protocol,
        identity,
        waypoint,
        node: w.node,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_name: w.workload_name,
        cluster_id: w.cluster_id,
        services,
        authorization_policies: w.authorization_policies,
        healthy,
    })
}

fn service_from_proto(s: ProtoService) -> Result<Service, StateError> {
    const KIND: &str = "service";
    let key = format!("{}/{}", s.namespace, s.hostname);
    let name = key.as_str();
    let addresses = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| network_ip(KIND, name, &format!("addresses[{i}]"), a))
        .collect::<Result<Vec<_>, _>>()?;
    let subject_alt_names = s
        .subject_alt_names
        .iter()
        .enumerate()
        .map(|(i, san)| {
            san.parse::<Identity>()
                .map_err(|e| invalid(KIND, name, format!("subject_alt_names[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let allow_unhealthy = s
        .load_balancing
        .as_ref()
        .is_some_and(|lb| lb.health_policy == load_balancing::HealthPolicy::AllowAll as i32);
    Ok(Service {
        ports: ports(KIND, name, "ports", &s.ports)?,
        waypoint: waypoint(KIND, name, s.waypoint)?,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        addresses,
        subject_alt_names,
        allow_unhealthy,
    })
}

fn display<S: Serializer>(value: &Identity, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn display_all<S: Serializer>(values: &[Identity], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(values.iter().map(ToString::to_string))
}

#[cfg(test)]
mod tests;
