//! The waypoint's data path: the HBONE listener (:15008) and each CONNECT stream on it. A
//! CONNECT is accepted only for a destination bound to this waypoint (a service whose traffic
//! it serves, or a workload whose own traffic it serves); the stream is then served as HTTP/1.1
//! or HTTP/2 (declared by the destination, else sniffed from its first bytes) through
//! [`crate::http`], or forwarded as TCP to an endpoint of the destination. What is decided is
//! pure ([`crate::route`], [`crate::balance`], [`crate::sniff`]); this module does the I/O.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};
use weft_core::cert_manager::{CertManager, CertificateSource};
use weft_core::drain;
use weft_core::hbone::{
    ClientSettings, ConnectInfo, H2Stream, Inbound, Pool, Refusal, Server, ServerSettings,
};
use weft_core::identity::Identity;
use weft_core::state::{
    Endpoint as MeshEndpoint, ProxyState, Service as MeshService, Shared, WaypointDestination, Workload,
};
use weft_core::telemetry::{
    ConnectionLabels, Metrics as TcpMetrics, Reporter, ResponseFlags, SecurityPolicy,
};
use weft_core::tls::WorkloadCertificate;

use crate::balance::{Cluster, LoadState};
use crate::cluster::Clusters;
use crate::config::Config;
use crate::jwks::Jwks;
use crate::metrics::RequestMetrics;
use crate::mirror::MAX_MIRRORS_IN_FLIGHT;
use crate::model::{PortProtocol, Waypoint};
use crate::sniff::{sniff, Sniffed, MAX_SNIFF};
use crate::upstream::{Endpoint, Upstreams};

/// How long an upstream tunnel may take (TCP, TLS, HTTP/2 and the CONNECT's answer).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a request head may take to arrive (Envoy's request_headers_timeout is off by
/// default; a bound is kept so that a silent client cannot hold a stream forever).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest HTTP/1.1 request head (Envoy's default `max_request_headers_kb` is 60 KiB).
const MAX_HEADER_BYTES: usize = 60 * 1024;

/// What the data path shares.
pub struct Ctx<S> {
    pub config: Arc<Config>,
    /// This waypoint's resource, once received.
    pub waypoint: Arc<Shared<Option<Waypoint>>>,
    pub state: Arc<Shared<ProxyState>>,
    pub certs: Arc<CertManager<S>>,
    pub upstreams: Upstreams,
    pub requests: RequestMetrics,
    pub tcp: TcpMetrics,
    pub load: Load,
    pub clusters: Clusters,
    /// The JWKS of the RequestAuthentications that apply (fetched as the configuration arrives).
    pub jwks: Jwks,
    /// Mirrored requests in flight ([`crate::mirror::MAX_MIRRORS_IN_FLIGHT`]).
    pub mirrors: Arc<Semaphore>,
}

/// Where an accepted CONNECT leads.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A service bound to this waypoint, at one of its ports.
    Service { service: Arc<MeshService>, port: u16 },
    /// A workload whose own traffic this waypoint serves.
    Workload { workload: Arc<Workload>, port: u16 },
}

/// One accepted CONNECT stream.
#[derive(Debug)]
pub struct Stream {
    pub destination: Destination,
    /// The CONNECT authority: where the client sent to.
    pub original: SocketAddr,
    /// The client: the outer connection's peer (the source pod, whose ztunnel dials from its
    /// address).
    pub client: SocketAddr,
    pub peer_identity: Identity,
    /// The source workload, when the client's address is one of the mesh's workloads with the
    /// peer's identity.
    pub source: Option<Arc<Workload>>,
    pub traceparent: Option<String>,
    /// What the destination port declares it carries; `None`: detected.
    pub declared: Option<PortProtocol>,
}

/// What narrows a balancing decision's candidates ([`LoadState::filter`]).
pub type CandidateFilter<'a> = dyn FnMut(&mut Vec<MeshEndpoint>) + 'a;

/// A round-robin position's key: Envoy's cluster (host, subset, port).
type ClusterKey = (String, Option<String>, u16);

