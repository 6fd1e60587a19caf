//! Table tests of retries: every retry condition with outcomes it covers and outcomes it does
//! not, Istio's default policy, client headers that must not widen a policy, the backoff's
//! bounds and growth, the retry budget and the preference for untried endpoints.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use super::*;
use crate::model::{Retries, RetryOn, RetryPolicy};

use Failure::{ConnectFailure, PerTryTimeout, RefusedStream, Reset};

/// One attempt's end, as the tables write it.
#[derive(Clone, Copy, Debug)]
enum End {
    /// A status and response headers.
    Status(u16, &'static [(&'static str, &'static str)]),
    Fail(Failure),
}

use End::{Fail, Status};

fn policy(on: &[RetryOn], codes: &[u16]) -> RetryPolicy {
    RetryPolicy {
        attempts: NonZeroU32::new(2).unwrap(),
        per_try_timeout: None,
        retry_on: on.to_vec(),
        retriable_status_codes: codes.iter().map(|c| StatusCode::from_u16(*c).unwrap()).collect(),
        backoff: None,
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(n, v)| (HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap()))
        .collect()
}

fn decide(policy: &RetryPolicy, end: End, request: &[(&str, &str)]) -> bool {
    let request = headers(request);
    match end {
        Status(status, response) => {
            let response = headers(response);
            retriable(policy, &Outcome::Response(ResponseView { status, headers: &response }), &request)
        }
        Fail(failure) => retriable(policy, &Outcome::Failure(failure), &request),
    }
}

const NONE: &[(&str, &str)] = &[];

/// A condition, the policy's retriable status codes, ends retried, ends not retried.
type ConditionCase = (RetryOn, &'static [u16], Vec<End>, Vec<End>);
const ALL_FAILURES: [Failure; 4] = [ConnectFailure, RefusedStream, Reset, PerTryTimeout];

#[test]
fn each_condition_retries_what_envoy_retries() {
    use RetryOn::{
        Cancelled, DeadlineExceeded, EnvoyRateLimited, FiveXx, GatewayError, Http3PostConnectFailure,
        Internal, ResetBeforeRequest, ResourceExhausted, Retriable4xx, RetriableHeaders,
        RetriableStatusCodes, Unavailable,
    };
    // (condition, retriable status codes, retried, not retried)
    let grpc = |code: &'static str| -> &'static [(&'static str, &'static str)] {
        match code {
            "1" => &[("grpc-status", "1")],
            "4" => &[("grpc-status", "4")],
            "8" => &[("grpc-status", "8")],
            "13" => &[("grpc-status", "13")],
            "14" => &[("grpc-status", "14")],
            _ => &[("grpc-status", "0")],
        }
    };
    let ratelimited: &'static [(&str, &str)] = &[("x-envoy-ratelimited", "true")];
    let cases: Vec<ConditionCase> = vec![
        (
            FiveXx,
            &[],
            vec![
                Status(500, NONE),
                Status(503, NONE),
                Status(599, NONE),
                Fail(ConnectFailure),
                Fail(RefusedStream),
                Fail(Reset),
                Fail(PerTryTimeout),
            ],
            vec![Status(200, NONE), Status(404, NONE), Status(409, NONE), Status(499, NONE)],
        ),
        (
            GatewayError,
            &[],
            vec![
                Status(502, NONE),
                Status(503, NONE),
                Status(504, NONE),
                // Resets are answered 503 (504 for a per-try timeout): all retried.
                Fail(PerTryTimeout),
                Fail(Reset),
                Fail(ConnectFailure),
                Fail(RefusedStream),
            ],
            vec![Status(500, NONE), Status(501, NONE), Status(505, NONE), Status(404, NONE)],
        ),
        (
            RetryOn::Reset,
            &[],
            vec![Fail(Failure::Reset), Fail(PerTryTimeout), Fail(ConnectFailure), Fail(RefusedStream)],
            vec![Status(503, NONE), Status(500, NONE)],
        ),
        (
            ResetBeforeRequest,
            &[],
            vec![Fail(ConnectFailure)],
            vec![Fail(Failure::Reset), Fail(RefusedStream), Fail(PerTryTimeout), Status(503, NONE)],
        ),
        (
            RetryOn::ConnectFailure,
            &[],
            vec![Fail(Failure::ConnectFailure)],
            vec![Fail(Failure::Reset), Fail(PerTryTimeout), Fail(RefusedStream), Status(503, NONE)],
        ),
        (
            RetryOn::RefusedStream,
            &[],
            vec![Fail(Failure::RefusedStream)],
            vec![Fail(Failure::Reset), Fail(Failure::ConnectFailure), Fail(PerTryTimeout), Status(503, NONE)],
        ),
        (
            Retriable4xx,
            &[],
            vec![Status(409, NONE)],
            vec![Status(404, NONE), Status(429, NONE), Status(500, NONE)],
        ),
        (
            RetriableStatusCodes,
            &[503, 404],
            vec![Status(503, NONE), Status(404, NONE)],
            vec![Status(502, NONE), Status(500, NONE), Fail(Failure::ConnectFailure), Fail(Failure::Reset)],
        ),
        (RetriableStatusCodes, &[], vec![], vec![Status(503, NONE)]),
        (RetriableHeaders, &[], vec![], vec![Status(503, &[("x-retry", "1")]), Fail(Failure::Reset)]),
        (
            EnvoyRateLimited,
            &[],
            vec![Status(429, ratelimited), Status(200, ratelimited)],
            vec![Status(429, NONE), Status(503, NONE)],
        ),
        // A rate-limited response is retried only under envoy-ratelimited.
        (FiveXx, &[], vec![], vec![Status(503, ratelimited)]),
        (RetriableStatusCodes, &[429], vec![Status(429, NONE)], vec![Status(429, ratelimited)]),
        (Http3PostConnectFailure, &[], vec![], ALL_FAILURES.map(Fail).to_vec()),
        (Cancelled, &[], vec![Status(200, grpc("1"))], vec![Status(200, grpc("14")), Status(200, NONE)]),
        (DeadlineExceeded, &[], vec![Status(200, grpc("4"))], vec![Status(200, grpc("1"))]),
        (ResourceExhausted, &[], vec![Status(200, grpc("8"))], vec![Status(200, grpc("13"))]),
        (Internal, &[], vec![Status(200, grpc("13"))], vec![Status(200, grpc("8"))]),
        (
            Unavailable,
            &[],
            vec![Status(200, grpc("14")), Status(503, grpc("14"))],
            vec![
                Status(200, grpc("0")),
                Status(200, NONE),
                Status(200, &[("grpc-status", "fourteen")]),
                Status(503, NONE),
                Fail(Failure::ConnectFailure),
            ],
        ),
    ];
    for (condition, codes, retried, not_retried) in cases {
        let policy = policy(&[condition], codes);
        for end in retried {
            assert!(decide(&policy, end, NONE), "{condition:?} {codes:?}: {end:?} should be retried");
        }
        for end in not_retried {
            assert!(!decide(&policy, end, NONE), "{condition:?} {codes:?}: {end:?} should not be retried");
        }
    }
    // Nothing configured, nothing retried.
    for end in ALL_FAILURES.map(Fail).into_iter().chain([Status(503, NONE), Status(200, grpc("14"))]) {
        assert!(!decide(&policy(&[], &[503]), end, NONE), "{end:?}");
    }
}

#[test]
fn client_headers_do_not_widen_the_policy() {
    let connect_only = policy(&[RetryOn::ConnectFailure], &[]);
    let cases: [(&[(&str, &str)], End); 4] = [
        (&[("x-envoy-retry-on", "5xx")], Status(503, NONE)),
        (&[("x-envoy-retry-on", "reset")], Fail(Reset)),
        (&[("x-envoy-retry-grpc-on", "unavailable")], Status(200, &[("grpc-status", "14")])),
        (&[("x-envoy-retriable-status-codes", "503")], Status(503, NONE)),
    ];
    for (request, end) in cases {
        assert!(!decide(&connect_only, end, request), "{request:?}");
    }
    let codes = policy(&[RetryOn::RetriableStatusCodes], &[503]);
    assert!(!decide(&codes, Status(502, NONE), &[("x-envoy-retriable-status-codes", "502")]));
}

#[test]
fn too_early_is_not_retried_for_a_request_that_came_as_early_data() {
    let policy = policy(&[RetryOn::RetriableStatusCodes], &[425]);
    assert!(decide(&policy, Status(425, NONE), NONE));
    assert!(!decide(&policy, Status(425, NONE), &[("early-data", "1")]));
}

#[test]
fn istio_default_policy() {
    let policy = Retries::Default.policy().unwrap();
    let cases: Vec<(End, bool)> = vec![
        (Status(503, NONE), true),
        (Fail(ConnectFailure), true),
        (Fail(RefusedStream), true),
        (Status(200, &[("grpc-status", "14")]), true),
        (Status(200, &[("grpc-status", "1")]), true),
        (Status(500, NONE), false),
        (Status(502, NONE), false),
        (Status(504, NONE), false),
        (Status(409, NONE), false),
        (Fail(Reset), false),
        (Fail(PerTryTimeout), false),
        (Status(200, &[("grpc-status", "4")]), false),
        (Status(200, &[("grpc-status", "13")]), false),
    ];
    for (end, expected) in cases {
        assert_eq!(decide(&policy, end, NONE), expected, "{end:?}");
    }
    assert_eq!(Retries::Disabled.policy(), None);
}

#[test]
fn backoff_is_jittered_below_an_interval_that_doubles_up_to_ten_times_the_base() {
    let ms = Duration::from_millis;
    // (policy base, retry number, the interval: every wait is below it)
    let cases = [
        (None, 1, 25),
        (None, 0, 25),
        (None, 2, 50),
        (None, 3, 100),
        (None, 4, 200),
        (None, 5, 250),
        (None, 6, 250),
        (None, 64, 250),
        (None, 65, 250),
        (None, u32::MAX, 250),
        (Some(ms(100)), 1, 100),
        (Some(ms(100)), 4, 800),
        (Some(ms(100)), 5, 1000),
        (Some(Duration::from_secs(1)), 2, 2000),
        // Envoy counts whole milliseconds, at least one.
        (Some(Duration::ZERO), 3, 4),
        (Some(Duration::from_micros(500)), 1, 1),
    ];
    for (base, n, interval) in cases {
        let at = |random| backoff(base, n, random);
        assert_eq!(at(0), Duration::ZERO, "{base:?} #{n}: 0 is allowed");
        assert_eq!(at(interval - 1), ms(interval - 1), "{base:?} #{n}: the longest wait");
        assert_eq!(at(interval), Duration::ZERO, "{base:?} #{n}: the random number wraps");
        for random in [1, 7, 1 << 20, u64::MAX / 3, u64::MAX] {
            assert!(at(random) < ms(interval), "{base:?} #{n}: {random}");
        }
    }
}

#[test]
fn the_budget_caps_retries_in_flight() {
    let budget = Arc::new(Budget::new(NonZeroU32::new(2)));
    let first = budget.try_start().expect("first");
    let second = budget.try_start().expect("second");
    assert!(budget.try_start().is_none(), "a third is over the limit");
    assert_eq!(budget.active(), 2);
    drop(first);
    assert_eq!(budget.active(), 1);
    let third = budget.try_start().expect("room again");
    drop((second, third));
    assert_eq!(budget.active(), 0);

    // Istio's default: 2^32 − 1.
    let unlimited = Arc::new(Budget::new(None));
    let guards: Vec<_> = (0..10_000).map_while(|_| unlimited.try_start()).collect();
    assert_eq!(guards.len(), 10_000);
    drop(guards);
    assert_eq!(unlimited.active(), 0);
}

#[test]
fn the_budget_holds_across_threads() {
    let budget = Arc::new(Budget::new(NonZeroU32::new(3)));
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (budget, peak) = (Arc::clone(&budget), Arc::clone(&peak));
            std::thread::spawn(move || {
                for _ in 0..10_000 {
                    if let Some(guard) = budget.try_start() {
                        peak.fetch_max(budget.active(), std::sync::atomic::Ordering::Relaxed);
                        drop(guard);
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert!(peak.load(std::sync::atomic::Ordering::Relaxed) <= 3);
    assert_eq!(budget.active(), 0);
}

#[test]
fn retries_prefer_endpoints_not_tried() {
    let candidates = ["a", "b", "c"];
    let cases: [(&[&str], &[usize]); 5] = [
        (&[], &[0, 1, 2]),
        (&["b"], &[0, 2]),
        (&["a", "c"], &[1]),
        (&["x"], &[0, 1, 2]),
        // Every one tried: any of them.
        (&["c", "a", "b"], &[0, 1, 2]),
    ];
    for (tried, expected) in cases {
        assert_eq!(prefer_untried(&candidates, tried, |c| *c), expected, "tried {tried:?}");
    }
    assert!(prefer_untried::<&str>(&[], &["a"], |c| *c).is_empty());
}
