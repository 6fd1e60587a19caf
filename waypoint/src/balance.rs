//! Load balancing: the upstream endpoint a forwarded request goes to. One pure [`choose`] over
//! the routing decision ([`Forward`]), the waypoint's configuration (the destination's
//! DestinationRule), the mesh state (services, endpoints) and the request; the caller keeps the
//! changing parts (random numbers, round-robin positions, requests in flight) behind
//! [`LoadState`], so a test scripts them and the decision stays deterministic. No I/O.
//!
//! Istio's semantics, as Envoy carries them out in Istio's waypoint:
//! - The destination host is a service of the mesh, found by its hostname; a host that is not
//!   one, a port the service does not have, or a subset its DestinationRule does not define is
//!   503 with flag NC ("no cluster"). Endpoints are [`ProxyState::endpoint_candidates`]: healthy
//!   (or any, with `ALLOW_ALL`), addressed, with the target port resolved; none is 503 UH.
//! - A subset keeps the endpoints whose labels include all of the subset's.
//! - The load balancer is the DestinationRule's for the port: a port-level setting over the
//!   subset's, over the service's top level, else LEAST_REQUEST (Istio's default).
//!   - LEAST_REQUEST: Envoy's power of two choices, two endpoints drawn at random, the one with
//!     fewer requests in flight wins (the first on a tie).
//!   - ROUND_ROBIN: the caller's position for the cluster (host, subset, port), modulo the
//!     endpoints, in uid order.
//!   - RANDOM: a random endpoint.
//!   - PASSTHROUGH: the address the client sent to (Envoy's ORIGINAL_DST), no endpoint lookup.
//!   - consistentHash on a header (all its values, joined with `,`), a cookie (its value), the
//!     source IP, or a query parameter (its first value, as sent): rendezvous hashing over the
//!     endpoints' uids, so a key stays on its endpoint while that endpoint stays, and only the
//!     keys of an endpoint that leaves move. A request without the key gets a random endpoint,
//!     as in Envoy.
//!
//! Gaps, each stated where it is decided:
//! - Labels: weft-core's [`Workload`] carries no pod labels, only the canonical name and
//!   revision the controller reads from them. A subset is matched on those: `app`,
//!   `app.kubernetes.io/name` and `service.istio.io/canonical-name` against the canonical name,
//!   `version`, `app.kubernetes.io/version` and `service.istio.io/canonical-revision` against
//!   the canonical revision. That agrees with the pod's labels unless the pod sets two of one
//!   group to different values. A subset on any other label selects nothing (503 UH, with an
//!   error that says why) rather than everything; the state needs the labels for it.
//! - Policy precedence: the controller merges a subset's policy over the service's section by
//!   section and keeps the service's port-level settings when the subset has none, so a
//!   service's port-level load balancer wins over a subset's top-level one, where Istio's merge
//!   lets the subset's top level win. A port-level setting without a load balancer falls back to
//!   the top level's (Istio: to the default). Both are the model's reading
//!   ([`TrafficPolicy::load_balancer`]), used here as it is.
//! - The DestinationRules known are those of the services bound to this waypoint; a
//!   destination outside them balances with the default, and its subsets are unknown (NC).
//! - A host is looked up as `<namespace>/<hostname>`, the namespace being the bound service's
//!   or the one a Kubernetes hostname (`<name>.<namespace>.svc.…`) names; a ServiceEntry host
//!   that is neither is NC (the state has no index by hostname alone).
//! - `httpCookie` with a `ttl` (Envoy then sets the cookie when the request has none) is not
//!   carried by the model: only an existing cookie is read. Envoy's ring hash and Maglev are
//!   replaced by rendezvous hashing, whose placement differs but whose stickiness is the same.
//! - Ejected endpoints (outlier detection) and, on a retry, endpoints already tried are taken out
//!   by the caller's [`LoadState::filter`] before the pick. No locality or endpoint weights yet.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{HeaderMap, COOKIE};
use http::StatusCode;

