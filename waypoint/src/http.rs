//! One HTTP request through the waypoint: check its JWT and the authorization policies
//! ([`crate::security`]: 401 or 403 `RBAC: access denied`), normalize the path, route it ([`crate::route`]),
//! answer locally (redirect, direct response, no route) or choose an endpoint
//! ([`crate::balance`]) and forward it there over HBONE ([`crate::upstream`]), with the
//! route's rewrites and header changes, `x-forwarded-for` and `forwarded` naming the client;
//! WebSocket and other upgrades pass through. Every request is recorded in the metrics (and the
//! access log) when its response ends. Failures answer as Envoy does: 400 for a request that
//! cannot be routed, 404 NR, 503 NC/UH/UF/UC.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, LOCATION};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info};
use weft_core::cert_manager::CertificateSource;
use weft_core::state::Workload;
use weft_core::telemetry::{ConnectionLabels, Reporter, ResponseFlags, SecurityPolicy};

use crate::balance;
use crate::body::{Counted, OnEnd, Recorded};
use crate::fault;
use crate::metrics::{Finished, RequestLabels, RequestMetrics};
use crate::model::{AbortStatus, H2Upgrade, PortProtocol, Retries, Waypoint};
use crate::normalize::normalize_path;
use crate::proxy::{Ctx, Destination, InFlight, Stream};
use crate::replay::{Tee, MAX_REPLAY_BYTES};
use crate::route::{self, Connection, Decision, RequestHead};
use crate::security;
use crate::send::{self, Policies, Prepared, Via};
use crate::upstream;

/// Headers that belong to one hop and are not forwarded (RFC 9110 §7.6.1), plus HTTP/1's
/// framing; an upgrade keeps `connection` and `upgrade`.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "proxy-authorization",
];
const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
const X_REQUEST_ID: &str = "x-request-id";
const FORWARDED: &str = "forwarded";

/// A response of the waypoint's own.
type Body = upstream::Body;

