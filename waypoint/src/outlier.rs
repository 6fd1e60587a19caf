//! Outlier detection: which endpoints of one cluster (host, subset, port) are ejected for their
//! consecutive failures, and which candidates the balancer may use. A pure state machine per
//! cluster, [`Detector`]: the caller feeds it each attempt's [`Outcome`] ([`Detector::record`]),
//! calls [`Detector::sweep`] every [`Settings::interval`], and filters candidates with
//! [`Detector::keep`]. Time comes in as arguments; no I/O, no timers, no locks.
//!
//! Envoy's semantics (source/common/upstream/outlier_detection_impl.cc, the outlier detection
//! architecture overview and `config.cluster.v3.OutlierDetection`), as Istio configures them:
//! - A 5xx response adds one to the host's consecutive-5xx count, any other response resets it;
//!   a 502, 503 or 504 adds one to the consecutive-gateway count, any other response resets it.
//!   Without [`Settings::split_local_origin`], a local-origin failure (connect failure, reset,
//!   timeout) counts as a 503 for both, and a local-origin success (connected) changes nothing,
//!   as Envoy maps them. With it, local-origin results only move the consecutive-local-origin
//!   count (a success resets it) and responses only the other two.
//! - A count that reaches its threshold (exactly, as Envoy's `==`) ejects the host at once,
//!   not at the next interval; the gateway check runs before the 5xx one. A host already ejected
//!   is not ejected again (and, as in Envoy, its counts are then left as they are). Otherwise the
//!   count that fired is reset, whether the ejection was allowed or not.
//! - An ejection is allowed when the ejected hosts, this one included, are at most
//!   `max_ejection_percent` of the cluster's hosts. That is Envoy since 1.27 (envoyproxy/envoy
//!   PRs #27624 and #27909): the older "will eject at least one host regardless of the value"
//!   is now the opt-in `always_eject_one_host` ([`Settings::always_eject_one`], which Istio does
//!   not set). So Istio's default of 10 % ejects nothing from a cluster of fewer than ten hosts.
//! - Each ejection adds one to the host's multiplier while `multiplier × base` is below
//!   `max_ejection_time + base`; the host stays ejected for
//!   `min(base × multiplier, max(base, max_ejection_time))`. At every sweep a host that is not
//!   ejected has its multiplier lowered by one, and an ejected host whose time has passed comes
//!   back (its counts reset, as Envoy does "to avoid re-ejection on very few new errors").
//!   Un-ejection happens only at sweeps, as in Envoy, so an ejection lasts up to one interval
//!   longer than its time.
//! - [`Detector::keep`] is Envoy's panic threshold (Istio's `minHealthPercent`, applied as
//!   `healthy_panic_threshold`) for a cluster of one priority: with Envoy's default
//!   overprovisioning factor of 1.4 (which Istio leaves), a cluster whose healthy share × 1.4
//!   is at least 100 % is never in panic; below that, a healthy share under `min_health_percent`
//!   is panic and every candidate is kept, ejected ones included. Otherwise ejected candidates
//!   are dropped, and when none is left (always the case with every host ejected and a
//!   threshold of 0) the caller answers 503 UH.
//!
//! Not done: success-rate and failure-percentage ejection (Istio disables them), the ejection
//! time jitter (`max_ejection_time_jitter`, 0 unless set; Istio does not), `enforcing_*`
//! percentages other than 0 and 100 (Istio sets 100 for a configured threshold), and
//! un-ejection by active health checks.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::model::OutlierDetection;

/// Envoy's defaults where Istio leaves a field unset.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Envoy's default overprovisioning factor (1.4), in percent.
const OVERPROVISIONING_PERCENT: u64 = 140;

/// Outlier detection for one cluster, in Envoy's terms. A count of 0 turns that check off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Envoy's `consecutive_5xx` (Istio's `consecutive5xxErrors`).
    pub consecutive_5xx: u32,
    /// Envoy's `consecutive_gateway_failure` (Istio's `consecutiveGatewayErrors`).
    pub consecutive_gateway: u32,
    /// Envoy's `consecutive_local_origin_failure`; counted only with `split_local_origin`. Istio
    /// sets it only when `consecutiveLocalOriginFailures` is above 0; Envoy's default otherwise
    /// is 5, which whoever fills this in must apply.
    pub consecutive_local_origin: u32,
    /// Envoy's `split_external_local_origin_errors` (Istio's `splitExternalLocalOriginErrors`).
    pub split_local_origin: bool,
    /// How often [`Detector::sweep`] runs.
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// 0 to 100 (more is read as 100).
    pub max_ejection_percent: u32,
    /// The panic threshold, 0 to 100; 0 turns panic mode off.
    pub min_health_percent: u32,
    /// Envoy's `always_eject_one_host`: the first ejection ignores `max_ejection_percent`.
    pub always_eject_one: bool,
}

