//! One delta ADS stream, from its first request to its end: check who the client is, open a
//! subscription per type, answer subscription changes at once, record (N)ACKs, and push what
//! changed for this client when the snapshot changes (debounced). Anything the client sends that
//! cannot be read ends the stream with a gRPC status saying why; nothing it sends can panic.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::{Status, Streaming};
use weft_core::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use weft_core::proto::google::rpc;

use super::node::NodeInfo;
use super::resources::{Snapshot, XdsResource};
use super::server::{ClientStatus, Nack, Shared};
use super::subscription::{Delta, Subscription};

/// Responses awaiting an (N)ACK per type; older ones are forgotten (a late ACK of one is ignored).
const MAX_PENDING: usize = 64;
/// The most resource bytes one response carries: a quarter of gRPC's usual 4 MiB message limit,
/// leaving room for names, versions and framing.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

const SHUTTING_DOWN: &str = "the controller is shutting down; reconnect";

type Responses = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// The client went away; stop serving it.
struct Gone;

/// One stream's state once its first request was accepted.
struct Connection {
    id: u64,
    shared: Arc<Shared>,
    node: NodeInfo,
    tx: Responses,
    types: BTreeMap<String, TypeState>,
}

struct TypeState {
    sub: Subscription,
    /// Responses sent and not yet (N)ACKed, oldest first.
    pending: VecDeque<Pending>,
}

/// What one response carried, to record once the client acknowledges it.
struct Pending {
    nonce: String,
    upserts: Vec<(String, String)>,
    removed: Vec<String>,
}

/// Removes the stream from the client table when it ends, however it ends.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

/// Serves one stream until the client leaves, sends something unreadable, or the server shuts
/// down.
pub(super) async fn run(
    shared: Arc<Shared>,
    id: u64,
    peer: Option<SocketAddr>,
    token: Option<String>,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: Responses,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let timeout = shared.options.first_request_timeout;
    let first = tokio::select! {
        biased;
        () = shut_down(&mut shutdown) => {
            fail(&tx, Status::unavailable(SHUTTING_DOWN)).await;
            return;
        }
        first = tokio::time::timeout(timeout, requests.message()) => match first {
            Err(_) => {
                tracing::debug!(?timeout, "no first request in time");
                let msg = format!("no DeltaDiscoveryRequest within {timeout:?} of opening the stream");
                fail(&tx, Status::deadline_exceeded(msg)).await;
                return;
            }
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return,
            Ok(Err(status)) => {
                tracing::info!(%status, "unreadable first request");
                fail(&tx, unreadable(&status)).await;
                return;
            }
        },
    };
    let node = match NodeInfo::from_node(first.node.as_ref()) {
        Ok(node) => node,
        Err(e) => {
            tracing::info!(error = %e, "refused stream: bad node");
            fail(&tx, Status::invalid_argument(e.to_string())).await;
            return;
        }
    };
    tracing::Span::current().record("node", node.id.as_str());
    if let Some(authenticate) = &shared.authenticate {
        let principal = match authenticate.principal(token).await {
            Ok(principal) => principal,
            Err(why) => {
                tracing::info!(why, "refused stream: not authenticated");
                fail(
                    &tx,
                    Status::unauthenticated(format!("xDS needs the node's token (or the waypoint's): {why}")),
                )
                .await;
                return;
            }
        };
        if let Err(why) = node.admits(&principal) {
            tracing::info!(?principal, why, "refused stream: the token is not the stream's node's");
            fail(&tx, Status::permission_denied(why)).await;
            return;
        }
    }
    if !shared.serves(&first.type_url) {
        tracing::info!(type_url = first.type_url, "refused stream: type not served");
        fail(&tx, unknown_type(&shared, &first.type_url)).await;
        return;
    }
    tracing::info!(
        node_name = node.node_name.as_deref().unwrap_or(""),
        peer = ?peer,
        "xDS client connected"
    );
    shared.register(ClientStatus {
        connection_id: id,
        node: node.clone(),
        peer,
        connected_at: SystemTime::now(),
        types: BTreeMap::new(),
    });
    let _registration = Registration { shared: shared.clone(), id };
    let mut conn = Connection { id, shared, node, tx, types: BTreeMap::new() };
    conn.serve(first, requests, shutdown).await;
}

