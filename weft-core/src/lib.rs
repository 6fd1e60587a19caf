//! What Weft's binaries share and nothing else: SPIFFE identity, workload certificates and the
//! manager that keeps them fresh, the HBONE tunnel (client pool and server), and the generated
//! protobuf types of the wire APIs. Depends on no Weft binary. The configuration model is not
//! here but in weft-config, so the proxies that link this crate carry no YAML parser.

pub mod accept;
pub mod cert_manager;
pub mod drain;
pub mod hbone;
pub mod identity;
pub mod netns;
pub mod proto;
pub mod tls;

#[cfg(feature = "testing")]
pub mod testing;

pub use identity::Identity;
