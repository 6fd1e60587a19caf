//! `weft-app`: the workload the local cluster's pods run, like Istio's httpbin/echo samples.
//! On each `--http` port, HTTP/1.1 and prior-knowledge HTTP/2 (h2c): `GET /<anything>` (`/get`
//! included) answers JSON saying who answered (pod, namespace, version) and what it saw (the
//! caller's address as this socket saw it, method, path, host, protocol, headers),
//! `/status/<code>` answers that status, `/bytes/<n>` answers `n` bytes (at most [`MAX_BYTES`];
//! the benchmarks' fixed-size body), `/delay/<seconds>` answers the JSON after that long
//! (fractional, at most [`MAX_PATH_DELAY`], as httpbin), `/headers` answers httpbin's
//! `{"headers": {"Name": "value"}}`, and `GET /ws` with an HTTP/1.1 WebSocket upgrade echoes the
//! upgraded connection's bytes (and so its frames). Each `--grpc` port serves gRPC over h2c:
//! `weft.echo.v1.Echo/Echo`, the standard health service and server reflection. TCP echo ports
//! copy bytes back. It listens on every address (`[::]`, dual stack, or `0.0.0.0` where IPv6 is
//! off) and exits cleanly on SIGTERM or SIGINT. Test tooling only: it holds no mesh logic.
//!
//! Misbehaviour on demand, for the waypoint's retries, timeouts and outlier detection, applies to
//! every HTTP request but the control paths: `--delay` waits before answering; then one random
//! draw per request resets `--reset-percent` of them (HTTP/1.x: the connection, with an RST;
//! HTTP/2: the stream, RST_STREAM INTERNAL_ERROR, the connection lives on) and answers
//! `--fail-percent` of them with `--fail-status` and `{"status":503,"injected":true,"pod":..}`
//! (resets take precedence where the two add up to more than 100). The gRPC echo (not health or
//! reflection) takes `--delay` and `--fail-percent`, failing with a trailers-only UNAVAILABLE.
//!
//! Counting: every HTTP request but the control paths is counted on arrival (faulted ones too).
//! The control paths, neither counted nor faulted: `GET /count` answers
//! `{"requests": N, "by_path": {"/path": n}, "pod": ".."}` (paths without their query; at most
//! [`MAX_COUNTED_PATHS`] of them, longer than [`MAX_COUNTED_PATH_LEN`] bytes or past that many
//! counted under `"other"`), and `POST /count/reset` answers the same for the counts it zeroes.
//! Nothing is printed per request: stdout carries only the readiness lines.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tonic::transport::server::{Router, TcpIncoming};
use weft_config::types::IstioDuration;

/// weft-app's gRPC echo service (`weft/proto/weft/echo/v1/echo.proto`), generated at build time.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("weft.echo.v1");

    /// The encoded descriptors of `echo.proto`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/echo_descriptor.bin"));
}

/// The HTTP port when no listener is asked for.
pub const DEFAULT_HTTP_PORT: u16 = 8080;

/// The largest body `/bytes/<n>` sends.
pub const MAX_BYTES: usize = 1 << 20;

/// The version reported when none is given (Istio's helloworld sample reads `SERVICE_VERSION`).
pub const DEFAULT_SERVICE_VERSION: &str = "v1";

/// The path that accepts a WebSocket upgrade and echoes the upgraded connection.
pub const WEBSOCKET_PATH: &str = "/ws";

/// `GET` answers the request counts (a control path: neither counted nor faulted).
pub const COUNT_PATH: &str = "/count";

/// `POST` answers the request counts and zeroes them (a control path: neither counted nor
/// faulted).
pub const COUNT_RESET_PATH: &str = "/count/reset";

/// The most distinct paths `/count` keeps; requests to further paths count under
/// [`OTHER_PATHS`], so that a client cannot grow the counts without bound.
pub const MAX_COUNTED_PATHS: usize = 1000;

/// The longest path `/count` keeps as it is; longer ones count under [`OTHER_PATHS`].
pub const MAX_COUNTED_PATH_LEN: usize = 256;

/// The `by_path` key of requests whose path is not counted by name (no path is named this: paths
/// start with `/`).
pub const OTHER_PATHS: &str = "other";

/// The longest wait `/delay/<seconds>` makes (httpbin's cap).
pub const MAX_PATH_DELAY: Duration = Duration::from_secs(10);

