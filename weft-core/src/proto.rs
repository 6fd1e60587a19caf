//! Generated protobuf and gRPC types of the wire APIs Weft shares with Istio. Only the edges
//! (CA client, CA service) see these; they convert to internal types on the way in.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}
