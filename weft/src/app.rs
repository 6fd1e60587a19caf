//! `weft-app`: the workload the local cluster's pods run, like Istio's httpbin/echo samples.
//! HTTP/1.1 `GET /<anything>` answers JSON saying who answered (pod, namespace) and who called
//! (`peer`: the caller's address as this socket saw it), `/status/<code>` answers that status,
//! `/bytes/<n>` answers `n` bytes (at most [`MAX_BYTES`]; the benchmarks' fixed-size body), and TCP
//! echo ports copy bytes back. It listens on every address (`[::]`, dual stack, or
//! `0.0.0.0` where IPv6 is off) and exits cleanly on SIGTERM or SIGINT. Test tooling only: it
//! holds no mesh logic.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};

/// The HTTP port when no listener is asked for.
pub const DEFAULT_HTTP_PORT: u16 = 8080;

/// The largest body `/bytes/<n>` sends.
pub const MAX_BYTES: usize = 1 << 20;

/// `weft-app` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "weft-app", version, about = "Sample workload: HTTP echo of the caller, TCP echo.")]
pub struct Args {
    /// HTTP/1.1 port (repeatable; 0 picks one). Default: 8080 when no port is given at all.
    #[arg(long = "http")]
    pub http: Vec<u16>,
    /// TCP echo port (repeatable; 0 picks one).
    #[arg(long = "tcp-echo")]
    pub tcp_echo: Vec<u16>,
    /// Pod name reported in responses (default: the hostname).
    #[arg(long, env = "POD_NAME")]
    pub pod: Option<String>,
    /// Namespace reported in responses.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
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
}

/// Who this instance says it is.
#[derive(Debug)]
struct Identity {
    pod: String,
    namespace: String,
}

/// Binds every port, prints `listening <http|tcp-echo> <addr>` for each and then `ready` on
/// stdout, and serves until SIGTERM or SIGINT.
pub async fn run(mut args: Args) -> Result<(), AppError> {
    if args.http.is_empty() && args.tcp_echo.is_empty() {
        args.http.push(DEFAULT_HTTP_PORT);
    }
    let identity = Arc::new(Identity {
        pod: args.pod.clone().unwrap_or_else(hostname),
        namespace: args.namespace.clone(),
    });
    let mut sigterm = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;

    let mut tasks = tokio::task::JoinSet::new();
    let mut out = std::io::stdout().lock();
    for (kind, ports) in [("http", &args.http), ("tcp-echo", &args.tcp_echo)] {
        for &port in ports {
            let listener = listen_any(port).map_err(|source| AppError::Listen { port, source })?;
            let addr = listener.local_addr().map_err(|source| AppError::Listen { port, source })?;
            // Readiness lines for whoever started us; a closed stdout must not stop the app.
            let _ = writeln!(out, "listening {kind} {addr}");
            if kind == "http" {
                tasks.spawn(serve_http(listener, identity.clone()));
            } else {
                tasks.spawn(serve_echo(listener));
            }
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
                async move { Ok::<_, Infallible>(respond(&identity, peer, local, &req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, %peer, "http connection ended");
            }
        });
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
    let mut headers: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in req.headers() {
        headers
            .entry(name.as_str())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let headers: BTreeMap<&str, String> = headers.into_iter().map(|(k, v)| (k, v.join(", "))).collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "pod": identity.pod,
            "namespace": identity.namespace,
            "peer": peer.to_string(),
            "local": local.map(|a| a.to_string()),
            "method": req.method().as_str(),
            "path": path,
            "query": req.uri().query(),
            "headers": headers,
        }),
    )
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

/// `n` bytes of `x`, as `application/octet-stream`.
fn bytes(n: usize) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(vec![b'x'; n])));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One request on a fresh connection to a served `weft-app`: the status line and the body.
    async fn get(path: &str) -> (String, Vec<u8>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let identity = Arc::new(Identity { pod: "p".into(), namespace: "n".into() });
        let server = tokio::spawn(serve_http(listener, identity));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        server.abort();
        let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(response[..split].to_vec()).unwrap();
        let status = head.lines().next().unwrap().to_string();
        (status, response[split + 4..].to_vec())
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
}
