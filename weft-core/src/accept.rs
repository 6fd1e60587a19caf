//! The accept loop every Weft listener runs: one task per connection, at most a given number at
//! once (further connections wait in the kernel's backlog) and at most a given number from one
//! source address (more are reset at once, so one pod cannot starve the others), an accept error
//! (e.g. out of file descriptors) never ends the listener, and on drain it stops accepting, lets
//! open connections finish and cuts what remains after a deadline.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

use crate::drain;

/// Connections one source address may hold open on one listener (a fifth of the listener's
/// default 10,000: a single pod, or a single peer proxy, can never take more than that).
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 2_000;

/// How many connections a listener serves at once, in all and per source address, and how long
/// draining may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_per_source: usize,
    pub drain_deadline: Duration,
}

/// Open connections per source address of one listener.
#[derive(Debug)]
struct PerSource {
    max: usize,
    open: Mutex<HashMap<IpAddr, Count>>,
}

#[derive(Debug, Default)]
struct Count {
    open: usize,
    refused: u64,
}

/// One admitted connection of a source; counted until dropped.
#[derive(Debug)]
struct SourceGuard {
    table: Arc<PerSource>,
    ip: IpAddr,
}

impl PerSource {
    /// Admits one more connection from `ip`, or says how many were refused so far (for logs).
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<SourceGuard, u64> {
        // A panic while counting cannot leave a count invalid: keep using the map.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_default();
        if count.open >= self.max {
            count.refused += 1;
            return Err(count.refused);
        }
        count.open += 1;
        Ok(SourceGuard { table: self.clone(), ip })
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            count.open = count.open.saturating_sub(1);
            if count.open == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Closes `stream` with a reset (SO_LINGER 0), so the client sees a refusal, not an empty reply.
pub fn reset(stream: TcpStream) {
    if let Err(e) = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot set SO_LINGER 0; closing normally");
    }
    drop(stream);
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
    let per_source = Arc::new(PerSource { max: limits.max_per_source, open: Mutex::default() });
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
        let source = match per_source.admit(peer.ip().to_canonical()) {
            Ok(source) => source,
            Err(refused) => {
                // Logged at 1, 2, 4, 8... refusals of a source, not once each.
                if refused.is_power_of_two() {
                    warn!(listener = name, %peer, refused, max = limits.max_per_source,
                        "connection refused: this source already holds its share of the listener's connections");
                }
                reset(stream);
                continue;
            }
        };
        next_id += 1;
        let span = tracing::info_span!("conn", listener = name, id = next_id, %peer);
        let task = handler(stream, peer);
        connections.spawn(
            async move {
                task.await;
                drop((permit, source));
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
