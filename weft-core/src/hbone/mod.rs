//! HBONE: TCP carried in HTTP/2 CONNECT streams over mutual TLS 1.3, on the wire as Istio's
//! ztunnel speaks it. Owns the client pool, the server, and the stream adapter; knows nothing of
//! workloads, policy or xDS (the server asks an [`server::Inbound`] what to do with each stream).

pub mod client;
pub mod server;
mod stream;

use std::time::Duration;

pub use client::{ClientError, ClientSettings, ConnectRequest, Origin, Pool};
pub use server::{forward, ConnectInfo, Inbound, Refusal, Server, ServerEvent, ServerSettings};
pub use stream::H2Stream;

/// The port HBONE listens on.
pub const HBONE_PORT: u16 = crate::names::HBONE_PORT;

/// HTTP/2 flow-control windows and frame size (Istio ztunnel's values).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Largest request header block accepted; HBONE headers are a few hundred bytes.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

/// Header carrying the original client address: `forwarded: for="<ip:port>"` (RFC 7239).
pub const FORWARDED: &str = "forwarded";
pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";

/// How long a TLS + HTTP/2 handshake may take before the peer is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Buffer for each direction of a proxied stream.
const COPY_BUFFER: usize = 64 * 1024;

/// Copies both directions until each side has closed its half, passing half-closes through.
/// Returns bytes (sent from `a` to `b`, sent from `b` to `a`).
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}

/// Formats the `forwarded` header value for a client address.
pub fn forwarded_for(addr: std::net::SocketAddr) -> String {
    format!("for=\"{addr}\"")
}

/// Reads the client address back from a `forwarded` header value (the first `for=` element).
pub fn parse_forwarded_for(value: &str) -> Option<std::net::SocketAddr> {
    value
        .split([';', ','])
        .map(str::trim)
        .find_map(|pair| pair.strip_prefix("for=").or_else(|| pair.strip_prefix("For=")))
        .map(|v| v.trim_matches('"'))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trips_v4_and_v6() {
        for addr in ["10.0.0.1:4567", "[fd00::1]:80"] {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_for(addr)), Some(addr));
        }
        assert_eq!(parse_forwarded_for("proto=http;for=\"10.1.1.1:1\""), "10.1.1.1:1".parse().ok());
        assert_eq!(parse_forwarded_for("by=x"), None);
        assert_eq!(parse_forwarded_for("for=unknown"), None);
    }
}
