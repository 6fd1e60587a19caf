//! The proxies' platform: what ztunnel and the waypoint (and, for identity, certificates and the
//! protos, the controller) share. SPIFFE identity, workload certificates and the manager that
//! keeps them fresh, the HBONE tunnel (client pool and server), the accept loop and drain, the
//! generated protobuf types of the wire APIs and Istio's names and numbers; the delta-ADS client,
//! the mesh state it fills, the authorization engine, telemetry conventions and the admin server.
//! Depends on no Weft binary, links no YAML parser (the configuration model is `weft-config`'s)
//! and knows nothing of Kubernetes.

pub mod accept;
pub mod admin;
pub mod authz;
pub mod cert_manager;
pub mod control;
pub mod drain;
pub mod flags;
pub mod hbone;
pub mod identity;
pub mod names;
pub mod netns;
pub mod proto;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod xds;

#[cfg(feature = "testing")]
pub mod testing;

pub use identity::Identity;
