//! Retries: whether a failed attempt is retried under a route's [`RetryPolicy`]
//! ([`retriable`]), how long to wait before the next attempt ([`backoff`]), the cluster's cap
//! on retries in flight ([`Budget`]), and which endpoints a retry prefers ([`prefer_untried`]).
//! Pure decisions (the budget is an atomic counter); the caller does the attempts, the timers
//! and the counting of attempts against `attempts`. No I/O.
//!
//! Envoy's semantics (its router filter docs on `x-envoy-retry-on` and `x-envoy-retry-grpc-on`,
//! and `RetryStateImpl::wouldRetryFromHeaders` / `wouldRetryFromReset` in
//! source/common/router/retry_state_impl.cc):
//! - A response carrying `x-envoy-ratelimited` is retried under `envoy-ratelimited` and under
//!   no other condition (Envoy checks the header, not the status).
//! - Responses: `5xx` any 5xx status; `gateway-error` 502, 503, 504; `retriable-4xx` 409;
//!   `retriable-status-codes` the policy's codes; gRPC `cancelled` (1), `deadline-exceeded`
//!   (4), `resource-exhausted` (8), `internal` (13), `unavailable` (14) on the `grpc-status`
//!   of the response headers (a trailers-only response: Envoy does not look at trailers).
//! - Failures without a response are Envoy's stream resets: `5xx`, `gateway-error` and `reset`
//!   retry every one of them (a reset is what Envoy answers 503 or, for a per-try timeout, 504
//!   for, so `gateway-error` covers connect failures and refused streams too, beyond "502, 503,
//!   504" read literally); `reset-before-request` those before any byte of the request was
//!   sent (a connect failure); `connect-failure` a connect failure; `refused-stream` a
//!   REFUSED_STREAM. A per-try timeout is a reset after the request was sent.
//! - A 425 under `retriable-status-codes` is not retried when the request arrived as early data
//!   (it carries `early-data`), as Envoy does.
//!
//! Deviations, each deliberate:
//! - Headers from the client never widen retries: `x-envoy-retry-on`, `x-envoy-retry-grpc-on`,
//!   `x-envoy-max-retries` and `x-envoy-retriable-status-codes` are ignored (Envoy honours the
//!   last one only from internal clients anyway).
//! - `retriable-headers` never holds: the model carries no retriable header matchers (Istio
//!   sets none), and `x-envoy-retriable-header-names` comes from the client.
//! - `http3-post-connect-failure` never holds: upstreams are not reached over HTTP/3.
//! - No `rate_limited_retry_back_off` (`Retry-After`): Istio does not configure it.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderMap;
use http::StatusCode;

use crate::model::{RetryOn, RetryPolicy};

/// Envoy's default base interval of the retry backoff (`upstream.base_retry_backoff_ms`).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Envoy's default `max_interval`: this many times the base.
const MAX_INTERVAL_FACTOR: u64 = 10;
/// Istio's `host_selection_retry_max_attempts` for the `previous_hosts` predicate.
pub const HOST_SELECTION_ATTEMPTS: u32 = 5;

const ENVOY_RATELIMITED: &str = "x-envoy-ratelimited";
const GRPC_STATUS: &str = "grpc-status";
const EARLY_DATA: &str = "early-data";

/// Why an attempt ended without a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No byte of the request reached the upstream: TCP, TLS, HBONE or the HTTP handshake failed.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM: the upstream did not process the request.
    RefusedStream,
    /// The upstream reset or closed after the request was sent, before response headers.
    Reset,
    /// No response headers within the policy's `per_try_timeout`.
    PerTryTimeout,
}

/// What a retry decision reads of an upstream response: its head.
#[derive(Clone, Copy, Debug)]
pub struct ResponseView<'a> {
    pub status: u16,
    pub headers: &'a HeaderMap,
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug)]
pub enum Outcome<'a> {
    Response(ResponseView<'a>),
    Failure(Failure),
}

/// Envoy's `max_retries` circuit breaker of one cluster: the retries in flight at once.
#[derive(Debug)]
pub struct Budget {
    active: AtomicU64,
    limit: u64,
}

/// One retry counted against a [`Budget`], until dropped (when the retried attempt ends).
#[derive(Debug)]
#[must_use = "the retry is counted only while the guard lives"]
pub struct RetryGuard {
    budget: Arc<Budget>,
}

