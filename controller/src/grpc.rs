//! Serving the controller's gRPC port: one tonic server for whatever services it carries (the
//! CA, xDS), with a request timeout, HTTP/2 keepalive, and a drain with a deadline on shutdown.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;

/// How long a unary request (a CA call) may take; streams are not cut by it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// After the shutdown signal, how long in-flight requests get before the server stops anyway.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// HTTP/2 pings on idle connections, so streams of proxies that vanished are closed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `routes` on `listener` until `shutdown` completes; then calls `on_drain` (e.g. to end
/// long-lived streams) and lets in-flight requests finish for at most [`DRAIN_DEADLINE`].
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    what: &'static str,
    shutdown: impl Future<Output = ()>,
    on_drain: impl FnOnce(),
) -> Result<(), tonic::transport::Error> {
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            // Either a send or the sender dropping means: drain.
            let _ = drain_rx.await;
        });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        () = shutdown => {}
    }
    tracing::info!("{what} shutting down; draining in-flight requests");
    on_drain();
    let _ = drain_tx.send(());
    match tokio::time::timeout(DRAIN_DEADLINE, server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(deadline = ?DRAIN_DEADLINE, "{what} drain deadline passed; closing remaining connections");
            Ok(())
        }
    }
}
