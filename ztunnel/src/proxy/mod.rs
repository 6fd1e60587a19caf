//! The data path: ztunnel's three listeners and the proxying behind them. Owns the sockets, the
//! per-connection tasks, the HBONE client pool and the metrics of each connection; the routing
//! and policy decisions are the pure functions of [`crate::outbound`] and [`crate::inbound`];
//! configuration is only read from the shared [`ProxyState`].
//!
//! With the eBPF capture, the kernel hands ztunnel connections whose *local* address is the
//! original destination and whose peer is the real client:
//! - `:15001` outbound: a pod of this node calls anything; the connection goes in HBONE to the
//!   destination's node (or its waypoint), in-process to the destination when it is a mesh pod
//!   of this node, or in plain TCP from the pod's own address (passthrough).
//! - `:15008` HBONE inbound: another ztunnel (or a waypoint) tunnels to a pod of this node;
//!   ztunnel presents the pod's certificate, authorizes the caller, and connects to the pod from
//!   the caller's address (IP_TRANSPARENT) so the application sees who called.
//! - `:15006` plaintext inbound: a caller outside the mesh reaches a pod of this node; the same
//!   authorization applies, without a peer identity (STRICT mTLS refuses it).
//!
//! Every inbound connection (HBONE, plaintext, same-node) is registered in [`connections`]
//! while it is open: after each xDS update the ones the policy now denies are closed.
//!
//! A failure is logged with its reason and closes only its own connection (with a reset when
//! the client is still waiting for an answer); nothing a peer sends can panic the proxy.

mod connections;
mod inbound;
mod outbound;
mod socket;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};
use weft_core::accept::{self, Limits};
use weft_core::cert_manager::{CertManager, CertificateSource};
use weft_core::drain;
use weft_core::hbone::{copy_bidirectional, ClientError, ClientSettings, Pool, Server, ServerSettings};
use weft_core::identity::Identity;
use weft_core::names;
use weft_core::state::{ProxyState, Shared};
use weft_core::telemetry::{Metrics, ResponseFlags};
use weft_core::tls::WorkloadCertificate;
use weft_core::xds::Synced;

use self::connections::{Closed, Connections, Registered};
use self::socket::Counted;
use crate::inbound::InboundRefusal;
use crate::outbound::RoundRobin;

/// What the proxy works from; built by `main` (or a test).
pub struct ProxyInputs<S> {
    /// The mesh as the xDS client last received it.
    pub state: Arc<Shared<ProxyState>>,
    /// Certificates of this node's workloads, fetched on first use.
    pub certs: Arc<CertManager<S>>,
    pub metrics: Arc<Metrics>,
    /// The Kubernetes node this ztunnel serves: only its workloads are proxied.
    pub node_name: String,
    /// Bumped after each applied xDS response: open inbound connections are then checked
    /// against the policy again. A sender that is dropped only ends the re-checks.
    pub updates: watch::Receiver<Synced>,
}

/// The listening ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Ports {
    /// Captured outbound connections (Istio: 15001).
    pub outbound: u16,
    /// Captured plaintext inbound connections (Istio: 15006).
    pub inbound_plain: u16,
    /// HBONE (Istio: 15008).
    pub hbone: u16,
}

/// The addresses the listeners are bound to (with the actual ports when 0 was asked for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddrs {
    pub outbound: SocketAddr,
    pub inbound_plain: SocketAddr,
    pub hbone: SocketAddr,
}

/// Tuning of the data path; [`Default`] is what production uses.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// Listeners and upstream sockets use IP_TRANSPARENT, and upstream sockets (plain and HBONE)
    /// carry the capture's [`ebpf::SOCKET_MARK`] so the capture lets them pass (both need
    /// CAP_NET_ADMIN). Only tests without that capability turn it off: capture does not work
    /// without it.
    pub transparent: bool,
    /// Deadline for every upstream connect (TCP, or HBONE handshake plus CONNECT response),
    /// and for obtaining a certificate. 10 s, Envoy's default: a peer ztunnel that restarts
    /// drops SYNs for a few seconds, and TCP sends them again after 1, 3 and 7 s.
    pub connect_timeout: Duration,
    /// Concurrent connections per listener; further accepts wait.
    pub max_connections: usize,
    /// Concurrent connections per listener from one source address; more are reset at once.
    pub max_connections_per_source: usize,
    /// An HBONE connection that has carried no stream for this long is closed.
    pub hbone_idle_timeout: Duration,
    /// After a drain begins, how long connections may take to finish before they are cut.
    pub drain_deadline: Duration,
}

/// The bound listeners, ready to [`Proxy::run`].
pub struct Proxy<S> {
    ctx: Arc<Ctx<S>>,
    outbound: TcpListener,
    inbound_plain: TcpListener,
    hbone: TcpListener,
    addrs: ListenAddrs,
    updates: watch::Receiver<Synced>,
}

