//! The xDS server handle ([`XdsServer`]): where the controller publishes snapshots, where tests
//! and the admin read who is connected and what they acknowledged, and the tonic service
//! ([`XdsService`]) that accepts delta ADS streams. Each stream runs as its own task
//! ([`super::connection`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use weft_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use weft_core::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use super::connection;
use super::node::{NodeInfo, Principal};
use super::resources::{Snapshot, View, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WAYPOINT_TYPE_URL};

/// Istio's default quiet period before a push (PILOT_DEBOUNCE_AFTER).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// Istio's default longest delay of a push under a steady stream of updates (PILOT_DEBOUNCE_MAX).
pub const DEFAULT_MAX_DEBOUNCE: Duration = Duration::from_secs(10);
/// How long a new stream may stay silent before its first request.
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Responses queued per stream before the stream's task waits for the client to read.
const RESPONSE_BUFFER: usize = 16;

/// How the server batches and what it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsOptions {
    /// A push waits until updates have been quiet for this long...
    pub debounce: Duration,
    /// ...but never longer than this after the first update it carries.
    pub max_debounce: Duration,
    /// A stream that sends no request within this is closed (DEADLINE_EXCEEDED).
    pub first_request_timeout: Duration,
    /// The type URLs served. A stream whose first request asks for another is refused.
    pub type_urls: BTreeSet<String>,
}

/// The xDS server: holds the current snapshot and the view, and tracks connected clients. Cheap to
/// clone; all clones are the same server.
#[derive(Clone)]
pub struct XdsServer {
    shared: Arc<Shared>,
}

/// The tonic service of an [`XdsServer`]; obtain it with [`XdsServer::service`].
#[derive(Clone)]
pub struct XdsService {
    shared: Arc<Shared>,
}

/// One connected stream, as tests and the admin see it.
#[derive(Clone, Debug)]
pub struct ClientStatus {
    /// Unique per stream for the life of the server.
    pub connection_id: u64,
    /// Who the client said it is.
    pub node: NodeInfo,
    /// The client's address, when the transport knows it.
    pub peer: Option<SocketAddr>,
    pub connected_at: SystemTime,
    /// By type URL.
    pub types: BTreeMap<String, TypeStatus>,
}

/// One type on one stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TypeStatus {
    /// Subscribed to every resource of the type.
    pub wildcard: bool,
    /// Names subscribed explicitly.
    pub names: BTreeSet<String>,
    /// What the client acknowledged holding: name -> version.
    pub acked: BTreeMap<String, String>,
    /// The nonce of the last response acknowledged.
    pub last_acked_nonce: Option<String>,
    /// The last response rejected, and why.
    pub last_nack: Option<Nack>,
    /// Responses sent.
    pub responses: u64,
    pub acks: u64,
    pub nacks: u64,
}

/// A response the client rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    pub nonce: String,
    /// The `google.rpc.Code` the client sent (often 0).
    pub code: i32,
    /// The client's reason.
    pub message: String,
}

/// Who a stream's bearer token says the client is ([`Principal`]: a node agent or a waypoint), or
/// why not.
pub trait Authenticate: Send + Sync + 'static {
    fn principal(
        &self,
        token: Option<String>,
    ) -> futures::future::BoxFuture<'static, Result<Principal, String>>;
}

/// What every stream of one server shares.
pub(super) struct Shared {
    pub view: Box<dyn View>,
    pub options: XdsOptions,
    /// When set, every stream must carry a bearer token of the node or waypoint it speaks as.
    pub authenticate: Option<Box<dyn Authenticate>>,
    pub snapshots: watch::Sender<Arc<Snapshot>>,
    pub shutdown: watch::Sender<bool>,
    clients: Mutex<BTreeMap<u64, ClientStatus>>,
    next_connection: AtomicU64,
    next_nonce: AtomicU64,
}

impl Default for XdsOptions {
    fn default() -> Self {
        XdsOptions {
            debounce: DEFAULT_DEBOUNCE,
            max_debounce: DEFAULT_MAX_DEBOUNCE,
            first_request_timeout: DEFAULT_FIRST_REQUEST_TIMEOUT,
            // Every type the controller publishes; the view decides who holds what (a Waypoint
            // goes only to the waypoint that names itself).
            type_urls: [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WAYPOINT_TYPE_URL]
                .into_iter()
                .map(String::from)
                .collect(),
        }
    }
}

