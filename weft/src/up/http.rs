//! The HTTP/1.1 GET of `weft up` (the ztunnel's readiness, admin and metrics endpoints) through
//! hyper, over a socket connected on the caller's thread (so in the caller's network namespace),
//! bounded in time and size. It must not panic on anything a peer sends.

use std::fmt::Write as _;
use std::future::Future;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;

/// Why a GET of one of the ztunnel's HTTP endpoints failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connecting: {0} (does anything listen there, in this network namespace?)")]
    Connect(#[source] std::io::Error),
    #[error("setting up the connection: {0}")]
    Socket(#[source] std::io::Error),
    #[error("starting the client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{path:?} is not a valid request path: {source}")]
    Path {
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("no HTTP/1.1 response: {}", error_chain(.0))]
    Exchange(#[source] hyper::Error),
    #[error("reading the response body: {}", error_chain(.0))]
    Body(#[source] hyper::Error),
    #[error("the response body is larger than the {limit}-byte limit{}", announced_size(*.announced))]
    TooLarge { limit: usize, announced: Option<u64> },
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
}

/// hyper's errors print only their own kind ("error reading a body from connection"); what went
/// wrong is in their sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let _ = write!(text, ": {e}");
        source = e.source();
    }
    text
}

fn announced_size(announced: Option<u64>) -> String {
    announced.map(|n| format!(" (it announces {n} bytes)")).unwrap_or_default()
}

/// What one [`http_get`] may take.
#[derive(Debug, Clone, Copy)]
struct HttpLimits {
    connect: Duration,
    /// Connecting included.
    total: Duration,
    max_body: usize,
}

impl HttpLimits {
    /// A ztunnel's `/config_dump` or `/metrics` is far below 16 MiB; its endpoints answer at once.
    const DEFAULT: HttpLimits =
        HttpLimits { connect: Duration::from_secs(2), total: Duration::from_secs(10), max_body: 16 << 20 };
}

/// An HTTP/1.1 GET of `path` at `addr` (the ztunnel's admin, readiness and metrics endpoints):
/// the status and the body (invalid UTF-8 replaced). It connects from the calling thread, so
/// inside [`crate::cluster::in_netns`] the connection is made in that namespace, then speaks
/// HTTP with hyper over it on a current-thread runtime of its own. 2 s to connect, 10 s in all,
/// bodies up to 16 MiB.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), HttpError> {
    get(addr, path, HttpLimits::DEFAULT)
}

fn get(addr: SocketAddr, path: &str, limits: HttpLimits) -> Result<(u16, String), HttpError> {
    let started = Instant::now();
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|source| HttpError::Path { path: path.into(), source })?;
    let stream = TcpStream::connect_timeout(&addr, limits.connect).map_err(HttpError::Connect)?;
    stream.set_nonblocking(true).map_err(HttpError::Socket)?;
    let left = limits.total.saturating_sub(started.elapsed());
    let exchange = async move {
        let stream = tokio::net::TcpStream::from_std(stream).map_err(HttpError::Socket)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(HttpError::Exchange)?;
        // Drives the connection while the response is read; its errors surface in the response
        // or the body. It ends with the response (Connection: close) or with the runtime.
        tokio::spawn(connection);
        let response = sender.send_request(request).await.map_err(HttpError::Exchange)?;
        let status = response.status().as_u16();
        let body = read_body(response.into_body(), limits.max_body).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    block_on_own_runtime(async move {
        tokio::time::timeout(left, exchange).await.map_err(|_| HttpError::Timeout(limits.total))?
    })?
}