/// The balancing state shared by every request: round-robin positions and requests in flight.
#[derive(Default)]
pub struct Load {
    turns: Mutex<HashMap<ClusterKey, u64>>,
    in_flight: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

/// A request in flight to an endpoint, counted until dropped.
pub struct InFlight(Arc<AtomicU64>);

/// The HBONE server's owner.
struct Hbone<S> {
    ctx: Arc<Ctx<S>>,
}

/// The bound waypoint listener.
pub struct Proxy<S> {
    ctx: Arc<Ctx<S>>,
    listener: TcpListener,
}

impl Load {
    /// Counts a request to `uid` in flight until the guard is dropped.
    pub fn start(&self, uid: &str) -> InFlight {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        // Looked up first: the key is allocated only the first time an endpoint is used.
        let counter = match map.get(uid) {
            Some(counter) => counter.clone(),
            None => map.entry(uid.to_owned()).or_default().clone(),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }

    /// A view for one balancing decision.
    pub fn view(&self) -> LoadView<'_> {
        LoadView { load: self, filter: None }
    }

    /// A view whose candidates pass through `filter` first (outlier ejection, endpoints
    /// already tried).
    pub fn view_filtered<'f>(&'f self, filter: &'f mut CandidateFilter<'f>) -> LoadView<'f> {
        LoadView { load: self, filter: Some(filter) }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// [`LoadState`] over the shared [`Load`].
pub struct LoadView<'l> {
    load: &'l Load,
    filter: Option<&'l mut CandidateFilter<'l>>,
}

