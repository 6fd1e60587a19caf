//! `weft-app`: the workload the local cluster's pods run, like Istio's httpbin/echo samples.
//! On each `--http` port, HTTP/1.1 and prior-knowledge HTTP/2 (h2c): `GET /<anything>` answers
//! JSON saying who answered (pod, namespace, version) and what it saw (the caller's address as
//! this socket saw it, method, path, host, protocol, headers), `/status/<code>` answers that
//! status, `/bytes/<n>` answers `n` bytes (at most [`MAX_BYTES`]; the benchmarks' fixed-size
//! body), and `GET /ws` with an HTTP/1.1 WebSocket upgrade echoes the upgraded connection's bytes
//! (and so its frames). Each `--grpc` port serves gRPC over h2c: `weft.echo.v1.Echo/Echo`, the
//! standard health service and server reflection. TCP echo ports copy bytes back. It listens on
//! every address (`[::]`, dual stack, or `0.0.0.0` where IPv6 is off) and exits cleanly on
//! SIGTERM or SIGINT. Test tooling only: it holds no mesh logic.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tonic::transport::server::{Router, TcpIncoming};

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

/// RFC 6455's GUID, appended to `Sec-WebSocket-Key` to make `Sec-WebSocket-Accept`.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `weft-app` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "weft-app",
    version,
    about = "Sample workload: HTTP/1.1 and h2c echo of the request, WebSocket echo, gRPC echo and health, TCP echo."
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
}

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

/// Who this instance says it is.
#[derive(Debug)]
struct Identity {
    pod: String,
    namespace: String,
    version: String,
}

/// The gRPC echo service.
#[derive(Debug, Clone)]
struct EchoService {
    identity: Arc<Identity>,
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
    let mut sigterm = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let grpc = grpc_router(identity.clone()).await?;

    let mut tasks = tokio::task::JoinSet::new();
    let mut out = std::io::stdout().lock();
    for (kind, ports) in [("http", &args.http), ("grpc", &args.grpc), ("tcp-echo", &args.tcp_echo)] {
        for &port in ports {
            let listener = listen_any(port).map_err(|source| AppError::Listen { port, source })?;
            let addr = listener.local_addr().map_err(|source| AppError::Listen { port, source })?;
            // Readiness lines for whoever started us; a closed stdout must not stop the app.
            let _ = writeln!(out, "listening {kind} {addr}");
            match kind {
                "http" => tasks.spawn(serve_http(listener, identity.clone())),
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
async fn serve_http(listener: TcpListener, identity: Arc<Identity>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let identity = identity.clone();
        tokio::spawn(async move {
            let local = stream.local_addr().ok().map(canonical);
            let peer = canonical(peer);
            let service = hyper::service::service_fn(move |req| {
                let identity = identity.clone();
                async move { Ok::<_, Infallible>(handle(&identity, peer, local, req)) }
            });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, %peer, "http connection ended");
            }
        });
    }
}

/// The echo, health and reflection services, served on every gRPC port. `""` (the server) and
/// `weft.echo.v1.Echo` report SERVING.
async fn grpc_router(identity: Arc<Identity>) -> Result<Router, AppError> {
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
        .add_service(proto::echo_server::EchoServer::new(EchoService { identity }))
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

/// The answer to one request: `/status/<code>`, `/bytes/<n>` or the JSON description of the
/// request.
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
    // Several values of one header are joined with `,`, as a proxy may fold them.
    let mut headers: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in req.headers() {
        headers
            .entry(name.as_str())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let headers: BTreeMap<&str, String> = headers.into_iter().map(|(k, v)| (k, v.join(","))).collect();
    // HTTP/1.1 names the host in `Host`; HTTP/2 in `:authority` (the URI's authority).
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
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

    /// A served `weft-app` HTTP port on loopback; the server stops when the handle is dropped.
    async fn http_app() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, tokio::spawn(serve_http(listener, identity())))
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
        let server = tokio::spawn(serve_grpc(listener, grpc_router(identity()).await.unwrap()));
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
}
