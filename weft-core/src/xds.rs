//! The proxies' xDS client: one delta ADS stream to the controller, subscribing (wildcard) to
//! the resource types a [`Handler`] names: ztunnel takes Istio's `Address` and `Authorization`
//! ([`MeshHandler`]), the waypoint its own Waypoint resource as well. Owns the stream, ACK/NACK,
//! the versions held across reconnects and the reconnect backoff; what a resource means is the
//! handler's.
//!
//! - Each response's resources are decoded and converted by the handler *before* anything is
//!   locked, then applied at once: a 10,000-workload push never holds up the data path's lookups.
//! - Every response is ACKed, or NACKed with the reasons of the resources that could not be
//!   taken in; the good resources of a NACKed response are still applied, the bad ones leave what
//!   the proxy held before untouched.
//! - When the stream ends or cannot be opened, the client reconnects after a jittered backoff
//!   that doubles from 100 ms to a 15 s cap and starts over only after a stream delivered a
//!   response, and sends `initial_resource_versions`, so the controller sends only what changed
//!   meanwhile. The proxy keeps serving its last good configuration.
//! - Each applied response bumps a generation on a watch channel; [`Synced`] says when every
//!   subscribed type has arrived once (readiness waits for it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;

use crate::authz::Policy;
use crate::cert_manager::Token;
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use crate::proto::google::rpc;
use crate::proto::istio::security::Authorization;
use crate::proto::istio::workload::Address;
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::state::{AddressResource, ProxyState, Shared};

/// The first reconnect delay, before jitter.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// The largest xDS message either side takes: a real mesh's first push or one large policy runs
/// to tens of MiB, past gRPC's 4 MiB default.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
/// gRPC's `INVALID_ARGUMENT`, the code a NACK carries.
const INVALID_ARGUMENT: i32 = 3;
/// How long a connect to the controller may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Who this proxy is, as the controller should see it.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// The controller's xDS port and how to reach it.
    pub endpoint: crate::control::ControlPlane,
    /// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` (or `waypoint~...`).
    pub node_id: String,
    /// String metadata of the node (`NODE_NAME`, `WAYPOINT_NAME`, ...).
    pub metadata: BTreeMap<String, String>,
    /// Sent as `authorization: Bearer <token>` (a file's token is re-read on each connect).
    pub token: Token,
}

/// What a proxy subscribes to and does with what arrives.
pub trait Handler: Send + Sync + 'static {
    /// One resource, decoded and converted into the proxy's own type.
    type Resource: Send;

    /// The type URLs subscribed to (wildcard), in the order they are requested.
    fn type_urls(&self) -> Vec<&'static str>;

    /// Decodes and converts the body of the resource `name` of `type_url`. Runs with nothing
    /// locked; an error says what is wrong (it is sent back in the NACK).
    fn decode(&self, type_url: &str, name: &str, body: &[u8]) -> Result<Self::Resource, String>;

    /// Applies one response at once: the `removed` names, then `resources`. Returns each
    /// resource that could not be applied, by name, with why.
    fn apply(
        &self,
        type_url: &str,
        removed: &[String],
        resources: Vec<(String, Self::Resource)>,
    ) -> Vec<(String, String)>;
}

/// What the client has received so far: a generation bumped on every applied response, and
/// which subscribed types have arrived at least once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub generation: u64,
    /// The generation at which every subscribed type had arrived, once they have.
    pub complete_at: Option<u64>,
    /// Subscribed types not received yet.
    pub missing: BTreeSet<&'static str>,
}

/// The reconnect delay: doubling from [`BACKOFF_START`] to [`BACKOFF_MAX`], each delay jittered
/// down to as little as half, so that proxies cut off together do not come back together.
#[derive(Clone, Debug)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    next: Duration,
}

/// How one stream ended.
#[derive(Debug)]
pub struct StreamEnd {
    /// Whether the stream delivered at least one response (this resets the backoff).
    pub delivered: bool,
    /// Why it ended, when it failed.
    pub error: Option<tonic::Status>,
}

/// Istio's `Address` and `Authorization` into the shared [`ProxyState`]: all ztunnel takes, and
/// the part of the waypoint's subscription that is the mesh.
pub struct MeshHandler {
    pub state: Arc<Shared<ProxyState>>,
}

/// A decoded mesh resource.
pub enum MeshResource {
    Address(AddressResource),
    Authorization(Policy),
}

