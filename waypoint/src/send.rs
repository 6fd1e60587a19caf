//! Sending a routed request upstream, as Envoy's router does for Istio's waypoint: attempts
//! under the route's retry policy and timeouts, within the destination's circuit breakers,
//! each to an endpoint [`crate::balance`] picks (ejected endpoints left out, untried ones
//! preferred on a retry), each outcome reported to outlier detection; and mirrored copies.
//!
//! - The route `timeout` (none by default) runs from the first attempt to the response
//!   headers, retries and backoff included: on expiry 504 `upstream request timeout`, flag UT,
//!   and the attempt in flight is cancelled (its stream reset). Envoy's timer also covers the
//!   response body; here it stops at the headers, so a streaming response is never cut.
//! - `perTryTimeout` bounds each attempt the same way; an attempt past it is retried when the
//!   policy retries it ([`retry::retriable`]), else answered 504 UT.
//! - A retry is sent when the outcome is retriable, attempts are left (`attempts` retries
//!   after the first try), the request body can be replayed ([`crate::replay`]), and the
//!   cluster's `maxRetries` are not all in flight (else `upstream_rq_retry_overflow`). Between
//!   attempts Envoy's jittered backoff ([`retry::backoff`]). When attempts run out on a
//!   retriable outcome the last response (or failure) is answered with flag URX.
//! - `http2MaxRequests` caps the cluster's requests in flight and `http1MaxPendingRequests` its
//!   requests waiting for a connection: over either, 503 UO at once, never retried.
//! - WebSocket and other upgrades are sent once: their body is the upgraded connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, info};
use weft_core::cert_manager::CertificateSource;
use weft_core::state::{Endpoint as MeshEndpoint, ProxyState, Workload};
use weft_core::telemetry::ResponseFlags;

use crate::balance::{self, Upstream};
use crate::cluster::{Cluster, ClusterKey};
use crate::http::{Local, Record};
use crate::mirror;
use crate::model::{Mirror, RetryPolicy, TrafficPolicy, Waypoint};
use crate::outlier::Outcome as OutlierOutcome;
use crate::proxy::{Ctx, Destination, Stream};
use crate::replay::Recording;
use crate::retry::{self, Failure, Outcome, ResponseView};
use crate::route::{Forward, Target};
use crate::upstream::{self, ConnectReport, Endpoint, Limits, UpstreamError};

const RESET_BODY: &str = "upstream connect error or disconnect/reset before headers. reset reason: ";

/// A request ready to go upstream, sent again for each attempt: its head after the route's
/// changes, the authority and path to send, and the protocol.
pub struct Prepared {
    pub parts: Parts,
    pub authority: String,
    /// The path with its query.
    pub path: String,
    /// What goes on the wire: `http://authority/path` for HTTP/2, the path for HTTP/1.1.
    pub uri: Uri,
    pub http2: bool,
}

impl Prepared {
    /// A request head to send over HTTP/2 (`http2`) or HTTP/1.1, or why it cannot be sent.
    pub fn new(parts: Parts, authority: String, path: String, http2: bool) -> Result<Prepared, &'static str> {
        let uri = if http2 {
            format!("http://{authority}{path}")
                .parse::<Uri>()
                .map_err(|_| "the authority or path is not a valid URI")?
        } else {
            path.parse::<Uri>().map_err(|_| "the rewritten path is not a valid URI")?
        };
        Ok(Prepared { parts, authority, path, uri, http2 })
    }
}

/// How a routed request is sent: the route's policies.
pub struct Policies<'a> {
    pub retries: Option<RetryPolicy>,
    pub timeout: Option<Duration>,
    pub mirrors: &'a [Mirror],
    /// An HTTP/1.1 upgrade: sent once.
    pub upgrade: bool,
}

/// Where a request goes: a routed service target, balanced over its endpoints, or one
/// workload's own traffic (to that workload, under Istio's default policies).
#[derive(Clone, Copy)]
pub enum Via<'a> {
    Service(&'a Forward<'a>),
    Workload(&'a Arc<Workload>, SocketAddr),
}