/// What a request's record needs when its response ends.
pub struct Record {
    metrics: RequestMetrics,
    pub labels: RequestLabels,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    header_grpc_status: Option<String>,
    access: Option<AccessLine>,
    _in_flight: Option<InFlight>,
    /// Whatever must live as long as the request (limits' counts), dropped with the record.
    _held: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl Record {
    /// Keeps `guard` until the response ends.
    pub fn hold(&mut self, guard: Box<dyn std::any::Any + Send + Sync>) {
        self._held.push(guard);
    }

    /// The request (now: its attempt) goes to `workload` at `address`.
    pub fn to<S>(&mut self, ctx: &Ctx<S>, workload: &Workload, address: SocketAddr) {
        self.labels.connection = self.labels.connection.clone().with_destination(workload);
        self._in_flight = Some(ctx.load.start(&workload.uid));
        if let Some(access) = &mut self.access {
            access.upstream = Some(address);
        }
    }
}

/// The access log line's fields (Envoy's default format's, as JSON keys when logs are JSON).
struct AccessLine {
    method: String,
    path: String,
    authority: String,
    protocol: &'static str,
    upstream: Option<SocketAddr>,
    route: String,
    client: SocketAddr,
    /// The policy that denied the request (`<namespace>.<name>`), or the AUDIT policies that
    /// matched it.
    policy: String,
}

impl OnEnd for Record {
    fn ended(self: Box<Self>, response_bytes: u64, grpc_status: Option<String>) {
        let mut labels = self.labels;
        labels.grpc_response_status = grpc_status.or(self.header_grpc_status).unwrap_or_default();
        let finished = Finished {
            duration: self.started.elapsed(),
            request_bytes: self.request_bytes.load(Ordering::Relaxed),
            response_bytes,
            labels,
        };
        self.metrics.record(&finished);
        if let Some(a) = self.access {
            let l = &finished.labels;
            info!(target: "access",
                method = a.method, path = a.path, authority = a.authority, protocol = a.protocol,
                response_code = l.response_code, response_flags = l.connection.response_flags.as_str(),
                grpc_status = l.grpc_response_status, bytes_received = finished.request_bytes,
                bytes_sent = finished.response_bytes, duration_ms = finished.duration.as_millis() as u64,
                upstream_host = a.upstream.map(|u| u.to_string()).unwrap_or_else(|| "-".into()),
                route_name = a.route, downstream_remote_address = %a.client, policy = a.policy,
                source_principal = l.connection.source_principal,
                destination_service = l.connection.destination_service, "request");
        }
    }
}

/// Handles one request of `stream` (see the module docs).
pub async fn handle<S: CertificateSource>(
    ctx: Arc<Ctx<S>>,
    stream: Arc<Stream>,
    request: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let request_bytes = Arc::new(AtomicU64::new(0));
    let grpc = is_grpc(request.headers());
    let mut labels = ConnectionLabels::new(Reporter::Waypoint, SecurityPolicy::MutualTls);
    labels.request_protocol = if grpc { "grpc" } else { "http" }.to_owned();
    if let Some(source) = &stream.source {
        labels = labels.with_source(source);
    }
    labels = labels.with_source_principal(&stream.peer_identity);
    if let Destination::Service { service, .. } = &stream.destination {
        labels = labels.with_destination_service(service);
    } else if let Destination::Workload { workload, .. } = &stream.destination {
        labels = labels.with_destination(workload);
    }
    let access = ctx.config.access_log.then(|| AccessLine {
        method: request.method().to_string(),
        path: request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        authority: authority_of(&request).unwrap_or_default().to_owned(),
        protocol: if request.version() == Version::HTTP_2 { "HTTP/2" } else { "HTTP/1.1" },
        upstream: None,
        route: String::new(),
        client: stream.client,
        policy: String::new(),
    });
    let mut record = Record {
        metrics: ctx.requests.clone(),
        labels: RequestLabels { connection: labels, response_code: 0, grpc_response_status: String::new() },
        started,
        request_bytes: request_bytes.clone(),
        header_grpc_status: None,
        access,
        _in_flight: None,
        _held: Vec::new(),
    };
    let response = match forward(&ctx, &stream, request, request_bytes, &mut record).await {
        Ok(response) => response,
        Err(local) => (*local).into_response(&mut record),
    };
    record.labels.response_code = response.status().as_u16();
    record.header_grpc_status =
        response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Recorded::new(body, Box::new(record)).boxed())
}

/// A response the waypoint makes itself.
pub struct Local {
    pub status: StatusCode,
    pub flags: ResponseFlags,
    pub body: Bytes,
    pub headers: HeaderMap,
    /// Why, for the debug log.
    pub reason: String,
}

impl Local {
    pub fn new(
        status: StatusCode,
        flags: ResponseFlags,
        body: &'static str,
        reason: impl Into<String>,
    ) -> Box<Local> {
        Box::new(Local {
            status,
            flags,
            body: Bytes::from_static(body.as_bytes()),
            headers: HeaderMap::new(),
            reason: reason.into(),
        })
    }