impl Synced {
    /// Nothing received yet of `type_urls`.
    pub fn new(type_urls: &[&'static str]) -> Synced {
        Synced { generation: 0, complete_at: None, missing: type_urls.iter().copied().collect() }
    }

    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }

    /// Records an applied response of `type_url`.
    fn received(&mut self, type_url: &str) {
        self.generation += 1;
        self.missing.remove(type_url);
        if self.complete() && self.complete_at.is_none() {
            self.complete_at = Some(self.generation);
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(BACKOFF_START, BACKOFF_MAX)
    }
}

impl Backoff {
    pub fn new(start: Duration, max: Duration) -> Backoff {
        Backoff { start, max, next: start }
    }

    /// The delay before the next attempt; the one after doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = base / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    /// Starts over from the first delay (after a stream that delivered something).
    pub fn reset(&mut self) {
        self.next = self.start;
    }
}

/// Runs the client until the process ends: connect, stream, reconnect.
pub async fn run<H: Handler>(config: XdsConfig, handler: Arc<H>, synced: watch::Sender<Synced>) {
    let held: HashMap<&'static str, BTreeMap<String, String>> = HashMap::new();
    let held = Arc::new(tokio::sync::Mutex::new(held));
    let endpoint = config.endpoint.clone();
    reconnect(Backoff::default(), endpoint.url(), || {
        let (config, handler, synced, held) = (&config, &handler, &synced, held.clone());
        async move {
            let mut held = held.lock().await;
            stream(config, handler.as_ref(), synced, &mut held).await
        }
    })
    .await
}

/// The reconnect loop: `attempt` runs one stream; between attempts the backoff's delay passes,
/// reset only when the stream delivered a response.
async fn reconnect<F, Fut>(mut backoff: Backoff, endpoint: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StreamEnd>,
{
    loop {
        let end = attempt().await;
        if end.delivered {
            backoff.reset();
        }
        let retry_in = backoff.next_delay();
        match end.error {
            None => tracing::warn!(endpoint, ?retry_in, "xDS stream ended; reconnecting"),
            Some(e) => tracing::warn!(
                endpoint,
                error = %e,
                ?retry_in,
                "xDS stream failed; keeping the last configuration and reconnecting"
            ),
        }
        tokio::time::sleep(retry_in).await;
    }
}

/// One stream, from connect to its end.
async fn stream<H: Handler>(
    config: &XdsConfig,
    handler: &H,
    synced: &watch::Sender<Synced>,
    held: &mut HashMap<&'static str, BTreeMap<String, String>>,
) -> StreamEnd {
    let mut delivered = false;
    let error = open_and_serve(config, handler, synced, held, &mut delivered).await.err();
    StreamEnd { delivered, error }
}

async fn open_and_serve<H: Handler>(
    config: &XdsConfig,
    handler: &H,
    synced: &watch::Sender<Synced>,
    held: &mut HashMap<&'static str, BTreeMap<String, String>>,
    delivered: &mut bool,
) -> Result<(), tonic::Status> {
    let channel = config.endpoint.connect(CONNECT_TIMEOUT).await.map_err(|e| {
        tonic::Status::unavailable(format!("cannot connect to {}: {}", config.endpoint, error_chain(&e)))
    })?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let types = handler.type_urls();
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    for (i, type_url) in types.iter().enumerate() {
        let request = DeltaDiscoveryRequest {
            node: (i == 0).then(|| node(config)),
            type_url: (*type_url).to_owned(),
            initial_resource_versions: held.get(type_url).cloned().unwrap_or_default(),
            ..Default::default()
        };
        tx.send(request).await.map_err(|_| tonic::Status::internal("request channel closed"))?;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let token = config.token.value().await.map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
    if let Some(token) = token {
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| tonic::Status::invalid_argument("the token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut responses = client.delta_aggregated_resources(request).await?.into_inner();
    tracing::info!(endpoint = config.endpoint.url(), "xDS stream open");
    while let Some(response) = responses.message().await? {
        *delivered = true;
        let type_url = response.type_url.clone();
        let nonce = response.nonce.clone();
        let errors = match types.iter().find(|t| **t == type_url) {
            Some(subscribed) => {
                let errors = apply(handler, subscribed, held.entry(subscribed).or_default(), response);
                synced.send_modify(|s| s.received(subscribed));
                errors
            }
            None => vec![format!("type {type_url} was not subscribed to")],
        };
        let error_detail = (!errors.is_empty()).then(|| {
            let message = errors.join("; ");
            tracing::warn!(type_url, nonce, message, "NACK: resources refused");
            rpc::Status { code: INVALID_ARGUMENT, message, details: Vec::new() }
        });
        let ack =
            DeltaDiscoveryRequest { type_url, response_nonce: nonce, error_detail, ..Default::default() };
        if tx.send(ack).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Decodes one response (nothing locked), then has the handler apply it; returns why each
/// refused resource was refused. `versions` follows what is held.
fn apply<H: Handler>(
    handler: &H,
    type_url: &str,
    versions: &mut BTreeMap<String, String>,
    response: DeltaDiscoveryResponse,
) -> Vec<String> {
    let mut errors = Vec::new();
    let mut decoded = Vec::with_capacity(response.resources.len());
    let mut pending_versions = BTreeMap::new();
    for resource in response.resources {
        let name = resource.name;
        let Some(body) = resource.resource else {
            errors.push(format!("{name}: no body"));
            continue;
        };
        if body.type_url != type_url {
            errors.push(format!("{name}: body is {}, expected {type_url}", body.type_url));
            continue;
        }
        match handler.decode(type_url, &name, &body.value) {
            Ok(r) => {
                pending_versions.insert(name.clone(), resource.version);
                decoded.push((name, r));
            }
            Err(e) => errors.push(e),
        }
    }
    for name in &response.removed_resources {
        versions.remove(name);
    }
    for (name, why) in handler.apply(type_url, &response.removed_resources, decoded) {
        // A refused resource keeps the version held before (if any), not the one refused.
        pending_versions.remove(&name);
        errors.push(why);
    }
    versions.extend(pending_versions);
    errors
}

fn node(config: &XdsConfig) -> Node {
    let string = |s: &str| Value { kind: Some(Kind::StringValue(s.to_owned())) };
    Node {
        id: config.node_id.clone(),
        metadata: Some(Struct {
            fields: config.metadata.iter().map(|(k, v)| (k.clone(), string(v))).collect(),
        }),
        ..Default::default()
    }
}

impl Handler for MeshHandler {
    type Resource = MeshResource;

    fn type_urls(&self) -> Vec<&'static str> {
        vec![ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]
    }

    fn decode(&self, type_url: &str, name: &str, body: &[u8]) -> Result<MeshResource, String> {
        match type_url {
            ADDRESS_TYPE_URL => {
                let address = Address::decode(body)
                    .map_err(|e| format!("{name}: not an istio.workload.Address: {e}"))?;
                AddressResource::try_from(address)
                    .map(MeshResource::Address)
                    .map_err(|e| e.named(name).to_string())
            }
            AUTHORIZATION_TYPE_URL => {
                let authorization = Authorization::decode(body)
                    .map_err(|e| format!("{name}: not an istio.security.Authorization: {e}"))?;
                Policy::try_from(authorization).map(MeshResource::Authorization).map_err(|e| e.to_string())
            }
            other => Err(format!("{name}: type {other} is not the mesh's")),
        }
    }

    fn apply(
        &self,
        type_url: &str,
        removed: &[String],
        resources: Vec<(String, MeshResource)>,
    ) -> Vec<(String, String)> {
        self.state.update(|state| apply_mesh(state, type_url, removed, resources))
    }
}

/// Applies decoded mesh resources to `state` (the part of a waypoint's handler that is the mesh
/// calls this inside its own update).
pub fn apply_mesh(
    state: &mut ProxyState,
    type_url: &str,
    removed: &[String],
    resources: Vec<(String, MeshResource)>,
) -> Vec<(String, String)> {
    for name in removed {
        match type_url {
            ADDRESS_TYPE_URL => state.remove_address(name),
            _ => state.remove_authorization(name),
        };
    }
    let mut errors = Vec::new();
    for (name, resource) in resources {
        let applied = match resource {
            MeshResource::Address(a) => state.insert_address(&name, a),
            MeshResource::Authorization(p) => state.insert_policy(&name, p),
        };
        if let Err(e) = applied {
            errors.push((name, e.to_string()));
        }
    }
    errors
}

/// An error and its sources, `: `-separated (tonic's transport error alone says only "transport
/// error").
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    with_sources(err.to_string(), err.source())
}

/// `text`, then each of `source` and its sources that `text` does not already say.
pub fn with_sources(mut text: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests;
