//! The conversion of `weft.waypoint.v1.Waypoint`: what each field becomes, and that every
//! problem of a resource is reported with where it is.

use std::time::Duration;

use http::StatusCode;
use weft_core::proto::weft::waypoint::v1 as wp;

use super::*;
use crate::testing::*;

fn convert(services: Vec<wp::Service>) -> Waypoint {
    Waypoint::try_from(waypoint(services)).unwrap_or_else(|e| panic!("{e}"))
}

fn problems(services: Vec<wp::Service>) -> Vec<Problem> {
    match Waypoint::try_from(waypoint(services)) {
        Ok(w) => panic!("expected problems, converted {w:#?}"),
        Err(e) => e.problems,
    }
}

/// The fields of the problems, in the order found.
fn fields(problems: &[Problem]) -> Vec<&str> {
    problems.iter().map(|p| p.field.as_str()).collect()
}

fn only_route(w: &Waypoint) -> &HttpRoute {
    &w.services[REVIEWS].routes[0]
}

#[test]
fn bookinfo_canary_with_subsets_converts() {
    let mut svc = reviews(vec![
        http(vec![header("end-user", exact("jason"))], vec![to(REVIEWS, "v2", 100)]),
        http(vec![], vec![to(REVIEWS, "v1", 90), to(REVIEWS, "v2", 10)]),
    ]);
    svc.destination_rule = "bookinfo/reviews".into();
    svc.subsets = ["v1", "v2"]
        .into_iter()
        .map(|v| wp::Subset {
            name: v.into(),
            labels: [("version".to_owned(), v.to_owned())].into(),
            traffic_policy: None,
        })
        .collect();
    let w = convert(vec![svc]);
    assert_eq!(w.identity.to_string(), "spiffe://cluster.local/ns/bookinfo/sa/waypoint");
    let s = &w.services[REVIEWS];
    assert_eq!(s.ports, [9080].into());
    assert_eq!(s.destination_rule.as_deref(), Some("bookinfo/reviews"));
    assert_eq!(w.subset(REVIEWS, "v2").map(|s| s.labels["version"].as_str()), Some("v2"));
    assert!(w.subset(REVIEWS, "v3").is_none());
    let first = &s.routes[0];
    assert_eq!(
        first.matches[0].headers,
        [HeaderMatch {
            key: HeaderKey::Name(HeaderName::from_static("end-user")),
            value: ValueMatch::Value(StringMatch::Exact("jason".into())),
        }]
    );
    let Action::Forward { destinations, rewrite } = &s.routes[1].action else { panic!("{:?}", s.routes[1]) };
    assert_eq!(rewrite, &Rewrite::default());
    let weights: Vec<(Option<&str>, u32)> =
        destinations.entries().iter().map(|d| (d.destination.subset.as_deref(), d.weight)).collect();
    assert_eq!(weights, [(Some("v1"), 90), (Some("v2"), 10)]);
    // No retries configured: Istio's default applies.
    assert_eq!(first.retries, Retries::Default);
    let default = first.retries.policy().unwrap();
    assert_eq!(default.attempts.get(), 2);
    assert!(default.retry_on.contains(&RetryOn::ConnectFailure));
    assert_eq!(default.retriable_status_codes, [StatusCode::SERVICE_UNAVAILABLE]);
}

#[test]
fn weighted_pick_walks_the_weights_in_order() {
    let w = convert(vec![reviews(vec![http(
        vec![],
        vec![to(REVIEWS, "v1", 25), to(REVIEWS, "zero", 0), to(REVIEWS, "v2", 50), to(REVIEWS, "v3", 25)],
    )])]);
    let Action::Forward { destinations, .. } = &only_route(&w).action else { panic!() };
    let subset = |pick| destinations.pick(pick).destination.subset.as_deref().unwrap();
    for (pick, expected) in
        [(0, "v1"), (24, "v1"), (25, "v2"), (74, "v2"), (75, "v3"), (99, "v3"), (100, "v1"), (u32::MAX, "v3")]
    {
        assert_eq!(subset(pick), expected, "pick {pick}");
    }
    // Weight 0 is never picked.
    assert!((0..1000).all(|p| subset(p) != "zero"));
}

