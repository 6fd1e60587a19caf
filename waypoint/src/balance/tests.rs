//! Table tests of load balancing: each policy, their precedence, the NC and UH answers, the
//! subset filter, the stickiness of consistent hashing, and hostile keys that must not panic.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use weft_core::state::{AddressResource, Protocol, Service as MeshService, Workload};

use super::*;
use crate::model::{HashKey, LoadBalancer, PortPolicy, Subset, Waypoint};
use crate::route::{Forward, HeaderChanges, Target};
use crate::testing::*;

const NS: &str = "bookinfo";
const PORT: u16 = 9080;
const TARGET_PORT: u16 = 8080;

/// The caller's side, scripted: random numbers in order (then 0), one round-robin counter per
/// cluster, requests in flight by workload name; and which of them were asked for.
#[derive(Default)]
struct Script {
    randoms: VecDeque<u64>,
    turns: HashMap<String, u64>,
    in_flight: HashMap<String, u64>,
    asked: Vec<&'static str>,
}

impl LoadState for Script {
    fn random(&mut self) -> u64 {
        self.asked.push("random");
        self.randoms.pop_front().unwrap_or(0)
    }

    fn next_turn(&mut self, cluster: &Cluster<'_>) -> u64 {
        self.asked.push("turn");
        let turn = self.turns.entry(format!("{cluster:?}")).or_default();
        *turn += 1;
        *turn - 1
    }

    fn in_flight(&self, endpoint: &Endpoint) -> u64 {
        self.in_flight.get(&endpoint.workload.name).copied().unwrap_or(0)
    }
}

fn randoms(values: &[u64]) -> Script {
    Script { randoms: values.iter().copied().collect(), ..Default::default() }
}

/// A pod of reviews, `reviews-<version>-<n>`, at 10.0.0.<n>.
fn pod(version: &str, n: u8) -> Workload {
    let name = format!("reviews-{version}-{n}");
    Workload {
        uid: format!("Kubernetes//Pod/{NS}/{name}"),
        name: name.clone(),
        namespace: NS.into(),
        addresses: vec![IpAddr::from([10, 0, 0, n])],
        network: String::new(),
        protocol: Protocol::Hbone,
        identity: "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews".parse().unwrap(),
        waypoint: None,
        node: "node-a".into(),
        canonical_name: "reviews".into(),
        canonical_revision: version.into(),
        workload_name: format!("reviews-{version}"),
        cluster_id: "Kubernetes".into(),
        services: [(format!("{NS}/{REVIEWS}"), [(PORT, TARGET_PORT)].into())].into(),
        authorization_policies: Vec::new(),
        healthy: true,
    }
}

/// The mesh: the service reviews (port 9080) and these pods.
fn mesh(pods: Vec<Workload>) -> ProxyState {
    let mut state = ProxyState::new("");
    let service = MeshService {
        name: "reviews".into(),
        namespace: NS.into(),
        hostname: REVIEWS.into(),
        addresses: Vec::new(),
        ports: [(PORT, TARGET_PORT)].into(),
        subject_alt_names: Vec::new(),
        waypoint: None,
        allow_unhealthy: false,
    };
    state.insert_address(&service.key(), AddressResource::Service(Box::new(service))).unwrap();
    for pod in pods {
        state.insert_address(&pod.uid.clone(), AddressResource::Workload(Box::new(pod))).unwrap();
    }
    state
}

/// Three pods: v1, v2 and v3 (pods 1, 2, 3).
fn three() -> ProxyState {
    mesh(vec![pod("v1", 1), pod("v2", 2), pod("v3", 3)])
}

/// The waypoint serving reviews with `balancer` at the top level of its DestinationRule, and
/// the subsets v1, v2, v3 (by `version`) without policies of their own.
fn config(balancer: Option<LoadBalancer>) -> Waypoint {
    let mut config = Waypoint::try_from(waypoint(vec![reviews(Vec::new())])).unwrap();
    let service = config.services.get_mut(REVIEWS).unwrap();
    service.traffic_policy.defaults.load_balancer = balancer;
    for version in ["v1", "v2", "v3"] {
        let subset = Subset {
            name: version.into(),
            labels: [("version".to_owned(), version.to_owned())].into(),
            traffic_policy: service.traffic_policy.clone(),
        };
        service.subsets.insert(version.into(), subset);
    }
    config
}

