//! The HBONE server: one listener, many mutual-TLS HTTP/2 connections, one CONNECT stream per
//! proxied TCP connection. What to present, whether to accept each CONNECT and what to do with
//! its tunnel after the `200` are asked of an [`Inbound`] (ztunnel connects to the pod and
//! copies; a waypoint serves HTTP on the tunnel); this module owns the protocol, the limits and
//! draining.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, Instrument};

use super::stream::H2Stream;
use super::{is_traceparent, Forwarded, BAGGAGE, FORWARDED, TRACEPARENT};
use crate::accept::{self, Limits};
use crate::drain;
use crate::identity::Identity;
use crate::tls::CertInfo;

/// Limits of the server.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Concurrent CONNECT streams per connection (Istio's server allows 200).
    pub max_streams_per_connection: u32,
    /// Concurrent connections; further accepts wait.
    pub max_connections: usize,
    /// Concurrent connections from one source address; more are refused at once, so one pod
    /// (or one node's proxy) cannot take the listener's connections from everyone else.
    pub max_connections_per_source: usize,
    /// TLS and HTTP/2 handshake deadline.
    pub handshake_timeout: Duration,
    /// A connection that has carried no stream for this long is closed (gracefully: a GOAWAY
    /// the client sees before it opens another stream). Longer than the client pool's idle
    /// timeout, so a client normally closes first.
    pub idle_timeout: Duration,
    /// After a drain begins, how long connections may take to finish before they are cut.
    pub drain_deadline: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_streams_per_connection: 200,
            max_connections: 10_000,
            max_connections_per_source: accept::MAX_CONNECTIONS_PER_SOURCE,
            handshake_timeout: super::HANDSHAKE_TIMEOUT,
            idle_timeout: Duration::from_secs(60),
            drain_deadline: Duration::from_secs(5),
        }
    }
}

/// One CONNECT as the server received it.
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    /// The client's SPIFFE identity, from its verified certificate.
    pub peer_identity: Identity,
    /// The client's leaf certificate (shared by all streams of its connection).
    pub peer_certificate: Arc<CertificateDer<'static>>,
    /// The TLS connection's remote address (the peer proxy).
    pub peer_addr: SocketAddr,
    /// The address the connection was accepted on (identifies the destination workload).
    pub local_addr: SocketAddr,
    /// `:authority`: where the client wants to go.
    pub authority: SocketAddr,
    /// The `forwarded` header as sent: the peer's word, to be believed only from a peer trusted
    /// for it.
    pub forwarded: Forwarded,
    pub baggage: Option<String>,
    /// The W3C `traceparent`, when a well-formed one was sent.
    pub traceparent: Option<String>,
}

/// Why a CONNECT is refused, and the status sent back.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

impl Refusal {
    /// 401: policy denies the caller.
    pub fn denied(reason: impl Into<String>) -> Self {
        Refusal { status: StatusCode::UNAUTHORIZED, reason: reason.into() }
    }

    /// 503: the destination could not be reached.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Refusal { status: StatusCode::SERVICE_UNAVAILABLE, reason: reason.into() }
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Refusal { status: StatusCode::BAD_REQUEST, reason: reason.into() }
    }
}

/// What the server asks of its owner: which certificate to present on a connection, whether to
/// accept each CONNECT, and what to do with the tunnel of an accepted one.
pub trait Inbound: Send + Sync + 'static {
    /// What accepting a CONNECT prepared for serving its tunnel (ztunnel: the connected pod).
    type Accepted: Send + 'static;

    /// The TLS server configuration for a connection accepted on `local` (the certificate of
    /// the workload addressed there).
    fn tls_config(
        &self,
        local: SocketAddr,
    ) -> impl Future<Output = Result<Arc<rustls::ServerConfig>, String>> + Send;

    /// Accepts one CONNECT (the `200` follows) or refuses it. Must resolve promptly (time out
    /// its own connect attempts): the client is waiting for the response.
    fn accept(&self, info: ConnectInfo) -> impl Future<Output = Result<Self::Accepted, Refusal>> + Send;

    /// Serves the tunnel of an accepted CONNECT, after the `200`, until it is done.
    fn serve(&self, accepted: Self::Accepted, tunnel: H2Stream) -> impl Future<Output = ()> + Send;
}

/// Serves a tunnel by copying it to and from `upstream` until both sides are done (what an
/// [`Inbound`] that forwards TCP does in [`Inbound::serve`]).
pub async fn forward<U>(mut tunnel: H2Stream, mut upstream: U, authority: SocketAddr)
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    match super::copy_bidirectional(&mut tunnel, &mut upstream).await {
        Ok((sent, received)) => debug!(%authority, sent, received, "HBONE stream closed"),
        Err(e) => debug!(%authority, error = %e, kind = ?e.kind(), "HBONE stream ended with an error"),
    }
}