#[test]
fn matches_convert_with_istios_presence_forms() {
    let m = wp::HttpMatch {
        name: "m".into(),
        uri: Some(regex("/reviews/[0-9]+")),
        ignore_uri_case: true,
        method: Some(exact("GET")),
        scheme: Some(any()),
        headers: [
            ("X-Empty".to_owned(), any()),
            ("x-prefix-empty".to_owned(), prefix("")),
            ("x-star".to_owned(), regex("*")),
            ("x-dot-star".to_owned(), regex(".*")),
            (":authority".to_owned(), exact("reviews:9080")),
            ("host".to_owned(), prefix("reviews")),
        ]
        .into(),
        query_params: [("q".to_owned(), any()), ("v".to_owned(), exact("1"))].into(),
        port: 9080,
        source_namespace: "bookinfo".into(),
        source_labels: [("app".to_owned(), "productpage".to_owned())].into(),
        ..Default::default()
    };
    let w = convert(vec![reviews(vec![http(vec![m], vec![to(REVIEWS, "", 100)])])]);
    let m = &only_route(&w).matches[0];
    assert!(matches!(&m.uri, Some(StringMatch::Regex(p)) if p.source() == "/reviews/[0-9]+"));
    assert!(m.ignore_uri_case);
    assert_eq!(m.method, Some(StringMatch::Exact("GET".into())));
    // A typeless uri/scheme/method/authority match is no condition.
    assert_eq!(m.scheme, None);
    assert_eq!(m.port, Some(9080));
    assert_eq!(m.source_namespace.as_deref(), Some("bookinfo"));
    let keys: Vec<(String, bool)> =
        m.headers.iter().map(|h| (h.key.to_string(), h.value == ValueMatch::Present)).collect();
    // In the map's order; `host` is the authority, names are lowercase.
    let expected = [
        (":authority", false),
        ("x-empty", true),
        (":authority", false),
        ("x-dot-star", true),
        ("x-prefix-empty", true),
        ("x-star", true),
    ];
    assert_eq!(keys, expected.map(|(k, p)| (k.to_owned(), p)));
    assert_eq!(m.query_params[0], QueryMatch { name: "q".into(), value: ValueMatch::Present });
}

#[test]
fn match_regexes_are_anchored_and_cannot_escape_the_anchor() {
    let pattern = Pattern::new("/reviews/[0-9]+").unwrap();
    assert!(pattern.is_match(b"/reviews/12"));
    assert!(!pattern.is_match(b"/reviews/12/x"));
    assert!(!pattern.is_match(b"x/reviews/12"));
    // An alternation matches whole values too.
    let alternation = Pattern::new("a|b").unwrap();
    assert!(alternation.is_match(b"a") && !alternation.is_match(b"ab"));
    // A pattern that would close the anchoring group is refused, as RE2 refuses it.
    assert!(Pattern::new("a)|(b").is_err());
    assert!(Pattern::new("(a").is_err());
    // RE2 forms the regex crate does not have are refused, not misread.
    assert!(Pattern::new(r"\Qa.b\E").is_err());
    assert!(Pattern::new(r"\C").is_err());
    // Backreferences and lookaround are RE2's exclusions too.
    assert!(Pattern::new(r"(a)\1").is_err());
    assert!(Pattern::new(r"a(?=b)").is_err());
    // A pattern that compiles too large is refused rather than allocated.
    assert!(Pattern::new(r"\w{1000}{1000}").is_err());
}

