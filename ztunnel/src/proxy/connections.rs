//! The open inbound connections (HBONE streams, plaintext inbound, same-node), each with what
//! it was admitted with and a way to close it, so that after every xDS update the ones the
//! policy now denies are closed, as Istio's ztunnel does. Owns only the registry and the
//! re-check task; the decision is [`crate::inbound::recheck`] (pure), and the connection's own
//! task does the closing (it counts and logs it).
//!
//! Only an authorization policy's denial closes a connection: a destination gone from the
//! state, moved to another node or out of the mesh, or given a waypoint since, leaves its open
//! connections alone (see [`crate::inbound::recheck`] for why). Closing on "unknown workload"
//! would also cut every connection of a pod whenever the controller's view of it blinks.
//!
//! Cost: nothing per packet; one [`crate::inbound::check`] per open connection per update,
//! under a lock that registration and removal take briefly. Memory: one entry per open
//! connection, removed when its [`Registered`] guard drops, so bounded by the listeners'
//! connection limits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{oneshot, watch};
use tracing::debug;
use weft_core::state::{ProxyState, Shared};

use crate::inbound::{recheck, Admitted, InboundRefusal};

/// The registry of open inbound connections of one proxy.
pub(super) struct Connections {
    state: Arc<Shared<ProxyState>>,
    node: String,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

/// One open connection.
struct Entry {
    admitted: Admitted,
    /// Taken when the connection is told to close (at most once).
    close: Option<oneshot::Sender<Closed>>,
}

/// A registered connection: tells its task when to close, and leaves the registry on drop.
pub(super) struct Registered {
    id: u64,
    connections: Arc<Connections>,
    closed: oneshot::Receiver<Closed>,
}

/// Why a connection is to be closed: the policy's refusal of what it was admitted with.
#[derive(Debug)]
pub(super) struct Closed {
    pub(super) refusal: InboundRefusal,
    pub(super) admitted: Admitted,
}

impl Connections {
    pub(super) fn new(state: Arc<Shared<ProxyState>>, node: String) -> Self {
        Connections { state, node, next_id: AtomicU64::new(0), open: Mutex::new(HashMap::new()) }
    }

    /// Registers a connection admitted with `admitted` against `checked`, the state its
    /// [`crate::inbound::check`] read. An update that landed since (the re-check task may have
    /// run before this entry existed) is caught up with here, under the registry's lock, so no
    /// update is missed: the returned guard then already reports the denial.
    pub(super) fn register(self: &Arc<Self>, admitted: Admitted, checked: &Arc<ProxyState>) -> Registered {
        let (close, closed) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut entry = Entry { admitted, close: Some(close) };
        let mut open = self.lock();
        let current = self.state.load();
        if !Arc::ptr_eq(&current, checked) {
            entry.recheck(&current, &self.node);
        }
        open.insert(id, entry);
        drop(open);
        Registered { id, connections: Arc::clone(self), closed }
    }

    /// Checks every open connection against the current state and tells those the policy now
    /// denies to close. Returns how many were told.
    pub(super) fn recheck(&self) -> usize {
        let mut open = self.lock();
        // Loaded under the lock: a connection registered after this sees this state or a newer one.
        let state = self.state.load();
        let closed =
            open.values_mut().map(|entry| entry.recheck(&state, &self.node)).filter(|told| *told).count();
        debug!(open = open.len(), closed, "open inbound connections re-checked");
        closed
    }

    /// Re-checks after each change of `updates` (each applied xDS response). Never returns:
    /// when the updates end, so do the re-checks, and the proxy runs on.
    pub(super) async fn recheck_on_updates<T>(&self, mut updates: watch::Receiver<T>) {
        // Connections are registered against the state they were checked with; only changes
        // from here on matter.
        updates.borrow_and_update();
        while updates.changed().await.is_ok() {
            updates.borrow_and_update();
            self.recheck();
        }
        std::future::pending::<()>().await;
    }

    /// How many connections are open.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    /// The entries; a panic elsewhere while holding the lock leaves them consistent (each
    /// change is one map operation), so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Entry {
    /// Tells the connection to close if `state` denies it now. Whether it was told.
    fn recheck(&mut self, state: &ProxyState, node: &str) -> bool {
        if self.close.is_none() {
            return false;
        }
        let Some(refusal) = recheck(state, node, &self.admitted) else { return false };
        if let Some(close) = self.close.take() {
            // The connection's task may have ended meanwhile: nothing left to close.
            let _ = close.send(Closed { refusal, admitted: self.admitted.clone() });
        }
        true
    }
}

impl Registered {
    /// Resolves once a policy update denies the connection; never otherwise.
    pub(super) async fn closed(&mut self) -> Closed {
        match (&mut self.closed).await {
            Ok(refusal) => refusal,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests;
