//! Upstream connections: HBONE to the chosen endpoint's `podIP:15008` with the waypoint's own
//! certificate, expecting the endpoint's identity, `:authority` the endpoint's `ip:target
//! port` and `forwarded: for=` the original client (which the endpoint's ztunnel believes from
//! its waypoint); over that tunnel HTTP/1.1 (connections pooled per endpoint and client, one
//! request at a time) or HTTP/2 (one connection per endpoint and client, multiplexed), or the
//! raw bytes of a TCP stream.
//!
//! Connections are keyed by the client as well as the endpoint so that the tunnel's `for=`
//! stays true: the application sees its real caller, as without a waypoint.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;
use weft_core::hbone::{ClientError, ConnectRequest, Forwarded, H2Stream, Pool};
use weft_core::identity::Identity;
use weft_core::names::HBONE_PORT;
use weft_core::tls::WorkloadCertificate;

/// The body every upstream request carries.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Idle HTTP/1.1 connections kept per endpoint and client.
const MAX_IDLE_PER_KEY: usize = 64;
/// An idle HTTP/1.1 connection older than this is closed rather than reused (the far side may
/// be about to close it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// Where a tunnel goes and for whom.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The endpoint's `ip:target port` (the CONNECT authority).
    pub address: SocketAddr,
    /// The identity the endpoint's ztunnel must present.
    pub identity: Identity,
    /// The original client (the tunnel's `for=`).
    pub client: IpAddr,
    /// The service the client called, when it called one (the tunnel's `host=`).
    pub service: Option<String>,
    pub traceparent: Option<String>,
}

/// Why an upstream request failed before a response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("HBONE to {address}: {source}")]
    Tunnel {
        address: SocketAddr,
        #[source]
        source: ClientError,
    },
    #[error("HTTP handshake with {address}: {source}")]
    Handshake {
        address: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("request to {address}: {source}")]
    Request {
        address: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Whether no byte of the request reached the endpoint's application (a connect failure).
    pub fn is_connect_failure(&self) -> bool {
        !matches!(self, UpstreamError::Request { .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    address: SocketAddr,
    client: IpAddr,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// The waypoint's upstream connections. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Upstreams {
    hbone: Pool,
    h1: Arc<Mutex<HashMap<Key, Vec<Idle>>>>,
    h2: Arc<Mutex<HashMap<Key, http2::SendRequest<Body>>>>,
}

impl Upstreams {
    pub fn new(hbone: Pool) -> Upstreams {
        Upstreams { hbone, h1: Arc::default(), h2: Arc::default() }
    }

    /// A tunnel to `endpoint` (for a TCP stream, or a new HTTP connection).
    pub async fn tunnel(
        &self,
        certificate: Arc<WorkloadCertificate>,
        endpoint: &Endpoint,
    ) -> Result<H2Stream, UpstreamError> {
        let address = endpoint.address;
        let request = ConnectRequest {
            certificate,
            expected: vec![endpoint.identity.clone()],
            source_ip: None,
            hbone_addr: SocketAddr::new(address.ip(), HBONE_PORT),
            authority: address,
            forwarded: Forwarded {
                for_addr: Some(SocketAddr::new(endpoint.client, 0)),
                host: endpoint.service.clone(),
            },
            baggage: None,
            traceparent: endpoint.traceparent.clone(),
        };
        self.hbone.connect(request).await.map_err(|source| UpstreamError::Tunnel { address, source })
    }

    /// Sends `request` to `endpoint` over HTTP/1.1, on an idle pooled connection or a new one.
    /// The request's target must be in origin form with a `Host` header.
    pub async fn send_http1(
        &self,
        certificate: Arc<WorkloadCertificate>,
        endpoint: &Endpoint,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = Key { address: endpoint.address, client: endpoint.client };
        let mut sender = match self.idle_http1(key) {
            Some(sender) => sender,
            None => {
                let tunnel = self.tunnel(certificate, endpoint).await?;
                let (sender, connection) = http1::Builder::new()
                    .handshake(TokioIo::new(tunnel))
                    .await
                    .map_err(|source| UpstreamError::Handshake { address: key.address, source })?;
                tokio::spawn(async move {
                    if let Err(e) = connection.with_upgrades().await {
                        debug!(error = %e, "upstream HTTP/1.1 connection ended");
                    }
                });
                sender
            }
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| UpstreamError::Request { address: key.address, source })?;
        // The connection takes another request once this response's body is read: pool it then.
        let pool = self.h1.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
                let idle = pool.entry(key).or_default();
                idle.retain(|i| i.since.elapsed() < IDLE_TIMEOUT && !i.sender.is_closed());
                if idle.len() < MAX_IDLE_PER_KEY {
                    idle.push(Idle { sender, since: Instant::now() });
                }
            }
        });
        Ok(response)
    }

    /// Sends `request` to `endpoint` over HTTP/2, on the endpoint's connection (opened when
    /// there is none). The request's URI must be absolute (it makes `:scheme` and `:authority`).
    pub async fn send_http2(
        &self,
        certificate: Arc<WorkloadCertificate>,
        endpoint: &Endpoint,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = Key { address: endpoint.address, client: endpoint.client };
        let existing = {
            let pool = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            pool.get(&key).filter(|s| !s.is_closed()).cloned()
        };
        let mut sender = match existing {
            Some(sender) => sender,
            None => {
                let tunnel = self.tunnel(certificate, endpoint).await?;
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .handshake(TokioIo::new(tunnel))
                    .await
                    .map_err(|source| UpstreamError::Handshake { address: key.address, source })?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        debug!(error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                self.h2.lock().unwrap_or_else(|p| p.into_inner()).insert(key, sender.clone());
                sender
            }
        };
        sender
            .send_request(request)
            .await
            .map_err(|source| UpstreamError::Request { address: key.address, source })
    }

    fn idle_http1(&self, key: Key) -> Option<http1::SendRequest<Body>> {
        let mut pool = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        let idle = pool.get_mut(&key)?;
        while let Some(Idle { sender, since }) = idle.pop() {
            if since.elapsed() < IDLE_TIMEOUT && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }
}