/// What every connection task shares.
struct Ctx<S> {
    state: Arc<Shared<ProxyState>>,
    certs: Arc<CertManager<S>>,
    metrics: Arc<Metrics>,
    node: String,
    pool: Pool,
    rr: RoundRobin,
    options: ProxyOptions,
    /// The ports bound, to refuse connections that would loop back into a listener.
    ports: Ports,
    /// The open inbound connections, re-checked after each update.
    connections: Arc<Connections>,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: names::OUTBOUND_PORT,
            inbound_plain: names::INBOUND_PLAINTEXT_PORT,
            hbone: names::HBONE_PORT,
        }
    }
}

impl ListenAddrs {
    pub fn ports(&self) -> Ports {
        Ports {
            outbound: self.outbound.port(),
            inbound_plain: self.inbound_plain.port(),
            hbone: self.hbone.port(),
        }
    }
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            transparent: true,
            connect_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_source: accept::MAX_CONNECTIONS_PER_SOURCE,
            hbone_idle_timeout: ServerSettings::default().idle_timeout,
            drain_deadline: Duration::from_secs(5),
        }
    }
}

impl<S: CertificateSource> Proxy<S> {
    /// Binds the three listeners on `bind` (`::` for dual stack, or `0.0.0.0`) with
    /// IP_TRANSPARENT. Must be called inside a tokio runtime.
    pub async fn bind(inputs: ProxyInputs<S>, bind: IpAddr, ports: Ports) -> std::io::Result<Proxy<S>> {
        Self::bind_with(inputs, bind, ports, ProxyOptions::default()).await
    }

    /// [`Proxy::bind`] with explicit options.
    pub async fn bind_with(
        inputs: ProxyInputs<S>,
        bind: IpAddr,
        ports: Ports,
        options: ProxyOptions,
    ) -> std::io::Result<Proxy<S>> {
        let listen = |port: u16, what: &str| listen(SocketAddr::new(bind, port), options.transparent, what);
        let listeners = [
            listen(ports.outbound, "outbound")?,
            listen(ports.inbound_plain, "plaintext inbound")?,
            listen(ports.hbone, "HBONE")?,
        ];
        Self::on_listeners(inputs, listeners, options)
    }

    /// The proxy on listeners bound before: outbound, plaintext inbound and HBONE, in that order
    /// (bound by [`Proxy::bind_with`], or handed over by the ztunnel this one replaces). Must be
    /// called inside a tokio runtime.
    pub fn on_listeners(
        inputs: ProxyInputs<S>,
        listeners: [std::net::TcpListener; 3],
        options: ProxyOptions,
    ) -> std::io::Result<Proxy<S>> {
        let [outbound, inbound_plain, hbone] = listeners.map(|l| {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        });
        let (outbound, inbound_plain, hbone) = (outbound?, inbound_plain?, hbone?);
        let addrs = ListenAddrs {
            outbound: outbound.local_addr()?,
            inbound_plain: inbound_plain.local_addr()?,
            hbone: hbone.local_addr()?,
        };
        let pool = Pool::new(ClientSettings {
            connect_timeout: options.connect_timeout,
            response_timeout: options.connect_timeout,
            transparent: options.transparent,
            mark: options.transparent.then_some(ebpf::SOCKET_MARK),
            ..ClientSettings::default()
        });
        let connections = Arc::new(Connections::new(Arc::clone(&inputs.state), inputs.node_name.clone()));
        let ctx = Arc::new(Ctx {
            state: inputs.state,
            certs: inputs.certs,
            metrics: inputs.metrics,
            node: inputs.node_name,
            pool,
            rr: RoundRobin::default(),
            options,
            ports: addrs.ports(),
            connections,
        });
        Ok(Proxy { ctx, outbound, inbound_plain, hbone, addrs, updates: inputs.updates })
    }

    pub fn local_addrs(&self) -> ListenAddrs {
        self.addrs
    }

    /// Serves until `drain` fires, then stops accepting and gives open connections the drain
    /// deadline to finish.
    pub async fn run(self, drain: drain::Watch) {
        let Proxy { ctx, outbound, inbound_plain, hbone, addrs, updates } = self;
        info!(outbound = %addrs.outbound, inbound_plain = %addrs.inbound_plain, hbone = %addrs.hbone,
            node = %ctx.node, transparent = ctx.options.transparent, "ztunnel listening");
        let settings = ServerSettings {
            max_connections: ctx.options.max_connections,
            max_connections_per_source: ctx.options.max_connections_per_source,
            idle_timeout: ctx.options.hbone_idle_timeout,
            drain_deadline: ctx.options.drain_deadline,
            ..ServerSettings::default()
        };
        let hbone = Server::new(hbone, settings, Arc::new(inbound::Hbone { ctx: ctx.clone() }));
        let connections = Arc::clone(&ctx.connections);
        let listeners = async {
            tokio::join!(
                hbone.run(drain.clone()),
                serve(outbound, "outbound", ctx.clone(), drain.clone(), outbound::handle),
                serve(inbound_plain, "inbound_plain", ctx, drain, inbound::handle_plain),
            )
        };
        // The re-checks never end on their own: the listeners' end ends them.
        tokio::select! {
            _ = listeners => {}
            () = connections.recheck_on_updates(updates) => {}
        }
        info!("ztunnel listeners drained");
    }
}

