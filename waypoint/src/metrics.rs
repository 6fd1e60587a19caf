//! The waypoint's request telemetry, Istio's standard metrics as its Envoy waypoint reports
//! them (reporter `waypoint`): `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes` and `istio_response_bytes`, with Istio's labels (the L4 set of
//! `weft_core::telemetry` plus `response_code` and `grpc_response_status`), and the access log
//! line of each request. The `istio_tcp_*` family of streams forwarded as TCP is weft-core's
//! [`weft_core::telemetry::Metrics`], registered beside these.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use weft_core::telemetry::ConnectionLabels;

/// Istio's buckets of `istio_request_duration_milliseconds`.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets of the byte-size histograms: 1 B to 1 GB by powers of ten.
const SIZE_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// The labels of every request metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub connection: ConnectionLabels,
    pub response_code: u16,
    /// The gRPC status of a gRPC response (its `grpc-status`), empty otherwise.
    pub grpc_response_status: String,
}

/// One finished request, as recorded.
#[derive(Clone, Debug)]
pub struct Finished {
    pub labels: RequestLabels,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// The request metrics. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            request_bytes: Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS)),
            response_bytes: Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS)),
        }
    }
}

impl RequestMetrics {
    /// Registers the metrics under the `istio` prefix, with Istio's help texts.
    pub fn register(&self, registry: &mut Registry) {
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("requests", "Total requests handled by an Istio proxy", self.requests.clone());
        istio.register(
            "request_duration_milliseconds",
            "Duration of a request in milliseconds",
            self.duration.clone(),
        );
        istio.register("request_bytes", "Size of HTTP request in bytes", self.request_bytes.clone());
        istio.register("response_bytes", "Size of HTTP response in bytes", self.response_bytes.clone());
    }

    pub fn record(&self, finished: &Finished) {
        let labels = &finished.labels;
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(finished.duration.as_secs_f64() * 1000.0);
        self.request_bytes.get_or_create(labels).observe(finished.request_bytes as f64);
        self.response_bytes.get_or_create(labels).observe(finished.response_bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use weft_core::telemetry::{Reporter, SecurityPolicy};

    use super::*;

    #[test]
    fn istio_names_and_labels() {
        let metrics = RequestMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut connection = ConnectionLabels::new(Reporter::Waypoint, SecurityPolicy::MutualTls);
        connection.request_protocol = "http".into();
        let labels = RequestLabels { connection, response_code: 200, grpc_response_status: String::new() };
        metrics.record(&Finished {
            labels,
            duration: Duration::from_micros(1500),
            request_bytes: 10,
            response_bytes: 1000,
        });
        let text = weft_core::telemetry::encode(&registry);
        for wanted in [
            "istio_requests_total{reporter=\"waypoint\"",
            "response_code=\"200\"",
            "grpc_response_status=\"\"",
            "connection_security_policy=\"mutual_tls\"",
            "istio_request_duration_milliseconds_bucket{",
            "_bucket{le=\"5.0\",reporter=\"waypoint\"",
            "istio_request_bytes_sum{",
            "istio_response_bytes_count{",
        ] {
            assert!(text.contains(wanted), "{wanted} missing from:\n{text}");
        }
    }
}