/// Where an attempt went, and how many endpoints the cluster had to pick from.
struct Picked {
    workload: Arc<Workload>,
    address: SocketAddr,
    hosts: usize,
}

/// Sends `prepared` to `forward`'s target with `body` (see the module docs); records the
/// destination and the flags in `record`.
#[allow(clippy::too_many_arguments)]
pub async fn forward<S: CertificateSource>(
    ctx: &Arc<Ctx<S>>,
    stream: &Arc<Stream>,
    config: &Waypoint,
    state: &ProxyState,
    via: Via<'_>,
    prepared: Prepared,
    body: upstream::Body,
    recording: Recording,
    policies: Policies<'_>,
    record: &mut Record,
) -> Result<Response<Incoming>, Box<Local>> {
    let (key, policy) = match via {
        Via::Service(forward) => (cluster_key(&forward.target), traffic_policy(config, &forward.target)),
        Via::Workload(_, address) => {
            (ClusterKey { host: address.ip().to_string(), subset: None, port: address.port() }, None)
        }
    };
    let port = key.port;
    let cluster = ctx.clusters.get(&key);
    let pool = policy.and_then(|p| p.connection_pool(port));
    let outlier_config = policy.and_then(|p| p.outlier_detection(port)).cloned();
    let Some(_active) =
        cluster.start_request(pool.and_then(|p| p.http2_max_requests).map(|n| u64::from(n.get())))
    else {
        return Err(overflow(&key, "http2MaxRequests"));
    };
    let limits = Limits::new(key.name(), pool);
    let started = Instant::now();
    let deadline = policies.timeout.map(|t| started + t);
    let retry_policy = if policies.upgrade { None } else { policies.retries };

    if let Via::Service(forward) = via {
        for mirror in mirror::pick(policies.mirrors, || rand::random::<f64>() * 100.0) {
            send_mirror(ctx, stream, config, state, forward, mirror, &prepared, recording.clone());
        }
    }

    let mut body = Some(body);
    let mut tried: Vec<String> = Vec::new();
    let mut retries = 0u32;
    let mut _retry = None;
    loop {
        let picked =
            pick(ctx, stream, config, state, via, &prepared, &cluster, outlier_config.as_ref(), &tried)?;
        tried.push(picked.workload.uid.clone());
        record.to(ctx, &picked.workload, picked.address);
        let endpoint = Endpoint {
            address: picked.address,
            identity: picked.workload.identity.clone(),
            client: stream.client.ip(),
            service: match &stream.destination {
                Destination::Service { service, .. } => Some(service.hostname.clone()),
                Destination::Workload { .. } => None,
            },
            traceparent: stream.traceparent.clone(),
        };
        let cert = ctx.certificate().await.map_err(|e| {
            Local::new(StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::UpstreamConnectionFailure, "", e)
        })?;
        let per_try = retry_policy.as_ref().and_then(|p| p.per_try_timeout).map(|t| Instant::now() + t);
        let attempt_deadline = match (deadline, per_try) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut report = ConnectReport::default();
        let attempt = async {
            let connection =
                ctx.upstreams.connect(cert, &endpoint, prepared.http2, &limits, &mut report).await?;
            let body = match body.take() {
                Some(body) => body,
                // Checked before the retry was decided.
                None => recording.replay().unwrap_or_else(empty),
            };
            connection.send(build(&prepared, body)).await
        };
        let result = match attempt_deadline {
            Some(at) => tokio::time::timeout_at(at, attempt).await.ok(),
            None => Some(attempt.await),
        };
        if report.connection_limit_reached {
            cluster.metrics.cx_overflow.get_or_create(&cluster.labels).inc();
        }

        let outcome = match &result {
            None if deadline.is_some_and(|d| Instant::now() >= d) => {
                cluster.metrics.timeout.get_or_create(&cluster.labels).inc();
                report_outlier(
                    &cluster,
                    outlier_config.as_ref(),
                    &picked,
                    OutlierOutcome::LocalOriginFailure,
                );
                return Err(timeout());
            }
            None => {
                cluster.metrics.per_try_timeout.get_or_create(&cluster.labels).inc();
                Outcome::Failure(Failure::PerTryTimeout)
            }
            Some(Err(UpstreamError::Overflow { cluster: name, limit })) => {
                cluster.metrics.pending_overflow.get_or_create(&cluster.labels).inc();
                return Err(overflow_named(name, limit));
            }
            Some(Err(e)) if e.is_connect_failure() => Outcome::Failure(Failure::ConnectFailure),
            Some(Err(e)) if e.is_refused_stream() => Outcome::Failure(Failure::RefusedStream),
            Some(Err(_)) => Outcome::Failure(Failure::Reset),
            Some(Ok(response)) => Outcome::Response(ResponseView {
                status: response.status().as_u16(),
                headers: response.headers(),
            }),
        };
        report_outlier(
            &cluster,
            outlier_config.as_ref(),
            &picked,
            match outcome {
                Outcome::Response(r) => OutlierOutcome::Response(r.status),
                Outcome::Failure(_) => OutlierOutcome::LocalOriginFailure,
            },
        );
        let retriable =
            retry_policy.as_ref().is_some_and(|p| retry::retriable(p, &outcome, &prepared.parts.headers));
        let mut flags = ResponseFlags::None;
        if retriable {
            let policy = retry_policy.as_ref().expect("retriable only under a policy");
            let replayable = body.is_some() || recording.replay().is_some();
            if retries >= policy.attempts.get() {
                cluster.metrics.retry_limit_exceeded.get_or_create(&cluster.labels).inc();
                flags = ResponseFlags::UpstreamRetryLimitExceeded;
            } else if !replayable {
                debug!("not retried: the request body was too large to keep or was not all sent");
            } else if let Some(guard) = cluster.retry_budget(pool.and_then(|p| p.max_retries)).try_start() {
                retries += 1;
                _retry = Some(guard);
                cluster.metrics.retry.get_or_create(&cluster.labels).inc();
                let pause = retry::backoff(policy.backoff, retries, rand::random());
                if deadline.is_some_and(|d| Instant::now() + pause >= d) {
                    if let Some(d) = deadline {
                        tokio::time::sleep_until(d).await;
                    }
                    cluster.metrics.timeout.get_or_create(&cluster.labels).inc();
                    return Err(timeout());
                }
                debug!(retry = retries, ?pause, endpoint = %picked.address, "retrying");
                tokio::time::sleep(pause).await;
                continue;
            } else {
                cluster.metrics.retry_overflow.get_or_create(&cluster.labels).inc();
            }
        }
        return match result {
            Some(Ok(response)) => {
                // A flag of the attempts (URX) wins over one set before them (DI).
                if flags != ResponseFlags::None {
                    record.labels.connection.response_flags = flags;
                }
                Ok(response)
            }
            Some(Err(e)) => Err(upstream_failure(&e, picked.address, flags)),
            None => {
                let mut local = timeout();
                if flags != ResponseFlags::None {
                    local.flags = flags;
                }
                Err(local)
            }
        };
    }
}