/// Whether `outcome` is retried under `policy` (see the module docs). `request_headers` are the
/// downstream request's, read only for `early-data`. The caller checks the attempts left.
pub fn retriable(policy: &RetryPolicy, outcome: &Outcome<'_>, request_headers: &HeaderMap) -> bool {
    let on = |condition| policy.retry_on.contains(&condition);
    match outcome {
        Outcome::Response(response) => {
            if response.headers.contains_key(ENVOY_RATELIMITED) {
                return on(RetryOn::EnvoyRateLimited);
            }
            let status = response.status;
            (on(RetryOn::FiveXx) && (500..=599).contains(&status))
                || (on(RetryOn::GatewayError) && (502..=504).contains(&status))
                || (on(RetryOn::Retriable4xx) && status == 409)
                || (on(RetryOn::RetriableStatusCodes)
                    && policy.retriable_status_codes.iter().any(|code| code.as_u16() == status)
                    && (status != StatusCode::TOO_EARLY.as_u16()
                        || !request_headers.contains_key(EARLY_DATA)))
                || grpc_status(response.headers).is_some_and(|code| match code {
                    1 => on(RetryOn::Cancelled),
                    4 => on(RetryOn::DeadlineExceeded),
                    8 => on(RetryOn::ResourceExhausted),
                    13 => on(RetryOn::Internal),
                    14 => on(RetryOn::Unavailable),
                    _ => false,
                })
        }
        Outcome::Failure(failure) => {
            on(RetryOn::FiveXx)
                || on(RetryOn::GatewayError)
                || on(RetryOn::Reset)
                || match failure {
                    Failure::ConnectFailure => on(RetryOn::ConnectFailure) || on(RetryOn::ResetBeforeRequest),
                    Failure::RefusedStream => on(RetryOn::RefusedStream),
                    Failure::Reset | Failure::PerTryTimeout => false,
                }
        }
    }
}

/// The wait before retry number `retry_number` (1 for the first retry; 0 is read as 1): Envoy's
/// fully jittered exponential backoff, `random` modulo the interval, in whole milliseconds. The
/// interval is `min(2^(n−1) × base, 10 × base)`, the base being the policy's `backoff` (Istio
/// maps it to `base_interval`) or 25 ms, so with the default the first retry waits 0–24 ms, the
/// second 0–49 ms, the third 0–99 ms, then 0–199 ms and at most 249 ms. That is Envoy's
/// `JitteredExponentialBackOffStrategy` (source/common/common/backoff_strategy.cc); the router
/// docs' `[0, (2^N − 1) × B)` ("0-24ms, 0-74ms, 0-174ms") describes the strategy it replaced.
pub fn backoff(policy_base: Option<Duration>, retry_number: u32, random: u64) -> Duration {
    let base = policy_base.unwrap_or(DEFAULT_BACKOFF_BASE);
    // Envoy counts in milliseconds, and a base must be at least one.
    let base = u64::try_from(base.as_millis()).unwrap_or(u64::MAX).max(1);
    let max = base.saturating_mul(MAX_INTERVAL_FACTOR);
    let doublings = retry_number.saturating_sub(1);
    let interval = 1u64.checked_shl(doublings).map_or(max, |factor| base.saturating_mul(factor).min(max));
    Duration::from_millis(random % interval)
}

/// The indexes of the `candidates` whose uid is not among those `tried`; all of them when every
/// one was tried. Istio sets Envoy's `previous_hosts` retry predicate with 5 host-selection
/// attempts ([`HOST_SELECTION_ATTEMPTS`]): the balancer re-picks a host already tried up to 5
/// times, then takes it. Picking among the untried ones instead gives what those re-picks aim
/// at, without the chance of landing on a tried host when an untried one is left; for a
/// consistent hash it is Envoy's walk to the next host on the ring.
pub fn prefer_untried<T>(candidates: &[T], tried: &[&str], uid: impl Fn(&T) -> &str) -> Vec<usize> {
    let untried: Vec<usize> =
        (0..candidates.len()).filter(|&i| !tried.contains(&uid(&candidates[i]))).collect();
    if untried.is_empty() {
        (0..candidates.len()).collect()
    } else {
        untried
    }
}

impl Budget {
    /// A budget of `max_retries` retries in flight; `None` is Istio's default, 2^32 − 1, which
    /// is unlimited in practice.
    pub fn new(max_retries: Option<NonZeroU32>) -> Budget {
        Budget { active: AtomicU64::new(0), limit: u64::from(max_retries.map_or(u32::MAX, NonZeroU32::get)) }
    }

    /// Counts one more retry, unless the limit is reached (Envoy then answers with the failed
    /// attempt's response and counts `upstream_rq_retry_overflow`).
    pub fn try_start(self: &Arc<Budget>) -> Option<RetryGuard> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.limit).then_some(n + 1))
            .ok()
            .map(|_| RetryGuard { budget: Arc::clone(self) })
    }

    /// The retries in flight.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Acquire)
    }
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.budget.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The `grpc-status` of a response head, when it has a valid one.
fn grpc_status(headers: &HeaderMap) -> Option<u64> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests;
