//! The HBONE client: a pool of mutual-TLS HTTP/2 connections, each carrying many CONNECT
//! streams. Connections are keyed by (source identity, expected peer identities, source IP,
//! destination), capped in streams, and closed after sitting idle.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tracing::{debug, Instrument};

use super::stream::H2Stream;
use super::{Forwarded, BAGGAGE, FORWARDED, TRACEPARENT};
use crate::identity::Identity;
use crate::tls::{PeerError, WorkloadCertificate};

/// Limits of the client pool.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Streams one connection carries before the pool opens another (Istio's client: 100).
    pub max_streams_per_connection: usize,
    /// A connection with no stream for this long is closed (shorter than the server's 60 s, so
    /// the client normally closes first).
    pub idle_timeout: Duration,
    /// Deadline for TCP connect plus TLS and HTTP/2 handshakes.
    pub connect_timeout: Duration,
    /// Deadline for the CONNECT response once the request is sent.
    pub response_timeout: Duration,
    /// Bind a request's `source_ip` with IP_TRANSPARENT, so the outer connection may leave from
    /// a pod's address rather than one of this host's (needs CAP_NET_ADMIN).
    pub transparent: bool,
    /// SO_MARK on the outer connections, for the node's capture and routing to tell them apart.
    pub mark: Option<u32>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(45),
            connect_timeout: super::HANDSHAKE_TIMEOUT,
            response_timeout: Duration::from_secs(30),
            transparent: false,
            mark: None,
        }
    }
}

/// One stream to open.
#[derive(Clone)]
pub struct ConnectRequest {
    /// The source workload's certificate, presented as the client certificate.
    pub certificate: Arc<WorkloadCertificate>,
    /// Identities the server may present (the destination's, or its waypoint's).
    pub expected: Vec<Identity>,
    /// Source address for the outer connection, if it must be bound (ztunnel: the source pod's,
    /// as Istio's ztunnel does: the server identifies the source by it).
    pub source_ip: Option<IpAddr>,
    /// Where the HBONE server listens (`podIP:15008`).
    pub hbone_addr: SocketAddr,
    /// `:authority`, the destination the tunnel leads to.
    pub authority: SocketAddr,
    /// The `forwarded` header: the original client and the Service it called.
    pub forwarded: Forwarded,
    pub baggage: Option<String>,
    /// The W3C `traceparent` of this connection or request.
    pub traceparent: Option<String>,
}

/// Why a stream could not be opened. Each says what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TCP connect to {addr} failed: {source} (is port {} reachable?)", .addr.port())]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("TLS handshake with {addr} failed: {}", crate::tls::describe(.source))]
    Tls { addr: SocketAddr, source: rustls::Error },
    #[error("TLS with {addr} failed: {source}")]
    TlsIo { addr: SocketAddr, source: std::io::Error },
    #[error("{addr} did not negotiate ALPN h2; is it an HBONE server?")]
    NoH2 { addr: SocketAddr },
    #[error("{what} with {addr} did not finish within {after:?}")]
    Timeout { what: &'static str, addr: SocketAddr, after: Duration },
    #[error("HTTP/2 with {addr} failed: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("cannot build the CONNECT request for {authority}: {reason}")]
    BadRequest { authority: SocketAddr, reason: String },
    #[error("{addr} is unreachable: a dial that was in progress failed: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("CONNECT {authority} via {addr} was answered {status}")]
    Status { addr: SocketAddr, authority: SocketAddr, status: StatusCode },
}

/// Where a failure came from, for logs, response flags and retry decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The peer or the network to it: a refused or timed-out connect, a TLS or HTTP/2 failure,
    /// a CONNECT answered with an error.
    Upstream,
    /// The side that asked for the tunnel (its connection or request went away). The HBONE client
    /// reports none itself; proxies classify their own client-side failures with it.
    Downstream,
    /// This proxy: a request it could not build, a certificate it could not present.
    Local,
}

impl ClientError {
    /// Where the failure came from.
    pub fn origin(&self) -> Origin {
        match self {
            ClientError::BadRequest { .. } => Origin::Local,
            _ => Origin::Upstream,
        }
    }