fn policy(balancer: LoadBalancer) -> PortPolicy {
    PortPolicy { load_balancer: Some(balancer), ..Default::default() }
}

/// A request with these headers and path, from 10.1.0.7, sent to the reviews VIP.
struct Req {
    headers: HeaderMap,
    path: String,
    source_ip: IpAddr,
}

fn req() -> Req {
    Req { headers: HeaderMap::new(), path: "/reviews/0".into(), source_ip: IpAddr::from([10, 1, 0, 7]) }
}

impl Req {
    fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Req {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value.as_ref()).unwrap(),
        );
        self
    }

    fn path(mut self, path: &str) -> Req {
        self.path = path.into();
        self
    }

    fn from(mut self, ip: IpAddr) -> Req {
        self.source_ip = ip;
        self
    }
}

fn vip() -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 9], PORT))
}

/// The upstream for a request forwarded to `host`/`subset`:`port`.
fn choose_for(
    config: &Waypoint,
    state: &ProxyState,
    (host, subset, port): (&str, Option<&str>, u16),
    req: &Req,
    load: &mut Script,
) -> Result<Upstream, BalanceError> {
    let service = config.services.get(REVIEWS).unwrap();
    let forward = Forward {
        service,
        route: None,
        target: Target { host, subset, port },
        path: None,
        authority: None,
        headers: HeaderChanges::default(),
    };
    let request = Request {
        headers: &req.headers,
        path: &req.path,
        source_ip: req.source_ip,
        original_destination: vip(),
    };
    choose(config, state, &forward, &request, load)
}

/// The name of the pod chosen for a request to reviews:9080 (optionally a subset), or the
/// error's flag.
fn chosen(
    config: &Waypoint,
    state: &ProxyState,
    subset: Option<&str>,
    req: &Req,
    load: &mut Script,
) -> String {
    match choose_for(config, state, (REVIEWS, subset, PORT), req, load) {
        Ok(Upstream::Endpoint { endpoint, address }) => {
            assert_eq!(address, SocketAddr::new(endpoint.workload.addresses[0], TARGET_PORT));
            endpoint.workload.name.clone()
        }
        Ok(Upstream::OriginalDestination(addr)) => format!("passthrough {addr}"),
        Err(e) => e.flags().to_string(),
    }
}

#[test]
fn round_robin_takes_each_endpoint_in_turn() {
    let config = config(Some(LoadBalancer::RoundRobin));
    let state = three();
    let mut load = Script::default();
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut order = Vec::new();
    for _ in 0..300 {
        let name = chosen(&config, &state, None, &req(), &mut load);
        order.push(name.clone());
        *counts.entry(name).or_default() += 1;
    }
    assert_eq!(order[..4], ["reviews-v1-1", "reviews-v2-2", "reviews-v3-3", "reviews-v1-1"]);
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), [100, 100, 100]);
    // A subset is its own cluster, with its own position.
    assert_eq!(chosen(&config, &state, Some("v2"), &req(), &mut load), "reviews-v2-2");
    assert_eq!(load.turns.len(), 2);
}