impl LoadState for LoadView<'_> {
    fn filter(&mut self, candidates: &mut Vec<MeshEndpoint>) {
        if let Some(filter) = &mut self.filter {
            filter(candidates);
        }
    }

    fn random(&mut self) -> u64 {
        rand::random()
    }

    fn next_turn(&mut self, cluster: &Cluster<'_>) -> u64 {
        let mut turns = self.load.turns.lock().unwrap_or_else(|p| p.into_inner());
        let key = (cluster.host.to_owned(), cluster.subset.map(str::to_owned), cluster.port);
        let turn = turns.entry(key).or_default();
        let now = *turn;
        *turn = turn.wrapping_add(1);
        now
    }

    fn in_flight(&self, endpoint: &MeshEndpoint) -> u64 {
        let map = self.load.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&endpoint.workload.uid).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl<S: CertificateSource> Ctx<S> {
    pub fn new(
        config: Arc<Config>,
        waypoint: Arc<Shared<Option<Waypoint>>>,
        state: Arc<Shared<ProxyState>>,
        certs: Arc<CertManager<S>>,
        requests: RequestMetrics,
        tcp: TcpMetrics,
        jwks: Jwks,
    ) -> Ctx<S> {
        let pool = Pool::new(ClientSettings {
            connect_timeout: CONNECT_TIMEOUT,
            response_timeout: CONNECT_TIMEOUT,
            ..ClientSettings::default()
        });
        Ctx {
            config,
            waypoint,
            state,
            certs,
            upstreams: Upstreams::new(pool),
            requests,
            tcp,
            load: Load::default(),
            clusters: Clusters::default(),
            jwks,
            mirrors: Arc::new(Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
        }
    }

    /// The waypoint's certificate, within the connect timeout.
    pub async fn certificate(&self) -> Result<Arc<WorkloadCertificate>, String> {
        let identity = &self.config.identity;
        match tokio::time::timeout(CONNECT_TIMEOUT, self.certs.get(identity)).await {
            Ok(Ok(cert)) => Ok(cert),
            Ok(Err(e)) => Err(format!("no certificate for {identity}: {e}")),
            Err(_) => Err(format!("no certificate for {identity} within {CONNECT_TIMEOUT:?}")),
        }
    }

    /// Whether `waypoint` (a workload's or service's) is this one: its service's hostname, or
    /// an address of its service or pods.
    fn is_me(&self, state: &ProxyState, waypoint: &weft_core::state::Waypoint) -> bool {
        let hostname = format!(
            "{}.{}.svc.{}",
            self.config.name,
            self.config.namespace,
            weft_core::names::DEFAULT_DOMAIN_SUFFIX
        );
        match &waypoint.destination {
            WaypointDestination::Service(key) => *key == format!("{}/{hostname}", self.config.namespace),
            WaypointDestination::Address(address) => {
                address.ip == self.config.pod_ip
                    || state
                        .service_by_address(&address.network, address.ip)
                        .is_some_and(|s| s.hostname == hostname && s.namespace == self.config.namespace)
            }
        }
    }

    /// Where a CONNECT to `authority` leads, or why it is refused: the destination must be
    /// bound to this waypoint (else the waypoint would relay, under its own identity, traffic
    /// its destinations trust it to have checked).
    fn destination(
        &self,
        state: &ProxyState,
        config: &Waypoint,
        authority: SocketAddr,
    ) -> Result<Destination, String> {
        let (ip, port) = (authority.ip(), authority.port());
        if let Some(service) = state.service_by_vip(ip) {
            if !config.services.contains_key(&service.hostname) {
                return Err(format!("service {} is not bound to this waypoint", service.hostname));
            }
            if !service.ports.contains_key(&port) {
                return Err(format!("service {} has no port {port}", service.hostname));
            }
            return Ok(Destination::Service { service: Arc::clone(service), port });
        }
        if let Some(workload) = state.workload_by_ip(ip) {
            if workload.waypoint.as_ref().is_some_and(|w| self.is_me(state, w)) {
                return Ok(Destination::Workload { workload: Arc::clone(workload), port });
            }
            return Err(format!(
                "workload {} does not send its traffic through this waypoint",
                workload.name
            ));
        }
        Err(format!("{ip} is neither a service nor a workload of the mesh"))
    }
}

impl<S: CertificateSource> Proxy<S> {
    /// Binds the HBONE listener.
    pub async fn bind(ctx: Arc<Ctx<S>>) -> std::io::Result<Proxy<S>> {
        let listener = listen(ctx.config.hbone).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen for HBONE on {}: {e}", ctx.config.hbone))
        })?;
        Ok(Proxy { ctx, listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `drain` fires.
    pub async fn run(self, drain: drain::Watch) {
        let Proxy { ctx, listener } = self;
        info!(hbone = ?listener.local_addr().ok(), identity = %ctx.config.identity, "waypoint listening");
        let server = Server::new(listener, ServerSettings::default(), Arc::new(Hbone { ctx }));
        server.run(drain).await;
        info!("waypoint listener drained");
    }
}

impl<S: CertificateSource> Inbound for Hbone<S> {
    type Accepted = Stream;

    async fn tls_config(&self, _local: SocketAddr) -> Result<Arc<rustls::ServerConfig>, String> {
        Ok(self.ctx.certificate().await?.server_config())
    }

    async fn accept(&self, info: ConnectInfo) -> Result<Stream, Refusal> {
        let ctx = &self.ctx;
        let waypoint = ctx.waypoint.load();
        let Some(config) = waypoint.as_ref() else {
            return Err(Refusal::unavailable("the waypoint has not received its configuration yet"));
        };
        let state = ctx.state.load();
        let original = canonical(info.authority);
        let client = canonical(info.peer_addr);
        let destination = ctx.destination(&state, config, original).map_err(|reason| {
            info!(%client, identity = %info.peer_identity, %original, %reason, "CONNECT refused");
            Refusal::bad_request(reason)
        })?;
        let declared = match &destination {
            Destination::Service { service, port } => {
                config.services.get(&service.hostname).and_then(|s| s.protocols.get(port).copied())
            }
            Destination::Workload { .. } => None,
        };
        // The source workload: the one at the peer's address, if it holds the peer's identity.
        let source = state.workload_by_ip(client.ip()).filter(|w| w.identity == info.peer_identity).cloned();
        Ok(Stream {
            destination,
            original,
            client,
            peer_identity: info.peer_identity,
            source,
            traceparent: info.traceparent,
            declared,
        })
    }

    async fn serve(&self, stream: Stream, mut tunnel: H2Stream) {
        let ctx = self.ctx.clone();
        let mut prefix = BytesMut::with_capacity(1024);
        let sniffed = match stream.declared {
            Some(PortProtocol::Tcp) => Sniffed::Tcp,
            Some(PortProtocol::Http2) => Sniffed::Http2,
            // Declared HTTP: HTTP/1.1 unless the client opens with HTTP/2's preface.
            Some(PortProtocol::Http) => {
                match sniff_stream(&mut tunnel, &mut prefix, ctx.config.sniff_timeout).await {
                    Sniffed::Http2 => Sniffed::Http2,
                    _ => Sniffed::Http1,
                }
            }
            None => sniff_stream(&mut tunnel, &mut prefix, ctx.config.sniff_timeout).await,
        };
        let io = Prefixed { prefix: prefix.freeze(), inner: tunnel };
        let stream = Arc::new(stream);
        debug!(original = %stream.original, client = %stream.client, ?sniffed, "stream");
        match sniffed {
            Sniffed::Http1 => {
                let service = {
                    let (ctx, stream) = (ctx.clone(), stream.clone());
                    service_fn(move |request| {
                        let (ctx, stream) = (ctx.clone(), stream.clone());
                        async move { Ok::<_, Infallible>(crate::http::handle(ctx, stream, request).await) }
                    })
                };
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_HEADER_BYTES.max(8192))
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades()
                    .await;
                if let Err(e) = served {
                    debug!(error = %e, "HTTP/1.1 stream ended");
                }
            }
            Sniffed::Http2 => {
                let service = {
                    let (ctx, stream) = (ctx.clone(), stream.clone());
                    service_fn(move |request| {
                        let (ctx, stream) = (ctx.clone(), stream.clone());
                        async move { Ok::<_, Infallible>(crate::http::handle(ctx, stream, request).await) }
                    })
                };
                let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(MAX_HEADER_BYTES as u32)
                    .serve_connection(TokioIo::new(io), service)
                    .await;
                if let Err(e) = served {
                    debug!(error = %e, "HTTP/2 stream ended");
                }
            }
            Sniffed::Tcp | Sniffed::NeedMore => forward_tcp(&ctx, &stream, io).await,
        }
    }
}

/// Reads the first bytes of `tunnel` into `prefix` until [`sniff`] decides, the limit is
/// reached, the client stops sending, or `timeout` passes (then it is TCP).
async fn sniff_stream(tunnel: &mut H2Stream, prefix: &mut BytesMut, timeout: Duration) -> Sniffed {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let decided = sniff(prefix);
        if decided != Sniffed::NeedMore {
            return decided;
        }
        if prefix.len() >= MAX_SNIFF {
            return Sniffed::Tcp;
        }
        match tokio::time::timeout_at(deadline, tunnel.read_buf(prefix)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Sniffed::Tcp,
        }
    }
}

