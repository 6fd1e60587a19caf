//! What Weft's binaries share and nothing else: SPIFFE identity, workload certificates and the
//! manager that keeps them fresh, the HBONE tunnel (client pool and server), and the generated
//! protobuf types of the wire APIs; also the typed Istio/Kubernetes configuration model with its
//! offline analysis. Depends on no Weft binary.

pub mod accept;
pub mod cert_manager;
pub mod config;
pub mod drain;
pub mod hbone;
pub mod identity;
pub mod netns;
pub mod proto;
pub mod tls;

#[cfg(feature = "testing")]
pub mod testing;

pub use identity::Identity;
