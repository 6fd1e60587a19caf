//! What the waypoint keeps per upstream cluster (Envoy's unit of circuit breaking and outlier
//! detection: a destination host, subset and port): the requests and retries in flight against
//! the DestinationRule's limits, the outlier detector, and Envoy's per-cluster counters,
//! exported as `envoy_cluster_*{cluster_name="outbound|<port>|<subset>|<host>"}` as Istio's
//! waypoint exports them (prometheus-client adds `_total` to counters).
//!
//! The limits are read from the configuration on every request, so a DestinationRule change
//! applies to the next request; the counters and the detector's state outlive it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::model::OutlierDetection;
use crate::outlier::{self, Detector};
use crate::retry::Budget;

/// Envoy's cluster: host, subset and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    pub host: String,
    pub subset: Option<String>,
    pub port: u16,
}

impl ClusterKey {
    /// Envoy's name for the cluster in Istio: `outbound|<port>|<subset>|<host>`.
    pub fn name(&self) -> String {
        format!("outbound|{}|{}|{}", self.port, self.subset.as_deref().unwrap_or(""), self.host)
    }
}

/// One cluster's shared state.
pub struct Cluster {
    pub key: ClusterKey,
    pub labels: ClusterLabels,
    /// Requests in flight (Envoy's `max_requests`, Istio's `http2MaxRequests`).
    requests: Arc<AtomicU64>,
    /// Retries in flight, against the `maxRetries` they were counted under.
    retries: Mutex<(Option<NonZeroU32>, Arc<Budget>)>,
    outlier: Mutex<Outlier>,
    pub metrics: ClusterMetrics,
}

/// The detector, and when it last swept.
struct Outlier {
    detector: Option<Detector>,
    settings: Option<outlier::Settings>,
    swept: Instant,
}

/// A request counted against the cluster's `max_requests` until dropped.
pub struct Active(Arc<AtomicU64>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Cluster {
    fn new(key: ClusterKey, metrics: ClusterMetrics) -> Cluster {
        let labels = ClusterLabels { cluster_name: key.name() };
        Cluster {
            key,
            labels,
            requests: Arc::default(),
            retries: Mutex::new((None, Arc::new(Budget::new(None)))),
            outlier: Mutex::new(Outlier { detector: None, settings: None, swept: Instant::now() }),
            metrics,
        }
    }

    /// The retry budget for `max_retries` (DestinationRule `http.maxRetries`; `None`:
    /// unlimited). A changed limit starts a new count.
    pub fn retry_budget(&self, max_retries: Option<NonZeroU32>) -> Arc<Budget> {
        let mut retries = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        if retries.0 != max_retries {
            *retries = (max_retries, Arc::new(Budget::new(max_retries)));
        }
        retries.1.clone()
    }

    /// Counts a request in flight, unless `limit` are already: then `None` (overflow, UO).
    pub fn start_request(&self, limit: Option<u64>) -> Option<Active> {
        let previous = self.requests.fetch_add(1, Ordering::Relaxed);
        let active = Active(self.requests.clone());
        if limit.is_some_and(|limit| previous >= limit) {
            self.metrics.pending_overflow.get_or_create(&self.labels).inc();
            return None;
        }
        Some(active)
    }

    /// Runs `f` on the outlier detector configured by `config` (created, reset or swept first as
    /// the configuration and the time say); `None` when outlier detection is off.
    pub fn outlier<T>(
        &self,
        config: Option<&OutlierDetection>,
        now: Instant,
        f: impl FnOnce(&mut Detector) -> T,
    ) -> Option<T> {
        let mut state = self.outlier.lock().unwrap_or_else(|p| p.into_inner());
        let Some(config) = config else {
            state.detector = None;
            state.settings = None;
            return None;
        };
        let settings = outlier::Settings::from(config);
        if state.settings.as_ref() != Some(&settings) {
            state.detector = Some(Detector::new(settings.clone()));
            state.settings = Some(settings.clone());
            state.swept = now;
        }
        let mut swept = state.swept;
        let detector = state.detector.as_mut()?;
        // Envoy sweeps every interval; here the sweeps due are run when the cluster is next used.
        let interval = settings.interval.max(Duration::from_millis(1));
        let mut sweeps = 0;
        while swept + interval <= now && sweeps < MAX_SWEEPS_AT_ONCE {
            swept += interval;
            sweeps += 1;
            detector.sweep(swept);
        }
        if sweeps == MAX_SWEEPS_AT_ONCE {
            swept = now;
        }
        let result = f(detector);
        self.metrics.ejections_active.get_or_create(&self.labels).set(detector.ejected() as i64);
        state.swept = swept;
        Some(result)
    }
}

/// Enough sweeps to let every multiplier decay after a long quiet spell.
const MAX_SWEEPS_AT_ONCE: u32 = 64;

/// Every cluster the waypoint has sent to.
#[derive(Default)]
pub struct Clusters {
    map: Mutex<HashMap<ClusterKey, Arc<Cluster>>>,
    pub metrics: ClusterMetrics,
}

impl Clusters {
    /// The cluster `key`, created on first use.
    pub fn get(&self, key: &ClusterKey) -> Arc<Cluster> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some(c) => c.clone(),
            None => map
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Cluster::new(key.clone(), self.metrics.clone())))
                .clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster_name: String,
}