/// Forwards a TCP stream to an endpoint of its destination, L4 only, counted in the
/// `istio_tcp_*` metrics.
async fn forward_tcp<S: CertificateSource, I>(ctx: &Arc<Ctx<S>>, stream: &Stream, mut io: I)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let state = ctx.state.load();
    let mut labels = ConnectionLabels::new(Reporter::Waypoint, SecurityPolicy::MutualTls);
    if let Some(source) = &stream.source {
        labels = labels.with_source(source);
    }
    labels = labels.with_source_principal(&stream.peer_identity);
    let (endpoint, service) = match &stream.destination {
        Destination::Service { service, port } => {
            labels = labels.with_destination_service(service);
            let candidates = state.endpoint_candidates(service, Some(*port));
            let chosen = (!candidates.is_empty()).then(|| {
                candidates[usize::try_from(rand::random::<u64>() % candidates.len() as u64).unwrap_or(0)]
                    .clone()
            });
            let endpoint = chosen.and_then(|e| {
                let ip = e.workload.address_like(stream.original.ip())?;
                Some((e.workload, SocketAddr::new(ip, e.target_port)))
            });
            (endpoint, Some(service.hostname.clone()))
        }
        Destination::Workload { workload, port } => {
            (Some((Arc::clone(workload), SocketAddr::new(stream.original.ip(), *port))), None)
        }
    };
    let Some((workload, address)) = endpoint else {
        let mut guard = ctx.tcp.connection_opened(labels);
        guard.set_response_flags(ResponseFlags::NoHealthyUpstream);
        info!(original = %stream.original, "TCP stream: no healthy endpoint");
        return;
    };
    labels = labels.with_destination(&workload);
    let mut guard = ctx.tcp.connection_opened(labels);
    let upstream = Endpoint {
        address,
        identity: workload.identity.clone(),
        client: stream.client.ip(),
        service,
        traceparent: stream.traceparent.clone(),
    };
    let tunnel = match ctx.certificate().await {
        Ok(cert) => ctx.upstreams.tunnel(cert, &upstream).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let mut tunnel = match tunnel {
        Ok(t) => t,
        Err(e) => {
            guard.set_response_flags(ResponseFlags::UpstreamConnectionFailure);
            warn!(%address, error = %e, "TCP stream: upstream failed");
            return;
        }
    };
    match weft_core::hbone::copy_bidirectional(&mut io, &mut tunnel).await {
        Ok((received, sent)) => {
            guard.add_received(received);
            guard.add_sent(sent);
            debug!(%address, received, sent, "TCP stream done");
        }
        Err(e) => debug!(%address, error = %e, "TCP stream ended with an error"),
    }
}

/// A stream whose first bytes were already read (while sniffing): they are read again first.
pub struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A listener on `addr`; on `::` it takes IPv4 too.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// `addr` with an IPv4-mapped IPv6 address made IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