#[test]
fn every_problem_of_a_resource_is_reported_with_route_and_field() {
    let bad_matches = wp::HttpMatch {
        uri: Some(regex("(unclosed")),
        headers: [("x-a".to_owned(), regex("[z-a]")), ("bad header".to_owned(), exact("v"))].into(),
        query_params: [("q".to_owned(), regex("+"))].into(),
        port: 70000,
        ..Default::default()
    };
    let mut first = http(vec![bad_matches], vec![to(REVIEWS, "v1", 0), to(REVIEWS, "v2", 0)]);
    first.name = "first".into();
    let mut second = http(vec![], vec![to(REVIEWS, "", 100)]);
    second.rewrite = Some(wp::Rewrite { uri_regex: "^/(a".into(), ..Default::default() });
    second.timeout = Some(prost_types::Duration { seconds: -1, nanos: 0 });
    let mut svc = reviews(vec![first, second]);
    svc.ports.push(0);
    let mut w = waypoint(vec![svc]);
    w.identity = "not-spiffe".into();
    let err = Waypoint::try_from(&w).unwrap_err();
    assert_eq!(err.waypoint, "bookinfo/waypoint");
    let got: Vec<(&str, &str)> = err.problems.iter().map(|p| (p.at.as_str(), p.field.as_str())).collect();
    let first_at = format!("VirtualService bookinfo/reviews http[0] (\"first\") for service {REVIEWS}");
    let second_at = format!("VirtualService bookinfo/reviews http[1] for service {REVIEWS}");
    let service_at = format!("service {REVIEWS}");
    assert_eq!(
        got,
        [
            ("waypoint bookinfo/waypoint", "identity"),
            (service_at.as_str(), "ports[1]"),
            (first_at.as_str(), "match[0].uri.regex"),
            (first_at.as_str(), "match[0].headers[bad header]"),
            (first_at.as_str(), "match[0].headers[x-a].regex"),
            (first_at.as_str(), "match[0].queryParams[q].regex"),
            (first_at.as_str(), "match[0].port"),
            (first_at.as_str(), "route[].weight"),
            (second_at.as_str(), "rewrite.uriRegexRewrite"),
            (second_at.as_str(), "timeout"),
        ]
    );
    // The message names the waypoint and says what is wrong and where.
    let message = err.to_string();
    assert!(
        message.starts_with("waypoint bookinfo/waypoint: configuration refused, 10 problem(s): "),
        "{message}"
    );
    assert!(
        message.contains(&format!("{first_at}: field `match[0].uri.regex`: not a valid regex")),
        "{message}"
    );
}

#[test]
fn route_actions_must_be_exactly_one() {
    let none = http(vec![], vec![]);
    let mut both = http(vec![], vec![to(REVIEWS, "", 100)]);
    both.direct_response = Some(wp::DirectResponse { status: 200, body: vec![] });
    let mut redirect_with_rewrite = http(vec![], vec![]);
    redirect_with_rewrite.redirect = Some(wp::Redirect { uri: "/x".into(), ..Default::default() });
    redirect_with_rewrite.rewrite = Some(wp::Rewrite { uri: "/y".into(), ..Default::default() });
    let mut bad_status = http(vec![], vec![]);
    bad_status.direct_response = Some(wp::DirectResponse { status: 99, body: vec![] });
    let mut bad_code = http(vec![], vec![]);
    bad_code.redirect = Some(wp::Redirect { redirect_code: 305, ..Default::default() });
    let mut no_destination = http(vec![], vec![]);
    no_destination.destinations = vec![wp::WeightedDestination { weight: 100, ..Default::default() }];
    let p = problems(vec![reviews(vec![
        none,
        both,
        redirect_with_rewrite,
        bad_status,
        bad_code,
        no_destination,
    ])]);
    assert_eq!(
        fields(&p),
        [
            "route",
            "route",
            "rewrite",
            "directResponse.status",
            "redirect.redirectCode",
            "route[0].destination"
        ]
    );
}

#[test]
fn redirect_and_direct_response_convert() {
    let mut redirect = http(vec![], vec![]);
    redirect.redirect = Some(wp::Redirect {
        uri: "/v1/bookRatings".into(),
        authority: "newratings.default.svc.cluster.local".into(),
        port: 8443,
        scheme: "HTTPS".into(),
        redirect_code: 0,
    });
    let mut direct = http(vec![], vec![]);
    direct.direct_response = Some(wp::DirectResponse { status: 503, body: b"unknown error".to_vec() });
    let w = convert(vec![reviews(vec![redirect, direct])]);
    let routes = &w.services[REVIEWS].routes;
    assert_eq!(
        routes[0].action,
        Action::Redirect(Redirect {
            uri: Some("/v1/bookRatings".into()),
            authority: Some("newratings.default.svc.cluster.local".into()),
            port: Some(8443),
            scheme: Some("https".into()),
            // 0 is the wire's "unset": Istio's default.
            status: StatusCode::MOVED_PERMANENTLY,
        })
    );
    assert_eq!(
        routes[1].action,
        Action::DirectResponse(DirectResponse {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: b"unknown error".to_vec()
        })
    );
}