impl XdsServer {
    /// A server that starts with an empty snapshot and shows each client what `view` selects.
    pub fn new(view: impl View, options: XdsOptions) -> XdsServer {
        XdsServer::with_authentication(view, options, None)
    }

    /// A server whose clients must authenticate: each stream's `authorization: Bearer <token>`
    /// must name, through `authenticate`, a principal that may speak as the stream's node
    /// ([`NodeInfo::admits`]: a node agent as its `NODE_NAME`, a waypoint as its own
    /// `WAYPOINT_NAME` and namespace); else the stream ends with UNAUTHENTICATED or
    /// PERMISSION_DENIED, saying why. `None`: anyone may subscribe.
    pub fn with_authentication(
        view: impl View,
        options: XdsOptions,
        authenticate: Option<Box<dyn Authenticate>>,
    ) -> XdsServer {
        let (snapshots, _) = watch::channel(Arc::new(Snapshot::default()));
        let (shutdown, _) = watch::channel(false);
        XdsServer {
            shared: Arc::new(Shared {
                view: Box::new(view),
                options,
                authenticate,
                snapshots,
                shutdown,
                clients: Mutex::new(BTreeMap::new()),
                next_connection: AtomicU64::new(1),
                next_nonce: AtomicU64::new(1),
            }),
        }
    }

    /// Publishes a new snapshot. Each connected client is sent what changed for it (by version,
    /// name by name) once updates have been quiet for the debounce period; several updates within
    /// it coalesce into one push.
    pub fn update(&self, snapshot: Snapshot) {
        self.shared.snapshots.send_replace(Arc::new(snapshot));
    }

    /// The snapshot last published.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshots.borrow().clone()
    }

    /// The connected streams, oldest first.
    pub fn clients(&self) -> Vec<ClientStatus> {
        self.shared.clients().values().cloned().collect()
    }

    /// The tonic service to add to a server (or a [`tonic::service::Routes`]).
    pub fn service(&self) -> AggregatedDiscoveryServiceServer<XdsService> {
        AggregatedDiscoveryServiceServer::new(XdsService { shared: self.shared.clone() })
            .max_decoding_message_size(weft_core::xds::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(weft_core::xds::MAX_MESSAGE_SIZE)
    }

    /// Closes every stream (UNAVAILABLE, so proxies reconnect, elsewhere if they can) and refuses
    /// new ones. For shutdown: long-lived streams would otherwise hold a graceful drain open.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    pub fn options(&self) -> &XdsOptions {
        &self.shared.options
    }
}

impl Shared {
    /// The client table. A panic while it was held cannot leave it inconsistent (every update is a
    /// single insert or field write), so a poisoned lock is used as is.
    fn clients(&self) -> MutexGuard<'_, BTreeMap<u64, ClientStatus>> {
        self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn register(&self, status: ClientStatus) {
        self.clients().insert(status.connection_id, status);
    }

    pub fn unregister(&self, connection_id: u64) {
        self.clients().remove(&connection_id);
    }

    /// Applies `f` to one type's status of one stream (creating it if needed).
    pub fn update_type(&self, connection_id: u64, type_url: &str, f: impl FnOnce(&mut TypeStatus)) {
        if let Some(client) = self.clients().get_mut(&connection_id) {
            f(client.types.entry(type_url.to_owned()).or_default());
        }
    }

    /// A nonce no other response of this server carries.
    pub fn nonce(&self) -> String {
        self.next_nonce.fetch_add(1, Ordering::Relaxed).to_string()
    }

    pub fn serves(&self, type_url: &str) -> bool {
        self.options.type_urls.contains(type_url)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    /// Returns at once (so a server-wide request timeout never cuts a stream) and serves the stream
    /// from its own task.
    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let connection_id = self.shared.next_connection.fetch_add(1, Ordering::Relaxed);
        let peer = request.remote_addr();
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned());
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let span = tracing::info_span!("xds", conn = connection_id, node = tracing::field::Empty);
        let task = connection::run(self.shared.clone(), connection_id, peer, token, request.into_inner(), tx);
        tokio::spawn(task.instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