#[test]
fn least_request_prefers_the_less_loaded_of_two_picks() {
    let config = config(Some(LoadBalancer::LeastRequest));
    let state = three();
    // (randoms, in flight per pod, chosen). The first draw is r0 % 3, the second one of the
    // other two: (first + 1 + r1 % 2) % 3.
    let cases: &[(&[u64], [u64; 3], &str)] = &[
        (&[0, 0], [5, 1, 0], "reviews-v2-2"),
        (&[0, 0], [1, 5, 0], "reviews-v1-1"),
        (&[0, 1], [5, 1, 0], "reviews-v3-3"),
        // A tie keeps the first pick.
        (&[1, 0], [0, 2, 2], "reviews-v2-2"),
        // Pod 1 is the least loaded but was not drawn.
        (&[1, 0], [0, 3, 2], "reviews-v3-3"),
    ];
    for (randoms, in_flight, want) in cases {
        let mut load = self::randoms(randoms);
        load.in_flight = ["reviews-v1-1", "reviews-v2-2", "reviews-v3-3"]
            .iter()
            .zip(in_flight)
            .map(|(name, n)| ((*name).to_owned(), *n))
            .collect();
        assert_eq!(chosen(&config, &state, None, &req(), &mut load), *want, "{randoms:?} {in_flight:?}");
        assert_eq!(load.asked, ["random", "random"]);
    }
    // One endpoint: no second draw.
    let mut load = randoms(&[7]);
    assert_eq!(chosen(&config, &mesh(vec![pod("v1", 1)]), None, &req(), &mut load), "reviews-v1-1");
    assert_eq!(load.asked, ["random"]);
}

#[test]
fn random_takes_the_random_number_modulo_the_endpoints() {
    let config = config(Some(LoadBalancer::Random));
    let state = three();
    for (random, want) in [(0, "reviews-v1-1"), (4, "reviews-v2-2"), (u64::MAX, "reviews-v1-1")] {
        assert_eq!(chosen(&config, &state, None, &req(), &mut randoms(&[random])), want);
    }
}

#[test]
fn passthrough_goes_to_the_original_destination_without_endpoints() {
    let config = config(Some(LoadBalancer::Passthrough));
    let mut load = Script::default();
    assert_eq!(chosen(&config, &mesh(Vec::new()), None, &req(), &mut load), format!("passthrough {}", vip()));
    assert!(load.asked.is_empty());
}

#[test]
fn no_policy_is_least_request() {
    for config in [config(None), Waypoint::try_from(waypoint(vec![reviews(Vec::new())])).unwrap()] {
        let mut load = randoms(&[0, 0]);
        load.in_flight.insert("reviews-v1-1".into(), 3);
        assert_eq!(chosen(&config, &three(), None, &req(), &mut load), "reviews-v2-2");
    }
}

#[test]
fn port_level_over_subset_over_top_level() {
    let other_port = PORT + 1;
    // (service top, service port-level on `port`, subset's merged policy: top, port-level on
    // `port`, port, subset, what is asked of the caller or where the request goes).
    type Case = (
        Option<LoadBalancer>,
        Option<(u16, LoadBalancer)>,
        Option<(Option<LoadBalancer>, Option<LoadBalancer>)>,
        Option<&'static str>,
        &'static str,
    );
    let passthrough = format!("passthrough {}", vip());
    let cases: Vec<Case> = vec![
        (Some(LoadBalancer::RoundRobin), None, None, None, "turn"),
        (Some(LoadBalancer::RoundRobin), Some((PORT, LoadBalancer::Passthrough)), None, None, "passthrough"),
        (Some(LoadBalancer::RoundRobin), Some((other_port, LoadBalancer::Passthrough)), None, None, "turn"),
        (None, Some((PORT, LoadBalancer::Random)), None, None, "random"),
        // The subset's own top level wins over the service's top level.
        (
            Some(LoadBalancer::RoundRobin),
            None,
            Some((Some(LoadBalancer::Passthrough), None)),
            Some("v1"),
            "passthrough",
        ),
        // ... but not for requests without the subset.
        (Some(LoadBalancer::RoundRobin), None, Some((Some(LoadBalancer::Passthrough), None)), None, "turn"),
        // The subset's port level wins over its top level.
        (
            Some(LoadBalancer::Random),
            None,
            Some((Some(LoadBalancer::Passthrough), Some(LoadBalancer::RoundRobin))),
            Some("v1"),
            "turn",
        ),
        // A subset without a policy of its own has the service's (merged by the controller).
        (Some(LoadBalancer::RoundRobin), None, Some((None, None)), Some("v1"), "turn"),
    ];
    for (top, port_level, subset_policy, subset, want) in cases {
        let mut config = config(top.clone());
        let service = config.services.get_mut(REVIEWS).unwrap();
        if let Some((port, balancer)) = port_level.clone() {
            service.traffic_policy.port_level.insert(port, policy(balancer));
        }
        let v1 = service.subsets.get_mut("v1").unwrap();
        v1.traffic_policy = service.traffic_policy.clone();
        if let Some((subset_top, subset_port)) = subset_policy.clone() {
            if subset_top.is_some() {
                v1.traffic_policy.defaults.load_balancer = subset_top;
            }
            if let Some(balancer) = subset_port {
                v1.traffic_policy.port_level = [(PORT, policy(balancer))].into();
            }
        }
        let mut load = Script::default();
        let got = chosen(&config, &three(), subset, &req(), &mut load);
        let case = format!("{top:?} {port_level:?} {subset_policy:?} {subset:?}");
        match want {
            "passthrough" => assert_eq!(got, passthrough, "{case}"),
            asked => assert_eq!(load.asked, [asked], "{case}"),
        }
    }
}