use weft_core::state::{Endpoint, ProxyState, Service as MeshService, Workload};
use weft_core::telemetry::ResponseFlags;

use crate::model::{HashKey, LoadBalancer, Subset, TrafficPolicy, Waypoint};
use crate::route::Forward;

/// Labels whose value is a workload's canonical name (any of them selects on it).
const NAME_LABELS: [&str; 3] = ["app", "app.kubernetes.io/name", "service.istio.io/canonical-name"];
/// Labels whose value is a workload's canonical revision.
const REVISION_LABELS: [&str; 3] =
    ["version", "app.kubernetes.io/version", "service.istio.io/canonical-revision"];

/// What balancing reads of a request and its connection.
#[derive(Clone, Copy, Debug)]
pub struct Request<'r> {
    pub headers: &'r HeaderMap,
    /// The path with its query, as sent (`:path`).
    pub path: &'r str,
    /// The source workload's address.
    pub source_ip: IpAddr,
    /// The address the client sent to (the HBONE CONNECT target).
    pub original_destination: SocketAddr,
}

/// The upstream group a round-robin position belongs to: Envoy's cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cluster<'c> {
    pub host: &'c str,
    pub subset: Option<&'c str>,
    pub port: u16,
}

/// What the caller keeps between requests. The proxy backs it with a fast random source and
/// per-cluster and per-endpoint counters; tests script it.
pub trait LoadState {
    /// A uniformly distributed number.
    fn random(&mut self) -> u64;
    /// The round-robin position of `cluster`, advanced by one.
    fn next_turn(&mut self, cluster: &Cluster<'_>) -> u64;
    /// The requests in flight to `endpoint`.
    fn in_flight(&self, endpoint: &Endpoint) -> u64;
    /// Narrows the candidates before the pick: ejected endpoints leave, and a retry prefers
    /// endpoints not tried yet. An empty result is 503 UH.
    fn filter(&mut self, _candidates: &mut Vec<Endpoint>) {}
}

/// Where the request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// An endpoint of the destination service, at `address` (its address in the family of the
    /// original destination, and the resolved target port).
    Endpoint { endpoint: Endpoint, address: SocketAddr },
    /// PASSTHROUGH: the address the client sent to.
    OriginalDestination(SocketAddr),
}

/// Why a forwarded request has no upstream; each is a 503 (see [`BalanceError::flags`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BalanceError {
    #[error("destination {host} is not a service of the mesh: is the host in the VirtualService the service's full hostname?")]
    NoService { host: String },
    #[error(
        "service {host} has no port {port}: does the VirtualService destination name a port of the service?"
    )]
    NoPort { host: String, port: u16 },
    #[error("subset {subset} of {host} is not defined: does the DestinationRule for {host}, bound to this waypoint, define it?")]
    NoSubset { host: String, subset: String },
    #[error("no healthy endpoint of {host} port {port}{}: are its pods ready and serving the target port?", in_subset(.subset))]
    NoHealthyEndpoint { host: String, subset: Option<String>, port: u16 },
    #[error("subset {subset} of {host} selects on label {label:?}, which the mesh state does not carry: select on app or version (the canonical name and revision)")]
    UnknownLabel { host: String, subset: String, label: String },
}

impl BalanceError {
    pub fn status(&self) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }

    /// NC when the destination is not known, UH when it has no endpoint to send to.
    pub fn flags(&self) -> ResponseFlags {
        match self {
            BalanceError::NoService { .. } | BalanceError::NoPort { .. } | BalanceError::NoSubset { .. } => {
                ResponseFlags::NoClusterFound
            }
            BalanceError::NoHealthyEndpoint { .. } | BalanceError::UnknownLabel { .. } => {
                ResponseFlags::NoHealthyUpstream
            }
        }
    }
}