/// What happened to a connection or stream the server refused; for logs, metrics and tests.
#[derive(Debug, Clone)]
pub enum ServerEvent {
    /// The TLS handshake failed (plaintext, no client certificate, a certificate refused...).
    HandshakeFailed { peer: SocketAddr, reason: String },
    /// TLS succeeded but the client did not negotiate ALPN `h2`.
    NotH2 { peer: SocketAddr, alpn: Option<String> },
    /// The HTTP/2 connection failed (e.g. an HTTP/1.1 request inside TLS).
    ProtocolError { peer: SocketAddr, reason: String },
    /// A CONNECT was answered with a non-200 status.
    StreamRefused { peer: SocketAddr, authority: String, status: StatusCode, reason: String },
}

/// An HBONE server bound to a listener.
pub struct Server<I> {
    listener: TcpListener,
    settings: ServerSettings,
    inbound: Arc<I>,
    events: broadcast::Sender<ServerEvent>,
}

impl<I: Inbound> Server<I> {
    pub fn new(listener: TcpListener, settings: ServerSettings, inbound: Arc<I>) -> Self {
        let (events, _) = broadcast::channel(256);
        Server { listener, settings, inbound, events }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Refusals as they happen. Slow subscribers miss events rather than slowing the server.
    pub fn events(&self) -> broadcast::Receiver<ServerEvent> {
        self.events.subscribe()
    }

    /// Serves until `drain` fires, then stops accepting, lets open connections finish their
    /// streams, and cuts whatever remains after the drain deadline.
    pub async fn run(self, drain: drain::Watch) {
        let limits = Limits {
            max_connections: self.settings.max_connections,
            max_per_source: self.settings.max_connections_per_source,
            drain_deadline: self.settings.drain_deadline,
        };
        let settings = Arc::new(self.settings);
        let (inbound, events, conn_drain) = (self.inbound, self.events, drain.clone());
        accept::serve(&self.listener, "hbone", limits, drain, |tcp, peer| {
            let conn = Connection {
                inbound: inbound.clone(),
                settings: settings.clone(),
                events: events.clone(),
                drain: conn_drain.clone(),
                peer,
            };
            conn.serve(tcp)
        })
        .await;
    }
}

struct Connection<I> {
    inbound: Arc<I>,
    settings: Arc<ServerSettings>,
    events: broadcast::Sender<ServerEvent>,
    drain: drain::Watch,
    peer: SocketAddr,
}

impl<I: Inbound> Connection<I> {
    fn event(&self, event: ServerEvent) {
        debug!(?event, "HBONE refusal");
        let _ = self.events.send(event);
    }

    async fn serve(mut self, tcp: TcpStream) {
        let peer = self.peer;
        let _ = tcp.set_nodelay(true);
        let local = match tcp.local_addr() {
            Ok(local) => local,
            Err(e) => return debug!(error = %e, "connection gone before it was served"),
        };
        let config = match self.inbound.tls_config(local).await {
            Ok(config) => config,
            Err(reason) => {
                return self.event(ServerEvent::HandshakeFailed {
                    peer,
                    reason: format!("no certificate to present on {local}: {reason}"),
                })
            }
        };
        let deadline = self.settings.handshake_timeout;
        let mut tls = match tokio::time::timeout(
            deadline,
            TlsAcceptor::from(config).accept(super::ReadBuffered::new(tcp)),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                    Some(tls_error) => crate::tls::describe(tls_error),
                    None => e.to_string(),
                };
                return self.event(ServerEvent::HandshakeFailed { peer, reason });
            }
            Err(_) => {
                return self.event(ServerEvent::HandshakeFailed {
                    peer,
                    reason: format!("TLS handshake not finished within {deadline:?}"),
                })
            }
        };
        let (_, session) = tls.get_mut();
        if session.alpn_protocol() != Some(crate::tls::ALPN_H2) {
            let alpn = session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
            return self.event(ServerEvent::NotH2 { peer, alpn });
        }
        session.set_buffer_limit(Some(super::TLS_SEND_BUFFER));
        let leaf = session.peer_certificates().and_then(|c| c.first());
        let (peer_identity, peer_certificate) = match leaf.map(|c| (CertInfo::parse(c), c)) {
            Some((Ok(info), leaf)) => (info.identity, Arc::new(leaf.clone().into_owned())),
            // The verifier already required a certificate with an identity; be defensive anyway.
            _ => {
                return self.event(ServerEvent::HandshakeFailed {
                    peer,
                    reason: "client presented no usable certificate".into(),
                })
            }
        };
        debug!(%peer_identity, "HBONE connection established");

