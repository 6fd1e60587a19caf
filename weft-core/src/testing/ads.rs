//! A fake delta ADS server for proxy tests: the test sees every stream a client opens, every
//! request on it (subscriptions, ACKs, NACKs, `initial_resource_versions`) and its metadata, and
//! scripts the responses itself. Real gRPC on a real port; no controller involved.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prost::Message;
use prost_types::Any;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::cert_manager::Token;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use crate::state::{ProxyState, Shared};
use crate::xds::{self, Handler, MeshHandler, Synced, XdsConfig};

const WAIT: Duration = Duration::from_secs(10);

/// The server, with the streams clients opened on it.
pub struct FakeAds {
    pub addr: SocketAddr,
    streams: mpsc::UnboundedReceiver<AdsStream>,
    /// Every stream's response channel, to end them all on [`FakeAds::stop`].
    open: Arc<Mutex<Vec<Responses>>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// A mesh xDS client (ztunnel's subscription: Address + Authorization) running against a
/// [`FakeAds`], with the state it fills.
pub struct MeshClient {
    pub state: Arc<Shared<ProxyState>>,
    pub synced: watch::Receiver<Synced>,
    pub task: tokio::task::JoinHandle<()>,
}

/// One client stream.
pub struct AdsStream {
    /// The request metadata (e.g. `authorization`).
    pub metadata: MetadataMap,
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    responses: Responses,
}

type Responses = mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>;

struct Service {
    streams: mpsc::UnboundedSender<AdsStream>,
    open: Arc<Mutex<Vec<Responses>>>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl FakeAds {
    /// Serves on a fresh loopback port.
    pub async fn start() -> FakeAds {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        FakeAds::start_on(listener)
    }

    /// Serves on `listener` (a restarted server can take its predecessor's port).
    pub fn start_on(listener: TcpListener) -> FakeAds {
        let addr = listener.local_addr().expect("bound address");
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let open = Arc::new(Mutex::new(Vec::new()));
        let service =
            AggregatedDiscoveryServiceServer::new(Service { streams: streams_tx, open: Arc::clone(&open) });
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("fake ADS server on {addr}: {e}");
            }
        });
        FakeAds { addr, streams, open, stop: Some(stop), task }
    }

    /// `http://<addr>`, the client's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts a [`MeshClient`] naming itself `node_id` with `metadata`, presenting `token`.
    pub fn mesh_client(&self, node_id: &str, metadata: BTreeMap<String, String>, token: Token) -> MeshClient {
        let state = Arc::new(Shared::new(ProxyState::new("")));
        let handler = Arc::new(MeshHandler { state: Arc::clone(&state) });
        let (tx, synced) = watch::channel(Synced::new(&handler.type_urls()));
        let endpoint = crate::control::ControlPlane::plaintext(&self.endpoint()).expect("a loopback address");
        let config = XdsConfig { endpoint, node_id: node_id.to_owned(), metadata, token };
        MeshClient { state, synced, task: tokio::spawn(xds::run(config, handler, tx)) }
    }

    /// The next stream a client opens (bounded wait).
    pub async fn next_stream(&mut self) -> AdsStream {
        tokio::time::timeout(WAIT, self.streams.recv())
            .await
            .expect("a client opened a stream in time")
            .expect("the server is running")
    }

    /// Stops serving (open streams end with UNAVAILABLE) and frees the port.
    pub async fn stop(mut self) {
        for responses in self.open.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            let _ = responses.send(Err(Status::unavailable("the fake ADS server stopped")));
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(WAIT, &mut self.task).await;
    }
}

impl AdsStream {
    /// The next request the client sent (bounded wait).
    pub async fn next_request(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("the client sent a request in time")
            .expect("the stream is open")
    }

    /// Sends `response` to the client.
    pub fn respond(&self, response: DeltaDiscoveryResponse) {
        let _ = self.responses.send(Ok(response));
    }

    /// Ends the stream with `status`.
    pub fn fail(&self, status: Status) {
        let _ = self.responses.send(Err(status));
    }
}

/// A delta response of `type_url` with `nonce`, the `resources` (name, version, message) and the
/// `removed` names.
pub fn response<M: Message>(
    type_url: &str,
    nonce: &str,
    resources: Vec<(String, String, M)>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    let resources = resources
        .into_iter()
        .map(|(name, version, message)| Resource {
            name,
            version,
            resource: Some(Any { type_url: type_url.to_owned(), value: message.encode_to_vec() }),
            ..Default::default()
        })
        .collect();
    DeltaDiscoveryResponse {
        type_url: type_url.to_owned(),
        nonce: nonce.to_owned(),
        resources,
        removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let metadata = request.metadata().clone();
        let mut incoming = request.into_inner();
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let (responses, responses_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(request)) = incoming.message().await {
                if requests_tx.send(request).is_err() {
                    break;
                }
            }
        });
        self.open.lock().unwrap_or_else(PoisonError::into_inner).push(responses.clone());
        let _ = self.streams.send(AdsStream { metadata, requests, responses });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(responses_rx))))
    }
}
