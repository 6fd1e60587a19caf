//! Upstream connections: HBONE to the chosen endpoint's `podIP:15008` with the waypoint's own
//! certificate, expecting the endpoint's identity, `:authority` the endpoint's `ip:target
//! port` and `forwarded: for=` the original client (which the endpoint's ztunnel believes from
//! its waypoint); over that tunnel HTTP/1.1 (connections pooled per endpoint and client, one
//! request at a time) or HTTP/2 (one connection per endpoint and client, multiplexed), or the
//! raw bytes of a TCP stream.
//!
//! Connections are keyed by the client as well as the endpoint so that the tunnel's `for=`
//! stays true: the application sees its real caller, as without a waypoint.
//!
//! A request first gets a [`Connection`] ([`Upstreams::connect`]) and is then sent on it, so
//! that a connect failure leaves the request unsent (and retriable with its body untouched).
//! The DestinationRule's connection pool ([`Limits`]) applies per cluster, as Envoy's circuit
//! breakers do:
//! - `tcp.maxConnections`: HTTP/1.1 connections open to the cluster's endpoints. A request
//!   that finds none idle and the limit reached waits for one (an idle connection to another
//!   endpoint is closed to make room), unless `http.http1MaxPendingRequests` are already
//!   waiting: then it fails at once with [`UpstreamError::Overflow`] (503 UO).
//! - `http.maxRequestsPerConnection`: a connection is closed after that many requests.
//! - `http.idleTimeout` (default 45 s here; Envoy's is 1 h, but the far side may close first)
//!   and `tcp.maxConnectionDuration`: an idle connection past either is not reused.
//! - `tcp.connectTimeout` (default 10 s, Istio's): the tunnel and handshake together.
//!
//! `http.h2UpgradePolicy` and `http.useClientProtocol` choose the protocol ([`crate::http`]).
//!
//! Not applied: `tcp.maxConnections` to HTTP/2 (one connection per endpoint and client),
//! `http.maxConcurrentStreams` (the endpoint's own SETTINGS limit applies), `tcp.tcpKeepalive`
//! (the HBONE connections under the tunnels are shared by every cluster) and `tcp.idleTimeout`
//! for TCP streams.

use std::collections::HashMap;
use std::error::Error as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;
use tracing::debug;
use weft_core::hbone::{ClientError, ConnectRequest, Forwarded, H2Stream, Pool};
use weft_core::identity::Identity;
use weft_core::names::HBONE_PORT;
use weft_core::tls::WorkloadCertificate;

use crate::model::ConnectionPool;

/// The body every upstream request carries.
pub type Body = BoxBody<Bytes, hyper::Error>;

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
    #[error("HBONE to {address}: no connection within {timeout:?} (connectTimeout)")]
    ConnectTimeout { address: SocketAddr, timeout: Duration },
    #[error("request to {address}: {source}")]
    Request {
        address: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("{cluster}: {limit} reached (DestinationRule connectionPool)")]
    Overflow { cluster: String, limit: &'static str },
}

impl UpstreamError {
    /// Whether no byte of the request reached the endpoint's application (a connect failure).
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::Tunnel { .. }
                | UpstreamError::Handshake { .. }
                | UpstreamError::ConnectTimeout { .. }
        )
    }

    /// Whether the endpoint refused the HTTP/2 stream (REFUSED_STREAM: it did not process it).
    pub fn is_refused_stream(&self) -> bool {
        let UpstreamError::Request { source, .. } = self else { return false };
        let mut cause = source.source();
        while let Some(e) = cause {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            cause = e.source();
        }
        false
    }
}

/// A cluster's connection pool settings, as [`Upstreams::connect`] applies them.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Envoy's cluster name, for errors.
    pub cluster: String,
    pub max_connections: Option<usize>,
    pub max_pending: Option<usize>,
    pub max_requests_per_connection: Option<u32>,
    pub idle_timeout: Duration,
    pub max_connection_duration: Option<Duration>,
    pub connect_timeout: Duration,
}

/// Istio's connect timeout.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Limits {
    pub fn new(cluster: String, pool: Option<&ConnectionPool>) -> Limits {
        let count = |n: Option<std::num::NonZeroU32>| n.map(|n| n.get() as usize);
        Limits {
            cluster,
            max_connections: count(pool.and_then(|p| p.max_connections)),
            max_pending: count(pool.and_then(|p| p.http1_max_pending_requests)),
            max_requests_per_connection: pool.and_then(|p| p.max_requests_per_connection).map(|n| n.get()),
            idle_timeout: pool.and_then(|p| p.idle_timeout).unwrap_or(IDLE_TIMEOUT),
            max_connection_duration: pool.and_then(|p| p.max_connection_duration),
            connect_timeout: pool.and_then(|p| p.connect_timeout).unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        }
    }
}