/// RFC 6455's GUID, appended to `Sec-WebSocket-Key` to make `Sec-WebSocket-Accept`.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `weft-app` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "weft-app",
    version,
    about = "Sample workload: HTTP/1.1 and h2c echo of the request, WebSocket echo, gRPC echo and health, TCP echo; \
             faults and request counts on demand."
)]
pub struct Args {
    /// HTTP port, HTTP/1.1 and h2c (repeatable; 0 picks one). Default: 8080 when no port is
    /// given at all.
    #[arg(long = "http")]
    pub http: Vec<u16>,
    /// gRPC port, h2c: echo, health and reflection (repeatable; 0 picks one).
    #[arg(long = "grpc")]
    pub grpc: Vec<u16>,
    /// TCP echo port (repeatable; 0 picks one).
    #[arg(long = "tcp-echo")]
    pub tcp_echo: Vec<u16>,
    /// Pod name reported in responses (default: the hostname).
    #[arg(long, env = "POD_NAME")]
    pub pod: Option<String>,
    /// Namespace reported in responses.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Version reported in responses (`--version` is the program's own).
    #[arg(long = "service-version", env = "SERVICE_VERSION", default_value = DEFAULT_SERVICE_VERSION)]
    pub service_version: String,
    /// Share of HTTP requests (0 to 100, drawn per request) answered with `--fail-status` and
    /// `{"status":..,"injected":true,"pod":..}`; of gRPC echoes, failed with UNAVAILABLE.
    #[arg(long, env = "FAIL_PERCENT", default_value = "0")]
    pub fail_percent: Percent,
    /// The status `--fail-percent` answers.
    #[arg(long, env = "FAIL_STATUS", default_value = "503", value_parser = parse_status)]
    pub fail_status: StatusCode,
    /// Share of HTTP requests (0 to 100, drawn per request) answered by a reset: of the
    /// connection (HTTP/1.x, an RST) or of the stream (HTTP/2).
    #[arg(long, env = "RESET_PERCENT", default_value = "0")]
    pub reset_percent: Percent,
    /// Wait before answering each HTTP request and gRPC echo (`250ms`, `1s`, `1.5s`).
    #[arg(long, env = "DELAY", value_parser = parse_delay)]
    pub delay: Option<Duration>,
}

/// A share of requests, from 0 to 100 inclusive.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Percent(f64);

/// Why the app could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("could not listen on port {port}: {source}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("could not install the signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("could not build gRPC reflection from the compiled-in descriptors: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// What the HTTP service returns for a request drawn to be reset: hyper then resets the
/// HTTP/2 stream or closes the HTTP/1.x connection (an RST by [`Conn::reset_on_close`]).
#[derive(Debug, thiserror::Error)]
#[error("reset injected by --reset-percent")]
struct InjectedReset;

/// Who this instance says it is.
#[derive(Debug)]
struct Identity {
    pod: String,
    namespace: String,
    version: String,
}

/// The misbehaviour the flags ask for.
#[derive(Debug, Clone, Copy)]
struct Faults {
    fail: Percent,
    fail_status: StatusCode,
    reset: Percent,
    delay: Duration,
}

/// What one request's draw gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Fail,
    Reset,
}

/// Requests received on the HTTP ports: all of them, and by path (bounded, see
/// [`MAX_COUNTED_PATHS`]).
#[derive(Debug, Default, Clone, PartialEq)]
struct Counts {
    requests: u64,
    by_path: BTreeMap<String, u64>,
}

/// What every HTTP port serves from.
#[derive(Debug)]
struct HttpState {
    identity: Arc<Identity>,
    faults: Faults,
    counts: Mutex<Counts>,
}

/// One HTTP connection, as its requests see it.
#[derive(Debug)]
struct Conn {
    peer: SocketAddr,
    local: Option<SocketAddr>,
    /// A second descriptor of the connection's socket, to make an injected reset an RST; only
    /// when resets are asked for.
    socket: Option<Socket>,
}

/// The gRPC echo service.
#[derive(Debug, Clone)]
struct EchoService {
    identity: Arc<Identity>,
    faults: Faults,
}

impl Percent {
    /// `percent`, if it is from 0 to 100.
    pub fn new(percent: f64) -> Option<Percent> {
        (0.0..=100.0).contains(&percent).then_some(Percent(percent))
    }

    /// Whether a random draw falls in this share.
    fn hit(self) -> bool {
        self.0 > 0.0 && random_percent() < self.0
    }
}

impl FromStr for Percent {
    type Err = String;

    fn from_str(s: &str) -> Result<Percent, String> {
        s.trim()
            .parse::<f64>()
            .ok()
            .and_then(Percent::new)
            .ok_or_else(|| format!("`{s}` is not a percentage from 0 to 100"))
    }
}

impl Faults {
    /// One request's fate: a reset for draws in `[0, reset)`, a failure for draws in
    /// `[reset, reset + fail)`, else none (draws are in `[0, 100)`).
    fn draw(&self) -> Fault {
        if self.reset.0 == 0.0 && self.fail.0 == 0.0 {
            return Fault::None;
        }
        let draw = random_percent();
        if draw < self.reset.0 {
            Fault::Reset
        } else if draw < self.reset.0 + self.fail.0 {
            Fault::Fail
        } else {
            Fault::None
        }
    }

    /// Waits `--delay`, if any.
    async fn delay(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

impl Counts {
    /// One more request to `path` (without its query).
    fn record(&mut self, path: &str) {
        self.requests += 1;
        if let Some(n) = self.by_path.get_mut(path) {
            *n += 1;
            return;
        }
        let named = path.len() <= MAX_COUNTED_PATH_LEN && self.by_path.len() < MAX_COUNTED_PATHS;
        *self.by_path.entry(if named { path } else { OTHER_PATHS }.to_owned()).or_default() += 1;
    }
}

impl HttpState {
    fn new(identity: Arc<Identity>, faults: Faults) -> HttpState {
        HttpState { identity, faults, counts: Mutex::default() }
    }

    /// The counts; a panic elsewhere while holding them leaves them usable (they are plain
    /// numbers).
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The answer to a control path ([`COUNT_PATH`], [`COUNT_RESET_PATH`]); `None` for every
    /// other request.
    fn control(&self, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        let (allowed, reset) = match req.uri().path() {
            COUNT_PATH => ("GET", false),
            COUNT_RESET_PATH => ("POST", true),
            _ => return None,
        };
        if req.method().as_str() != allowed {
            let mut response = json(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({ "error": format!("{} takes {allowed}", req.uri().path()) }),
            );
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allowed));
            return Some(response);
        }
        let counts = if reset { std::mem::take(&mut *self.counts()) } else { self.counts().clone() };
        Some(json(
            StatusCode::OK,
            &serde_json::json!({
                "requests": counts.requests,
                "by_path": counts.by_path,
                "pod": self.identity.pod,
            }),
        ))
    }
}