/// The upstream of `forward` (see the module docs).
pub fn choose(
    config: &Waypoint,
    state: &ProxyState,
    forward: &Forward<'_>,
    request: &Request<'_>,
    load: &mut impl LoadState,
) -> Result<Upstream, BalanceError> {
    let target = &forward.target;
    let host = target.host;
    let bound = config.services.get(host);
    let service = mesh_service(state, host, bound.map(|s| s.namespace.as_str()))
        .ok_or_else(|| BalanceError::NoService { host: host.to_owned() })?;
    if !service.ports.contains_key(&target.port) {
        return Err(BalanceError::NoPort { host: host.to_owned(), port: target.port });
    }
    let subset = match target.subset {
        None => None,
        Some(name) => Some(
            config
                .subset(host, name)
                .ok_or_else(|| BalanceError::NoSubset { host: host.to_owned(), subset: name.to_owned() })?,
        ),
    };
    let policy = traffic_policy(config, target.host, subset);
    let balancer = policy.map_or(&LoadBalancer::LeastRequest, |p| p.load_balancer(target.port));
    if *balancer == LoadBalancer::Passthrough {
        return Ok(Upstream::OriginalDestination(request.original_destination));
    }

    let mut candidates = state.endpoint_candidates(service, Some(target.port));
    if let Some(subset) = subset {
        if let Some(label) = subset.labels.keys().find(|k| !known_label(k)) {
            return Err(BalanceError::UnknownLabel {
                host: host.to_owned(),
                subset: subset.name.clone(),
                label: label.clone(),
            });
        }
        candidates.retain(|e| in_subset_labels(&e.workload, subset));
    }
    load.filter(&mut candidates);
    let no_endpoint = || BalanceError::NoHealthyEndpoint {
        host: host.to_owned(),
        subset: target.subset.map(str::to_owned),
        port: target.port,
    };
    if candidates.is_empty() {
        return Err(no_endpoint());
    }

    let cluster = Cluster { host, subset: target.subset, port: target.port };
    let index = pick(balancer, &candidates, &cluster, request, load);
    // `pick` returns an index below the (non-zero) length; the swap_remove cannot fail then.
    let endpoint = candidates.swap_remove(index.min(candidates.len() - 1));
    // Candidates have an address (`endpoint_candidates` keeps only those).
    let ip = endpoint.workload.address_like(request.original_destination.ip()).ok_or_else(no_endpoint)?;
    let address = SocketAddr::new(ip, endpoint.target_port);
    Ok(Upstream::Endpoint { endpoint, address })
}

/// The DestinationRule policy for requests to `host` (and `subset`): the subset's (laid over
/// the service's by the controller), else the service's; `None` for a host not bound here.
pub fn traffic_policy<'c>(
    config: &'c Waypoint,
    host: &str,
    subset: Option<&'c Subset>,
) -> Option<&'c TrafficPolicy> {
    subset.map(|s| &s.traffic_policy).or(config.services.get(host).map(|s| &s.traffic_policy))
}

/// The index among `candidates` (not empty) that `balancer` picks.
fn pick(
    balancer: &LoadBalancer,
    candidates: &[Endpoint],
    cluster: &Cluster<'_>,
    request: &Request<'_>,
    load: &mut impl LoadState,
) -> usize {
    let n = candidates.len() as u64;
    // Every index below is a value modulo `n`, so below `candidates.len()`.
    let index = |x: u64| usize::try_from(x % n).unwrap_or(0);
    match balancer {
        LoadBalancer::RoundRobin => index(load.next_turn(cluster)),
        // PASSTHROUGH never gets here (`choose` returns the original destination first).
        LoadBalancer::Random | LoadBalancer::Passthrough => index(load.random()),
        LoadBalancer::LeastRequest => {
            let first = index(load.random());
            if n == 1 {
                return first;
            }
            // A second draw among the others, so the two choices differ.
            let second =
                (first + 1 + usize::try_from(load.random() % (n - 1)).unwrap_or(0)) % candidates.len();
            if load.in_flight(&candidates[second]) < load.in_flight(&candidates[first]) {
                second
            } else {
                first
            }
        }
        LoadBalancer::ConsistentHash(key) => match hash_key(key, request) {
            Some(key) => rendezvous(key, candidates),
            None => index(load.random()),
        },
    }
}

