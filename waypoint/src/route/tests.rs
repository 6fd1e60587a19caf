//! Table tests of the routing decision: Istio's documented examples (bookinfo's request routing
//! and traffic shifting, rewrites, redirects, direct responses, regex matches), every condition
//! and outcome, and hostile requests that must not panic.

use std::collections::BTreeMap;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use weft_core::identity::Identity;
use weft_core::proto::weft::waypoint::v1 as wp;

use super::*;
use crate::model::Waypoint;
use crate::testing::*;

/// A request, written short.
#[derive(Clone)]
struct Req {
    method: &'static str,
    scheme: &'static str,
    authority: &'static str,
    path: String,
    headers: Vec<(&'static str, Vec<u8>)>,
}

impl Req {
    fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Req {
        self.headers.push((name, value.into()));
        self
    }

    fn method(mut self, method: &'static str) -> Req {
        self.method = method;
        self
    }

    fn authority(mut self, authority: &'static str) -> Req {
        self.authority = authority;
        self
    }

    fn scheme(mut self, scheme: &'static str) -> Req {
        self.scheme = scheme;
        self
    }
}

fn get(path: &str) -> Req {
    Req {
        method: "GET",
        scheme: "http",
        authority: "reviews.bookinfo.svc.cluster.local:9080",
        path: path.to_owned(),
        headers: Vec::new(),
    }
}

/// Who sends, to which service and port.
#[derive(Clone)]
struct Conn {
    source: Option<Identity>,
    labels: Option<BTreeMap<String, String>>,
    service: &'static str,
    port: u16,
}

/// `productpage` in `bookinfo` calling reviews:9080.
fn productpage() -> Conn {
    Conn {
        source: Some("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage".parse().unwrap()),
        labels: Some(
            [("app".to_owned(), "productpage".to_owned()), ("version".to_owned(), "v1".to_owned())].into(),
        ),
        service: REVIEWS,
        port: 9080,
    }
}

/// A decision written short, owning what it says.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// host, subset, port, rewritten path, rewritten authority.
    Forward(String, Option<String>, u16, Option<String>, Option<String>),
    Redirect(u16, String),
    Direct(u16, Vec<u8>),
    NoRoute(NoRoute),
}

fn forward(host: &str, subset: Option<&str>, port: u16) -> Outcome {
    Outcome::Forward(host.into(), subset.map(Into::into), port, None, None)
}

/// Forwarded to reviews:9080 with this subset.
fn reviews_subset(subset: &str) -> Outcome {
    forward(REVIEWS, Some(subset), 9080)
}

fn rewritten(path: &str) -> Outcome {
    Outcome::Forward(REVIEWS.into(), None, 9080, Some(path.into()), None)
}

fn no_match() -> Outcome {
    Outcome::NoRoute(NoRoute::NoMatch { service: REVIEWS.into() })
}