impl Conn {
    /// Makes the connection's last close an RST (`SO_LINGER` 0) rather than hyper's orderly FIN,
    /// for an injected HTTP/1.x reset. Without the second descriptor (no `--reset-percent`, or
    /// no descriptor left), the close stays a FIN.
    fn reset_on_close(&self) {
        if let Some(socket) = &self.socket {
            if let Err(e) = socket.set_linger(Some(Duration::ZERO)) {
                tracing::debug!(error = %e, peer = %self.peer, "could not make the injected reset an RST");
            }
        }
    }
}

/// Binds every port, prints `listening <http|grpc|tcp-echo> <addr>` for each and then `ready`
/// on stdout, and serves until SIGTERM or SIGINT.
pub async fn run(mut args: Args) -> Result<(), AppError> {
    if args.http.is_empty() && args.grpc.is_empty() && args.tcp_echo.is_empty() {
        args.http.push(DEFAULT_HTTP_PORT);
    }
    let identity = Arc::new(Identity {
        pod: args.pod.clone().unwrap_or_else(hostname),
        namespace: args.namespace.clone(),
        version: args.service_version.clone(),
    });
    let faults = Faults {
        fail: args.fail_percent,
        fail_status: args.fail_status,
        reset: args.reset_percent,
        delay: args.delay.unwrap_or_default(),
    };
    let http = Arc::new(HttpState::new(identity.clone(), faults));
    let mut sigterm = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let grpc = grpc_router(identity.clone(), faults).await?;

    let mut tasks = tokio::task::JoinSet::new();
    let mut out = std::io::stdout().lock();
    for (kind, ports) in [("http", &args.http), ("grpc", &args.grpc), ("tcp-echo", &args.tcp_echo)] {
        for &port in ports {
            let listener = listen_any(port).map_err(|source| AppError::Listen { port, source })?;
            let addr = listener.local_addr().map_err(|source| AppError::Listen { port, source })?;
            // Readiness lines for whoever started us; a closed stdout must not stop the app.
            let _ = writeln!(out, "listening {kind} {addr}");
            match kind {
                "http" => tasks.spawn(serve_http(listener, http.clone())),
                "grpc" => tasks.spawn(serve_grpc(listener, grpc.clone())),
                _ => tasks.spawn(serve_echo(listener)),
            };
        }
    }
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    drop(out);

    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    tasks.abort_all();
    Ok(())
}

/// `--fail-status`: an HTTP status code.
fn parse_status(s: &str) -> Result<StatusCode, String> {
    s.trim()
        .parse::<u16>()
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| format!("`{s}` is not an HTTP status code (100 to 999)"))
}

/// `--delay`: a duration as Istio writes it (`250ms`, `1s`, `1.5s`).
fn parse_delay(s: &str) -> Result<Duration, String> {
    IstioDuration::parse(s).map(|d| d.0)
}

/// `/delay/<seconds>`'s wait: fractional seconds, capped at [`MAX_PATH_DELAY`] as httpbin does.
fn path_delay(seconds: &str) -> Result<Duration, String> {
    match seconds.parse::<f64>() {
        // Capped before converting: `from_secs_f64` panics on what a Duration cannot hold.
        Ok(s) if s >= 0.0 => Ok(Duration::from_secs_f64(s.min(MAX_PATH_DELAY.as_secs_f64()))),
        _ => Err(format!("{seconds:?} is not a number of seconds (at most {})", MAX_PATH_DELAY.as_secs())),
    }
}

/// A uniform draw in `[0, 100)`.
fn random_percent() -> f64 {
    let rng = ring::rand::SystemRandom::new();
    // The OS generator does not fail on Linux once booted; were it to, the draw injects nothing.
    let Ok(bytes) = ring::rand::generate::<[u8; 8]>(&rng) else {
        return 100.0;
    };
    // The top 53 bits: as many as an f64 holds exactly.
    (u64::from_le_bytes(bytes.expose()) >> 11) as f64 / (1u64 << 53) as f64 * 100.0
}

/// A listener on every address of `port`: `[::]` accepting IPv4 too, or `0.0.0.0` when the
/// namespace has no IPv6.
fn listen_any(port: u16) -> std::io::Result<TcpListener> {
    let v6 = (|| {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        socket.set_only_v6(false)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())?;
        Ok::<_, std::io::Error>(socket)
    })();
    let socket = match v6 {
        Ok(s) => s,
        Err(_) => {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port).into())?;
            socket
        }
    };
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// HTTP/1.1 and prior-knowledge h2c on one listener (the connection preface tells them apart),
/// with HTTP/1.1 upgrades allowed (WebSocket on [`WEBSOCKET_PATH`]).
async fn serve_http(listener: TcpListener, http: Arc<HttpState>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let http = http.clone();
        tokio::spawn(async move {
            let socket =
                if http.faults.reset.0 > 0.0 { SockRef::from(&stream).try_clone().ok() } else { None };
            let conn = Arc::new(Conn {
                peer: canonical(peer),
                local: stream.local_addr().ok().map(canonical),
                socket,
            });
            let peer = conn.peer;
            let service = hyper::service::service_fn(move |req| serve(http.clone(), conn.clone(), req));
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, %peer, "http connection ended");
            }
        });
    }
}