impl Connection {
    async fn serve(
        &mut self,
        first: DeltaDiscoveryRequest,
        mut requests: Streaming<DeltaDiscoveryRequest>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut snapshots = self.shared.snapshots.subscribe();
        let snapshot = snapshots.borrow_and_update().clone();
        if self.handle(first, &snapshot).await.is_err() {
            return;
        }
        let (debounce, max_debounce) = (self.shared.options.debounce, self.shared.options.max_debounce);
        // When the first unpushed update arrived, and the last one.
        let mut dirty: Option<(Instant, Instant)> = None;
        let mut snapshots_open = true;
        loop {
            let deadline = dirty.map(|(first, last)| (last + debounce).min(first + max_debounce));
            tokio::select! {
                biased;
                () = shut_down(&mut shutdown) => {
                    fail(&self.tx, Status::unavailable(SHUTTING_DOWN)).await;
                    return;
                }
                () = self.tx.closed() => return,
                message = requests.message() => match message {
                    Ok(Some(request)) => {
                        let snapshot = snapshots.borrow().clone();
                        if self.handle(request, &snapshot).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        tracing::debug!("client closed the stream");
                        return;
                    }
                    Err(status) => {
                        tracing::info!(%status, "unreadable request; closing the stream");
                        fail(&self.tx, unreadable(&status)).await;
                        return;
                    }
                },
                changed = snapshots.changed(), if snapshots_open => match changed {
                    Ok(()) => {
                        let now = Instant::now();
                        dirty = Some((dirty.map_or(now, |(first, _)| first), now));
                    }
                    // Cannot happen while `shared` holds the sender; stop listening if it does.
                    Err(_) => snapshots_open = false,
                },
                () = sleep_until(deadline), if deadline.is_some() => {
                    dirty = None;
                    let snapshot = snapshots.borrow_and_update().clone();
                    if self.push_all(&snapshot).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// One request: an (N)ACK, a subscription change, or both.
    async fn handle(&mut self, request: DeltaDiscoveryRequest, snapshot: &Snapshot) -> Result<(), Gone> {
        let DeltaDiscoveryRequest {
            type_url,
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            initial_resource_versions: initial,
            response_nonce,
            error_detail,
            node: _,
        } = request;
        if !self.shared.serves(&type_url) {
            // Only a stream's first request is refused for this: a proxy that later asks for a type
            // Weft does not serve keeps what it has.
            tracing::warn!(type_url, "client asked for a type this server does not serve; ignoring it");
            return Ok(());
        }
        if !response_nonce.is_empty() {
            self.acknowledge(&type_url, &response_nonce, error_detail.as_ref());
        }
        let (forced, opened) = match self.types.entry(type_url.clone()) {
            Entry::Vacant(entry) => {
                let (sub, forced) = Subscription::open(&subscribe, &unsubscribe, initial);
                entry.insert(TypeState { sub, pending: VecDeque::new() });
                (forced, true)
            }
            Entry::Occupied(_) if subscribe.is_empty() && unsubscribe.is_empty() => return Ok(()),
            Entry::Occupied(entry) => (entry.into_mut().sub.change(&subscribe, &unsubscribe), false),
        };
        if let Some(state) = self.types.get(&type_url) {
            let (wildcard, names) = (state.sub.wildcard(), state.sub.names().clone());
            self.shared.update_type(self.id, &type_url, |t| {
                t.wildcard = wildcard;
                t.names = names;
            });
        }
        // A new subscription is always answered, even with nothing (the client waits for it), as
        // is a request naming resources; a change of the wildcard only if it changes something.
        let always = opened || !forced.is_empty();
        self.push(&type_url, snapshot, &forced, always).await
    }

    /// Records an ACK (the client holds what the response carried) or a NACK (it does not; it is
    /// logged and recorded, and not resent: the next push carries only what changes after it).
    fn acknowledge(&mut self, type_url: &str, nonce: &str, error: Option<&rpc::Status>) {
        let Some(state) = self.types.get_mut(type_url) else {
            tracing::debug!(type_url, nonce, "(N)ACK for a type never subscribed; ignoring it");
            return;
        };
        // Responses are answered in order: those before the one answered are settled too.
        let pending = match state.pending.iter().position(|p| p.nonce == nonce) {
            Some(i) => {
                state.pending.drain(..i);
                state.pending.pop_front()
            }
            None => None,
        };
        match error {
            Some(status) => {
                tracing::warn!(
                    node = self.node.id,
                    type_url,
                    nonce,
                    code = status.code,
                    reason = status.message,
                    "xDS client rejected a response (NACK); it keeps its previous config and will get the next change"
                );
                let nack =
                    Nack { nonce: nonce.to_owned(), code: status.code, message: status.message.clone() };
                self.shared.update_type(self.id, type_url, |t| {
                    t.nacks += 1;
                    t.last_nack = Some(nack);
                });
            }
            None => {
                let Some(pending) = pending else {
                    tracing::debug!(type_url, nonce, "ACK of an unknown or forgotten nonce; ignoring it");
                    return;
                };
                tracing::debug!(type_url, nonce, "ACK");
                self.shared.update_type(self.id, type_url, |t| {
                    t.acks += 1;
                    t.last_acked_nonce = Some(pending.nonce);
                    for name in pending.removed {
                        t.acked.remove(&name);
                    }
                    t.acked.extend(pending.upserts);
                });
            }
        }
    }

    /// Pushes what changed for this client in every subscribed type.
    async fn push_all(&mut self, snapshot: &Snapshot) -> Result<(), Gone> {
        let type_urls: Vec<String> = self.types.keys().cloned().collect();
        for type_url in type_urls {
            self.push(&type_url, snapshot, &BTreeSet::new(), false).await?;
        }
        Ok(())
    }

    /// Sends one type's delta against `snapshot`, if there is one (or `always`).
    async fn push(
        &mut self,
        type_url: &str,
        snapshot: &Snapshot,
        forced: &BTreeSet<String>,
        always: bool,
    ) -> Result<(), Gone> {
        let visible = self.shared.view.select(snapshot, &self.node, type_url);
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        let delta = state.sub.delta(&visible, forced);
        if delta.is_empty() && !always {
            return Ok(());
        }
        state.sub.sent(&delta);
        // Large deltas (a first push to a ztunnel of a big mesh) go in several responses, each
        // small enough for a gRPC client's default 4 MiB message limit; the client ACKs each.
        for chunk in chunks(&delta) {
            let nonce = self.shared.nonce();
            let response = response(type_url, snapshot.version(), &chunk, &nonce);
            if state.pending.len() == MAX_PENDING {
                state.pending.pop_front();
            }
            state.pending.push_back(Pending {
                nonce: nonce.clone(),
                upserts: chunk
                    .upserts
                    .iter()
                    .map(|r| (r.name().to_owned(), r.version().to_owned()))
                    .collect(),
                removed: chunk.removed.clone(),
            });
            self.shared.update_type(self.id, type_url, |t| t.responses += 1);
            tracing::debug!(
                type_url,
                nonce,
                resources = chunk.upserts.len(),
                removed = chunk.removed.len(),
                "push"
            );
            self.tx.send(Ok(response)).await.map_err(|_| Gone)?;
        }
        Ok(())
    }
}

/// `delta` split so that each response's resources take at most [`MAX_RESPONSE_BYTES`] (a
/// single larger resource goes alone); removals go with the first. Never empty: an empty delta
/// is one empty response.
fn chunks<'s>(delta: &Delta<'s>) -> Vec<Delta<'s>> {
    let mut out = vec![Delta { upserts: Vec::new(), removed: delta.removed.clone() }];
    let mut size = 0;
    for resource in &delta.upserts {
        let len = resource.body().value.len() + resource.name().len() + resource.version().len();
        let current = out.last().map_or(0, |c| c.upserts.len());
        if current > 0 && size + len > MAX_RESPONSE_BYTES {
            out.push(Delta { upserts: Vec::new(), removed: Vec::new() });
            size = 0;
        }
        size += len;
        if let Some(last) = out.last_mut() {
            last.upserts.push(resource);
        }
    }
    out
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.unregister(self.id);
        tracing::info!("xDS client disconnected");
    }
}

fn response(type_url: &str, system_version: &str, delta: &Delta<'_>, nonce: &str) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: system_version.to_owned(),
        resources: delta.upserts.iter().map(|r| to_proto(r)).collect(),
        type_url: type_url.to_owned(),
        removed_resources: delta.removed.clone(),
        nonce: nonce.to_owned(),
    }
}