#[test]
fn bad_redirect_and_rewrite_values_are_refused() {
    let mut redirect = http(vec![], vec![]);
    redirect.redirect = Some(wp::Redirect {
        uri: "/a b".into(),
        authority: "user@host".into(),
        port: 65536,
        scheme: "ht tp".into(),
        redirect_code: 302,
    });
    let mut rewrite = http(vec![], vec![to(REVIEWS, "", 100)]);
    rewrite.rewrite = Some(wp::Rewrite {
        uri: "/x".into(),
        authority: "bad host".into(),
        uri_regex: "/(.*)".into(),
        uri_regex_replacement: "/\\1".into(),
    });
    let mut replacement_only = http(vec![], vec![to(REVIEWS, "", 100)]);
    replacement_only.rewrite = Some(wp::Rewrite { uri_regex_replacement: "/x".into(), ..Default::default() });
    let p = problems(vec![reviews(vec![redirect, rewrite, replacement_only])]);
    assert_eq!(
        fields(&p),
        [
            "redirect.uri",
            "redirect.authority",
            "redirect.port",
            "redirect.scheme",
            "rewrite",
            "rewrite.authority",
            "rewrite.uriRegexRewrite.match"
        ]
    );
}

#[test]
fn regex_rewrites_take_re2_replacements() {
    /// pattern, replacement, then (a path, what it becomes) or what the refusal says.
    type Case = (&'static str, &'static str, Result<(&'static str, &'static str), &'static str>);
    let table: &[Case] = &[
        // Istio's documented example.
        (r"^/service/([^/]+)(/.*)$", r"\2/instance/\1", Ok(("/service/foo/bar", "/bar/instance/foo"))),
        // Every match is replaced; `$` is literal in RE2's form.
        ("a", "$1", Ok(("/banana", "/b$1n$1n$1"))),
        (r"/(\w+)", r"/\\\0", Ok(("/x", "/\\/x"))),
        ("/x", r"\1", Err("names a group the regex does not have")),
        ("/x", r"\q", Err("a backslash must be followed")),
        ("/x", "/a b", Err("a character a path cannot carry")),
        ("(", "/", Err("not a valid regex")),
    ];
    for (pattern, replacement, expected) in table {
        let got = RegexRewrite::new(pattern, replacement);
        match (expected, got) {
            (Ok((path, rewritten)), Ok(r)) => {
                assert_eq!(r.apply(path), *rewritten, "{pattern} -> {replacement}");
                assert_eq!((r.pattern(), r.replacement()), (*pattern, *replacement));
            }
            (Err(reason), Err(e)) => assert!(e.contains(reason), "{pattern} -> {replacement}: {e}"),
            (expected, got) => panic!("{pattern} -> {replacement}: expected {expected:?}, got {got:?}"),
        }
    }
}

#[test]
fn header_operations_take_host_as_an_authority_rewrite() {
    let ops = |set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]| wp::HeaderOperations {
        set: set.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        add: add.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        remove: remove.iter().map(|r| (*r).to_owned()).collect(),
    };
    let mut route = http(vec![], vec![to(REVIEWS, "", 100)]);
    route.headers = Some(wp::Headers {
        request: Some(ops(&[("Host", "reviews.example"), ("x-set", "1")], &[("x-add", "2")], &["x-gone"])),
        response: Some(ops(&[], &[("x-served-by", "waypoint")], &[])),
    });
    let w = convert(vec![reviews(vec![route])]);
    let headers = &only_route(&w).headers;
    assert_eq!(headers.authority.as_deref(), Some("reviews.example"));
    assert_eq!(headers.request.set, [(HeaderName::from_static("x-set"), HeaderValue::from_static("1"))]);
    assert_eq!(headers.request.add, [(HeaderName::from_static("x-add"), HeaderValue::from_static("2"))]);
    assert_eq!(headers.request.remove, [HeaderName::from_static("x-gone")]);
    assert_eq!(headers.response.add.len(), 1);

    // Envoy's order: remove, set (replacing), add (appending).
    let mut map = HeaderMap::new();
    map.append("x-gone", HeaderValue::from_static("a"));
    map.append("x-set", HeaderValue::from_static("old"));
    map.append("x-set", HeaderValue::from_static("older"));
    map.append("x-add", HeaderValue::from_static("1"));
    headers.request.apply(&mut map);
    assert!(map.get("x-gone").is_none());
    assert_eq!(map.get_all("x-set").iter().collect::<Vec<_>>(), ["1"]);
    assert_eq!(map.get_all("x-add").iter().collect::<Vec<_>>(), ["1", "2"]);
    assert!(!headers.request.is_empty() && HeaderOps::default().is_empty());

    let mut bad = http(vec![], vec![to(REVIEWS, "", 100)]);
    bad.headers = Some(wp::Headers {
        request: Some(ops(&[(":path", "/x"), ("x-v", "a\nb")], &[(":authority", "bad host")], &["host"])),
        response: Some(ops(&[("host", "x")], &[], &["bad name"])),
    });
    assert_eq!(
        fields(&problems(vec![reviews(vec![bad])])),
        [
            "headers.request.set[:path]",
            "headers.request.set[x-v]",
            "headers.request.add[:authority]",
            "headers.request.remove[0]",
            "headers.response.set[host]",
            "headers.response.remove[0]"
        ]
    );
}