/// Idle HTTP/1.1 connections kept per endpoint and client.
const MAX_IDLE_PER_KEY: usize = 64;
/// An idle HTTP/1.1 connection older than this is closed rather than reused (the far side may
/// be about to close it), unless the DestinationRule says otherwise.
const IDLE_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    address: SocketAddr,
    client: IpAddr,
}

/// An open HTTP/1.1 connection's bookkeeping.
struct H1 {
    sender: http1::SendRequest<Body>,
    opened: Instant,
    requests: u32,
}

struct Idle {
    connection: H1,
    since: Instant,
}

/// One cluster's HTTP/1.1 connections.
#[derive(Default)]
struct ClusterPool {
    idle: HashMap<Key, Vec<Idle>>,
    /// Connections open (idle or busy), against `tcp.maxConnections`.
    open: usize,
    /// Requests waiting for a connection, against `http1MaxPendingRequests`.
    pending: usize,
    /// Woken when a connection closes or goes idle.
    freed: Arc<Notify>,
}

/// An HTTP/2 connection and when it opened.
type H2 = (http2::SendRequest<Body>, Instant);

type H1Pools = Arc<Mutex<HashMap<String, ClusterPool>>>;

/// A connection slot of a cluster, released (and a waiter woken) when the connection ends.
struct Slot {
    pools: H1Pools,
    cluster: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get_mut(&self.cluster) {
            pool.open = pool.open.saturating_sub(1);
            pool.freed.notify_one();
        }
    }
}

/// A request waiting for a connection, counted until it stops waiting.
struct Pending {
    pools: H1Pools,
    cluster: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get_mut(&self.cluster) {
            pool.pending = pool.pending.saturating_sub(1);
        }
    }
}

/// A connection a request can be sent on.
pub enum Connection {
    Http1 { connection: H1Connection },
    Http2 { sender: http2::SendRequest<Body>, address: SocketAddr },
}

/// An HTTP/1.1 connection taken from its cluster's pool, returned after its response.
pub struct H1Connection {
    connection: H1,
    key: Key,
    limits: Limits,
    pools: H1Pools,
}

/// The waypoint's upstream connections. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Upstreams {
    hbone: Pool,
    h1: H1Pools,
    h2: Arc<Mutex<HashMap<Key, H2>>>,
}

/// What [`Upstreams::connect`] reports besides the connection: whether the connection limit
/// was reached on the way (Envoy's `upstream_cx_overflow`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectReport {
    pub connection_limit_reached: bool,
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

    /// A connection to `endpoint` over HTTP/2 (`http2`) or HTTP/1.1, within `limits` (see the
    /// module docs).
    pub async fn connect(
        &self,
        certificate: Arc<WorkloadCertificate>,
        endpoint: &Endpoint,
        http2: bool,
        limits: &Limits,
        report: &mut ConnectReport,
    ) -> Result<Connection, UpstreamError> {
        let connect = async {
            if http2 {
                self.connect_http2(certificate, endpoint, limits).await
            } else {
                self.connect_http1(certificate, endpoint, limits, report).await
            }
        };
        connect.await
    }

    async fn connect_http2(
        &self,
        certificate: Arc<WorkloadCertificate>,
        endpoint: &Endpoint,
        limits: &Limits,
    ) -> Result<Connection, UpstreamError> {
        let key = Key { address: endpoint.address, client: endpoint.client };
        let existing = {
            let pool = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            pool.get(&key)
                .filter(|(s, opened)| {
                    !s.is_closed() && limits.max_connection_duration.is_none_or(|max| opened.elapsed() < max)
                })
                .map(|(s, _)| s.clone())
        };
        if let Some(sender) = existing {
            return Ok(Connection::Http2 { sender, address: key.address });
        }
        let handshake = async {
            let tunnel = self.tunnel(certificate, endpoint).await?;
            http2::Builder::new(TokioExecutor::new())
                .handshake(TokioIo::new(tunnel))
                .await
                .map_err(|source| UpstreamError::Handshake { address: key.address, source })
        };
        let (sender, connection) = within(limits, key.address, handshake).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        self.h2.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (sender.clone(), Instant::now()));
        Ok(Connection::Http2 { sender, address: key.address })
    }

    async fn connect_http1(
        &self,
        certificate: Arc<WorkloadCertificate>,
        endpoint: &Endpoint,
        limits: &Limits,
        report: &mut ConnectReport,
    ) -> Result<Connection, UpstreamError> {
        let key = Key { address: endpoint.address, client: endpoint.client };
        let mut _pending = None;
        loop {
            let freed = {
                let mut pools = self.h1.lock().unwrap_or_else(|p| p.into_inner());
                let pool = pools.entry(limits.cluster.clone()).or_default();
                if let Some(connection) = take_idle(pool, key, limits) {
                    return Ok(self.h1_connection(connection, key, limits));
                }
                if limits.max_connections.is_none_or(|max| pool.open < max) {
                    pool.open += 1;
                    break;
                }
                report.connection_limit_reached = true;
                // Make room: an idle connection to another endpoint closes (its slot frees).
                if let Some(other) = pool.idle.values_mut().find(|idle| !idle.is_empty()) {
                    other.pop();
                }
                if _pending.is_none() {
                    if limits.max_pending.is_some_and(|max| pool.pending >= max) {
                        return Err(UpstreamError::Overflow {
                            cluster: limits.cluster.clone(),
                            limit: "http1MaxPendingRequests",
                        });
                    }
                    pool.pending += 1;
                    _pending = Some(Pending { pools: self.h1.clone(), cluster: limits.cluster.clone() });
                }
                pool.freed.clone()
            };
            freed.notified().await;
        }
        drop(_pending);
        let slot = Slot { pools: self.h1.clone(), cluster: limits.cluster.clone() };
        let handshake = async {
            let tunnel = self.tunnel(certificate, endpoint).await?;
            http1::Builder::new()
                .handshake(TokioIo::new(tunnel))
                .await
                .map_err(|source| UpstreamError::Handshake { address: key.address, source })
        };
        // On failure the slot drops here, freeing its place.
        let (sender, connection) = within(limits, key.address, handshake).await?;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection.with_upgrades().await {
                debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        let connection = H1 { sender, opened: Instant::now(), requests: 0 };
        Ok(self.h1_connection(connection, key, limits))
    }

    fn h1_connection(&self, connection: H1, key: Key, limits: &Limits) -> Connection {
        Connection::Http1 {
            connection: H1Connection { connection, key, limits: limits.clone(), pools: self.h1.clone() },
        }
    }
}