fn to_proto(resource: &XdsResource) -> Resource {
    Resource {
        name: resource.name().to_owned(),
        aliases: resource.aliases().to_vec(),
        version: resource.version().to_owned(),
        resource: Some(resource.body().clone()),
        ttl: None,
        cache_control: None,
    }
}

/// Completes once the server shuts down.
async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    // The guard wait_for returns is dropped here, not held across the caller's awaits. An error
    // (the sender gone) cannot happen while the caller holds `Shared`; it reads as shutdown too.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Ends the stream with `status` (if the client is still there to hear it).
async fn fail(tx: &Responses, status: Status) {
    let _ = tx.send(Err(status)).await;
}

fn unreadable(status: &Status) -> Status {
    Status::invalid_argument(format!(
        "cannot read the DeltaDiscoveryRequest stream ({}); send envoy.service.discovery.v3.DeltaDiscoveryRequest messages",
        status.message()
    ))
}

fn unknown_type(shared: &Shared, type_url: &str) -> Status {
    let served: Vec<&str> = shared.options.type_urls.iter().map(String::as_str).collect();
    Status::invalid_argument(format!(
        "type_url {type_url:?} is not served; this server serves {}",
        served.join(", ")
    ))
}

/// Sleeps until `deadline`; forever without one (the select! guard keeps that branch off then).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
