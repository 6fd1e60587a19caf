//! Istio's telemetry conventions, shared by ztunnel and the waypoint: the reporter, the security
//! policy, Envoy's and Istio's response flags, the workload label builders, Istio's standard L4
//! metrics, and the one tracing initialisation every binary calls ([`init_tracing`]). Owns the
//! counters, their labels and the log filter; knows nothing of sockets.
//!
//! The L4 metrics, as Istio's ztunnel exposes them on :15020 `/metrics`:
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total` and `istio_tcp_received_bytes_total`, with Istio's label names
//! (in the order ztunnel writes them). The proxy opens a [`ConnectionGuard`] per connection and
//! feeds it byte counts.
//!
//! Conventions followed (Istio's ztunnel, `proxy/metrics.rs`):
//! - A label with no known value is `unknown`; `request_protocol` is `tcp`.
//! - `received` bytes flow from the client to the server (the request direction), `sent` bytes
//!   from the server back to the client (Istio: "bytes sent during response").
//! - `response_flags` is `-` on success, `DENY` for a policy refusal, `CONNECT` when the
//!   upstream could not be reached. As in ztunnel, the flag is set on the *closed* counter
//!   only: the opened counter is recorded when the connection arrives, before any outcome, so
//!   it carries `-`. A policy refusal ([`Metrics::denied`]) therefore counts one connection
//!   opened with `-` and one closed with `DENY`.
//! - `connection_security_policy` is `mutual_tls` for HBONE. Istio's ztunnel writes `unknown`
//!   for everything else, including inbound plaintext ([`SecurityPolicy::Unknown`]: use it to
//!   match ztunnel's series); `none` ([`SecurityPolicy::None`]) is what Istio's Envoy proxies
//!   write for plaintext, available for callers that want it.
//! - Help texts are Istio ztunnel's.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter};

use crate::identity::Identity;
use crate::state::{Service, Workload};

/// The value of a label nothing is known about.
pub const UNKNOWN: &str = "unknown";

/// Which side of the connection reports it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    /// The client's ztunnel (outbound).
    Source,
    /// The server's ztunnel (inbound).
    Destination,
    /// The waypoint between them (Istio's waypoint reports as `waypoint`).
    Waypoint,
}

/// How a connection or request ended, in the vocabulary Istio's dashboards read: Istio
/// ztunnel's L4 flags (`DENY`, `CONNECT`) and Envoy's (the waypoint's), each written as its short
/// name (`-` for none).
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    #[default]
    None,
    /// ztunnel: refused by authorization policy (`DENY`).
    Deny,
    /// ztunnel: the upstream could not be connected to (`CONNECT`).
    Connect,
    /// `UH`: no healthy upstream host (503).
    NoHealthyUpstream,
    /// `UF`: the upstream connection failed (503).
    UpstreamConnectionFailure,
    /// `UO`: upstream overflow, circuit breaking (503).
    UpstreamOverflow,
    /// `NR`: no route for the request (404), or no filter chain.
    NoRouteFound,
    /// `NC`: the route's destination is no known service or subset (503).
    NoClusterFound,
    /// `URX`: retries (HTTP) or connect attempts (TCP) exhausted.
    UpstreamRetryLimitExceeded,
    /// `UT`: the upstream request timed out (504).
    UpstreamRequestTimeout,
    /// `DI`: delayed by fault injection.
    DelayInjected,
    /// `FI`: aborted by fault injection.
    FaultInjected,
    /// `UC`: the upstream connection ended before the response (503).
    UpstreamConnectionTermination,
    /// `UR`: the upstream reset the stream (503).
    UpstreamRemoteReset,
    /// `LR`: the proxy reset the connection (503).
    LocalReset,
    /// `DC`: the downstream connection ended.
    DownstreamConnectionTermination,
    /// `DPE`: the downstream request did not follow HTTP.
    DownstreamProtocolError,
    /// `UPE`: the upstream response did not follow HTTP.
    UpstreamProtocolError,
    /// `UAEX`: refused by an external authorization service.
    UnauthorizedExternalService,
    /// `RL`: rate limited (429).
    RateLimited,
    /// `SI`: the stream sat idle past its timeout.
    StreamIdleTimeout,
    /// `DT`: the request ran past its maximum duration.
    DurationTimeout,
}

#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    #[default]
    Unknown,
    MutualTls,
    None,
}

/// The labels of every L4 metric, in Istio ztunnel's order. Build with [`ConnectionLabels::new`]
/// and the `source`/`destination` helpers; empty values are written as `unknown`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

/// The L4 counters. Cheap to clone (the counters are shared).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
}

/// One open connection: counts its bytes as they flow and records it closed when dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: Metrics,
    labels: ConnectionLabels,
    sent: Counter,
    received: Counter,
}

impl ConnectionLabels {
    /// Labels with every workload field `unknown`, protocol `tcp`, flags `-`.
    pub fn new(reporter: Reporter, security: SecurityPolicy) -> Self {
        let unknown = || UNKNOWN.to_owned();
        ConnectionLabels {
            reporter,
            source_workload: unknown(),
            source_canonical_service: unknown(),
            source_canonical_revision: unknown(),
            source_workload_namespace: unknown(),
            source_principal: unknown(),
            source_app: unknown(),
            source_version: unknown(),
            source_cluster: unknown(),
            destination_service: unknown(),
            destination_service_namespace: unknown(),
            destination_service_name: unknown(),
            destination_workload: unknown(),
            destination_canonical_service: unknown(),
            destination_canonical_revision: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
            destination_app: unknown(),
            destination_version: unknown(),
            destination_cluster: unknown(),
            request_protocol: "tcp".to_owned(),
            response_flags: ResponseFlags::None,
            connection_security_policy: security,
        }
    }

    /// The source workload's labels. Not its principal: as in Istio's ztunnel, that comes only
    /// from the certificate identity actually used ([`ConnectionLabels::with_source_principal`]).
    pub fn with_source(mut self, w: &Workload) -> Self {
        self.source_workload = known(if w.workload_name.is_empty() { &w.name } else { &w.workload_name });
        self.source_canonical_service = known(&w.canonical_name);
        self.source_canonical_revision = known(&w.canonical_revision);
        self.source_workload_namespace = known(&w.namespace);
        self.source_app = known(&w.canonical_name);
        self.source_version = known(&w.canonical_revision);
        self.source_cluster = known(&w.cluster_id);
        self
    }

    /// The source's identity from the mTLS handshake (the peer's certificate at the destination,
    /// the source workload's own certificate at the source); stays `unknown` for plaintext.
    pub fn with_source_principal(mut self, identity: &Identity) -> Self {
        self.source_principal = identity.to_string();
        self
    }

    pub fn with_destination(mut self, w: &Workload) -> Self {
        self.destination_workload =
            known(if w.workload_name.is_empty() { &w.name } else { &w.workload_name });
        self.destination_canonical_service = known(&w.canonical_name);
        self.destination_canonical_revision = known(&w.canonical_revision);
        self.destination_workload_namespace = known(&w.namespace);
        self.destination_principal = w.identity.to_string();
        self.destination_app = known(&w.canonical_name);
        self.destination_version = known(&w.canonical_revision);
        self.destination_cluster = known(&w.cluster_id);
        self
    }

    pub fn with_destination_service(mut self, s: &Service) -> Self {
        self.destination_service = known(&s.hostname);
        self.destination_service_namespace = known(&s.namespace);
        self.destination_service_name = known(&s.name);
        self
    }
}

impl Metrics {
    /// The counters and a registry exposing them under Istio's names.
    pub fn new() -> (Metrics, Registry) {
        let mut registry = Registry::default();
        let metrics = Metrics::default();
        metrics.register(&mut registry);
        (metrics, registry)
    }

    /// Registers the counters in `registry` under the `istio` prefix (prometheus-client appends
    /// `_total` to counters: `istio_tcp_connections_opened_total`, ...).
    pub fn register(&self, registry: &mut Registry) {
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            self.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            self.closed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            self.sent.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            self.received.clone(),
        );
    }

    /// Counts a connection opened; it is counted closed when the guard is dropped.
    pub fn connection_opened(&self, labels: ConnectionLabels) -> ConnectionGuard {
        self.opened.get_or_create(&labels).inc();
        let sent = self.sent.get_or_create(&labels).clone();
        let received = self.received.get_or_create(&labels).clone();
        ConnectionGuard { metrics: self.clone(), labels, sent, received }
    }

    /// Counts a connection refused by policy: opened with `-`, closed with `DENY` (see the
    /// module docs), no bytes.
    pub fn denied(&self, labels: ConnectionLabels) {
        let mut guard = self.connection_opened(labels);
        guard.set_response_flags(ResponseFlags::Deny);
    }
}

impl ConnectionGuard {
    /// Bytes written back to the client (the response direction).
    pub fn add_sent(&self, bytes: u64) {
        self.sent.inc_by(bytes);
    }

    /// Bytes read from the client (the request direction).
    pub fn add_received(&self, bytes: u64) {
        self.received.inc_by(bytes);
    }

    /// The flag the closed counter will carry (e.g. `CONNECT` when the upstream failed).
    pub fn set_response_flags(&mut self, flags: ResponseFlags) {
        self.labels.response_flags = flags;
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.closed.get_or_create(&self.labels).inc();
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        })
    }
}

impl ResponseFlags {
    /// The short name written in metrics and access logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
            ResponseFlags::NoHealthyUpstream => "UH",
            ResponseFlags::UpstreamConnectionFailure => "UF",
            ResponseFlags::UpstreamOverflow => "UO",
            ResponseFlags::NoRouteFound => "NR",
            ResponseFlags::NoClusterFound => "NC",
            ResponseFlags::UpstreamRetryLimitExceeded => "URX",
            ResponseFlags::UpstreamRequestTimeout => "UT",
            ResponseFlags::DelayInjected => "DI",
            ResponseFlags::FaultInjected => "FI",
            ResponseFlags::UpstreamConnectionTermination => "UC",
            ResponseFlags::UpstreamRemoteReset => "UR",
            ResponseFlags::LocalReset => "LR",
            ResponseFlags::DownstreamConnectionTermination => "DC",
            ResponseFlags::DownstreamProtocolError => "DPE",
            ResponseFlags::UpstreamProtocolError => "UPE",
            ResponseFlags::UnauthorizedExternalService => "UAEX",
            ResponseFlags::RateLimited => "RL",
            ResponseFlags::StreamIdleTimeout => "SI",
            ResponseFlags::DurationTimeout => "DT",
        }
    }
}

impl std::fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            SecurityPolicy::Unknown => UNKNOWN,
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
        })
    }
}

/// The registry in Prometheus' text exposition format (OpenMetrics flavour, ending `# EOF`).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        // Writing to a String does not fail; an encoder error would be a bug in a metric.
        tracing::error!(error = %e, "metrics could not be encoded");
    }
    out
}