/// What one attempt to a host came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The host answered with this HTTP status.
    Response(u16),
    /// No response: the connection failed, or was reset, or the attempt timed out.
    LocalOriginFailure,
    /// The connection to the host was established.
    LocalOriginSuccess,
}

/// Which check ejected a host (Envoy's `OutlierEjectionType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Consecutive5xx,
    ConsecutiveGateway,
    ConsecutiveLocalOrigin,
}

/// A host just ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    pub cause: Cause,
    /// The host's multiplier after this ejection.
    pub multiplier: u32,
    /// How long the host stays out (it comes back at the first sweep after).
    pub duration: Duration,
}

/// The outlier state of one cluster's endpoints, by workload uid.
#[derive(Clone, Debug)]
pub struct Detector {
    settings: Settings,
    hosts: BTreeMap<String, Host>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local_origin: u32,
    /// Envoy's `eject_time_backoff`.
    multiplier: u32,
    ejected: Option<Ejected>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ejected {
    at: Instant,
    duration: Duration,
}

impl Detector {
    pub fn new(settings: Settings) -> Detector {
        Detector { settings, hosts: BTreeMap::new() }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Records the outcome of an attempt to `uid`, one of the cluster's `hosts` endpoints, and
    /// returns the ejection it caused, if any (see the module docs).
    pub fn record(&mut self, uid: &str, outcome: Outcome, now: Instant, hosts: usize) -> Option<Ejection> {
        let active = self.ejected();
        let settings = &self.settings;
        if !self.hosts.contains_key(uid) {
            self.hosts.insert(uid.to_owned(), Host::default());
        }
        let host = self.hosts.get_mut(uid)?;
        let mut ejection = None;
        for cause in host.count(outcome, settings).into_iter().flatten() {
            if host.ejected.is_some() {
                // Envoy ignores the event for a host that is out, and leaves its counts.
                continue;
            }
            if may_eject(settings, active, hosts) {
                ejection = Some(host.eject(cause, settings, now));
            }
            host.reset(cause);
        }
        ejection
    }

    /// What Envoy does every interval: brings back the hosts whose ejection time has passed
    /// (returned, in uid order) and lowers by one the multiplier of every host not ejected.
    pub fn sweep(&mut self, now: Instant) -> Vec<String> {
        let mut back = Vec::new();
        for (uid, host) in &mut self.hosts {
            match host.ejected {
                None => host.multiplier = host.multiplier.saturating_sub(1),
                Some(ejected) if now.saturating_duration_since(ejected.at) >= ejected.duration => {
                    host.ejected = None;
                    host.consecutive_5xx = 0;
                    host.consecutive_gateway = 0;
                    host.consecutive_local_origin = 0;
                    back.push(uid.clone());
                }
                Some(_) => {}
            }
        }
        // A host with nothing counted is the same as one never seen.
        self.hosts.retain(|_, host| *host != Host::default());
        back
    }

    pub fn is_ejected(&self, uid: &str) -> bool {
        self.hosts.get(uid).is_some_and(|host| host.ejected.is_some())
    }

    /// The hosts ejected now.
    pub fn ejected(&self) -> usize {
        self.hosts.values().filter(|host| host.ejected.is_some()).count()
    }

    /// The candidates the balancer may pick from: all of them in panic (see the module docs),
    /// else those not ejected, which may be none.
    pub fn keep<T>(&self, candidates: Vec<T>, uid: impl Fn(&T) -> &str) -> Vec<T> {
        let total = candidates.len();
        let healthy = candidates.iter().filter(|c| !self.is_ejected(uid(c))).count();
        if healthy == total || self.panic(healthy, total) {
            return candidates;
        }
        candidates.into_iter().filter(|c| !self.is_ejected(uid(c))).collect()
    }

    /// Forgets the endpoints that left the cluster.
    pub fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.hosts.retain(|uid, _| live(uid));
    }

