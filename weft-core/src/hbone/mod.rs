//! HBONE: TCP carried in HTTP/2 CONNECT streams over mutual TLS 1.3, on the wire as Istio's
//! ztunnel speaks it. Owns the client pool, the server, and the stream adapter; knows nothing of
//! workloads, policy or xDS (the server asks an [`server::Inbound`] what to do with each stream).

mod buffered;
pub mod client;
pub mod server;
mod stream;

use std::net::SocketAddr;
use std::time::Duration;

pub use buffered::ReadBuffered;
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

/// Header carrying the original client and the called Service: see [`Forwarded`].
pub const FORWARDED: &str = "forwarded";
pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";

/// How long a TLS + HTTP/2 handshake may take before the peer is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest plaintext of one TLS record (rustls' default fragment size, TLS's maximum).
const TLS_RECORD: usize = 16 * 1024;
/// Bytes of an HTTP/2 frame header.
const FRAME_HEADER: usize = 9;
/// Buffer for each direction of a proxied stream: one read of a full socket becomes one DATA
/// frame that fills four TLS records exactly. (A 64 KiB read made a fifth record of the frame's
/// last 9 bytes, sent as a TCP segment of its own.)
const COPY_BUFFER: usize = 4 * TLS_RECORD - FRAME_HEADER;
/// How much encrypted data rustls may hold for a socket that is not taking it: several DATA
/// frames, so one is never cut into short records because the previous one is still queued
/// (rustls' default is 64 KiB).
const TLS_SEND_BUFFER: usize = 4 * 64 * 1024;

/// Copies both directions until each side has closed its half, passing half-closes through.
/// Returns bytes (sent from `a` to `b`, sent from `b` to `a`).
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}

/// The `forwarded` header (RFC 7239) as HBONE carries it, Istio's way: `for="<ip:port>"`, the
/// client the tunnel is for, and `host=<hostname>`, the Service a client called by its virtual
/// IP. Both are the sender's word: a receiver believes them only from a peer it trusts for them
/// (a waypoint), never to widen what the peer's certificate and address prove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub for_addr: Option<SocketAddr>,
    pub host: Option<String>,
}

impl Forwarded {
    /// The header value, `None` when there is nothing to say.
    pub fn to_header(&self) -> Option<String> {
        let mut pairs = Vec::with_capacity(2);
        if let Some(addr) = self.for_addr {
            pairs.push(format!("for=\"{addr}\""));
        }
        if let Some(host) = &self.host {
            pairs.push(format!("host={host}"));
        }
        (!pairs.is_empty()).then(|| pairs.join(";"))
    }

    /// Reads the first element of a `forwarded` value. A `for=` that is not an `ip:port`
    /// (`unknown`, an obfuscated name) and a `host=` that is not a DNS name are left out.
    pub fn parse(value: &str) -> Forwarded {
        let mut forwarded = Forwarded::default();
        let first = value.split(',').next().unwrap_or_default();
        for pair in first.split(';') {
            let Some((key, value)) = pair.trim().split_once('=') else { continue };
            let value = value.trim().trim_matches('"');
            if key.trim().eq_ignore_ascii_case("for") && forwarded.for_addr.is_none() {
                forwarded.for_addr = value.parse().ok();
            } else if key.trim().eq_ignore_ascii_case("host") && forwarded.host.is_none() {
                forwarded.host = is_hostname(value).then(|| value.to_ascii_lowercase());
            }
        }
        forwarded
    }
}

/// A DNS name as a Service hostname is written (letters, digits, `-`, `.`; at most 253 bytes).
fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !s.starts_with(['.', '-'])
}

/// A new W3C `traceparent` (version 00, random trace and parent ids, not sampled), as Istio's
/// ztunnel sends with each CONNECT so both sides' logs of one connection share a trace id.
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let parent: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{parent:016x}-00")
}

/// Whether `value` is a well-formed W3C `traceparent` (version 00): only such a value is passed on.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    matches!(parts.as_slice(), [v, t, p, f] if *v == "00" && hex(t, 32) && hex(p, 16) && hex(f, 2)
        && t.bytes().any(|b| b != b'0') && p.bytes().any(|b| b != b'0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trips_v4_and_v6_with_the_host() {
        for addr in ["10.0.0.1:4567", "[fd00::1]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let f = Forwarded { for_addr: Some(addr), host: Some("echo.demo.svc.cluster.local".into()) };
            assert_eq!(Forwarded::parse(&f.to_header().unwrap()), f);
        }
        assert_eq!(Forwarded::default().to_header(), None);
    }

    #[test]
    fn forwarded_parsing_takes_the_first_element_and_drops_what_is_not_an_address_or_a_name() {
        let cases = [
            ("proto=http;for=\"10.1.1.1:1\"", Some("10.1.1.1:1"), None),
            ("For=\"10.1.1.1:1\";Host=Echo.Demo", Some("10.1.1.1:1"), Some("echo.demo")),
            ("for=\"10.1.1.1:1\", for=\"10.2.2.2:2\"", Some("10.1.1.1:1"), None),
            ("by=x", None, None),
            ("for=unknown;host=\"a b\"", None, None),
            ("host=\"evil\r\nx: y\"", None, None),
            ("for=\"10.1.1.1:1\";for=\"10.9.9.9:9\"", Some("10.1.1.1:1"), None),
            ("", None, None),
        ];
        for (value, addr, host) in cases {
            let got = Forwarded::parse(value);
            assert_eq!(got.for_addr, addr.map(|a| a.parse().unwrap()), "{value}");
            assert_eq!(got.host.as_deref(), host, "{value}");
        }
    }

    #[test]
    fn traceparents_are_w3c_version_00() {
        let t = new_traceparent();
        assert!(is_traceparent(&t), "{t}");
        assert_ne!(t, new_traceparent());
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        ] {
            assert!(!is_traceparent(bad), "{bad}");
        }
        assert!(is_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
    }
}
