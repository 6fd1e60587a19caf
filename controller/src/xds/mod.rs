//! The controller's xDS server: Envoy's delta aggregated discovery service
//! (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`) serving
//! Istio's workload API to node proxies, Weft's or Istio's. It is generic over what the resources
//! are: the rest of the controller publishes [`Snapshot`]s of encoded resources, and a [`View`]
//! decides what each proxy holds. It must not know the config model or Kubernetes.
//!
//! Protocol, as Istio's ztunnel expects it:
//! - The first request of a stream carries the node (`ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`,
//!   metadata `NODE_NAME`); a stream without one, or asking for a type not served, is closed with
//!   INVALID_ARGUMENT. With authentication, its bearer token must be that of the node agent of its
//!   `NODE_NAME`, or of the waypoint its `WAYPOINT_NAME` and namespace name (else
//!   UNAUTHENTICATED or PERMISSION_DENIED).
//! - The first request of each type opens a subscription: no names means all of them (the
//!   wildcard). `initial_resource_versions` (a reconnect) is what the client holds: it is sent only
//!   what it lacks or holds at another version, and the names it holds that no longer exist.
//! - Later requests (N)ACK a response by nonce and may subscribe or unsubscribe names (also by
//!   alias, e.g. Istio's `network/IP`). NACKs are logged at warn and recorded; the rejected version
//!   is not resent.
//! - Snapshot updates reach each client as per-client deltas (changed versions and removals),
//!   debounced: a push waits for [`XdsOptions::debounce`] of quiet, at most
//!   [`XdsOptions::max_debounce`]. Each push recomputes the client's view and compares versions
//!   name by name: O(resources) per client and push, no per-resource bookkeeping across clients.
//!
//! [`serve`] runs the service on a listener, beside other gRPC services (the CA) if given.

mod connection;
mod node;
mod resources;
mod server;
mod subscription;

use std::future::Future;

use tonic::service::Routes;

pub use node::{NodeError, NodeInfo, Principal, NODE_NAME_KEY, WAYPOINT_NAME_KEY};
pub use resources::{
    Everything, PerResource, ResourceError, ResourceSet, Snapshot, View, XdsResource, ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL, WAYPOINT_TYPE_URL,
};
pub use server::{
    Authenticate, ClientStatus, Nack, TypeStatus, XdsOptions, XdsServer, XdsService, DEFAULT_DEBOUNCE,
    DEFAULT_FIRST_REQUEST_TIMEOUT, DEFAULT_MAX_DEBOUNCE,
};

pub use crate::grpc::DRAIN_DEADLINE;

/// Why the xDS server stopped.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("the xDS gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves `xds` and the services in `also` (e.g. the CA: `Routes::new(IstioCertificateServiceServer::new(ca))`,
/// or `Routes::default()` for none) on `listener` until `shutdown` completes; then closes the
/// xDS streams (UNAVAILABLE, so proxies reconnect) and lets in-flight requests finish for at most
/// [`DRAIN_DEADLINE`].
pub async fn serve(
    listener: crate::grpc::Listener,
    xds: XdsServer,
    also: Routes,
    shutdown: impl Future<Output = ()>,
) -> Result<(), XdsError> {
    let routes = also.add_service(xds.service());
    Ok(crate::grpc::serve(listener, routes, "xDS server", shutdown, || xds.shutdown()).await?)
}