        let h2 = h2::server::Builder::new()
            .initial_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME_SIZE)
            .max_concurrent_streams(self.settings.max_streams_per_connection)
            .max_header_list_size(super::MAX_HEADER_LIST)
            .handshake::<_, Bytes>(tls);
        let mut conn = match tokio::time::timeout(deadline, h2).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                return self
                    .event(ServerEvent::ProtocolError { peer, reason: format!("HTTP/2 handshake: {e}") })
            }
            Err(_) => {
                return self.event(ServerEvent::ProtocolError {
                    peer,
                    reason: format!("HTTP/2 preface not received within {deadline:?}"),
                })
            }
        };

        let mut streams = JoinSet::new();
        let mut draining = false;
        let idle = self.settings.idle_timeout;
        loop {
            while streams.try_join_next().is_some() {}
            let next = if draining {
                conn.accept().await
            } else {
                // Only a connection without streams can be idle: the timer runs while none is
                // open and starts over when the last one ends.
                let idle_for = if streams.is_empty() { idle } else { Duration::MAX };
                tokio::select! {
                    Some(_) = streams.join_next(), if !streams.is_empty() => continue,
                    _ = self.drain.signaled() => {
                        draining = true;
                        conn.graceful_shutdown();
                        continue;
                    }
                    _ = sleep_or_never(idle_for) => {
                        debug!(%peer, ?idle, "closing an HBONE connection idle for {idle:?}");
                        draining = true;
                        conn.graceful_shutdown();
                        continue;
                    }
                    next = conn.accept() => next,
                }
            };
            match next {
                None => break,
                Some(Ok((request, respond))) => {
                    let stream = Stream {
                        inbound: self.inbound.clone(),
                        events: self.events.clone(),
                        peer,
                        local,
                        peer_identity: peer_identity.clone(),
                        peer_certificate: peer_certificate.clone(),
                    };
                    streams.spawn(stream.serve(request, respond).in_current_span());
                }
                Some(Err(e)) => {
                    if !e.is_go_away() || e.reason() != Some(h2::Reason::NO_ERROR) {
                        self.event(ServerEvent::ProtocolError { peer, reason: e.to_string() });
                    }
                    break;
                }
            }
        }
        // The connection is done accepting; streams still running own their halves and finish
        // on their own (or are cut by the listener's drain deadline).
        while streams.join_next().await.is_some() {}
    }
}

struct Stream<I> {
    inbound: Arc<I>,
    events: broadcast::Sender<ServerEvent>,
    peer: SocketAddr,
    local: SocketAddr,
    peer_identity: Identity,
    peer_certificate: Arc<CertificateDer<'static>>,
}

impl<I: Inbound> Stream<I> {
    async fn serve(self, request: Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
        let authority = request.uri().authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        let result = match self.parse(&request) {
            Ok(info) => self.inbound.accept(info).await,
            Err(refusal) => Err(refusal),
        };
        let accepted = match result {
            Ok(accepted) => accepted,
            Err(refusal) => {
                let event = ServerEvent::StreamRefused {
                    peer: self.peer,
                    authority,
                    status: refusal.status,
                    reason: refusal.reason,
                };
                debug!(?event, "CONNECT refused");
                let _ = self.events.send(event);
                let _ = respond.send_response(status_only(refusal.status), true);
                return;
            }
        };
        let send = match respond.send_response(status_only(StatusCode::OK), false) {
            Ok(send) => send,
            Err(e) => return debug!(error = %e, "client went away before the CONNECT response"),
        };
        let tunnel = H2Stream::new(send, request.into_body(), None);
        self.inbound.serve(accepted, tunnel).await;
    }

    fn parse(&self, request: &Request<h2::RecvStream>) -> Result<ConnectInfo, Refusal> {
        if request.method() != Method::CONNECT {
            return Err(Refusal::bad_request(format!("method {} is not CONNECT", request.method())));
        }
        let authority =
            request.uri().authority().ok_or_else(|| Refusal::bad_request("CONNECT without :authority"))?;
        let authority: SocketAddr = authority
            .as_str()
            .parse()
            .map_err(|_| Refusal::bad_request(format!(":authority {authority} is not an ip:port")))?;
        let header =
            |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(ConnectInfo {
            peer_identity: self.peer_identity.clone(),
            peer_certificate: self.peer_certificate.clone(),
            peer_addr: self.peer,
            local_addr: self.local,
            authority,
            forwarded: header(FORWARDED).as_deref().map(Forwarded::parse).unwrap_or_default(),
            baggage: header(BAGGAGE),
            traceparent: header(TRACEPARENT).filter(|t| is_traceparent(t)),
        })
    }
}

/// Sleeps for `d`, or forever when `d` is [`Duration::MAX`].
async fn sleep_or_never(d: Duration) {
    if d == Duration::MAX {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(d).await;
}

fn status_only(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}