#[test]
fn unknown_destinations_are_503_nc() {
    let config = config(None);
    let state = three();
    let cases = [
        // Not a service of the mesh.
        ("ratings.bookinfo.svc.cluster.local", None, PORT),
        ("example.com", None, PORT),
        ("", None, PORT),
        // A port the service does not have.
        (REVIEWS, None, 9999),
        // A subset the DestinationRule does not define.
        (REVIEWS, Some("v9"), PORT),
    ];
    for target in cases {
        let err = choose_for(&config, &state, target, &req(), &mut Script::default()).unwrap_err();
        assert_eq!((err.status().as_u16(), err.flags().as_str()), (503, "NC"), "{target:?}: {err}");
    }
    // A host this waypoint does not serve has no DestinationRule here: no subsets.
    let mut state = three();
    let ratings = MeshService {
        name: "ratings".into(),
        namespace: NS.into(),
        hostname: RATINGS.into(),
        addresses: Vec::new(),
        ports: [(PORT, PORT)].into(),
        subject_alt_names: Vec::new(),
        waypoint: None,
        allow_unhealthy: false,
    };
    state.insert_address(&ratings.key(), AddressResource::Service(Box::new(ratings))).unwrap();
    let err = choose_for(&config, &state, (RATINGS, Some("v1"), PORT), &req(), &mut Script::default());
    assert_eq!(err.unwrap_err().flags().as_str(), "NC");
    // Without a subset it is found, and has no endpoints.
    let err = choose_for(&config, &state, (RATINGS, None, PORT), &req(), &mut Script::default());
    assert_eq!(err.unwrap_err().flags().as_str(), "UH");
}

#[test]
fn no_healthy_endpoint_is_503_uh() {
    let config = config(None);
    let mut sick = pod("v1", 1);
    sick.healthy = false;
    let mut no_port = pod("v2", 2);
    no_port.services.clear();
    let cases = [
        (mesh(Vec::new()), None),
        (mesh(vec![sick]), None),
        (mesh(vec![no_port]), None),
        // Pods, but none of the subset.
        (mesh(vec![pod("v1", 1), pod("v2", 2)]), Some("v3")),
    ];
    for (state, subset) in cases {
        let err = chosen(&config, &state, subset, &req(), &mut Script::default());
        assert_eq!(err, "UH", "{subset:?}");
    }
    let err =
        choose_for(&config, &mesh(Vec::new()), (REVIEWS, Some("v1"), PORT), &req(), &mut Script::default())
            .unwrap_err();
    assert_eq!(err.status().as_u16(), 503);
    assert!(err.to_string().contains("in subset v1"), "{err}");
}

