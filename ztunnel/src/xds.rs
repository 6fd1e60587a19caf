//! The xDS client: one delta ADS stream to the controller subscribing (wildcard) to Istio's
//! `Address` and `Authorization` types, applied to the shared [`ProxyState`].
//!
//! - Every response is ACKed, or NACKed with the reasons of the resources that could not be
//!   taken in; the good resources of a NACKed response are still applied, the bad ones leave
//!   what the proxy held before untouched.
//! - When the stream ends or cannot be opened, the client reconnects with exponential backoff
//!   (100 ms doubling to 15 s) and sends `initial_resource_versions`, so the controller sends only
//!   what changed while it was away. Meanwhile the state keeps the last good configuration.
//! - Each applied response bumps a generation on a watch channel; [`Synced`] says when both
//!   types have been received once (the readiness check waits for it).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prost::Message;
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use weft_core::cert_manager::Token;
use weft_core::proto::envoy::config::core::v3::Node;
use weft_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_core::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use weft_core::proto::google::rpc;
use weft_core::proto::istio::security::Authorization;
use weft_core::proto::istio::workload::Address;

use crate::state::ProxyState;

pub use weft_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
const TYPES: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// gRPC's `INVALID_ARGUMENT`, the code a NACK carries.
const INVALID_ARGUMENT: i32 = 3;

/// Who this proxy is, as the controller should see it.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// `http://host:port` of the controller's xDS port.
    pub endpoint: String,
    /// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
    pub node_id: String,
    /// The Kubernetes node this proxy serves (`NODE_NAME` in the node metadata).
    pub node_name: String,
    /// Sent as `authorization: Bearer <token>` (a file's token is re-read on each connect).
    pub token: Token,
}

/// What the client has received so far: a generation bumped on every applied response, and
/// whether each type has arrived at least once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub generation: u64,
    /// The generation at which both types had arrived, once they have.
    pub complete_at: Option<u64>,
    pub addresses: bool,
    pub authorizations: bool,
}

impl Synced {
    pub fn complete(&self) -> bool {
        self.addresses && self.authorizations
    }
}

/// Runs the client until the process ends: connect, stream, reconnect.
pub async fn run(config: XdsConfig, state: Arc<RwLock<ProxyState>>, synced: watch::Sender<Synced>) {
    let mut held: HashMap<&'static str, BTreeMap<String, String>> = HashMap::new();
    let mut backoff = BACKOFF_START;
    loop {
        match stream(&config, &state, &synced, &mut held).await {
            Ok(()) => tracing::warn!(endpoint = config.endpoint, "xDS stream ended; reconnecting"),
            Err(e) => tracing::warn!(
                endpoint = config.endpoint,
                error = %e,
                retry_in = ?backoff,
                "xDS stream failed; keeping the last configuration and reconnecting"
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        if synced.borrow().complete() {
            // A stream that got somewhere resets the backoff for the next failure.
            backoff = backoff.min(BACKOFF_START * 4);
        }
    }
}

/// One stream, from connect to its end.
async fn stream(
    config: &XdsConfig,
    state: &RwLock<ProxyState>,
    synced: &watch::Sender<Synced>,
    held: &mut HashMap<&'static str, BTreeMap<String, String>>,
) -> Result<(), tonic::Status> {
    let channel = Channel::from_shared(config.endpoint.clone())
        .map_err(|e| tonic::Status::invalid_argument(format!("xDS endpoint {:?}: {e}", config.endpoint)))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect to {}: {e}", config.endpoint)))?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    for (i, type_url) in TYPES.into_iter().enumerate() {
        let request = DeltaDiscoveryRequest {
            node: (i == 0).then(|| node(config)),
            type_url: type_url.to_owned(),
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
    tracing::info!(endpoint = config.endpoint, "xDS stream open");
    while let Some(response) = responses.message().await? {
        let type_url = response.type_url.clone();
        let nonce = response.nonce.clone();
        let errors = apply(state, held, response);
        synced.send_modify(|s| {
            s.generation += 1;
            match type_url.as_str() {
                ADDRESS_TYPE_URL => s.addresses = true,
                AUTHORIZATION_TYPE_URL => s.authorizations = true,
                _ => {}
            }
            if s.complete() && s.complete_at.is_none() {
                s.complete_at = Some(s.generation);
            }
        });
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

/// Applies one response to the state; returns why each refused resource was refused.
fn apply(
    state: &RwLock<ProxyState>,
    held: &mut HashMap<&'static str, BTreeMap<String, String>>,
    response: DeltaDiscoveryResponse,
) -> Vec<String> {
    let Some(type_url) = TYPES.into_iter().find(|t| *t == response.type_url) else {
        return vec![format!("type {} was not subscribed to", response.type_url)];
    };
    let versions = held.entry(type_url).or_default();
    let mut errors = Vec::new();
    // A poisoned lock means a reader panicked mid-read; the data is still whole (writers hold it
    // only here), so carry on with it.
    let mut state = state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    for name in &response.removed_resources {
        match type_url {
            ADDRESS_TYPE_URL => state.remove_address(name),
            _ => state.remove_authorization(name),
        };
        versions.remove(name);
    }
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
        let applied = match type_url {
            ADDRESS_TYPE_URL => Address::decode(body.value.as_slice())
                .map_err(|e| format!("{name}: not an istio.workload.Address: {e}"))
                .and_then(|a| state.apply_address(&name, a).map_err(|e| e.to_string())),
            _ => Authorization::decode(body.value.as_slice())
                .map_err(|e| format!("{name}: not an istio.security.Authorization: {e}"))
                .and_then(|a| state.apply_authorization(&name, a).map_err(|e| e.to_string())),
        };
        match applied {
            Ok(()) => {
                versions.insert(name, resource.version);
            }
            Err(e) => errors.push(e),
        }
    }
    errors
}

fn node(config: &XdsConfig) -> Node {
    let string = |s: &str| Value { kind: Some(Kind::StringValue(s.to_owned())) };
    Node {
        id: config.node_id.clone(),
        metadata: Some(Struct {
            fields: BTreeMap::from([("NODE_NAME".to_owned(), string(&config.node_name))]),
        }),
        ..Default::default()
    }
}
