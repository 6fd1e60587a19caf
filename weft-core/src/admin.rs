//! The proxies' admin server: three small HTTP/1.1 endpoints on Istio's ports, served from a
//! thread and runtime of their own so that a slow scrape or a large config dump never delays the
//! data plane, through [`crate::accept`] (connection limit, drain, accept errors survived) with
//! a header-read timeout.
//!
//! - admin (15000, localhost): `GET /config_dump` (what the proxy holds, as JSON),
//!   `GET /logging` (the log filter), `POST /logging?level=<filter>` (change it, `RUST_LOG`
//!   syntax), `POST /quitquitquit` (graceful exit);
//! - metrics (15020): `GET /metrics` (also `/stats/prometheus`), Prometheus text format;
//! - readiness (15021): `GET /healthz/ready`: 200 once every check in the [`Readiness`]
//!   registry passes, else 503 naming what is missing.
//!
//! Owns the endpoints and the registry of readiness checks; what a proxy dumps and what makes
//! it ready is the proxy's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::accept::{self, Limits};
use crate::drain;
use crate::telemetry::{self, LogLevel};

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent connections per endpoint.
const MAX_CONNECTIONS: usize = 64;

/// The checks a proxy must pass to be ready, one per subsystem, each saying what is missing.
#[derive(Default)]
pub struct Readiness {
    checks: Mutex<Vec<Check>>,
}

type Check = (String, Box<dyn Fn() -> Option<String> + Send + Sync>);

/// What the endpoints serve.
pub struct Admin {
    /// The proxy's configuration and state, for `/config_dump`.
    pub config_dump: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    pub registry: Arc<Registry>,
    pub readiness: Arc<Readiness>,
    pub log: LogLevel,
    /// Set on `POST /quitquitquit`.
    pub quit: watch::Sender<bool>,
}

/// Where the three endpoints listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AdminAddresses {
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

/// The running server: the addresses bound (with the real ports when 0 was asked for). Dropping
/// it stops the endpoints.
pub struct AdminServer {
    pub addresses: AdminAddresses,
    _stop: drain::Trigger,
}

impl Readiness {
    /// Adds the check of `subsystem`: `None` when it is ready, else what it still lacks.
    pub fn add(
        &self,
        subsystem: impl Into<String>,
        check: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) {
        self.checks.lock().unwrap_or_else(PoisonError::into_inner).push((subsystem.into(), Box::new(check)));
    }

    /// What is not ready yet (every failing check, `subsystem: why`), or `None`.
    pub fn not_ready(&self) -> Option<String> {
        let checks = self.checks.lock().unwrap_or_else(PoisonError::into_inner);
        let missing: Vec<String> =
            checks.iter().filter_map(|(name, check)| check().map(|why| format!("{name}: {why}"))).collect();
        (!missing.is_empty()).then(|| missing.join("; "))
    }
}

impl AdminAddresses {
    /// Istio's: admin on localhost:15000, metrics on :15020, readiness on :15021.
    pub fn istio() -> AdminAddresses {
        use std::net::{IpAddr, Ipv4Addr};
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        AdminAddresses {
            admin: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), crate::names::ADMIN_PORT),
            metrics: SocketAddr::new(any, crate::names::METRICS_PORT),
            readiness: SocketAddr::new(any, crate::names::READINESS_PORT),
        }
    }
}

/// The three endpoints' listening sockets: admin, metrics, readiness.
pub type AdminListeners = [std::net::TcpListener; 3];

/// Binds the three endpoints (errors name the one that failed) and serves them from a thread of
/// their own until the returned server is dropped.
pub fn spawn(admin: Admin, addresses: AdminAddresses) -> std::io::Result<AdminServer> {
    serve_on(admin, bind(addresses)?)
}

/// Binds the three endpoints; errors name the one that failed.
pub fn bind(addresses: AdminAddresses) -> std::io::Result<AdminListeners> {
    let bind = |addr: SocketAddr, what: &str| {
        std::net::TcpListener::bind(addr).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen for the {what} endpoint on {addr}: {e}"))
        })
    };
    Ok([
        bind(addresses.admin, "admin")?,
        bind(addresses.metrics, "metrics")?,
        bind(addresses.readiness, "readiness")?,
    ])
}

/// Serves the three endpoints on listeners bound before (by [`bind`], or handed over by another
/// process) from a thread of their own until the returned server is dropped.
pub fn serve_on(admin: Admin, listeners: AdminListeners) -> std::io::Result<AdminServer> {
    for listener in &listeners {
        listener.set_nonblocking(true)?;
    }
    let [a, m, r] = listeners;
    let listeners = [(a, Endpoint::Admin), (m, Endpoint::Metrics), (r, Endpoint::Readiness)];
    let bound = AdminAddresses {
        admin: listeners[0].0.local_addr()?,
        metrics: listeners[1].0.local_addr()?,
        readiness: listeners[2].0.local_addr()?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (stop, watch) = drain::channel();
    let admin = Arc::new(admin);
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        runtime.block_on(async move {
            let mut tasks = Vec::new();
            for (listener, endpoint) in listeners {
                let (admin, watch) = (Arc::clone(&admin), watch.clone());
                tasks.push(tokio::spawn(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, endpoint, admin, watch).await,
                        Err(e) => tracing::error!(error = %e, "admin endpoint cannot start"),
                    }
                }));
            }
            for task in tasks {
                let _ = task.await;
            }
        })
    })?;
    Ok(AdminServer { addresses: bound, _stop: stop })
}