#[test]
fn subsets_select_on_canonical_name_and_revision() {
    let mut config = config(Some(LoadBalancer::RoundRobin));
    let subsets = &mut config.services.get_mut(REVIEWS).unwrap().subsets;
    let mut labelled = |name: &str, labels: &[(&str, &str)]| {
        let mut subset = subsets["v1"].clone();
        subset.name = name.into();
        subset.labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        subsets.insert(name.into(), subset);
    };
    labelled("app-v2", &[("app", "reviews"), ("version", "v2")]);
    labelled("canonical", &[("service.istio.io/canonical-revision", "v3")]);
    labelled("other-app", &[("app", "ratings")]);
    labelled("all", &[]);
    labelled("tier", &[("tier", "gold")]);
    let state = mesh(vec![pod("v1", 1), pod("v2", 2), pod("v3", 3), pod("v2", 4)]);
    let cases = [
        ("v1", vec!["reviews-v1-1"]),
        ("v2", vec!["reviews-v2-2", "reviews-v2-4"]),
        ("app-v2", vec!["reviews-v2-2", "reviews-v2-4"]),
        ("canonical", vec!["reviews-v3-3"]),
        ("all", vec!["reviews-v1-1", "reviews-v2-2", "reviews-v2-4", "reviews-v3-3"]),
        ("other-app", vec!["UH"]),
    ];
    for (subset, want) in cases {
        let mut load = Script::default();
        let got: Vec<String> =
            (0..want.len()).map(|_| chosen(&config, &state, Some(subset), &req(), &mut load)).collect();
        assert_eq!(got, want, "{subset}");
    }
    // A label the state does not carry selects nothing, and says so.
    let err = choose_for(&config, &state, (REVIEWS, Some("tier"), PORT), &req(), &mut Script::default())
        .unwrap_err();
    assert_eq!(err.flags().as_str(), "UH");
    assert!(err.to_string().contains("\"tier\""), "{err}");
}

fn hashed(key: HashKey) -> Waypoint {
    config(Some(LoadBalancer::ConsistentHash(key)))
}

fn header_key() -> HashKey {
    HashKey::Header(HeaderName::from_static("x-user"))
}

#[test]
fn consistent_hash_sticks_and_spreads() {
    let state = three();
    type Keyed = Box<dyn Fn(u32) -> Req>;
    let cases: Vec<(HashKey, Keyed)> = vec![
        (header_key(), Box::new(|i| req().header("x-user", format!("user-{i}")))),
        (
            HashKey::Cookie("session".into()),
            Box::new(|i| req().header("cookie", format!("a=b; session={i}; c=d"))),
        ),
        (
            HashKey::SourceIp,
            Box::new(|i| req().from(IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]))),
        ),
        (
            HashKey::QueryParameter("user".into()),
            Box::new(|i| req().path(&format!("/r?x=1&user={i}&user=z"))),
        ),
    ];
    for (key, request) in cases {
        let config = hashed(key.clone());
        let mut load = Script::default();
        let mut used = BTreeMap::<String, u32>::new();
        for i in 0..200 {
            let first = chosen(&config, &state, None, &request(i), &mut load);
            for _ in 0..3 {
                assert_eq!(chosen(&config, &state, None, &request(i), &mut load), first, "{key:?} {i}");
            }
            *used.entry(first).or_default() += 1;
        }
        assert!(load.asked.is_empty(), "{key:?}: the hash needs no random number");
        assert_eq!(used.len(), 3, "{key:?}: {used:?}");
        assert!(used.values().all(|n| *n > 30), "{key:?}: {used:?}");
    }
}

#[test]
fn consistent_hash_key_sticks_over_200_calls() {
    let config = hashed(header_key());
    let state = three();
    let mut load = Script::default();
    let first = chosen(&config, &state, None, &req().header("x-user", "jason"), &mut load);
    for _ in 0..200 {
        assert_eq!(chosen(&config, &state, None, &req().header("x-user", "jason"), &mut load), first);
    }
}