/// One HTTP request: a control path, or counted, delayed, perhaps reset or failed, and then
/// [`handle`]d (after `/delay/<seconds>`'s wait).
async fn serve(
    http: Arc<HttpState>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, InjectedReset> {
    if let Some(response) = http.control(&req) {
        return Ok(response);
    }
    http.counts().record(req.uri().path());
    http.faults.delay().await;
    match http.faults.draw() {
        Fault::Reset => {
            if req.version() < Version::HTTP_2 {
                conn.reset_on_close();
            }
            return Err(InjectedReset);
        }
        Fault::Fail => {
            let status = http.faults.fail_status;
            let body =
                serde_json::json!({ "status": status.as_u16(), "injected": true, "pod": http.identity.pod });
            return Ok(json(status, &body));
        }
        Fault::None => {}
    }
    if let Some(seconds) = req.uri().path().strip_prefix("/delay/") {
        match path_delay(seconds) {
            Ok(wait) => tokio::time::sleep(wait).await,
            Err(e) => return Ok(json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": e }))),
        }
    }
    Ok(handle(&http.identity, conn.peer, conn.local, req))
}

/// The echo, health and reflection services, served on every gRPC port. `""` (the server) and
/// `weft.echo.v1.Echo` report SERVING.
async fn grpc_router(identity: Arc<Identity>, faults: Faults) -> Result<Router, AppError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<proto::echo_server::EchoServer<EchoService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // grpcurl asks v1 first and falls back to v1alpha, which older clients only know.
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    Ok(tonic::transport::Server::builder()
        .add_service(health)
        .add_service(proto::echo_server::EchoServer::new(EchoService { identity, faults }))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}

async fn serve_grpc(listener: TcpListener, router: Router) {
    if let Err(e) = router.serve_with_incoming(TcpIncoming::from(listener)).await {
        tracing::warn!(error = %e, "gRPC server stopped");
    }
}

async fn serve_echo(listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        tokio::spawn(echo(stream));
    }
}

async fn echo(mut stream: TcpStream) {
    let (mut read, mut write) = stream.split();
    let _ = tokio::io::copy(&mut read, &mut write).await;
}

/// One request: a WebSocket upgrade on [`WEBSOCKET_PATH`], else [`respond`].
fn handle(
    identity: &Identity,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    mut req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != WEBSOCKET_PATH {
        return respond(identity, peer, local, &req);
    }
    let accept = match websocket_accept(req.method(), req.version(), req.headers()) {
        Ok(accept) => accept,
        Err(e) => return json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": e })),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut read, &mut write).await;
            }
            Err(e) => tracing::debug!(error = %e, %peer, "WebSocket upgrade failed"),
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// The `Sec-WebSocket-Accept` answering an HTTP/1.1 WebSocket opening handshake (RFC 6455 §4.2),
/// or what is wrong with the request.
fn websocket_accept(method: &Method, version: Version, headers: &HeaderMap) -> Result<HeaderValue, String> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if method != Method::GET || version != Version::HTTP_11 {
        return Err(format!("{WEBSOCKET_PATH} takes an HTTP/1.1 GET with a WebSocket upgrade"));
    }
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(format!("{WEBSOCKET_PATH} needs `Upgrade: websocket` and `Connection: Upgrade`"));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| format!("{WEBSOCKET_PATH} needs a Sec-WebSocket-Key"))?;
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(WEBSOCKET_GUID.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    let accept = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
    HeaderValue::from_str(&accept).map_err(|e| format!("Sec-WebSocket-Accept {accept:?}: {e}"))
}

/// The answer to one request: `/status/<code>`, `/bytes/<n>`, `/headers` or the JSON
/// description of the request.
fn respond(
    identity: &Identity,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if let Some(code) = path.strip_prefix("/status/") {
        return match code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
            Some(status) => json(status, &serde_json::json!({ "status": status.as_u16() })),
            None => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": format!("{code:?} is not an HTTP status code") }),
            ),
        };
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        return match n.parse::<usize>() {
            Ok(n) if n <= MAX_BYTES => bytes(n),
            _ => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": format!("{n:?} is not a byte count up to {MAX_BYTES}") }),
            ),
        };
    }
    let headers = folded_headers(req.headers());
    // HTTP/1.1 names the host in `Host`; HTTP/2 in `:authority` (the URI's authority).
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if path == "/headers" {
        // httpbin's form: names as Python's `str.title()` writes them, `Host` even over HTTP/2.
        let mut titled: BTreeMap<String, String> =
            headers.into_iter().map(|(name, value)| (title_case(name), value)).collect();
        if let Some(host) = host {
            titled.entry("Host".into()).or_insert(host);
        }
        return json(StatusCode::OK, &serde_json::json!({ "headers": titled }));
    }
    json(
        StatusCode::OK,
        &serde_json::json!({
            "pod": identity.pod,
            "namespace": identity.namespace,
            "version": identity.version,
            "peer": peer.to_string(),
            "local": local.map(|a| a.to_string()),
            "method": req.method().as_str(),
            "path": req.uri().path_and_query().map_or(path, |pq| pq.as_str()),
            "query": req.uri().query(),
            "host": host,
            "protocol": protocol(req.version()),
            "headers": headers,
        }),
    )
}