    /// Whether a cluster with `healthy` of `total` hosts healthy is in panic (Envoy's
    /// `recalculatePerPriorityPanic` and `isHostSetInPanic` for one priority).
    fn panic(&self, healthy: usize, total: usize) -> bool {
        let (healthy, total) = (healthy as u64, total as u64);
        let threshold = u64::from(self.settings.min_health_percent.min(100));
        // The normalized availability, min(100, 1.4 × healthy %), is below 100 …
        healthy * OVERPROVISIONING_PERCENT < total * 100
            // … and the healthy share below the threshold.
            && healthy * 100 < threshold * total
    }
}

impl Host {
    /// Counts `outcome`; the checks that reached their threshold, gateway before 5xx.
    fn count(&mut self, outcome: Outcome, settings: &Settings) -> [Option<Cause>; 2] {
        let status = match (outcome, settings.split_local_origin) {
            (Outcome::Response(status), _) => status,
            // Envoy's `resultToHttpCode`: a failed connection is a 503.
            (Outcome::LocalOriginFailure, false) => 503,
            (Outcome::LocalOriginSuccess, false) => return [None, None],
            (Outcome::LocalOriginFailure, true) => {
                self.consecutive_local_origin = self.consecutive_local_origin.saturating_add(1);
                let fired = reached(self.consecutive_local_origin, settings.consecutive_local_origin);
                return [fired.then_some(Cause::ConsecutiveLocalOrigin), None];
            }
            (Outcome::LocalOriginSuccess, true) => {
                self.consecutive_local_origin = 0;
                return [None, None];
            }
        };
        if !(500..=599).contains(&status) {
            self.consecutive_5xx = 0;
            self.consecutive_gateway = 0;
            return [None, None];
        }
        let gateway = if (502..=504).contains(&status) {
            self.consecutive_gateway = self.consecutive_gateway.saturating_add(1);
            reached(self.consecutive_gateway, settings.consecutive_gateway)
        } else {
            self.consecutive_gateway = 0;
            false
        };
        self.consecutive_5xx = self.consecutive_5xx.saturating_add(1);
        let five = reached(self.consecutive_5xx, settings.consecutive_5xx);
        [gateway.then_some(Cause::ConsecutiveGateway), five.then_some(Cause::Consecutive5xx)]
    }

    fn eject(&mut self, cause: Cause, settings: &Settings, now: Instant) -> Ejection {
        let base = settings.base_ejection_time;
        let max = settings.max_ejection_time;
        let scaled = |m: u32| base.checked_mul(m).unwrap_or(Duration::MAX);
        if scaled(self.multiplier) < max.saturating_add(base) {
            self.multiplier = self.multiplier.saturating_add(1);
        }
        let duration = scaled(self.multiplier).min(base.max(max));
        self.ejected = Some(Ejected { at: now, duration });
        Ejection { cause, multiplier: self.multiplier, duration }
    }

    fn reset(&mut self, cause: Cause) {
        match cause {
            Cause::Consecutive5xx => self.consecutive_5xx = 0,
            Cause::ConsecutiveGateway => self.consecutive_gateway = 0,
            Cause::ConsecutiveLocalOrigin => self.consecutive_local_origin = 0,
        }
    }
}

impl From<&OutlierDetection> for Settings {
    /// Istio's translation: an unset interval is Envoy's 10 s, base ejection time 30 s, max
    /// ejection time 300 s; a `maxEjectionPercent` of 0 is left unset by Istio (`if > 0`), so
    /// Envoy's default of 10 applies (0 therefore never means "eject nothing"); a
    /// `minHealthPercent` of 0 turns panic mode off. Local-origin failures are counted apart
    /// only with `splitExternalLocalOriginErrors` (the controller fills Istio's default of 5).
    fn from(od: &OutlierDetection) -> Settings {
        Settings {
            consecutive_5xx: od.consecutive_5xx_errors,
            consecutive_gateway: od.consecutive_gateway_errors,
            consecutive_local_origin: od.consecutive_local_origin_failures,
            split_local_origin: od.split_external_local_origin_errors,
            interval: od.interval.unwrap_or(DEFAULT_INTERVAL),
            base_ejection_time: od.base_ejection_time.unwrap_or(DEFAULT_BASE_EJECTION_TIME),
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: match od.max_ejection_percent {
                0 => DEFAULT_MAX_EJECTION_PERCENT,
                percent => percent.min(100),
            },
            min_health_percent: od.min_health_percent.min(100),
            always_eject_one: false,
        }
    }
}

/// Whether a count reached an enabled threshold (exactly, as Envoy compares).
fn reached(count: u32, threshold: u32) -> bool {
    threshold > 0 && count == threshold
}

/// Whether one more host may be ejected when `active` of `hosts` are out already.
fn may_eject(settings: &Settings, active: usize, hosts: usize) -> bool {
    let after = (active as u64 + 1) * 100;
    let limit = u64::from(settings.max_ejection_percent.min(100)) * hosts as u64;
    after <= limit || (settings.always_eject_one && active == 0)
}

#[cfg(test)]
mod tests;