/// Whether `ip` is an address of this node (in this network namespace) rather than a pod's.
pub fn is_node_address(ip: IpAddr) -> bool {
    socket::is_local(ip)
}

/// A data-path listener on `addr` (with IP_TRANSPARENT and ztunnel's socket mark when
/// `transparent`); errors name `what` it was for.
pub fn listen(addr: SocketAddr, transparent: bool, what: &str) -> std::io::Result<std::net::TcpListener> {
    socket::listen(addr, transparent).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot listen for {what} on {addr}: {e}{}",
                if transparent { " (IP_TRANSPARENT needs CAP_NET_ADMIN)" } else { "" }
            ),
        )
    })
}

impl<S> Ctx<S> {
    /// Whether connecting to `to` would reach one of this proxy's own listeners (a direct
    /// connection to the node's :15006, or a pod calling the node's :15001): refused, or each
    /// proxied leg would be accepted again, without end.
    fn loops_back(&self, to: SocketAddr) -> bool {
        let Ports { outbound, inbound_plain, hbone } = self.ports;
        [outbound, inbound_plain, hbone].contains(&to.port()) && socket::is_local(to.ip())
    }

    /// The state as the xDS client last left it.
    fn state(&self) -> Arc<ProxyState> {
        self.state.load()
    }
}

impl<S: CertificateSource> Ctx<S> {
    /// The certificate of `identity` within the connect timeout, or `None` (logged, naming
    /// `what` the certificate was for).
    async fn certificate(&self, identity: &Identity, what: &str) -> Option<Arc<WorkloadCertificate>> {
        let timeout = self.options.connect_timeout;
        match tokio::time::timeout(timeout, self.certs.get(identity)).await {
            Ok(Ok(cert)) => Some(cert),
            Ok(Err(e)) => {
                warn!(%identity, error = %e, "no certificate for {what}");
                None
            }
            Err(_) => {
                warn!(%identity, "certificate for {what} not ready within {timeout:?}");
                None
            }
        }
    }
}

/// Copies both ways until both sides are done, and logs the outcome.
async fn copy<U>(mut client: TcpStream, upstream: U, dst: SocketAddr)
where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    copy_with(&mut client, upstream, dst).await;
}

/// [`copy`], leaving the client to the caller.
async fn copy_with<U>(client: &mut TcpStream, mut upstream: U, dst: SocketAddr)
where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = client.set_nodelay(true);
    let started = std::time::Instant::now();
    match copy_bidirectional(client, &mut upstream).await {
        Ok((received, sent)) => {
            info!(%dst, received, sent, duration = ?started.elapsed(), "connection complete")
        }
        Err(e) => info!(%dst, error = %e, duration = ?started.elapsed(), "connection ended with an error"),
    }
}

/// [`copy`] for an inbound connection: until it ends, or until a policy update denies it; then
/// both sides are cut (the client with a reset), and it is counted closed with `DENY`.
async fn copy_inbound<T>(
    mut client: TcpStream,
    mut upstream: Counted<T>,
    dst: SocketAddr,
    mut registered: Registered,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let closed = tokio::select! {
        () = copy_with(&mut client, &mut upstream, dst) => return,
        closed = registered.closed() => closed,
    };
    closed_by_policy(&mut upstream, &closed);
    socket::reset(client);
}

/// Counts and logs a connection a policy update denied; the caller then drops both sides.
fn closed_by_policy<T>(upstream: &mut Counted<T>, closed: &Closed) {
    upstream.set_response_flags(ResponseFlags::Deny);
    let Closed { refusal, admitted } = closed;
    let policy = match refusal {
        InboundRefusal::Denied { policy: Some(policy), .. } => policy.as_str(),
        _ => "policy",
    };
    let identity = admitted.src_identity.as_ref().map(ToString::to_string);
    warn!(client = %admitted.src_ip, identity, dst = %admitted.dst, %refusal,
        "connection closed: denied by {policy} after a policy update");
}

/// The flag a failed HBONE tunnel closes with: `DENY` when the far side's policy refused it.
fn tunnel_flags(e: &ClientError) -> ResponseFlags {
    if e.is_denied() {
        ResponseFlags::Deny
    } else {
        ResponseFlags::Connect
    }
}

/// Accepts on `listener` until drained, one task per connection.
async fn serve<S, F, Fut>(
    listener: TcpListener,
    name: &'static str,
    ctx: Arc<Ctx<S>>,
    drain: drain::Watch,
    handler: F,
) where
    S: CertificateSource,
    F: Fn(Arc<Ctx<S>>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limits = Limits {
        max_connections: ctx.options.max_connections,
        max_per_source: ctx.options.max_connections_per_source,
        drain_deadline: ctx.options.drain_deadline,
    };
    accept::serve(&listener, name, limits, drain, |stream, peer| {
        handler(ctx.clone(), stream, canonical(peer))
    })
    .await;
}

/// `addr` with an IPv4-mapped IPv6 address (as a dual-stack socket reports IPv4) made IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