#[test]
fn retries_timeouts_faults_and_mirrors_convert() {
    let mut route = http(vec![], vec![to(REVIEWS, "", 100)]);
    route.timeout = secs(10);
    route.retries = Some(wp::Retries {
        attempts: 3,
        per_try_timeout: Some(prost_types::Duration { seconds: 2, nanos: 500_000_000 }),
        retry_on: vec!["5xx".into(), " 409 ".into(), "reset".into()],
        backoff: secs(0),
        retry_remote_localities: true,
    });
    route.fault = Some(wp::Fault {
        delay: Some(wp::fault::Delay { fixed_delay: secs(7), percentage: 0.1 }),
        abort: Some(wp::fault::Abort { http_status: 500, percentage: 100.0, grpc_status: String::new() }),
    });
    route.mirrors = vec![wp::Mirror {
        destination: Some(wp::Destination { host: RATINGS.into(), subset: "v2".into(), port: 9080 }),
        percentage: 50.0,
    }];
    let mut disabled = http(vec![], vec![to(REVIEWS, "", 100)]);
    disabled.retries = Some(wp::Retries { attempts: 0, ..Default::default() });
    disabled.timeout = secs(0);
    let mut conditions_default = http(vec![], vec![to(REVIEWS, "", 100)]);
    conditions_default.retries = Some(wp::Retries { attempts: 5, ..Default::default() });
    let w = convert(vec![reviews(vec![route, disabled, conditions_default])]);
    let routes = &w.services[REVIEWS].routes;
    let r = &routes[0];
    assert_eq!(r.timeout, Some(Duration::from_secs(10)));
    assert_eq!(
        r.retries,
        Retries::Policy(RetryPolicy {
            attempts: NonZeroU32::new(3).unwrap(),
            per_try_timeout: Some(Duration::from_millis(2500)),
            // A status code in retryOn brings the condition that makes it count, as in Istio.
            retry_on: vec![RetryOn::FiveXx, RetryOn::Reset, RetryOn::RetriableStatusCodes],
            retriable_status_codes: vec![StatusCode::CONFLICT],
            // Zero is unset.
            backoff: None,
        })
    );
    assert_eq!(
        r.fault,
        Fault {
            delay: Some(Delay { fixed: Duration::from_secs(7), percentage: Percent(0.1) }),
            abort: Some(Abort {
                status: AbortStatus::Http(StatusCode::INTERNAL_SERVER_ERROR),
                percentage: Percent::ALL
            }),
        }
    );
    assert_eq!(
        r.mirrors,
        [Mirror {
            destination: Destination { host: RATINGS.into(), subset: Some("v2".into()), port: Some(9080) },
            percentage: Percent(50.0),
        }]
    );
    assert_eq!(routes[1].retries, Retries::Disabled);
    assert_eq!(routes[1].retries.policy(), None);
    assert_eq!(routes[1].timeout, None);
    let Retries::Policy(p) = &routes[2].retries else { panic!("{:?}", routes[2].retries) };
    assert_eq!((p.attempts.get(), p.retry_on.as_slice()), (5, DEFAULT_RETRY_ON.as_slice()));

    // gRPC aborts by name or number; anything else names the field.
    for (grpc, expected) in [("UNAVAILABLE", Some(14)), ("unavailable", Some(14)), ("8", Some(8))] {
        let mut route = http(vec![], vec![to(REVIEWS, "", 100)]);
        route.fault = Some(wp::Fault {
            abort: Some(wp::fault::Abort { http_status: 0, percentage: 100.0, grpc_status: grpc.into() }),
            ..Default::default()
        });
        let w = convert(vec![reviews(vec![route])]);
        let abort = w.services[REVIEWS].routes[0].fault.abort.clone().map(|a| a.status);
        assert_eq!(abort, expected.map(AbortStatus::Grpc), "{grpc}");
    }
    for grpc in ["OK", "0", "17", "SOMETIMES"] {
        let mut route = http(vec![], vec![to(REVIEWS, "", 100)]);
        route.fault = Some(wp::Fault {
            abort: Some(wp::fault::Abort { http_status: 0, percentage: 100.0, grpc_status: grpc.into() }),
            ..Default::default()
        });
        assert_eq!(fields(&problems(vec![reviews(vec![route])])), ["fault.abort.grpcStatus"], "{grpc}");
    }

    let mut bad = http(vec![], vec![to(REVIEWS, "", 100)]);
    bad.retries = Some(wp::Retries {
        attempts: 1,
        retry_on: vec!["sometimes".into(), "600".into()],
        per_try_timeout: Some(prost_types::Duration { seconds: 1, nanos: -1 }),
        ..Default::default()
    });
    bad.fault = Some(wp::Fault {
        delay: Some(wp::fault::Delay { fixed_delay: None, percentage: f64::NAN }),
        abort: Some(wp::fault::Abort { http_status: 0, percentage: 101.0, grpc_status: String::new() }),
    });
    bad.mirrors = vec![wp::Mirror { destination: None, percentage: -1.0 }];
    assert_eq!(
        fields(&problems(vec![reviews(vec![bad])])),
        [
            "retries.retryOn[0]",
            "retries.retryOn[1]",
            "retries.perTryTimeout",
            "fault.delay.fixedDelay",
            "fault.delay.percentage",
            "fault.abort.httpStatus",
            "fault.abort.percentage",
            "mirrors[0].destination",
            "mirrors[0].percentage",
        ]
    );
}

