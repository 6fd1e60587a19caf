//! Table tests of outlier detection: what each outcome counts toward, when a host is ejected and
//! for how long, the ejection cap, the multiplier's growth and decay, the panic threshold, and
//! forgetting endpoints.

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::model::OutlierDetection;

use Outcome::{LocalOriginFailure as Lof, LocalOriginSuccess as Los, Response};

const SEC: Duration = Duration::from_secs(1);

/// Every check off, 30 s base, 300 s max, no cap on ejections, no panic mode.
fn settings() -> Settings {
    Settings {
        consecutive_5xx: 0,
        consecutive_gateway: 0,
        consecutive_local_origin: 0,
        split_local_origin: false,
        interval: 10 * SEC,
        base_ejection_time: 30 * SEC,
        max_ejection_time: 300 * SEC,
        max_ejection_percent: 100,
        min_health_percent: 0,
        always_eject_one: false,
    }
}

/// The index of the outcome that ejected the host, with its cause.
fn first_ejection(
    detector: &mut Detector,
    uid: &str,
    outcomes: &[Outcome],
    now: Instant,
) -> Option<(usize, Cause)> {
    let mut first = None;
    for (i, outcome) in outcomes.iter().enumerate() {
        if let Some(ejection) = detector.record(uid, *outcome, now, 1) {
            first = first.or(Some((i, ejection.cause)));
        }
    }
    first
}

#[test]
fn what_counts_and_when_it_ejects() {
    struct Case {
        name: &'static str,
        settings: Settings,
        outcomes: Vec<Outcome>,
        ejected_at: Option<(usize, Cause)>,
    }
    let five = |n| Settings { consecutive_5xx: n, ..settings() };
    let gateway = |n| Settings { consecutive_gateway: n, ..settings() };
    let split = |five, local| Settings {
        consecutive_5xx: five,
        consecutive_local_origin: local,
        split_local_origin: true,
        ..settings()
    };
    let cases = [
        Case {
            name: "three 5xx eject at the third",
            settings: five(3),
            outcomes: vec![Response(500), Response(501), Response(599)],
            ejected_at: Some((2, Cause::Consecutive5xx)),
        },
        Case {
            name: "two 5xx do not eject",
            settings: five(3),
            outcomes: vec![Response(500), Response(500)],
            ejected_at: None,
        },
        Case {
            name: "a success in between resets",
            settings: five(3),
            outcomes: vec![Response(500), Response(500), Response(200), Response(500), Response(500)],
            ejected_at: None,
        },
        Case {
            name: "a 404 resets too",
            settings: five(3),
            outcomes: vec![
                Response(500),
                Response(500),
                Response(404),
                Response(500),
                Response(500),
                Response(500),
            ],
            ejected_at: Some((5, Cause::Consecutive5xx)),
        },
        Case {
            name: "500 is not a gateway error",
            settings: gateway(2),
            outcomes: vec![Response(500), Response(500), Response(500)],
            ejected_at: None,
        },
        Case {
            name: "502, 503 and 504 are gateway errors",
            settings: gateway(3),
            outcomes: vec![Response(502), Response(503), Response(504)],
            ejected_at: Some((2, Cause::ConsecutiveGateway)),
        },
        Case {
            name: "a 500 resets the gateway count",
            settings: gateway(2),
            outcomes: vec![Response(503), Response(500), Response(503)],
            ejected_at: None,
        },
        Case {
            name: "gateway is checked before 5xx",
            settings: Settings { consecutive_5xx: 2, consecutive_gateway: 2, ..settings() },
            outcomes: vec![Response(503), Response(503)],
            ejected_at: Some((1, Cause::ConsecutiveGateway)),
        },
        Case {
            name: "0 turns a check off",
            settings: settings(),
            outcomes: vec![Response(503); 10],
            ejected_at: None,
        },
        Case {
            name: "not split: a local-origin failure is a 5xx",
            settings: five(2),
            outcomes: vec![Lof, Response(500)],
            ejected_at: Some((1, Cause::Consecutive5xx)),
        },
        Case {
            name: "not split: a local-origin failure is a gateway error",
            settings: gateway(2),
            outcomes: vec![Lof, Lof],
            ejected_at: Some((1, Cause::ConsecutiveGateway)),
        },
        Case {
            name: "not split: a local-origin success changes nothing",
            settings: five(2),
            outcomes: vec![Lof, Los, Lof],
            ejected_at: Some((2, Cause::Consecutive5xx)),
        },
        Case {
            name: "split: local-origin failures count toward local origin",
            settings: split(2, 2),
            outcomes: vec![Lof, Lof],
            ejected_at: Some((1, Cause::ConsecutiveLocalOrigin)),
        },
        Case {
            name: "split: local-origin failures do not count as 5xx",
            settings: split(2, 0),
            outcomes: vec![Lof, Lof, Lof],
            ejected_at: None,
        },
        Case {
            name: "split: a local-origin success resets local origin",
            settings: split(0, 2),
            outcomes: vec![Lof, Los, Lof],
            ejected_at: None,
        },
        Case {
            name: "split: a response does not reset local origin",
            settings: split(0, 2),
            outcomes: vec![Lof, Response(200), Lof],
            ejected_at: Some((2, Cause::ConsecutiveLocalOrigin)),
        },
        Case {
            name: "split: a local-origin result does not reset 5xx",
            settings: split(2, 0),
            outcomes: vec![Response(500), Lof, Los, Response(500)],
            ejected_at: Some((3, Cause::Consecutive5xx)),
        },
    ];
    let now = Instant::now();
    for case in cases {
        let mut detector = Detector::new(case.settings);
        assert_eq!(first_ejection(&mut detector, "a", &case.outcomes, now), case.ejected_at, "{}", case.name);
        assert_eq!(detector.is_ejected("a"), case.ejected_at.is_some(), "{}", case.name);
    }
}