#[test]
fn consistent_hash_moves_only_the_keys_of_a_removed_endpoint() {
    let config = hashed(header_key());
    let before_state = mesh(vec![pod("v1", 1), pod("v2", 2), pod("v3", 3), pod("v1", 4)]);
    let after_state = mesh(vec![pod("v1", 1), pod("v2", 2), pod("v1", 4)]);
    let grown_state = mesh(vec![pod("v1", 1), pod("v2", 2), pod("v3", 3), pod("v1", 4), pod("v2", 5)]);
    let mut load = Script::default();
    let (mut moved, mut gained) = (0, 0);
    for i in 0..400 {
        let request = req().header("x-user", format!("user-{i}"));
        let before = chosen(&config, &before_state, None, &request, &mut load);
        let after = chosen(&config, &after_state, None, &request, &mut load);
        if before == "reviews-v3-3" {
            moved += 1;
            assert_ne!(after, before);
        } else {
            assert_eq!(after, before, "user-{i} moved off an endpoint that stayed");
        }
        // An added endpoint takes keys only to itself.
        let grown = chosen(&config, &grown_state, None, &request, &mut load);
        if grown != before {
            assert_eq!(grown, "reviews-v2-5", "user-{i}");
            gained += 1;
        }
    }
    assert!(moved > 50 && gained > 40, "moved {moved}, gained {gained}");
}

#[test]
fn consistent_hash_without_the_key_is_random() {
    let state = three();
    let cases: [(HashKey, Req); 5] = [
        (header_key(), req()),
        (HashKey::Cookie("session".into()), req().header("cookie", "sessionx=1; other=2")),
        (HashKey::Cookie("session".into()), req()),
        (HashKey::QueryParameter("user".into()), req().path("/r?username=1")),
        (HashKey::QueryParameter("user".into()), req()),
    ];
    for (key, request) in cases {
        let mut load = randoms(&[2]);
        assert_eq!(
            chosen(&hashed(key.clone()), &state, None, &request, &mut load),
            "reviews-v3-3",
            "{key:?}"
        );
        assert_eq!(load.asked, ["random"]);
    }
}

#[test]
fn hostile_hash_keys_do_not_panic() {
    let state = three();
    let huge = vec![b'a'; 1 << 20];
    let mut many_cookies = b"=".repeat(10_000);
    many_cookies.extend_from_slice(b";;;; session");
    let cases: Vec<(HashKey, Req)> = vec![
        (header_key(), req().header("x-user", &huge)),
        (header_key(), req().header("x-user", "").header("x-user", "").header("x-user", &huge)),
        (header_key(), req().header("x-user", [0x80u8, 0xff, b'\t'])),
        (HashKey::Cookie("session".into()), req().header("cookie", &many_cookies)),
        (HashKey::Cookie("session".into()), req().header("cookie", [b"session=".as_slice(), &huge].concat())),
        (HashKey::Cookie("".into()), req().header("cookie", "=; ==; =x")),
        (HashKey::QueryParameter("user".into()), req().path(&format!("/?{}user=1", "&".repeat(100_000)))),
        (HashKey::QueryParameter("".into()), req().path("/??&=&==")),
        (HashKey::SourceIp, req().from("::ffff:10.1.0.7".parse().unwrap())),
    ];
    for (key, request) in cases {
        let got = chosen(&hashed(key.clone()), &state, None, &request, &mut Script::default());
        assert!(got.starts_with("reviews-"), "{key:?}: {got}");
    }
    // An IPv4-mapped source hashes as its IPv4 address.
    let config = hashed(HashKey::SourceIp);
    let mapped = chosen(
        &config,
        &state,
        None,
        &req().from("::ffff:10.1.0.7".parse().unwrap()),
        &mut Script::default(),
    );
    assert_eq!(mapped, chosen(&config, &state, None, &req(), &mut Script::default()));
}

#[test]
fn endpoint_address_follows_the_original_destination_family() {
    let mut dual = pod("v1", 1);
    dual.addresses = vec!["fd00::1".parse().unwrap(), IpAddr::from([10, 0, 0, 1])];
    let state = mesh(vec![dual]);
    let config = config(None);
    let got = choose_for(&config, &state, (REVIEWS, None, PORT), &req(), &mut Script::default()).unwrap();
    let Upstream::Endpoint { endpoint, address } = got else { panic!("{got:?}") };
    assert_eq!(address, SocketAddr::from(([10, 0, 0, 1], TARGET_PORT)));
    assert_eq!(endpoint.target_port, TARGET_PORT);
    assert!(Arc::ptr_eq(&endpoint.workload, state.workload_by_uid(&endpoint.workload.uid).unwrap()));
}