fn lb(simple: wp::load_balancer::Simple) -> Option<wp::LoadBalancer> {
    Some(wp::LoadBalancer { simple: simple as i32, ..Default::default() })
}

#[test]
fn traffic_policy_with_port_level_overrides() {
    use wp::load_balancer::Simple;
    let mut svc = reviews(vec![]);
    svc.destination_rule = "bookinfo/reviews".into();
    svc.traffic_policy = Some(wp::TrafficPolicy {
        load_balancer: lb(Simple::Random),
        connection_pool: Some(wp::ConnectionPool {
            max_connections: 1,
            http1_max_pending_requests: 1,
            connect_timeout: secs(3),
            ..Default::default()
        }),
        outlier_detection: Some(wp::OutlierDetection {
            consecutive_5xx_errors: 1,
            interval: secs(1),
            base_ejection_time: secs(180),
            max_ejection_percent: 100,
            ..Default::default()
        }),
        port_level: [(
            9080,
            wp::TrafficPolicy {
                load_balancer: Some(wp::LoadBalancer { hash_header: "X-User".into(), ..Default::default() }),
                ..Default::default()
            },
        )]
        .into(),
    });
    svc.subsets = vec![wp::Subset {
        name: "v2".into(),
        labels: [("version".to_owned(), "v2".to_owned())].into(),
        traffic_policy: Some(wp::TrafficPolicy {
            load_balancer: lb(Simple::RoundRobin),
            ..Default::default()
        }),
    }];
    let w = convert(vec![svc]);
    let policy = &w.services[REVIEWS].traffic_policy;
    assert_eq!(
        policy.load_balancer(9080),
        &LoadBalancer::ConsistentHash(HashKey::Header(HeaderName::from_static("x-user")))
    );
    // A section the port does not set comes from the service's.
    assert_eq!(policy.load_balancer(9081), &LoadBalancer::Random);
    let pool = policy.connection_pool(9080).unwrap();
    assert_eq!(
        (pool.max_connections, pool.connect_timeout),
        (NonZeroU32::new(1), Some(Duration::from_secs(3)))
    );
    assert_eq!(pool.http2_max_requests, None);
    let outlier = policy.outlier_detection(9080).unwrap();
    assert_eq!((outlier.consecutive_5xx_errors, outlier.max_ejection_percent), (1, 100));
    assert_eq!(
        w.subset(REVIEWS, "v2").unwrap().traffic_policy.load_balancer(9080),
        &LoadBalancer::RoundRobin
    );
    // Without a DestinationRule: Istio's defaults.
    let plain = convert(vec![reviews(vec![])]);
    let policy = &plain.services[REVIEWS].traffic_policy;
    assert_eq!(policy.load_balancer(9080), &LoadBalancer::LeastRequest);
    assert!(policy.connection_pool(9080).is_none() && policy.outlier_detection(9080).is_none());
    assert_eq!(plain.services[REVIEWS].destination_rule, None);
}