#[test]
fn max_ejection_percent_counts_the_host_being_ejected() {
    let t0 = Instant::now();
    let fail = |d: &mut Detector, uid: &str, at: Instant| d.record(uid, Response(500), at, 3);
    // 3 hosts at 34 %: one (33 %) may go, two (67 %) may not.
    let mut detector = Detector::new(Settings { consecutive_5xx: 1, max_ejection_percent: 34, ..settings() });
    assert!(fail(&mut detector, "a", t0).is_some());
    assert_eq!(fail(&mut detector, "b", t0), None);
    assert_eq!(fail(&mut detector, "b", t0), None, "the count reset, and the cap still holds");
    assert_eq!((detector.ejected(), detector.is_ejected("b")), (1, false));
    // Once a is back, b may go.
    assert_eq!(detector.sweep(t0 + 30 * SEC), ["a"]);
    assert!(fail(&mut detector, "b", t0 + 30 * SEC).is_some());

    // Istio's default of 10 % ejects nothing from 3 hosts, unless always_eject_one.
    let mut detector = Detector::new(Settings { consecutive_5xx: 1, max_ejection_percent: 10, ..settings() });
    assert_eq!(fail(&mut detector, "a", t0), None);
    let mut detector = Detector::new(Settings {
        consecutive_5xx: 1,
        max_ejection_percent: 10,
        always_eject_one: true,
        ..settings()
    });
    assert!(fail(&mut detector, "a", t0).is_some(), "the first always may go");
    assert_eq!(fail(&mut detector, "b", t0), None, "the second may not");

    // 100 % of 2 hosts: both.
    let mut detector = Detector::new(Settings { consecutive_5xx: 1, ..settings() });
    assert!(detector.record("a", Response(500), t0, 2).is_some());
    assert!(detector.record("b", Response(500), t0, 2).is_some());
    assert_eq!(detector.ejected(), 2);
}

#[test]
fn an_ejected_host_is_not_ejected_again() {
    let t0 = Instant::now();
    let mut detector = Detector::new(Settings { consecutive_5xx: 1, ..settings() });
    assert_eq!(detector.record("a", Response(500), t0, 1).map(|e| e.multiplier), Some(1));
    assert_eq!(detector.record("a", Response(500), t0 + SEC, 1), None);
    assert_eq!(detector.ejected(), 1);
    assert_eq!(detector.sweep(t0 + 30 * SEC), ["a"], "the time counts from the first ejection");
    let again = detector.record("a", Response(500), t0 + 30 * SEC, 1);
    assert_eq!(again.map(|e| e.multiplier), Some(2), "the multiplier grew once, not twice");
}