    /// Whether trying again (another endpoint, or later) may succeed: connection-level failures
    /// and `503`s are; a refusal by policy (`401`), a bad request (`400`) or a certificate the
    /// peer or we refused are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::TlsIo { .. }
            | ClientError::Timeout { .. }
            | ClientError::H2 { .. }
            | ClientError::Unreachable { .. } => true,
            ClientError::Status { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE,
            ClientError::Tls { .. } | ClientError::NoH2 { .. } | ClientError::BadRequest { .. } => false,
        }
    }

    /// Whether the far side's policy refused the tunnel (`401`).
    pub fn is_denied(&self) -> bool {
        matches!(self, ClientError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED)
    }

    /// The certificate problem behind a TLS failure, if the verifier found one.
    pub fn peer_error(&self) -> Option<&PeerError> {
        match self {
            ClientError::Tls { source, .. } => PeerError::find(source),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Identity,
    /// Sorted, so the same set always finds the same connections.
    expected: Vec<Identity>,
    source_ip: Option<IpAddr>,
    hbone_addr: SocketAddr,
}

/// A pool of HBONE connections. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    settings: ClientSettings,
    keys: Mutex<HashMap<PoolKey, Arc<KeyedConnections>>>,
    next_id: AtomicU64,
    /// Connections established since the pool was made (for metrics and tests).
    opened: AtomicU64,
}

/// The connections for one key. The async lock serializes dialing so that a burst of streams
/// to a new destination opens one connection, not one each.
#[derive(Default)]
struct KeyedConnections {
    conns: tokio::sync::Mutex<Vec<Arc<PooledConnection>>>,
    /// The last failed dial: streams that were already waiting when it failed share its error
    /// instead of each dialing (and timing out) in turn.
    last_failure: Mutex<Option<(Instant, String)>>,
}

struct PooledConnection {
    id: u64,
    sender: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    closed: AtomicBool,
    idle_since: Mutex<Instant>,
}

impl KeyedConnections {
    fn failed_since(&self, since: Instant) -> Option<String> {
        let last = self.last_failure.lock().ok()?;
        last.as_ref().filter(|(at, _)| *at >= since).map(|(_, reason)| reason.clone())
    }

    fn record_failure(&self, err: &ClientError) {
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some((Instant::now(), err.to_string()));
        }
    }
}

impl PooledConnection {
    fn try_reserve(&self, max: usize) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
                .is_ok()
    }

    fn is_idle_for(&self, timeout: Duration) -> bool {
        self.active.load(Ordering::Acquire) == 0
            && self.idle_since.lock().map(|since| since.elapsed() >= timeout).unwrap_or(false)
    }
}

/// A stream slot on a pooled connection; released when the stream is dropped.
struct Slot(Arc<PooledConnection>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(mut since) = self.0.idle_since.lock() {
                *since = Instant::now();
            }
        }
    }
}

impl Pool {
    /// A new pool. Must be called inside a tokio runtime: it starts the idle reaper.
    pub fn new(settings: ClientSettings) -> Self {
        let inner = Arc::new(PoolInner {
            settings,
            keys: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            opened: AtomicU64::new(0),
        });
        tokio::spawn(reap_idle(Arc::downgrade(&inner)));
        Pool { inner }
    }

    /// Connections this pool has opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// Connections open right now.
    pub fn connections_open(&self) -> usize {
        let keys: Vec<_> = match self.inner.keys.lock() {
            Ok(keys) => keys.values().cloned().collect(),
            Err(_) => return 0,
        };
        keys.iter()
            .map(|k| {
                k.conns.try_lock().map(|c| c.iter().filter(|c| !c.closed.load(Ordering::Acquire)).count())
            })
            .map(|n| n.unwrap_or(0))
            .sum()
    }

