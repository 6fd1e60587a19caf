//! Fault injection (a route's `fault`): whether a request is delayed, aborted, or both, decided
//! before it is sent upstream, as Envoy's fault filter does for Istio. Pure: the caller draws
//! the random numbers, sleeps and answers.
//!
//! Envoy's semantics: the delay and the abort are drawn independently, each against its own
//! percentage; a delayed request that is also aborted is answered with the abort after the
//! delay. An aborted request never reaches the upstream. The response flags are DI (delayed) and
//! FI (aborted); Envoy's body for an abort is `fault filter abort`, and a gRPC abort is a
//! trailers-only response: HTTP 200 with `grpc-status` (and `grpc-message`) in the headers.

use std::time::Duration;

use crate::model::{AbortStatus, Fault, Percent};

/// What fault injection does to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injection {
    pub delay: Option<Duration>,
    pub abort: Option<AbortStatus>,
}

/// The body Envoy answers an aborted request with.
pub const ABORT_BODY: &str = "fault filter abort";

/// The injection for one request: `draw()` gives uniformly random numbers in `[0, 100)`, one
/// for the delay and one for the abort (drawn only when that fault is configured).
pub fn decide(fault: &Fault, mut draw: impl FnMut() -> f64) -> Injection {
    let hit = |percentage: Percent, draw: &mut dyn FnMut() -> f64| draw() < percentage.value();
    let delay = fault.delay.as_ref().filter(|d| hit(d.percentage, &mut draw)).map(|d| d.fixed);
    let abort = fault.abort.as_ref().filter(|a| hit(a.percentage, &mut draw)).map(|a| a.status);
    Injection { delay, abort }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;
    use crate::model::{Abort, Delay};

    fn fault(delay: Option<f64>, abort: Option<f64>) -> Fault {
        Fault {
            delay: delay
                .map(|p| Delay { fixed: Duration::from_millis(300), percentage: p.try_into().unwrap() }),
            abort: abort.map(|p| Abort {
                status: AbortStatus::Http(StatusCode::INTERNAL_SERVER_ERROR),
                percentage: p.try_into().unwrap(),
            }),
        }
    }

    #[test]
    fn each_fault_is_drawn_against_its_own_percentage() {
        let ms300 = Some(Duration::from_millis(300));
        let e500 = Some(AbortStatus::Http(StatusCode::INTERNAL_SERVER_ERROR));
        let cases = [
            (fault(None, None), vec![], Injection::default()),
            (fault(Some(50.0), None), vec![49.9], Injection { delay: ms300, abort: None }),
            (fault(Some(50.0), None), vec![50.0], Injection::default()),
            (fault(None, Some(10.0)), vec![9.0], Injection { delay: None, abort: e500 }),
            (fault(None, Some(10.0)), vec![10.0], Injection::default()),
            (fault(Some(100.0), Some(100.0)), vec![99.9, 99.9], Injection { delay: ms300, abort: e500 }),
            (fault(Some(0.0), Some(0.0)), vec![0.0, 0.0], Injection::default()),
            // Independent draws: delayed and not aborted, and the other way round.
            (fault(Some(50.0), Some(50.0)), vec![10.0, 90.0], Injection { delay: ms300, abort: None }),
            (fault(Some(50.0), Some(50.0)), vec![90.0, 10.0], Injection { delay: None, abort: e500 }),
            // Decimals count (Istio's percentage is a double).
            (fault(None, Some(0.1)), vec![0.05], Injection { delay: None, abort: e500 }),
        ];
        for (fault, draws, expected) in cases {
            let mut draws = draws.into_iter();
            let got = decide(&fault, || draws.next().expect("drew more than configured"));
            assert_eq!(got, expected, "{fault:?}");
            assert_eq!(draws.next(), None, "drew fewer than configured: {fault:?}");
        }
    }
}