#[test]
fn un_ejected_at_the_first_sweep_after_its_time() {
    let t0 = Instant::now();
    let mut detector = Detector::new(Settings { consecutive_5xx: 1, ..settings() });
    let ejection = detector.record("a", Response(500), t0 + 5 * SEC, 1);
    assert_eq!(ejection, Some(Ejection { cause: Cause::Consecutive5xx, multiplier: 1, duration: 30 * SEC }));
    for sweep in [10, 20, 30] {
        assert!(detector.sweep(t0 + sweep * SEC).is_empty(), "sweep at {sweep} s");
    }
    assert!(detector.is_ejected("a"), "35 s: past its time, but no sweep yet");
    assert_eq!(detector.sweep(t0 + 40 * SEC), ["a"]);
    assert!(!detector.is_ejected("a"));
    assert_eq!(detector.ejected(), 0);
}

#[test]
fn the_multiplier_grows_with_each_ejection_and_decays_at_sweeps() {
    let t0 = Instant::now();
    let mut detector = Detector::new(Settings { consecutive_5xx: 1, ..settings() });
    let mut now = t0;
    let eject = |detector: &mut Detector, now: Instant| {
        let ejection = detector.record("a", Response(500), now, 1).expect("ejected");
        (ejection.multiplier, ejection.duration)
    };
    assert_eq!(eject(&mut detector, now), (1, 30 * SEC));
    now += 30 * SEC;
    assert_eq!(detector.sweep(now), ["a"]);
    assert_eq!(eject(&mut detector, now), (2, 60 * SEC), "the second ejection lasts twice as long");
    assert!(detector.sweep(now + 50 * SEC).is_empty());
    now += 60 * SEC;
    assert_eq!(detector.sweep(now), ["a"], "the sweep that brings it back does not lower it");
    now += 10 * SEC;
    assert!(detector.sweep(now).is_empty());
    assert_eq!(eject(&mut detector, now), (2, 60 * SEC), "one sweep healthy: 2 → 1, then 2 again");
    now += 60 * SEC;
    assert_eq!(detector.sweep(now), ["a"]);
    for _ in 0..2 {
        now += 10 * SEC;
        detector.sweep(now);
    }
    assert_eq!(eject(&mut detector, now), (1, 30 * SEC), "two sweeps healthy: back to the base");
}