    /// Opens one tunneled stream to `request.authority`, reusing a pooled connection with a free
    /// slot or dialing a new one.
    pub async fn connect(&self, request: ConnectRequest) -> Result<H2Stream, ClientError> {
        let mut expected = request.expected.clone();
        expected.sort();
        expected.dedup();
        let key = PoolKey {
            source: request.certificate.identity().clone(),
            expected,
            source_ip: request.source_ip,
            hbone_addr: request.hbone_addr,
        };
        let keyed = match self.inner.keys.lock() {
            Ok(mut keys) => keys.entry(key.clone()).or_default().clone(),
            Err(poisoned) => poisoned.into_inner().entry(key.clone()).or_default().clone(),
        };
        let waiting_since = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (slot, reused) = {
                let mut conns = keyed.conns.lock().await;
                conns.retain(|c| !c.closed.load(Ordering::Acquire));
                let max = self.inner.settings.max_streams_per_connection;
                match conns.iter().find(|c| c.try_reserve(max)) {
                    Some(conn) => (Slot(conn.clone()), true),
                    None => {
                        if let Some(reason) = keyed.failed_since(waiting_since) {
                            return Err(ClientError::Unreachable { addr: request.hbone_addr, reason });
                        }
                        let conn = match self.dial(&request, &key).await {
                            Ok(conn) => conn,
                            Err(e) => {
                                keyed.record_failure(&e);
                                return Err(e);
                            }
                        };
                        conn.active.fetch_add(1, Ordering::AcqRel);
                        conns.push(conn.clone());
                        (Slot(conn), false)
                    }
                }
            };
            match self.open_stream(&request, slot).await {
                // A pooled connection the server is closing (a GOAWAY, e.g. a ztunnel handing over
                // to its successor, or a reset) refused the stream before answering it: nothing
                // reached the destination, so one more try on a fresh connection is safe.
                Err(ClientError::H2 { source, .. })
                    if reused && attempt == 1 && refused_unanswered(&source) =>
                {
                    debug!(error = %source, "pooled HBONE connection is going away; retrying on another");
                    continue;
                }
                result => return result,
            }
        }
    }

    async fn dial(
        &self,
        request: &ConnectRequest,
        key: &PoolKey,
    ) -> Result<Arc<PooledConnection>, ClientError> {
        let addr = request.hbone_addr;
        let after = self.inner.settings.connect_timeout;
        let timeout = |what| ClientError::Timeout { what, addr, after };
        let deadline = tokio::time::Instant::now() + after;

        let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
        let socket = socket.map_err(|source| ClientError::Connect { addr, source })?;
        self.prepare(&socket, key.source_ip).map_err(|source| ClientError::Connect { addr, source })?;
        let tcp = tokio::time::timeout_at(deadline, socket.connect(addr))
            .await
            .map_err(|_| timeout("TCP connect"))?
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);

        let config = request.certificate.client_config(key.expected.clone());
        // No SNI is sent (the config disables it); the name only satisfies the API.
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = tokio::time::timeout_at(
            deadline,
            TlsConnector::from(config).connect(name, super::ReadBuffered::new(tcp)),
        )
        .await
        .map_err(|_| timeout("TLS handshake"))?
        .map_err(|source| {
            match source.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                Some(tls) => ClientError::Tls { addr, source: tls.clone() },
                None => ClientError::TlsIo { addr, source },
            }
        })?;
        let (_, session) = tls.get_mut();
        if session.alpn_protocol() != Some(crate::tls::ALPN_H2) {
            return Err(ClientError::NoH2 { addr });
        }
        session.set_buffer_limit(Some(super::TLS_SEND_BUFFER));

        let handshake = h2::client::Builder::new()
            .initial_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME_SIZE)
            .max_header_list_size(super::MAX_HEADER_LIST)
            .handshake::<_, Bytes>(tls);
        let (sender, connection) = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| timeout("HTTP/2 handshake"))?
            .map_err(|source| ClientError::H2 { addr, source })?;

        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(PooledConnection {
            id,
            sender,
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        });
        let weak = Arc::downgrade(&conn);
        let span = tracing::debug_span!("hbone_client_conn", id, %addr);
        tokio::spawn(
            async move {
                if let Err(e) = connection.await {
                    debug!(error = %e, "HBONE connection ended with an error");
                }
                if let Some(conn) = weak.upgrade() {
                    conn.closed.store(true, Ordering::Release);
                }
                debug!("HBONE connection closed");
            }
            .instrument(span),
        );
        debug!(id, %addr, source = %key.source, "HBONE connection opened");
        Ok(conn)
    }

    /// Marks the outer connection's socket and binds its source address, if any.
    fn prepare(&self, socket: &TcpSocket, source_ip: Option<IpAddr>) -> std::io::Result<()> {
        let settings = &self.inner.settings;
        let sock = socket2::SockRef::from(socket);
        if let Some(mark) = settings.mark {
            sock.set_mark(mark)?;
        }
        let Some(ip) = source_ip else { return Ok(()) };
        if settings.transparent {
            sock.set_ip_transparent(true)?;
        }
        socket.bind(SocketAddr::new(ip.to_canonical(), 0))
    }

    async fn open_stream(&self, request: &ConnectRequest, slot: Slot) -> Result<H2Stream, ClientError> {
        let addr = request.hbone_addr;
        let conn = slot.0.clone();
        let h2_error = |source: h2::Error| {
            // A connection-level failure (e.g. the server refused our certificate after the
            // TLS 1.3 handshake looked complete): no later stream may pick this connection.
            if source.is_io() || source.is_go_away() {
                conn.closed.store(true, Ordering::Release);
            }
            ClientError::H2 { addr, source }
        };
        let mut sender = slot.0.sender.clone().ready().await.map_err(h2_error)?;

        let mut builder = Request::builder().method(Method::CONNECT).uri(request.authority.to_string());
        if let Some(forwarded) = request.forwarded.to_header() {
            builder = builder.header(FORWARDED, forwarded);
        }
        if let Some(baggage) = &request.baggage {
            builder = builder.header(BAGGAGE, baggage);
        }
        if let Some(traceparent) = &request.traceparent {
            builder = builder.header(TRACEPARENT, traceparent);
        }
        // baggage and traceparent come from the caller (workload metadata): refuse, never panic,
        // if one is not a valid header value.
        let connect = builder
            .body(())
            .map_err(|e| ClientError::BadRequest { authority: request.authority, reason: e.to_string() })?;
        let (response, send) = sender.send_request(connect, false).map_err(h2_error)?;

        let after = self.inner.settings.response_timeout;
        let response = tokio::time::timeout(after, response)
            .await
            .map_err(|_| ClientError::Timeout { what: "CONNECT response", addr, after })?
            .map_err(h2_error)?;
        if response.status() != StatusCode::OK {
            return Err(ClientError::Status {
                addr,
                authority: request.authority,
                status: response.status(),
            });
        }
        Ok(H2Stream::new(send, response.into_body(), Some(Box::new(slot))))
    }
}