    fn into_response(self, record: &mut Record) -> Response<Body> {
        // A delay injected before a local answer keeps its flag unless the answer has one.
        if self.flags != ResponseFlags::None || record.labels.connection.response_flags == ResponseFlags::None
        {
            record.labels.connection.response_flags = self.flags;
        }
        debug!(status = %self.status, flags = self.flags.as_str(), reason = self.reason, "local response");
        let mut response = Response::new(full(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

/// Routes and forwards `request`, or says which local response answers it.
async fn forward<S: CertificateSource>(
    ctx: &Arc<Ctx<S>>,
    stream: &Arc<Stream>,
    request: Request<Incoming>,
    request_bytes: Arc<AtomicU64>,
    record: &mut Record,
) -> Result<Response<Body>, Box<Local>> {
    let waypoint = ctx.waypoint.load();
    let Some(config) = waypoint.as_ref() else {
        return Err(Local::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlags::NoRouteFound,
            "",
            "no configuration",
        ));
    };
    let state = ctx.state.load();
    let request = secure(ctx, stream, config, request, record).await?;
    let path = request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let path = if request.method() == Method::CONNECT {
        // CONNECT (to tunnel TCP through an HTTP proxy) is not a route Istio's waypoint serves.
        return Err(Local::new(StatusCode::NOT_FOUND, ResponseFlags::NoRouteFound, "", "CONNECT"));
    } else {
        normalize_path(path).map_err(|e| {
            Local::new(
                StatusCode::BAD_REQUEST,
                ResponseFlags::DownstreamProtocolError,
                "Bad Request",
                e.to_string(),
            )
        })?
    };
    let authority = authority_of(&request).unwrap_or_default().to_owned();
    let head = RequestHead {
        method: request.method().as_str(),
        scheme: "http",
        authority: &authority,
        path: &path,
        headers: request.headers(),
    };

    let routed = match &stream.destination {
        // A workload's own traffic: no service routes, to the workload itself.
        Destination::Workload { .. } => None,
        Destination::Service { service, port } => {
            let conn = Connection {
                source: Some(&stream.peer_identity),
                source_labels: None,
                service: &service.hostname,
                port: *port,
            };
            match route::route(config, &head, &conn, rand::random()) {
                Decision::NoRoute(no) => {
                    return Err(Local::new(no.status(), no.flags(), "", no.to_string()));
                }
                Decision::DirectResponse { status, body, headers, .. } => {
                    let mut local = Local::new(status, ResponseFlags::None, "", "direct response");
                    local.body = Bytes::copy_from_slice(body);
                    headers.apply_response(&mut local.headers);
                    return Err(local);
                }
                Decision::Redirect { status, location, headers, .. } => {
                    let mut local = Local::new(status, ResponseFlags::None, "", "redirect");
                    if let Ok(value) = HeaderValue::from_str(&location) {
                        local.headers.insert(LOCATION, value);
                    }
                    headers.apply_response(&mut local.headers);
                    return Err(local);
                }
                Decision::Forward(fwd) => Some(fwd),
            }
        }
    };
    let route = routed.as_ref().and_then(|fwd| fwd.route);
    if let Some(fwd) = &routed {
        // The destination's labels now that it is known.
        if let Some(svc) = state.service_by_key(&format!("{}/{}", fwd.service.namespace, fwd.target.host)) {
            record.labels.connection = record.labels.connection.clone().with_destination_service(svc);
        }
        if let Some(access) = &mut record.access {
            access.route = fwd.route.map(|r| r.name.clone()).unwrap_or_default();
        }
    }

    // Fault injection, before anything goes upstream.
    let injection =
        route.map(|r| fault::decide(&r.fault, || rand::random::<f64>() * 100.0)).unwrap_or_default();
    if let Some(delay) = injection.delay {
        record.labels.connection.response_flags = ResponseFlags::DelayInjected;
        tokio::time::sleep(delay).await;
    }
    if let Some(abort) = injection.abort {
        return Err(aborted(abort, is_grpc(request.headers())));
    }

    let upgrade = is_upgrade(request.headers()) && request.version() == Version::HTTP_11;
    let downstream_version = request.version();
    let mut request = request;
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let changes = routed.as_ref().map(|fwd| fwd.headers).unwrap_or_default();
    changes.apply_request(&mut parts.headers);
    let new_authority = routed.as_ref().and_then(|fwd| fwd.authority).map(str::to_owned);
    let new_path = routed.as_ref().and_then(|fwd| fwd.path.clone());
    let authority = new_authority.unwrap_or(authority);
    let path = new_path.unwrap_or(path);
    add_forwarding(&mut parts.headers, stream.client);
    // Istio's choice: a port declared HTTP/2 (or gRPC) goes upstream over HTTP/2, one declared
    // HTTP over HTTP/1.1 (whatever the client spoke); a detected one as the client spoke. The
    // DestinationRule may say otherwise: `useClientProtocol`, or `h2UpgradePolicy: UPGRADE`
    // (an HTTP/1.1 request goes upstream as HTTP/2; never an upgrade, which HTTP/2 cannot carry).
    let pool = routed.as_ref().and_then(|fwd| {
        let subset = fwd.target.subset.and_then(|name| config.subset(fwd.target.host, name));
        balance::traffic_policy(config, fwd.target.host, subset)?.connection_pool(fwd.target.port)
    });
    let upstream_h2 = match (stream.declared, pool) {
        (_, Some(p)) if p.use_client_protocol => downstream_version == Version::HTTP_2,
        (_, Some(p)) if p.h2_upgrade_policy == H2Upgrade::Upgrade && !upgrade => true,
        (Some(PortProtocol::Http2), _) => true,
        (Some(PortProtocol::Http), _) => false,
        _ => downstream_version == Version::HTTP_2,
    };
    let prepared = Prepared::new(parts, authority, path, upstream_h2).map_err(bad_request)?;
    let (body, recording) = Tee::new(Counted::new(body, request_bytes).boxed(), MAX_REPLAY_BYTES);
    let via = match (&stream.destination, &routed) {
        (_, Some(fwd)) => Via::Service(fwd),
        (Destination::Workload { workload, port }, None) => {
            Via::Workload(workload, SocketAddr::new(stream.original.ip(), *port))
        }
        (Destination::Service { .. }, None) => {
            return Err(Local::new(StatusCode::NOT_FOUND, ResponseFlags::NoRouteFound, "", "no route"));
        }
    };
    let policies = Policies {
        retries: route.map_or_else(|| Retries::Default.policy(), |r| r.retries.policy()),
        timeout: route.and_then(|r| r.timeout),
        mirrors: route.map_or(&[], |r| r.mirrors.as_slice()),
        upgrade,
    };
    let response =
        send::forward(ctx, stream, config, &state, via, prepared, body.boxed(), recording, policies, record)
            .await?;
    let mut response = response;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = downstream_upgrade {
            let upstream = hyper::upgrade::on(&mut response);
            tokio::spawn(splice_upgraded(downstream, upstream));
        }
    }
    let (mut parts, body) = response.into_parts();
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(&mut parts.headers, false);
    }
    changes.apply_response(&mut parts.headers);
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The security stage ([`security::check`]): the request as it goes on (a token may be gone,
/// claims copied into headers), or the 401 or 403 that answers it. Skipped when nothing
/// applies.
async fn secure<S: CertificateSource>(
    ctx: &Arc<Ctx<S>>,
    stream: &Stream,
    config: &Waypoint,
    request: Request<Incoming>,
    record: &mut Record,
) -> Result<Request<Incoming>, Box<Local>> {
    let (service, port) = match &stream.destination {
        Destination::Service { service, port } => (config.services.get(&service.hostname), *port),
        Destination::Workload { port, .. } => (None, *port),
    };
    if config.security.is_empty() && service.is_none_or(|s| s.security.is_empty()) {
        return Ok(request);
    }
    let grpc = is_grpc(request.headers());
    let peer = security::Peer {
        identity: &stream.peer_identity,
        client: stream.client,
        destination: SocketAddr::new(stream.original.ip(), port),
    };
    let (mut parts, body) = request.into_parts();
    if let Some(access) = &mut record.access {
        // A token may ride in the query (`access_token`, `fromParams`): the log never shows it.
        access.path = parts.uri.path().to_owned();
    }
    match security::check(config, service, &ctx.jwks, &peer, &mut parts).await {
        Ok(allowed) => {
            if let Some(access) = &mut record.access {
                access.policy = allowed.audited.join(",");
            }
            for policy in &allowed.audited {
                info!(target: "audit", policy, principal = allowed.principal.as_deref().unwrap_or("-"),
                    method = %parts.method, path = parts.uri.path(), client = %stream.client, "request audited");
            }
            Ok(Request::from_parts(parts, body))
        }
        Err(refused) => {
            if let Some(access) = &mut record.access {
                access.policy = refused.policy.clone().unwrap_or_default();
            }
            debug!(target: "authz", status = refused.status.as_u16(), policy = refused.policy.as_deref().unwrap_or("-"),
                reason = refused.reason, method = %parts.method, path = parts.uri.path(), client = %stream.client,
                "request refused");
            let code = if refused.status == StatusCode::UNAUTHORIZED { 16 } else { 7 };
            let mut local = Local::new(refused.status, ResponseFlags::None, "", refused.reason);
            if grpc {
                local.status = StatusCode::OK;
                local.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                local.headers.insert("grpc-status", HeaderValue::from(code));
                if let Ok(message) = HeaderValue::from_str(&refused.body) {
                    local.headers.insert("grpc-message", message);
                }
            } else {
                local.body = Bytes::from(refused.body);
                local.headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            Err(local)
        }
    }
}

/// The local answer to a request aborted by fault injection: the status with Envoy's body, or
/// for gRPC a trailers-only response with the status.
fn aborted(abort: AbortStatus, grpc: bool) -> Box<Local> {
    match abort {
        AbortStatus::Http(status) => {
            Local::new(status, ResponseFlags::FaultInjected, fault::ABORT_BODY, "fault abort")
        }
        AbortStatus::Grpc(code) => {
            let mut local = Local::new(StatusCode::OK, ResponseFlags::FaultInjected, "", "fault abort");
            local.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            local.headers.insert("grpc-status", HeaderValue::from(code));
            local.headers.insert("grpc-message", HeaderValue::from_static("fault filter abort"));
            if !grpc {
                debug!("gRPC abort of a request that is not gRPC");
            }
            local
        }
    }
}

/// The request's authority: `:authority` (HTTP/2, or an absolute HTTP/1 target), else `Host`.
fn authority_of<B>(request: &Request<B>) -> Option<&str> {
    request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(HOST).and_then(|h| h.to_str().ok()))
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/grpc"))
}

/// An HTTP/1.1 upgrade request (WebSocket): `Connection: upgrade` and an `Upgrade` header.
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE)
        && headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Removes hop-by-hop headers, and those `Connection` names; an upgrade keeps `connection:
/// upgrade` and `upgrade`. `te: trailers` stays (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let te_trailers =
        headers.get(http::header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in named {
        if !(upgrade && name == http::header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        if upgrade && (name == "connection" || name == "upgrade") {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
}

/// `x-forwarded-for` (the client appended), `forwarded` (a `for=` element appended),
/// `x-forwarded-proto` and an `x-request-id` when the request has none, as Envoy adds them.
fn add_forwarding(headers: &mut HeaderMap, client: SocketAddr) {
    let ip = client.ip();
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {ip}"),
        _ => ip.to_string(),
    };
    let element = if ip.is_ipv6() { format!("for=\"[{ip}]\"") } else { format!("for={ip}") };
    let forwarded = match headers.get(FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {element}"),
        _ => element,
    };
    for (name, value) in [(X_FORWARDED_FOR, xff), (FORWARDED, forwarded)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if !headers.contains_key(X_REQUEST_ID) {
        if let Ok(id) = HeaderValue::from_str(&request_id()) {
            headers.insert(X_REQUEST_ID, id);
        }
    }
}

/// A random UUID (version 4), as Envoy generates `x-request-id`.
fn request_id() -> String {
    let bits: u128 = rand::random();
    let bits = (bits & !(0xf000 << 64) | (0x4000 << 64)) & !(0xc000 << 48) | (0x8000 << 48);
    let hex = format!("{bits:032x}");
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

fn bad_request(reason: &'static str) -> Box<Local> {
    Local::new(StatusCode::BAD_REQUEST, ResponseFlags::DownstreamProtocolError, "Bad Request", reason)
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// Once both sides have switched protocols, copies bytes between them until both are done.
async fn splice_upgraded(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::join!(downstream, upstream) {
        (Ok(downstream), Ok(upstream)) => {
            let (mut downstream, mut upstream) = (TokioIo::new(downstream), TokioIo::new(upstream));
            match weft_core::hbone::copy_bidirectional(&mut downstream, &mut upstream).await {
                Ok((sent, received)) => debug!(sent, received, "upgraded connection done"),
                Err(e) => debug!(error = %e, "upgraded connection ended with an error"),
            }
        }
        (Err(e), _) | (_, Err(e)) => debug!(error = %e, "upgrade did not complete"),
    }
}