/// The request's headers by name; several values of one header are joined with `,`, as a proxy
/// may fold them.
fn folded_headers(headers: &HeaderMap) -> BTreeMap<&str, String> {
    let mut folded: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        folded.entry(name.as_str()).or_default().push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    folded.into_iter().map(|(k, v)| (k, v.join(","))).collect()
}

/// A header name as httpbin shows it, `x-b3-traceid` as `X-B3-Traceid`: each letter that
/// follows no letter upper case, the others lower case.
fn title_case(name: &str) -> String {
    let mut titled = String::with_capacity(name.len());
    let mut after_letter = false;
    for c in name.chars() {
        titled.push(if after_letter { c.to_ascii_lowercase() } else { c.to_ascii_uppercase() });
        after_letter = c.is_ascii_alphabetic();
    }
    titled
}

/// The HTTP version as the JSON reports it.
fn protocol(version: Version) -> String {
    match version {
        Version::HTTP_10 => "HTTP/1.0".into(),
        Version::HTTP_11 => "HTTP/1.1".into(),
        Version::HTTP_2 => "HTTP/2".into(),
        other => format!("{other:?}"),
    }
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `n` bytes of `x`, as `application/octet-stream`.
fn bytes(n: usize) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(vec![b'x'; n])));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    response
}