/// Picks the attempt's endpoint: ejected endpoints are left out, and those already `tried`
/// when others remain.
#[allow(clippy::too_many_arguments)]
fn pick<S: CertificateSource>(
    ctx: &Arc<Ctx<S>>,
    stream: &Stream,
    config: &Waypoint,
    state: &ProxyState,
    via: Via<'_>,
    prepared: &Prepared,
    cluster: &Cluster,
    outlier: Option<&crate::model::OutlierDetection>,
    tried: &[String],
) -> Result<Picked, Box<Local>> {
    let forward = match via {
        Via::Service(forward) => forward,
        Via::Workload(workload, address) => {
            return Ok(Picked { workload: Arc::clone(workload), address, hosts: 1 })
        }
    };
    let breq = balance::Request {
        headers: &prepared.parts.headers,
        path: &prepared.path,
        source_ip: stream.client.ip(),
        original_destination: stream.original,
    };
    let mut hosts = 0;
    let mut filter = |candidates: &mut Vec<MeshEndpoint>| {
        hosts = candidates.len();
        if outlier.is_some() {
            let all = std::mem::take(candidates);
            *candidates = cluster
                .outlier(outlier, Instant::now(), |d| d.keep(all, |e: &MeshEndpoint| e.workload.uid.as_str()))
                .unwrap_or_default();
        }
        if !tried.is_empty() {
            let tried: Vec<&str> = tried.iter().map(String::as_str).collect();
            let keep = retry::prefer_untried(candidates, &tried, |e| e.workload.uid.as_str());
            if keep.len() < candidates.len() {
                let all = std::mem::take(candidates);
                *candidates =
                    all.into_iter().enumerate().filter(|(i, _)| keep.contains(i)).map(|(_, e)| e).collect();
            }
        }
    };
    let chosen = balance::choose(config, state, forward, &breq, &mut ctx.load.view_filtered(&mut filter));
    let upstream = chosen.map_err(|e| {
        let body = if e.flags() == ResponseFlags::NoHealthyUpstream { "no healthy upstream" } else { "" };
        Local::new(e.status(), e.flags(), body, e.to_string())
    })?;
    match upstream {
        Upstream::Endpoint { endpoint, address } => {
            Ok(Picked { workload: endpoint.workload, address, hosts })
        }
        Upstream::OriginalDestination(address) => match state.workload_by_ip(address.ip()) {
            Some(w) => Ok(Picked { workload: Arc::clone(w), address, hosts: 1 }),
            None => Err(Local::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlags::NoHealthyUpstream,
                "no healthy upstream",
                format!("PASSTHROUGH to {address}, which is no workload"),
            )),
        },
    }
}