#[derive(Clone, Copy, Debug)]
enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

async fn serve(
    listener: tokio::net::TcpListener,
    endpoint: Endpoint,
    admin: Arc<Admin>,
    watch: drain::Watch,
) {
    let limits = Limits {
        max_connections: MAX_CONNECTIONS,
        max_per_source: MAX_CONNECTIONS,
        drain_deadline: Duration::from_secs(1),
    };
    let name = match endpoint {
        Endpoint::Admin => "admin",
        Endpoint::Metrics => "metrics",
        Endpoint::Readiness => "readiness",
    };
    accept::serve(&listener, name, limits, watch, |tcp, peer| {
        let admin = Arc::clone(&admin);
        async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = answer(&admin, endpoint, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        }
    })
    .await;
}

fn answer(admin: &Admin, endpoint: Endpoint, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    match (endpoint, request.method(), path) {
        (Endpoint::Admin, &Method::GET, "/config_dump") => {
            match serde_json::to_vec_pretty(&(admin.config_dump)()) {
                Ok(json) => with_type(text(StatusCode::OK, json), "application/json"),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the config: {e}\n")),
            }
        }
        (Endpoint::Admin, &Method::GET, "/logging") => {
            text(StatusCode::OK, format!("active filter: {}\n", admin.log.current()))
        }
        (Endpoint::Admin, &Method::POST, "/logging") => {
            let level = request
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .find_map(|pair| pair.strip_prefix("level="))
                .map(|v| v.replace("%2C", ",").replace("%3D", "="));
            match level {
                None => text(StatusCode::BAD_REQUEST, "POST /logging?level=<filter>, e.g. level=debug\n"),
                Some(level) => match admin.log.set(&level) {
                    Ok(()) => text(StatusCode::OK, format!("active filter: {level}\n")),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
            }
        }
        (Endpoint::Admin, &Method::POST, "/quitquitquit") => {
            let _ = admin.quit.send(true);
            text(StatusCode::OK, "OK\n")
        }
        (Endpoint::Admin, _, _) => text(
            StatusCode::NOT_FOUND,
            "endpoints: GET /config_dump, GET|POST /logging, POST /quitquitquit\n",
        ),
        (Endpoint::Metrics, &Method::GET, "/metrics" | "/stats/prometheus") => with_type(
            text(StatusCode::OK, telemetry::encode(&admin.registry)),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        (Endpoint::Metrics, _, _) => text(StatusCode::NOT_FOUND, "endpoints: GET /metrics\n"),
        (Endpoint::Readiness, &Method::GET, "/healthz/ready") => match admin.readiness.not_ready() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        (Endpoint::Readiness, _, _) => text(StatusCode::NOT_FOUND, "endpoints: GET /healthz/ready\n"),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

fn with_type(mut response: Response<Full<Bytes>>, content_type: &'static str) -> Response<Full<Bytes>> {
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn endpoints_answer_and_readiness_names_what_is_missing() {
        let readiness = Arc::new(Readiness::default());
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ready);
        readiness.add("xds", move || {
            (!flag.load(std::sync::atomic::Ordering::SeqCst)).then(|| "no workloads yet".to_owned())
        });
        let (quit, quit_rx) = watch::channel(false);
        let admin = Admin {
            config_dump: Box::new(|| serde_json::json!({"workloads": []})),
            registry: Arc::new(Registry::default()),
            readiness,
            log: telemetry::init_tracing(telemetry::LogFormat::Plain, "info"),
            quit,
        };
        let local = "127.0.0.1:0".parse().unwrap();
        let server = spawn(admin, AdminAddresses { admin: local, metrics: local, readiness: local }).unwrap();
        let a = server.addresses;
        let close = "Connection: close\r\n\r\n";

        let r = get(a.readiness, &format!("GET /healthz/ready HTTP/1.1\r\nHost: x\r\n{close}"));
        assert!(r.starts_with("HTTP/1.1 503") && r.contains("not ready: xds: no workloads yet"), "{r}");
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = get(a.readiness, &format!("GET /healthz/ready HTTP/1.1\r\nHost: x\r\n{close}"));
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");

        let r = get(a.admin, &format!("GET /config_dump HTTP/1.1\r\nHost: x\r\n{close}"));
        assert!(r.contains("\"workloads\": []"), "{r}");
        let r = get(a.metrics, &format!("GET /stats/prometheus HTTP/1.1\r\nHost: x\r\n{close}"));
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("# EOF"), "{r}");
        let r = get(a.admin, &format!("POST /logging?level=not%3D%3Dvalid HTTP/1.1\r\nHost: x\r\n{close}"));
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let r = get(a.admin, &format!("POST /logging?level=debug HTTP/1.1\r\nHost: x\r\n{close}"));
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("active filter: debug"), "{r}");
        let r = get(a.admin, &format!("POST /quitquitquit HTTP/1.1\r\nHost: x\r\n{close}"));
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(*quit_rx.borrow());
        // Garbage is answered 400 and the endpoint keeps serving.
        let r = get(a.admin, "\x16\x03\x01 not http\r\n\r\n");
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
        let r = get(a.metrics, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}"));
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
}