/// Envoy's per-cluster counters that Istio's tasks read.
#[derive(Clone, Default)]
pub struct ClusterMetrics {
    /// Retries sent.
    pub retry: Family<ClusterLabels, Counter>,
    /// Retries not sent because `maxRetries` were in flight.
    pub retry_overflow: Family<ClusterLabels, Counter>,
    /// Requests whose retries ran out (URX).
    pub retry_limit_exceeded: Family<ClusterLabels, Counter>,
    /// Requests refused by the pending-request or request limit (UO).
    pub pending_overflow: Family<ClusterLabels, Counter>,
    /// Times the connection limit was reached.
    pub cx_overflow: Family<ClusterLabels, Counter>,
    /// Requests past the route's timeout (UT).
    pub timeout: Family<ClusterLabels, Counter>,
    /// Attempts past the per-try timeout.
    pub per_try_timeout: Family<ClusterLabels, Counter>,
    /// Ejections carried out.
    pub ejections_enforced: Family<ClusterLabels, Counter>,
    /// Endpoints ejected now.
    pub ejections_active: Family<ClusterLabels, Gauge>,
    /// Mirrored requests sent, and those dropped because too many were in flight.
    pub mirror: Family<ClusterLabels, Counter>,
    pub mirror_overflow: Family<ClusterLabels, Counter>,
}

impl ClusterMetrics {
    /// Registers the counters under `envoy_cluster_`, with Envoy's names.
    pub fn register(&self, registry: &mut Registry) {
        let envoy = registry.sub_registry_with_prefix("envoy_cluster");
        let counters = [
            ("upstream_rq_retry", "Retries sent", &self.retry),
            ("upstream_rq_retry_overflow", "Retries not sent because of maxRetries", &self.retry_overflow),
            (
                "upstream_rq_retry_limit_exceeded",
                "Requests not retried because attempts ran out",
                &self.retry_limit_exceeded,
            ),
            (
                "upstream_rq_pending_overflow",
                "Requests refused by the connection pool or request limits",
                &self.pending_overflow,
            ),
            ("upstream_cx_overflow", "Times the connection limit was reached", &self.cx_overflow),
            ("upstream_rq_timeout", "Requests past the route timeout", &self.timeout),
            ("upstream_rq_per_try_timeout", "Attempts past the per-try timeout", &self.per_try_timeout),
            (
                "outlier_detection_ejections_enforced",
                "Endpoints ejected by outlier detection",
                &self.ejections_enforced,
            ),
            ("upstream_rq_mirror", "Mirrored requests sent", &self.mirror),
            (
                "upstream_rq_mirror_overflow",
                "Mirrored requests dropped: too many in flight",
                &self.mirror_overflow,
            ),
        ];
        for (name, help, family) in counters {
            envoy.register(name, help, family.clone());
        }
        envoy.register(
            "outlier_detection_ejections_active",
            "Endpoints ejected now",
            self.ejections_active.clone(),
        );
    }
}