#[test]
fn bad_traffic_policies_are_refused() {
    use wp::load_balancer::Simple;
    let mut svc = reviews(vec![]);
    svc.destination_rule = "bookinfo/reviews".into();
    svc.traffic_policy = Some(wp::TrafficPolicy {
        load_balancer: Some(wp::LoadBalancer { simple: 42, ..Default::default() }),
        outlier_detection: Some(wp::OutlierDetection { min_health_percent: 101, ..Default::default() }),
        port_level: [
            (0, wp::TrafficPolicy::default()),
            (
                80,
                wp::TrafficPolicy {
                    load_balancer: Some(wp::LoadBalancer {
                        simple: Simple::Random as i32,
                        hash_source_ip: true,
                        ..Default::default()
                    }),
                    port_level: [(81, wp::TrafficPolicy::default())].into(),
                    ..Default::default()
                },
            ),
            (
                90,
                wp::TrafficPolicy {
                    load_balancer: Some(wp::LoadBalancer {
                        hash_cookie: "c".into(),
                        hash_query_parameter: "q".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ),
        ]
        .into(),
        ..Default::default()
    });
    svc.subsets = vec![
        wp::Subset { name: "v1".into(), ..Default::default() },
        wp::Subset { name: "v1".into(), ..Default::default() },
        wp::Subset::default(),
    ];
    let p = problems(vec![svc]);
    let dr_at = format!("DestinationRule bookinfo/reviews for service {REVIEWS}");
    assert!(p.iter().all(|p| p.at == dr_at), "{p:?}");
    assert_eq!(
        fields(&p),
        [
            "trafficPolicy.loadBalancer.simple",
            "trafficPolicy.outlierDetection.minHealthPercent",
            "trafficPolicy.portLevelSettings[0].port",
            "trafficPolicy.portLevelSettings[80]",
            "trafficPolicy.portLevelSettings[80].loadBalancer",
            "trafficPolicy.portLevelSettings[90].loadBalancer.consistentHash",
            "subsets[1].name",
            "subsets[2].name",
        ]
    );
}

#[test]
fn services_listed_twice_or_without_hostname_are_refused() {
    let mut nameless = reviews(vec![]);
    nameless.hostname = String::new();
    let p = problems(vec![reviews(vec![]), reviews(vec![]), nameless]);
    assert_eq!(fields(&p), ["hostname", "hostname"]);
}

#[test]
fn the_effective_config_serializes_for_config_dump() {
    let mut route = http(vec![header("end-user", regex("jason|json"))], vec![to(REVIEWS, "v2", 100)]);
    route.rewrite = Some(wp::Rewrite {
        uri_regex: "^/a/(.*)".into(),
        uri_regex_replacement: r"/b/\1".into(),
        ..Default::default()
    });
    let w = convert(vec![reviews(vec![route])]);
    let json = serde_json::to_value(&w).unwrap();
    let route = &json["services"][REVIEWS]["routes"][0];
    assert_eq!(json["identity"], "spiffe://cluster.local/ns/bookinfo/sa/waypoint");
    assert_eq!(route["matches"][0]["headers"][0]["key"]["Name"], "end-user");
    assert_eq!(route["matches"][0]["headers"][0]["value"]["Value"]["Regex"]["source"], "jason|json");
    assert_eq!(route["action"]["Forward"]["rewrite"]["uri"]["Regex"]["pattern"], "^/a/(.*)");
    assert_eq!(route["action"]["Forward"]["rewrite"]["uri"]["Regex"]["replacement"], r"/b/\1");
}