/// The body, refused as soon as it (or its announced length) passes `max` bytes.
async fn read_body(mut body: Incoming, max: usize) -> Result<Vec<u8>, HttpError> {
    let limit = u64::try_from(max).unwrap_or(u64::MAX);
    let announced = body.size_hint().lower();
    if announced > limit {
        return Err(HttpError::TooLarge { limit: max, announced: Some(announced) });
    }
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(HttpError::Body)?;
        if let Ok(data) = frame.into_data() {
            if out.len().saturating_add(data.len()) > max {
                return Err(HttpError::TooLarge { limit: max, announced: None });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// Runs `future` on a current-thread runtime of its own. Such a runtime cannot be driven from a
/// thread that already runs one (tokio panics), so there it gets a thread of its own.
fn block_on_own_runtime<F>(future: F) -> Result<F::Output, HttpError>
where
    F: Future + Send,
    F::Output: Send,
{
    let run = move || {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(HttpError::Runtime)?;
        Ok(runtime.block_on(future))
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    std::thread::scope(|scope| match scope.spawn(run).join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Read, Write};

    use super::*;

    /// A server for one connection: it reads the request head, then writes `pieces` one by one
    /// (each its own TCP segment) and closes; with no pieces it answers nothing until the client
    /// hangs up.
    fn serve(pieces: Vec<Vec<u8>>) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_nodelay(true).unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            if pieces.is_empty() {
                let _ = stream.read(&mut byte);
            }
            for piece in pieces {
                if stream.write_all(&piece).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        addr
    }

    fn pieces(parts: &[&[u8]]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn http_get_reads_a_chunked_body_split_anywhere() {
        // "é" and "✓" are split across chunks (the old client sliced a &str there and panicked)
        // and the segments cut the chunk-size lines, their CRLFs and the characters again.
        let body = "h\u{e9}llo \u{2713}";
        let bytes = body.as_bytes();
        let mut wire = CHUNKED.to_vec();
        for chunk in [&bytes[..2], &bytes[2..7], &bytes[7..]] {
            wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let cuts =
            [CHUNKED.len() - 1, CHUNKED.len() + 1, CHUNKED.len() + 3, CHUNKED.len() + 4, wire.len() - 3];
        let mut parts = Vec::new();
        let mut from = 0;
        for cut in cuts.into_iter().chain([wire.len()]) {
            parts.push(wire[from..cut].to_vec());
            from = cut;
        }
        assert_eq!(http_get(serve(parts), "/metrics").unwrap(), (200, body.to_string()));
    }

    #[test]
    fn http_get_names_a_truncated_chunked_body() {
        let addr = serve(pieces(&[CHUNKED, b"10\r\nonly a few"]));
        let e = http_get(addr, "/").unwrap_err();
        assert!(matches!(e, HttpError::Body(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            e.starts_with("reading the response body: ")
                && e.ends_with("end of file before message length reached"),
            "{e}"
        );
    }

    #[test]
    fn http_get_refuses_chunk_sizes_it_cannot_hold() {
        let addr = serve(pieces(&[CHUNKED, b"fffffffffffffffffffff\r\nx\r\n0\r\n\r\n"]));
        let e = http_get(addr, "/").unwrap_err().to_string();
        assert!(
            e.starts_with("reading the response body: ") && e.ends_with("invalid chunk size: overflow"),
            "{e}"
        );

        // A size that parses but passes the limit: refused once the data passes it.
        let limits = HttpLimits { max_body: 1024, ..HttpLimits::DEFAULT };
        let addr = serve(pieces(&[CHUNKED, b"7fffffff\r\n", &[b'x'; 4096]]));
        let e = get(addr, "/", limits).unwrap_err();
        assert!(matches!(e, HttpError::TooLarge { limit: 1024, announced: None }), "{e:?}");
        assert_eq!(e.to_string(), "the response body is larger than the 1024-byte limit");
    }

    #[test]
    fn http_get_refuses_an_announced_body_above_16_mib_before_reading_it() {
        let addr = serve(pieces(&[b"HTTP/1.1 200 OK\r\nContent-Length: 16777217\r\n\r\n"]));
        let e = http_get(addr, "/").unwrap_err().to_string();
        assert_eq!(
            e,
            "the response body is larger than the 16777216-byte limit (it announces 16777217 bytes)"
        );
    }

    #[test]
    fn http_get_replaces_invalid_utf8() {
        let addr = serve(pieces(&[
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 6\r\n\r\n",
            b"no\xff\xfe\xc3!",
        ]));
        assert_eq!(http_get(addr, "/").unwrap(), (503, "no\u{fffd}\u{fffd}\u{fffd}!".to_string()));
    }

    #[test]
    fn http_get_says_what_is_wrong_with_the_peer() {
        let addr = serve(pieces(&[b"SSH-2.0-OpenSSH_9.6\r\n\r\n"]));
        let e = http_get(addr, "/").unwrap_err();
        assert!(matches!(e, HttpError::Exchange(_)), "{e:?}");

        let addr = serve(pieces(&[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"]));
        assert!(matches!(http_get(addr, "/").unwrap_err(), HttpError::Body(_)));

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(matches!(http_get(closed, "/").unwrap_err(), HttpError::Connect(_)));

        let e = http_get(closed, "no path").unwrap_err();
        assert!(matches!(e, HttpError::Path { .. }), "{e:?}");

        let limits = HttpLimits { total: Duration::from_millis(200), ..HttpLimits::DEFAULT };
        let e = get(serve(Vec::new()), "/", limits).unwrap_err();
        assert_eq!(e.to_string(), "no complete response within 200ms");
    }

    #[test]
    fn http_get_runs_inside_a_runtime_too() {
        let addr = serve(pieces(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(runtime.block_on(async { http_get(addr, "/") }).unwrap(), (200, "ok".to_string()));
    }
}