/// The service `host` names: `<namespace>/<host>` with the bound service's namespace, else the
/// namespace a Kubernetes hostname carries.
fn mesh_service<'s>(state: &'s ProxyState, host: &str, namespace: Option<&str>) -> Option<&'s MeshService> {
    let namespace = namespace.or_else(|| {
        let mut labels = host.split('.');
        let (_name, ns, svc) = (labels.next()?, labels.next()?, labels.next()?);
        (svc == "svc").then_some(ns)
    })?;
    state.service_by_key(&format!("{namespace}/{host}")).map(Arc::as_ref)
}

fn known_label(key: &str) -> bool {
    NAME_LABELS.contains(&key) || REVISION_LABELS.contains(&key)
}

/// Whether the workload's canonical name and revision agree with every label of the subset
/// (all of which are [`known_label`]s).
fn in_subset_labels(workload: &Workload, subset: &Subset) -> bool {
    subset.labels.iter().all(|(key, value)| {
        if NAME_LABELS.contains(&key.as_str()) {
            workload.canonical_name == *value
        } else {
            REVISION_LABELS.contains(&key.as_str()) && workload.canonical_revision == *value
        }
    })
}

/// The hash of the request's key, `None` when the request does not carry it.
fn hash_key(key: &HashKey, request: &Request<'_>) -> Option<u64> {
    match key {
        HashKey::Header(name) => {
            let mut values = request.headers.get_all(name).iter();
            let mut hash = Fnv::new().write(values.next()?.as_bytes());
            for value in values {
                hash = hash.write(b",").write(value.as_bytes());
            }
            Some(hash.finish())
        }
        HashKey::Cookie(name) => {
            let value = request.headers.get_all(COOKIE).iter().find_map(|header| {
                header.as_bytes().split(|b| *b == b';').find_map(|pair| {
                    let pair = pair.trim_ascii();
                    let eq = pair.iter().position(|b| *b == b'=')?;
                    (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
                })
            })?;
            Some(Fnv::new().write(value).finish())
        }
        HashKey::SourceIp => Some(match request.source_ip.to_canonical() {
            IpAddr::V4(ip) => Fnv::new().write(&ip.octets()).finish(),
            IpAddr::V6(ip) => Fnv::new().write(&ip.octets()).finish(),
        }),
        HashKey::QueryParameter(name) => {
            let (_, query) = request.path.split_once('?')?;
            let value = query.split('&').find_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (key == name).then_some(value)
            })?;
            Some(Fnv::new().write(value.as_bytes()).finish())
        }
    }
}

/// Rendezvous (highest random weight) hashing: the endpoint whose uid scores highest with the
/// key. The score of a (key, endpoint) pair does not depend on the other endpoints, so removing
/// one moves only the keys it had, and adding one takes keys only to itself.
fn rendezvous(key: u64, candidates: &[Endpoint]) -> usize {
    let score = |e: &Endpoint| mix(key ^ mix(Fnv::new().write(e.workload.uid.as_bytes()).finish()));
    (0..candidates.len()).max_by_key(|&i| (score(&candidates[i]), std::cmp::Reverse(i))).unwrap_or(0)
}

/// FNV-1a, 64 bits: a stable hash (the same in every process and release, unlike std's
/// `DefaultHasher`), so replicas and restarts agree on where a key goes.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(self, bytes: &[u8]) -> Fnv {
        Fnv(bytes.iter().fold(self.0, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)))
    }

    fn finish(self) -> u64 {
        self.0
    }
}

/// SplitMix64's finalizer: spreads FNV's weak low bits over the whole word.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn in_subset(subset: &Option<String>) -> String {
    subset.as_ref().map(|s| format!(" in subset {s}")).unwrap_or_default()
}

#[cfg(test)]
mod tests;