/// Sends a copy of the request to `mirror`'s destination in a task of its own (see
/// [`crate::mirror`]); nothing here can delay or fail the primary.
#[allow(clippy::too_many_arguments)]
fn send_mirror<S: CertificateSource>(
    ctx: &Arc<Ctx<S>>,
    stream: &Arc<Stream>,
    config: &Waypoint,
    state: &ProxyState,
    forward: &Forward<'_>,
    mirror: &Mirror,
    prepared: &Prepared,
    recording: Recording,
) {
    let target = Target {
        host: &mirror.destination.host,
        subset: mirror.destination.subset.as_deref(),
        port: mirror.destination.port.unwrap_or(forward.target.port),
    };
    let key = cluster_key(&target);
    let cluster = ctx.clusters.get(&key);
    let Ok(permit) = ctx.mirrors.clone().try_acquire_owned() else {
        cluster.metrics.mirror_overflow.get_or_create(&cluster.labels).inc();
        return;
    };
    let shadow =
        Forward { target, route: None, path: None, authority: None, headers: Default::default(), ..*forward };
    let picked = match pick(ctx, stream, config, state, Via::Service(&shadow), prepared, &cluster, None, &[])
    {
        Ok(picked) => picked,
        Err(local) => {
            debug!(mirror = %key.name(), reason = local.reason, "mirror not sent");
            return;
        }
    };
    cluster.metrics.mirror.get_or_create(&cluster.labels).inc();
    let limits =
        Limits::new(key.name(), traffic_policy(config, &target).and_then(|p| p.connection_pool(target.port)));
    let copy = match Prepared::new(
        clone_parts(&prepared.parts),
        mirror::shadow_authority(&prepared.authority),
        prepared.path.clone(),
        prepared.http2,
    ) {
        Ok(copy) => copy,
        Err(e) => {
            debug!(mirror = %key.name(), reason = e, "mirror not sent");
            return;
        }
    };
    let endpoint = Endpoint {
        address: picked.address,
        identity: picked.workload.identity.clone(),
        client: stream.client.ip(),
        service: Some(key.host.clone()),
        traceparent: stream.traceparent.clone(),
    };
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        let _permit = permit;
        let sent = async {
            let body = recording.complete().await.ok_or("the request body was not kept")?;
            let cert = ctx.certificate().await?;
            let mut report = ConnectReport::default();
            let connection = ctx
                .upstreams
                .connect(cert, &endpoint, copy.http2, &limits, &mut report)
                .await
                .map_err(|e| e.to_string())?;
            let response = connection.send(build(&copy, body)).await.map_err(|e| e.to_string())?;
            let status = response.status();
            // Read to the end, so the connection can be reused; the body is discarded.
            let _ = response.into_body().collect().await;
            Ok::<_, String>(status)
        };
        match tokio::time::timeout(MIRROR_TIMEOUT, sent).await {
            Ok(Ok(status)) => debug!(%status, "mirror answered"),
            Ok(Err(e)) => debug!(error = %e, "mirror failed"),
            Err(_) => debug!("mirror timed out"),
        }
    });
}