fn decide(config: &Waypoint, req: &Req, conn: &Conn, pick: u32) -> Outcome {
    let mut headers = HeaderMap::new();
    for (name, value) in &req.headers {
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    let head = RequestHead {
        method: req.method,
        scheme: req.scheme,
        authority: req.authority,
        path: &req.path,
        headers: &headers,
    };
    let connection = Connection {
        source: conn.source.as_ref(),
        source_labels: conn.labels.as_ref(),
        service: conn.service,
        port: conn.port,
    };
    match route(config, &head, &connection, pick) {
        Decision::Forward(f) => Outcome::Forward(
            f.target.host.into(),
            f.target.subset.map(Into::into),
            f.target.port,
            f.path,
            f.authority.map(Into::into),
        ),
        Decision::Redirect { status, location, .. } => Outcome::Redirect(status.as_u16(), location),
        Decision::DirectResponse { status, body, .. } => Outcome::Direct(status.as_u16(), body.to_vec()),
        Decision::NoRoute(why) => Outcome::NoRoute(why),
    }
}

fn config(routes: Vec<wp::HttpRoute>) -> Waypoint {
    Waypoint::try_from(waypoint(vec![reviews(routes)])).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a table against routes: each request from productpage, pick 0.
fn table(routes: Vec<wp::HttpRoute>, cases: &[(&str, Req, Outcome)]) {
    let config = config(routes);
    for (name, req, expected) in cases {
        assert_eq!(&decide(&config, req, &productpage(), 0), expected, "{name}");
    }
}

/// Istio's request routing and traffic shifting tasks: `jason` sees v2; everyone else is split
/// 90/10 between v1 and v2.
fn bookinfo_reviews() -> Waypoint {
    config(vec![
        http(vec![header("end-user", exact("jason"))], vec![to(REVIEWS, "v2", 100)]),
        http(vec![], vec![to(REVIEWS, "v1", 90), to(REVIEWS, "v2", 10)]),
    ])
}

#[test]
fn bookinfo_canary_splits_by_the_callers_pick() {
    let config = bookinfo_reviews();
    let anyone = get("/reviews/0");
    for (pick, subset) in [(0, "v1"), (1, "v1"), (89, "v1"), (90, "v2"), (99, "v2"), (100, "v1"), (190, "v2")]
    {
        assert_eq!(decide(&config, &anyone, &productpage(), pick), reviews_subset(subset), "pick {pick}");
    }
    // Over a uniform run of picks, exactly the weights.
    let mut count: BTreeMap<Option<String>, u32> = BTreeMap::new();
    for pick in 0..10_000 {
        let Outcome::Forward(_, subset, ..) = decide(&config, &anyone, &productpage(), pick) else {
            panic!()
        };
        *count.entry(subset).or_default() += 1;
    }
    assert_eq!(count, [(Some("v1".into()), 9_000), (Some("v2".into()), 1_000)].into());
}

#[test]
fn bookinfo_jason_goes_to_v2_whatever_the_pick() {
    let config = bookinfo_reviews();
    let cases = [
        ("jason", get("/reviews/0").header("end-user", "jason"), Some("v2"), Some("v2")),
        ("header names ignore case", get("/").header("END-USER", "jason"), Some("v2"), Some("v2")),
        ("values do not", get("/").header("end-user", "Jason"), Some("v1"), Some("v2")),
        ("someone else", get("/").header("end-user", "mary"), Some("v1"), Some("v2")),
        ("a prefix of jason is not jason", get("/").header("end-user", "jas"), Some("v1"), Some("v2")),
        ("no header", get("/"), Some("v1"), Some("v2")),
    ];
    for (name, req, at_0, at_95) in cases {
        assert_eq!(decide(&config, &req, &productpage(), 0), forward(REVIEWS, at_0, 9080), "{name}");
        assert_eq!(decide(&config, &req, &productpage(), 95), forward(REVIEWS, at_95, 9080), "{name}");
    }
}

#[test]
fn uri_conditions() {
    let routed = |m: wp::HttpMatch, subset: &str| http(vec![m], vec![to(REVIEWS, subset, 100)]);
    let case_insensitive = |m| wp::HttpMatch { ignore_uri_case: true, ..uri(m) };
    table(
        vec![
            routed(uri(exact("/exact")), "exact"),
            routed(case_insensitive(exact("/Exact-Any-Case")), "exact-any-case"),
            routed(uri(prefix("/prefix")), "prefix"),
            routed(case_insensitive(prefix("/ANY")), "prefix-any-case"),
            routed(uri(regex(r"/reviews/\d+")), "regex"),
            routed(case_insensitive(regex("/regex-keeps-case")), "regex-keeps-case"),
            routed(uri(prefix("/q?x=")), "prefix-with-query"),
        ],
        &[
            ("exact", get("/exact"), reviews_subset("exact")),
            ("exact ignores the query", get("/exact?a=b"), reviews_subset("exact")),
            ("exact is exact", get("/exact/"), no_match()),
            ("exact is case-sensitive", get("/EXACT"), no_match()),
            ("ignoreUriCase exact", get("/exact-ANY-case?x"), reviews_subset("exact-any-case")),
            ("prefix", get("/prefix/and/more"), reviews_subset("prefix")),
            ("prefix is a string prefix", get("/prefixes"), reviews_subset("prefix")),
            ("ignoreUriCase prefix", get("/any/thing"), reviews_subset("prefix-any-case")),
            ("regex matches the whole path", get("/reviews/12"), reviews_subset("regex")),
            ("regex ignores the query", get("/reviews/12?id=3"), reviews_subset("regex")),
            ("regex is anchored at the end", get("/reviews/12/x"), no_match()),
            ("regex is anchored at the start", get("/x/reviews/12"), no_match()),
            ("ignoreUriCase leaves regexes alone", get("/REGEX-KEEPS-CASE"), no_match()),
            ("regex keeps case", get("/regex-keeps-case"), reviews_subset("regex-keeps-case")),
            ("a prefix sees the query (Envoy's :path)", get("/q?x=1"), reviews_subset("prefix-with-query")),
        ],
    );
}

#[test]
fn method_scheme_authority_port_and_source_conditions() {
    let routed = |m: wp::HttpMatch, subset: &str| http(vec![m], vec![to(REVIEWS, subset, 100)]);
    let config = config(vec![
        routed(wp::HttpMatch { method: Some(exact("POST")), ..Default::default() }, "post"),
        routed(wp::HttpMatch { scheme: Some(exact("https")), ..Default::default() }, "https"),
        routed(
            wp::HttpMatch { authority: Some(prefix("reviews.example")), ..Default::default() },
            "authority",
        ),
        routed(wp::HttpMatch { port: 9443, ..Default::default() }, "port-9443"),
        routed(wp::HttpMatch { source_namespace: "frontend".into(), ..Default::default() }, "from-frontend"),
        routed(
            wp::HttpMatch {
                source_labels: [("app".to_owned(), "canary".to_owned())].into(),
                ..Default::default()
            },
            "from-canary",
        ),
    ]);
    let on_port = |port| Conn { port, ..productpage() };
    let frontend =
        Conn { source: Some("spiffe://cluster.local/ns/frontend/sa/web".parse().unwrap()), ..productpage() };
    let canary = Conn {
        labels: Some([("app".to_owned(), "canary".to_owned()), ("extra".to_owned(), "x".to_owned())].into()),
        ..productpage()
    };
    let plain = productpage();
    let cases = [
        ("method", get("/").method("POST"), &plain, reviews_subset("post")),
        ("scheme", get("/").scheme("https"), &plain, reviews_subset("https")),
        ("authority", get("/").authority("reviews.example.com:80"), &plain, reviews_subset("authority")),
        ("nothing else", get("/"), &plain, no_match()),
        ("source namespace", get("/"), &frontend, reviews_subset("from-frontend")),
        ("source labels (a superset)", get("/"), &canary, reviews_subset("from-canary")),
        ("labels unknown", get("/"), &Conn { labels: None, ..canary.clone() }, no_match()),
        ("no identity", get("/"), &Conn { source: None, ..frontend.clone() }, no_match()),
    ];
    for (name, req, conn, expected) in cases {
        assert_eq!(decide(&config, &req, conn, 0), expected, "{name}");
    }
    // The port condition: the service must have the port, and the request must be sent to it.
    let mut two_ports =
        reviews(vec![routed(wp::HttpMatch { port: 9443, ..Default::default() }, "port-9443")]);
    two_ports.ports.push(9443);
    let config = Waypoint::try_from(waypoint(vec![two_ports])).unwrap();
    assert_eq!(decide(&config, &get("/"), &on_port(9443), 0), forward(REVIEWS, Some("port-9443"), 9443));
    assert_eq!(decide(&config, &get("/"), &on_port(9080), 0), no_match());
}

#[test]
fn header_conditions() {
    let routed = |m: wp::HttpMatch, subset: &str| http(vec![m], vec![to(REVIEWS, subset, 100)]);
    let config = config(vec![
        // Istio's cookie example, a regex.
        routed(header("cookie", regex("^(.*?;)?(user=jason)(;.*)?$")), "cookie"),
        routed(header("x-present", any()), "present"),
        routed(header("x-prefix", prefix("abc")), "prefix"),
        routed(header("x-joined", exact("a,b")), "joined"),
        routed(header("x-digits", regex(r"\d{3}")), "digits"),
        routed(header(":method", exact("DELETE")), "pseudo-method"),
        routed(header(":path", prefix("/pseudo")), "pseudo-path"),
    ]);
    let cases = [
        ("cookie regex", get("/").header("cookie", "user=jason"), reviews_subset("cookie")),
        (
            "cookie regex, among others",
            get("/").header("cookie", "a=1;user=jason;b=2"),
            reviews_subset("cookie"),
        ),
        ("cookie regex, no jason", get("/").header("cookie", "user=mary"), no_match()),
        ("present, any value", get("/").header("x-present", ""), reviews_subset("present")),
        ("prefix", get("/").header("x-prefix", "abcdef"), reviews_subset("prefix")),
        (
            "values of one header are joined with a comma",
            get("/").header("x-joined", "a").header("x-joined", "b"),
            reviews_subset("joined"),
        ),
        ("regex matches whole values", get("/").header("x-digits", "1234"), no_match()),
        ("regex", get("/").header("x-digits", "123"), reviews_subset("digits")),
        (
            "the joined value is what a regex sees",
            get("/").header("x-digits", "123").header("x-digits", "456"),
            no_match(),
        ),
        (":method", get("/").method("DELETE"), reviews_subset("pseudo-method")),
        (":path", get("/pseudo/x"), reviews_subset("pseudo-path")),
    ];
    for (name, req, expected) in cases {
        assert_eq!(decide(&config, &req, &productpage(), 0), expected, "{name}");
    }
}

#[test]
fn without_headers_is_envoys_inverted_match() {
    let without = |name: &str, m: wp::StringMatch, subset: &str| {
        http(
            vec![wp::HttpMatch { without_headers: [(name.to_owned(), m)].into(), ..Default::default() }],
            vec![to(REVIEWS, subset, 100)],
        )
    };
    table(
        vec![without("x-absent", any(), "absent"), without("x-version", exact("v1"), "not-v1")],
        &[
            // A presence condition inverted: the header must be absent.
            ("absent header", get("/"), reviews_subset("absent")),
            // A value condition inverted holds only when the header is present with another
            // value; a request without it matches neither (Envoy's and so Istio's behaviour).
            (
                "other value",
                get("/").header("x-absent", "1").header("x-version", "v2"),
                reviews_subset("not-v1"),
            ),
            ("excluded value", get("/").header("x-absent", "1").header("x-version", "v1"), no_match()),
            ("header missing", get("/").header("x-absent", "1"), no_match()),
        ],
    );
}

#[test]
fn query_parameter_conditions() {
    let query = |name: &str, m: wp::StringMatch, subset: &str| {
        http(
            vec![wp::HttpMatch { query_params: [(name.to_owned(), m)].into(), ..Default::default() }],
            vec![to(REVIEWS, subset, 100)],
        )
    };
    table(
        vec![
            query("debug", any(), "debug"),
            query("user", exact("jason smith"), "jason"),
            query("id", regex("[0-9]+"), "id"),
            query("a/b", exact("c"), "slash"),
        ],
        &[
            ("present without a value", get("/?debug"), reviews_subset("debug")),
            ("present with one", get("/x?a=1&debug=0"), reviews_subset("debug")),
            ("percent-decoded", get("/?user=jason%20smith"), reviews_subset("jason")),
            ("the first occurrence counts", get("/?id=x&id=7"), no_match()),
            ("regex on the value", get("/?id=42"), reviews_subset("id")),
            ("regex matches whole values", get("/?id=42a"), no_match()),
            ("names are decoded too", get("/?a%2Fb=c"), reviews_subset("slash")),
            ("no query", get("/debug"), no_match()),
            ("names are exact", get("/?Debug"), no_match()),
        ],
    );
}

#[test]
fn match_entries_or_and_their_conditions_and() {
    let both = wp::HttpMatch {
        uri: Some(prefix("/api")),
        headers: [("x-team".to_owned(), exact("a"))].into(),
        ..Default::default()
    };
    table(
        vec![
            http(vec![both, uri(exact("/health"))], vec![to(REVIEWS, "first", 100)]),
            http(vec![uri(prefix("/api"))], vec![to(REVIEWS, "second", 100)]),
        ],
        &[
            (
                "all conditions of the first entry",
                get("/api/x").header("x-team", "a"),
                reviews_subset("first"),
            ),
            ("the second entry", get("/health"), reviews_subset("first")),
            ("one condition is not enough: the next route", get("/api/x"), reviews_subset("second")),
            ("neither", get("/other").header("x-team", "a"), no_match()),
        ],
    );
}

#[test]
fn first_matching_route_wins_and_a_route_without_match_takes_the_rest() {
    table(
        vec![
            http(vec![uri(prefix("/a"))], vec![to(REVIEWS, "a", 100)]),
            http(vec![uri(prefix("/"))], vec![to(REVIEWS, "slash", 100)]),
            http(vec![uri(prefix("/a/b"))], vec![to(REVIEWS, "shadowed", 100)]),
            http(vec![], vec![to(REVIEWS, "rest", 100)]),
        ],
        &[
            ("first", get("/a/b"), reviews_subset("a")),
            ("second", get("/b"), reviews_subset("slash")),
            ("a route without match takes what the others leave", get("*"), reviews_subset("rest")),
        ],
    );
}

#[test]
fn services_ports_and_the_default_route() {
    let mut ratings = reviews(vec![]);
    ratings.hostname = RATINGS.into();
    ratings.ports = vec![9080, 9081];
    let config = Waypoint::try_from(waypoint(vec![
        reviews(vec![http(vec![uri(prefix("/only"))], vec![to(REVIEWS, "v1", 100)])]),
        ratings,
    ]))
    .unwrap();
    let to_ratings = |port| Conn { service: RATINGS, port, ..productpage() };
    let cases = [
        // A service without routes: to itself, on the port the request was sent to.
        ("default route", get("/any"), to_ratings(9081), forward(RATINGS, None, 9081)),
        ("routes, none matches", get("/other"), productpage(), no_match()),
        (
            "a service this waypoint does not serve",
            get("/"),
            Conn { service: "details.bookinfo.svc.cluster.local", ..productpage() },
            Outcome::NoRoute(NoRoute::ServiceNotServed {
                service: "details.bookinfo.svc.cluster.local".into(),
            }),
        ),
        (
            "a port the service does not have",
            get("/"),
            to_ratings(8080),
            Outcome::NoRoute(NoRoute::PortNotServed { service: RATINGS.into(), port: 8080 }),
        ),
    ];
    for (name, req, conn, expected) in cases {
        assert_eq!(decide(&config, &req, &conn, 0), expected, "{name}");
    }
    let why = NoRoute::NoMatch { service: REVIEWS.into() };
    assert_eq!((why.status(), why.flags().as_str()), (StatusCode::NOT_FOUND, "NR"));
    assert_eq!(why.to_string(), format!("no route of service {REVIEWS} matches the request"));
}

#[test]
fn destinations_other_hosts_and_ports() {
    let mut elsewhere = to(RATINGS, "", 100);
    elsewhere.destination.as_mut().unwrap().port = 9999;
    table(
        vec![
            http(vec![uri(prefix("/ratings"))], vec![elsewhere]),
            http(vec![], vec![to("details.bookinfo.svc.cluster.local", "v1", 100)]),
        ],
        &[
            ("another host and port", get("/ratings"), forward(RATINGS, None, 9999)),
            // The host need not be served by this waypoint; the caller looks it up (503 NC).
            (
                "a host known only to the mesh",
                get("/"),
                forward("details.bookinfo.svc.cluster.local", Some("v1"), 9080),
            ),
        ],
    );
}

#[test]
fn uri_rewrites() {
    let rewrite = |m: Option<wp::HttpMatch>, uri: &str| {
        let mut r = http(m.into_iter().collect(), vec![to(REVIEWS, "", 100)]);
        r.rewrite = Some(wp::Rewrite { uri: uri.into(), ..Default::default() });
        r
    };
    let mut regex_rewrite = http(vec![uri(prefix("/service/"))], vec![to(REVIEWS, "", 100)]);
    regex_rewrite.rewrite = Some(wp::Rewrite {
        uri_regex: r"^/service/([^/]+)(/.*)$".into(),
        uri_regex_replacement: r"\2/instance/\1".into(),
        ..Default::default()
    });
    table(
        vec![
            // Istio's rewrite example: /ratings... to /v1/bookRatings...
            rewrite(Some(uri(prefix("/ratings"))), "/v1/bookRatings"),
            rewrite(Some(wp::HttpMatch { ignore_uri_case: true, ..uri(prefix("/UPPER/")) }), "/lower/"),
            rewrite(Some(uri(exact("/exact"))), "/replaced"),
            rewrite(Some(uri(regex("/re/[a-z]+"))), "/from-regex"),
            regex_rewrite,
            rewrite(Some(header("x-no-uri", any())), "/api"),
            rewrite(None, "/root"),
        ],
        &[
            ("prefix", get("/ratings/2?x=1"), rewritten("/v1/bookRatings/2?x=1")),
            ("prefix, exactly", get("/ratings"), rewritten("/v1/bookRatings")),
            ("ignoreUriCase prefix", get("/upper/x"), rewritten("/lower/x")),
            ("exact: the whole path, query kept", get("/exact?q"), rewritten("/replaced?q")),
            ("regex: the whole path, query kept", get("/re/abc?q=1"), rewritten("/from-regex?q=1")),
            (
                "uriRegexRewrite (Istio's example)",
                get("/service/foo/bar?q=1"),
                rewritten("/bar/instance/foo?q=1"),
            ),
            (
                "uriRegexRewrite without a match changes nothing",
                get("/service/foo"),
                rewritten("/service/foo"),
            ),
            ("no uri condition: the leading slash", get("/x").header("x-no-uri", "1"), rewritten("/apix")),
            ("no match entries: the leading slash", get("/y?z"), rewritten("/rooty?z")),
            ("an empty path", get(""), rewritten("/root")),
        ],
    );
}

#[test]
fn authority_rewrites_and_header_changes() {
    let ops = |set: &[(&str, &str)]| wp::HeaderOperations {
        set: set.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    };
    let headers = |set: &[(&str, &str)], response: &[(&str, &str)]| {
        Some(wp::Headers { request: Some(ops(set)), response: Some(ops(response)) })
    };
    let mut with_host = to(REVIEWS, "v1", 50);
    with_host.headers = headers(
        &[("host", "from-destination"), ("x-who", "destination"), ("x-dest", "1")],
        &[("x-r", "dest")],
    );
    let plain = to(REVIEWS, "v2", 50);
    let mut split = http(vec![uri(prefix("/a"))], vec![with_host, plain]);
    split.rewrite = Some(wp::Rewrite { authority: "from-rewrite".into(), ..Default::default() });
    split.headers = headers(&[("host", "from-route-header"), ("x-who", "route")], &[("x-r", "route")]);
    let mut header_only = http(vec![], vec![to(REVIEWS, "v3", 100)]);
    header_only.headers = headers(&[("host", "from-route-header")], &[]);
    let config = config(vec![split, header_only]);
    let with_authority = |subset: &str, authority: &str| {
        Outcome::Forward(REVIEWS.into(), Some(subset.into()), 9080, None, Some(authority.into()))
    };
    // The destination's host header beats the rewrite, which beats the route's host header.
    assert_eq!(decide(&config, &get("/a"), &productpage(), 0), with_authority("v1", "from-destination"));
    assert_eq!(decide(&config, &get("/a"), &productpage(), 50), with_authority("v2", "from-rewrite"));
    assert_eq!(decide(&config, &get("/b"), &productpage(), 0), with_authority("v3", "from-route-header"));

    // The destination's changes apply first, so the route's win.
    let mut request = HeaderMap::new();
    let mut response = HeaderMap::new();
    let head = RequestHead {
        method: "GET",
        scheme: "http",
        authority: "reviews",
        path: "/a",
        headers: &request.clone(),
    };
    let conn = productpage();
    let connection =
        Connection { source: conn.source.as_ref(), source_labels: None, service: REVIEWS, port: 9080 };
    let Decision::Forward(f) = route(&config, &head, &connection, 0) else { panic!() };
    f.headers.apply_request(&mut request);
    f.headers.apply_response(&mut response);
    assert_eq!(request.get("x-who").unwrap(), "route");
    assert_eq!(request.get("x-dest").unwrap(), "1");
    assert!(request.get("host").is_none(), "the authority is rewritten, not a header");
    assert_eq!(response.get("x-r").unwrap(), "route");
}

#[test]
fn redirects() {
    let redirect = |m: wp::HttpMatch, r: wp::Redirect| {
        let mut route = http(vec![m], vec![]);
        route.redirect = Some(r);
        route
    };
    table(
        vec![
            // Istio's redirect example.
            redirect(
                uri(exact("/v1/getProductRatings")),
                wp::Redirect {
                    uri: "/v1/bookRatings".into(),
                    authority: "newratings.default.svc.cluster.local".into(),
                    ..Default::default()
                },
            ),
            redirect(
                uri(prefix("/https")),
                wp::Redirect { scheme: "https".into(), redirect_code: 308, ..Default::default() },
            ),
            redirect(
                uri(prefix("/port")),
                wp::Redirect { port: 8443, redirect_code: 302, ..Default::default() },
            ),
            redirect(
                uri(prefix("/own-query")),
                wp::Redirect { uri: "/new?a=1".into(), ..Default::default() },
            ),
            redirect(
                uri(prefix("/both")),
                wp::Redirect { authority: "b.example".into(), port: 81, ..Default::default() },
            ),
        ],
        &[
            (
                "Istio's example",
                get("/v1/getProductRatings?id=1"),
                Outcome::Redirect(
                    301,
                    "http://newratings.default.svc.cluster.local/v1/bookRatings?id=1".into(),
                ),
            ),
            (
                "to https, the http default port dropped",
                get("/https/x").authority("reviews:80"),
                Outcome::Redirect(308, "https://reviews/https/x".into()),
            ),
            (
                "to https, another port kept",
                get("/https").authority("reviews:9080"),
                Outcome::Redirect(308, "https://reviews:9080/https".into()),
            ),
            (
                "a new port replaces the request's",
                get("/port?q").authority("[::1]:9080"),
                Outcome::Redirect(302, "http://[::1]:8443/port?q".into()),
            ),
            (
                "an IPv6 host without a port",
                get("/https").authority("[::1]"),
                Outcome::Redirect(308, "https://[::1]/https".into()),
            ),
            (
                "the redirect's own query",
                get("/own-query?b=2"),
                Outcome::Redirect(301, "http://reviews.bookinfo.svc.cluster.local:9080/new?a=1".into()),
            ),
            ("authority and port", get("/both"), Outcome::Redirect(301, "http://b.example:81/both".into())),
            (
                "the same scheme keeps even its default port",
                get("/own-query").authority("reviews:80"),
                Outcome::Redirect(301, "http://reviews:80/new?a=1".into()),
            ),
        ],
    );
}

#[test]
fn direct_responses() {
    let mut direct = http(vec![uri(prefix("/v1/getProductRatings"))], vec![]);
    direct.direct_response = Some(wp::DirectResponse { status: 503, body: b"unknown error".to_vec() });
    let mut empty = http(vec![], vec![]);
    empty.direct_response = Some(wp::DirectResponse { status: 204, body: vec![] });
    table(
        vec![direct, empty],
        &[
            (
                "Istio's example",
                get("/v1/getProductRatings"),
                Outcome::Direct(503, b"unknown error".to_vec()),
            ),
            ("no body", get("/"), Outcome::Direct(204, vec![])),
        ],
    );
}

#[test]
fn hostile_requests_do_not_panic() {
    let mut rewrite = http(vec![uri(prefix("/"))], vec![to(REVIEWS, "", 100)]);
    rewrite.rewrite = Some(wp::Rewrite {
        uri_regex: "(a+)+$".into(),
        uri_regex_replacement: r"\1\1".into(),
        ..Default::default()
    });
    let mut redirect = http(vec![uri(prefix("*"))], vec![]);
    redirect.redirect = Some(wp::Redirect::default());
    let config = config(vec![
        http(vec![header("x-big", regex("(a|aa)*b"))], vec![to(REVIEWS, "regex", 100)]),
        http(vec![header("x-bin", exact("\u{fffd}"))], vec![to(REVIEWS, "never", 100)]),
        http(vec![header("x-bin", regex(".+"))], vec![to(REVIEWS, "bin-regex", 100)]),
        http(vec![header("x-bin", any())], vec![to(REVIEWS, "bin-present", 100)]),
        http(vec![uri(prefix("/a/b"))], vec![to(REVIEWS, "slash", 100)]),
        http(
            vec![wp::HttpMatch {
                query_params: [("q".to_owned(), regex(".*x"))].into(),
                ..Default::default()
            }],
            vec![to(REVIEWS, "query", 100)],
        ),
        http(vec![uri(exact(""))], vec![to(REVIEWS, "empty", 100)]),
        redirect,
        rewrite,
    ]);
    let mut huge = vec![b'a'; 1 << 20];
    let many_values = (0..10_000).fold(get("/"), |r, _| r.header("x-big", "a"));
    let long_path = format!("/{}", "a".repeat(1 << 20));
    // What reaches the last route (prefix `/`): its regex rewrite changes only paths ending in
    // `a`, so the path it forwards is the request's.
    let catch_all = |path: &str| rewritten(path);
    let cases = [
        // A megabyte of `a` against a regex that backtracking engines take exponential time on.
        ("huge header value, no match", get("/").header("x-big", huge.clone()), catch_all("/")),
        (
            "huge header value, a match",
            get("/").header("x-big", {
                huge.push(b'b');
                huge
            }),
            reviews_subset("regex"),
        ),
        ("many values of one header", many_values, catch_all("/")),
        // Bytes that are not UTF-8 match neither a string nor `.`, but are present.
        ("non-UTF-8 value", get("/").header("x-bin", vec![0xff, 0xfe]), reviews_subset("bin-present")),
        ("UTF-8 value", get("/").header("x-bin", "é".as_bytes()), reviews_subset("bin-regex")),
        // `%2F` is not a slash to routing (path normalization, before routing, is the caller's).
        ("an encoded slash", get("/a%2Fb"), catch_all("/a%2Fb")),
        ("a real slash", get("/a/b"), reviews_subset("slash")),
        ("broken percent-encoding in a query", get("/q?q=%zz%&q%=x%2"), catch_all("/q?q=%zz%&q%=x%2")),
        ("percent-decoding to non-UTF-8", get("/?q=%ff%fex"), catch_all("/?q=%ff%fex")),
        ("a query regex", get("/?q=abx"), reviews_subset("query")),
        ("an empty path", get(""), reviews_subset("empty")),
        ("an asterisk and no authority", get("*").authority(""), Outcome::Redirect(301, "http://*".into())),
        (
            "a megabyte path through a rewrite regex",
            get(&long_path),
            rewritten(&format!("/{}", "a".repeat(2 << 20))),
        ),
        ("non-ASCII in the path", get("/é?ü=1"), catch_all("/é?ü=1")),
    ];
    for (name, req, expected) in cases {
        assert_eq!(decide(&config, &req, &productpage(), u32::MAX), expected, "{name}");
    }
}