/// IPv4 callers of a dual-stack socket show up as `::ffff:a.b.c.d`; report them as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[tonic::async_trait]
impl proto::echo_server::Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<proto::EchoRequest>,
    ) -> Result<tonic::Response<proto::EchoResponse>, tonic::Status> {
        self.faults.delay().await;
        if self.faults.fail.hit() {
            // tonic answers an error before any message trailers-only: grpc-status in the headers.
            return Err(tonic::Status::unavailable(format!(
                "injected by weft-app --fail-percent (pod {})",
                self.identity.pod
            )));
        }
        let identity = &self.identity;
        Ok(tonic::Response::new(proto::EchoResponse {
            message: request.into_inner().message,
            pod: identity.pod.clone(),
            namespace: identity.namespace.clone(),
            version: identity.version.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn identity() -> Arc<Identity> {
        Arc::new(Identity { pod: "p".into(), namespace: "n".into(), version: "v2".into() })
    }

    const NO_FAULTS: Faults = Faults {
        fail: Percent(0.0),
        fail_status: StatusCode::SERVICE_UNAVAILABLE,
        reset: Percent(0.0),
        delay: Duration::ZERO,
    };

    /// A served `weft-app` HTTP port on loopback; the server stops when the handle is dropped.
    async fn http_app() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        http_app_with(NO_FAULTS).await
    }

    async fn http_app_with(faults: Faults) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, tokio::spawn(serve_http(listener, Arc::new(HttpState::new(identity(), faults)))))
    }

    type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
    type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

    /// A keep-alive HTTP/1.1 client connection to `addr`.
    async fn h1(addr: SocketAddr) -> H1 {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    /// A prior-knowledge h2c client connection to `addr`.
    async fn h2(addr: SocketAddr) -> H2 {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    fn request(method: Method, path: &str) -> Request<Full<Bytes>> {
        Request::builder().method(method).uri(format!("http://x{path}")).body(Full::default()).unwrap()
    }

    /// The status and the JSON body of `response`.
    async fn reply(response: Response<Incoming>) -> (StatusCode, serde_json::Value) {
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
    }

    async fn send1(sender: &mut H1, method: Method, path: &str) -> (StatusCode, serde_json::Value) {
        sender.ready().await.unwrap();
        reply(sender.send_request(request(method, path)).await.unwrap()).await
    }

    /// `request` (raw HTTP/1.1, closing the connection) on a fresh connection to a served
    /// `weft-app`: the status line and the body.
    async fn raw(request: &str) -> (String, Vec<u8>) {
        let (addr, server) = http_app().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        server.abort();
        let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(response[..split].to_vec()).unwrap();
        let status = head.lines().next().unwrap().to_string();
        (status, response[split + 4..].to_vec())
    }

    async fn get(path: &str) -> (String, Vec<u8>) {
        raw(&format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await
    }

    #[tokio::test]
    async fn bytes_answers_that_many_bytes_and_refuses_too_many_or_garbage() {
        let (status, body) = get("/bytes/1024").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, vec![b'x'; 1024]);
        let (status, body) = get("/bytes/0").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.is_empty());
        for bad in [format!("/bytes/{}", MAX_BYTES + 1), "/bytes/-1".into(), "/bytes/lots".into()] {
            let (status, body) = get(&bad).await;
            assert_eq!(status, "HTTP/1.1 400 Bad Request", "{bad}");
            assert!(String::from_utf8(body).unwrap().contains("not a byte count"), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_http1_get_answers_who_answered_and_what_it_saw() {
        let (status, body) =
            raw("GET /hello?a=1&b=2 HTTP/1.1\r\nHost: web.shop:8080\r\nX-Added: one\r\nx-added: two\r\n\
             X-Set: v\r\nConnection: close\r\n\r\n")
            .await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(reply["pod"], "p", "{reply}");
        assert_eq!(reply["namespace"], "n", "{reply}");
        assert_eq!(reply["version"], "v2", "{reply}");
        assert_eq!(reply["method"], "GET", "{reply}");
        assert_eq!(reply["path"], "/hello?a=1&b=2", "{reply}");
        assert_eq!(reply["query"], "a=1&b=2", "{reply}");
        assert_eq!(reply["host"], "web.shop:8080", "{reply}");
        assert_eq!(reply["protocol"], "HTTP/1.1", "{reply}");
        assert_eq!(reply["headers"]["x-added"], "one,two", "{reply}");
        assert_eq!(reply["headers"]["x-set"], "v", "{reply}");
        assert!(reply["headers"].get("x-removed").is_none(), "{reply}");
        assert!(reply["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{reply}");
    }

    #[tokio::test]
    async fn an_h2c_get_on_the_same_port_reports_http2_and_the_authority() {
        let (addr, server) = http_app().await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let request = Request::get("http://web.shop:8080/h2?x=1")
            .header("x-added", "one")
            .header("x-added", "two")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), Version::HTTP_2);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(reply["protocol"], "HTTP/2", "{reply}");
        assert_eq!(reply["host"], "web.shop:8080", "{reply}");
        assert_eq!(reply["path"], "/h2?x=1", "{reply}");
        assert_eq!(reply["method"], "GET", "{reply}");
        assert_eq!(reply["headers"]["x-added"], "one,two", "{reply}");
        assert_eq!(reply["version"], "v2", "{reply}");
        server.abort();
    }

    #[tokio::test]
    async fn a_websocket_upgrade_answers_the_accept_key_and_echoes_bytes() {
        let (addr, server) = http_app().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // RFC 6455 §1.3's example key and its accept value.
        let request =
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed in the head: {head:?}");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101 switching protocols\r\n"), "{head}");
        assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
        assert!(head.contains("\r\nsec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"), "{head}");
        // A masked text frame "hi" and then arbitrary bytes: all come back as sent.
        let sent = b"\x81\x82\x01\x02\x03\x04\x69\x6b and more";
        stream.write_all(sent).await.unwrap();
        let mut echoed = vec![0u8; sent.len()];
        tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echoed, sent);
        server.abort();

        // Without the upgrade, /ws says what it needs.
        let (status, body) = get(WEBSOCKET_PATH).await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        assert!(String::from_utf8(body).unwrap().contains("Upgrade: websocket"));
    }

    #[tokio::test]
    async fn grpc_echo_health_and_reflection_answer() {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_grpc(listener, grpc_router(identity(), NO_FAULTS).await.unwrap()));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();

        let reply = proto::echo_client::EchoClient::new(channel.clone())
            .echo(proto::EchoRequest { message: "hi".into() })
            .await
            .unwrap()
            .into_inner();
        let want = proto::EchoResponse {
            message: "hi".into(),
            pod: "p".into(),
            namespace: "n".into(),
            version: "v2".into(),
        };
        assert_eq!(reply, want);

        let mut health = HealthClient::new(channel.clone());
        for service in ["", "weft.echo.v1.Echo"] {
            let status = health
                .check(HealthCheckRequest { service: service.into() })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
        }
        let unknown = health.check(HealthCheckRequest { service: "nope".into() }).await.unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);

        // What `grpcurl -plaintext <addr> list` asks.
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("no service list");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        assert!(names.contains(&"weft.echo.v1.Echo".to_string()), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
        server.abort();
    }

    #[test]
    fn fault_flags_parse_read_their_env_vars_and_refuse_bad_values_naming_the_flag() {
        use clap::{CommandFactory, Parser};

        let args = Args::try_parse_from([
            "weft-app",
            "--fail-percent",
            "12.5",
            "--fail-status",
            "500",
            "--reset-percent",
            "100",
            "--delay",
            "1.5s",
        ])
        .unwrap();
        assert_eq!(args.fail_percent, Percent(12.5));
        assert_eq!(args.fail_status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(args.reset_percent, Percent(100.0));
        assert_eq!(args.delay, Some(Duration::from_millis(1500)));
        let defaults = Args::try_parse_from(["weft-app"]).unwrap();
        assert_eq!(defaults.fail_percent, Percent(0.0));
        assert_eq!(defaults.fail_status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(defaults.reset_percent, Percent(0.0));
        assert_eq!(defaults.delay, None);
        for (text, want) in [("250ms", 250), ("1s", 1000), ("0.2s", 200)] {
            let args = Args::try_parse_from(["weft-app", "--delay", text]).unwrap();
            assert_eq!(args.delay, Some(Duration::from_millis(want)), "{text}");
        }

        let bad = [
            ("--fail-percent", "100.1"),
            ("--fail-percent", "-1"),
            ("--fail-percent", "NaN"),
            ("--reset-percent", "lots"),
            ("--fail-status", "99"),
            ("--fail-status", "abc"),
            ("--delay", "1.5"),
            ("--delay", "soon"),
            ("--delay", "-1s"),
        ];
        for (flag, value) in bad {
            // `--flag=value`, or clap takes `-1` for a flag.
            let error =
                Args::try_parse_from(["weft-app".into(), format!("{flag}={value}")]).unwrap_err().to_string();
            assert!(error.contains(flag), "{flag} {value}: {error}");
        }

        let command = Args::command();
        let env = |id: &str| {
            let arg = command.get_arguments().find(|a| a.get_id() == id).unwrap();
            arg.get_env().unwrap().to_str().unwrap().to_string()
        };
        assert_eq!(env("fail_percent"), "FAIL_PERCENT");
        assert_eq!(env("fail_status"), "FAIL_STATUS");
        assert_eq!(env("reset_percent"), "RESET_PERCENT");
        assert_eq!(env("delay"), "DELAY");
    }

    #[tokio::test]
    async fn fail_percent_100_answers_the_fail_status_on_every_path_but_the_control_ones() {
        let faults = Faults { fail: Percent(100.0), fail_status: StatusCode::IM_A_TEAPOT, ..NO_FAULTS };
        let (addr, server) = http_app_with(faults).await;
        let mut client = h1(addr).await;
        for path in ["/", "/get", "/status/200", "/delay/5", "/headers", "/count/x"] {
            let (status, body) = send1(&mut client, Method::GET, path).await;
            assert_eq!(status, StatusCode::IM_A_TEAPOT, "{path}");
            assert_eq!(body, serde_json::json!({ "status": 418, "injected": true, "pod": "p" }), "{path}");
        }
        let (status, counts) = send1(&mut client, Method::GET, COUNT_PATH).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(counts["requests"], 6, "{counts}");
        server.abort();
    }

    #[tokio::test]
    async fn fail_percent_0_never_fails_and_50_fails_about_half() {
        for (percent, failures) in [(0.0, 0..=0), (50.0, 120..=280)] {
            let (addr, server) = http_app_with(Faults { fail: Percent(percent), ..NO_FAULTS }).await;
            let mut client = h1(addr).await;
            let mut failed = 0;
            for _ in 0..400 {
                match send1(&mut client, Method::GET, "/").await {
                    (StatusCode::OK, body) => assert_eq!(body["pod"], "p"),
                    (StatusCode::SERVICE_UNAVAILABLE, body) => {
                        assert_eq!(body["injected"], true);
                        failed += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert!(failures.contains(&failed), "{percent} %: {failed} of 400 failed");
            server.abort();
        }
    }

    #[tokio::test]
    async fn reset_percent_resets_an_http1_connection_with_an_rst() {
        let (addr, server) = http_app_with(Faults { reset: Percent(100.0), ..NO_FAULTS }).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /x?q=1 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut response = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await.unwrap();
        // An RST, not an orderly close (which would read as Ok(0)): no response byte either.
        assert_eq!(read.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
        assert!(response.is_empty(), "{response:?}");

        let mut client = h1(addr).await;
        client.ready().await.unwrap();
        assert!(client.send_request(request(Method::GET, "/x")).await.is_err());
        // Both were counted on arrival; the control paths are not reset.
        let (status, counts) = send1(&mut h1(addr).await, Method::GET, COUNT_PATH).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(counts["requests"], 2, "{counts}");
        assert_eq!(counts["by_path"], serde_json::json!({ "/x": 2 }), "{counts}");
        server.abort();
    }

    #[tokio::test]
    async fn reset_percent_resets_an_http2_stream_and_the_connection_lives_on() {
        let (addr, server) = http_app_with(Faults { reset: Percent(100.0), ..NO_FAULTS }).await;
        let mut client = h2(addr).await;
        for _ in 0..3 {
            let error = client.send_request(request(Method::GET, "/x")).await.unwrap_err();
            // hyper's error wraps h2's: RST_STREAM with INTERNAL_ERROR.
            assert!(format!("{error:?}").contains("INTERNAL_ERROR"), "{error:?}");
        }
        let response = client.send_request(request(Method::GET, COUNT_PATH)).await.unwrap();
        let (status, counts) = reply(response).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(counts["requests"], 3, "{counts}");
        server.abort();
    }

    #[tokio::test]
    async fn delay_delays_every_answer_failures_included_but_not_the_control_paths() {
        let wait = Duration::from_millis(200);
        let (addr, server) = http_app_with(Faults { delay: wait, ..NO_FAULTS }).await;
        let mut client = h1(addr).await;
        let start = tokio::time::Instant::now();
        let (status, body) = send1(&mut client, Method::GET, "/slow").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["path"], "/slow");
        assert!(start.elapsed() >= wait, "{:?}", start.elapsed());
        server.abort();

        let (addr, server) = http_app_with(Faults { delay: wait, fail: Percent(100.0), ..NO_FAULTS }).await;
        let mut client = h2(addr).await;
        let start = tokio::time::Instant::now();
        let (status, _) = reply(client.send_request(request(Method::GET, "/slow")).await.unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(start.elapsed() >= wait, "{:?}", start.elapsed());
        server.abort();

        // An hour's delay does not hold `/count` up.
        let (addr, server) = http_app_with(Faults { delay: Duration::from_secs(3600), ..NO_FAULTS }).await;
        let mut client = h1(addr).await;
        let count = send1(&mut client, Method::GET, COUNT_PATH);
        let (status, _) = tokio::time::timeout(Duration::from_secs(10), count).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        server.abort();
    }

    #[tokio::test]
    async fn delay_path_answers_the_description_after_that_many_seconds() {
        let (addr, server) = http_app().await;
        let mut client = h1(addr).await;
        let start = tokio::time::Instant::now();
        let (status, body) = send1(&mut client, Method::GET, "/delay/0.2").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["path"], "/delay/0.2", "{body}");
        assert!(start.elapsed() >= Duration::from_millis(200), "{:?}", start.elapsed());
        for bad in ["/delay/-1", "/delay/soon", "/delay/", "/delay/NaN"] {
            let (status, body) = send1(&mut client, Method::GET, bad).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(body["error"].as_str().unwrap().contains("seconds"), "{bad}: {body}");
        }
        server.abort();
    }

    #[test]
    fn path_delays_are_fractional_seconds_capped_at_ten() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("0", Some(Duration::ZERO)),
            ("0.2", Some(Duration::from_millis(200))),
            ("3", Some(Duration::from_secs(3))),
            ("10", Some(MAX_PATH_DELAY)),
            ("11", Some(MAX_PATH_DELAY)),
            ("1e300", Some(MAX_PATH_DELAY)),
            ("inf", Some(MAX_PATH_DELAY)),
            ("-0.5", None),
            ("NaN", None),
            ("", None),
            ("1s", None),
        ];
        for (text, want) in cases {
            assert_eq!(path_delay(text).ok(), *want, "{text}");
        }
    }

    #[tokio::test]
    async fn headers_answers_httpbins_form() {
        let (status, body) =
            raw("GET /headers HTTP/1.1\r\nHost: web:8000\r\nX-B3-TraceId: t\r\nx-request-id: a\r\nX-Request-Id: b\r\n\
                 Connection: close\r\n\r\n")
            .await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let want = serde_json::json!({ "headers": {
            "Host": "web:8000", "X-B3-Traceid": "t", "X-Request-Id": "a,b", "Connection": "close",
        }});
        assert_eq!(reply, want);

        // Over HTTP/2 the host is the authority.
        let (addr, server) = http_app().await;
        let response = h2(addr).await.send_request(request(Method::GET, "/headers")).await.unwrap();
        let (status, reply) = self::reply(response).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(reply, serde_json::json!({ "headers": { "Host": "x" } }));
        server.abort();
    }

    #[tokio::test]
    async fn count_counts_by_path_without_counting_itself_and_reset_zeroes() {
        let (addr, server) = http_app().await;
        let mut client = h1(addr).await;
        for (method, path) in [
            (Method::GET, "/a"),
            (Method::GET, "/a?x=1"),
            (Method::POST, "/b"),
            (Method::GET, "/status/500"),
            (Method::GET, "/count/other"),
        ] {
            send1(&mut client, method, path).await;
        }
        let (status, _) = send1(&mut client, Method::GET, COUNT_RESET_PATH).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let (status, _) = send1(&mut client, Method::POST, COUNT_PATH).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let want = serde_json::json!({
            "requests": 5,
            "by_path": { "/a": 2, "/b": 1, "/status/500": 1, "/count/other": 1 },
            "pod": "p",
        });
        // Over either protocol, and `/count` counts nothing.
        assert_eq!(send1(&mut client, Method::GET, COUNT_PATH).await, (StatusCode::OK, want.clone()));
        let response = h2(addr).await.send_request(request(Method::GET, "/count?x=1")).await.unwrap();
        assert_eq!(reply(response).await, (StatusCode::OK, want.clone()));
        // The reset answers what it zeroed.
        assert_eq!(send1(&mut client, Method::POST, COUNT_RESET_PATH).await, (StatusCode::OK, want));
        let zero = serde_json::json!({ "requests": 0, "by_path": {}, "pod": "p" });
        assert_eq!(send1(&mut client, Method::GET, COUNT_PATH).await, (StatusCode::OK, zero));
        server.abort();
    }

    #[test]
    fn counts_keep_at_most_so_many_paths_of_bounded_length() {
        let mut counts = Counts::default();
        for i in 0..MAX_COUNTED_PATHS + 500 {
            counts.record(&format!("/p{i}"));
        }
        counts.record("/p0");
        counts.record(&format!("/{}", "x".repeat(MAX_COUNTED_PATH_LEN)));
        assert_eq!(counts.requests, MAX_COUNTED_PATHS as u64 + 502);
        assert_eq!(counts.by_path.len(), MAX_COUNTED_PATHS + 1);
        assert_eq!(counts.by_path["/p0"], 2);
        assert_eq!(counts.by_path[OTHER_PATHS], 501);
        assert!(!counts.by_path.contains_key(&format!("/p{MAX_COUNTED_PATHS}")));

        // A long path goes to "other" even with room to spare.
        let mut counts = Counts::default();
        counts.record(&format!("/{}", "x".repeat(MAX_COUNTED_PATH_LEN)));
        assert_eq!(counts.by_path, BTreeMap::from([(OTHER_PATHS.to_string(), 1)]));
    }

    #[tokio::test]
    async fn grpc_echo_takes_the_delay_and_fails_unavailable_trailers_only() {
        use hyper::body::Body as _;
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

        let wait = Duration::from_millis(200);
        let faults = Faults { fail: Percent(100.0), delay: wait, ..NO_FAULTS };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_grpc(listener, grpc_router(identity(), faults).await.unwrap()));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let start = tokio::time::Instant::now();
        let status = proto::echo_client::EchoClient::new(channel.clone())
            .echo(proto::EchoRequest { message: "hi".into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(start.elapsed() >= wait, "{:?}", start.elapsed());
        // Health is not faulted.
        let health = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await;
        assert_eq!(health.unwrap().into_inner().status, ServingStatus::Serving as i32);

        // Trailers-only: grpc-status 14 in the one HEADERS frame, which ends the stream.
        let request = Request::post(format!("http://{addr}/weft.echo.v1.Echo/Echo"))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let response = h2(addr).await.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "14", "{:?}", response.headers());
        assert!(response.body().is_end_stream());
        server.abort();
    }
}
