//! Generated protobuf and gRPC types of the wire APIs Weft shares with Istio. Only the edges
//! (CA client, CA service, xDS server and client) see these; they convert to internal types on the
//! way in.
//!
//! Modules mirror the protobuf packages, because generated code refers to other packages by
//! relative path (`envoy.service.discovery.v3` reaches `google.rpc` as `super::super::...`).

/// The xDS type URL of Istio's workload and service resources (`istio.workload.Address`).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// The xDS type URL of Istio's L4 authorization policies (`istio.security.Authorization`).
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
/// The xDS type URL of Weft's per-waypoint L7 configuration (`weft.waypoint.v1.Waypoint`).
pub const WAYPOINT_TYPE_URL: &str = "type.googleapis.com/weft.waypoint.v1.Waypoint";

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

/// Istio's APIs for ambient node proxies.
pub mod istio {
    /// `istio.workload`: workloads and services (`Address`), pushed over delta xDS.
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }

    /// `istio.security`: L4 authorization policies, pushed over delta xDS.
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod security {
        tonic::include_proto!("istio.security");
    }
}

/// Weft's own APIs.
pub mod weft {
    pub mod waypoint {
        /// `weft.waypoint.v1`: a waypoint's resolved L7 configuration, pushed over delta xDS.
        #[allow(clippy::all, clippy::pedantic, missing_docs)]
        pub mod v1 {
            tonic::include_proto!("weft.waypoint.v1");
        }
    }
}

/// The parts of Envoy's API the discovery protocol needs.
pub mod envoy {
    pub mod config {
        pub mod core {
            /// `envoy.config.core.v3`: the `Node` a client identifies itself with.
            #[allow(clippy::all, clippy::pedantic, missing_docs)]
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }

    pub mod service {
        pub mod discovery {
            /// `envoy.service.discovery.v3`: the delta aggregated discovery service.
            #[allow(clippy::all, clippy::pedantic, missing_docs)]
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

/// Google's RPC error model (`google.rpc.Status`, carried by xDS NACKs).
pub mod google {
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}
