//! The request-head handling of the waypoint driven by arbitrary bytes, for the fuzz target
//! (`fuzz/fuzz_targets/waypoint_head.rs`) and its stable counterpart in the tests: protocol
//! detection over the bytes, then, when they start like an HTTP/1 request, its request line
//! and headers (as a lenient parser would read them) through path normalization and the
//! routing decision over a configuration that uses every kind of match and rewrite. Nothing
//! here may panic, whatever the bytes.

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};
use weft_core::identity::Identity;
use weft_core::proto::weft::waypoint::v1::{self as wp, string_match::MatchType};

use crate::model::Waypoint;
use crate::normalize::normalize_path;
use crate::route::{route, Connection, Decision, RequestHead};
use crate::sniff::sniff;

const HOST: &str = "reviews.bookinfo.svc.cluster.local";

/// Runs `data` through sniffing, normalization and routing (see the module docs).
pub fn request_head(data: &[u8]) {
    let _ = sniff(data);
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let Some(request_line) = lines.next() else { return };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else { return };
    let mut headers = HeaderMap::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else { continue };
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name.trim().as_bytes()), HeaderValue::from_str(value.trim()))
        {
            headers.append(name, value);
        }
    }
    let Ok(path) = normalize_path(target) else { return };
    let authority = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or(HOST).to_owned();
    let head = RequestHead { method, scheme: "http", authority: &authority, path: &path, headers: &headers };
    let source = Identity::new("cluster.local", "bookinfo", "productpage").ok();
    let conn = Connection { source: source.as_ref(), source_labels: None, service: HOST, port: 9080 };
    let pick = data.iter().fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(*b)));
    if let Decision::Forward(forward) = route(config(), &head, &conn, pick) {
        let mut out = headers.clone();
        forward.headers.apply_request(&mut out);
        forward.headers.apply_response(&mut out);
    }
}

/// A waypoint whose one service has routes with every kind of match and action.
fn config() -> &'static Waypoint {
    static CONFIG: OnceLock<Waypoint> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let m = |t: MatchType| Some(wp::StringMatch { match_type: Some(t) });
        let to = |subset: &str, weight: u32| wp::WeightedDestination {
            destination: Some(wp::Destination { host: HOST.into(), subset: subset.into(), port: 0 }),
            weight,
            headers: None,
        };
        let route = |matches: Vec<wp::HttpMatch>| wp::HttpRoute {
            virtual_service: "bookinfo/reviews".into(),
            matches,
            destinations: vec![to("v1", 90), to("v2", 10)],
            ..Default::default()
        };
        let routes = vec![
            route(vec![wp::HttpMatch {
                headers: [(
                    "x-canary".to_owned(),
                    wp::StringMatch { match_type: Some(MatchType::Regex("al+ways|y.*".into())) },
                )]
                .into(),
                ..Default::default()
            }]),
            route(vec![wp::HttpMatch {
                uri: m(MatchType::Prefix("/api/".into())),
                ignore_uri_case: true,
                ..Default::default()
            }]),
            route(vec![wp::HttpMatch {
                uri: m(MatchType::Regex("/v[0-9]+/.*".into())),
                method: m(MatchType::Exact("GET".into())),
                query_params: [(
                    "user".to_owned(),
                    wp::StringMatch { match_type: Some(MatchType::Prefix("a".into())) },
                )]
                .into(),
                ..Default::default()
            }]),
            wp::HttpRoute {
                virtual_service: "bookinfo/reviews".into(),
                matches: vec![wp::HttpMatch {
                    uri: m(MatchType::Exact("/moved".into())),
                    ..Default::default()
                }],
                redirect: Some(wp::Redirect {
                    uri: "/new".into(),
                    authority: "other:8080".into(),
                    port: 9090,
                    scheme: "https".into(),
                    redirect_code: 308,
                }),
                ..Default::default()
            },
            wp::HttpRoute {
                virtual_service: "bookinfo/reviews".into(),
                matches: vec![wp::HttpMatch {
                    uri: m(MatchType::Prefix("/old".into())),
                    ..Default::default()
                }],
                rewrite: Some(wp::Rewrite {
                    uri: "/new".into(),
                    authority: "rewritten".into(),
                    ..Default::default()
                }),
                destinations: vec![to("", 100)],
                ..Default::default()
            },
        ];
        let proto = wp::Waypoint {
            name: "waypoint".into(),
            namespace: "bookinfo".into(),
            identity: "spiffe://cluster.local/ns/bookinfo/sa/waypoint".into(),
            services: vec![wp::Service {
                hostname: HOST.into(),
                name: "reviews".into(),
                namespace: "bookinfo".into(),
                ports: vec![9080],
                http_routes: routes,
                ..Default::default()
            }],
            ..Default::default()
        };
        #[allow(clippy::expect_used)]
        Waypoint::try_from(proto).expect("the fuzzing configuration is valid")
    })
}

#[cfg(test)]
mod tests {
    /// The stable counterpart of the fuzz target: seeds and simple mutations of them.
    #[test]
    fn request_heads_and_their_mutations_never_panic() {
        let seeds: [&[u8]; 6] = [
            b"GET /api/v1/reviews?user=alice HTTP/1.1\r\nHost: reviews\r\nx-canary: always\r\n\r\n",
            b"POST /old/path/../x HTTP/1.1\r\nhost: reviews:9080\r\n\r\n",
            b"GET /moved?q=1 HTTP/1.0\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /v12/x?user=a%zz&user=b HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x00\xff",
        ];
        for seed in seeds {
            super::request_head(seed);
            for i in 0..seed.len() {
                let mut mutated = seed.to_vec();
                for byte in [0u8, b'/', b'.', b'%', b' ', b'\n', b'?', 0xff] {
                    mutated[i] = byte;
                    super::request_head(&mutated);
                }
                super::request_head(&seed[..i]);
            }
        }
    }
}