#[test]
fn the_ejection_time_is_capped_at_max_ejection_time() {
    let t0 = Instant::now();
    let cases = [
        // base 30 s, max 100 s: the multiplier grows while multiplier × base < max + base.
        ("max above base", 100, vec![(1, 30), (2, 60), (3, 90), (4, 100), (5, 100), (5, 100)]),
        // A max below the base: the base (the multiplier stops once base × it reaches max + base).
        ("max below base", 10, vec![(1, 30), (2, 30), (2, 30)]),
    ];
    for (name, max, expected) in cases {
        let mut detector =
            Detector::new(Settings { consecutive_5xx: 1, max_ejection_time: max * SEC, ..settings() });
        let mut now = t0;
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            let ejection = detector.record("a", Response(500), now, 1).expect("ejected");
            got.push((ejection.multiplier, ejection.duration.as_secs()));
            now += ejection.duration;
            assert_eq!(detector.sweep(now), ["a"], "{name}");
        }
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn counts_reset_when_a_host_comes_back() {
    let t0 = Instant::now();
    let mut detector = Detector::new(Settings { consecutive_5xx: 3, ..settings() });
    assert!(first_ejection(&mut detector, "a", &[Response(500); 3], t0).is_some());
    // Failures while out (requests already sent) count, but are forgotten at un-ejection.
    assert_eq!(first_ejection(&mut detector, "a", &[Response(500); 2], t0), None);
    assert_eq!(detector.sweep(t0 + 30 * SEC), ["a"]);
    assert_eq!(first_ejection(&mut detector, "a", &[Response(500)], t0 + 30 * SEC), None);
    assert!(!detector.is_ejected("a"));
}

#[test]
fn keep_drops_ejected_candidates_unless_in_panic() {
    struct Case {
        name: &'static str,
        candidates: &'static [&'static str],
        ejected: &'static [&'static str],
        min_health_percent: u32,
        kept: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "none ejected",
            candidates: &["a", "b", "c"],
            ejected: &[],
            min_health_percent: 0,
            kept: &["a", "b", "c"],
        },
        Case {
            name: "one of three ejected",
            candidates: &["a", "b", "c"],
            ejected: &["a"],
            min_health_percent: 0,
            kept: &["b", "c"],
        },
        Case {
            name: "two of three ejected, 33 % healthy below 50 %: panic, all kept",
            candidates: &["a", "b", "c"],
            ejected: &["a", "b"],
            min_health_percent: 50,
            kept: &["a", "b", "c"],
        },
        Case {
            name: "one of three ejected, 67 % healthy above 50 %",
            candidates: &["a", "b", "c"],
            ejected: &["a"],
            min_health_percent: 50,
            kept: &["b", "c"],
        },
        Case {
            name: "one of three ejected, 67 % healthy below 70 %: panic",
            candidates: &["a", "b", "c"],
            ejected: &["a"],
            min_health_percent: 70,
            kept: &["a", "b", "c"],
        },
        Case {
            name: "one of four ejected, 75 % below 80 %, but 75 % × 1.4 ≥ 100 %: no panic",
            candidates: &["a", "b", "c", "d"],
            ejected: &["a"],
            min_health_percent: 80,
            kept: &["b", "c", "d"],
        },
        Case {
            name: "all ejected, panic mode off: none (503 UH)",
            candidates: &["a", "b", "c"],
            ejected: &["a", "b", "c"],
            min_health_percent: 0,
            kept: &[],
        },
        Case {
            name: "all ejected, threshold 1 %: panic",
            candidates: &["a", "b", "c"],
            ejected: &["a", "b", "c"],
            min_health_percent: 1,
            kept: &["a", "b", "c"],
        },
        Case {
            name: "ejected hosts outside the candidates do not count",
            candidates: &["c", "d"],
            ejected: &["a", "b"],
            min_health_percent: 100,
            kept: &["c", "d"],
        },
        Case { name: "no candidates", candidates: &[], ejected: &["a"], min_health_percent: 50, kept: &[] },
    ];
    let now = Instant::now();
    for case in cases {
        let mut detector = Detector::new(Settings {
            consecutive_5xx: 1,
            min_health_percent: case.min_health_percent,
            ..settings()
        });
        for uid in case.ejected {
            assert!(detector.record(uid, Response(503), now, case.ejected.len()).is_some(), "{}", case.name);
        }
        let kept = detector.keep(case.candidates.to_vec(), |uid| uid);
        assert_eq!(kept, case.kept, "{}", case.name);
    }
}

#[test]
fn retain_forgets_endpoints_that_left() {
    let now = Instant::now();
    let mut detector = Detector::new(Settings { consecutive_5xx: 2, ..settings() });
    assert!(first_ejection(&mut detector, "a", &[Response(500); 2], now).is_some());
    detector.record("b", Response(500), now, 2);
    detector.retain(|uid| uid != "a" && uid != "b");
    assert_eq!((detector.ejected(), detector.is_ejected("a")), (0, false));
    assert_eq!(first_ejection(&mut detector, "b", &[Response(500)], now), None, "b's count is gone");
    assert!(detector.sweep(now + 300 * SEC).is_empty());
}

#[test]
fn settings_from_istio() {
    let od = OutlierDetection {
        consecutive_5xx_errors: 7,
        consecutive_gateway_errors: 3,
        interval: None,
        base_ejection_time: None,
        max_ejection_percent: 0,
        min_health_percent: 0,
        consecutive_local_origin_failures: 0,
        split_external_local_origin_errors: false,
    };
    assert_eq!(
        Settings::from(&od),
        Settings {
            consecutive_5xx: 7,
            consecutive_gateway: 3,
            consecutive_local_origin: 0,
            split_local_origin: false,
            interval: 10 * SEC,
            base_ejection_time: 30 * SEC,
            max_ejection_time: 300 * SEC,
            max_ejection_percent: 10,
            min_health_percent: 0,
            always_eject_one: false,
        }
    );
    let od = OutlierDetection {
        interval: Some(SEC),
        base_ejection_time: Some(2 * SEC),
        max_ejection_percent: 50,
        min_health_percent: 30,
        ..od
    };
    let settings = Settings::from(&od);
    assert_eq!(
        (
            settings.interval,
            settings.base_ejection_time,
            settings.max_ejection_percent,
            settings.min_health_percent
        ),
        (SEC, 2 * SEC, 50, 30)
    );
}
