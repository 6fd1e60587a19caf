//! Sockets of the data path: transparent listeners, upstream connections that keep the
//! client's source address, resets, and a stream wrapper that counts bytes into the metrics.
//! Knows nothing of workloads or policy.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;
use weft_core::telemetry::{ConnectionGuard, ResponseFlags};

/// Pending connections a listener queues before accepting them.
const BACKLOG: i32 = 1024;

/// A listener on `addr`. With `transparent`, IP_TRANSPARENT is set so the listener can accept
/// connections the eBPF capture assigned to it whatever their destination address, and answer
/// from that address, and the socket carries [`ebpf::SOCKET_MARK`]. An IPv6 wildcard listener also accepts IPv4 (dual stack).
pub fn listen(addr: SocketAddr, transparent: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if transparent {
        // Works for IPv6 sockets too: Linux sets the same flag as IPV6_TRANSPARENT.
        socket.set_ip_transparent(true)?;
        // Accepted connections inherit the mark: their packets to a pod pass the capture.
        socket.set_mark(ebpf::SOCKET_MARK)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Connects to `to` within `timeout`. With `source`, the connection leaves from that address
/// (any port), bound with IP_TRANSPARENT when `transparent` so it may be a pod's address rather
/// than one of this node's: the server then sees its real caller. If that bind fails (no
/// CAP_NET_ADMIN, another address family) the connection is made from the node's address.
/// With `transparent` the socket also carries [`ebpf::SOCKET_MARK`]: the capture lets ztunnel's
/// own connections to a pod through instead of steering them back into ztunnel.
pub async fn connect(
    source: Option<IpAddr>,
    to: SocketAddr,
    transparent: bool,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = if to.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if transparent {
        SockRef::from(&socket).set_mark(ebpf::SOCKET_MARK)?;
    }
    if let Some(ip) = source {
        if let Err(e) = bind_source(&socket, ip, to, transparent) {
            debug!(source = %ip, %to, error = %e, "cannot connect from the client's address; using the node's");
        }
    }
    let stream = tokio::time::timeout(timeout, socket.connect(to))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn bind_source(socket: &TcpSocket, ip: IpAddr, to: SocketAddr, transparent: bool) -> io::Result<()> {
    let ip = ip.to_canonical();
    if ip.is_ipv4() != to.is_ipv4() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "source and destination differ in family"));
    }
    if transparent {
        SockRef::from(socket).set_ip_transparent(true)?;
    }
    socket.bind(SocketAddr::new(ip, 0))
}

/// Whether `ip` is an address of this host (in this network namespace): it can be bound
/// without IP_TRANSPARENT.
pub fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::TcpListener::bind(SocketAddr::new(ip, 0)).is_ok()
}

pub use weft_core::accept::reset;

/// An upstream stream counting its bytes into a connection's metrics: bytes written to it
/// travel from the client to the server (`received`), bytes read from it back (`sent`). The
/// guard records the connection closed when this is dropped.
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    guards: Vec<ConnectionGuard>,
}

impl<T> Counted<T> {
    pub fn new(inner: T, guard: ConnectionGuard) -> Self {
        Counted { inner, guards: vec![guard] }
    }

    /// Counts into a further guard too (a same-node connection reports as source and destination).
    pub fn also(mut self, guard: ConnectionGuard) -> Self {
        self.guards.push(guard);
        self
    }

    /// The flag every guard's closed counter will carry.
    pub fn set_response_flags(&mut self, flags: ResponseFlags) {
        self.guards.iter_mut().for_each(|g| g.set_response_flags(flags));
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.guards.iter().for_each(|g| g.add_sent(n));
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.guards.iter().for_each(|g| g.add_received(n as u64));
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