/// Changes the log filter of a running process (the admin `/logging` endpoint).
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    current: std::sync::Arc<std::sync::Mutex<String>>,
}

/// The output format of the process's logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object a line.
    Json,
}

impl LogLevel {
    /// The filter in force, in `RUST_LOG` syntax.
    pub fn current(&self) -> String {
        self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces the filter (`RUST_LOG` syntax: `info`, `weft_core=debug,info`, ...).
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = EnvFilter::try_new(filter).map_err(|e| format!("log filter {filter:?}: {e}"))?;
        self.handle.reload(parsed).map_err(|e| format!("cannot change the log filter: {e}"))?;
        *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = filter.to_owned();
        Ok(())
    }
}

/// Sets up the process's logging once, for every Weft binary: the filter from `RUST_LOG` (else
/// `default`, e.g. `info`), written to stderr as plain lines or JSON. Returns the handle that changes the filter later. A second
/// call (a test running several proxies in one process) keeps the first subscriber and returns
/// a handle that changes nothing of it.
pub fn init_tracing(format: LogFormat, default: &str) -> LogLevel {
    let initial = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| default.into());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Plain => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).try_init()
        }
        LogFormat::Json => {
            registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).try_init()
        }
    };
    LogLevel { handle, current: std::sync::Arc::new(std::sync::Mutex::new(initial)) }
}

fn known(value: &str) -> String {
    if value.is_empty() { UNKNOWN } else { value }.to_owned()
}

#[cfg(test)]
mod tests;