/// The longest a mirrored request may take before it is abandoned (its slot freed).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// The request for one attempt: origin form and `Host` for HTTP/1.1, an absolute URI for
/// HTTP/2.
fn build(prepared: &Prepared, body: upstream::Body) -> Request<upstream::Body> {
    let mut parts = clone_parts(&prepared.parts);
    parts.uri = prepared.uri.clone();
    if prepared.http2 {
        parts.version = Version::HTTP_2;
        parts.headers.remove(HOST);
    } else {
        parts.version = Version::HTTP_11;
        if let Ok(host) = HeaderValue::from_str(&prepared.authority) {
            parts.headers.insert(HOST, host);
        }
    }
    Request::from_parts(parts, body)
}

/// A copy of a request head (extensions, such as a pending upgrade, are not copied).
fn clone_parts(parts: &Parts) -> Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

fn empty() -> upstream::Body {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed()
}

fn cluster_key(target: &Target<'_>) -> ClusterKey {
    ClusterKey { host: target.host.to_owned(), subset: target.subset.map(str::to_owned), port: target.port }
}

fn traffic_policy<'c>(config: &'c Waypoint, target: &Target<'_>) -> Option<&'c TrafficPolicy> {
    let subset = target.subset.and_then(|name| config.subset(target.host, name));
    balance::traffic_policy(config, target.host, subset)
}

fn report_outlier(
    cluster: &Cluster,
    config: Option<&crate::model::OutlierDetection>,
    picked: &Picked,
    outcome: OutlierOutcome,
) {
    if config.is_none() {
        return;
    }
    let ejected = cluster.outlier(config, Instant::now(), |d| {
        let now = Instant::now();
        // A response means the connection held: with local-origin errors counted apart, that
        // success resets their count (the detector ignores it otherwise).
        let connected = match outcome {
            OutlierOutcome::Response(_) => {
                d.record(&picked.workload.uid, OutlierOutcome::LocalOriginSuccess, now, picked.hosts)
            }
            _ => None,
        };
        d.record(&picked.workload.uid, outcome, now, picked.hosts).or(connected)
    });
    if let Some(Some(ejection)) = ejected {
        cluster.metrics.ejections_enforced.get_or_create(&cluster.labels).inc();
        info!(endpoint = %picked.address, cluster = cluster.labels.cluster_name, ?ejection, "endpoint ejected");
    }
}

fn timeout() -> Box<Local> {
    Local::new(
        StatusCode::GATEWAY_TIMEOUT,
        ResponseFlags::UpstreamRequestTimeout,
        "upstream request timeout",
        "route timeout",
    )
}

fn overflow(key: &ClusterKey, limit: &str) -> Box<Local> {
    overflow_named(&key.name(), limit)
}

fn overflow_named(cluster: &str, limit: &str) -> Box<Local> {
    let mut local = Local::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlags::UpstreamOverflow,
        "",
        format!("{cluster}: {limit} reached"),
    );
    local.body = Bytes::from_static(
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
    );
    local
}

fn upstream_failure(e: &UpstreamError, address: SocketAddr, flags: ResponseFlags) -> Box<Local> {
    let (flag, reason) = if e.is_connect_failure() {
        (ResponseFlags::UpstreamConnectionFailure, "connection failure")
    } else if e.is_refused_stream() {
        (ResponseFlags::UpstreamRemoteReset, "remote refused stream reset")
    } else {
        (ResponseFlags::UpstreamConnectionTermination, "connection termination")
    };
    info!(%address, error = %e, "upstream request failed");
    let flags = if flags == ResponseFlags::None { flag } else { flags };
    let mut local = Local::new(StatusCode::SERVICE_UNAVAILABLE, flags, "", e.to_string());
    local.body = Bytes::from(format!("{RESET_BODY}{reason}"));
    local
}
