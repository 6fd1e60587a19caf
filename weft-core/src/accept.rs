//! The accept loop every Weft listener runs: one task per connection, at most a given number at
//! once (further connections wait in the kernel's backlog), an accept error (e.g. out of file
//! descriptors) never ends the listener, and on drain it stops accepting, lets open connections
//! finish and cuts what remains after a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

use crate::drain;

/// How many connections a listener serves at once, and how long draining may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub drain_deadline: Duration,
}

/// Accepts on `listener` until `drain` fires, running `handler` for each connection in its own
/// task (in a span naming the listener, a connection number and the peer).
pub async fn serve<F, Fut>(
    listener: &TcpListener,
    name: &'static str,
    limits: Limits,
    mut drain: drain::Watch,
    mut handler: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        let permit = tokio::select! {
            _ = drain.signaled() => break,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // the semaphore is never closed
            },
        };
        let accepted = tokio::select! {
            _ = drain.signaled() => break,
            accepted = listener.accept() => accepted,
        };
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        next_id += 1;
        let span = tracing::info_span!("conn", listener = name, id = next_id, %peer);
        let task = handler(stream, peer);
        connections.spawn(
            async move {
                task.await;
                drop(permit);
            }
            .instrument(span),
        );
    }
    info!(listener = name, open = connections.len(), "listener draining");
    let finished = tokio::time::timeout(limits.drain_deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(
            listener = name,
            cut = connections.len(),
            "drain deadline passed; closing remaining connections"
        );
        connections.shutdown().await;
    }
}