/// Whether a CONNECT failed because its connection went away before the server answered.
fn refused_unanswered(e: &h2::Error) -> bool {
    e.is_go_away() || e.is_io() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Closes connections idle past the timeout; ends when the pool is dropped.
async fn reap_idle(pool: Weak<PoolInner>) {
    let period = match pool.upgrade() {
        Some(pool) => (pool.settings.idle_timeout / 4).max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        let timeout = pool.settings.idle_timeout;
        let Ok(mut keys) = pool.keys.lock() else { return };
        keys.retain(|_, keyed| {
            // Skip keys being dialed right now; the next round gets them.
            let Ok(mut conns) = keyed.conns.try_lock() else { return true };
            conns.retain(|c| {
                let keep = !c.closed.load(Ordering::Acquire) && !c.is_idle_for(timeout);
                if !keep {
                    debug!(id = c.id, "closing idle HBONE connection");
                }
                keep
            });
            !conns.is_empty()
        });
    }
}

#[cfg(test)]
mod classification_tests {
    use super::*;

    #[test]
    fn each_error_says_where_it_came_from_and_whether_to_retry() {
        let addr: SocketAddr = "10.0.0.1:15008".parse().unwrap();
        let status = |status| ClientError::Status { addr, authority: addr, status };
        let connect = ClientError::Connect { addr, source: std::io::ErrorKind::ConnectionRefused.into() };
        let bad = ClientError::BadRequest { authority: addr, reason: "header".into() };
        let cases = [
            (connect, Origin::Upstream, true, false),
            (
                ClientError::Timeout { what: "TLS", addr, after: Duration::from_secs(1) },
                Origin::Upstream,
                true,
                false,
            ),
            (ClientError::NoH2 { addr }, Origin::Upstream, false, false),
            (status(StatusCode::SERVICE_UNAVAILABLE), Origin::Upstream, true, false),
            (status(StatusCode::UNAUTHORIZED), Origin::Upstream, false, true),
            (status(StatusCode::BAD_REQUEST), Origin::Upstream, false, false),
            (bad, Origin::Local, false, false),
        ];
        for (error, origin, retryable, denied) in cases {
            assert_eq!(
                (error.origin(), error.is_retryable(), error.is_denied()),
                (origin, retryable, denied),
                "{error}"
            );
        }
    }
}