/// `connect` within the cluster's connect timeout.
async fn within<T>(
    limits: &Limits,
    address: SocketAddr,
    connect: impl std::future::Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    tokio::time::timeout(limits.connect_timeout, connect)
        .await
        .map_err(|_| UpstreamError::ConnectTimeout { address, timeout: limits.connect_timeout })?
}

/// An idle connection for `key` that may still be used.
fn take_idle(pool: &mut ClusterPool, key: Key, limits: &Limits) -> Option<H1> {
    let idle = pool.idle.get_mut(&key)?;
    while let Some(Idle { connection, since }) = idle.pop() {
        if since.elapsed() < limits.idle_timeout
            && limits.max_connection_duration.is_none_or(|max| connection.opened.elapsed() < max)
            && connection.sender.is_ready()
        {
            return Some(connection);
        }
    }
    None
}

impl Connection {
    /// Sends `request`. HTTP/1.1 wants an origin-form target and a `Host` header; HTTP/2 an
    /// absolute URI (it makes `:scheme` and `:authority`). An HTTP/1.1 connection goes back to
    /// its pool once the response's body has been read.
    pub async fn send(self, request: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        match self {
            Connection::Http2 { mut sender, address } => sender
                .send_request(request)
                .await
                .map_err(|source| UpstreamError::Request { address, source }),
            Connection::Http1 { connection } => connection.send(request).await,
        }
    }
}

impl H1Connection {
    async fn send(self, request: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        let H1Connection { mut connection, key, limits, pools } = self;
        let response = connection
            .sender
            .send_request(request)
            .await
            .map_err(|source| UpstreamError::Request { address: key.address, source })?;
        connection.requests += 1;
        if limits.max_requests_per_connection.is_some_and(|max| connection.requests >= max) {
            // Dropping the sender closes the connection once this response is done.
            return Ok(response);
        }
        // The connection takes another request once this response's body is read: pool it then.
        tokio::spawn(async move {
            if connection.sender.ready().await.is_ok() {
                let mut pools = pools.lock().unwrap_or_else(|p| p.into_inner());
                let pool = pools.entry(limits.cluster.clone()).or_default();
                let idle = pool.idle.entry(key).or_default();
                idle.retain(|i| i.since.elapsed() < limits.idle_timeout && !i.connection.sender.is_closed());
                if idle.len() < MAX_IDLE_PER_KEY {
                    idle.push(Idle { connection, since: Instant::now() });
                }
                pool.freed.notify_one();
            }
        });
        Ok(response)
    }
}
