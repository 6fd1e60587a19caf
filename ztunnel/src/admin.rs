//! ztunnel's three small HTTP/1.1 endpoints, on Istio's ports:
//! - admin (15000, localhost): `GET /config_dump` (workloads, services, policies, certificates),
//!   `POST /quitquitquit` (graceful exit);
//! - metrics (15020): `GET /metrics` (also `/stats/prometheus`), Prometheus text format;
//! - readiness (15021): `GET /healthz/ready`: 200 once the first xDS push of each type is in, the
//!   capture is set up for the pods it names and a certificate for every local mesh identity is
//!   in, else 503 saying what is missing.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use weft_core::cert_manager::{CertManager, CertificateSource};

use crate::capture::LocalPods;
use crate::state::{ConfigDump, ProxyState};
use crate::xds::Synced;

/// What the endpoints read.
pub struct AdminState<S> {
    pub state: Arc<RwLock<ProxyState>>,
    pub certs: Arc<CertManager<S>>,
    pub registry: Arc<Registry>,
    pub synced: watch::Receiver<Synced>,
    pub local: watch::Receiver<LocalPods>,
    /// Sent on `POST /quitquitquit`.
    pub quit: watch::Sender<bool>,
}

#[derive(Serialize)]
struct Dump {
    #[serde(flatten)]
    config: ConfigDump,
    certificates: Vec<CertificateDump>,
}

#[derive(Serialize)]
struct CertificateDump {
    identity: String,
    /// Seconds since the Unix epoch.
    not_after: u64,
}

impl<S: CertificateSource> AdminState<S> {
    /// Why the proxy is not ready yet, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        let synced = *self.synced.borrow();
        if !synced.addresses {
            return Some("no workloads from the controller yet".to_owned());
        }
        if !synced.authorizations {
            return Some("no policies from the controller yet".to_owned());
        }
        let local = self.local.borrow();
        if synced.complete_at.is_some_and(|at| local.generation < at) {
            return Some("capture not yet set up for this node's pods".to_owned());
        }
        let missing: Vec<String> = local
            .identities
            .iter()
            .filter(|id| self.certs.current(id).is_none())
            .map(|id| id.to_string())
            .collect();
        (!missing.is_empty()).then(|| format!("no certificate yet for {}", missing.join(", ")))
    }

    fn config_dump(&self) -> Dump {
        let config = self.state.read().unwrap_or_else(|p| p.into_inner()).config_dump();
        let local = self.local.borrow().clone();
        let certificates = local
            .identities
            .iter()
            .filter_map(|id| self.certs.current(id))
            .map(|c| CertificateDump {
                identity: c.identity().to_string(),
                not_after: c
                    .not_after()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default(),
            })
            .collect();
        Dump { config, certificates }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// The admin endpoint's answer to `request`.
pub fn admin<S: CertificateSource>(
    admin: &AdminState<S>,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/config_dump") => match serde_json::to_vec_pretty(&admin.config_dump()) {
            Ok(json) => {
                let mut response = text(StatusCode::OK, json);
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                response
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the config: {e}\n")),
        },
        (&Method::POST, "/quitquitquit") => {
            let _ = admin.quit.send(true);
            text(StatusCode::OK, "OK\n")
        }
        _ => text(StatusCode::NOT_FOUND, "endpoints: GET /config_dump, POST /quitquitquit\n"),
    }
}

/// The metrics endpoint's answer to `request`.
pub fn metrics<S>(admin: &AdminState<S>, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics" | "/stats/prometheus") => {
            let mut response = text(StatusCode::OK, crate::metrics::encode(&admin.registry));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "endpoints: GET /metrics\n"),
    }
}

/// The readiness endpoint's answer to `request`.
pub fn readiness<S: CertificateSource>(
    admin: &AdminState<S>,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz/ready") => match admin.not_ready() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "endpoints: GET /healthz/ready\n"),
    }
}

/// Serves HTTP/1.1 on `listener` with `handler` until `shutdown` resolves.
pub async fn serve<H>(listener: TcpListener, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = handler(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await
            {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}
